"""Settings as plain dataclasses, with YAML load/dump. No logic beyond validation of ranges."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

STRATEGIES = ("full", "partial", "linear", "staged", "auto")
RECIPES = ("default", "tutorial")
HEADS = ("linear", "mlp", "logreg", "svm", "knn")


@dataclass
class ClassifyConfig:
    """Everything a classification run needs; saved as RUN/config.yaml."""

    data: str = ""
    out: str = ""
    val_data: str | None = None  # explicit validation folder (class folders)
    val_split: float | None = None  # fraction held out from `data` when it has no val/
    model: str = "efficientnet_lite0"
    weights: str | None = None  # path, or "none" for random init
    strategy: str = "linear"
    trainable_stages: int | None = None  # partial: how many of the last stages train
    freeze_until: str | None = None  # partial: freeze up to and including this stage
    head: str = "linear"
    recipe: str = "default"
    epochs: int | None = None  # None: the recipe's default
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    image_size: int | None = None
    views: int | None = None  # augmented views per image for the feature cache
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the hardware computes bf16 natively, else fp32; or bf16, fp32
    skip_bad: bool = False
    cache_dir: str | None = None  # feature cache; default ~/.cache/visiontune/features; "none": off
    checkpoint_every: int = 0  # also save `last` every N steps (0: each epoch only)
    quiet: bool = False
    tensorboard: bool = False
    overwrite: bool = False
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch

    def validate(self) -> "ClassifyConfig":
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy: unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe: unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.head not in HEADS:
            raise UserError(f"--head: unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        _check_range("--epochs", self.epochs, 1, 10_000)
        _check_range("--batch-size", self.batch_size, 1, 4096)
        _check_range("--lr", self.lr, 1e-8, 10.0)
        _check_range("--weight-decay", self.weight_decay, 0.0, 1.0)
        _check_range("--image-size", self.image_size, 32, 2048)
        _check_range("--views", self.views, 1, 100)
        _check_range("--workers", self.workers, 0, 64)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"--precision: unknown precision {self.precision!r}; choose auto, bf16 or fp32")
        _check_range("--trainable-stages", self.trainable_stages, 0, 1000)
        _check_range("--checkpoint-every", self.checkpoint_every, 0, 10**9)
        if self.val_split is not None and not 0.0 < self.val_split < 1.0:
            raise UserError(f"--val-split: must be between 0 and 1 (exclusive), got {self.val_split}")
        return self


@dataclass
class DetectConfig:
    """Everything a detection / instance segmentation run needs; saved as RUN/config.yaml."""

    data: str = ""
    out: str = ""
    format: str = "pennfudan"  # pennfudan | coco
    annotations: str | None = None
    val_data: str | None = None
    val_annotations: str | None = None
    val_split: float | None = None
    val_last: int | None = None
    model: str = "maskrcnn"  # a torchvision detection model name, or maskrcnn/fasterrcnn with --backbone
    backbone: str | None = None
    neck: str = "fpn"  # with --backbone: fpn (strides 8-32) or none (its last feature map, as the tutorial's mobilenet_v2)
    weights: str | None = None
    backbone_weights: str | None = None
    trainable_backbone_layers: int | None = None
    min_size: int = 320
    max_size: int = 512
    epochs: int = 3
    batch_size: int = 2
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 3
    clip_grad: float = 5.0
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch

    def validate(self) -> "DetectConfig":
        if self.format not in ("pennfudan", "coco"):
            raise UserError(f"--format: unknown format {self.format!r}; choose pennfudan or coco")
        if self.neck not in ("fpn", "none"):
            raise UserError(f"--neck: unknown neck {self.neck!r}; choose fpn or none")
        _check_range("--epochs", self.epochs, 1, 10_000)
        _check_range("--batch-size", self.batch_size, 1, 256)
        _check_range("--lr", self.lr, 1e-8, 10.0)
        _check_range("--min-size", self.min_size, 32, 4096)
        _check_range("--max-size", self.max_size, 32, 8192)
        _check_range("--val-last", self.val_last, 1, 10**7)
        if self.max_size < self.min_size:
            raise UserError(f"--max-size ({self.max_size}) must be at least --min-size ({self.min_size})")
        if self.val_split is not None and not 0.0 < self.val_split < 1.0:
            raise UserError(f"--val-split: must be between 0 and 1 (exclusive), got {self.val_split}")
        return self


def _check_range(name: str, value: Any, low: float, high: float) -> None:
    if value is not None and not (low <= value <= high):
        raise UserError(f"{name}: {value} is out of range [{low}, {high}]")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict of settings (keys use underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config: {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {p}: expected a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_dict(cls: type, values: dict) -> Any:
    """Build a config dataclass, naming any unknown key."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"config: unknown setting(s) {', '.join(unknown)}")
    return cls(**values)


