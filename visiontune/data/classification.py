"""Image folders -> samples and class names; a dataset that decodes and downsizes each image once.

Layouts: ``DIR/train/<class>/*`` + ``DIR/val/<class>/*`` (the tutorial's), or ``DIR/<class>/*`` with a
seeded, stratified ``val_split``, or an explicit ``val_data`` folder.

Only real image files count (see ``images.IMAGE_EXTENSIONS``). GIFs are skipped with a warning: in the
wild they are placeholders or animations, not photos of the class (hymenoptera ships ``imageNotFound.gif``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError
from .images import BadImage, is_image_file, load_rgb

log = logging.getLogger("visiontune")


@dataclass
class Samples:
    """A list of (path, class index) with the class names they index."""

    items: list[tuple[Path, int]]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files that are not images, with reasons

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        c = {name: 0 for name in self.classes}
        for _, y in self.items:
            c[self.classes[y]] += 1
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
    data: str | Path, val_data: str | Path | None = None, val_split: float | None = None, seed: int = 0
) -> tuple[Samples, Samples]:
    """The train and validation samples for a classification run, with the same classes in both."""
    if data is None or not str(data).strip():
        raise UserError("--data: required: a folder with train/ and val/ class folders, or class folders and --val-split")
    data = Path(data)
    if not data.exists():
        raise UserError(f"--data: {data}: no such directory")
    if not data.is_dir():
        raise UserError(f"--data: {data}: not a directory")
    has_tutorial_layout = (data / "train").is_dir() and (data / "val").is_dir()
    if val_data is not None:
        train, val = scan_folder(data / "train" if has_tutorial_layout else data), scan_folder(val_data, "--val-data")
    elif has_tutorial_layout and val_split is None:
        train, val = scan_folder(data / "train"), scan_folder(data / "val", "--data (val/)")
    elif val_split is not None:
        return split_stratified(scan_folder(data / "train" if has_tutorial_layout else data), val_split, seed)
    else:
        raise UserError(f"--data: {data} has no train/ and val/ folders; pass --val-split 0.2 or --val-data DIR")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"--data: train and val classes differ (only in train: {only_train or '-'}; only in val: {only_val or '-'})")
    return train, val


def decode_all(samples: Samples, short_side: int, skip_bad: bool = False) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """Decode each image once and downsize its shorter side to ``short_side`` (uint8 CHW tensors)."""
    from tqdm import tqdm

    images, labels, bad = [], [], []
    for path, y in tqdm(samples.items, desc="decode", unit="img", leave=False, disable=None):
        try:
            im = load_rgb(path)
        except BadImage as e:
            if not skip_bad:
                raise UserError(f"{e} (pass --skip-bad to skip bad images)") from None
            bad.append(str(e))
            continue
        t = TF.pil_to_tensor(im)
        if min(t.shape[-2:]) != short_side:
            t = TF.resize(t, short_side, antialias=True)
        images.append(t.contiguous())
        labels.append(y)
    if bad:
        log.warning("skipped %d bad image(s): %s", len(bad), "; ".join(bad[:3]))
    return images, labels, bad


class DecodedImages(Dataset):
    """Pre-decoded uint8 images; ``transform`` (torchvision v2) turns each into a normalized float tensor."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]
