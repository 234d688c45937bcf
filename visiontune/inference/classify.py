"""A trained classifier at work: evaluate it on class folders, predict images (PyTorch model file or ONNX export)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TTA
from ..data.classification import Samples, load_downsized, open_images, scan_folder
from ..data.images import expand_inputs
from ..data.index import is_index, read_index
from ..data.transforms import classification_eval
from ..engine.features import default_cache_dir
from ..engine.frozen import TorchForward, frozen_forward
from ..errors import UserError
from ..meta import ClassifierMeta
from ..metrics.classification import classification_metrics
from .load import OnnxClassifier, load_classifier, onnx_on_cpu


def eval_transform(meta: ClassifierMeta):
    p = meta.preprocessing
    return classification_eval(p.input_size, p.resize_size, p.mean, p.std)


def classifier_forward(run_or_file: str | Path, device: str = "auto", engine: str = "auto"):
    """(batch -> logits, the model's metadata): an exported .onnx file on ONNX Runtime, or a run's model on ``device``;
    on the CPU through the engine measured faster for it (engine/frozen.py; its graph kept in the feature cache)."""
    if str(run_or_file).endswith(".onnx"):
        onnx_on_cpu(device)
        model = OnnxClassifier(run_or_file)
        return model, model.meta
    model, meta = load_classifier(run_or_file, device)
    if next(model.parameters()).device.type != "cpu":
        return TorchForward(model), meta
    return frozen_forward(f"{meta.model}-classifier", model, meta.preprocessing.input_size, engine, cache_dir=default_cache_dir()), meta


def with_tta(forward, tta: str):
    """``forward`` with test-time augmentation: "flip" averages the class probabilities of the image and its mirror
    (returned as log-probabilities, so argmax, softmax and the loss read them as logits)."""
    if tta not in TTA:
        raise UserError(f"--tta: unknown {tta!r}; choose {' or '.join(TTA)}")
    if tta == "none":
        return forward
    return lambda x: ((forward(x).float().softmax(1) + forward(x.flip(-1)).float().softmax(1)) / 2).log()


def _logits(forward, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    for x, y in loader:
        logits.append(forward(x))
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def _workers(images: int, batch_size: int) -> int:
    """One decoding worker per core, none for a single batch (starting a worker costs more than it saves there)."""
    return 0 if images <= batch_size else len(os.sched_getaffinity(0))


def _labelled(data: Path) -> Samples:
    if is_index(data):
        rows = read_index(data)
        return Samples(rows.val if rows.val is not None else rows.train, rows.classes)
    return scan_folder(data / "val" if (data / "val").is_dir() else data)


def evaluate(
    run_or_file: str | Path, data: str | Path, skip_bad: bool = False, device: str = "auto", engine: str = "auto", tta: str = "none"
) -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on ``data``: class folders, DIR/val/, or an index
    (its split=val rows where it has a split column, else every row). ``tta``: "none" or "flip" (``with_tta``)."""
    forward, meta = classifier_forward(run_or_file, device, engine)
    forward = with_tta(forward, tta)
    samples = _labelled(Path(data))
    unknown = sorted(set(samples.classes) - set(meta.classes))
    if unknown:
        raise UserError(f"--data: classes the model does not know: {', '.join(unknown)} (it knows {', '.join(meta.classes)})")
    remap = {i: meta.classes.index(c) for i, c in enumerate(samples.classes)}
    samples = Samples([(p, remap[y]) for p, y in samples.items], meta.classes)
    cores = len(os.sched_getaffinity(0))
    images, _ = open_images(samples, meta.preprocessing.resize_size, eval_transform(meta), "none", skip_bad, threads=cores, progress=False)
    logits, labels_t = _logits(forward, DataLoader(images, batch_size=32, num_workers=_workers(len(images), 32)))
    return {**classification_metrics(logits, labels_t, meta.classes), "tta": tta}


class _Files(Dataset):
    """Image files -> (eval-transformed image, index), decoded at the model's resize size (in DataLoader workers)."""

    def __init__(self, paths: list[Path], meta: ClassifierMeta):
        self.paths, self.short_side, self.transform = paths, meta.preprocessing.resize_size, eval_transform(meta)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_downsized(self.paths[i], self.short_side)), i


@torch.no_grad()
def predict(
    run_or_file: str | Path,
    inputs: list[str | Path],
    topk: int = 3,
    batch_size: int = 32,
    device: str = "auto",
    engine: str = "auto",
    tta: str = "none",
) -> list[dict]:
    """Top-k labels with probabilities for each image: [{"path", "predictions": [{"label", "probability"}]}].
    ``run_or_file``: a run directory, its model file, or an exported .onnx file (run by ONNX Runtime)."""
    forward, meta = classifier_forward(run_or_file, device, engine)
    forward = with_tta(forward, tta)
    paths = expand_inputs(inputs)
    k = min(topk, len(meta.classes))
    loader = DataLoader(_Files(paths, meta), batch_size=batch_size, num_workers=_workers(len(paths), batch_size))
    results = []
    for x, indices in loader:
        top = forward(x).float().softmax(1).cpu().topk(k, dim=1)
        for i, vals, idxs in zip(indices.tolist(), top.values, top.indices):
            predictions = [{"label": meta.classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idxs)]
            results.append({"path": str(paths[i]), "predictions": predictions, **({"tta": tta} if tta != "none" else {})})
    return results
