"""An exponential moving average of the weights (``--ema DECAY``): the loop validates, keeps and exports the average.

After each optimizer step every floating-point tensor of the model's state moves toward its average,
``average += (1 - d) * (weight - average)``, with ``d = min(DECAY, (1 + n) / (10 + n))`` after ``n`` updates, so the
first steps' random heads do not linger in it. Small data and small batches make SGD's last iterate noisy; its
average over the last ~1 / (1 - DECAY) steps is a better model for free (Polyak & Juditsky 1992; the practice of
modern detector recipes). The average is part of the checkpoint, so a resumed run averages as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The running average of ``model``'s floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key].detach().to(average.dtype), 1 - d)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the average inside the block (to validate and keep it), its own weights again after."""
        state = model.state_dict()
        own = {k: state[k].detach().clone() for k in self.average}
        with torch.no_grad():
            for key, average in self.average.items():
                state[key].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, weight in own.items():
                    state[key].copy_(weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the average and the number of updates."""
        return {**self.average, "_updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.average) - set(tensors)
        if missing:
            raise KeyError(f"the checkpoint has no average of {sorted(missing)[0]}")
        for key, average in self.average.items():
            average.copy_(tensors[key])
        self.updates = int(tensors["_updates"])
