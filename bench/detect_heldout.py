"""The detection recipes on a split nobody tuned on; prints one JSON object.

Every recipe experiment (bench/detect.py) validates on Penn-Fudan's last 50 images. Here the first 50 are the
validation set and the other 120 train, written out as a COCO-format set (RLE masks, xywh boxes; the image
files stay where they are), so the run also goes through ``--format coco``. Each recipe of --recipes trains for
--budget minutes (--time-budget) per seed, and the JSON holds the last epoch's AP and the kept (best) model's,
also without box voting and then without mask-quality scores too (torchvision's boxes and scores).

    python bench/detect_heldout.py --budget 10 --seeds 0          # default against tutorial: ~25 minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from detect import postprocess_ablation  # bench/detect.py
from PIL import Image
from pycocotools import mask as mask_utils

from visiontune.config import DetectConfig
from visiontune.tasks.detect import fit

REPO = Path(__file__).resolve().parents[1]
AP_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")


def coco_split(root: Path, names: list[str], out: Path) -> Path:
    """A COCO JSON of Penn-Fudan images ``names`` (one annotation per instance id of each mask)."""
    images, annotations = [], []
    for image_id, name in enumerate(names, start=1):
        ids = np.array(Image.open(root / "PedMasks" / f"{name}_mask.png"))
        images.append({"id": image_id, "file_name": f"{name}.png", "height": ids.shape[0], "width": ids.shape[1]})
        for i in np.unique(ids)[1:]:
            rle = mask_utils.encode(np.asfortranarray((ids == i).astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "bbox": [x, y, w, h],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                }
            )
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "PennFudanPed"))
    ap.add_argument("--val-first", type=int, default=50, help="the first N images validate; the rest train")
    ap.add_argument("--budget", type=float, default=10.0, help="minutes per run (--time-budget)")
    ap.add_argument("--recipes", default="default,tutorial")
    ap.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--anchors", help="RPN anchors: fit or fixed (default: the recipe's)")
    args = ap.parse_args()
    root = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="vt-bench-heldout-"))
    names = sorted(p.stem for p in (root / "PNGImages").glob("*.png"))
    train_json = coco_split(root, names[args.val_first :], work / "train.json")
    val_json = coco_split(root, names[: args.val_first], work / "val.json")
    result = {
        "benchmark": "detect_heldout",
        "budget_minutes": args.budget,
        "val_images": args.val_first,
        "anchors": args.anchors,
        "recipes": {},
    }
    for recipe in args.recipes.split(","):
        runs = []
        for seed in args.seeds:
            run = work / f"{recipe}-{seed}"
            cfg = DetectConfig(
                data=str(root / "PNGImages"),
                annotations=str(train_json),
                val_data=str(root / "PNGImages"),
                val_annotations=str(val_json),
                format="coco",
                out=str(run),
                recipe=recipe,
                epochs=None if recipe == "default" else 1000,  # the tutorial's schedule as long as the budget allows
                time_budget=args.budget,
                anchors=args.anchors,
                seed=seed,
                quiet=True,
            )
            metrics = fit(cfg)
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            runs.append(
                {
                    "seed": seed,
                    "epochs": metrics["epochs"],
                    "best_epoch": metrics["best_epoch"],
                    "last": {k: round(log[-1][k], 4) for k in AP_KEYS},
                    "kept": {k: round(metrics[k], 4) for k in AP_KEYS},
                    **{f"kept_{k}": v for k, v in postprocess_ablation(run, cfg).items()},  # the same weights, plainer
                    "seconds": round(log[-1]["elapsed_seconds"], 1),
                }
            )
            print(json.dumps({"recipe": recipe, **runs[-1]}), file=sys.stderr, flush=True)
        result["recipes"][recipe] = runs
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
