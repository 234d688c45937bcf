"""Reading one member of a plain ``.tar`` shard by its virtual path ``SHARD.tar/MEMBER`` (see ``shards.py``)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

SHARD_SUFFIX = ".tar"


def shard_of(path: str | Path) -> tuple[str, str] | None:
    """(shard file, member name) when ``path`` is a virtual path into a shard, else None."""
    text = str(path)
    start = 0
    while (i := text.find(SHARD_SUFFIX + "/", start)) >= 0:
        shard = text[: i + len(SHARD_SUFFIX)]
        if os.path.isfile(shard):
            return shard, text[i + len(SHARD_SUFFIX) + 1 :]
        start = i + 1
    return None


def open_image(path: str | Path):
    """What ``PIL.Image.open`` should read: the file itself, or a shard member's bytes."""
    found = shard_of(path)
    if found is None:
        return path
    shard, name = found
    offset, size = member_place(shard, name)
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise EOFError(f"the shard ends {size - len(data)} bytes into this member")
    return io.BytesIO(data)


def file_stat(path: str | Path) -> os.stat_result:
    """``os.stat`` of a file, or of the shard that holds a member (its name is in the path that is hashed)."""
    found = shard_of(path)
    return os.stat(found[0] if found else path)


class MemberTable:
    """One shard's members as sorted fixed-width names and their (offset, size): numpy arrays, so a million members
    cost tens of MB and DataLoader workers share the parent's pages (no reference counts to copy them)."""

    def __init__(self, members: list[tuple[str, int, int]]):
        members = sorted({name: (name, offset, size) for name, offset, size in members}.values())  # a name twice: the last
        self.names = np.array([name.encode() for name, _, _ in members], dtype=bytes)
        self.places = np.array([(offset, size) for _, offset, size in members], dtype=np.int64).reshape(-1, 2)

    def place(self, name: str) -> tuple[int, int] | None:
        key = name.encode()
        i = int(np.searchsorted(self.names, key))
        if i < len(self.names) and self.names[i] == key:
            return int(self.places[i, 0]), int(self.places[i, 1])
        return None


_TABLES: dict[tuple[str, int, int], MemberTable] = {}  # (shard, size, mtime in ns): a changed shard is read again


def remember(shard: str | Path, members: list[tuple[str, int, int]]) -> None:
    """Keep the (name, offset, size) of a shard's members that were just listed, so no process lists them again."""
    st = os.stat(shard)
    _TABLES[(str(shard), st.st_size, st.st_mtime_ns)] = MemberTable(members)


def member_place(shard: str, name: str) -> tuple[int, int]:
    """(offset, size) of a member; a shard this process has not listed is listed once."""
    place = _table(shard).place(name)
    if place is None:
        raise FileNotFoundError(f"{shard}/{name}")
    return place


def member_paths(shard: str | Path) -> list[Path]:
    """The virtual path of every file in a shard, sorted (for predict, which needs no labels)."""
    return [Path(f"{shard}/{name.decode()}") for name in _table(str(shard)).names]


def _table(shard: str) -> MemberTable:
    st = os.stat(shard)
    key = (shard, st.st_size, st.st_mtime_ns)
    if key not in _TABLES:
        with tarfile.open(shard, "r:") as tar:
            remember(shard, [(str(PurePosixPath(m.name)), m.offset_data, m.size) for m in tar if m.isfile()])
    return _TABLES[key]
