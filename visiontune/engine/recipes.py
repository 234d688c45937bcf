"""Training recipes: the tutorial's, reproduced exactly, and our default, per strategy.

A recipe fills in every setting the user left out; explicit settings always win.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    schedule: str  # "step" (StepLR(step_epochs, 0.1)) | "cosine" (with linear warm-up)
    step_epochs: int = 7
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    label_smoothing: float = 0.0
    backbone_lr_scale: float = 1.0
    crop_scale_min: float = 0.08
    use_feature_cache: bool = False  # train the head on cached backbone features
    views: int = 1  # augmented views per image in the feature cache
    head_epochs: int | None = None  # staged: epochs of the head-only phase
    head_lr: float | None = None  # staged: LR for the head-only phase on cached features


# The "Transfer Learning for Computer Vision" tutorial: batch 4, SGD(1e-3, 0.9), StepLR(7, 0.1), 25 epochs.
TUTORIAL = Recipe(optimizer="sgd", lr=1e-3, weight_decay=0.0, batch_size=4, epochs=25, schedule="step")

# Ours. Measured on hymenoptera with the embedded EfficientNet-Lite0, bf16 autocast (bench/classify.py).
# views: the linear head's best val accuracy (mean of 3 head seeds) on 1/2/4/8 augmented views per image was
# 0.959/0.956/0.954/0.952, the same within one of 153 val images, while each view costs a backbone pass over the training set: 2 views keep
# a second crop of every image (one random crop can miss the object) at a quarter of 8 views' extraction time.
# full (seed 0 only, a heavily loaded machine): base at 0.1x the head's LR: val 0.935/0.941/0.928/0.915 over 4 epochs,
# train accuracy still 0.88 at epoch 3; at 0.3x over 5 epochs: 0.948/0.928/0.928/0.922, train 0.97 by epoch 4.
# The peak comes in the first epochs either way; 0.3x peaked higher, more epochs did not help. Neither reached the
# 0.95 target on this seed: not yet tuned to it (see bench/classify.py for the 3-seed check).
DEFAULT = {
    "linear": Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=30, schedule="cosine",
                     use_feature_cache=True, views=2, crop_scale_min=0.25),
    "full": Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-2, batch_size=16, epochs=4, schedule="cosine",
                   warmup_epochs=0.5, label_smoothing=0.1, backbone_lr_scale=0.3, crop_scale_min=0.25),
    "partial": Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-2, batch_size=16, epochs=4, schedule="cosine",
                      warmup_epochs=0.5, label_smoothing=0.1, backbone_lr_scale=0.1, crop_scale_min=0.25),
    "staged": Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-2, batch_size=16, epochs=4, schedule="cosine",
                     warmup_epochs=0.5, label_smoothing=0.1, backbone_lr_scale=0.1, crop_scale_min=0.25,
                     use_feature_cache=True, views=2, head_epochs=1, head_lr=1e-3),
}


def recipe_for(name: str, strategy: str) -> Recipe:
    if name == "tutorial":
        return TUTORIAL
    return DEFAULT[strategy]
