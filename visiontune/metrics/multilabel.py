"""Multi-label metrics: per-class average precision (mAP is their mean), F1 at per-class thresholds, and the
thresholds themselves, chosen where each class's F1 on the validation images is highest."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the probability cut with the best F1 on these images (halfway between two neighbouring scores, so
    a slightly different score keeps its side); 0.5 for a class with no positive image here."""
    out = []
    for k in range(probs.shape[1]):
        p, t = probs[:, k], targets[:, k] > 0.5
        if not t.any():
            out.append(0.5)
            continue
        order = p.argsort(descending=True)
        p, t = p[order], t[order].float()
        tp = t.cumsum(0)
        f1 = 2 * tp / (torch.arange(1, len(p) + 1) + t.sum())  # predicting the first i+1 as positive
        i = int(f1.argmax())
        out.append(float((p[i] + p[i + 1]) / 2) if i + 1 < len(p) else float(p[i]) * 0.999)
    return out


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """The area under the precision-recall curve as scikit-learn defines it (None without a positive image)."""
    if not positive.any():
        return None
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(positive.numpy(), scores.numpy()))


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], thresholds: list[float] | None = None) -> dict:
    """mAP (mean AP over the classes that have a positive image), micro and macro F1 at ``thresholds`` (default 0.5),
    and per class: AP, precision, recall, F1, support and threshold."""
    logits, targets = logits.float(), targets.float()
    probs = logits.sigmoid()
    cut = torch.tensor(thresholds if thresholds is not None else [0.5] * len(classes))
    predicted, positive = probs >= cut, targets > 0.5
    tp, fp, fn = [(a & b).sum(0).float() for a, b in ((predicted, positive), (predicted, ~positive), (~predicted, positive))]
    per_class, aps, f1s = {}, [], []
    for k, name in enumerate(classes):
        ap = average_precision(probs[:, k], positive[:, k])
        precision = float(tp[k] / (tp[k] + fp[k])) if tp[k] + fp[k] else 0.0
        recall = float(tp[k] / (tp[k] + fn[k])) if tp[k] + fn[k] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        support = int(positive[:, k].sum())
        per_class[name] = {"AP": ap, "precision": precision, "recall": recall, "f1": f1, "support": support, "threshold": float(cut[k])}
        if ap is not None:
            aps.append(ap)
        if support:
            f1s.append(f1)
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())) if tp.sum() + fp.sum() + fn.sum() else 0.0
    return {
        "loss": float(F.binary_cross_entropy_with_logits(logits, targets)) if len(targets) else 0.0,
        "mAP": sum(aps) / len(aps) if aps else 0.0,
        "f1_micro": micro,
        "f1_macro": sum(f1s) / len(f1s) if f1s else 0.0,
        "exact_match": float((predicted == positive).all(1).float().mean()) if len(targets) else 0.0,
        "per_class": per_class,
    }
