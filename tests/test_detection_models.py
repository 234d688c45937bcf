"""Detector builders: COCO-model predictors replaced for a new class count; registry backbones under an FPN or alone."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from visiontune.errors import UserError
from visiontune.models.detection import build_detector
from visiontune.models.postprocess import use_box_voting, use_mask_quality_scores


def test_predictors_replaced_for_new_class_count_without_size_mismatch(tmp_path):
    torch.manual_seed(0)
    coco = torchvision.models.get_model("maskrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=91)
    weights = tmp_path / "maskrcnn_coco.safetensors"  # stands in for the COCO file (no downloads offline)
    save_file({k: v.contiguous() for k, v in coco.state_dict().items()}, str(weights))
    m = build_detector("maskrcnn_resnet50_fpn", 4, weights=str(weights), min_size=64, max_size=64, rois_per_image=128)
    heads = m.roi_heads
    assert heads.fg_bg_sampler.batch_size_per_image == 128  # --rois-per-image
    assert heads.box_predictor.cls_score.out_features == 4 and heads.box_predictor.bbox_pred.out_features == 16
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 4
    sd = m.state_dict()
    for k in (
        "backbone.body.layer3.0.conv1.weight",
        "backbone.fpn.layer_blocks.0.0.weight",
        "rpn.head.conv.0.0.weight",
        "roi_heads.box_head.fc7.weight",
        "roi_heads.mask_head.0.0.weight",
    ):
        assert torch.equal(sd[k], coco.state_dict()[k]), k
    # torchvision's default: conv1 and layer1 frozen, layer2-4 train
    assert not m.backbone.body.layer1[0].conv1.weight.requires_grad and m.backbone.body.layer2[0].conv1.weight.requires_grad
    m.eval()
    out = m([torch.rand(3, 64, 64)])[0]
    assert out["masks"].shape[1:] == (1, 64, 64)


def test_unknown_model_and_offline_weights_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown detection model"):
        build_detector("yolo", 2)
    monkeypatch.setenv("VISIONTUNE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="offline"):
        build_detector("fasterrcnn_mobilenet_v3_large_fpn", 2)


@pytest.mark.parametrize("backbone,neck", [("efficientnet_lite0", "fpn"), ("mobilenet_v2", "none")])
def test_registry_backbone_detectors_train_every_head(backbone, neck):
    torch.manual_seed(0)
    m = build_detector("maskrcnn", 3, backbone=backbone, backbone_weights="none", neck=neck, min_size=64, max_size=64)
    levels = m.backbone.level_names
    assert levels == (["0", "1", "2"] if neck == "fpn" else ["0"])
    frozen_bn = [n for n, mod in m.backbone.body.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert frozen_bn == []  # every backbone BatchNorm is frozen
    m.train()
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 10:50, 8:30] = 1
    target = {"boxes": torch.tensor([[8.0, 10, 29, 49]]), "labels": torch.tensor([2]), "masks": mask}
    losses = m([torch.rand(3, 64, 64)], [target])
    assert losses["loss_mask"].item() < 2.0  # small initial mask logits (not torchvision's 10-40 with few classes)
    sum(losses.values()).backward()
    for name in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight", "rpn.head.conv.0.0.weight"):
        assert m.get_parameter(name).grad is not None, name
    trained = [n for n, p in m.backbone.body.named_parameters() if p.requires_grad]
    frozen = [n for n, p in m.backbone.body.named_parameters() if not p.requires_grad]
    assert trained and frozen  # the stages before stride 8 stay fixed
    assert all(p.grad is None for p in m.backbone.body.parameters() if not p.requires_grad)


def test_mask_quality_scores_are_box_scores_times_the_mean_kept_mask_probability():
    m = build_detector("maskrcnn", 2, backbone_weights="none", min_size=64, max_size=64, mask_quality_scores=True).eval()
    masks = torch.zeros(3, 1, 28, 28)
    masks[0, 0, :14] = 0.6  # half the mask kept, at 0.6
    masks[1, 0] = 0.9
    masks[2, 0] = 0.4  # no pixel above 0.5: no mask at all
    boxes = torch.arange(12.0).reshape(3, 4)
    heads_output = {"boxes": boxes, "labels": torch.ones(3, dtype=torch.int64), "scores": torch.tensor([0.9, 0.8, 0.99]), "masks": masks}
    m.roi_heads.forward = lambda *args: ([dict(heads_output)], {})  # what the box and mask heads found, before the hook
    (r,), _ = m.roi_heads()
    assert r["scores"].tolist() == pytest.approx([0.8 * 0.9, 0.9 * 0.6, 0.0])  # highest first
    assert torch.equal(r["boxes"], boxes[[1, 0, 2]]) and torch.equal(r["masks"], masks[[1, 0, 2]])
    (r,), _ = use_mask_quality_scores(m, False).roi_heads()
    assert torch.equal(r["scores"], heads_output["scores"])  # torchvision's: the box classifier's
    boxes_only = build_detector("fasterrcnn", 2, backbone_weights="none", mask_quality_scores=True)
    assert not hasattr(boxes_only.roi_heads, "mask_quality_scores")


def test_box_voting_moves_each_kept_box_to_the_score_weighted_mean_of_its_close_candidates():
    m = build_detector("fasterrcnn", 2, backbone_weights="none", min_size=64, max_size=64, box_voting=True).eval()
    proposals = torch.tensor([[10.0, 10, 50, 90], [12, 10, 52, 90], [30, 10, 70, 90]])  # IoU(0, 1) 0.90, (0, 2) 0.33
    p = torch.tensor([0.9, 0.6, 0.8])
    class_logits = torch.stack([torch.zeros(3), (p / (1 - p)).log()], 1)  # softmax: the pedestrian at p
    args = (class_logits, torch.zeros(3, 8), [proposals], [(100, 100)])  # no regression: candidates are the proposals
    (boxes,), (scores,), _ = m.roi_heads.postprocess_detections(*args)
    assert scores.tolist() == pytest.approx([0.9, 0.8])  # NMS dropped the second, kept the scores
    voted = torch.tensor([[(0.9 * 10 + 0.6 * 12) / 1.5, 10, (0.9 * 50 + 0.6 * 52) / 1.5, 90], [30, 10, 70, 90]])
    assert torch.allclose(boxes, voted)  # the first moved towards its suppressed neighbour, the second had none
    (boxes,), _, _ = use_box_voting(m, False).roi_heads.postprocess_detections(*args)
    assert torch.equal(boxes, proposals[[0, 2]])  # torchvision's
