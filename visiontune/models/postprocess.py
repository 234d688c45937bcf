"""What a detector does with its raw detections beyond torchvision's Mask R-CNN / Faster R-CNN, at inference only:
box voting (each kept box refined by the candidates NMS dropped) and mask-quality scores (each mask detection
ranked by how sure its mask is). Both are switched per model and recorded in its file (meta.DetectorMeta)."""

from __future__ import annotations

import types

import torch
from torch import nn
from torchvision.ops import box_iou, clip_boxes_to_image

BOX_VOTING_IOU = 0.75  # candidates overlapping a kept box by at least this vote on where it is


def use_box_voting(model: nn.Module, on: bool = True) -> nn.Module:
    """Replace each box NMS keeps by the score-weighted mean of the candidate boxes of its class that overlap it by
    IoU >= ``BOX_VOTING_IOU`` (box voting, Gidaris & Komodakis 2015): the neighbours NMS drops still say where the
    object is. Scores stay as they are; masks are then predicted in the voted boxes. ``on=False``: torchvision's boxes."""
    heads = model.roi_heads
    if not hasattr(heads, "box_voting"):
        heads.postprocess_detections = types.MethodType(_postprocess_with_voting, heads)
    heads.box_voting = on
    return model


def _postprocess_with_voting(heads: nn.Module, class_logits, box_regression, proposals, image_shapes):
    kept = type(heads).postprocess_detections(heads, class_logits, box_regression, proposals, image_shapes)
    if not heads.box_voting:
        return kept
    sizes = [p.shape[0] for p in proposals]  # not len(): an export traces shapes, not ints
    candidates = heads.box_coder.decode(box_regression, proposals).split(sizes)  # (proposals, classes, 4)
    probabilities = class_logits.softmax(-1).split(sizes)
    classes = torch.arange(class_logits.shape[-1], device=class_logits.device).view(1, -1)
    voted = []
    for boxes, labels, cand, prob, shape in zip(kept[0], kept[2], candidates, probabilities, image_shapes):
        cand_labels = classes.expand_as(prob)[:, 1:].reshape(-1)
        cand, prob = clip_boxes_to_image(cand, shape)[:, 1:].reshape(-1, 4), prob[:, 1:].reshape(-1)
        sure = prob > heads.score_thresh  # the candidates torchvision's NMS chose from (a kept box is one of them)
        cand, prob, cand_labels = cand[sure], prob[sure], cand_labels[sure]
        same_class = labels[:, None] == cand_labels[None, :]
        weights = ((box_iou(boxes, cand) >= BOX_VOTING_IOU) & same_class) * prob[None, :]
        voted.append((weights @ cand) / weights.sum(1, keepdim=True).clamp(min=1e-6))
    return voted, kept[1], kept[2]


def use_mask_quality_scores(model: nn.Module, on: bool = True) -> nn.Module:
    """Score each detection of a mask model by its box score times its mask's quality, the mean probability of the
    pixels its mask keeps (SOLOv2's "maskness", on the mask head's 28 x 28 output), or (``on=False``) by the box
    score alone. A box the classifier is sure of whose mask the mask head is unsure of then ranks lower, as segm AP
    wants; the box score bounds the product, so a score threshold keeps no more than before."""
    heads = model.roi_heads
    if getattr(heads, "mask_predictor", None) is None:
        return model
    if not hasattr(heads, "mask_quality_scores"):
        heads.register_forward_hook(_rescore_by_mask_quality)
    heads.mask_quality_scores = on
    return model


def _rescore_by_mask_quality(heads: nn.Module, inputs, output):
    results, losses = output
    if heads.training or not heads.mask_quality_scores:
        return None
    rescored = []
    for r in results:
        probs = r["masks"].flatten(1)
        kept = probs > 0.5
        quality = (probs * kept).sum(1) / kept.sum(1).clamp(min=1)
        scores, order = (r["scores"] * quality).sort(descending=True)
        rescored.append({**{k: v[order] for k, v in r.items()}, "scores": scores})
    return rescored, losses
