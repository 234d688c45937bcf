"""TensorFlow-"same" padding made constant for one input size, before a model is exported.

timm's TF-ported models (``tf_efficientnet_lite0``, the embedded default) pad their strided convolutions by an amount
computed from each input's height and width at run time. Traced into ONNX that is ~10 small shape computations
(Shape, Gather, Div, Ceil, Sub, Mul, Concat) before each such convolution, a float Pad that keeps ONNX Runtime from
fusing it into the convolution, and ONNX Runtime's static quantizer even quantizes the padding arithmetic. A graph
for a fixed input size (every classifier export, every frozen-pass graph) needs none of it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class PaddedConv(nn.Module):
    """A constant zero padding, then the convolution without padding: what a "same" convolution does at one size."""

    def __init__(self, pads: tuple[int, int, int, int], conv: nn.Conv2d):
        super().__init__()
        self.pad = nn.ZeroPad2d(pads)
        self.conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, conv.groups, conv.bias is not None
        )
        self.conv.weight, self.conv.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def for_input_size(module: nn.Module, size: int) -> nn.Module:
    """A copy of ``module`` (weights and all) whose run-time "same" padding is constant for ``size`` x ``size`` inputs;
    ``module`` itself when it has none."""
    dynamic = [name for name, m in module.named_modules() if type(m).__name__ == "Conv2dSame"]
    if not dynamic:
        return module
    module = copy.deepcopy(module).eval()
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(m, args) -> None:  # None: the inputs pass on unchanged
            seen.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    hooks = [module.get_submodule(name).register_forward_pre_hook(record(name)) for name in dynamic]
    with torch.no_grad():
        module(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name in dynamic:
        conv = module.get_submodule(name)
        ph, pw = (_same(n, k, s, d) for n, k, s, d in zip(seen[name], conv.kernel_size, conv.stride, conv.dilation))
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, PaddedConv((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), conv))
    return module


def _same(n: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding that makes a strided convolution's output ceil(n / stride) long (TensorFlow's "SAME")."""
    return max((-(-n // stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
