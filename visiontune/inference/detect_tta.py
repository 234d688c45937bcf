"""Test-time augmentation for detectors: the image and its mirror, their detections merged.

A detection found in both passes (same class, boxes overlapping by ``MATCH_IOU``) becomes one: its box the
score-weighted mean of the two, its mask the mean of the two mask probabilities, its score the mean of the two
scores. A detection found in one pass only keeps its box and mask with half its score (the other pass scored it 0),
so what one view alone sees ranks below what both see (weighted box fusion over two views).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

MATCH_IOU = 0.55


class FlipTTA:
    """Wraps a detector (``model(list of CHW float images) -> list of output dicts``) with flip TTA."""

    def __init__(self, model):
        self.model = model

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        plain = self.model(images)
        mirrored = self.model([im.flip(-1) for im in images])
        return [merge(a, unflip(b, im.shape[-1])) for a, b, im in zip(plain, mirrored, images)]


def unflip(out: dict, width: int) -> dict:
    """Detections of the mirrored image, in the original image's coordinates."""
    out = dict(out)
    boxes = out["boxes"].clone()
    boxes[:, [0, 2]] = width - out["boxes"][:, [2, 0]]
    out["boxes"] = boxes
    if "masks" in out:
        out["masks"] = out["masks"].flip(-1)
    return out


def merge(a: dict, b: dict) -> dict:
    """One list of detections from two views (see the module's docstring), highest score first."""
    iou = box_iou(a["boxes"], b["boxes"])
    iou[a["labels"][:, None] != b["labels"][None, :]] = 0
    pairs = []  # greedy, most confident of ``a`` first: each detection of ``b`` joins at most one of ``a``
    taken = torch.zeros(len(b["boxes"]), dtype=torch.bool)
    for i in a["scores"].argsort(descending=True).tolist():
        candidates = (iou[i] >= MATCH_IOU) & ~taken
        j = int((iou[i] * candidates).argmax()) if candidates.any() else None
        if j is not None:
            taken[j] = True
        pairs.append((i, j))
    pairs += [(None, j) for j in (~taken).nonzero().flatten().tolist()]
    fields: dict[str, list] = {k: [] for k in ("boxes", "scores", "labels", "masks") if k in a}
    for i, j in pairs:
        sa = a["scores"][i] if i is not None else torch.tensor(0.0)
        sb = b["scores"][j] if j is not None else torch.tensor(0.0)
        first, other = (a, i) if i is not None else (b, j)
        weights = [(a, i, sa), (b, j, sb)] if i is not None and j is not None else [(first, other, torch.tensor(1.0))]
        total = sum(w for _, _, w in weights)
        fields["boxes"].append(sum(d["boxes"][k] * w for d, k, w in weights) / total)
        fields["scores"].append((sa + sb) / 2)
        fields["labels"].append(first["labels"][other])
        if "masks" in a:
            fields["masks"].append(sum(d["masks"][k] for d, k, _ in weights) / len(weights))
    if not pairs:
        return a
    out = {k: torch.stack(v) for k, v in fields.items()}
    order = out["scores"].argsort(descending=True)
    return {k: v[order] for k, v in out.items()}
