"""What a classifier learns: one class per image (softmax, cross-entropy; scored by accuracy) or any number of them
(multi-label: a sigmoid per class, binary cross-entropy; scored by mAP, with F1 at per-class thresholds)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..metrics.classification import classification_metrics
from ..metrics.multilabel import choose_thresholds, multilabel_metrics


def objective_for(multi_label: bool, classes: list[str], class_weights: torch.Tensor | None, label_smoothing: float, threshold: str):
    return MultiLabel(classes, threshold) if multi_label else SingleLabel(classes, class_weights, label_smoothing)


class SingleLabel:
    multi_label = False
    score_name = "val_accuracy"

    def __init__(self, classes: list[str], class_weights: torch.Tensor | None, label_smoothing: float):
        self.classes, self.class_weights, self.label_smoothing = classes, class_weights, label_smoothing

    def loss_fn(self, device: torch.device | None = None) -> nn.Module:
        weight = self.class_weights.to(device) if self.class_weights is not None and device is not None else self.class_weights
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.label_smoothing)

    @staticmethod
    def correct(logits: torch.Tensor, y: torch.Tensor) -> float:
        """Right answers in a batch (train_accuracy is their share)."""
        return (logits.argmax(1) == y).sum().item()

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, thresholds: None = None) -> dict:
        return classification_metrics(logits, labels, self.classes)

    def thresholds(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        return None

    def log_fields(self, m: dict) -> tuple[float, dict, str]:
        """The score that picks the kept model, the log's fields, the printed summary."""
        fields = {"val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"]}
        return m["accuracy"], fields, f"val_acc {m['accuracy']:.4f}"

    def summary(self, m: dict, best: float, final: float) -> dict:
        """metrics.json's fields for this objective."""
        return {
            "best_val_accuracy": best,
            "final_val_accuracy": final,
            "val_balanced_accuracy": m["balanced_accuracy"],
            "per_class": m["per_class"],
            "confusion_matrix": m["confusion_matrix"],
        }


class MultiLabel:
    """Sigmoid outputs, binary cross-entropy. ``threshold`` "auto": per class, where F1 on the validation images is
    best (chosen at every validation, kept with the model; the val F1 is then optimistic, mAP is not); else one number."""

    multi_label = True
    score_name = "val_mAP"
    class_weights = None

    def __init__(self, classes: list[str], threshold: str):
        self.classes, self.threshold = classes, threshold

    def loss_fn(self, device: torch.device | None = None) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    @staticmethod
    def correct(logits: torch.Tensor, y: torch.Tensor) -> float:
        """Labels right at 0.5, as a share of each image's labels (train_accuracy is the per-label accuracy)."""
        return ((logits >= 0) == (y > 0.5)).float().mean(1).sum().item()

    def thresholds(self, logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
        if self.threshold == "auto":
            return choose_thresholds(logits.float().sigmoid(), targets)
        return [float(self.threshold)] * len(self.classes)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor, thresholds: list[float] | None = None) -> dict:
        return multilabel_metrics(logits, targets, self.classes, thresholds or self.thresholds(logits, targets))

    def log_fields(self, m: dict) -> tuple[float, dict, str]:
        fields = {"val_mAP": m["mAP"], "val_f1_micro": m["f1_micro"], "val_f1_macro": m["f1_macro"]}
        return m["mAP"], fields, f"val_mAP {m['mAP']:.4f}  f1_macro {m['f1_macro']:.4f}"

    def summary(self, m: dict, best: float, final: float) -> dict:
        return {
            "multi_label": True,
            "best_val_mAP": best,
            "final_val_mAP": final,
            "mAP": m["mAP"],
            "f1_micro": m["f1_micro"],
            "f1_macro": m["f1_macro"],
            "exact_match": m["exact_match"],
            "per_class": m["per_class"],
        }


def check_multi_label_settings(cfg) -> None:
    """What single-label training offers that multi-label does not (yet): one line each."""
    refused = {
        "--head knn": cfg.head == "knn",
        "--class-weights": cfg.class_weights != "none",
        "--sampler balanced": cfg.sampler == "balanced",
        "--strategy auto": cfg.strategy == "auto",
    }
    for flag, given in refused.items():
        if given:
            raise UserError(f"{flag}: not for multi-label training (--labels); choose another setting")
