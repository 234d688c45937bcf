"""The loop's checkpoints: ``last.safetensors`` after each epoch (and every N steps), resume from it, Ctrl-C.

Task-independent: the loop (loop.py) calls these for every task.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from ..errors import UserError
from ..faults import fault_point
from . import distributed
from .ema import WeightAverage


@dataclass
class RunState:
    """The run's bookkeeping, saved in every checkpoint: the best epoch so far, the log, the time spent."""

    best: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0  # seconds spent before this process (a resumed run)
    start: float = field(default_factory=time.perf_counter)
    stopped_epoch: int | None = None  # epochs done when --patience stopped the run (not saved: it follows from the rest)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start


def save_last(
    path: Path,
    model,
    optimizer,
    scheduler,
    state: RunState,
    data_check: dict,
    epoch: int,
    step: int = 0,
    totals: dict | None = None,
    average: WeightAverage | None = None,
) -> None:
    """The ``last`` checkpoint: ``epoch`` epochs done and ``step`` batches of the next (with their running ``totals``),
    and the weight average (``--ema``). ``data_check`` is what a resumed run's data must match. Under torchrun every
    process calls this; rank 0 writes.
    """
    totals = distributed.reduce_stats(totals) if totals else totals  # averaged: each process resumes from the mean
    if distributed.is_main():
        ckpt.save_training_state(
            path,
            model,
            optimizer,
            scheduler,
            {
                "epoch": epoch,
                "step": step,
                "epoch_totals": totals,
                "best": state.best,
                "best_epoch": state.best_epoch,
                "history": state.history,
                "elapsed_seconds": state.elapsed(),
                "world_size": distributed.world_size(),
                "data": data_check,
            },
            average.tensors() if average is not None else None,
        )


def restore(
    path: Path, model, optimizer, scheduler, state: RunState, data_check: dict, data: str, average: WeightAverage | None = None
) -> tuple[int, int, dict | None]:
    """Load ``last`` into the model, optimizer, scheduler, RNG, ``state`` and the weight average; returns (epoch,
    step, epoch totals)."""
    saved = ckpt.load_training_state(path, model, optimizer, scheduler)  # restores the RNG state too
    distributed.check_resume(saved, path)
    if average is not None:
        try:
            average.load(saved["extra"])
        except KeyError as e:
            raise UserError(f"{path}: {e.args[0]}; resume with the run's own settings (--ema)") from None
    if saved.get("data", data_check) != data_check:  # (checkpoints of earlier versions lack "data")
        raise UserError(
            f"--resume: the images in {data} changed since {path} was saved "
            f"(then {saved.get('data')}, now {data_check}); resume needs the same data"
        )
    state.best, state.best_epoch, state.history = saved["best"], saved["best_epoch"], saved["history"]
    state.elapsed_before = saved["elapsed_seconds"]
    return saved["epoch"], saved.get("step", 0), saved.get("epoch_totals")


class Interrupted(UserError):
    """Ctrl-C: the run saved a checkpoint and stopped; exit code 130 like any interrupted command."""

    exit_code = 130


class StepCheckpoints:
    """A training loop's duties between steps: ``last`` every ``every`` steps; on Ctrl-C, a checkpoint and a stop
    with the command that resumes. ``any_process`` makes every torchrun process stop after the same step."""

    def __init__(self, stop, save_last, every: int, steps_per_epoch: int, last: Path, resume_command: str, any_process=lambda flag: flag):
        self.stop, self.save_last, self.every, self.steps_per_epoch = stop, save_last, every, steps_per_epoch
        self.last, self.resume_command, self.any_process = last, resume_command, any_process

    def interrupted(self, epoch: int, step: int) -> Interrupted:
        return Interrupted(
            f"checkpoint saved at epoch {epoch + 1}, step {step}/{self.steps_per_epoch} in {self.last}; "
            f"continue with: {self.resume_command}"
        )

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
