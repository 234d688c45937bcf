"""Export a trained model to ONNX or TorchScript, with its class names and preprocessing inside the file.

- ONNX: ``metadata_props`` holds ``classes`` (JSON list), ``preprocessing`` (JSON) and ``visiontune`` (the
  model file's metadata). Classifiers: input ``images`` (N, 3, S, S) float32, output ``logits`` (N, classes).
- TorchScript (classifiers): the same three JSON strings as extra files ``classes.json``, ``preprocessing.json``,
  ``visiontune.json`` (read them with ``torch.jit.load(path, _extra_files={...})``).

Detection runs (Mask/Faster R-CNN) export to ONNX only: input ``image``, ONE RGB image (3, H, W) float32 in [0, 1]
of any size (the graph resizes and normalizes it itself); outputs ``boxes`` (N, 4) x1 y1 x2 y2 in input pixels,
``labels`` (N,) int64 (1..classes, an index into ``classes`` plus one), ``scores`` (N,) sorted descending and, for
Mask R-CNN, ``masks`` (N, 1, H, W) probabilities (threshold at 0.5).

``inference/load.py`` runs such files (``OnnxClassifier``, ``OnnxDetector``) where predict would run the PyTorch model.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from unittest import mock

import torch
from torchvision.models.detection import transform as detection_transform
from torchvision.ops import poolers

from .checkpoint import atomic_write
from .engine.frozen import write_onnx
from .errors import UserError
from .inference.load import load_classifier, load_detector, read_model_file
from .meta import ClassifierMeta, DetectorMeta

PREPROCESSING_NOTE = (
    "RGB; resize the shorter side to resize_size (bilinear, antialiased); center-crop input_size; "
    "scale to [0, 1]; subtract mean and divide by std per channel; NCHW float32"
)
DETECTION_PREPROCESSING_NOTE = (
    "ONE RGB image per call, (3, H, W) float32 scaled to [0, 1], any size; the model itself resizes "
    "it (shorter side to min_size, longer side at most max_size) and normalizes with mean/std"
)
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")


def export(run: str | Path, fmt: str, output: str | Path) -> Path:
    """Write ``run``'s best model to ``output`` as ``fmt`` (onnx or torchscript)."""
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"--format: unknown format {fmt!r}; choose onnx or torchscript")
    out = Path(output)
    if not out.parent.is_dir():
        raise UserError(f"--output: {out.parent} is not a directory")
    _, meta = read_model_file(run)
    if isinstance(meta, DetectorMeta):
        return _export_detector(run, fmt, out)
    if fmt == "onnx":
        meta = write_classifier_onnx(run, out)
    else:
        model, meta = load_classifier(run)
        atomic_write(out, lambda tmp: _write_torchscript(model, _example(meta), meta, tmp))
    size = meta.preprocessing.input_size
    print(f"wrote {out} ({fmt}, {_classes_shown(meta)}; input {size}x{size})")
    return out


def write_classifier_onnx(run: str | Path, out: Path) -> ClassifierMeta:
    """``run``'s classifier as an ONNX file with its classes and preprocessing; returns its metadata."""
    model, meta = load_classifier(run)
    atomic_write(out, lambda tmp: _write_onnx(model, _example(meta), meta, tmp))
    return meta


def _example(meta: ClassifierMeta) -> torch.Tensor:
    size = meta.preprocessing.input_size
    return torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)


def _classes_shown(meta) -> str:
    return f"{len(meta.classes)} classes: {', '.join(meta.classes[:5])}{', ...' if len(meta.classes) > 5 else ''}"


def _props(meta, preprocessing: dict) -> dict[str, str]:
    """What an exported file carries about itself (ONNX metadata_props, TorchScript extra files)."""
    return {"classes": json.dumps(meta.classes), "preprocessing": json.dumps(preprocessing), "visiontune": json.dumps(meta.to_dict())}


def _classifier_props(meta: ClassifierMeta) -> dict[str, str]:
    return _props(meta, dict(dataclasses.asdict(meta.preprocessing), steps=PREPROCESSING_NOTE))


def _save_onnx_with(tmp: str, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(tmp)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp)


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, meta: ClassifierMeta, tmp: str) -> None:
    write_onnx(model, example, tmp, "images", "logits")  # the frozen-pass graph writer: constant "same" padding too
    _save_onnx_with(tmp, _classifier_props(meta))


def _merge_levels_by_gather(levels: torch.Tensor, per_level: list[torch.Tensor]) -> torch.Tensor:
    """The pooled RoIs of every FPN level back in RoI order, as torchvision's traced merge computes them, by one row
    gather: torchvision scatters each level into a zero tensor of all RoIs (a ScatterElements of 1,000 x 256 x 7 x 7
    per level), which took half of ONNX Runtime's time for a Mask R-CNN image."""
    order = torch.cat([torch.where(levels == level)[0] for level in range(len(per_level))])
    return torch.cat(per_level)[torch.argsort(order)]


def _resize_as_eager(image: torch.Tensor, min_size: int, max_size: int, target=None, fixed_size=None):
    """torchvision's detection resize, traced so that ONNX Runtime resizes to the size PyTorch does: computed in float64,
    as eager Python does. torchvision's traced version computes the scale in float32 and makes the image a pixel smaller
    at 643 of 4,582 sizes in a grid (at 320/512 px); that changed the detections of 3 of 50 Penn-Fudan val images.
    Here: 0 of 4,582."""
    if target is not None or fixed_size is not None:
        raise ValueError("export traces images alone, without targets or a fixed size")
    # float64 throughout, and no 0-d tensors: the exporter casts those, Python numbers and reductions to float32
    hw = torch._shape_as_tensor(image)[-2:].to(torch.float64)
    to_short = torch.tensor([min_size], dtype=torch.float64) / hw  # its larger entry scales the short side to min_size
    to_long = torch.tensor([max_size], dtype=torch.float64) / hw  # its smaller entry, the long side to max_size
    to_short = torch.where(to_short[:1] > to_short[1:], to_short[:1], to_short[1:])
    to_long = torch.where(to_long[:1] < to_long[1:], to_long[:1], to_long[1:])
    size = torch.floor(hw * torch.where(to_short < to_long, to_short, to_long)).to(torch.int64)
    return torch.nn.functional.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)[0], None


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, meta: ClassifierMeta, tmp: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; the format is still what C++ apps load
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, tmp, _extra_files={f"{k}.json": v for k, v in _classifier_props(meta).items()})


def _export_detector(run: str | Path, fmt: str, out: Path) -> Path:
    if fmt != "onnx":
        raise UserError(f"{run}: detection models export to ONNX only; use --format onnx")
    meta = write_detector_onnx(run, out)
    print(
        f"wrote {out} (onnx, {meta.model}{' on ' + meta.backbone if meta.backbone else ''}, {_classes_shown(meta)}; "
        f"one image per call, any size)"
    )
    return out


def write_detector_onnx(run: str | Path, out: Path) -> DetectorMeta:
    """``run``'s detector as an ONNX file (one image of any size per call) with its classes; returns its metadata."""
    model, meta = load_detector(run, "cpu")
    atomic_write(out, lambda tmp: _write_detector_onnx(model, meta, tmp))
    return meta


def _write_detector_onnx(model: torch.nn.Module, meta: DetectorMeta, tmp: str) -> None:
    outputs = list(DETECTION_OUTPUTS if meta.masks else DETECTION_OUTPUTS[:3])
    axes = {"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in outputs}}
    if meta.masks:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    # a noise image: traced shapes stay symbolic (dynamic_axes), so its size only needs to be a plausible one
    example = torch.rand(3, meta.min_size, meta.max_size, generator=torch.Generator().manual_seed(0))
    with (
        warnings.catch_warnings(),
        mock.patch.object(poolers, "_onnx_merge_levels", _merge_levels_by_gather),
        mock.patch.object(detection_transform, "_resize_image_and_masks", _resize_as_eager),
    ):
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            model, ([example],), tmp, dynamo=False, input_names=["image"], output_names=outputs, dynamic_axes=axes, opset_version=17
        )
    prep = {
        "min_size": meta.min_size,
        "max_size": meta.max_size,
        "mean": list(model.transform.image_mean),
        "std": list(model.transform.image_std),
        "steps": DETECTION_PREPROCESSING_NOTE,
        "outputs": outputs,
    }
    _save_onnx_with(tmp, _props(meta, prep))
