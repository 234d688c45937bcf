"""Multi-label input: ``--labels FILE`` (CSV or JSONL), one row per image: its path, relative to ``--data``, and its
labels separated by spaces (none: the image shows no class), with an optional ``split`` column (train or val).

fastai's planet layout reads as it is: the columns may be called ``image``/``image_name`` and ``tags``, and a path
without a suffix finds its ``.jpg``, ``.jpeg`` or ``.png`` file. JSONL rows may give the labels as a list. An item's
label is the sorted tuple of its class indices; classes are the sorted labels of the training rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .index import SPLITS, check_file, field, path_key, records

COLUMNS = ("path", "labels")
ALIASES = {"image": "path", "image_name": "path", "file": "path", "tags": "labels"}
SUFFIXES = (".jpg", ".jpeg", ".png")

MultiItem = tuple[Path, tuple[int, ...]]


@dataclass
class LabelRows:
    train: list[MultiItem]
    val: list[MultiItem] | None  # None: the file has no split column
    classes: list[str]


def multi_hot(labels: tuple[int, ...], num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[list(labels)] = 1.0
    return target


def read_label_file(labels: str | Path, data: str | Path, what: str = "--labels", classes: list[str] | None = None) -> LabelRows:
    """The rows of ``labels``, their images under ``data``, as (path, class indices) sorted by path. Classes are the
    training rows' labels, or ``classes`` (a trained model's: then every row may be split=val, as for eval)."""
    labels, data = Path(labels), Path(data)
    if not data.is_dir():
        raise UserError(f"--data: {data}: not a directory (with --labels, the folder the label file's paths start from)")
    train, val, seen, has_split = [], [], {}, None
    for line, record in records(labels, what, COLUMNS, ALIASES):
        where = f"{what}: {labels}, line {line}"
        if has_split is None:
            has_split = "split" in record
        elif ("split" in record) != has_split:
            raise UserError(f"{where}: 'split' is on some rows only (give every row one, or none)")
        split = field(record, "split", where) if has_split else None
        if split is not None and split not in SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        image = _image_file(data, field(record, "path", where), where)
        if str(image) in seen:
            raise UserError(f"{what}: {labels}, lines {seen[str(image)]} and {line}: the same image twice ({image})")
        seen[str(image)] = line
        (val if split == "val" else train).append((image, _names(record.get("labels"), where)))
    if not train and classes is None:
        raise UserError(f"{what}: {labels}: no training rows (expected a header and rows of path,labels[,split])")
    given = classes is not None
    classes = classes if given else sorted({name for _, names in train for name in names})
    if not classes:
        raise UserError(f"{what}: {labels}: no training row has a label")
    unknown = sorted({name for _, names in train + val for name in names} - set(classes))
    if unknown:
        why = f"is not a class of the model ({', '.join(classes)})" if given else "has no training rows (only split=val ones)"
        raise UserError(f"{what}: {labels}: label {unknown[0]!r} {why}")
    index = {name: i for i, name in enumerate(classes)}
    items = [sorted(((p, tuple(sorted(index[n] for n in names))) for p, names in rows), key=path_key) for rows in (train, val)]
    return LabelRows(items[0], items[1] if has_split else None, classes)


def split_random(items: list[MultiItem], fraction: float, seed: int) -> tuple[list[MultiItem], list[MultiItem]]:
    """Hold out ``fraction`` of the images, the same for the same seed (label sets overlap: no stratification)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * fraction))
    if n_val >= len(items):
        raise UserError(f"--val-split: {len(items)} image(s), too few to split")
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def _names(value, where: str) -> tuple[str, ...]:
    """Labels as space-separated text (CSV) or a list of strings (JSONL); empty: no label."""
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    elif isinstance(value, str):
        names = value.split()
    else:
        raise UserError(f"{where}: labels must be text separated by spaces or a list of text, got {str(value)[:40]}")
    return tuple(sorted(set(n for n in names if n)))


def _image_file(data: Path, text: str, where: str) -> Path:
    image = Path(data, text)
    if not image.suffix and not image.exists():  # planet: names without their suffix
        image = next((image.with_name(image.name + s) for s in SUFFIXES if image.with_name(image.name + s).is_file()), image)
    check_file(image, where)
    return image
