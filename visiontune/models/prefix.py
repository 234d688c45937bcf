"""A backbone cut where its frozen stages end, so that a faster engine can run the frozen prefix (engine/frozen.py).

``partial`` freezes the first stages of the base; their forward pass is the same function in every step, and on a
CPU it is a large share of the step that PyTorch eager runs slowest. Cut there, the prefix is a module of its own
(exported once, like the base of ``linear``) and the rest a function that autograd follows as before.

Only where the cut is certain from the module's structure: timm's EfficientNet family (the embedded Lite0-2 among
it), whose forward is ``conv_stem, bn1, blocks[0], ..., blocks[-1], conv_head, bn2, forward_head``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

STEM = ("conv_stem", "bn1")


def split_frozen_prefix(module: nn.Module, frozen: list[str]) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(prefix, rest) with ``rest(prefix(x)) == module(x)``, when ``frozen`` (module-name prefixes) are the stem and
    the first blocks of an EfficientNet-like ``module``; else None (the backbone then runs whole, in PyTorch)."""
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
    if not all(hasattr(module, n) for n in names) or not isinstance(module.blocks, nn.Sequential):
        return None
    blocks = len(frozen) - len(STEM)
    if blocks < 0 or tuple(frozen[: len(STEM)]) != STEM or list(frozen[len(STEM) :]) != [f"blocks.{i}" for i in range(blocks)]:
        return None
    if blocks >= len(module.blocks):
        return None  # the whole base is frozen: that is linear's feature cache, not a prefix
    prefix = nn.Sequential(module.conv_stem, module.bn1, *module.blocks[:blocks])

    def rest(x: torch.Tensor) -> torch.Tensor:
        for block in module.blocks[blocks:]:
            x = block(x)
        return module.forward_head(module.bn2(module.conv_head(x)))

    return prefix, rest
