"""An exponential moving average of the weights (``--ema DECAY``): the loop validates, keeps and exports the average.

After each optimizer step every floating-point tensor of the model's state moves toward its average,
``average += (1 - d) * (weight - average)``, with ``d = min(DECAY, (1 + n) / (10 + n))`` after ``n`` updates, so the
first steps' random heads do not linger in it. Small data and small batches make SGD's last iterate noisy; its
average over the last ~1 / (1 - DECAY) steps is a better model for free (Polyak & Juditsky 1992; the practice of
modern detector recipes). The average is part of the checkpoint, so a resumed run averages as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn

from .wise import holding, snapshot


class WeightAverage:
    """The running average of ``model``'s floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.average = snapshot(model)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key].detach().to(average.dtype), 1 - d)

    def swapped_in(self, model: nn.Module):
        """``model`` holds the average inside the block (to validate and keep it), its own weights again after."""
        return holding(model, self.average)

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
