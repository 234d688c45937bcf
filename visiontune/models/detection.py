"""Mask R-CNN / Faster R-CNN for the user's classes: torchvision's COCO models with new predictors, or any
registry backbone (the embedded EfficientNet-Lite0 by default) under an FPN or a single feature map.

The tutorial's two ways, as builders:
1. ``maskrcnn_resnet50_fpn`` & co with COCO weights (``--weights`` / torch hub cache / download), the box and mask
   predictors replaced for ``num_classes`` (FastRCNNPredictor / MaskRCNNPredictor), so there is never a size mismatch;
2. ``maskrcnn`` / ``fasterrcnn`` on ``--backbone NAME``: the backbone's stages at strides 8, 16, 32 under an FPN
   (``neck="fpn"``), or its last feature map alone with its own AnchorGenerator and RoIAlign (``neck="none"``).
Backbone BatchNorm is frozen (batches of 2 make batch statistics noise), as torchvision does for its detectors.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..errors import UserError
from . import weights as W
from .backbones import Backbone, build_backbone
from .postprocess import use_box_voting, use_mask_quality_scores
from .roi_align import use_sparse_roi_align

log = logging.getLogger("visiontune")

TORCHVISION_MODELS = (
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
)
CUSTOM_MODELS = ("maskrcnn", "fasterrcnn")
DEFAULT_BACKBONE = "efficientnet_lite0"
NECKS = ("fpn", "none")
FEATURE_STRIDES = (8, 16, 32)
NON_FEATURE_STAGES = ("head", "classifier", "norm")
FIXED_ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # anchor height / width: torchvision's, the tutorial's


def is_mask_model(model: str) -> bool:
    return model.startswith("maskrcnn")


def build_detector(
    model: str = "maskrcnn",
    num_classes: int = 2,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    backbone_weights: str | None = None,
    neck: str = "fpn",
    trainable_backbone_layers: int | None = None,
    min_size: int = 320,
    max_size: int = 512,
    rois_per_image: int = 512,
    sparse_roi_align: bool = True,
    anchor_ratios: tuple[float, ...] = FIXED_ANCHOR_RATIOS,
    anchors_per_octave: int = 1,
    mask_quality_scores: bool = False,
    box_voting: bool = False,
) -> nn.Module:
    """A detector for ``num_classes`` classes including background. ``weights``/``backbone_weights``: None = pretrained
    (resolved in order), "none" = random init, else a file. ``model.pretrained`` records where weights came from.
    ``rois_per_image``: proposals sampled per image to train the box and mask heads (torchvision's default 512).
    ``sparse_roi_align``: RoIAlign on the CPU by :mod:`.roi_align` (same numbers, faster); False keeps torchvision's.
    ``anchor_ratios`` (height / width) and ``anchors_per_octave`` shape the RPN anchors of the registry-backbone models
    (torchvision's COCO models keep the anchors their RPN was trained with). ``mask_quality_scores`` and
    ``box_voting``: see :mod:`.postprocess` (False: torchvision's scores and boxes)."""
    anchors = (tuple(anchor_ratios), anchors_per_octave)
    detector = _build_detector(
        model, num_classes, backbone, weights, backbone_weights, neck, trainable_backbone_layers, min_size, max_size, anchors
    )
    detector.roi_heads.fg_bg_sampler.batch_size_per_image = rois_per_image
    use_mask_quality_scores(detector, mask_quality_scores)
    use_box_voting(detector, box_voting)
    return use_sparse_roi_align(detector) if sparse_roi_align else detector


def _build_detector(model, num_classes, backbone, weights, backbone_weights, neck, trainable_backbone_layers, min_size, max_size, anchors):
    if num_classes < 2:
        raise UserError(f"a detector needs at least one object class (got {num_classes - 1})")
    if model in TORCHVISION_MODELS:
        if backbone is not None:
            raise UserError(f"--backbone: {model} has its own backbone; use --model maskrcnn or fasterrcnn with --backbone {backbone}")
        return _torchvision_detector(model, num_classes, weights, trainable_backbone_layers, min_size, max_size)
    if model in CUSTOM_MODELS:
        if weights not in (None, "none"):
            raise UserError(f"--weights: {model} on a registry backbone has no COCO weights; use --backbone-weights for the backbone")
        return _custom_detector(
            model, num_classes, backbone or DEFAULT_BACKBONE, backbone_weights, neck, trainable_backbone_layers, min_size, max_size, anchors
        )
    raise UserError(f"--model: unknown detection model {model!r}; choose one of {', '.join(CUSTOM_MODELS + TORCHVISION_MODELS)}")


# --------------------------------------------------------------------------------------------- torchvision COCO models


def _torchvision_detector(name: str, num_classes: int, weights: str | None, trainable: int | None, min_size: int, max_size: int):
    import torchvision

    if trainable is not None and not 0 <= trainable <= 5:
        raise UserError(f"--trainable-backbone-layers: {trainable} is out of range [0, 5]")
    if weights == "none":
        m = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, min_size=min_size, max_size=max_size
        )
        if getattr(m.roi_heads, "mask_predictor", None) is not None:
            small_mask_logits(m.roi_heads.mask_predictor)
        m.pretrained = "none"
        return m
    if weights is None:
        enum = torchvision.models.get_model_weights(name).DEFAULT
        sd, source = W.load_url_cached(enum.url, name), f"torchvision:{enum}"
    else:
        sd, source = W.load_state_dict_file(weights), str(weights)
    file_classes = sd.get("roi_heads.box_predictor.cls_score.weight")
    if file_classes is None:
        raise UserError(f"--weights {weights}: not a {name} state dict (no roi_heads.box_predictor)")
    m = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=file_classes.shape[0], min_size=min_size, max_size=max_size
    )
    m.backbone.body = freeze_batch_norm(m.backbone.body)  # as torchvision builds it with pretrained weights
    target = m.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.endswith("num_batches_tracked") and k not in target)}
    try:
        m.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"--weights {weights or source}: does not fit {name} ({str(e).splitlines()[1].strip()[:160]})") from None
    replace_predictors(m, num_classes)
    _freeze_torchvision_body(m, 3 if trainable is None else trainable)
    m.pretrained = source
    return m


def replace_predictors(model: nn.Module, num_classes: int) -> None:
    """New box (and mask) predictors for ``num_classes``: the tutorial's FastRCNNPredictor / MaskRCNNPredictor swap."""
    heads = model.roi_heads
    if heads.box_predictor.cls_score.out_features != num_classes:
        heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    if getattr(heads, "mask_predictor", None) is not None and heads.mask_predictor.mask_fcn_logits.out_channels != num_classes:
        hidden = heads.mask_predictor.conv5_mask.out_channels
        heads.mask_predictor = MaskRCNNPredictor(heads.mask_predictor.conv5_mask.in_channels, hidden, num_classes)
        small_mask_logits(heads.mask_predictor)


def small_mask_logits(predictor: MaskRCNNPredictor) -> None:
    """Start the mask logits near zero. torchvision's kaiming fan-out init of the 1x1 logits conv has std sqrt(2 / classes):
    with 2 classes the first mask loss is 10-40 instead of 0.7 and training goes to NaN (Detectron2 uses std 0.001)."""
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)


def _freeze_torchvision_body(model: nn.Module, trainable: int) -> None:
    """torchvision's rule: the last ``trainable`` of the backbone's 5 stages train, the rest stay fixed."""
    body = model.backbone.body
    names = [n for n, _ in body.named_children()]
    if "layer4" in names:  # ResNet
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
        for n, p in body.named_parameters():
            p.requires_grad_(any(n.startswith(t + ".") or n == t for t in train))
    else:  # MobileNetV3: stage starts are the blocks marked _is_cn
        blocks = list(body.children())
        starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        freeze_before = len(blocks) if trainable == 0 else starts[max(0, len(starts) - trainable)]
        for i, b in enumerate(blocks):
            for p in b.parameters():
                p.requires_grad_(i >= freeze_before)


# --------------------------------------------------------------------------------------------- registry backbones


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """BatchNorm (also timm's BatchNormAct) -> frozen copies with the same statistics and state-dict names."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def probe_stages(bb: Backbone, probe_size: int = 64) -> list[tuple[str, str, int, int]]:
    """(stage name, output module, stride, channels) of every feature stage, in forward order (one small forward pass)."""
    stages = [(s, prefixes[-1]) for s, prefixes in bb.stages if s not in NON_FEATURE_STAGES]
    shapes: dict[str, torch.Size] = {}
    hooks = [
        bb.module.get_submodule(node).register_forward_hook(lambda _m, _i, out, node=node: shapes.__setitem__(node, out.shape))
        for _, node in stages
    ]
    was_training = bb.module.training
    try:
        with torch.no_grad():
            bb.module.eval()(torch.zeros(1, 3, probe_size, probe_size))
    finally:
        for h in hooks:
            h.remove()
        bb.module.train(was_training)
    return [(s, node, probe_size // shapes[node][-1], shapes[node][1]) for s, node in stages]


def feature_stages(probed: list[tuple[str, str, int, int]], name: str) -> list[tuple[str, str, int, int]]:
    """The last stage at each stride 8, 16, 32."""
    by_stride = {stride: item for item in probed for stride in [item[2]] if stride in FEATURE_STRIDES}
    missing = [s for s in FEATURE_STRIDES if s not in by_stride]
    if missing:
        raise UserError(f"--backbone {name}: no stage at stride {missing}; it cannot serve as a detection backbone")
    return [by_stride[s] for s in FEATURE_STRIDES]


class StageFeatures(nn.Module):
    """A registry backbone cut at chosen stages: images -> OrderedDict of feature maps, then an FPN or nothing."""

    def __init__(self, bb: Backbone, neck: str, trainable: int | None):
        super().__init__()
        from timm.models import create_feature_extractor

        probed = probe_stages(bb)
        chosen = feature_stages(probed, bb.name)
        if neck == "none":
            chosen = chosen[-1:]
        module = freeze_batch_norm(bb.module)
        self.body = create_feature_extractor(module, {node: str(i) for i, (_, node, _, _) in enumerate(chosen)})
        in_channels = [c for *_, c in chosen]
        self.fpn = FeaturePyramidNetwork(in_channels, 256, extra_blocks=LastLevelMaxPool()) if neck == "fpn" else None
        self.out_channels = 256 if neck == "fpn" else in_channels[0]
        self.level_names = [str(i) for i in range(len(chosen))]
        _freeze_stages(self.body, bb, probed, chosen[-1][0], trainable)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = OrderedDict(self.body(x))
        return self.fpn(feats) if self.fpn is not None else feats


def _freeze_stages(body: nn.Module, bb: Backbone, probed, last_stage: str, trainable: int | None) -> None:
    """Default: the stages before stride 8 stay fixed (like torchvision's 3 of 5); else the last ``trainable`` train."""
    names = [s for s, _ in bb.stages]
    used = bb.stages[: names.index(last_stage) + 1]
    if trainable is None:
        first_stride8 = next(s for s, _, stride, _ in probed if stride >= 8)
        first_trained = names.index(first_stride8)
    else:
        if not 0 <= trainable <= len(used):
            raise UserError(f"--trainable-backbone-layers: {trainable} is out of range [0, {len(used)}] for {bb.name}")
        first_trained = len(used) - trainable
    trained = tuple(p for _, prefixes in used[first_trained:] for p in prefixes)
    for n, p in body.named_parameters():
        p.requires_grad_(any(n == t or n.startswith(t + ".") for t in trained))


def _custom_detector(
    model: str,
    num_classes: int,
    backbone: str,
    backbone_weights: str | None,
    neck: str,
    trainable: int | None,
    min_size: int,
    max_size: int,
    anchors: tuple[tuple[float, ...], int],
) -> nn.Module:
    if neck not in NECKS:
        raise UserError(f"--neck: unknown neck {neck!r}; choose fpn or none")
    bb = build_backbone(backbone, backbone_weights)
    features = StageFeatures(bb, neck, trainable)
    levels = features.level_names
    ratios, per_octave = anchors
    if neck == "fpn":  # sizes 32..256 (and the octave's steps) on strides 8..64, the last from LastLevelMaxPool
        sizes = tuple(tuple(s * 2 ** (k / per_octave) for k in range(per_octave)) for s in (32, 64, 128, 256))
    else:  # the tutorial's single feature map: sizes 32..512
        sizes = (tuple(32 * 2 ** (k / per_octave) for k in range(4 * per_octave + 1)),)
    anchor_generator = AnchorGenerator(sizes, (ratios,) * len(sizes))
    kwargs = dict(
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(bb.preprocessing.mean),
        image_std=list(bb.preprocessing.std),
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
    )
    if is_mask_model(model):
        m = MaskRCNN(features, mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2), **kwargs)
        small_mask_logits(m.roi_heads.mask_predictor)
    else:
        m = FasterRCNN(features, **kwargs)
    m.pretrained = bb.pretrained
    return m


def fit_anchor_ratios(boxes: list[torch.Tensor]) -> tuple[float, ...]:
    """Three anchor shapes for these (x1, y1, x2, y2) boxes: the height / width ratios at the middles of their
    thirds (quantiles 1/6, 1/2, 5/6), rounded to 2 decimals; torchvision's (0.5, 1, 2) when there are no boxes."""
    b = torch.cat([x.reshape(-1, 4) for x in boxes]).double().numpy() if boxes else np.zeros((0, 4))
    if not len(b):
        return FIXED_ANCHOR_RATIOS
    ratios = np.quantile((b[:, 3] - b[:, 1]) / (b[:, 2] - b[:, 0]), (1 / 6, 1 / 2, 5 / 6))
    return tuple(round(float(r), 2) for r in ratios)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
