"""Classification metrics: predicted logits, accuracy, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, channels_last: bool = True, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress):
        x = x.to(device, non_blocking=True)  # on the model's device (CUDA under torchrun)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits.append(model(x).float().cpu())  # metrics, pictures and JSON work on the CPU
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy (the mean of per-class recall), per-class precision/recall/F1 and the confusion matrix
    (rows: true, columns: predicted)."""
    n = len(classes)
    pred = logits.argmax(1)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels.long(), pred.long()), torch.ones_like(pred, dtype=torch.long), accumulate=True)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i].item()
        predicted, actual = confusion[:, i].sum().item(), confusion[i].sum().item()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": actual}
    accuracy = (pred == labels).float().mean().item() if len(labels) else 0.0
    recalls = [v["recall"] for v in per_class.values() if v["support"]]
    balanced = sum(recalls) / len(recalls) if recalls else 0.0  # mean recall of the classes present
    loss = nn.functional.cross_entropy(logits, labels.long()).item() if len(labels) else 0.0
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "loss": loss,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
    }


def class_weights(setting: str, labels: list[int], classes: list[str]) -> torch.Tensor | None:
    """Loss weights per class for ``--class-weights``: none; auto (inverse frequency, scaled so that the average
    training image weighs 1: n / (classes * n_class)); or a JSON file of {class name: weight} (missing classes: 1)."""
    if setting == "none":
        return None
    if setting == "auto":
        counts = torch.bincount(torch.as_tensor(labels), minlength=len(classes)).float()
        return torch.where(counts > 0, len(labels) / (len(classes) * counts.clamp(min=1)), torch.zeros_like(counts))
    import json
    from pathlib import Path

    from ..errors import UserError

    try:
        given = json.loads(Path(setting).read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"--class-weights: {setting}: not a readable JSON file of class weights ({getattr(e, 'strerror', None) or e})"
        ) from None
    if not isinstance(given, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in given.values()):
        raise UserError(f"--class-weights: {setting}: expected an object of class name -> weight (a number >= 0)")
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise UserError(f"--class-weights: {setting}: unknown class(es) {', '.join(unknown)} (the classes: {', '.join(classes)})")
    return torch.tensor([float(given.get(c, 1.0)) for c in classes])


def decisions(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], thresholds: list[float] | None = None) -> list[dict]:
    """Each image's answer in words: its true and predicted label, how sure, right or not, and the probabilities.
    Multi-label (``thresholds`` given; ``labels`` multi-hot): the labels at or above their class's threshold,
    space-separated ("-": none); sure as the least sure of its per-class decisions; right when every label is."""
    if thresholds is None:
        probs = logits.float().softmax(1)
        conf, pred = probs.max(1)
        named, truth = [classes[int(k)] for k in pred], [classes[int(k)] for k in labels]
    else:
        probs = logits.float().sigmoid()
        chosen = probs >= torch.tensor(thresholds)
        conf = torch.where(chosen, probs, 1 - probs).min(1).values

        def words(row) -> str:
            return " ".join(c for c, on in zip(classes, row.tolist()) if on) or "-"

        named, truth = [words(row) for row in chosen], [words(row > 0.5) for row in labels]
    return [
        {"true": t, "predicted": p, "confidence": float(c), "correct": t == p, "probabilities": pr}
        for t, p, c, pr in zip(truth, named, conf.tolist(), probs.tolist())
    ]
