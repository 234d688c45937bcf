"""The one training loop, for every task, top to bottom:

settings -> the task's data and model -> run directory -> resume, or the task's prologue -> epochs (train,
validate, keep the best model, checkpoint) -> the task's final files.

A task (tasks/classify.py, tasks/detect.py) says what is particular to it through the hooks of ``Task``; the
loop owns resume, checkpoints, Ctrl-C, torchrun, progress, the log and the best model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import to_yaml
from ..errors import UserError
from ..faults import fault_point
from ..runs import append_jsonl, check_out_dir, open_run_dir, resume_config, write_jsonl
from . import distributed
from .ema import WeightAverage
from .heap import keep_freed_memory, release_free_memory
from .resume import RunState, StepCheckpoints, restore, save_last, stop_on_interrupt
from .runtime import Diverged, seed_everything, select_device, tensorboard_writer, use_bf16

# record(epoch, fields, score, model_metrics, line): log one epoch; keep the model when ``score`` is the best so far
Record = Callable[[int, dict, float, dict, str], None]


class Task(Protocol):
    """What the loop asks of a task. ``cfg`` is its settings dataclass; ``model`` and ``meta`` exist after ``setup``."""

    command: str  # the CLI's task word, for the resume hint: "classify", "detect"
    clip_grad: float  # clip the gradient norm to this (0: off)
    cfg: Any
    model: torch.nn.Module
    meta: Any  # the model file's metadata (meta.py), without metrics

    def resolve(self, cfg) -> Any: ...  # every unset setting filled in (recipes, the advisor)
    def setup(self, device: torch.device, bf16: bool, progress: bool) -> None: ...  # data, model, meta; no files
    def train_bf16(self, bf16: bool) -> bool: ...  # training steps under bf16 autocast? (``bf16``: what --precision chose)
    def optimizer(self, start_epoch: int) -> tuple[torch.optim.Optimizer, Any, int]: ...  # + per-step scheduler from
    # the first step of ``start_epoch`` (after the prologue's epochs), steps per epoch
    def data_check(self) -> dict: ...  # what a checkpoint's data must match to be resumed
    def prologue(self, record: Record) -> int: ...  # work before the loop (a head on cached features); epochs it did
    def epoch_loader(self, epoch: int) -> torch.utils.data.DataLoader: ...
    def before_epoch(self, epoch: int) -> None: ...  # e.g. what is frozen in this epoch
    def forward(self, model, batch, device) -> tuple[torch.Tensor, int, dict]: ...  # loss, images, sums for summarize
    def summarize(self, totals: dict, seconds: float) -> dict: ...  # an epoch's training statistics
    def validate(self, epoch: int, stats: dict, record: Record) -> None: ...  # calls record once
    def finish(self, out: Path, state: RunState) -> dict: ...  # metrics.json and the pictures; returns the metrics


def fit(task: Task, resume: bool = False, given: dict | None = None) -> dict:
    """Train as ``task.cfg`` says and write the run directory; returns metrics.json's content.

    ``resume``: continue the run in ``cfg.out`` from its last checkpoint, with its own settings; ``given`` are the
    settings the user gave (runs.resume_config checks them against the run's)."""
    out, device, bf16, progress, tb = start(task, resume, given)
    cfg = task.cfg
    train_bf16 = distributed.broadcast_object(task.train_bf16(bf16) if distributed.is_main() else None)  # rank 0 measures
    state = RunState()
    record = epoch_recorder(task, out, state, tb, progress)
    last = out / "last.safetensors"
    from_checkpoint = resume and last.is_file()  # else (killed before its first checkpoint) the run starts over
    if resume and not from_checkpoint and progress:
        print(f"{out} has no checkpoint yet: starting the run over", flush=True)
    first_epoch = 0 if from_checkpoint else task.prologue(record)
    optimizer, scheduler, steps_per_epoch = task.optimizer(first_epoch)
    data_check = {**task.data_check(), "steps_per_epoch": steps_per_epoch}

    average = WeightAverage(task.model, cfg.ema) if getattr(cfg, "ema", 0) else None  # detection's --ema

    def save(epoch: int, step: int = 0, totals: dict | None = None) -> None:
        save_last(last, task.model, optimizer, scheduler, state, data_check, epoch, step, totals, average)

    first_step, totals = 0, None
    if from_checkpoint:
        first_epoch, first_step, totals = restore(last, task.model, optimizer, scheduler, state, data_check, cfg.data, average)
        if progress:
            print(f"resuming {out} at epoch {first_epoch + 1}/{cfg.epochs}, step {first_step}/{steps_per_epoch}", flush=True)
    elif first_epoch:
        save(first_epoch)
    if resume and distributed.is_main():
        write_jsonl(out / "log.jsonl", state.history)  # drops lines logged after the checkpoint (all, without one)

    with stop_on_interrupt() as stop:
        resume_command = f"visiontune {task.command} train --resume {out}"
        duties = StepCheckpoints(stop, save, cfg.checkpoint_every, steps_per_epoch, last, resume_command, distributed.any_process)
        epoch = first_epoch - 1
        while (epoch := epoch + 1) < cfg.epochs:  # --time-budget may lower cfg.epochs after each epoch
            if out_of_patience(cfg.patience, cfg.monitor, state, epoch, progress):
                break
            task.before_epoch(epoch)
            loader = task.epoch_loader(epoch)
            if first_step:  # mid-epoch: skip the batches done; the RNG state is the checkpoint's
                loader = ckpt.resume_loader(loader, first_step)
            else:
                torch.manual_seed(cfg.seed * 100_003 + epoch)  # random draws (dropout, sampling): a function of (seed, epoch)
            stats = train_one_epoch(
                task,
                distributed.for_training(task.model, device),
                loader,
                optimizer,
                scheduler,
                device,
                epoch,
                progress,
                start_step=first_step,
                totals=totals,
                bf16=train_bf16,
                after_step=partial(after_step, duties, average, task.model, epoch),
            )
            first_step, totals = 0, None
            release_free_memory()  # the epoch's freed activations, before validation allocates its own
            stats = {
                **distributed.reduce_stats(stats),
                "lr": optimizer.param_groups[-1]["lr"],
                "precision": "bf16" if train_bf16 else "fp32",
            }
            with average.swapped_in(task.model) if average else nullcontext():  # validated and kept: the average
                task.validate(epoch, stats, record)
            if getattr(cfg, "time_budget", None):  # detection's --time-budget
                fit_epochs_to_budget(cfg, state.history, out, progress)
            save(epoch + 1)
            duties.after_epoch(epoch + 1)

    fault_point("finish")
    release_free_memory()
    metrics = task.finish(out, state) if distributed.is_main() else None
    return distributed.broadcast_object(metrics)


def after_step(duties: StepCheckpoints, average: WeightAverage | None, model, epoch: int, step: int, totals: dict) -> None:
    """Between steps: the weight average moves, then checkpoints and Ctrl-C (which save it)."""
    if average is not None:
        average.update(model)
    duties.after_step(epoch, step, totals)


def fit_epochs_to_budget(cfg, history: list[dict], out: Path, progress: bool) -> None:
    """After each epoch, lower ``cfg.epochs`` to what fits in ``cfg.time_budget`` minutes at the last epoch's pace (rank
    0's clock for every process) and save it in config.yaml, so the schedule ends in time and a resumed run keeps it.
    ``history``: the epochs' log entries so far. A later epoch costs the last one's training time and, with
    ``--val-every N``, 1/N of what the first epoch spent outside training (setting up, validating).

    Not after the first epoch unless two at most fit: a first epoch slowed by anything else running (75 s against
    54-60 s for the next ones) stopped a 30-minute Penn-Fudan run after 24. Again after every later one, since epochs
    grow slower as training goes on (60 s early, 75-88 s in the last third of another 30-minute run, which a plan made
    once after the second epoch let run 32 minutes); the schedule follows ``cfg.epochs`` as it is lowered."""
    decided = None
    if distributed.is_main():
        first, last = history[0], history[-1]
        outside = first["elapsed_seconds"] - first["train_seconds"]
        later = last["train_seconds"] + outside / getattr(cfg, "val_every", 1)
        fits = len(history) + int(max(0.0, cfg.time_budget * 60 - last["elapsed_seconds"]) // max(later, 1e-3))
        decided = None if len(history) == 1 and fits > 2 else max(1, min(cfg.epochs, fits))
    decided = distributed.broadcast_object(decided)
    if decided is None or decided == cfg.epochs:
        return
    cfg.epochs = decided
    if distributed.is_main():
        ckpt.atomic_write_text(out / "config.yaml", to_yaml(cfg))
        if progress:
            print(f"--time-budget {cfg.time_budget:g} min: {cfg.epochs} epoch(s) of {later:.0f}s", flush=True)


def out_of_patience(patience: int, monitor: str, state: RunState, epochs_done: int, progress: bool = False) -> bool:
    """``patience`` epochs done since the best value of ``monitor`` (checked before each epoch, so a resumed run stops
    where it would have); then ``state.stopped_epoch`` is set and a line printed. Rank 0 decides for every process."""
    if not patience:
        return False
    stop = distributed.broadcast_object(epochs_done - best_epoch(monitor, state) >= patience if distributed.is_main() else None)
    if stop:
        state.stopped_epoch = epochs_done
        if progress:
            print(f"stopping after epoch {epochs_done}: no better {monitor} for {patience} epoch(s) (--patience)", flush=True)
    return stop


def best_epoch(monitor: str, state: RunState) -> int:
    """The first epoch with the best ``monitor`` value in the log ("auto": the score that picks the kept model;
    lower is better for a name with "loss"); 0 before any epoch is logged."""
    if monitor == "auto" or not state.history:
        return max(0, state.best_epoch)
    values = [(e["epoch"], e[monitor]) for e in state.history if isinstance(e.get(monitor), (int, float))]
    if not values:
        numbers = sorted(k for k, v in state.history[-1].items() if isinstance(v, (int, float)) and k != "epoch")
        raise UserError(f"--monitor {monitor}: not in the log; choose auto or one of {', '.join(numbers)}")
    sign = -1 if "loss" in monitor else 1
    best, at = values[0][1] * sign, values[0][0]
    for epoch, value in values[1:]:
        if value * sign > best:
            best, at = value * sign, epoch
    return at


def start(task: Task, resume: bool, given: dict | None):
    """Settings, device and precision, the task's data and model; then, the inputs known good, the run directory.
    Returns (out, device, bf16, progress, TensorBoard writer or None)."""
    cfg = resume_config(task.cfg, given) if resume else task.cfg
    cfg.validate()
    out = check_out_dir(cfg.out, cfg.overwrite, resume)
    if cfg.tensorboard:
        tensorboard_writer(None)
    cfg = task.cfg = task.resolve(cfg)
    device = distributed.init(select_device(cfg.device))
    bf16 = use_bf16(cfg.precision, device)
    keep_freed_memory()
    distributed.per_process_batch(cfg.batch_size)
    progress = not cfg.quiet and distributed.is_main()
    seed_everything(cfg.seed)
    task.setup(device, bf16, progress)

    distributed.barrier()  # every process has checked --out before rank 0 changes it
    if distributed.is_main():  # only now, with the inputs known good
        open_run_dir(out, to_yaml(cfg), cfg.overwrite, resume)
    tb = tensorboard_writer(out) if cfg.tensorboard and distributed.is_main() else None
    task.model.to(device).to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        task.model = distributed.sync_batchnorm(task.model, device)
    return out, device, bf16, progress, tb


def epoch_recorder(task: Task, out: Path, state: RunState, tb, progress: bool) -> Record:
    """The ``record`` hook: one line of log.jsonl (and TensorBoard) per epoch, the best model kept, a line printed."""

    def record(epoch: int, fields: dict, score: float, model_metrics: dict, line: str) -> None:
        entry = {"epoch": epoch + 1, **fields, "elapsed_seconds": state.elapsed()}
        state.history.append(entry)
        if not distributed.is_main():  # rank 0 alone logs and saves
            return
        append_jsonl(out / "log.jsonl", entry)
        if tb is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tb.add_scalar(key, value, epoch + 1)
            tb.flush()
        if score > state.best:
            state.best, state.best_epoch = score, epoch + 1
            meta = dataclasses.replace(task.meta, metrics=model_metrics, epoch=epoch + 1)
            ckpt.save_model(out / "model.safetensors", task.model, meta.to_dict())
        if progress:
            print(f"epoch {epoch + 1:>3}/{task.cfg.epochs} {line}  ({entry['elapsed_seconds']:.0f}s)", flush=True)

    return record


def train_one_epoch(
    task: Task,
    model,
    loader,
    optimizer,
    scheduler,
    device: torch.device,
    epoch: int,
    progress: bool,
    start_step: int = 0,
    totals: dict | None = None,
    after_step=None,
    bf16: bool = False,
) -> dict:
    """One pass over ``loader``: forward (the task's), stop on a non-finite loss, backward, clip, step, per-step schedule.

    Resuming mid-epoch: ``loader`` lacks the first ``start_step`` batches and ``totals`` holds their running sums
    (flat numbers: JSON in the checkpoint). ``after_step(step, totals)`` runs after each step (checkpoints, Ctrl-C).
    """
    model.train()
    clip = task.clip_grad
    params = [p for p in model.parameters() if p.requires_grad] if clip > 0 else []
    t = dict(totals or {"steps": 0, "seen": 0, "loss_sum": 0.0, "seconds": 0.0, "first_step_loss": None, "last_step_loss": None})
    start = time.perf_counter() - t["seconds"]
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}",
        unit="batch",
        leave=False,
        disable=not progress,
        initial=start_step,
        total=start_step + len(loader),
    )
    for step, batch in enumerate(bar, start=start_step):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, images, sums = task.forward(model, batch, device)
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k} {v:.3g}" for k, v in sums.items() if k.startswith("loss_"))
            raise Diverged(
                f"training diverged: non-finite loss at epoch {epoch + 1}, step {step + 1}{f' ({parts})' if parts else ''}; "
                f"the last good checkpoint is kept (try a lower --lr{' or --clip-grad' if clip > 0 else ''})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        t["steps"] += 1
        t["seen"] += images
        t["loss_sum"] += value
        for k, v in sums.items():
            t[k] = t.get(k, 0.0) + v
        if t["first_step_loss"] is None:
            t["first_step_loss"] = value
        t["last_step_loss"] = value
        bar.set_postfix(loss=f"{t['loss_sum'] / t['steps']:.3f}")
        if after_step is not None:
            after_step(step + 1, dict(t, seconds=time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return {**task.summarize(t, seconds), "train_seconds": seconds, "train_images_per_second": t["seen"] / seconds if seconds > 0 else 0.0}
