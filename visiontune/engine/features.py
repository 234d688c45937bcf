"""Frozen-backbone feature cache: compute backbone features once, then train heads on tensors.

With the base frozen, each epoch of the tutorial's loop recomputes the same convolutions. Here each
training image is augmented ``views`` times, once, and its features kept; the head then trains for
many passes over those features in seconds. Validation images get one center-crop view.

The features are also kept on disk (``cached_extract``), so a second run on the same images (another
head, another learning rate) skips the backbone entirely. A cache file is named by a hash of everything
its contents depend on: the backbone's name and weights (a SHA-256 of its tensors, whatever file they
came from), the engine that ran it (frozen.py), the preprocessing, the number of views and the augmentation seed,
and each image's path, size, modification time and label. Change any of them and the name changes. The file also carries a SHA-256
of its tensors: a corrupt or half-written file fails the check and is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..caches import cache_folder
from ..checkpoint import weights_digest
from ..data.classification import ClassImages
from ..data.image_store import remove_abandoned
from ..data.images import file_fingerprints
from .distributed import SeededPerSample
from .feature_file import FeatureWriter, map_arrays, read_header, tensors_digest

log = logging.getLogger("visiontune")
CACHE_FORMAT = "visiontune-features/4"  # 2: views seeded per image; 3: the engine in the key; 4: written through a memory map


def extract(
    forward: Callable[[torch.Tensor], torch.Tensor],
    dataset: ClassImages,
    views: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    desc: str = "features",
    progress: bool = True,
    workers: int = 0,
    timing: dict | None = None,
    allocate: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``views`` passes over ``dataset`` (its transform may be random): (views*N, F) in float32 and the
    labels, (views*N,) class indices or (views*N, classes) multi-hot.

    ``forward`` is the frozen network (frozen.py: PyTorch or ONNX Runtime). Images stream through ``workers``
    DataLoader processes (decoded there unless held in RAM); only the features are kept. Each image's augmentation in
    view v is seeded by (seed, v, index): the same features for any worker count. ``timing``, a dict, receives the
    images, seconds and images/s of the whole pass (reading the images included). ``allocate(rows, dim, label_shape,
    label_dtype)`` gives the (features, labels) tensors to fill (default: in RAM; the cache: pages of its file).
    """
    allocate = allocate or in_ram
    start, n = time.perf_counter(), len(dataset)
    feats = labels = None
    with tqdm(total=views * n, desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for view in range(views):
            row = view * n
            loader = DataLoader(SeededPerSample(dataset, seed, view), batch_size=batch_size, shuffle=False, num_workers=workers)
            for x, y in loader:
                f, y = forward(x), torch.as_tensor(y)
                if feats is None:
                    feats, labels = allocate(views * n, f.shape[1], tuple(y.shape[1:]), y.dtype)
                feats[row : row + len(y)], labels[row : row + len(y)] = f, y
                row += len(y)
                bar.update(len(y))
    seconds = time.perf_counter() - start
    if timing is not None:
        timing.update(images=views * n, seconds=round(seconds, 2), images_per_second=round(views * n / max(seconds, 1e-9), 1))
    return (feats, labels) if feats is not None else (torch.empty(0, 0), torch.empty(0, dtype=torch.long))


def in_ram(rows: int, dim: int, label_shape: tuple, label_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(rows, dim), torch.empty(rows, *label_shape, dtype=label_dtype)


# --------------------------------------------------------------------------------------------- on-disk cache


def cache_key(
    backbone_name: str, backbone: nn.Module, preprocessing: str, views: int, seed: int, items: list[tuple[str | Path, int]], engine: str
) -> dict:
    """Everything the cached features depend on, as plain JSON."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone_name,
        "weights_sha256": weights_digest(backbone.state_dict()),
        "preprocessing": preprocessing,
        "views": views,
        "seed": seed,
        "engine": engine,
        "files": file_fingerprints(items),
    }


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in key["backbone"])
    return Path(cache_dir) / f"{safe_name}-{digest}.safetensors"


def save_features(path: Path, key: dict, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """Write features held in RAM as a cache file (feature_file.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(path, key, len(feats), feats.shape[1], tuple(labels.shape[1:]), labels.dtype)
    writer.features.copy_(feats)
    writer.labels.copy_(labels)
    writer.commit()


def load_features(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (features, labels), mapped from the file, or None when the file is missing, unreadable, for another
    key, or corrupt."""
    if not path.is_file():
        return None
    try:
        header, data_start = read_header(path)
        meta = header.get("__metadata__") or {}
        if meta.get("key") != json.dumps(key, sort_keys=True) or set(header) != {"__metadata__", "features", "labels"}:
            log.warning("feature cache %s belongs to other inputs; rebuilding it", path)
            return None
        feats, labels = map(torch.from_numpy, map_arrays(path, header, data_start, "c"))
    except Exception as e:  # noqa: BLE001 - truncated or garbled: rebuild it
        log.warning(
            "feature cache %s is unreadable (%s); rebuilding it", path, str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        )
        return None
    if meta.get("sha256") != tensors_digest({"features": feats, "labels": labels}):
        log.warning("feature cache %s failed its checksum (corrupt); rebuilding it", path)
        return None
    return feats, labels


def cached_extract(
    backbone_name: str,
    backbone: nn.Module,
    forward,
    dataset: ClassImages,
    preprocessing: str,
    views: int = 1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    desc: str = "features",
    progress: bool = True,
    workers: int = 0,
    timing: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract`` through the on-disk cache: reuse the features when every input is unchanged, else compute and store.

    ``forward`` runs ``backbone`` (frozen.py; its ``name``, the engine, is part of the key). ``preprocessing`` describes
    how the files (``dataset.paths``) became tensors (decode size and the transform). ``cache_dir`` as ``cache_folder``
    reads it: None the default folder, "none" no disk cache. ``timing`` as for ``extract``, left empty when the features come from the cache.
    """
    run = dict(views=views, seed=seed, desc=desc, progress=progress, workers=workers, timing=timing)
    folder = cache_folder(cache_dir)
    if folder is None:
        return extract(forward, dataset, **run)
    key = cache_key(backbone_name, backbone, preprocessing, views, seed, dataset.items, forward.name)
    path = cache_path(folder, key)
    hit = load_features(path, key)
    if hit is not None:
        log.info("features from cache %s", path)
        return hit
    remove_abandoned(folder)  # what builds killed midway left
    writers = []

    def allocate(rows: int, dim: int, label_shape: tuple, label_dtype: torch.dtype):
        try:  # the features go straight into the cache file's pages
            folder.mkdir(parents=True, exist_ok=True)
            writers.append(FeatureWriter(path, key, rows, dim, label_shape, label_dtype))
            return writers[0].features, writers[0].labels
        except OSError as e:  # a read-only or full disk costs speed next time, never this run
            log.warning("could not write the feature cache %s (%s)", path, e.strerror or e)
            return in_ram(rows, dim, label_shape, label_dtype)

    try:
        feats, labels = extract(forward, dataset, allocate=allocate, **run)
        return writers[0].commit() if writers else (feats, labels)
    finally:
        for w in writers:
            w.abandon()  # nothing left once committed; a failed or interrupted build's file
