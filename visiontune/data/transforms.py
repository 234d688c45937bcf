"""torchvision.transforms.v2 presets. Mean, std and sizes come in as plain values from the backbone."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def _normalize(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def classification_train(size: int, mean, std, scale_min: float = 0.08) -> v2.Compose:
    """Random resized crop (the tutorial: torchvision's default scale 0.08-1) and horizontal flip."""
    return v2.Compose(
        [v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True), v2.RandomHorizontalFlip(), *_normalize(mean, std)]
    )


def classification_eval(size: int, resize: int, mean, std) -> v2.Compose:
    """Resize the shorter side, then a center crop (the ImageNet evaluation protocol)."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), *_normalize(mean, std)])


def detection_train() -> v2.Compose:
    """Horizontal flip that moves boxes and masks with the image."""
    return v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)])


def detection_eval() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
