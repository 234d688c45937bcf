"""The run directory: refuse to clobber an earlier run, check it is writable before any training; resume and Ctrl-C.

Task-independent: classification and detection runs share these helpers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import atomic_write_text, save_training_state
from .engine import distributed
from .errors import UserError
from .faults import fault_point

MARKER = "config.yaml"
# Settings a resumed run may change: they do not change what is computed (workers: augmentation is seeded per image).
MAY_CHANGE_ON_RESUME = frozenset({"out", "quiet", "overwrite", "device", "workers", "checkpoint_every", "tensorboard", "cache_dir"})


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


# ------------------------------------------------------------------------- resume

def save_last(path: Path, model, optimizer, scheduler, state: dict, data_check: dict, epoch: int, step: int = 0,
              totals: dict | None = None) -> None:
    """The ``last`` checkpoint: ``epoch`` epochs done and ``step`` batches of the next (with their running ``totals``).

    ``state`` is the run's bookkeeping (best, best_epoch, history, elapsed_before, start); ``data_check`` what a
    resumed run's data must match. Under torchrun every process calls this; rank 0 writes.
    """
    totals = distributed.reduce_stats(totals) if totals else totals  # averaged: each process resumes from the mean
    if distributed.is_main():
        save_training_state(path, model, optimizer, scheduler, {
            "epoch": epoch, "step": step, "epoch_totals": totals, "best": state["best"], "best_epoch": state["best_epoch"],
            "history": state["history"], "elapsed_seconds": state["elapsed_before"] + time.perf_counter() - state["start"],
            "world_size": distributed.world_size(), "data": data_check})


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
        raise UserError(f"--resume: --{k.replace('_', '-')} {now[k]} differs from the run's {saved[k]} ({Path(out) / MARKER}); "
                        f"a resumed run keeps its settings: leave the flag out, or start a new run")


class Interrupted(UserError):
    """Ctrl-C: the run saved a checkpoint and stopped; exit code 130 like any interrupted command."""

    exit_code = 130


class StepCheckpoints:
    """A training loop's duties between steps: ``last`` every ``every`` steps; on Ctrl-C, a checkpoint and a stop
    with the command that resumes. ``any_process`` makes every torchrun process stop after the same step."""

    def __init__(self, stop, save_last, every: int, steps_per_epoch: int, last: Path, resume_command: str,
                 any_process=lambda flag: flag):
        self.stop, self.save_last, self.every, self.steps_per_epoch = stop, save_last, every, steps_per_epoch
        self.last, self.resume_command, self.any_process = last, resume_command, any_process

    def interrupted(self, epoch: int, step: int) -> Interrupted:
        return Interrupted(f"checkpoint saved at epoch {epoch + 1}, step {step}/{self.steps_per_epoch} in {self.last}; "
                           f"continue with: {self.resume_command}")

    def after_step(self, epoch: int, step: int, totals: dict) -> None:
        stopping = self.any_process(self.stop.requested)
        if stopping or (self.every and (epoch * self.steps_per_epoch + step) % self.every == 0):
            self.save_last(epoch, step, totals)
        if stopping:
            raise self.interrupted(epoch, step)
        fault_point("step")

    def after_epoch(self, epochs_done: int) -> None:
        """Call once ``last`` holds the finished epoch."""
        if self.any_process(self.stop.requested):
            raise self.interrupted(epochs_done, 0)


@contextmanager
def stop_on_interrupt():
    """The first Ctrl-C asks the loop to stop at its next safe point (``flag.requested``); the loop saves and
    raises ``Interrupted``. A second Ctrl-C stops at once (the last checkpoint stays)."""

    class Flag:
        requested = False

    flag = Flag()

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("visiontune: stopping at the next safe point to save a checkpoint (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C is not ours to handle
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
