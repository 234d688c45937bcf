"""Class imbalance on hymenoptera: the bees' training images cut to 10% (val as is), trained as the images come,
with ``--class-weights auto`` and with ``--sampler balanced``; prints one JSON object with per-class recall and balanced accuracy.

    python bench/imbalance.py [--data ../shared/datasets/hymenoptera_data] [--strategies linear,full] [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cut_bees(data: Path, dst: Path, keep_every: int = 10) -> Path:
    """Symlinks: every training image of each class, but only every ``keep_every``-th bee; val/ unchanged."""
    for split in ("train", "val"):
        for cls in sorted(d for d in (data / split).iterdir() if d.is_dir()):
            files = sorted(p for p in cls.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if split == "train" and cls.name == "bees":
                files = files[::keep_every]
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for p in files:
                (dst / split / cls.name / p.name).symlink_to(p.resolve())
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
    ap.add_argument("--strategies", default="linear,full")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()

    from visiontune.config import ClassifyConfig
    from visiontune.tasks.classify import fit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = cut_bees(Path(args.data), Path(tmp) / "data")
        counts = {c.name: len(list(c.iterdir())) for c in sorted((data / "train").iterdir())}
        for strategy in args.strategies.split(","):
            for weights, sampler in (("none", "shuffle"), ("auto", "shuffle"), ("none", "balanced")):
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    m = fit(
                        ClassifyConfig(
                            data=str(data),
                            out=f"{tmp}/run",
                            strategy=strategy,
                            class_weights=weights,
                            sampler=sampler,
                            seed=seed,
                            quiet=True,
                            overwrite=True,
                            cache_dir=f"{tmp}/cache",
                        )
                    )
                    rows.append(
                        {
                            "strategy": strategy,
                            "class_weights": weights,
                            "sampler": sampler,
                            "seed": seed,
                            "val_accuracy": round(m["best_val_accuracy"], 4),
                            "val_balanced_accuracy": round(m["val_balanced_accuracy"], 4),
                            "recall": {c: round(v["recall"], 4) for c, v in m["per_class"].items()},
                            "wall_seconds": round(time.perf_counter() - start, 1),
                        }
                    )
    print(json.dumps({"benchmark": "imbalance", "train_images": counts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
