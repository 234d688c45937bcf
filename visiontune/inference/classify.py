"""A trained classifier at work: evaluate it on class folders, predict images (PyTorch model file or ONNX export)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..caches import cache_folder
from ..checkpoint import weights_digest
from ..config import TTA
from ..data.classification import load_downsized, open_images
from ..data.images import expand_inputs
from ..data.multilabel import read_label_file
from ..data.prefetch import decoding_workers, in_background
from ..data.shards import is_listing, read_listing
from ..data.splits import Samples, scan_folder
from ..data.tar_members import listings_in
from ..data.transforms import classification_eval
from ..engine.frozen import TorchForward, frozen_forward
from ..engine.runtime import select_device
from ..errors import UserError
from ..meta import ClassifierMeta
from ..metrics.classification import classification_metrics
from ..metrics.multilabel import multilabel_metrics
from .load import OnnxClassifier, build_classifier, onnx_on_cpu, read_classifier

# Images per engine call. Small: the first batch is ready soonest and ONNX Runtime computes as fast per image as at
# 32 (hymenoptera val predict, 2 cores: 146 images/s at 8, 133 at 16, 127 at 32)
BATCH = 8


def eval_transform(meta: ClassifierMeta):
    p = meta.preprocessing
    return classification_eval(p.input_size, p.resize_size, p.mean, p.std)


def classifier_forward(run_or_file: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | Path | None = None):
    """(batch -> logits, the model's metadata): an exported .onnx file on ONNX Runtime, or a run's model on ``device``;
    on the CPU through the engine measured faster for it (engine/frozen.py; its graph and timing kept in ``cache_dir``
    as ``cache_folder`` reads it)."""
    if str(run_or_file).endswith(".onnx"):
        onnx_on_cpu(device)
        model = OnnxClassifier(run_or_file)
        return model, model.meta
    sd, meta = read_classifier(run_or_file)
    if select_device(device).type != "cpu":
        return TorchForward(build_classifier(sd, meta, device)), meta
    size, cache, digest = meta.preprocessing.input_size, cache_folder(cache_dir), weights_digest(sd)
    # the model is built only where its graph is not in the cache yet (or the engine is PyTorch); spin=False: the
    # engine's threads sleep between batches while a thread reads the next on the same cores
    build = functools.partial(build_classifier, sd, meta)
    return frozen_forward(f"{meta.model}-classifier", build, size, engine, cache_dir=cache, spin=False, digest=digest), meta


def with_tta(forward, tta: str, multi_label: bool = False):
    """``forward`` with test-time augmentation: the mean of the class probabilities of several views of each image,
    returned as logits of that mean (log-probabilities; multi-label: log-odds of the mean sigmoid). "flip": the image
    and its mirror; "flip+crops": also its four corner crops of 7/8 of the side, enlarged back to the input size."""
    if tta not in TTA:
        raise UserError(f"--tta: unknown {tta!r}; choose {', '.join(TTA[:-1])} or {TTA[-1]}")
    if tta == "none":
        return forward

    def views(x: torch.Tensor) -> list[torch.Tensor]:
        out = [x, x.flip(-1)]
        if tta == "flip+crops":
            h, w = x.shape[-2:]
            ch, cw = round(h * 7 / 8), round(w * 7 / 8)
            for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
                crop = x[..., top : top + ch, left : left + cw]
                out.append(torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
        return out

    if multi_label:
        return lambda x: torch.stack([forward(v.contiguous()).float().sigmoid() for v in views(x)]).mean(0).logit(eps=1e-7)
    return lambda x: torch.stack([forward(v.contiguous()).float().softmax(1) for v in views(x)]).mean(0).log()


def _logits(forward, batches) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    for x, y in batches:
        logits.append(forward(x))
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def _batches(dataset: Dataset, batch_size: int, frozen):
    """``dataset`` in batches, read ahead of the engine ``frozen`` (data/prefetch.py)."""
    return in_background(DataLoader(dataset, batch_size=batch_size, num_workers=decoding_workers()), frozen)


def _labelled(data: Path, labels: str | None, meta: ClassifierMeta) -> Samples:
    """The evaluation images, their labels as class indices of the model (a label file: its split=val rows, if any)."""
    if meta.multi_label != bool(labels):
        raise UserError(
            "--labels: this model is multi-label; pass its label file" if meta.multi_label else "--labels: only for multi-label models"
        )
    if labels:  # read in the model's classes (a file of val rows alone reads too): no remapping
        rows = read_label_file(labels, data, classes=meta.classes)
        return Samples(rows.val if rows.val else rows.train, meta.classes)
    samples = _single_labelled(data)
    unknown = sorted(set(samples.classes) - set(meta.classes))
    if unknown:
        raise UserError(f"--data: classes the model does not know: {', '.join(unknown)} (it knows {', '.join(meta.classes)})")
    remap = [meta.classes.index(c) for c in samples.classes]
    return Samples([(p, remap[y]) for p, y in samples.items], meta.classes)


def _single_labelled(data: Path) -> Samples:
    if is_listing(data):
        rows = read_listing(data)
        return Samples(rows.val if rows.val is not None else rows.train, rows.classes)
    return scan_folder(data / "val" if (data / "val").is_dir() else data)


def evaluate(
    run_or_file: str | Path,
    data: str | Path,
    skip_bad: bool = False,
    device: str = "auto",
    engine: str = "auto",
    tta: str = "none",
    labels: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on ``data``: class folders, DIR/val/, or an index
    (its split=val rows where it has a split column, else every row). ``tta``: none, flip or flip+crops (``with_tta``).
    A multi-label model: mAP, F1 at its thresholds and per-class AP on the images of ``labels`` under ``data``.
    ``cache_dir``: as for ``classifier_forward``; shard listings are read from and saved there too."""
    forward, meta = classifier_forward(run_or_file, device, engine, cache_dir)
    frozen, forward = forward, with_tta(forward, tta, meta.multi_label)  # frozen: the engine itself
    with listings_in(cache_folder(cache_dir)):
        samples = _labelled(Path(data), labels, meta)
    cores = len(os.sched_getaffinity(0))
    images, _ = open_images(samples, meta.preprocessing.resize_size, eval_transform(meta), "none", skip_bad, threads=cores, progress=False)
    logits, labels_t = _logits(forward, _batches(images, BATCH, frozen))
    if meta.multi_label:
        return {**multilabel_metrics(logits, labels_t, meta.classes, meta.thresholds), "tta": tta}
    return {**classification_metrics(logits, labels_t, meta.classes), "tta": tta}


class _Files(Dataset):
    """Image files -> (eval-transformed image, index), decoded at the model's resize size."""

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
    batch_size: int = BATCH,
    device: str = "auto",
    engine: str = "auto",
    tta: str = "none",
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """Top-k labels with probabilities for each image: [{"path", "predictions": [{"label", "probability"}]}]; a
    multi-label model adds "labels": every label at or above its threshold, most probable first.
    ``run_or_file``: a run directory, its model file, or an exported .onnx file (run by ONNX Runtime). ``cache_dir``: as
    for ``evaluate``."""
    forward, meta = classifier_forward(run_or_file, device, engine, cache_dir)
    frozen, forward = forward, with_tta(forward, tta, meta.multi_label)  # frozen: the engine itself
    with listings_in(cache_folder(cache_dir)):
        paths = expand_inputs(inputs)
    k = min(topk, len(meta.classes))
    results = []
    for x, indices in _batches(_Files(paths, meta), batch_size, frozen):
        logits = forward(x).float().cpu()
        probs = logits.sigmoid() if meta.multi_label else logits.softmax(1)
        top = probs.topk(k, dim=1)
        for i, row, vals, idxs in zip(indices.tolist(), probs, top.values, top.indices):
            r = {
                "path": str(paths[i]),
                "predictions": [{"label": meta.classes[j], "probability": round(float(v), 6)} for v, j in zip(vals, idxs)],
            }
            if meta.multi_label:
                above = [j for j in row.argsort(descending=True).tolist() if row[j] >= meta.thresholds[j]]
                r["labels"] = [{"label": meta.classes[j], "probability": round(float(row[j]), 6)} for j in above]
            results.append({**r, **({"tta": tta} if tta != "none" else {})})
    return results
