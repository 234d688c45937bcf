"""Detection data by ``--format``: Penn-Fudan folders or COCO JSON, split into training and validation records."""

from __future__ import annotations

from ..config import DetectConfig
from ..errors import UserError
from .coco import load_coco
from .instance import InstanceData, Record, load_pennfudan, split_records

FORMATS = ("pennfudan", "coco")


def load_instances(fmt: str, data: str, annotations: str | None, what: str = "--data") -> InstanceData:
    if fmt == "pennfudan":
        return load_pennfudan(data)
    if fmt == "coco":
        if not annotations:
            raise UserError(f"{what} {data}: --format coco needs the annotations file (--annotations FILE.json)")
        return load_coco(data, annotations)
    raise UserError(f"--format: unknown format {fmt!r}; choose {' or '.join(FORMATS)}")


def load_splits(cfg: DetectConfig) -> tuple[list[Record], list[Record], InstanceData]:
    """Training and validation records: --val-data, else a split of --data (--val-split or --val-last)."""
    data = load_instances(cfg.format, cfg.data, cfg.annotations)
    if cfg.val_data:
        val = load_instances(cfg.format, cfg.val_data, cfg.val_annotations, "--val-data")
        if val.classes != data.classes:
            raise UserError(f"--val-data: classes {val.classes} differ from the training data's {data.classes}")
        return data.records, val.records, data
    train, val = split_records(data, cfg.val_split, cfg.val_last, cfg.seed)
    return train, val, data
