"""COCO JSON -> decoded records; and records -> a pycocotools COCO object for evaluation.

Annotations may carry polygons or RLE (then masks are trained) or boxes only (then detection only).
Category ids may be anything: they are remapped to 1..K in increasing id order, names kept. The image root is a
folder (every ``file_name`` must stay inside it) or ``.tar`` shards that hold the images as members. Crowd annotations
are left out of training, as torchvision's reference scripts do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..errors import UserError
from .images import image_size
from .instance import InstanceData, MaskSource, Record, drop_degenerate, warn_dropped
from .shards import is_shards, shard_files
from .tar_members import find_members

log = logging.getLogger("visiontune")


def read_coco_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--annotations: {p}: no such file")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{p}: expected a COCO object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise UserError(f"{p}: missing required key {key!r} (a list)")
    _require(p, doc["images"], "images", ("id", "file_name"))
    _require(p, doc["annotations"], "annotations", ("image_id", "category_id", "bbox"))
    _require(p, doc["categories"], "categories", ("id", "name"))
    return doc


def _require(path: Path, items: list, what: str, keys: tuple[str, ...]) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path}: {what}[{i}] is not an object")
        missing = [k for k in keys if k not in item]
        if missing:
            raise UserError(f"{path}: {what}[{i}] is missing required key(s) {', '.join(missing)}")


def safe_image_path(root: Path, file_name: str, json_path: Path) -> Path:
    """``root/file_name``, refused when it escapes the root (``../``, absolute paths, links out)."""
    candidate = (root / file_name).resolve()
    if Path(file_name).is_absolute() or not candidate.is_relative_to(root.resolve()):
        raise UserError(f"{json_path}: file_name {file_name!r} escapes the image root {root}; refused")
    return candidate


def image_paths(image_root: str | Path, file_names: list[str], json_path: Path) -> list[Path]:
    """Each ``file_name``'s image: a file under the image root folder, or a member of the ``.tar`` shards the root names
    (``--data 'images-{000..099}.tar'``: members read at their offsets, as for classification shards)."""
    if not is_shards(image_root):
        paths = [safe_image_path(Path(image_root), name, json_path) for name in file_names]
        for path, name in zip(paths, file_names):
            if not path.is_file():
                raise UserError(f"{path}: image not found (file_name {name!r} in {json_path})")
        return paths
    names = [str(PurePosixPath(name)) for name in file_names]  # as the shard lists it: no "./"
    found = find_members(shard_files(image_root, "--data"), names)
    for path, name in zip(found, file_names):
        if path is None:
            raise UserError(f"{json_path}: file_name {name!r} is not a member of the shards {image_root}")
    return found


def segmentation_mask(seg, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE -> (H, W) uint8."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
    return mask_utils.decode(rle)


@dataclass
class CocoMasks(MaskSource):
    """One image's masks as its annotations give them (polygons or RLE), decoded when read."""

    segmentations: list
    height: int
    width: int

    def read(self) -> torch.Tensor:
        if not self.segmentations:
            return torch.zeros((0, self.height, self.width), dtype=torch.uint8)
        return torch.from_numpy(np.stack([segmentation_mask(s, self.height, self.width) for s in self.segmentations]))


def load_coco(image_root: str | Path, annotations: str | Path) -> InstanceData:
    """Each image's header (its size checked against the JSON) and its annotations; masks when every annotation has a
    segmentation, kept as the JSON gives them until read."""
    root, json_path = Path(image_root), Path(annotations)
    if not is_shards(image_root) and not root.is_dir():
        raise UserError(f"--data: {root}: no such directory")
    doc = read_coco_json(json_path)
    paths = image_paths(image_root, [str(im["file_name"]) for im in doc["images"]], json_path)
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    if len({c["id"] for c in cats}) != len(cats):
        raise UserError(f"{json_path}: duplicate category ids")
    label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
    if [c["id"] for c in cats] != list(range(1, len(cats) + 1)):
        log.info("%s: category ids %s remapped to labels 1..%d (names kept)", json_path, [c["id"] for c in cats], len(cats))
    anns = [a for a in doc["annotations"] if not a.get("iscrowd", 0)]
    with_seg = sum(1 for a in anns if a.get("segmentation"))
    if 0 < with_seg < len(anns):
        example = next(a for a in anns if not a.get("segmentation"))
        raise UserError(
            f"{json_path}: {with_seg} of {len(anns)} annotations have a segmentation, annotation "
            f"{example.get('id', '?')} has none; give all of them masks, or none (boxes only)"
        )
    has_masks = with_seg > 0
    by_image: dict = {}
    image_ids = {im["id"] for im in doc["images"]}
    for a in anns:
        if a["image_id"] not in image_ids:
            raise UserError(f"{json_path}: annotation {a.get('id', '?')} refers to image_id {a['image_id']}, which is not in images")
        if a["category_id"] not in label_of:
            raise UserError(f"{json_path}: annotation {a.get('id', '?')} has category_id {a['category_id']}, which is not in categories")
        by_image.setdefault(a["image_id"], []).append(a)

    records, dropped = [], 0
    for index, (im, path) in enumerate(zip(doc["images"], paths)):
        w, h = image_size(path)
        if ("width" in im and im["width"] != w) or ("height" in im and im["height"] != h):
            raise UserError(f"{path}: image is {w}x{h} but {json_path} says {im.get('width')}x{im.get('height')}")
        boxes, labels, segmentations = [], [], []
        for a in by_image.get(im["id"], []):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes.append([x, y, x + bw, y + bh])
            labels.append(label_of[a["category_id"]])
            segmentations.append(a.get("segmentation"))
        box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        keep = drop_degenerate(box_t)
        dropped += int((~keep).sum())
        masks = CocoMasks([s for s, k in zip(segmentations, keep.tolist()) if k], h, w) if has_masks else None
        labels_t = torch.tensor(labels, dtype=torch.int64).reshape(-1)[keep]
        records.append(Record(str(path), None, box_t[keep], labels_t, masks, index + 1, (h, w)))
    if not records:
        raise UserError(f"{json_path}: no images")
    warn_dropped(dropped, str(json_path))
    return InstanceData(records, [str(c["name"]) for c in cats], [int(c["id"]) for c in cats], has_masks, dropped)


def to_coco_api(records: list[Record], classes: list[str]):
    """Ground truth as a pycocotools COCO object (labels as category ids; masks as RLE)."""
    from pycocotools.coco import COCO

    images, annotations = [], []
    for r in records:
        h, w = r.size
        masks = r.read_masks()
        images.append({"id": r.image_id, "height": h, "width": w, "file_name": Path(r.path).name})
        for j in range(len(r.boxes)):
            x1, y1, x2, y2 = r.boxes[j].tolist()
            ann = {
                "id": len(annotations) + 1,
                "image_id": r.image_id,
                "category_id": int(r.labels[j]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            }
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[j].numpy()))
                ann["segmentation"] = rle
                ann["area"] = float(mask_utils.area(rle))
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}
    coco.createIndex()
    return coco
