"""A trained classifier at work: evaluate it on class folders, predict images (PyTorch model file or ONNX export)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from ..data.classification import Samples, open_images, scan_folder
from ..data.images import expand_inputs, load_rgb
from ..data.transforms import classification_eval
from ..errors import UserError
from ..meta import ClassifierMeta
from ..metrics.classification import classification_metrics, predict_logits
from .load import load_classifier, load_for_predict


def eval_transform(meta: ClassifierMeta):
    p = meta.preprocessing
    return classification_eval(p.input_size, p.resize_size, p.mean, p.std)


def evaluate(run_or_file: str | Path, data: str | Path, skip_bad: bool = False, device: str = "auto") -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on ``data`` (class folders, or DIR/val/)."""
    model, meta = load_classifier(run_or_file, device)
    root = Path(data)
    if (root / "val").is_dir():
        root = root / "val"
    samples = scan_folder(root)
    unknown = sorted(set(samples.classes) - set(meta.classes))
    if unknown:
        raise UserError(f"--data: classes the model does not know: {', '.join(unknown)} (it knows {', '.join(meta.classes)})")
    remap = {i: meta.classes.index(c) for i, c in enumerate(samples.classes)}
    samples = Samples([(p, remap[y]) for p, y in samples.items], meta.classes)
    cores = len(os.sched_getaffinity(0))
    images, _ = open_images(samples, meta.preprocessing.resize_size, eval_transform(meta), "none", skip_bad, threads=cores, progress=False)
    logits, labels_t = predict_logits(model, DataLoader(images, batch_size=32, num_workers=cores))
    return classification_metrics(logits, labels_t, meta.classes)


@torch.no_grad()
def predict(run_or_file: str | Path, inputs: list[str | Path], topk: int = 3, batch_size: int = 32, device: str = "auto") -> list[dict]:
    """Top-k labels with probabilities for each image: [{"path", "predictions": [{"label", "probability"}]}].
    ``run_or_file``: a run directory, its model file, or an exported .onnx file (run by ONNX Runtime)."""
    model, on, meta = load_for_predict(run_or_file, device, "classification")
    tf = eval_transform(meta)
    paths = expand_inputs(inputs)
    k = min(topk, len(meta.classes))
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = torch.stack([tf(TF.pil_to_tensor(load_rgb(p))) for p in chunk]).to(on, memory_format=torch.channels_last)
        top = model(x).float().softmax(1).cpu().topk(k, dim=1)
        for p, vals, idxs in zip(chunk, top.values, top.indices):
            results.append(
                {"path": str(p), "predictions": [{"label": meta.classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idxs)]}
            )
    return results
