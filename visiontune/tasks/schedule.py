"""What each classification training step sees: the batches of an epoch (an order fixed by seed and epoch, so a
resumed or multi-process run sees the same) and the recipe's learning rate at that step."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from .. import strategies
from ..engine import distributed
from ..strategies import Recipe


def make_scheduler(optimizer, recipe: Recipe, phases, steps_per_epoch: int, epochs: int, start_step: int = 0):
    """Per-step LR factors: the recipe's schedule times each phase's backbone scale. Pure functions of the step,
    so a schedule that starts at ``start_step`` (after a prologue's epochs) is the same schedule moved on."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(recipe.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        if recipe.schedule == "step":
            return 0.1 ** ((step // steps_per_epoch) // recipe.step_epochs)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def backbone_factor(step: int) -> float:
        return schedule(step) * strategies.phase_at(phases, step // steps_per_epoch).backbone_lr_scale

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [backbone_factor, schedule], last_epoch=start_step - 1)


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, workers: int, balanced: bool = False) -> DataLoader:
    """Shuffled (or drawn class-``balanced``) in an order that depends only on (seed, epoch): resume sees the same batches.

    Under torchrun each process takes its share of that order and of the global ``batch_size``; each image's
    augmentation is seeded by (seed, epoch, index), so N processes see the batches of one (distributed.py).
    """
    sampler = distributed.epoch_sampler(dataset, seed * 100_003, epoch, dataset.labels if balanced else None)
    per_process = distributed.per_process_batch(batch_size)
    drop_last = sampler.num_samples % per_process == 1  # a batch of one breaks BatchNorm in train mode
    return DataLoader(
        distributed.SeededPerSample(dataset, seed, epoch),
        batch_size=per_process,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=False,
    )
