"""An on-disk store of decoded, downsized images (``--cache-images disk``): epochs after the first, and later runs on the
same files, read raw pixels instead of decoding JPEGs.

One store per set of files and decode size, in ``<cache>/images/<digest>/``: ``pixels-NNN.bin`` shards (uint8 CHW
images back to back, at most ``SHARD_BYTES`` each), ``index.npy`` (per image: shard, offset, height, width) and
``meta.json`` (the key: decode size and each file's path, size, mtime and label, as the feature cache keys them; the
files that were bad). A store is built in a temporary folder and renamed into place once complete and synced, so a
run killed while building leaves nothing a later run would read. Images are read with ``pread``, not memory-mapped:
mapped pages count in the reading process's resident memory, and a million images would map 250 GB.

The folder is bounded: after a new store, the least recently used ones are deleted until all fit ``max_bytes``
(default 20 GiB, ``$VISIONTUNE_IMAGE_CACHE_GB``: about 75,000 photos at a 256-px short side); a set larger than that,
or than the free disk, is not stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .images import file_fingerprints

log = logging.getLogger("visiontune")
STORE_FORMAT = "visiontune-images/1"
SHARD_BYTES = 1 << 30


def max_bytes() -> int:
    value = os.environ.get("VISIONTUNE_IMAGE_CACHE_GB", "20")
    try:
        return int(float(value) * (1 << 30))
    except ValueError:
        raise UserError(f"VISIONTUNE_IMAGE_CACHE_GB: expected a number of GiB, got {value!r}") from None


def store_key(items: list[tuple[Path, int]], short_side: int) -> dict:
    return {"format": STORE_FORMAT, "short_side": short_side, "files": file_fingerprints(items)}


def store_dir(cache_dir: Path, key: dict) -> Path:
    return Path(cache_dir) / "images" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class ImageStore:
    """Read side: ``store[i]`` is image i (uint8, 3 x H x W). Opens its files lazily in each process (DataLoader workers)."""

    def __init__(self, folder: Path, index: np.ndarray, bad: list[list[str]]):
        self.folder, self.index, self.bad = folder, index, bad
        self._files: dict[int, int] = {}
        self._pid = None

    @classmethod
    def open(cls, folder: Path, key: dict, quiet: bool = False) -> ImageStore | None:
        """The store in ``folder`` if it is complete and for ``key``; None otherwise (then it is built again)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            index = np.load(folder / "index.npy")
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or index.shape != (meta.get("count"), 4):
            return None
        for shard, size in enumerate(meta["shards"]):
            path = folder / f"pixels-{shard:03d}.bin"
            if not path.is_file() or path.stat().st_size != size:
                if not quiet:
                    log.warning("image cache %s is damaged (%s); decoding the images again", folder, path.name)
                return None
        os.utime(folder / "meta.json")  # least recently used goes first when the cache folder is full
        return cls(folder, index, meta["bad"])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._pid != os.getpid():  # a forked worker: its own file descriptors
            self._files, self._pid = {}, os.getpid()
        shard, offset, h, w = (int(v) for v in self.index[i])
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / f"pixels-{shard:03d}.bin", os.O_RDONLY)
        raw = os.pread(self._files[shard], 3 * h * w, offset)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(3, h, w)


class StoreWriter:
    """Write side: ``add`` images in order, then ``commit`` renames the complete store into place."""

    def __init__(self, cache_dir: Path, key: dict):
        self.key, self.final = key, store_dir(cache_dir, key)
        remove_abandoned(self.final.parent)
        self.tmp = self.final.parent / f".tmp-{self.final.name}-{os.getpid()}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.rows, self.shards, self.file = [], [], None

    def add(self, image: torch.Tensor) -> None:
        data = image.contiguous().numpy().tobytes()
        if self.file is None or self.shards[-1] + len(data) > SHARD_BYTES:
            self._next_shard()
        self.rows.append((len(self.shards) - 1, self.shards[-1], image.shape[1], image.shape[2]))
        self.file.write(data)
        self.shards[-1] += len(data)

    def _next_shard(self) -> None:
        self._close()
        self.shards.append(0)
        self.file = open(self.tmp / f"pixels-{len(self.shards) - 1:03d}.bin", "wb")

    def _close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def commit(self, bad: list[list[str]]) -> ImageStore:
        self._close()
        index = np.array(self.rows, dtype=np.int64).reshape(-1, 4)
        np.save(self.tmp / "index.npy", index)
        meta = {"key": self.key, "count": len(index), "shards": self.shards, "bad": bad}
        (self.tmp / "meta.json").write_text(json.dumps(meta))
        if self.final.exists() and ImageStore.open(self.final, self.key, quiet=True) is None:
            shutil.rmtree(self.final, ignore_errors=True)  # the damaged store this one replaces
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # another run stored the same images meanwhile: theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)
        prune(self.final.parent, keep=self.final)
        return ImageStore(self.final, index, bad)

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def build_lock(cache_dir: Path, key: dict, quiet: bool = False):
    """Held while a process looks for a store and builds it: under torchrun (or two runs on one machine), one process
    decodes the images and the others wait, then read its store. An advisory ``flock`` on a file beside the store,
    released by the kernel if the holder dies; where locks are unsupported (some network disks), no lock."""
    path = store_dir(cache_dir, key).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError:  # a read-only cache: the build will say why it cannot write
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                log.info("image cache: another process is building %s; waiting for it", path.with_suffix(""))
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def remove_abandoned(folder: Path) -> None:
    """Temporary folders (or files: the feature cache's) ``.tmp-NAME-PID`` of builds whose process is gone."""
    for tmp in folder.glob(".tmp-*") if folder.is_dir() else []:
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def prune(folder: Path, keep: Path) -> None:
    """Delete the least recently used stores until the folder fits ``max_bytes()``; never ``keep``."""
    stores = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=_last_used)
    total = sum(folder_bytes(d) for d in stores)
    for d in stores:
        if total <= max_bytes():
            break
        if d != keep:
            total -= folder_bytes(d)
            shutil.rmtree(d, ignore_errors=True)
            d.with_suffix(".lock").unlink(missing_ok=True)
            log.info("image cache: removed %s (least recently used) to stay under %.0f GiB", d, max_bytes() / (1 << 30))


def _last_used(d: Path) -> float:
    try:
        return (d / "meta.json").stat().st_mtime
    except OSError:
        return 0.0


def room_for(cache_dir: Path, estimated: int) -> str | None:
    """Why a store of ``estimated`` bytes cannot be written, or None when it fits the bound and the free disk."""
    if estimated > max_bytes():
        return f"the decoded images (~{estimated / (1 << 30):.1f} GiB) exceed the image cache bound of {max_bytes() / (1 << 30):.0f} GiB"
    probe = Path(cache_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if estimated > free - (1 << 30):
        return f"the decoded images (~{estimated / (1 << 30):.1f} GiB) do not fit the {free / (1 << 30):.1f} GiB free in {cache_dir}"
    return None
