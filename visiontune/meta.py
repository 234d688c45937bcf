"""What a model file says about itself: a typed, versioned record kept as JSON in the safetensors header.

``ClassifierMeta`` and ``DetectorMeta`` are written by training and read by eval, predict, export and the report.
``read_meta`` also reads the files of earlier versions (version 1: the same keys as a plain dict, no version).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import UserError

META_VERSION = 2


@dataclass
class ModelMeta:
    """What every model file records."""

    task: ClassVar[str] = ""
    model: str = ""
    classes: list[str] = field(default_factory=list)
    pretrained: str = "none"  # where the starting weights came from
    metrics: dict[str, Any] = field(default_factory=dict)  # the validation metrics of the epoch kept
    epoch: int | None = None  # the epoch kept (1-based)
    meta_version: int = META_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **dataclasses.asdict(self)}


@dataclass
class EvalPreprocessing:
    """How a classifier's input is made: resize the shorter side, center-crop, normalize."""

    mean: list[float]
    std: list[float]
    input_size: int
    resize_size: int


@dataclass
class ClassifierMeta(ModelMeta):
    task: ClassVar[str] = "classification"
    head: str = "linear"
    num_features: int | None = None
    bank_size: int = 1  # kNN head: the stored features
    strategy: str | None = None
    recipe: str | None = None
    preprocessing: EvalPreprocessing | None = None
    advice: dict[str, Any] | None = None  # --strategy auto: the measurements and the reason
    multi_label: bool = False  # a sigmoid per class: every label at or above its threshold is predicted
    thresholds: list[float] | None = None  # multi-label: per class


@dataclass
class DetectorMeta(ModelMeta):
    task: ClassVar[str] = "detection"
    backbone: str | None = None
    neck: str = "fpn"
    category_ids: list[int] = field(default_factory=list)  # the data's category id of each class
    masks: bool = True
    data_format: str = "pennfudan"
    min_size: int = 320
    max_size: int = 512
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # files from before fitted anchors: these
    anchors_per_octave: int = 1
    mask_quality_scores: bool = False  # files from before scored detections by their boxes alone
    box_voting: bool = False  # and kept torchvision's boxes


KINDS: dict[str, type[ModelMeta]] = {m.task: m for m in (ClassifierMeta, DetectorMeta)}
REQUIRED = {"classification": ("model", "classes", "head", "preprocessing"), "detection": ("model", "classes", "min_size", "max_size")}


def read_meta(record: dict[str, Any], source: object) -> ClassifierMeta | DetectorMeta:
    """The typed record of a model file's metadata; keys of other versions are ignored, missing ones named."""
    task = record.get("task")
    if task not in KINDS:
        raise UserError(f"{source}: not a visiontune model (task: {task})")
    missing = [k for k in REQUIRED[task] if k not in record]
    if missing:
        raise UserError(f"{source}: the model file's metadata lacks {', '.join(missing)}; it was not written by visiontune")
    cls = KINDS[task]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in names}
    if task == "classification":
        values["preprocessing"] = EvalPreprocessing(**{k: record["preprocessing"][k] for k in ("mean", "std", "input_size", "resize_size")})
    return cls(**values)
