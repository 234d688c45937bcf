"""Tiny synthetic instance sets: 64x64 images with bright rectangles as objects, in Penn-Fudan or COCO layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def rectangles(i: int) -> list[tuple[int, int, int, int]]:
    """One or two rectangles (x1, y1, x2, y2) per image, placed by the image index."""
    rects = [(4 + i % 5, 6, 28 + i % 5, 50)]
    if i % 2:
        rects.append((36, 10 + i % 4, 58, 40 + i % 4))
    return rects


def _image(i: int, rects) -> np.ndarray:
    rng = np.random.default_rng(i)
    a = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
    for x1, y1, x2, y2 in rects:
        a[y1:y2, x1:x2] = (230, 200 - 40 * (x1 > 30), 40)
    return a


def make_pennfudan(root: Path, n: int = 6) -> Path:
    (root / "PNGImages").mkdir(parents=True, exist_ok=True)
    (root / "PedMasks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rects = rectangles(i)
        Image.fromarray(_image(i, rects)).save(root / "PNGImages" / f"img{i:02d}.png")
        ids = np.zeros((64, 64), np.uint8)
        for k, (x1, y1, x2, y2) in enumerate(rects, start=1):
            ids[y1:y2, x1:x2] = k
        Image.fromarray(ids, "L").save(root / "PedMasks" / f"img{i:02d}_mask.png")
    return root


def make_coco(root: Path, n: int = 6, masks: str = "polygon", category_ids=(7, 3)) -> tuple[Path, Path]:
    """Images under root/images and root/annotations.json; two categories with non-contiguous ids."""
    from pycocotools import mask as mask_utils

    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        rects = rectangles(i)
        Image.fromarray(_image(i, rects)).save(root / "images" / f"im{i}.png")
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": 64, "height": 64})
        for k, (x1, y1, x2, y2) in enumerate(rects):
            ann = {
                "id": len(anns) + 1,
                "image_id": 100 + i,
                "category_id": category_ids[k],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": 0,
                "area": (x2 - x1) * (y2 - y1),
            }
            if masks == "polygon":
                ann["segmentation"] = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            elif masks == "rle":
                m = np.zeros((64, 64), np.uint8)
                m[y1:y2, x1:x2] = 1
                rle = mask_utils.encode(np.asfortranarray(m))
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            anns.append(ann)
    cats = [{"id": category_ids[0], "name": "left"}, {"id": category_ids[1], "name": "right"}]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "images", path
