"""Settings as plain dataclasses, with YAML load/dump. No logic beyond validation of ranges."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .strategies import AUTO, RECIPES, STRATEGIES

HEADS = ("linear", "mlp", "logreg", "svm", "knn")
# what --patience may watch (numeric fields of log.jsonl), besides auto: the score that picks the kept model
CLASSIFY_MONITORS = ("auto", "val_accuracy", "val_balanced_accuracy", "val_mAP", "val_f1_macro", "val_loss", "train_loss", "train_accuracy")
DETECT_MONITORS = ("auto", "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75", "train_loss")
# detection recipes (tasks/detect.py fills what a run leaves unset): "default" measured in bench/detect.py --budget
DETECT_RECIPES = {
    "default": {"epochs": 24, "schedule": "cosine", "lr_step": 3, "scale_jitter": 0.3, "copy_paste": 0.0, "ema": 0.0, "anchors": "fit"},
    "tutorial": {"epochs": 10, "schedule": "step", "lr_step": 3, "scale_jitter": 0.0, "copy_paste": 0.0, "ema": 0.0, "anchors": "fixed"},
}
TTA = ("none", "flip", "flip+crops")  # test-time augmentation of classify eval/predict (inference/classify.py)
ENGINES = ("auto", "torch", "onnxruntime", "openvino", "openvino-bf16")  # what runs a frozen forward pass (engine/frozen.py)


def setting(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text (the CLI makes one flag per field)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class ClassifyConfig:
    """Everything a classification run needs; saved as RUN/config.yaml."""

    data: str = setting(
        "",
        "training images: DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* with --val-split, or an index "
        "FILE.csv/.jsonl of path,label[,split] rows (paths relative to its folder)",
    )
    out: str = setting("", "run directory to write (model, metrics, report, checkpoints)")
    val_data: str | None = setting(None, "validation class folders (or a CSV/JSONL index), when not DIR/val")
    val_split: float | None = setting(None, "hold out this fraction of each class for validation (seeded, stratified)")
    model: str = setting(
        "efficientnet_lite0",
        "backbone: efficientnet_lite0/1/2 (embedded ImageNet weights), a torchvision "
        "name (resnet18, vgg16, googlenet, mobilenet_v2, convnext_tiny, ...) or timm:NAME",
    )
    weights: str | None = setting(
        None,
        "pretrained weights file (.safetensors, or a .pth state dict); 'none' for random init "
        "(default: embedded package, then local cache, then download)",
    )
    strategy: str = setting("linear", "; ".join(f"{s.name}: {s.trains}" for s in STRATEGIES.values()) + f"; {AUTO}: chosen from the data")
    trainable_stages: int | None = setting(None, "partial: how many of the last stages train (default: the last third)")
    freeze_until: str | None = setting(None, "partial: freeze every stage up to and including this one (e.g. blocks.3, layer2)")
    head: str = setting(
        "linear", "new classifier: linear, mlp (trained), or logreg, svm, knn (scikit-learn on cached features; --strategy linear)"
    )
    recipe: str = setting(
        "default", "default (ours), or tutorial (PyTorch's exactly: batch 4, SGD 1e-3 momentum 0.9, StepLR(7, 0.1), 25 epochs)"
    )
    epochs: int | None = setting(None, "epochs (default: the recipe's; for linear, passes over the cached features)")
    batch_size: int | None = setting(
        None,
        "the global batch: under torchrun each of N processes takes batch-size/N images per "
        "step (it must divide evenly), so a run learns the same on 1 process or N "
        "(default: the recipe's)",
    )
    lr: float | None = setting(None, "learning rate of the head; the base's is a fraction of it (default: the recipe's)")
    weight_decay: float | None = setting(None, "weight decay (default: the recipe's)")
    wise_alpha: float | None = setting(
        None,
        "full/staged/partial: the model evaluated and kept is alpha * fine-tuned + (1 - alpha) * "
        "pretrained base weights (WiSE-FT); 1 keeps the fine-tuned weights (default: the recipe's, 0.5 for "
        "full, else 1)",
    )
    class_weights: str = setting(
        "none",
        "loss weight per class: none, auto (inverse class frequency) or a JSON file of {class: weight}; for "
        "imbalanced classes (the scikit-learn heads weigh their samples the same way)",
    )
    labels: str | None = setting(
        None,
        "multi-label: a CSV or JSONL file of path,labels rows (paths relative to --data, labels separated by spaces, "
        "an optional split column; fastai's image_name,tags also reads)",
    )
    threshold: str = setting(
        "auto",
        "multi-label: the probability at which a label is predicted: auto (per class, where F1 on the validation "
        "images is best; kept in the model file) or a number between 0 and 1",
    )
    sampler: str = setting(
        "shuffle",
        "shuffle: every training image once per epoch; balanced: each epoch draws as many images with replacement, "
        "every class equally likely (imbalanced classes)",
    )
    image_size: int | None = setting(None, "training crop size in pixels (default: the backbone's, e.g. 224)")
    views: int | None = setting(None, "augmented views per image in the feature cache (default: the recipe's; 1 from 5,000 images)")
    workers: int | None = setting(
        None,
        "DataLoader worker processes that read and augment images (default: one per core when images are read from disk, "
        "0 when they are held in RAM)",
    )
    cache_images: str = setting(
        "auto",
        "ram: decode every image once and hold it (fast epochs; memory grows with the images); disk: decode once into "
        "the image cache in --cache-dir and read pixels from there (later epochs and runs skip decoding; flat memory; "
        "at most 20 GiB, $VISIONTUNE_IMAGE_CACHE_GB); none: decode each image from its file when needed (flat memory); "
        "auto: ram while the decoded images fit 1 GiB (~4,000 photos), else disk where they fit, else none",
    )
    seed: int = setting(0, "random seed: the same seed gives the same run")
    device: str = setting("auto", "auto, cpu, cuda or mps")
    precision: str = setting("auto", "auto (bf16 autocast where the hardware computes bf16 natively, else fp32), bf16 or fp32")
    engine: str = setting(
        "auto",
        "what runs the frozen base's forward pass (features for linear, staged's head phase, compare): torch, "
        "onnxruntime, openvino, openvino-bf16 (CPU; features change slightly), or auto: the fastest engine in "
        "--precision (bf16 ones only where it gives bf16) measured on this machine for this model (timed once, remembered)",
    )
    skip_bad: bool = setting(False, "skip unreadable images (counted in metrics.json) instead of stopping")
    cache_dir: str | None = setting(
        None, "feature cache folder; 'none' turns it off (default: $VISIONTUNE_CACHE or ~/.cache/visiontune/features)"
    )
    patience: int = setting(0, "stop after N epochs without a better --monitor value; 0: train every epoch")
    monitor: str = setting(
        "auto",
        f"what --patience watches: auto (the score that picks the kept model, val_accuracy), or {', '.join(CLASSIFY_MONITORS[2:])} "
        "(lower is better for losses)",
    )
    checkpoint_every: int = setting(0, "also save the resumable checkpoint every N steps (0: after each epoch only)")
    quiet: bool = setting(False, "no progress bars or per-epoch lines")
    tensorboard: bool = setting(False, "also log scalars for TensorBoard in RUN/tensorboard (needs the tensorboard package)")
    overwrite: bool = setting(False, "replace an existing run directory")
    sync_bn: bool = setting(False, "under torchrun on CUDA: trainable BatchNorm layers use statistics of the global batch")

    def validate(self) -> ClassifyConfig:
        _check_choice("--strategy", self.strategy, (*STRATEGIES, AUTO))
        _check_choice("--recipe", self.recipe, RECIPES)
        _check_choice("--head", self.head, HEADS)
        _check_range("--epochs", self.epochs, 1, 10_000)
        _check_range("--batch-size", self.batch_size, 1, 4096)
        _check_range("--lr", self.lr, 1e-8, 10.0)
        _check_range("--weight-decay", self.weight_decay, 0.0, 1.0)
        _check_choice("--sampler", self.sampler, ("shuffle", "balanced"))
        if self.threshold != "auto" and not _is_probability(self.threshold):
            raise UserError(f"--threshold: auto or a number between 0 and 1, got {self.threshold!r}")
        _check_range("--image-size", self.image_size, 32, 2048)
        if self.wise_alpha is not None and not 0.0 < self.wise_alpha <= 1.0:
            raise UserError(f"--wise-alpha: must be in (0, 1], got {self.wise_alpha}")
        _check_range("--views", self.views, 1, 100)
        _check_range("--workers", self.workers, 0, 64)
        _check_choice("--cache-images", self.cache_images, ("auto", "ram", "disk", "none"))
        _check_choice("--precision", self.precision, ("auto", "bf16", "fp32"))
        _check_choice("--engine", self.engine, ENGINES)
        _check_range("--trainable-stages", self.trainable_stages, 0, 1000)
        _check_range("--checkpoint-every", self.checkpoint_every, 0, 10**9)
        _check_range("--patience", self.patience, 0, 10_000)
        _check_choice("--monitor", self.monitor, CLASSIFY_MONITORS)
        if self.val_split is not None and not 0.0 < self.val_split < 1.0:
            raise UserError(f"--val-split: must be between 0 and 1 (exclusive), got {self.val_split}")
        return self


@dataclass
class DetectConfig:
    """Everything a detection / instance segmentation run needs; saved as RUN/config.yaml."""

    data: str = setting("", "Penn-Fudan layout (PNGImages/ + PedMasks/), or the image root for --format coco")
    out: str = setting("", "run directory to write (model, metrics, report, checkpoints)")
    format: str = setting("pennfudan", "pennfudan or coco")
    annotations: str | None = setting(None, "COCO JSON (polygons, RLE or boxes only) for --format coco")
    val_data: str | None = setting(None, "validation image root (or Penn-Fudan folder)")
    val_annotations: str | None = setting(None, "COCO JSON of --val-data")
    val_split: float | None = setting(None, "hold out this fraction of the images for validation (seeded)")
    val_last: int | None = setting(None, "hold out the last N images for validation (the tutorial: 50)")
    model: str = setting(
        "maskrcnn",
        "maskrcnn or fasterrcnn on --backbone, or a torchvision COCO model: maskrcnn_resnet50_fpn(_v2), "
        "fasterrcnn_resnet50_fpn(_v2), fasterrcnn_mobilenet_v3_large_fpn",
    )
    backbone: str | None = setting(None, "classification backbone of the registry for maskrcnn/fasterrcnn (default: efficientnet_lite0)")
    neck: str = setting("fpn", "with --backbone: fpn (strides 8-32) or none (its last feature map, as the tutorial's mobilenet_v2)")
    weights: str | None = setting(None, "COCO weights file for a torchvision detection model (default: local cache, then download)")
    backbone_weights: str | None = setting(None, "ImageNet weights file for --backbone; 'none' for random init")
    trainable_backbone_layers: int | None = setting(None, "torchvision models: how many backbone stages train (0-5)")
    min_size: int = setting(320, "shorter image side the model resizes to")
    max_size: int = setting(512, "longest image side the model allows")
    recipe: str = setting(
        "default",
        "default (cosine schedule, multi-scale training, 24 epochs: measured on Penn-Fudan without COCO weights) or "
        "tutorial (the detection tutorial's: StepLR every 3 epochs, flips only, 10 epochs); explicit settings win",
    )
    epochs: int | None = setting(None, "passes over the training images (default: the recipe's)")
    time_budget: float | None = setting(
        None,
        "minutes to train and validate in: after each epoch, the number of epochs is lowered to what fits "
        "(the schedule then ends in time); --epochs stays the most it trains",
    )
    batch_size: int = setting(2, "images per step (global under torchrun, split across processes)")
    lr: float = setting(0.005, "SGD learning rate (warm-up in the first epoch)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "weight decay")
    lr_step: int | None = setting(None, "--schedule step: divide the learning rate by 10 every N epochs (default: the recipe's)")
    schedule: str | None = setting(
        None,
        "step (the tutorial's: warm-up in the first epoch, then /10 every --lr-step epochs) or cosine (the same "
        "warm-up, then a cosine decay to 0 at the last epoch); default: the recipe's",
    )
    scale_jitter: float | None = setting(
        None,
        "multi-scale training: each batch resized to --min-size (and --max-size) times one of seven factors in "
        "[1 - J, 1 + J]; evaluation stays at --min-size (0: off; default: the recipe's)",
    )
    copy_paste: float | None = setting(None, "chance to paste objects cut from another training image (needs masks; default: the recipe's)")
    ema: float | None = setting(None, "a weight average (decay per step, e.g. 0.995) is validated and kept (0: off; default: the recipe's)")
    anchors: str | None = setting(None, "RPN anchors: fit (the training boxes' shapes, 2 sizes an octave) or fixed; default: the recipe's")
    clip_grad: float = setting(5.0, "clip the gradient norm to this (0: off); heads that start from scratch need it")
    precision: str = setting(
        "auto",
        "training forward passes: auto (bf16 autocast where the hardware computes bf16 natively, "
        "else fp32), bf16 or fp32; evaluation runs in fp32",
    )
    rois_per_image: int = setting(512, "region proposals sampled per image to train the box and mask heads (torchvision's, the tutorial's)")
    workers: int | None = setting(None, "DataLoader worker processes (default: 0)")
    seed: int = setting(0, "random seed")
    device: str = setting("auto", "auto, cpu, cuda or mps")
    quiet: bool = setting(False, "no progress bars or per-epoch lines")
    overwrite: bool = setting(False, "replace an existing run directory")
    val_every: int = setting(1, "validate after the first epoch, every N-th and the last; the kept model is the best validated")
    patience: int = setting(0, "stop after N epochs without a better --monitor value; 0: train every epoch")
    monitor: str = setting(
        "auto",
        f"what --patience watches: auto (the score that picks the kept model: segm_AP, or bbox_AP without masks), or "
        f"{', '.join(DETECT_MONITORS[1:])} (lower is better for losses)",
    )
    checkpoint_every: int = setting(0, "also save the resumable checkpoint every N steps (0: after each epoch only)")
    tensorboard: bool = setting(False, "also log scalars for TensorBoard in RUN/tensorboard (needs the tensorboard package)")
    sync_bn: bool = setting(False, "under torchrun on CUDA: trainable BatchNorm layers use statistics of the global batch")

    def validate(self) -> DetectConfig:
        _check_choice("--format", self.format, ("pennfudan", "coco"))
        _check_choice("--neck", self.neck, ("fpn", "none"))
        _check_range("--epochs", self.epochs, 1, 10_000)
        _check_range("--batch-size", self.batch_size, 1, 256)
        _check_range("--lr", self.lr, 1e-8, 10.0)
        _check_range("--min-size", self.min_size, 32, 4096)
        _check_range("--max-size", self.max_size, 32, 8192)
        _check_range("--val-last", self.val_last, 1, 10**7)
        _check_range("--rois-per-image", self.rois_per_image, 1, 4096)
        _check_range("--patience", self.patience, 0, 10_000)
        _check_range("--val-every", self.val_every, 1, 10_000)
        _check_choice("--recipe", self.recipe, tuple(DETECT_RECIPES))
        _check_range("--time-budget", self.time_budget, 1e-3, 10**6)
        if self.schedule is not None:
            _check_choice("--schedule", self.schedule, ("step", "cosine"))
        _check_range("--lr-step", self.lr_step, 1, 10_000)
        _check_range("--copy-paste", self.copy_paste, 0.0, 1.0)
        _check_range("--ema", self.ema, 0.0, 0.99999)
        _check_choice("--anchors", self.anchors or "fit", ("fit", "fixed"))
        if self.scale_jitter is not None and not 0.0 <= self.scale_jitter < 1.0:
            raise UserError(f"--scale-jitter: must be in [0, 1), got {self.scale_jitter}")
        _check_choice("--monitor", self.monitor, DETECT_MONITORS)
        _check_choice("--precision", self.precision, ("auto", "bf16", "fp32"))
        if self.max_size < self.min_size:
            raise UserError(f"--max-size ({self.max_size}) must be at least --min-size ({self.min_size})")
        if self.val_split is not None and not 0.0 < self.val_split < 1.0:
            raise UserError(f"--val-split: must be between 0 and 1 (exclusive), got {self.val_split}")
        return self


def _is_probability(text: str) -> bool:
    try:
        return 0.0 < float(text) < 1.0
    except ValueError:
        return False


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        what = flag.lstrip("-").replace("-", " ")
        raise UserError(f"{flag}: unknown {what} {value!r}; choose {', '.join(choices[:-1])} or {choices[-1]}")


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
    if p.is_dir():
        raise UserError(f"--config: {p}: is a directory, expected a YAML file")
    if not p.is_file():
        raise UserError(f"--config: {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config: {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config: {p}: cannot read it as YAML text ({getattr(e, 'strerror', None) or type(e).__name__})") from None
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


def checked_types(values: dict, cls, source: str) -> dict:
    """YAML gives any type: a setting must have its field's (int, float, bool or text; null where optional)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        t = types.get(k)
        if t is None:
            close = difflib.get_close_matches(k, types, n=1)
            raise UserError(f"--config {source}: unknown setting {k!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        base = t.replace(" | None", "")
        ok = (
            (v is None and t.endswith("| None"))
            or (base == "bool" and isinstance(v, bool))
            or (base == "int" and isinstance(v, int) and not isinstance(v, bool))
            or (base == "float" and isinstance(v, (int, float)) and not isinstance(v, bool))
            or (base == "str" and isinstance(v, (str, int, float)) and not isinstance(v, bool))
        )
        if not ok:
            want = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}.get(base, base)
            raise UserError(f"--config {source}: {k}: expected {want}, got {v!r}")
        out[k] = str(v) if base == "str" and v is not None else float(v) if base == "float" and v is not None else v
    return out
