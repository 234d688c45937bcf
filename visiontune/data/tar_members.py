"""Reading one member of a plain ``.tar`` shard by its virtual path ``SHARD.tar/MEMBER`` (see ``shards.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path, PurePosixPath

import numpy as np

from ..caches import default_cache_dir

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

    def __init__(self, names: np.ndarray, places: np.ndarray):
        self.names, self.places = names, places

    @classmethod
    def of(cls, members: list[tuple[str, int, int]]) -> MemberTable:
        members = sorted({name: (name, offset, size) for name, offset, size in members}.values())  # a name twice: the last
        names = np.array([name.encode() for name, _, _ in members], dtype=bytes)
        return cls(names, np.array([(offset, size) for _, offset, size in members], dtype=np.int64).reshape(-1, 2))

    def place(self, name: str) -> tuple[int, int] | None:
        i = self.index(name)
        return None if i is None else (int(self.places[i, 0]), int(self.places[i, 1]))

    def index(self, name: str) -> int | None:
        key = name.encode()
        i = int(np.searchsorted(self.names, key))
        return i if i < len(self.names) and self.names[i] == key else None


_TABLES: dict[tuple[str, int, int], MemberTable] = {}  # (shard, size, mtime in ns): a changed shard is read again


def remember(shard: str | Path, table: MemberTable) -> None:
    """Keep a shard's member table, so no process lists it again."""
    _TABLES[_identity(shard)] = table


def member_place(shard: str, name: str) -> tuple[int, int]:
    """(offset, size) of a member; a shard this process has not listed is listed once."""
    place = _table(shard).place(name)
    if place is None:
        raise FileNotFoundError(f"{shard}/{name}")
    return place


def member_paths(shard: str | Path) -> list[Path]:
    """The virtual path of every file in a shard, sorted (for predict, which needs no labels)."""
    return [Path(f"{shard}/{name.decode()}") for name in _table(str(shard)).names]


def find_members(shards: list[Path], names: list[str]) -> list[Path | None]:
    """The virtual path of each member name in the first of ``shards`` that holds it, None where none does (one
    vectorized lookup per shard: a million names cost seconds, not a dict of a million paths)."""
    wanted = np.array([name.encode() for name in names], dtype=bytes)
    found: list[Path | None] = [None] * len(names)
    for shard in shards:
        table = _table(str(shard))
        if not len(table.names) or not len(wanted):
            continue
        i = np.searchsorted(table.names, wanted).clip(max=len(table.names) - 1)
        for k in np.flatnonzero(table.names[i] == wanted).tolist():
            found[k] = found[k] or Path(f"{shard}/{names[k]}")
    return found


def _identity(shard: str | Path) -> tuple[str, int, int]:
    st = os.stat(shard)
    return str(shard), st.st_size, st.st_mtime_ns


def _table(shard: str) -> MemberTable:
    key = _identity(shard)
    if key not in _TABLES:
        saved = saved_listing(shard)
        if saved is None:
            with tarfile.open(shard, "r:") as tar:
                remember(shard, MemberTable.of([(str(PurePosixPath(m.name)), m.offset_data, m.size) for m in tar if m.isfile()]))
        else:
            remember(shard, saved[0])
    return _TABLES[key]


# --------------------------------------------------------------------------------------------- saved listings

LISTING_FORMAT = 1
_LISTING_CACHE: ContextVar[Path | None] = ContextVar("listing_cache")  # unset: the default cache folder


@contextlib.contextmanager
def listings_in(cache: Path | None) -> Iterator[None]:
    """Within the block, shard listings are saved to and read from ``cache``/shards (a run's --cache-dir); None:
    neither (--cache-dir none)."""
    token = _LISTING_CACHE.set(cache)
    try:
        yield
    finally:
        _LISTING_CACHE.reset(token)


def listing_file(shard: str | Path) -> Path | None:
    """Where a shard's listing is saved: the cache folder's ``shards/``, named by the shard's absolute path; None
    when listings are not saved."""
    cache = _LISTING_CACHE.get(default_cache_dir())
    if cache is None:
        return None
    digest = hashlib.sha256(str(Path(shard).resolve()).encode()).hexdigest()[:24]
    return cache / "shards" / f"{digest}.npz"


def _listing_key(shard: str | Path) -> str:
    _, size, mtime_ns = _identity(shard)
    return json.dumps({"format": LISTING_FORMAT, "shard": str(Path(shard).resolve()), "size": size, "mtime_ns": mtime_ns})


def saved_listing(shard: str | Path) -> tuple[MemberTable, list[tuple[str, str]]] | None:
    """(member table, samples as (image member, label)) saved by an earlier listing of this very shard (same path,
    size and modification time), else None: a missing, stale or unreadable file is listed again."""
    path = listing_file(shard)
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != _listing_key(shard):
                return None
            table = MemberTable(f["names"], f["places"])
            rows = [(table.names[i].decode(), label.decode()) for i, label in zip(f["row_members"].tolist(), f["row_labels"])]
    except (OSError, EOFError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile):
        return None
    return table, rows


def save_listing(shard: str | Path, table: MemberTable, rows: list[tuple[str, str]]) -> None:
    """Save a shard's listing for later runs (atomically; a cache folder that cannot be written is skipped)."""
    path = listing_file(shard)
    if path is None:
        return
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                key=np.array(_listing_key(shard)),
                names=table.names,
                places=table.places,
                row_members=np.array([table.index(name) for name, _ in rows], dtype=np.int64),
                row_labels=np.array([label.encode() for _, label in rows], dtype=bytes),
            )
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
