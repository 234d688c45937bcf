"""Image folders -> samples and class names; a dataset of their images, decoded when read or held in RAM.

Layouts: ``DIR/train/<class>/*`` + ``DIR/val/<class>/*`` (the tutorial's), or ``DIR/<class>/*`` with a
seeded, stratified ``val_split``, or an explicit ``val_data`` folder; or a CSV/JSONL index of path,label rows
(``index.py``) in place of either folder.

Only real image files count (see ``images.IMAGE_EXTENSIONS``). GIFs are skipped with a warning: in the
wild they are placeholders or animations, not photos of the class (hymenoptera ships ``imageNotFound.gif``).
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..errors import UserError
from .image_store import ImageStore, StoreWriter, build_lock, room_for, store_dir, store_key
from .images import BadImage, is_image_file, load_rgb
from .index import is_index, read_val_index
from .multilabel import multi_hot, read_label_file, split_random
from .shards import is_listing, is_shards, read_listing, read_val_shards

log = logging.getLogger("visiontune")


@dataclass
class Samples:
    """A list of (path, class index) with the class names they index; multi-label: (path, tuple of class indices)."""

    items: list[tuple[Path, int | tuple[int, ...]]]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files that are not images, with reasons

    def __len__(self) -> int:
        return len(self.items)

    @property
    def multi_label(self) -> bool:
        return bool(self.items) and isinstance(self.items[0][1], tuple)

    def counts(self) -> dict[str, int]:
        c = {name: 0 for name in self.classes}
        for _, y in self.items:
            for k in y if isinstance(y, tuple) else (y,):
                c[self.classes[k]] += 1
        return c


def scan_folder(root: str | Path, what: str = "--data") -> Samples:
    """Read ``root/<class>/<image>``; every subfolder is a class."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{what}: {root}: no such directory")
    if not root.is_dir():
        raise UserError(f"{what}: {root}: not a directory")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{what}: {root}: no class folders (expected {root}/<class name>/<images>)")
    items, skipped = [], []
    for idx, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image_file(p)]
        for p in files:
            if not is_image_file(p):
                skipped.append(str(p))
        if not images:
            raise UserError(f"{what}: class folder {d} has no images")
        items += [(p, idx) for p in images]
    if len(class_dirs) < 2:
        raise UserError(f"{what}: {root}: only one class folder ({class_dirs[0].name}); a classifier needs at least two")
    gifs = [s for s in skipped if s.lower().endswith(".gif")]
    if gifs:
        log.warning("skipping %d GIF file(s), not counted as images of their class: %s", len(gifs), ", ".join(gifs[:3]))
    return Samples(items, [d.name for d in class_dirs], skipped)


def split_stratified(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Hold out ``fraction`` of each class (at least one image), the same for the same seed."""
    rng = random.Random(seed)
    train, val = [], []
    for c in range(len(samples.classes)):
        members = [s for s in samples.items if s[1] == c]
        rng.shuffle(members)
        n_val = max(1, round(len(members) * fraction))
        if n_val >= len(members):
            raise UserError(f"--val-split: class {samples.classes[c]!r} has {len(members)} image(s), too few to split")
        val += members[:n_val]
        train += members[n_val:]
    return Samples(sorted(train), samples.classes, samples.skipped), Samples(sorted(val), samples.classes)


def find_splits(
    data: str | Path, val_data: str | Path | None = None, val_split: float | None = None, seed: int = 0, labels: str | None = None
) -> tuple[Samples, Samples]:
    """The train and validation samples for a classification run, with the same classes in both."""
    if data is None or not str(data).strip():
        raise UserError(
            "--data: required: a folder with train/ and val/ class folders, or class folders and --val-split, or a CSV/JSONL index"
        )
    if labels:
        return label_file_splits(labels, data, val_data, val_split, seed)
    if is_listing(data):
        return same_classes(*index_splits(data, val_data, val_split, seed))
    data = Path(data)
    if not data.exists():
        raise UserError(f"--data: {data}: no such directory")
    if not data.is_dir():
        raise UserError(f"--data: {data}: not a directory")
    has_tutorial_layout = (data / "train").is_dir() and (data / "val").is_dir()
    if val_data is not None:
        train = scan_folder(data / "train" if has_tutorial_layout else data)
        val = validation_samples(val_data, train.classes)
    elif has_tutorial_layout and val_split is None:
        train, val = scan_folder(data / "train"), scan_folder(data / "val", "--data (val/)")
    elif val_split is not None:
        return split_stratified(scan_folder(data / "train" if has_tutorial_layout else data), val_split, seed)
    else:
        raise UserError(f"--data: {data} has no train/ and val/ folders; pass --val-split 0.2 or --val-data DIR")
    return same_classes(train, val)


def same_classes(train: Samples, val: Samples) -> tuple[Samples, Samples]:
    """(train, val), once their class lists are known to be the same."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"--data: train and val classes differ (only in train: {only_train or '-'}; only in val: {only_val or '-'})")
    return train, val


def index_splits(data: str | Path, val_data: str | Path | None, val_split: float | None, seed: int) -> tuple[Samples, Samples]:
    """--data INDEX or SHARDS: validation from --val-data, else --val-split of its training rows, else split=val rows."""
    rows = read_listing(data)
    train = Samples(rows.train, rows.classes)
    if val_data is not None:
        return train, validation_samples(val_data, rows.classes)
    if val_split is not None:
        return split_stratified(train, val_split, seed)
    if rows.val is None:
        kind = "no validation split in the shards" if is_shards(data) else "no split column"
        raise UserError(f"--data: {data} has {kind}; pass --val-split 0.2 or --val-data DIR")
    if not rows.val:
        raise UserError(f"--data: {data} has no rows with split val; pass --val-split 0.2 or --val-data DIR")
    return train, Samples(rows.val, rows.classes)


def label_file_splits(labels: str, data: str | Path, val_data, val_split: float | None, seed: int) -> tuple[Samples, Samples]:
    """--labels FILE (multi-label): validation from --val-split, else its split=val rows."""
    if val_data is not None:
        raise UserError("--val-data: not with --labels; give the label file a split column, or pass --val-split")
    rows = read_label_file(labels, data)
    if val_split is not None:
        train, val = split_random(rows.train, val_split, seed)
    elif rows.val:
        train, val = rows.train, rows.val
    else:
        raise UserError(f"--labels: {labels} has no rows with split val; pass --val-split 0.2")
    return Samples(train, rows.classes), Samples(val, rows.classes)


def validation_samples(val_data: str | Path, classes: list[str]) -> Samples:
    """--val-data: class folders, or an index whose labels are among the training ``classes``."""
    if is_index(val_data):
        return Samples(read_val_index(val_data, classes), classes)
    if is_shards(val_data):
        return Samples(read_val_shards(val_data, classes), classes)
    return scan_folder(val_data, "--val-data")


def load_downsized(path: str | Path, short_side: int) -> torch.Tensor:
    """One image as a uint8 CHW tensor with its shorter side ``short_side`` (antialiased; large JPEGs decoded smaller)."""
    t = TF.pil_to_tensor(load_rgb(path, short_side))
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
