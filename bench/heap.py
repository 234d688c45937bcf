"""Training steps with glibc keeping freed blocks (engine/heap.py ``keep_freed_memory``) against its default; one JSON.

Each run is one epoch in a fresh process, interleaved (kept, default, kept, ...): ``full`` on hymenoptera, and Mask
R-CNN (the default recipe) on the first 48 Penn-Fudan images (the last 8 as validation). The default runs the same code
with ``keep_freed_memory`` made a no-op. Prints each run's training seconds (log.jsonl's first epoch) and peak RSS,
and the ratio of the medians.

    python bench/heap.py [--shared ../shared/datasets] [--reps 3] [--tasks classify,detect]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(task: str, keep: bool, data: str, out: str) -> dict:
    from visiontune.engine import loop

    if not keep:
        loop.keep_freed_memory = lambda: None
    if task == "classify":
        from visiontune.config import ClassifyConfig
        from visiontune.tasks.classify import fit

        fit(ClassifyConfig(data=data, out=out, strategy="full", epochs=1, quiet=True, overwrite=True, cache_dir="none"))
    else:
        from visiontune.config import DetectConfig
        from visiontune.tasks.detect import fit

        fit(DetectConfig(data=data, out=out, val_last=8, epochs=1, quiet=True, overwrite=True))
    first = json.loads((Path(out) / "log.jsonl").read_text().splitlines()[0])
    return {"train_seconds": round(first["train_seconds"], 2), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def penn_fudan_slice(root: Path, dst: Path, n: int = 48) -> Path:
    """The first ``n`` images of Penn-Fudan and their masks, as symlinks."""
    for sub in ("PNGImages", "PedMasks"):
        (dst / sub).mkdir(parents=True)
    for image in sorted((root / "PNGImages").glob("*.png"))[:n]:
        (dst / "PNGImages" / image.name).symlink_to(image.resolve())
        mask = root / "PedMasks" / f"{image.stem}_mask.png"
        (dst / "PedMasks" / mask.name).symlink_to(mask.resolve())
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", default="classify,detect")
    for hidden in ("child", "data", "out"):
        ap.add_argument(f"--{hidden}", default="", help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, bool(args.keep), args.data, args.out)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="vt-heap-"))
    data = {
        "classify": str(Path(args.shared) / "hymenoptera_data"),
        "detect": str(penn_fudan_slice(Path(args.shared) / "PennFudanPed", tmp / "pennfudan-48")),
    }
    report = {"benchmark": "heap", "reps": args.reps}
    for task in args.tasks.split(","):
        runs = {"kept": [], "default": []}
        for _ in range(args.reps):
            for name in runs:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    task,
                    "--keep",
                    str(int(name == "kept")),
                    "--data",
                    data[task],
                    "--out",
                    str(tmp / task),
                ]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-300:]})
                print(f"[bench] {task} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
        medians = {n: statistics.median(r["train_seconds"] for r in rs if "train_seconds" in r) for n, rs in runs.items()}
        report[task] = {**runs, "median_train_seconds": medians, "kept/default": round(medians["kept"] / medians["default"], 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
