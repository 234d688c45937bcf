"""The run directory: refuse to clobber an earlier run, check it is writable before any training; the settings a
resumed run keeps. Task-independent: every task's runs share these helpers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import atomic_write_text
from .config import from_dict
from .errors import UserError

MARKER = "config.yaml"
# Settings a resumed run may change: they do not change what is computed (workers: augmentation is seeded per image).
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "out",
        "quiet",
        "overwrite",
        "device",
        "workers",
        "checkpoint_every",
        "tensorboard",
        "cache_dir",
        "cache_images",
        "engine",
        "patience",
        "monitor",
    }
)


def check_out_dir(out: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Validate ``--out`` before any work; nothing in it changes until the inputs are known good (``create_out_dir``)."""
    if not out:
        raise UserError("--out: a run directory is required")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    if resume:
        if not (out / MARKER).is_file():
            raise UserError(f"--resume: {out} is not a visiontune run (no {MARKER}); nothing to resume")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {out} already exists; pass --overwrite to replace it, or --resume to continue it")
    parent = out if out.exists() else _existing_parent(out)
    try:  # os.access says yes to root on a read-only disk: try a real file, removed at once
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".visiontune-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out: cannot write in {parent} ({e.strerror})") from None
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
        for stale in out.glob(".*.tmp"):  # left by a process killed while writing (see checkpoint.atomic_write)
            stale.unlink()
        probe = out / ".write-test"
        probe.write_bytes(b"\0" * 1024 * 1024)  # a full disk shows up here, not after an hour of training
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to {out} ({e.strerror})") from None
    return out


def open_run_dir(out: Path, settings_yaml: str, overwrite: bool, resume: bool) -> None:
    """Create (or, with --overwrite, empty) the run directory; a new run writes config.yaml and starts a new log."""
    create_out_dir(out, overwrite, resume)
    if not resume:
        atomic_write_text(out / MARKER, settings_yaml)
        (out / "log.jsonl").unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, rows: list) -> None:
    """Replace ``path`` with one JSON line per row, atomically (a resumed run rewrites its log this way)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------- resume settings


def saved_settings(out: str | Path) -> dict:
    """The settings a run was started with (RUN/config.yaml)."""
    import yaml

    p = Path(out) / MARKER
    if not p.is_file():
        raise UserError(f"--resume: {out} is not a visiontune run (no {MARKER}); nothing to resume")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"--resume: {p} is damaged; cannot resume this run")
    return data


def check_same_settings(saved: dict, now: dict, out: str | Path) -> None:
    """Refuse to resume with settings that change what is computed (anything not in MAY_CHANGE_ON_RESUME)."""

    def same(a, b):
        return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))

    differ = [k for k in now if k not in MAY_CHANGE_ON_RESUME and k in saved and not same(now[k], saved[k])]
    if differ:
        k = differ[0]
        raise UserError(
            f"--resume: --{k.replace('_', '-')} {now[k]} differs from the run's {saved[k]} ({Path(out) / MARKER}); "
            f"a resumed run keeps its settings: leave the flag out, or start a new run"
        )


def resume_config(cfg, given: dict | None = None):
    """The settings of the run in ``cfg.out``, as saved when it started, checked against the ones given now.

    ``given``: the settings the user gave (the CLI knows them, even one equal to its default); by default, the
    fields of ``cfg`` that differ from their defaults. A value "auto" given (a choice left to the run) matches any.
    """
    cls = type(cfg)
    if given is None:
        given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if getattr(cfg, f.name) != f.default}
    given = {k: v for k, v in given.items() if v != "auto"}
    saved = saved_settings(cfg.out)
    check_same_settings(saved, given, cfg.out)
    return from_dict(cls, {**saved, **given})
