"""Export a trained classifier to ONNX or TorchScript, with its class names and preprocessing inside the file.

- ONNX: ``metadata_props`` holds ``classes`` (JSON list), ``preprocessing`` (JSON) and ``visiontune`` (the
  model file's metadata). Input ``images`` (N, 3, S, S) float32, output ``logits`` (N, classes).
- TorchScript: the same three JSON strings as extra files ``classes.json``, ``preprocessing.json``,
  ``visiontune.json`` (read them with ``torch.jit.load(path, _extra_files={...})``).

``predict_onnx`` runs an exported file with ONNX Runtime and prints what ``inference.predict`` prints;
it needs neither PyTorch weights nor the training data.
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
    if meta.get("task") != "classification":
        raise UserError(f"{run}: export supports classification models; this one is a {meta.get('task')} model")
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
    return session, {"classes": json.loads(props["classes"]), "preprocessing": json.loads(props["preprocessing"])}


def predict_onnx(path: str | Path, inputs: list[str | Path], topk: int = 3, batch_size: int = 32) -> list[dict]:
    """Top-k labels for each image with ONNX Runtime; the same output as ``inference.predict``."""
    from torchvision.transforms.v2 import functional as TF

    from .data.images import load_rgb
    from .data.transforms import classification_eval
    from .inference import expand_inputs

    session, meta = read_onnx_metadata(path)
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
