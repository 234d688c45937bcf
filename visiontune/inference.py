"""Using a trained classifier: load the model file, evaluate on a folder, predict images. No training data needed."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .data.classification import DecodedImages, decode_all, scan_folder, Samples
from .data.images import is_image_file, load_rgb
from .data.transforms import classification_eval
from .engine.evaluate import classification_metrics, predict_logits
from .engine.train import select_device
from .errors import UserError
from .models.backbones import build_backbone
from .models.classifier import Classifier


def model_path(run_or_file: str | Path) -> Path:
    p = Path(run_or_file)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise UserError(f"{run_or_file}: no model file (expected a run directory with model.safetensors, or the file itself)")
    return p


def load_classifier(run_or_file: str | Path, device: str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the architecture from the file's metadata and load its weights (no pretrained download),
    in eval mode on ``device`` (auto, cpu, cuda or mps)."""
    sd, meta = ckpt.load_model_file(model_path(run_or_file))
    if meta.get("task") != "classification":
        raise UserError(f"{run_or_file}: not a classification model (task: {meta.get('task')})")
    missing = [k for k in ("model", "classes", "head", "preprocessing") if k not in meta]
    if missing:
        raise UserError(f"{run_or_file}: the model file's metadata lacks {', '.join(missing)}; it was not written by visiontune")
    backbone = build_backbone(meta["model"], weights="none")
    model = Classifier(backbone, len(meta["classes"]), head=meta["head"], bank_size=meta.get("bank_size", 1))
    model.load_state_dict(sd)
    model.eval().to(select_device(device), memory_format=torch.channels_last)
    return model, meta


def _eval_transform(meta: dict):
    p = meta["preprocessing"]
    return classification_eval(p["input_size"], p["resize_size"], p["mean"], p["std"])


def evaluate(run_or_file: str | Path, data: str | Path, skip_bad: bool = False, device: str = "auto") -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on ``data`` (class folders, or DIR/val/)."""
    model, meta = load_classifier(run_or_file, device)
    root = Path(data)
    if (root / "val").is_dir():
        root = root / "val"
    samples = scan_folder(root)
    unknown = sorted(set(samples.classes) - set(meta["classes"]))
    if unknown:
        raise UserError(f"--data: classes the model does not know: {', '.join(unknown)} (it knows {', '.join(meta['classes'])})")
    remap = {i: meta["classes"].index(c) for i, c in enumerate(samples.classes)}
    samples = Samples([(p, remap[y]) for p, y in samples.items], meta["classes"])
    images, labels, _ = decode_all(samples, meta["preprocessing"]["resize_size"], skip_bad)
    logits, labels_t = predict_logits(model, DataLoader(DecodedImages(images, labels, _eval_transform(meta)), batch_size=32))
    return classification_metrics(logits, labels_t, meta["classes"])


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
        elif p.exists():
            paths.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


@torch.no_grad()
def predict(run_or_file: str | Path, inputs: list[str | Path], topk: int = 3, batch_size: int = 32, device: str = "auto") -> list[dict]:
    """Top-k labels with probabilities for each image: [{"path", "predictions": [{"label", "probability"}]}]."""
    model, meta = load_classifier(run_or_file, device)
    on = next(model.parameters()).device
    tf = _eval_transform(meta)
    from torchvision.transforms.v2 import functional as TF

    paths = expand_inputs(inputs)
    k = min(topk, len(meta["classes"]))
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i: i + batch_size]
        x = torch.stack([tf(TF.pil_to_tensor(load_rgb(p))) for p in chunk]).to(on, memory_format=torch.channels_last)
        probs = model(x).float().softmax(1).cpu()
        top = probs.topk(k, dim=1)
        for p, vals, idxs in zip(chunk, top.values, top.indices):
            results.append({"path": str(p), "predictions": [{"label": meta["classes"][j], "probability": round(float(v), 6)} for v, j in zip(vals, idxs)]})
    return results
