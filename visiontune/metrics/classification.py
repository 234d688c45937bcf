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
    """Accuracy, per-class precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
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
    loss = nn.functional.cross_entropy(logits, labels.long()).item() if len(labels) else 0.0
    return {"accuracy": accuracy, "loss": loss, "per_class": per_class, "confusion_matrix": confusion.tolist(), "classes": classes}
