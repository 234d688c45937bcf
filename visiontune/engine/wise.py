"""WiSE-FT (Wortsman et al., 2022): evaluate and keep a weight-space average of the fine-tuned base and the
pretrained one, ``alpha * fine_tuned + (1 - alpha) * pretrained``, while training continues on the fine-tuned weights.

On small data much like the pretraining data, fine-tuning the whole base drifts away from features that were
already good; the average keeps most of what fine-tuning learned and little of the drift (strategies.py: measured).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's floating-point weights and buffers (BatchNorm statistics included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@contextmanager
def averaged_with(module: nn.Module, pretrained: dict[str, torch.Tensor] | None, alpha: float):
    """Inside: the module holds the average; after: exactly the weights it had before (training goes on from them)."""
    if pretrained is None or alpha >= 1.0:
        yield
        return
    live = module.state_dict()
    with holding(module, {k: live[k].lerp(p.to(live[k].device), 1.0 - alpha) for k, p in pretrained.items()}):
        yield


@contextmanager
def holding(module: nn.Module, values: dict[str, torch.Tensor]):
    """Inside: the module's tensors named in ``values`` hold them; after: bit for bit what they held before."""
    live = module.state_dict()
    kept = {k: live[k].detach().clone() for k in values}
    with torch.no_grad():
        for k, v in values.items():
            live[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in kept.items():
                live[k].copy_(v)
