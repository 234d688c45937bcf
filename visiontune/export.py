"""Export a trained classifier to ONNX or TorchScript, with its class names and preprocessing inside the file.

- ONNX: ``metadata_props`` holds ``classes`` (JSON list), ``preprocessing`` (JSON) and ``visiontune`` (the
  model file's metadata). Input ``images`` (N, 3, S, S) float32, output ``logits`` (N, classes).
- TorchScript: the same three JSON strings as extra files ``classes.json``, ``preprocessing.json``,
  ``visiontune.json`` (read them with ``torch.jit.load(path, _extra_files={...})``).

``predict_onnx`` runs an exported file with ONNX Runtime and prints what ``inference.predict`` prints;
it needs neither PyTorch weights nor the training data.

Detection runs (Mask/Faster R-CNN) export to ONNX only: input ``image``, ONE RGB image (3, H, W) float32 in [0, 1]
of any size (the graph resizes and normalizes it itself); outputs ``boxes`` (N, 4) x1 y1 x2 y2 in input pixels,
``labels`` (N,) int64 (1..classes, an index into ``classes`` plus one), ``scores`` (N,) sorted descending and, for
Mask R-CNN, ``masks`` (N, 1, H, W) probabilities (threshold at 0.5). ``OnnxDetector`` runs such a file where
``detect predict`` would run the PyTorch model.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .errors import UserError

PREPROCESSING_NOTE = ("RGB; resize the shorter side to resize_size (bilinear, antialiased); center-crop input_size; "
                      "scale to [0, 1]; subtract mean and divide by std per channel; NCHW float32")


def _metadata(meta: dict) -> dict[str, str]:
    prep = dict(meta["preprocessing"], steps=PREPROCESSING_NOTE)
    record = {k: v for k, v in meta.items() if k not in ("weights_sha256",)}
    return {"classes": json.dumps(meta["classes"]), "preprocessing": json.dumps(prep), "visiontune": json.dumps(record)}


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, meta: dict, tmp: str) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(model, (example,), tmp, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    proto = onnx.load(tmp)
    for key, value in _metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp)


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, meta: dict, tmp: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; the format is still what C++ apps load
        traced = torch.jit.trace(model, example, check_trace=False)
        extra = {f"{k}.json": v for k, v in _metadata(meta).items()}
        torch.jit.save(traced, tmp, _extra_files=extra)


def export(run: str | Path, fmt: str, output: str | Path) -> Path:
    """Write ``run``'s best model to ``output`` as ``fmt`` (onnx or torchscript)."""
    from . import checkpoint as ckpt
    from .inference import load_classifier, model_path

    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"--format: unknown format {fmt!r}; choose onnx or torchscript")
    out = Path(output)
    if not out.parent.is_dir():
        raise UserError(f"--output: {out.parent} is not a directory")
    _, meta = ckpt.load_model_file(model_path(run))
    if meta.get("task") == "detection":
        return _export_detector(run, fmt, out)
    if meta.get("task") != "classification":
        raise UserError(f"{run}: export supports classification and detection models; this one is a {meta.get('task')} model")
    model, meta = load_classifier(run)
    size = meta["preprocessing"]["input_size"]
    example = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    writer = _write_onnx if fmt == "onnx" else _write_torchscript
    atomic_write(out, lambda tmp: writer(model, example, meta, tmp))
    print(f"wrote {out} ({fmt}, {len(meta['classes'])} classes: {', '.join(meta['classes'][:5])}"
          f"{', ...' if len(meta['classes']) > 5 else ''}; input {size}x{size})")
    return out


def read_onnx_metadata(path: str | Path):
    """An ONNX Runtime session and the visiontune metadata of an exported file."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - anything ONNX Runtime cannot read is the user's file
        raise UserError(f"{p}: not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    props = session.get_modelmeta().custom_metadata_map
    if "classes" not in props or "preprocessing" not in props:
        raise UserError(f"{p}: not a visiontune export (no class names or preprocessing in its metadata)")
    record = json.loads(props.get("visiontune", "{}"))
    return session, {"classes": json.loads(props["classes"]), "preprocessing": json.loads(props["preprocessing"]),
                     "task": record.get("task", "classification"), "visiontune": record}


def onnx_on_cpu(device: str) -> None:
    """Exported files run on ONNX Runtime's CPU provider: a GPU asked for is refused, not silently ignored."""
    if device not in ("auto", "cpu"):
        raise UserError(f"--device {device}: .onnx files run on the CPU (ONNX Runtime); predict from the run directory to use {device}")


def predict_onnx(path: str | Path, inputs: list[str | Path], topk: int = 3, batch_size: int = 32, device: str = "auto") -> list[dict]:
    """Top-k labels for each image with ONNX Runtime; the same output as ``inference.predict``."""
    from torchvision.transforms.v2 import functional as TF

    from .data.images import load_rgb
    from .data.transforms import classification_eval
    from .inference import expand_inputs

    onnx_on_cpu(device)
    session, meta = read_onnx_metadata(path)
    if meta["task"] != "classification":
        raise UserError(f"{path}: an exported {meta['task']} model; use visiontune detect predict")
    p = meta["preprocessing"]
    tf = classification_eval(p["input_size"], p["resize_size"], p["mean"], p["std"])
    classes = meta["classes"]
    paths = expand_inputs(inputs)
    k = min(topk, len(classes))
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i: i + batch_size]
        x = torch.stack([tf(TF.pil_to_tensor(load_rgb(q))) for q in chunk]).numpy()
        logits = session.run(["logits"], {"images": x})[0]
        probs = torch.from_numpy(np.ascontiguousarray(logits)).softmax(1)
        top = probs.topk(k, dim=1)
        for q, vals, idxs in zip(chunk, top.values, top.indices):
            results.append({"path": str(q), "predictions": [{"label": classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idxs)]})
    return results


# --------------------------------------------------------------------------------------------- detection

DETECTION_PREPROCESSING_NOTE = ("ONE RGB image per call, (3, H, W) float32 scaled to [0, 1], any size; the model itself resizes "
                                "it (shorter side to min_size, longer side at most max_size) and normalizes with mean/std")
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")


def _export_detector(run: str | Path, fmt: str, out: Path) -> Path:
    from .engine.detection import load_detector

    if fmt != "onnx":
        raise UserError(f"{run}: detection models export to ONNX only; use --format onnx")
    model, meta = load_detector(run)
    atomic_write(out, lambda tmp: _write_detector_onnx(model, meta, tmp))
    print(f"wrote {out} (onnx, {meta['model']}{' on ' + meta['backbone'] if meta.get('backbone') else ''}, "
          f"{len(meta['classes'])} classes: {', '.join(meta['classes'][:5])}{', ...' if len(meta['classes']) > 5 else ''}; "
          f"one image per call, any size)")
    return out


def _write_detector_onnx(model: torch.nn.Module, meta: dict, tmp: str) -> None:
    import onnx

    outputs = list(DETECTION_OUTPUTS if meta["masks"] else DETECTION_OUTPUTS[:3])
    axes = {"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in outputs}}
    if meta["masks"]:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    # a noise image: traced shapes stay symbolic (dynamic_axes), so its size only needs to be a plausible one
    example = torch.rand(3, meta["min_size"], meta["max_size"], generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(model, ([example],), tmp, dynamo=False, input_names=["image"], output_names=outputs,
                          dynamic_axes=axes, opset_version=17)
    prep = {"min_size": meta["min_size"], "max_size": meta["max_size"], "mean": list(model.transform.image_mean),
            "std": list(model.transform.image_std), "steps": DETECTION_PREPROCESSING_NOTE, "outputs": outputs}
    record = {k: v for k, v in meta.items() if k not in ("weights_sha256",)}
    proto = onnx.load(tmp)
    for key, value in {"classes": json.dumps(meta["classes"]), "preprocessing": json.dumps(prep), "visiontune": json.dumps(record)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp)


class OnnxDetector:
    """An exported detector behind the PyTorch model's interface: a list of (3, H, W) float images in [0, 1] -> a list of
    dicts of boxes, labels, scores (and masks), so ``detect predict`` runs it as it runs the PyTorch model."""

    def __init__(self, path: str | Path):
        self.session, info = read_onnx_metadata(path)
        if info["task"] != "detection":
            raise UserError(f"{path}: an exported {info['task']} model; use visiontune classify predict")
        self.meta = info["visiontune"]
        self.outputs = info["preprocessing"]["outputs"]

    def eval(self) -> "OnnxDetector":
        return self

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:
            values = self.session.run(self.outputs, {"image": image.float().contiguous().cpu().numpy()})
            results.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(self.outputs, values)})
        return results
