"""The feature cache's file: a safetensors file (``features`` and ``labels``, the key and a SHA-256 in its metadata)
written and read through memory maps, so neither extraction nor training holds the features in anonymous memory:
a million images x 2 views x 1280 floats is 10 GB of file pages the kernel can drop and reread.

The layout is known once the first batch gives the feature width, so the whole file is laid out then, filled row by
row, and its checksum written into the header last (same length as the placeholder). It is built under a temporary
name with this process's id and renamed into place once synced: a killed build leaves a file that the next build of
the folder removes, never one a reader opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import publish

DTYPES = {  # torch dtype -> (safetensors code, numpy dtype)
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.int64: ("I64", np.int64),
    torch.int32: ("I32", np.int32),
    torch.uint8: ("U8", np.uint8),
    torch.bool: ("BOOL", np.bool_),
}
CODES = {code: (dtype, np_dtype) for dtype, (code, np_dtype) in DTYPES.items()}
PLACEHOLDER = "0" * 64
CHUNK = 64 << 20


class FeatureWriter:
    """A feature file being filled: ``features`` (rows, dim) and ``labels`` (rows, ...) are views of its pages."""

    def __init__(self, path: Path, key: dict, rows: int, dim: int, label_shape: tuple, label_dtype: torch.dtype):
        self.final, self.tmp = path, path.with_name(f".tmp-{path.name}-{os.getpid()}")
        specs = {"features": ((rows, dim), torch.float32), "labels": ((rows, *label_shape), label_dtype)}
        header, offset = {}, 0
        for name, (shape, dtype) in specs.items():
            size = int(np.prod(shape)) * np.dtype(DTYPES[dtype][1]).itemsize
            header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"key": json.dumps(key, sort_keys=True), "sha256": PLACEHOLDER}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        self.sha_at = 8 + text.rindex(f'"sha256": "{PLACEHOLDER}"'.encode()) + len('"sha256": "')
        self.data_start = 8 + len(text)
        with open(self.tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(self.data_start + offset)
        self.header = header
        self.arrays = map_arrays(self.tmp, header, self.data_start, "r+")
        self.features, self.labels = map(torch.from_numpy, self.arrays)

    def commit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Checksum, sync, and rename into place; returns the features and labels mapped copy-on-write from there."""
        digest = tensors_digest({"features": self.features, "labels": self.labels})
        for a in self.arrays:
            if isinstance(a, np.memmap):
                a.flush()
        with open(self.tmp, "r+b") as f:
            f.seek(self.sha_at)
            f.write(digest.encode())
        publish(self.tmp, self.final)
        self.arrays = self.features = self.labels = None  # unmapped: the file's pages are counted once, by the readers' map
        features, labels = map(torch.from_numpy, map_arrays(self.final, self.header, self.data_start, "c"))
        return features, labels

    def abandon(self) -> None:
        self.tmp.unlink(missing_ok=True)


def map_arrays(path: Path, header: dict, data_start: int, mode: str) -> list[np.ndarray]:
    """``features`` and ``labels`` of the file as arrays over its pages (mode "c": copy-on-write, the file untouched)."""
    out = []
    for name in ("features", "labels"):
        spec = header[name]
        _, np_dtype = CODES[spec["dtype"]]
        shape, (start, end) = tuple(spec["shape"]), spec["data_offsets"]
        if end == start:
            out.append(np.zeros(shape, np_dtype))
            continue
        out.append(np.memmap(path, np_dtype, mode, data_start + start, shape))
    return out


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and where the data starts; ValueError when it is not one."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a header")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20 or size > os.path.getsize(path):
            raise ValueError("header length out of range")
        header = json.loads(f.read(size))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + size + end > os.path.getsize(path):
        raise ValueError("truncated")
    return header, 8 + size


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """checkpoint.weights_digest's SHA-256, read in chunks (the features are never copied whole)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.numpy().reshape(-1).view(np.uint8) if t.numel() else np.zeros(0, np.uint8)
        for i in range(0, len(flat), CHUNK):
            h.update(flat[i : i + CHUNK])
    return h.hexdigest()
