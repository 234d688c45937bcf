"""Instance data in one form for every format: images with target dicts (boxes, labels, masks).

Penn-Fudan layout: ``DIR/PNGImages/NAME.png`` + ``DIR/PedMasks/NAME_mask.png``, each mask an 8-bit image of
instance ids (0 background, 1..N objects). Boxes are derived from the masks (the released annotation boxes
disagree with the masks, e.g. PennPed00027 by 6 px). An all-zero mask is a valid image with no objects.

A record keeps what is small (boxes, labels, the image's size) and reads its image and masks from their files
when a batch needs them (masks stay as their files or COCO polygons/RLE until then): memory does not grow with
the number of images.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from ..errors import UserError
from .copy_paste import paste_objects
from .images import image_size, is_image_file, load_rgb_tensor
from .transforms import detection_eval, detection_train

log = logging.getLogger("visiontune")


@dataclass
class Record:
    """One image and its objects. ``labels`` index ``classes`` + 1 (0 is background)."""

    path: str
    image: torch.Tensor | None  # uint8 (3, H, W), or None: read from ``path`` when needed
    boxes: torch.Tensor  # float32 (N, 4) x1 y1 x2 y2, pixels
    labels: torch.Tensor  # int64 (N,)
    masks: torch.Tensor | MaskSource | None  # uint8 (N, H, W), or where to make them when needed; None: boxes only
    image_id: int
    hw: tuple[int, int] | None = None  # (height, width), known without decoding the image

    @property
    def size(self) -> tuple[int, int]:
        return self.hw if self.hw is not None else (int(self.image.shape[-2]), int(self.image.shape[-1]))

    def read_image(self) -> torch.Tensor:
        return self.image if self.image is not None else load_rgb_tensor(self.path)

    def read_masks(self) -> torch.Tensor | None:
        return self.masks.read() if isinstance(self.masks, MaskSource) else self.masks


class MaskSource:
    """Where a record's masks come from: ``read()`` makes them, uint8 (N, H, W)."""

    def read(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class InstanceIdMask(MaskSource):
    """A Penn-Fudan mask file of instance ids; ``keep`` selects the objects kept (degenerate boxes dropped)."""

    path: Path
    image_size: tuple[int, int]  # (width, height)
    keep: list[bool]

    def read(self) -> torch.Tensor:
        return masks_from_ids(read_instance_mask(self.path, self.image_size))[torch.tensor(self.keep, dtype=torch.bool)]


@dataclass
class InstanceData:
    """Records plus the class names (without background) and, for COCO, the original category ids."""

    records: list[Record]
    classes: list[str]
    category_ids: list[int]
    has_masks: bool
    dropped_boxes: int = 0


def drop_degenerate(boxes: torch.Tensor) -> torch.Tensor:
    """A keep-mask for boxes with positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def warn_dropped(count: int, where: str) -> None:
    if count:
        log.warning("%s: dropped %d degenerate box(es) with zero width or height", where, count)


# --------------------------------------------------------------------------------------------- Penn-Fudan


def read_instance_mask(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """An 8-bit instance-id mask the size of its image (``image_size`` = (width, height))."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
            if mode != "L":
                kind = {
                    "P": "a palette",
                    "I;16": "a 16-bit",
                    "I;16B": "a 16-bit",
                    "I;16L": "a 16-bit",
                    "I": "a 32-bit",
                    "RGB": "an RGB",
                    "RGBA": "an RGBA",
                    "1": "a 1-bit",
                }.get(mode, f"a {mode}")
                raise UserError(f"{path}: {kind} mask; expected an 8-bit grayscale (mode L) image of instance ids 0..255")
            if size != image_size:
                raise UserError(f"{path}: mask is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}")
            return np.asarray(im, dtype=np.uint8).copy()
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable mask image ({str(e).splitlines()[0][:120]})") from None


def masks_from_ids(ids: np.ndarray) -> torch.Tensor:
    """(H, W) instance ids -> (N, H, W) uint8 binary masks, ids in increasing order."""
    t = torch.from_numpy(ids)
    obj_ids = torch.unique(t)
    obj_ids = obj_ids[obj_ids != 0]
    return (t[None] == obj_ids[:, None, None]).to(torch.uint8)


def pennfudan_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs; a mask without its image, or an image without its mask, is refused by name."""
    images_dir, masks_dir = root / "PNGImages", root / "PedMasks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise UserError(f"--data: {root}: no {d.name}/ folder (the Penn-Fudan layout is PNGImages/ + PedMasks/)")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.is_file() and is_image_file(p)}
    masks = {p.stem.removesuffix("_mask"): p for p in sorted(masks_dir.iterdir()) if p.is_file() and is_image_file(p)}
    for stem, mask in masks.items():
        if stem not in images:
            raise UserError(f"{mask}: mask without an image (expected {images_dir / (stem + '.png')})")
    for stem, image in images.items():
        if stem not in masks:
            raise UserError(f"{image}: image without a mask (expected {masks_dir / (stem + '_mask.png')})")
    if not images:
        raise UserError(f"--data: {images_dir}: no images")
    return [(images[s], masks[s]) for s in sorted(images)]


def load_pennfudan(root: str | Path, class_name: str = "object") -> InstanceData:
    """Read every image's header and mask once for the boxes (from the masks); degenerate boxes dropped with a count."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data: {root}: no such directory")
    records, dropped = [], 0
    for i, (img_path, mask_path) in enumerate(pennfudan_pairs(root)):
        w, h = image_size(img_path)
        masks = masks_from_ids(read_instance_mask(mask_path, (w, h)))
        boxes = masks_to_boxes(masks) if len(masks) else torch.zeros((0, 4))
        keep = drop_degenerate(boxes)
        dropped += int((~keep).sum())
        labels = torch.ones(int(keep.sum()), dtype=torch.int64)
        masks = InstanceIdMask(mask_path, (w, h), keep.tolist())
        records.append(Record(str(img_path), None, boxes[keep].float(), labels, masks, i + 1, (h, w)))
    warn_dropped(dropped, str(root))
    return InstanceData(records, [class_name], [1], True, dropped)


# --------------------------------------------------------------------------------------------- splits


def split_records(data: InstanceData, val_split: float | None, val_last: int | None, seed: int) -> tuple[list[Record], list[Record]]:
    """The tutorial's split (the last N images as validation), or a seeded random fraction."""
    records = data.records
    if val_last is not None:
        if val_last >= len(records):
            raise UserError(f"--val-last {val_last}: the data has only {len(records)} images")
        return records[:-val_last], records[-val_last:]
    fraction = 0.2 if val_split is None else val_split
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise UserError(f"--val-split {fraction}: leaves no training images of {len(records)}")
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]


# --------------------------------------------------------------------------------------------- dataset


class DetectionDataset(Dataset):
    """Records -> (float image in [0, 1], target dict), read when asked; training adds a flip that moves boxes and
    masks and, with ``copy_paste`` > 0, pastes another training image's objects with that probability (copy_paste.py)."""

    def __init__(self, records: list[Record], train: bool, copy_paste: float = 0.0):
        self.records = records
        self.transform = detection_train() if train else detection_eval()
        self.copy_paste = copy_paste if train else 0.0

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratio(self, i: int) -> float:
        h, w = self.records[i].size
        return w / h

    def __getitem__(self, i: int):
        r = self.records[i]
        image, boxes, labels, masks = r.read_image(), r.boxes, r.labels, r.read_masks()
        if masks is not None and self.copy_paste > 0 and len(self.records) > 1 and torch.rand(()).item() < self.copy_paste:
            other = self.records[(i + 1 + torch.randint(len(self.records) - 1, ()).item()) % len(self.records)]
            image, masks, boxes, labels = paste_objects(image, masks, labels, other.read_image(), other.read_masks(), other.labels)
        size = tuple(image.shape[-2:])
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size), "labels": labels, "image_id": r.image_id}
        if masks is not None:
            target["masks"] = tv_tensors.Mask(masks)
        image, target = self.transform(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), {
            k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()
        }


def collate(batch):
    return tuple(zip(*batch))


def grouped_batches(dataset: DetectionDataset, batch_size: int, generator: torch.Generator, chunk: int = 8) -> list[list[int]]:
    """Shuffled batches of images with similar aspect ratios, so a batch pads little (torchvision's grouping, simplified)."""
    order = torch.randperm(len(dataset), generator=generator).tolist()
    batches = []
    span = batch_size * chunk
    for start in range(0, len(order), span):
        window = sorted(order[start : start + span], key=dataset.aspect_ratio)
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]
