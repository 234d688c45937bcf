"""How time and memory grow with the number of images: visiontune against a plain streaming pipeline, side by side.

    python bench/scale.py                       # N = 2,000 / 10,000 / 50,000 (hours on 2 cores)
    python bench/scale.py --sizes 1000,4000     # a quick look at the slopes
    python bench/scale.py --sizes 200000        # the large set

For each N it builds (once, kept in --work) a class-folder set of N training JPEGs from the photos in
../shared/datasets: random crops, flips and colour jitter of the source photos, re-encoded at 500-800 px on the long
side, in three classes (ants and bees from hymenoptera, street scenes from Penn-Fudan). Validation images (N/10, at
least 300) come from source photos no training image came from (hymenoptera's val/, Penn-Fudan's last 50).

Then, each in its own process, one at a time:
- ``linear``: ``visiontune classify train --strategy linear`` (the default recipe: 2 augmented views), cold caches;
- ``linear_1view``: the same with ``--views 1``;
- ``full_1epoch``: ``--strategy full --epochs 1``;
- ``linear_disk``: ``linear`` with ``--cache-images disk``, run twice in one process: the first run decodes into the
  image cache, the second (its features removed, so they are extracted again) reads the stored pixels; each run's
  image loading and feature extraction seconds;
- ``compute_limit``: bench/classify.py's limit (the full recipe's forward+backward+step on pre-made tensors), so
  ``full_1epoch`` reports its training images/s as a share of it (``train_vs_compute_limit``);
- ``peer``: the plain streaming pipeline a user would write: torchvision ImageFolder + DataLoader (2 workers, batch
  64), the embedded EfficientNet-Lite0 frozen under no_grad and bf16 autocast (where the CPU has bf16), one center
  crop, then scikit-learn's LogisticRegression.
It prints JSON: wall seconds, training images per second, peak memory of the process tree (the process and its
DataLoader workers, sampled every 0.2 s: RSS, and PSS, which counts shared pages once), validation accuracy; then, per contender, the slope of time and memory
against N (least squares), and each contender's time as a ratio of the peer's at the same N.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
CONTENDERS = ("linear", "linear_1view", "full_1epoch", "compute_limit", "peer", "linear_disk")


# --------------------------------------------------------------------------------------------- the data


def source_photos() -> dict[str, dict[str, list[Path]]]:
    """{split: {class: [photos]}}: validation photos are never the source of a training image."""
    hym, pf = SHARED / "hymenoptera_data", sorted((SHARED / "PennFudanPed" / "PNGImages").glob("*.png"))
    photos = {split: {c: sorted((hym / split / c).glob("*.jpg")) for c in ("ants", "bees")} for split in ("train", "val")}
    photos["train"]["street"], photos["val"]["street"] = pf[:-50], pf[-50:]
    return photos


def build_set(root: Path, n_train: int, seed: int = 0) -> Path:
    """N training JPEGs (and N/10, at least 300, validation ones) under root/train and root/val; kept between runs.
    Each image has its own random generator (seed, split, index), so two processes build halves of the same set."""
    done = root / ".complete"
    if done.is_file():
        return root
    jobs = [(root, split, count, seed, part) for split, count in (("train", n_train), ("val", max(300, n_train // 10))) for part in (0, 1)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(build_part, jobs)
    done.write_text("ok\n")
    return root


def build_part(root: Path, split: str, count: int, seed: int, part: int) -> None:
    """Every other image (from index ``part``) of one split."""
    from PIL import Image, ImageEnhance

    opened = {c: [Image.open(p).convert("RGB") for p in ps] for c, ps in source_photos()[split].items()}
    classes = sorted(opened)
    for i in range(part, count, 2):
        rng = random.Random(f"{seed}-{split}-{i}")
        c = classes[i % len(classes)]
        im = rng.choice(opened[c])
        w, h = im.size
        f = rng.uniform(0.6, 1.0)  # a random crop of 60-100% of each side
        cw, ch = int(w * f), int(h * f)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhance(out).enhance(rng.uniform(0.7, 1.3))
        long_side = rng.randint(500, 800)
        s = long_side / max(out.size)
        out = out.resize((max(1, round(out.size[0] * s)), max(1, round(out.size[1] * s))), Image.BICUBIC)
        path = root / split / c / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path, quality=90)


# --------------------------------------------------------------------------------------------- measuring


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of a process and all its descendants (Linux /proc). RSS counts the pages a forked
    DataLoader worker shares with its parent twice; PSS splits shared pages between the processes sharing them."""
    rss = pss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split(":")[0] in ("Rss", "Pss")}
            rss, pss = rss + fields.get("Rss", 0), pss + fields.get("Pss", 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


def measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its wall time, the peak RSS of its process tree, and the JSON it printed last."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(proc.pid))]
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    result = {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak[0] / 2**20), "peak_pss_mb": round(peak[1] / 2**20)}
    if proc.returncode != 0:
        return {**result, "error": err.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return {**result, **json.loads(out.strip().splitlines()[-1])}


# --------------------------------------------------------------------------------------------- contenders (children)


def run_visiontune(data: str, work: str, extra: list[str]) -> dict:
    from visiontune.cli import main

    out = Path(work) / "run"
    rc = main(
        [
            "classify",
            "train",
            "--data",
            data,
            "--out",
            str(out),
            "--overwrite",
            "--quiet",
            "--seed",
            "0",
            "--cache-dir",
            str(Path(work) / "features"),
            *extra,
        ]
    )
    if rc != 0:
        sys.exit(rc)
    m = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [e["train_images_per_second"] for e in log if e.get("train_images_per_second")]
    extraction = m.get("feature_extraction", {})
    return {
        "val_accuracy": m["best_val_accuracy"],
        "train_seconds": m["train_seconds"],
        "train_images_per_second": round(max(rates), 1) if rates else None,
        "image_loading_seconds": m["image_loading"]["seconds"],
        "feature_seconds": round(sum(v["seconds"] for k, v in extraction.items() if k != "engine"), 1) if extraction else None,
        "feature_engine": extraction.get("engine"),
    }


def run_twice_from_the_image_cache(data: str, work: str) -> dict:
    first = run_visiontune(data, work, ["--strategy", "linear", "--cache-images", "disk"])
    for f in (Path(work) / "features").glob("*.safetensors"):
        f.unlink()
    second = run_visiontune(data, work, ["--strategy", "linear", "--cache-images", "disk"])
    phase = {run: r["image_loading_seconds"] + r["feature_seconds"] for run, r in (("first", first), ("second", second))}
    return {**second, "first_run": first, "images_and_features_first_vs_second": round(phase["first"] / phase["second"], 2)}


def run_peer(data: str) -> dict:
    """The plain streaming pipeline, written as a user would."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from torchvision import datasets, transforms

    from visiontune.models.backbones import build_backbone

    backbone = build_backbone("efficientnet_lite0")  # the embedded ImageNet weights
    net = backbone.module.eval().to(memory_format=torch.channels_last)
    p = backbone.preprocessing
    tf = transforms.Compose(
        [transforms.Resize(p.resize_size), transforms.CenterCrop(p.input_size), transforms.ToTensor(), transforms.Normalize(p.mean, p.std)]
    )
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def features(split: str):
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(f"{data}/{split}", tf), batch_size=64, num_workers=2)
        xs, ys = [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x, y in loader:
                xs.append(net(x.contiguous(memory_format=torch.channels_last)).float().numpy())
                ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    t = time.perf_counter()
    xt, yt = features("train")
    rate = len(yt) / (time.perf_counter() - t)
    xv, yv = features("val")
    clf = LogisticRegression(max_iter=1000).fit(xt, yt)
    return {"val_accuracy": float((clf.predict(xv) == yv).mean()), "train_images_per_second": round(rate, 1)}


def child(args) -> None:
    extra = {
        "linear": ["--strategy", "linear"],
        "linear_1view": ["--strategy", "linear", "--views", "1"],
        "full_1epoch": ["--strategy", "full", "--epochs", "1"],
    }
    if args.child == "peer":
        result = run_peer(args.data)
    elif args.child == "linear_disk":
        result = run_twice_from_the_image_cache(args.data, args.work)
    elif args.child == "compute_limit":
        sys.path.insert(0, str(Path(__file__).parent))
        from classify import compute_limit  # bench/classify.py's definition: the full recipe's step on pre-made tensors

        result = compute_limit(steps=20)
    else:
        result = run_visiontune(args.data, args.work, extra[args.child])
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------- the table


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y against x."""
    if len(points) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,10000,50000", help="training-set sizes N, comma-separated")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "visiontune-scale"), help="where the sets are kept")
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    sizes = [int(s) for s in args.sizes.split(",")]
    contenders = args.contenders.split(",")
    env = dict(os.environ, PYTHONPATH=str(REPO), VISIONTUNE_OFFLINE="1")
    rows = []
    for n in sizes:
        t = time.perf_counter()
        data = build_set(Path(args.work) / f"set-{n}", n)
        print(f"set of {n} images ready in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        for name in contenders:
            with tempfile.TemporaryDirectory() as work:  # cold caches: nothing of an earlier run is reused
                cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--work", work]
                row = {"n": n, "contender": name, **measured(cmd, env)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {}
    for name in contenders:
        mine = [r for r in rows if r["contender"] == name and "error" not in r]
        per_1000 = {key: slope([(r["n"], r[key]) for r in mine]) for key in ("wall_seconds", "peak_rss_mb", "peak_pss_mb")}
        summary[name] = {f"{key}_per_1000_images": None if v is None else round(1000 * v, 2) for key, v in per_1000.items()}
    peer = {r["n"]: r["wall_seconds"] for r in rows if r["contender"] == "peer" and "error" not in r}
    for r in rows:
        if r["n"] in peer and "error" not in r:
            r["wall_vs_peer"] = round(r["wall_seconds"] / peer[r["n"]], 3)
    limit = {r["n"]: r["images_per_second"] for r in rows if r["contender"] == "compute_limit" and "error" not in r}
    for r in rows:
        if r["contender"] == "full_1epoch" and r["n"] in limit and r.get("train_images_per_second"):
            r["train_vs_compute_limit"] = round(r["train_images_per_second"] / limit[r["n"]], 3)
    print(json.dumps({"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "rows": rows, "slopes": summary}, indent=1))


if __name__ == "__main__":
    main()
