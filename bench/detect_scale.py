"""Does detection's memory stay flat as the image count grows? Prints one JSON object.

    python bench/detect_scale.py                    # N = 500 and 5,000 training images
    python bench/detect_scale.py --sizes 500,2000

For each N it builds (once, kept in --work) a COCO-format set: each image is a photo from hymenoptera (resized to
480-640 px on the long side) with 1-3 Penn-Fudan pedestrians pasted in, cut out by their masks and rescaled; the
annotations are the pasted masks as RLE, with their boxes. Validation: 100 images for every N, built the same way
from hymenoptera's val photos and Penn-Fudan's last 50 pedestrians' images, so no photo is shared with training.

Then, in its own process per N (sampled every 0.2 s: RSS and PSS of the process tree), what grows with N in a
`visiontune detect train --format coco` run: reading the annotations and setting up (the default Mask R-CNN on
the embedded EfficientNet-Lite0), one full pass of the training DataLoader (every image and its masks decoded and
transformed, as an epoch does, without the model), ``--steps`` training steps, and the COCO evaluation of the val
set. A whole training epoch over 5,000 images takes hours on 2 cores and holds nothing the steps above do not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import measured  # noqa: E402 - the same process-tree sampler as bench/scale.py

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
VAL_IMAGES = 100  # the same for every N: what grows is the training set (evaluation holds every val prediction)


def pedestrians(names: list[str]) -> list:
    """(RGBA cut-out of each pedestrian) from Penn-Fudan images named in ``names``."""
    import numpy as np
    from PIL import Image

    root = SHARED / "PennFudanPed"
    cutouts = []
    for name in names:
        image = np.array(Image.open(root / "PNGImages" / name).convert("RGB"))
        ids = np.array(Image.open(root / "PedMasks" / name.replace(".png", "_mask.png")))
        for i in np.unique(ids)[1:]:
            ys, xs = np.nonzero(ids == i)
            crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            alpha = ((ids[crop] == i) * 255).astype(np.uint8)
            cutouts.append(Image.fromarray(np.dstack([image[crop], alpha]), "RGBA"))
    return cutouts


def build_split(folder: Path, n: int, photos: list[Path], people: list, seed: int) -> Path:
    """``n`` images with pasted pedestrians into ``folder``; returns its COCO JSON."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(n):
        bg = Image.open(rng.choice(photos)).convert("RGB")
        scale = rng.randint(480, 640) / max(bg.size)
        bg = bg.resize((max(64, round(bg.width * scale)), max(64, round(bg.height * scale))))
        for _ in range(rng.randint(1, 3)):
            person = rng.choice(people)
            h = rng.randint(bg.height // 3, int(bg.height * 0.9))
            w = max(8, round(person.width * h / person.height))
            if w >= bg.width:
                continue
            person = person.resize((w, h))
            x, y = rng.randint(0, bg.width - w), rng.randint(0, bg.height - h)
            bg.paste(person, (x, y), person)
            mask = np.zeros((bg.height, bg.width), np.uint8, order="F")
            mask[y : y + h, x : x + w] = np.array(person.getchannel("A")) > 127
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode()
            box = [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k + 1,
                    "category_id": 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
        bg.save(folder / f"{k:06d}.jpg", quality=90)
        images.append({"id": k + 1, "file_name": f"{k:06d}.jpg", "width": bg.width, "height": bg.height})
    doc = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    (folder / "annotations.json").write_text(json.dumps(doc))
    return folder / "annotations.json"


def build_set(root: Path, n: int) -> Path:
    if (root / "val" / "annotations.json").is_file() and len(
        json.loads((root / "val" / "annotations.json").read_text())["images"]
    ) == VAL_IMAGES:
        return root
    hym = SHARED / "hymenoptera_data"
    train_photos = sorted((hym / "train").rglob("*.jpg"))
    val_photos = sorted((hym / "val").rglob("*.jpg"))
    names = sorted(p.name for p in (SHARED / "PennFudanPed" / "PNGImages").glob("*.png"))
    build_split(root / "train", n, train_photos, pedestrians(names[:-50]), seed=n)
    build_split(root / "val", VAL_IMAGES, val_photos, pedestrians(names[-50:]), seed=1)
    return root


def run_child(data: str, steps: int) -> dict:
    import torch

    from visiontune.config import DetectConfig
    from visiontune.engine.runtime import seed_everything
    from visiontune.metrics.coco import evaluate_model
    from visiontune.tasks.detect import DetectTask

    seed_everything(0)
    cfg = DetectConfig(
        data=f"{data}/train",
        format="coco",
        annotations=f"{data}/train/annotations.json",
        val_data=f"{data}/val",
        val_annotations=f"{data}/val/annotations.json",
        workers=2,
        quiet=True,
    )
    task = DetectTask(cfg)
    start = time.perf_counter()
    task.setup(torch.device("cpu"), bf16=False, progress=False)
    timings = {"setup_seconds": round(time.perf_counter() - start, 1)}
    start, images = time.perf_counter(), 0
    for batch_images, _ in task.epoch_loader(0):  # every training image and its masks, as an epoch reads them
        images += len(batch_images)
    timings["data_pass_seconds"], timings["data_pass_images"] = round(time.perf_counter() - start, 1), images
    model = task.model.train()
    optimizer, _, _ = task.optimizer(0)
    start = time.perf_counter()
    for i, batch in enumerate(task.epoch_loader(1)):
        if i == steps:
            break
        loss, _, _ = task.forward(model, batch, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    timings["train_steps_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    metrics, _ = evaluate_model(model.eval(), task.val_records, task.data.classes, task.has_masks, torch.device("cpu"))
    timings["evaluate_seconds"] = round(time.perf_counter() - start, 1)
    return {**timings, "train_images": len(task.train_records), "val_images": len(task.val_records), "segm_AP50": metrics.get("segm_AP50")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,5000")
    ap.add_argument("--steps", type=int, default=20, help="training steps per N (batch 2)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "visiontune-detect-scale"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps)))
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), VISIONTUNE_OFFLINE="1")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        data = build_set(Path(args.work) / f"set-{n}", n)
        print(f"set of {n} images ready in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        row = {"n": n, **measured([sys.executable, __file__, "--child", str(data), "--steps", str(args.steps)], env)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ok = [r for r in rows if "error" not in r]
    ratio = {k: round(ok[-1][k] / ok[0][k], 2) for k in ("peak_rss_mb", "peak_pss_mb")} if len(ok) > 1 else None
    print(json.dumps({"cpu_count": os.cpu_count(), "rows": rows, "largest_vs_smallest": ratio}, indent=1))


if __name__ == "__main__":
    main()
