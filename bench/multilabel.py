"""Multi-label on real photos of hymenoptera's ants and bees and Penn-Fudan's pedestrians, each image labelled with
the classes it shows; trains the given strategies, prints one JSON object with mAP, F1 and per-class AP/threshold.

Layouts: ``pair`` (the issue's set): two photos of different classes side by side (each cut to a portrait half, so
the square image keeps both through the centre crop), labelled with both; ``mosaic``: a 2x2 mosaic of one or two
classes (an image may show a single class).

Training mosaics take their photos from hymenoptera's train/ and Penn-Fudan's first 120 images, validation mosaics
from val/ and the last 50: no photo is in both.

    python bench/multilabel.py [--layout pair|mosaic] [--strategies linear,full] [--seeds 1] [--train 400] [--val 150]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
CLASSES = ("ants", "bees", "person")
TILE = 160


def photo_pools(hymenoptera: Path, pennfudan: Path) -> dict[str, dict[str, list[Path]]]:
    people = sorted((pennfudan / "PNGImages").glob("*.png"))
    pools = {}
    for split, persons in (("train", people[:120]), ("val", people[-50:])):
        pools[split] = {c: sorted((hymenoptera / split / c).glob("*.jpg")) for c in ("ants", "bees")} | {"person": persons}
    return pools


def build_mosaics(
    hymenoptera: Path, pennfudan: Path, dst: Path, n_train: int, n_val: int, seed: int = 0, layout: str = "mosaic"
) -> tuple[Path, Path]:
    """``dst/images/*.jpg`` and ``dst/labels.csv`` (path,labels,split): a mosaic shows one or two classes in its four
    tiles (both at least once when two); a pair, two photos of two different classes."""
    rng, pools = random.Random(seed), photo_pools(hymenoptera, pennfudan)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels,split"]
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            shown = rng.sample(CLASSES, 2 if layout == "pair" else rng.choice((1, 2)))
            tiles = shown + [rng.choice(shown) for _ in range(4 - len(shown))] if layout == "mosaic" else list(shown)
            rng.shuffle(tiles)
            size = (TILE, TILE) if layout == "mosaic" else (TILE, 2 * TILE)
            mosaic = Image.new("RGB", (2 * TILE, 2 * TILE))
            for k, c in enumerate(tiles):
                with Image.open(rng.choice(pools[split][c])) as photo:
                    tile = ImageOps.fit(photo.convert("RGB"), size)
                mosaic.paste(tile, (k % 2 * TILE, k // 2 * TILE))
            name = f"images/{split}_{i:04d}.jpg"
            mosaic.save(dst / name, quality=90)
            rows.append(f"{name},{' '.join(sorted(shown))},{split}")
    (dst / "labels.csv").write_text("\n".join(rows) + "\n")
    return dst, dst / "labels.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hymenoptera", default=str(SHARED / "hymenoptera_data"))
    ap.add_argument("--pennfudan", default=str(SHARED / "PennFudanPed"))
    ap.add_argument("--layout", default="pair", choices=("pair", "mosaic"))
    ap.add_argument("--strategies", default="linear,full")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=150)
    args = ap.parse_args()

    from visiontune.config import ClassifyConfig
    from visiontune.tasks.classify import fit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, labels = build_mosaics(Path(args.hymenoptera), Path(args.pennfudan), Path(tmp) / "data", args.train, args.val, 0, args.layout)
        for strategy in args.strategies.split(","):
            for seed in range(args.seeds):
                start = time.perf_counter()
                cfg = ClassifyConfig(
                    data=str(data), labels=str(labels), out=f"{tmp}/run", strategy=strategy, seed=seed, quiet=True, overwrite=True
                )
                m = fit(cfg.validate())
                rows.append(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        **{k: round(m[k], 4) for k in ("mAP", "f1_micro", "f1_macro", "exact_match")},
                        "per_class": {c: {k: round(v[k], 4) for k in ("AP", "f1", "threshold")} for c, v in m["per_class"].items()},
                        "wall_seconds": round(time.perf_counter() - start, 1),
                    }
                )
    print(json.dumps({"benchmark": "multilabel", "layout": args.layout, "train": args.train, "val": args.val, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
