"""TF-"same" padding made constant for one input size: the same outputs, bit for bit, and an ONNX graph without the
run-time padding arithmetic (which ONNX Runtime's INT8 quantizer used to quantize too)."""

from __future__ import annotations

import onnx
import pytest
import torch
from timm.layers import create_conv2d
from torch import nn

from visiontune.engine.frozen import write_onnx
from visiontune.models.backbones import build_backbone
from visiontune.models.static_padding import for_input_size


def same_padded_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        create_conv2d(3, 8, 3, stride=2, padding="same"),
        nn.ReLU(),
        create_conv2d(8, 8, 5, stride=2, padding="same", depthwise=True),
        nn.ReLU(),
        create_conv2d(8, 4, 3, stride=2, padding="same"),
    ).eval()


def kinds(module: nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules()}


@pytest.mark.parametrize("size", [33, 64, 97])
def test_constant_padding_computes_what_the_run_time_padding_does(size):
    net = same_padded_net()
    assert "Conv2dSame" in kinds(net)
    fixed = for_input_size(net, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(fixed(x), net(x))
    assert "Conv2dSame" not in kinds(fixed) and "Conv2dSame" in kinds(net)  # a copy; the model itself is untouched
    assert torch.equal(fixed[0].conv.weight, net[0].weight)


def test_the_embedded_backbones_graph_has_no_padding_arithmetic(tmp_path):
    module = build_backbone("efficientnet_lite0", "none").module.eval()
    assert "Conv2dSame" in kinds(module)
    write_onnx(module, torch.zeros(1, 3, 224, 224), tmp_path / "g.onnx", "images", "features")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "g.onnx")).graph.node}
    assert not ops & {"Ceil", "Shape", "Gather", "Div"}, ops


def test_a_model_without_same_padding_is_returned_as_it_is():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    assert for_input_size(net, 32) is net
