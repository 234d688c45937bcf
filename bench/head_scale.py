"""How `linear`'s head phase grows with the number of cached feature rows, up to a million images.

For each N (its own process): N x 1280 float32 features (synthetic: four classes around random centres) are written
into a feature-cache file through its memory map (engine/feature_file.py, as extraction writes them), committed
(checksum, sync, rename), mapped back copy-on-write, and the head trained on them for a few passes as `linear` trains
it (tasks/cached_head.py). Prints JSON: per N, the seconds to write and commit, the seconds per pass, the validation
accuracy, and the training phase's peak anonymous memory (RssAnon: what the process owns) beside its peak RSS (which
also counts the file pages it maps; the kernel can drop and reread those), and the slope of each against N.

    python bench/head_scale.py --sizes 10000,100000,1000000 --passes 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DIM, CLASSES, VAL, CHUNK = 1280, 4, 2000, 2_000


def memory_kb() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}


def child(n: int, passes: int, folder: Path) -> dict:
    import torch
    from torch import nn

    from visiontune.engine.feature_file import FeatureWriter
    from visiontune.models.classifier import Classifier
    from visiontune.tasks.cached_head import train_head_on_features
    from visiontune.tasks.objective import objective_for

    peak = {"VmRSS": 0, "RssAnon": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            now = memory_kb()
            for k in peak:
                peak[k] = max(peak[k], now[k])
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=g)

    def rows(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(CLASSES, (count,), generator=g)
        return (centres[y] * 0.3 + torch.randn(count, DIM, generator=g)).relu(), y

    start = time.perf_counter()
    writer = FeatureWriter(folder / "features.safetensors", {"bench": n}, n, DIM, (), torch.int64)
    for i in range(0, n, CHUNK):
        x, y = rows(min(CHUNK, n - i))
        writer.features[i : i + len(x)] = x
        writer.labels[i : i + len(x)] = y
    feats, labels = writer.commit()
    write_seconds = time.perf_counter() - start
    written = dict(peak)
    peak.update(VmRSS=0, RssAnon=0)  # the training phase's own peaks from here
    val = rows(VAL)
    backbone = type("Stub", (), {"module": nn.Identity(), "num_features": DIM})()
    model = Classifier(backbone, CLASSES)
    seconds, accuracy = [], []
    last = [time.perf_counter()]

    def on_epoch(p, stats, logits):
        seconds.append(time.perf_counter() - last[0])
        accuracy.append((logits.argmax(1) == val[1]).float().mean().item())
        last[0] = time.perf_counter()

    objective = objective_for(False, [str(c) for c in range(CLASSES)], None, 0.0, "auto")
    train_head_on_features(model, "linear", 256, 1e-4, objective, 0, (feats, labels), val, passes, 1e-3, on_epoch)
    done.set()
    return {
        "n": n,
        "feature_file_gb": round((folder / "features.safetensors").stat().st_size / 1e9, 2),
        "write_and_commit_seconds": round(write_seconds, 1),
        "seconds_per_pass": round(sum(seconds) / len(seconds), 2),
        "val_accuracy": round(accuracy[-1], 4),
        "write_peak_anon_mb": round(written["RssAnon"] / 1024),
        "peak_rss_mb": round(peak["VmRSS"] / 1024),
        "peak_anon_mb": round(peak["RssAnon"] / 1024),
    }


def slope(results: list[dict], field: str) -> float | None:
    """Change of ``field`` per 1,000 more rows, between the smallest and the largest N."""
    a, b = results[0], results[-1]
    return round((b[field] - a[field]) / ((b["n"] - a["n"]) / 1000), 4) if b["n"] > a["n"] else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.passes, Path(args.folder))))
        return
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="vt-head-scale-") as tmp:
            cmd = [sys.executable, __file__, "--child", str(n), "--passes", str(args.passes), "--folder", tmp]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    slopes = {f"{f}_per_1000_rows": slope(results, f) for f in ("peak_anon_mb", "write_peak_anon_mb", "peak_rss_mb", "seconds_per_pass")}
    print(json.dumps({"benchmark": "head_scale", "dim": DIM, "passes": args.passes, "results": results, **slopes}, indent=1))


if __name__ == "__main__":
    main()
