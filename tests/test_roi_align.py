"""The sparse-matrix RoIAlign gives torchvision's numbers: outputs and gradients, per op, per pooler, per detector."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from visiontune.models.detection import build_detector
from visiontune.models.roi_align import SparseMultiScaleRoIAlign, sparse_roi_align


def random_rois(n: int, images: int, width: float, height: float, seed: int = 0) -> torch.Tensor:
    """Boxes of every kind the heads see: inside, across the border, wholly outside, thinner than one cell."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width + 40, height + 40]) - 20
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) / 2
    wh[: n // 8] = torch.rand(n // 8, 2, generator=g) * 3  # tiny
    index = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_gradients_match_torchvision(aligned, sampling_ratio, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 23, 31)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = random_rois(300, 2, 31 * 4, 23 * 4)
    weight = torch.randn(300, 8, 7, 5)  # a loss that weighs every output cell differently
    results = []
    for op in (roi_align, sparse_roi_align):
        leaf = x.detach().clone().requires_grad_()
        out = op(leaf, rois, (7, 5), 0.25, sampling_ratio, aligned)
        (out * weight).sum().backward()
        results.append((out.detach(), leaf.grad))
    (ref, ref_grad), (ours, our_grad) = results
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()
    assert torch.allclose(our_grad, ref_grad, atol=1e-4, rtol=1e-4), (our_grad - ref_grad).abs().max()
    assert ref_grad.abs().sum() > 0


def test_no_rois_gives_an_empty_result():
    out = sparse_roi_align(torch.randn(1, 4, 8, 8), torch.zeros(0, 5), (7, 7), 1.0, 2)
    assert out.shape == (0, 4, 7, 7)


def test_bf16_autocast_computes_in_float32_and_returns_the_input_dtype():
    x = torch.randn(1, 4, 16, 16).to(torch.bfloat16)
    rois = random_rois(20, 1, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ours = roi_align(x, rois, (7, 7), 0.25, 2), sparse_roi_align(x, rois, (7, 7), 0.25, 2)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), ref.float(), atol=1e-2)


def test_multiscale_pooler_matches_torchvision_across_levels():
    torch.manual_seed(0)
    sizes = {"0": 40, "1": 20, "2": 10, "3": 5}  # an FPN over a 160-px image
    feats = OrderedDict((k, torch.randn(2, 6, s, s, requires_grad=True)) for k, s in sizes.items())
    boxes = [random_rois(80, 1, 160, 160, seed=s)[:, 1:].clamp(0, 159) for s in (1, 2)]
    boxes = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], 1) for b in boxes]  # x1 < x2, y1 < y2
    shapes = [(160, 160), (160, 160)]
    outs, grads = [], []
    for cls in (MultiScaleRoIAlign, SparseMultiScaleRoIAlign):
        pool = cls(list(sizes), 7, 2, canonical_scale=32)  # small boxes spread over all four levels
        out = pool(feats, boxes, shapes)
        grads.append(torch.autograd.grad(out.square().sum(), list(feats.values())))
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for ref, ours in zip(*grads):
        assert ref.abs().sum() > 0 and torch.allclose(ref, ours, atol=1e-4, rtol=1e-4)


def test_detector_uses_it_and_predicts_as_with_torchvision():
    built = []
    for sparse in (True, False):
        torch.manual_seed(0)
        built.append(
            build_detector(
                "maskrcnn", 3, backbone="timm:resnet18", backbone_weights="none", min_size=96, max_size=96, sparse_roi_align=sparse
            ).eval()
        )
    ours, ref = built
    assert type(ours.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign and type(ours.roi_heads.mask_roi_pool) is SparseMultiScaleRoIAlign
    assert type(ref.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    ref.load_state_dict(ours.state_dict())  # the swap changes no weights
    ours.roi_heads.score_thresh = ref.roi_heads.score_thresh = 0.0  # keep every detection of an untrained model
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours([image])[0], ref([image])[0]
    assert len(b["boxes"]) > 0
    assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.allclose(a["masks"], b["masks"], atol=1e-4)
