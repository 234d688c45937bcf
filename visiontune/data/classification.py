"""A dataset of a classification run's images (``splits.Samples``): decoded when read, or held in RAM, or in the
on-disk decoded-image store."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..errors import UserError
from .image_store import ImageStore, StoreWriter, build_lock, room_for, store_dir, store_key
from .images import BadImage, load_rgb, load_rgb_tensor
from .multilabel import multi_hot
from .splits import Samples

log = logging.getLogger("visiontune")


def load_downsized(path: str | Path, short_side: int) -> torch.Tensor:
    """One image as a uint8 CHW tensor with its shorter side ``short_side`` (antialiased; large JPEGs decoded smaller)."""
    t = load_rgb_tensor(path, short_side)
    return (TF.resize(t, short_side, antialias=True) if min(t.shape[-2:]) != short_side else t).contiguous()


class ClassImages(Dataset):
    """(transformed image, class index or multi-hot vector) per file: decoded and downsized when read (in DataLoader
    workers), or decoded ahead (``images``: a list in RAM, or an ``ImageStore`` on disk). ``transform`` (torchvision v2)
    turns the uint8 image into a normalized float tensor."""

    def __init__(self, items: list[tuple[Path, int]], short_side: int, transform, images=None, num_classes: int = 0):
        self.items, self.short_side, self.transform, self.images = items, short_side, transform, images
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.items]

    def targets(self) -> torch.Tensor:
        """Every label: class indices (N,), or multi-hot rows (N, classes) for multi-label items."""
        if self.items and isinstance(self.items[0][1], tuple):
            return torch.stack([multi_hot(y, self.num_classes) for _, y in self.items])
        return torch.tensor(self.labels, dtype=torch.long)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.items]

    @property
    def cache(self) -> str:
        """Where decoded images come from: "ram", "disk" (the image store) or "none" (decoded when read)."""
        return "none" if self.images is None else "ram" if isinstance(self.images, list) else "disk"

    @property
    def predecoded(self) -> bool:
        """Decoded ahead: held in RAM, or in the on-disk image store."""
        return self.images is not None

    def decoded(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8, downsized, before the transform."""
        if self.images is not None:
            return self.images[i]
        try:
            return load_downsized(self.items[i][0], self.short_side)
        except BadImage as e:  # its header was read at the start; its pixels were not
            raise UserError(
                f"{e}; found while reading the images (remove the file, or pass --cache-images ram to check every image before training)"
            ) from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        y = self.items[i][1]
        return self.transform(self.decoded(i)), multi_hot(y, self.num_classes) if isinstance(y, tuple) else y


RAM_BUDGET_BYTES = 1 << 30  # --cache-images auto holds decoded images in RAM up to this much (~4,000 images at 256 px)


def estimated_bytes(n_images: int, short_side: int) -> int:
    """Decoded, downsized uint8 RGB images of a 4:3 aspect (the common photo)."""
    return n_images * short_side * (short_side * 4 // 3) * 3


def open_images(
    samples: Samples,
    short_side: int,
    transform,
    cache: str = "auto",
    skip_bad: bool = False,
    threads: int = 2,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> tuple[ClassImages, list[str]]:
    """The images of ``samples`` as a dataset, and the bad files skipped (``skip_bad``; else the first is an error).

    ``cache``: "ram" decodes every image now (in ``threads`` threads) and holds it; "disk" reads them from the image
    store in ``cache_dir`` (image_store.py), decoding into it first when it is not there; "none" reads each when needed,
    after reading every file's header now; "auto": "ram" while the images fit ``RAM_BUDGET_BYTES``, else "disk" where
    they fit the image cache (a first run then decodes each image once instead of once per view or epoch: 8,000 photos,
    ``linear``, measured 110 s against 168 s streaming), else "none".
    """
    mode = _cache_mode(cache, samples, short_side, cache_dir)
    if mode != "disk":
        return _decoded(samples, short_side, transform, mode, skip_bad, threads, progress, None)
    key = store_key(samples.items, short_side)
    with build_lock(cache_dir, key, quiet=not progress):  # one process on this machine decodes; the others read its store
        store = ImageStore.open(store_dir(cache_dir, key), key)
        if store is not None:
            return _from_store(samples, store, short_side, transform, skip_bad)
        return _decoded(samples, short_side, transform, mode, skip_bad, threads, progress, StoreWriter(cache_dir, key))


def _decoded(samples: Samples, short_side: int, transform, mode: str, skip_bad: bool, threads: int, progress: bool, writer):
    """``open_images`` past the choice of mode: decode (or read headers), into ``writer``'s store when given."""
    try:
        items, images, bad = _read_all(samples, short_side, mode, skip_bad, threads, progress, writer)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    if bad:
        log.warning("skipped %d bad image(s): %s", len(bad), "; ".join(msg for _, msg in bad[:3]))
    if writer is not None:
        images = writer.commit(bad)
    images = images if mode != "none" else None
    return ClassImages(items, short_side, transform, images, len(samples.classes)), [msg for _, msg in bad]


def _cache_mode(cache: str, samples: Samples, short_side: int, cache_dir: Path | None) -> str:
    estimated = estimated_bytes(len(samples), short_side)
    if cache == "auto" and estimated <= RAM_BUDGET_BYTES:
        return "ram"
    if cache == "auto" and cache_dir is None:
        return "none"
    if cache in ("auto", "disk"):
        if cache_dir is None:
            raise UserError("--cache-images disk: needs a cache folder, and --cache-dir is none")
        why_not = room_for(cache_dir, estimated)
        if why_not:
            log.warning("--cache-images %s: %s; reading the images from their files instead", cache, why_not)
            return "none"
        return "disk"
    return cache


def _read_all(samples: Samples, short_side: int, mode: str, skip_bad: bool, threads: int, progress: bool, writer):
    """Decode every image (``mode`` ram or disk: kept in a list, or written by ``writer``), or read every header."""
    decode = mode != "none"
    work = partial(load_downsized, short_side=short_side) if decode else partial(load_rgb, header_only=True)
    items, images, bad = [], [], []
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL and torch release the GIL while they decode and resize
        # a million files: not a million futures; 256 decoded images in flight at most (65 MB at 256 px)
        chunks = (samples.items[i : i + 256] for i in range(0, len(samples), 256))
        results = (r for chunk in chunks for r in pool.map(lambda item: _attempt(work, item[0]), chunk))
        desc = {"ram": "decode", "disk": "decode into the image cache", "none": "check headers"}[mode]
        for item, (image, error) in tqdm(
            zip(samples.items, results), total=len(samples), desc=desc, unit="img", leave=False, disable=not progress or None
        ):
            if error is not None:
                if not skip_bad:
                    raise UserError(f"{error} (pass --skip-bad to skip bad images)")
                bad.append([str(item[0]), str(error)])
                continue
            items.append(item)
            if writer is not None:
                writer.add(image)
            elif decode:
                images.append(image)
    return items, images, bad


def _from_store(samples: Samples, store: ImageStore, short_side: int, transform, skip_bad: bool) -> tuple[ClassImages, list[str]]:
    if store.bad and not skip_bad:
        raise UserError(f"{store.bad[0][1]} (pass --skip-bad to skip bad images)")
    if store.bad:
        log.warning("skipped %d bad image(s): %s", len(store.bad), "; ".join(msg for _, msg in store.bad[:3]))
    bad_paths = {path for path, _ in store.bad}
    items = [item for item in samples.items if str(item[0]) not in bad_paths]
    return ClassImages(items, short_side, transform, store, len(samples.classes)), [msg for _, msg in store.bad]


def _attempt(work, path: Path):
    try:
        return work(path), None
    except BadImage as e:
        return None, e
