"""The run directory: refuse to clobber an earlier run, check it is writable before any training."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint import atomic_write_text
from .errors import UserError

MARKER = "config.yaml"


def check_out_dir(out: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Validate ``--out`` without touching it (nothing is written until the inputs are known good)."""
    if not out:
        raise UserError("--out: a run directory is required")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    if resume:
        if not (out / "last.safetensors").is_file():
            raise UserError(f"--resume: {out} has no last.safetensors to resume from")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {out} already exists; pass --overwrite to replace it, or --resume to continue it")
    parent = out if out.exists() else _existing_parent(out)
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out: {parent} is not writable")
    return out


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def create_out_dir(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """Make (or, with --overwrite, empty) the run directory, once the inputs are validated."""
    if out.exists() and overwrite and not resume:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"\0" * 1024 * 1024)  # a full disk shows up here, not after an hour of training
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to {out} ({e.strerror})") from None
    return out


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
