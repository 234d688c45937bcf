"""Classification benchmark on hymenoptera: the tutorial, fastai and visiontune side by side; prints one JSON object.

Runners, each in its own process (so peak memory and thread settings are its own), seeds fixed:
- ``tutorial_finetune`` / ``tutorial_fixed``: the PyTorch transfer-learning tutorial written plainly as it is
  (ImageFolder, its transforms, DataLoader batch 4 with 4 workers, SGD 1e-3 momentum 0.9, StepLR(7, 0.1),
  25 epochs, its train/val loop), on the embedded EfficientNet-Lite0 with the backbone's own mean/std.
- ``fastai``: ``vision_learner(dls, arch)`` + ``fine_tune(5)``, batch 16, ``aug_transforms()``, same backbone.
- ``visiontune_<strategy>``: ``visiontune.fit`` with the default recipe (a cold feature cache for linear/staged;
  ``visiontune_linear`` also reports a second, warm-cache run, and ``visiontune.predict``'s images/s on val/).
- ``compute_limit``: forward+backward+step on pre-made tensors of the full recipe's batch shape and precision.

Times are wall seconds from the start of each run's data setup (after imports). "seconds to target" is the time
at which a run first reached the tutorial's best val accuracy (fine-tuning for full/partial/staged/fastai, fixed
feature extractor for linear); visiontune's count conservatively includes its report writing.

    python bench/classify.py --data ../shared/datasets/hymenoptera_data [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("linear", "full", "staged", "partial")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    """This process's peak resident memory plus its largest child's (DataLoader workers), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + kids) / 1024, 1)


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- the tutorial, plainly


def tutorial(data: str, fixed: bool, epochs: int, seed: int) -> dict:
    import torch
    from torch import nn, optim
    from torch.optim import lr_scheduler
    from torchvision import datasets, transforms

    from visiontune.models.backbones import build_backbone

    seed_all(seed)
    t0 = time.perf_counter()
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # EfficientNet-Lite's own normalization
    data_transforms = {
        "train": transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)]
        ),
        "val": transforms.Compose(
            [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(mean, std)]
        ),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(data, x), data_transforms[x]) for x in ["train", "val"]}
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=4) for x in ["train", "val"]}
    dataset_sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}

    backbone = build_backbone("efficientnet_lite0")
    model = nn.Sequential(backbone.module, nn.Linear(backbone.num_features, len(image_datasets["train"].classes)))
    if fixed:
        for param in model[0].parameters():
            param.requires_grad = False
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD((model[1] if fixed else model).parameters(), lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

    best_acc, history, train_seconds, seen = 0.0, [], 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        best_path = os.path.join(tmp, "best_model_params.pt")
        for _epoch in range(epochs):
            for phase in ["train", "val"]:
                t_phase = time.perf_counter()
                model.train() if phase == "train" else model.eval()
                running_corrects = 0
                for inputs, labels in dataloaders[phase]:
                    optimizer.zero_grad()
                    with torch.set_grad_enabled(phase == "train"):
                        outputs = model(inputs)
                        _, preds = torch.max(outputs, 1)
                        loss = criterion(outputs, labels)
                        if phase == "train":
                            loss.backward()
                            optimizer.step()
                    running_corrects += torch.sum(preds == labels.data)
                if phase == "train":
                    scheduler.step()
                    train_seconds += time.perf_counter() - t_phase
                    seen += dataset_sizes["train"]
                epoch_acc = running_corrects.double().item() / dataset_sizes[phase]
                if phase == "val":
                    history.append([round(time.perf_counter() - t0, 2), epoch_acc])
                    if epoch_acc > best_acc:
                        best_acc = epoch_acc
                        torch.save(model.state_dict(), best_path)
    return {
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "best_val_accuracy": best_acc,
        "history": history,
        "train_images_per_second": round(seen / train_seconds, 2),
        "epochs": epochs,
    }


# --------------------------------------------------------------------------------------------- fastai


def fastai_run(data: str, epochs: int, seed: int) -> dict:
    from fastai.vision.all import (
        Callback,
        ImageDataLoaders,
        Normalize,
        Recorder,
        Resize,
        accuracy,
        aug_transforms,
        find_bs,
        set_seed,
        vision_learner,
    )

    from visiontune.models.backbones import build_backbone

    set_seed(seed, reproducible=True)
    t0 = time.perf_counter()

    def efficientnet_lite0(pretrained: bool = True):
        return build_backbone("efficientnet_lite0", None if pretrained else "none").module

    class Timeline(Callback):
        order = Recorder.order + 1  # after the Recorder has the epoch's metrics

        def __init__(self):
            self.history, self.train_seconds, self.seen = [], 0.0, 0

        def before_train(self):
            self.t_train = time.perf_counter()

        def after_batch(self):
            if self.training:
                self.seen += find_bs(self.yb)

        def after_train(self):
            self.train_seconds += time.perf_counter() - self.t_train

        def after_epoch(self):
            values = dict(zip(self.recorder.metric_names, self.recorder.log))
            self.history.append([round(time.perf_counter() - t0, 2), float(values["accuracy"])])

    dls = ImageDataLoaders.from_folder(
        data,
        train="train",
        valid="val",
        item_tfms=Resize(224),
        bs=16,
        seed=seed,
        batch_tfms=[*aug_transforms(), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
    )
    timeline = Timeline()
    learn = vision_learner(dls, efficientnet_lite0, metrics=accuracy, cbs=[timeline])
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs)
    return {
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "best_val_accuracy": max(a for _, a in timeline.history),
        "history": timeline.history,
        "train_images_per_second": round(timeline.seen / timeline.train_seconds, 2),
        "epochs": epochs + 1,
        "train_images": len(dls.train_ds),
    }


# --------------------------------------------------------------------------------------------- visiontune


def visiontune_run(data: str, strategy: str, seed: int, cache_dir: str, out: str) -> dict:
    from visiontune.config import ClassifyConfig
    from visiontune.tasks.classify import fit

    t0 = time.perf_counter()
    m = fit(ClassifyConfig(data=data, out=out, strategy=strategy, seed=seed, quiet=True, overwrite=True, cache_dir=cache_dir))
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    setup = wall - m["train_seconds"]  # decoding, model build, and (conservatively) the report at the end
    rates = [e["train_images_per_second"] for e in log if e.get("train_images_per_second")]
    return {
        "wall_seconds": round(wall, 2),
        "best_val_accuracy": m["best_val_accuracy"],
        "epochs": m["epochs"],
        "history": [[round(setup + e["elapsed_seconds"], 2), e["val_accuracy"]] for e in log],
        "train_images_per_second": round(statistics.median(rates), 2) if rates else None,
    }


def visiontune_runner(data: str, strategy: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # a cold feature cache: extraction counts
        result = visiontune_run(data, strategy, seed, f"{tmp}/cache", f"{tmp}/run")
        if strategy == "linear":
            warm = visiontune_run(data, strategy, seed, f"{tmp}/cache", f"{tmp}/run2")
            result["warm_cache"] = {k: warm[k] for k in ("wall_seconds", "best_val_accuracy")}
            result["predict"] = predict_speed(f"{tmp}/run", Path(data) / "val")
    return result


def predict_speed(run: str, images: Path) -> dict:
    """``visiontune.predict`` over a folder (batches of 32, fp32, decoding included), after loading the model file."""
    from visiontune.data.images import expand_inputs
    from visiontune.inference.classify import predict

    paths = expand_inputs([images])
    predict(run, paths[:1])  # loads and warms up; the timed call below loads the model file again, as a user's would
    t = time.perf_counter()
    predict(run, paths)
    seconds = time.perf_counter() - t
    return {"images": len(paths), "seconds": round(seconds, 2), "images_per_second": round(len(paths) / seconds, 1)}


# --------------------------------------------------------------------------------------------- the compute limit


def compute_limit(steps: int) -> dict:
    """Images/s of forward+backward+step on pre-made tensors: the full recipe's batch, channels_last, its precision;
    timed like visiontune's epochs (all the steps' wall time, after two warm-up steps), not by the fastest steps."""
    import torch

    from visiontune.engine.runtime import use_bf16
    from visiontune.models.backbones import build_backbone
    from visiontune.models.classifier import Classifier
    from visiontune.strategies import STRATEGIES

    seed_all(0)
    bs = STRATEGIES["full"].recipe.batch_size
    model = Classifier(build_backbone("efficientnet_lite0"), 2).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(bs, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,))
    result = {"batch_size": bs}
    bf16 = use_bf16("auto", torch.device("cpu"))
    for name, amp in (("fp32", False), ("bf16", True)) if bf16 else (("fp32", False),):
        for i in range(steps + 2):
            if i == 2:  # the first steps build kernels; from here on, total time over steps, as an epoch is timed
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        result[f"{name}_images_per_second"] = round(bs * steps / (time.perf_counter() - start), 2)
    # the limit is the fastest precision's, whichever --precision auto chose (it measures, but with a short probe)
    result["precision"] = max(("fp32", "bf16") if bf16 else ("fp32",), key=lambda p: result[f"{p}_images_per_second"])
    result["images_per_second"] = result[f"{result['precision']}_images_per_second"]
    return result


# --------------------------------------------------------------------------------------------- driver


def quick_subset(data: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """Every k-th image of each class (symlinks), the same for every runner."""
    for split, n in per_class.items():
        for cls in sorted(d for d in (data / split).iterdir() if d.is_dir()):
            files = sorted(p for p in cls.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            step = max(1, len(files) // n)
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for p in files[::step][:n]:
                (dst / split / cls.name / p.name).symlink_to(p.resolve())
    return dst


def child(args) -> None:
    """Run one runner and print its JSON on the last line of stdout."""
    kind, seed = args.child, args.seed
    if kind == "compute_limit":
        res = compute_limit(args.steps)
    elif kind.startswith("tutorial_"):
        res = tutorial(args.data, kind == "tutorial_fixed", args.epochs, seed)
    elif kind == "fastai":
        res = fastai_run(args.data, args.epochs, seed)
    else:
        res = visiontune_runner(args.data, kind.removeprefix("visiontune_"), seed)
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))


def spawn(kind: str, data: str, seed: int, epochs: int = 0, steps: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", data, "--seed", str(seed), "--epochs", str(epochs), "--steps", str(steps)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300], "returncode": p.returncode}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_seconds"] = round(time.perf_counter() - t, 2)  # with imports, for the record
    print(
        f"[bench] {kind} seed {seed}: {res.get('wall_seconds', '-')} s, best {res.get('best_val_accuracy', res.get('images_per_second'))}",
        file=sys.stderr,
        flush=True,
    )
    return res


def first_reach(history: list, target: float) -> float | None:
    return next((t for t, acc in history if acc >= target - 1e-9), None)


def summarize(runs: list[dict], target: float | None) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"runs": runs}
    for r in ok:
        r["seconds_to_target"] = first_reach(r["history"], target) if target is not None else None

    def mean(key):
        return round(statistics.mean(r[key] for r in ok), 4) if all(r.get(key) is not None for r in ok) else None

    return {
        "wall_seconds": mean("wall_seconds"),
        "best_val_accuracy": mean("best_val_accuracy"),
        "best_val_accuracy_each": [r["best_val_accuracy"] for r in ok],
        "seconds_to_target": mean("seconds_to_target"),
        "train_images_per_second": mean("train_images_per_second"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "target_accuracy": target,
        "runs": runs,
    }


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
    ap.add_argument("--quick", action="store_true", help="a subset and fewer epochs: under 3 minutes")
    ap.add_argument("--repeats", type=int, default=1, help="visiontune runs per strategy, seeds 0..N-1")
    ap.add_argument("--baseline-repeats", type=int, default=1, help="tutorial and fastai runs, seeds 0..N-1")
    ap.add_argument("--strategies", default=None, help="comma-separated (default: all; --quick: linear,full)")
    ap.add_argument("--skip", default="", help="comma-separated runners to leave out: tutorial_finetune, tutorial_fixed, fastai")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    started, load_start = time.perf_counter(), load_average()
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        sys.exit(f"bench: {data}: expected train/ and val/ class folders")
    tmp = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    try:
        if args.quick:
            data = quick_subset(data, tmp / "data", {"train": 32, "val": 24})
        strategies = (args.strategies or ("linear,full" if args.quick else ",".join(STRATEGIES))).split(",")
        skip = set(filter(None, args.skip.split(",")))
        tutorial_epochs, fastai_epochs = (3, 1) if args.quick else (25, 5)
        results = {"compute_limit": spawn("compute_limit", str(data), 0, steps=3 if args.quick else 8)}
        baselines = {}
        for kind, epochs in (("tutorial_finetune", tutorial_epochs), ("tutorial_fixed", tutorial_epochs), ("fastai", fastai_epochs)):
            if kind not in skip:
                baselines[kind] = [spawn(kind, str(data), s, epochs=epochs) for s in range(args.baseline_repeats)]
        vt = {s: [spawn(f"visiontune_{s}", str(data), seed) for seed in range(args.repeats)] for s in strategies}

        def best(kind):
            ok = [r["best_val_accuracy"] for r in baselines.get(kind, []) if "error" not in r]
            return statistics.mean(ok) if ok else None

        ft_target, fixed_target = best("tutorial_finetune"), best("tutorial_fixed")
        for kind, runs in baselines.items():
            results[kind] = summarize(runs, fixed_target if kind == "tutorial_fixed" else ft_target)
        for s, runs in vt.items():
            results[f"visiontune_{s}"] = summarize(runs, fixed_target if s == "linear" else ft_target)

        ratios = {}
        for s in strategies:
            v = results[f"visiontune_{s}"]
            ref = "tutorial_fixed" if s == "linear" else "tutorial_finetune"
            for base in (ref, "fastai"):
                b = results.get(base, {})
                ratios[f"{s}/{base}"] = {
                    "wall_seconds": ratio(v.get("wall_seconds"), b.get("wall_seconds")),
                    "seconds_to_tutorial_best": ratio(v.get("seconds_to_target"), b.get("seconds_to_target")),
                    "train_images_per_second": ratio(v.get("train_images_per_second"), b.get("train_images_per_second")),
                }
            limit = results["compute_limit"].get("images_per_second")
            if s != "linear":
                ratios[f"{s}/compute_limit"] = {"train_images_per_second": ratio(v.get("train_images_per_second"), limit)}
        import torch

        report = {
            "benchmark": "classify",
            "data": str(args.data),
            "quick": args.quick,
            "repeats": args.repeats,
            "baseline_repeats": args.baseline_repeats,
            "machine": {
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "load_average_start": load_start,
                "load_average_end": load_average(),
                "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            },
            "targets": {"tutorial_finetune_best": ft_target, "tutorial_fixed_best": fixed_target},
            "results": results,
            "ratios": ratios,
            "bench_seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
