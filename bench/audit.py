"""`visiontune classify audit` on planted faults, and the measurements behind its duplicate threshold (one JSON object).

1. ``threshold``: the features (``--model``, default the embedded EfficientNet-Lite0) of every train and val image.
   For distinct images, each one's nearest-neighbour cosine among all the others; for copies, the cosine between a val
   image and an altered copy of it (exact copy; JPEG re-saved at quality 75 and resized 0.8x; quality 50 at 0.5x; a
   90 % centre crop; a mirror).
2. ``planted``: in a temporary copy of the dataset, the labels of ``--flips`` training images flipped (moved to the
   other class folder) and ``--copies`` val images copied into train (the originals stay in val), chosen with
   ``--seed``; then the audit three times: ``first`` on a cold cache (the engine probe and the ONNX graph included),
   ``new_images`` with the probe and graph kept but no features, ``again`` with the features from the cache.
   Reported: how many flipped images are among the ``--top`` lowest given-label probabilities of train (and flagged
   suspect), how many copies come back as train-val pairs, and how many other pairs are reported.

    python bench/audit.py [--data ../shared/datasets/hymenoptera_data] [--seed 0] [--flips 10] [--copies 5] [--top 20] [--model M]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visiontune.audit import audit, image_features, nearest  # noqa: E402
from visiontune.data.splits import Samples, find_splits  # noqa: E402
from visiontune.engine.frozen import frozen_forward  # noqa: E402
from visiontune.models.backbones import build_backbone  # noqa: E402

VARIANTS = {
    "exact copy": lambda im: im,
    "jpeg q75, 0.8x": lambda im: (im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.BICUBIC), 75),
    "jpeg q50, 0.5x": lambda im: (im.resize((round(im.width * 0.5), round(im.height * 0.5)), Image.BICUBIC), 50),
    "centre crop 90%": lambda im: ImageOps.crop(im, (round(im.width * 0.05), round(im.height * 0.05))),
    "mirror": ImageOps.mirror,
}


def stats(x: torch.Tensor) -> dict:
    q = {f"p{p}": round(float(torch.quantile(x, p / 100)), 4) for p in (1, 5, 50, 95, 99)}
    return {"n": len(x), "min": round(float(x.min()), 4), **q, "max": round(float(x.max()), 4)}


def threshold_measurement(data: Path, tmp: Path, model: str) -> dict:
    backbone = build_backbone(model)
    cache = tmp / "cache-threshold"
    forward = frozen_forward(backbone.name, backbone.module, backbone.preprocessing.input_size, "auto", cache_dir=cache)
    train_s, val_s = find_splits(data)
    everything = Samples(train_s.items + val_s.items, train_s.classes)
    x, _, _ = image_features(backbone, forward, everything, "all", cache, progress=False)
    nn, _ = nearest(x, x, 1, same=True)
    result = {"distinct_nearest_neighbour": stats(nn[:, 0])}
    xv, _, _ = image_features(backbone, forward, val_s, "val", cache, progress=False)
    for name, make in VARIANTS.items():
        items = []
        for i, (path, y) in enumerate(val_s.items):
            out = tmp / "variants" / name.replace(" ", "_").replace("%", "").replace(",", "") / f"{i}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            if name == "exact copy":
                shutil.copy(path, out.with_suffix(path.suffix))
                out = out.with_suffix(path.suffix)
            else:
                made = make(Image.open(path).convert("RGB"))
                im, quality = made if isinstance(made, tuple) else (made, 95)
                im.save(out, quality=quality)
            items.append((out, y))
        xa, _, _ = image_features(backbone, forward, Samples(items, val_s.classes), name, cache, progress=False)
        result[name] = stats((xa * xv).sum(1))
    return result


def plant(data: Path, root: Path, seed: int, flips: int, copies: int) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """A copy of ``data`` with ``flips`` train labels flipped and ``copies`` val images copied into train."""
    shutil.copytree(data, root)
    rng = random.Random(seed)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    train = sorted(p for p in (root / "train").rglob("*.jp*g"))
    flipped = []
    for p in rng.sample(train, flips):
        other = rng.choice([c for c in classes if c != p.parent.name])
        flipped.append(p.rename(root / "train" / other / p.name))
    copied = []
    for p in rng.sample(sorted((root / "val").rglob("*.jp*g")), copies):
        leak = root / "train" / p.parent.name / f"leak_{p.name}"
        shutil.copy(p, leak)
        copied.append((leak, p))
    return flipped, copied


def planted(data: Path, tmp: Path, seed: int, flips: int, copies: int, top: int, model: str) -> dict:
    root = tmp / "planted"
    flipped, copied = plant(data, root, seed, flips, copies)
    result = {"flipped": flips, "copied": copies}
    cache = tmp / "cache-planted"
    for attempt in ("first", "new_images", "again"):
        if attempt == "new_images":  # the engine's probe and graph kept, the features gone
            for f in cache.glob("*.safetensors"):
                f.unlink()
        start = time.perf_counter()
        summary = audit(str(root), model=model, out=str(tmp / "audit"), top=top, cache_dir=str(cache), seed=seed, progress=False)
        result[f"{attempt}_seconds"] = round(time.perf_counter() - start, 2)
        result[f"{attempt}_stages"] = summary["summary"]["seconds"]
    rows = [json.loads(line) for line in (tmp / "audit" / "label_issues.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    flipped_paths = {str(p) for p in flipped}
    pairs = [json.loads(line) for line in (tmp / "audit" / "duplicates.jsonl").read_text().splitlines()]
    planted_pairs = {(str(a), str(b)) for a, b in copied}
    found = [p for p in pairs if (p["path_a"], p["path_b"]) in planted_pairs]
    result.update(
        flipped_in_top_train=sum(r["path"] in flipped_paths for r in train_rows[:top]),
        flipped_in_top_overall=sum(r["path"] in flipped_paths for r in rows[:top]),
        flipped_flagged_suspect=sum(r["path"] in flipped_paths and r["suspect"] for r in rows),
        suspects_train=sum(r["suspect"] for r in train_rows),
        suspects_val=sum(r["suspect"] for r in rows if r["split"] == "val"),
        copies_found=len(found),
        copies_cosine_min=min((p["cosine"] for p in found), default=None),
        other_pairs=len(pairs) - len(found),
        flipped_ranks=sorted(i for i, r in enumerate(train_rows) if r["path"] in flipped_paths),
        summary=summary["summary"],
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flips", type=int, default=10)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--model", default="efficientnet_lite0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = {
            "planted": planted(Path(args.data), tmp, args.seed, args.flips, args.copies, args.top, args.model),
            "threshold": threshold_measurement(Path(args.data), tmp, args.model),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
