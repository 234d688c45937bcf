"""Classification input from WebDataset-style ``.tar`` shards, read by random access.

A sample is the members that share a key (the member name up to the first dot of its base name): an image
(``.jpg``, ``.png``, ...) and its label, a ``.cls`` member (a class name, or a class number) or else the first
folder of the member's name (``tar cf train.tar -C photos/train .`` of class folders works as it is).
``--data`` names one shard, a brace pattern (``train-{000000..000099}.tar``) or a glob (``train-*.tar``).

One pass over each shard's headers lists its samples; each image is then the virtual path ``SHARD.tar/MEMBER``,
which ``tar_members.open_image`` reads with one seek. So a set is never unpacked, and the caches, the decoded-image store,
torchrun's per-process share of each epoch and every message work as they do for files. Plain tar only: a
compressed shard cannot be read at an offset.
"""

from __future__ import annotations

import glob
import os
import tarfile
from pathlib import Path, PurePosixPath

from braceexpand import braceexpand

from ..errors import UserError
from .images import IMAGE_EXTENSIONS
from .index import IndexRows, is_index, read_index, to_class_indices
from .tar_members import SHARD_SUFFIX, MemberTable, remember, save_listing, saved_listing


def is_shards(data: str | Path | None) -> bool:
    """A ``.tar`` path, brace pattern or glob (a folder so named is still a folder)."""
    return data is not None and str(data).lower().endswith(SHARD_SUFFIX) and not Path(data).is_dir()


def is_listing(data: str | Path | None) -> bool:
    """Input that lists its images, with labels and maybe a split: a CSV/JSONL index or shards."""
    return data is not None and (is_index(data) or is_shards(data))


def read_listing(data: str | Path, what: str = "--data") -> IndexRows:
    """The rows of an index, or of shards (which have no split column: ``val`` is None)."""
    return read_shards(data, what) if is_shards(data) else read_index(data, what)


def shard_files(spec: str | Path, what: str) -> list[Path]:
    """The shard files ``spec`` names, in the order given (a glob's matches sorted); each must exist."""
    names: list[str] = []
    for pattern in braceexpand(str(spec)):
        names += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not names:
        raise UserError(f"{what}: {spec}: no shard file matches")
    for name in names:
        if not os.path.isfile(name):
            raise UserError(f"{what}: {name}: no such shard file")
    return [Path(name) for name in names]


def read_shards(spec: str | Path, what: str = "--data") -> IndexRows:
    """The training shards: classes are their sorted labels (numerically, when every label is a number)."""
    rows = [row for shard in shard_files(spec, what) for row in shard_samples(shard, what)]
    if not rows:
        raise UserError(f"{what}: {spec}: no images in the shards (expected members such as KEY.jpg with KEY.cls)")
    labels = {label for _, label in rows}
    classes = sorted(labels, key=int) if all(label.isdigit() for label in labels) else sorted(labels)
    if len(classes) < 2:
        raise UserError(f"{what}: {spec}: only one class ({classes[0]}); a classifier needs at least two")
    to_class_indices(rows, classes)
    return IndexRows(rows, None, classes)


def read_val_shards(spec: str | Path, classes: list[str], what: str = "--val-data") -> list[tuple[Path, int]]:
    """Validation shards: every label must be one of the training ``classes``."""
    rows = [row for shard in shard_files(spec, what) for row in shard_samples(shard, what)]
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise UserError(f"{what}: {spec}: label {unknown[0]!r} is not a class of --data ({', '.join(classes)})")
    if not rows:
        raise UserError(f"{what}: {spec}: no images in the shards")
    to_class_indices(rows, classes)
    return rows


def shard_samples(shard: Path, what: str) -> list[tuple[Path, str]]:
    """(virtual image path, label) for each sample of one shard: WebDataset samples when it has ``.cls`` members,
    else every image file, labelled by its first folder (a class-folder tree, as ``scan_folder`` reads one).
    The listing is saved (``tar_members.save_listing``), so a later run over the same shard does not read it again."""
    saved = saved_listing(shard)
    if saved is None:
        files, labels = _list_members(shard, what)
        table = MemberTable.of(files)
        if labels:  # WebDataset: KEY.jpg (the image) beside KEY.cls; KEY.seg.png and the like are other fields
            images = {_key(name): name for name, _, _ in files if name.rpartition("/")[2].count(".") == 1}
            rows = [(name, labels.get(key, "")) for key, name in images.items()]
        else:
            rows = [(name, name.split("/")[0] if "/" in name else "") for name, _, _ in files]
        for name, label in rows:
            if not label:
                raise UserError(f"{what}: {shard}: {name} has no label (a {_key(name)}.cls member, or a class folder in its name)")
        save_listing(shard, table, rows)
    else:
        table, rows = saved
    remember(shard, table)
    return [(Path(f"{shard}/{name}"), label) for name, label in rows]


def _list_members(shard: Path, what: str) -> tuple[list[tuple[str, int, int]], dict[str, str]]:
    """One pass over a shard's headers: its image members (name, offset, size) and its ``.cls`` labels by key."""
    files, labels = [], {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                name = str(PurePosixPath(member.name))  # as the virtual Path will spell it
                if not member.isfile() or name.rpartition("/")[2].startswith("."):
                    continue
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((name, member.offset_data, member.size))
                elif name.endswith(".cls"):
                    labels[_key(name)] = tar.extractfile(member).read(256).decode("utf-8", "replace").strip()
    except tarfile.ReadError as e:
        raise UserError(f"{what}: {shard}: not a plain tar file ({e}); shards are read at offsets, so not compressed") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{what}: {shard}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return files, labels


def _key(name: str) -> str:
    """A WebDataset sample key: the member name up to the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.partition('.')[0]}" if folder else base.partition(".")[0]
