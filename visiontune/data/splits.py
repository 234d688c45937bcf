"""Image folders, CSV/JSONL indexes and .tar shards -> the train and validation samples and their class names.

Layouts: ``DIR/train/<class>/*`` + ``DIR/val/<class>/*`` (the tutorial's), or ``DIR/<class>/*`` with a
seeded, stratified ``val_split``, or an explicit ``val_data`` folder; or a CSV/JSONL index of path,label rows
(``index.py``) or shards (``shards.py``) in place of either folder.

Only real image files count (see ``images.IMAGE_EXTENSIONS``). GIFs are skipped with a warning: in the
wild they are placeholders or animations, not photos of the class (hymenoptera ships ``imageNotFound.gif``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..caches import cache_folder
from ..errors import UserError
from .images import is_image_file
from .index import is_index, read_val_index
from .multilabel import read_label_file, split_random
from .shards import is_listing, is_shards, read_listing, read_val_shards
from .tar_members import listings_in

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
    data: str | Path,
    val_data: str | Path | None = None,
    val_split: float | None = None,
    seed: int = 0,
    labels: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Samples, Samples]:
    """The train and validation samples for a classification run, with the same classes in both. Shards' listings
    are saved in (and read from) the run's ``cache_dir`` (its --cache-dir: unset the default folder, "none" nowhere)."""
    with listings_in(cache_folder(cache_dir)):
        return _splits(data, val_data, val_split, seed, labels)


def _splits(
    data: str | Path, val_data: str | Path | None, val_split: float | None, seed: int, labels: str | None
) -> tuple[Samples, Samples]:
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
