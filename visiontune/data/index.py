"""Classification input from an index file: one row per image, ``path`` and ``label`` (a CSV with a header row, or
JSONL objects), so a large set need not be laid out as class folders.

Paths are relative to the index file's folder (absolute paths allowed). An optional ``split`` column (``train`` or
``val``) says which rows validate. Classes are the sorted labels, as class folders give their sorted names. Each
listed file is checked with one ``os.stat``; only the (path, label) list is kept, sorted by path. Every error is one
line naming the index file and its line.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from heapq import merge
from pathlib import Path
from typing import TextIO

from ..errors import UserError

INDEX_SUFFIXES = (".csv", ".jsonl")
COLUMNS = ("path", "label")
SPLITS = ("train", "val")

Row = tuple[int, Path, str, str | None]  # line number, image file, label, split (None: no split column)


def is_index(path: str | Path) -> bool:
    """A ``.csv`` or ``.jsonl`` path that is not a folder is read as an index (a missing one: "no such file")."""
    p = Path(path)
    return p.suffix.lower() in INDEX_SUFFIXES and not p.is_dir()


@dataclass
class IndexRows:
    """An index's images as (path, class index), each list sorted by path; ``val`` is None without a split column."""

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]] | None
    classes: list[str]


def read_index(path: str | Path, what: str = "--data") -> IndexRows:
    """The training index: its classes are its sorted labels, and each needs at least one training row."""
    path = Path(path)
    train, val, has_split = [], [], False
    for _, image, label, split in checked_rows(path, what):
        has_split = split is not None
        (val if split == "val" else train).append((image, label))
    if not train:
        raise UserError(f"{what}: {path}: no training rows (expected a header and rows of {','.join(COLUMNS)}[,split])")
    train_labels = {label for _, label in train}
    val_only = sorted({label for _, label in val} - train_labels)
    if val_only:
        raise UserError(f"{what}: {path}: class {val_only[0]!r} has no training rows (only split=val ones)")
    classes = sorted(train_labels)
    if len(classes) < 2:
        raise UserError(f"{what}: {path}: only one class ({classes[0]}); a classifier needs at least two")
    for items in (train, val):
        to_class_indices(items, classes)
    check_no_duplicates(path, what, train, val)
    return IndexRows(train, val if has_split else None, classes)


def read_val_index(path: str | Path, classes: list[str], what: str = "--val-data") -> list[tuple[Path, int]]:
    """A validation index: every row validates, and each label must be one of the training ``classes``."""
    path, known = Path(path), set(classes)
    items = []
    for line, image, label, split in checked_rows(path, what):
        if split is not None:
            raise UserError(f"{what}: {path}: has a split column; give it as --data, where its split=val rows validate")
        if label not in known:
            raise UserError(f"{what}: {path}, line {line}: label {label!r} is not a class of --data ({', '.join(classes)})")
        items.append((image, label))
    if not items:
        raise UserError(f"{what}: {path}: no rows (expected a header and rows of {','.join(COLUMNS)})")
    to_class_indices(items, classes)
    check_no_duplicates(path, what, items)
    return items


def to_class_indices(items: list, classes: list[str]) -> None:
    """Replace each (path, label) by (path, class index) in place, and sort by path (as a folder scan orders them)."""
    index = {name: i for i, name in enumerate(classes)}
    for i, (image, label) in enumerate(items):
        items[i] = (image, index[label])
    items.sort(key=path_key)


def path_key(item: tuple[Path, int]) -> list[str]:
    """Sorts like ``Path`` does, without the parts list that comparing Paths caches on each of a million objects."""
    return str(item[0]).split(os.sep)


def check_no_duplicates(path: Path, what: str, *sorted_lists: list[tuple[Path, int]]) -> None:
    """Each image once (in train and val together): neighbours in path order, then the two lines that name it."""
    previous = None
    for image, _ in merge(*sorted_lists, key=path_key):
        if str(image) == previous:
            lines = [line for line, other, _, _ in checked_rows(path, what) if str(other) == previous][:2]
            raise UserError(f"{what}: {path}, lines {lines[0]} and {lines[-1]}: the same image twice ({image})")
        previous = str(image)


def checked_rows(path: Path, what: str) -> Iterator[Row]:
    """Each row's line, image file (checked to exist), label and split, with empty and unknown values refused."""
    labels: dict[str, str] = {}  # one string object per class name, shared by its rows
    has_split = None
    for line, record in records(path, what):
        where = f"{what}: {path}, line {line}"
        if has_split is None:
            has_split = "split" in record
        elif ("split" in record) != has_split:
            raise UserError(f"{where}: 'split' is on some rows only (give every row one, or none)")
        text, label = field(record, "path", where), field(record, "label", where)
        split = field(record, "split", where) if has_split else None
        if split is not None and split not in SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        image = Path(path.parent, text)  # an absolute path stays as it is
        check_file(image, where)
        yield line, image, labels.setdefault(label, label), split


def field(record: dict, key: str, where: str) -> str:
    """A row's value for ``key``, stripped; empty or not text is an error."""
    value = record.get(key)
    if key == "label" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # JSONL labels may be class numbers
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: {key} is not text ({json.dumps(value)[:40]})")
    if not (value or "").strip():
        raise UserError(f"{where}: empty {key}")
    return value.strip()


def check_file(image: Path, where: str) -> None:
    """One stat: the listed image exists and is a file."""
    try:
        mode = os.stat(image).st_mode
    except FileNotFoundError:
        raise UserError(f"{where}: {image}: no such file") from None
    except OSError as e:
        raise UserError(f"{where}: {image}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{where}: {image}: not a file")


def records(path: Path, what: str, columns: tuple[str, ...] = COLUMNS, aliases: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row as a dict) from a CSV or JSONL index with the ``columns`` (other names for them: ``aliases``);
    a file that cannot be read or decoded is one error."""
    name, line, aliases = f"{what}: {path}", 0, aliases or {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv_records(f, name, columns, aliases) if path.suffix.lower() == ".csv" else jsonl_records(f, name, columns, aliases)
            for line, record in rows:
                yield line, record
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied") from None
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text" + (f" (a byte that does not decode, after line {line})" if line else "")) from None
    except OSError as e:
        raise UserError(f"{name}: cannot read ({e.strerror or e})") from None


def csv_records(f: TextIO, name: str, columns: tuple[str, ...], aliases: dict[str, str]) -> Iterator[tuple[int, dict]]:
    """Rows of a CSV with a header row naming at least the ``columns``."""
    reader = csv.DictReader(f)
    expected = f"{','.join(columns)}[,split]"
    try:
        given = [column.strip() for column in reader.fieldnames or []]
        if not given:
            raise UserError(f"{name}: empty; expected a header row with the columns {expected}")
        header = [aliases.get(column, column) for column in given]
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{name}, line 1: no {missing[0]!r} column in the header row ({','.join(given)}); expected {expected}")
        reader.fieldnames = header
        for row in reader:
            if None in row:
                raise UserError(f"{name}, line {reader.line_num}: more fields than the header row's {len(header)}")
            yield reader.line_num, row
    except csv.Error as e:
        raise UserError(f"{name}, line {reader.reader.line_num}: not valid CSV ({e})") from None


def jsonl_records(f: TextIO, name: str, columns: tuple[str, ...], aliases: dict[str, str]) -> Iterator[tuple[int, dict]]:
    """One JSON object per line with the ``columns`` as keys; blank lines are skipped."""
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}, line {line}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{name}, line {line}: expected a JSON object with the keys {', '.join(columns)}")
        record = {aliases.get(k, k): v for k, v in record.items()}
        missing = [c for c in columns if c not in record]
        if missing:
            raise UserError(f"{name}, line {line}: no {missing[0]!r} key")
        yield line, record
