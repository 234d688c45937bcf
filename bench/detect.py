"""Penn-Fudan Mask R-CNN benchmark; prints one JSON object.

1. visiontune's run (embedded EfficientNet-Lite0 + FPN Mask R-CNN, --val-last 50): per-epoch bbox/segm AP and AP50
   with wall time.
2. Issue 4 side by side: the same epochs of a plain tutorial-style loop (written out below: PNGs decoded every
   step, shuffled batches of 2, fp32 model in the default memory format, torchvision's RoIAlign, its StepLR) on the same
   model (same seed), images and image size, evaluated the same way: seconds per epoch, their ratio, and the AP
   difference.
3. Predict images/s (batched, from the run's model file).

    python bench/detect.py --data ../shared/datasets/PennFudanPed            # 3 epochs each: ~15 minutes on 2 cores
    python bench/detect.py --quick                                           # a few minutes
    python bench/detect.py --epochs 3 --lr-step 2 --seed 1                   # both loops: LR / 10 after epoch 2
    python bench/detect.py --epochs 5 --lr-step 4 --skip-baseline --tta      # + the run's val AP with --tta flip
    python bench/detect.py --budget 10 --seeds 0,1,2                         # recipes at a time budget: ~1 hour
    python bench/detect.py --budget 30 --recipes default --seeds 1,2 --val-every 4 --max-epochs 30 --tta  # + flip TTA of each kept model

--budget MINUTES (issue 16) trains each recipe of --recipes per seed for that long (train + validation of every
epoch, as --time-budget counts it) and prints per-epoch and final AP, and their means over the seeds; per-run
lines go to stderr as they finish. "final_no_box_voting" is the kept model again without box voting, and
"final_box_scores" without mask-quality scores too (torchvision's boxes and scores, as before both). The tutorial
recipe there runs as many epochs as fit (its StepLR /10 every 3).

At 3 epochs AP moves by up to 0.08 from one seed to the next (either loop): compare means over several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.io import read_image
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from visiontune.config import DetectConfig
from visiontune.data.formats import load_splits
from visiontune.engine.runtime import use_bf16
from visiontune.inference.detect import predict_run
from visiontune.metrics.coco import evaluate_model
from visiontune.models.detection import build_detector
from visiontune.tasks.detect import fit, resolve_settings

REPO = Path(__file__).resolve().parents[1]
AP_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------- the tutorial, plainly


class PennFudanDataset(torch.utils.data.Dataset):
    """The detection tutorial's dataset: reads the PNGs at every access."""

    def __init__(self, root: Path, names: list[str]):
        self.root, self.names = root, names
        self.transforms = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float, scale=True), v2.ToPureTensor()])

    def __getitem__(self, idx):
        img = read_image(str(self.root / "PNGImages" / f"{self.names[idx]}.png"))
        mask = read_image(str(self.root / "PedMasks" / f"{self.names[idx]}_mask.png"))
        obj_ids = torch.unique(mask)[1:]
        masks = (mask == obj_ids[:, None, None]).to(dtype=torch.uint8)
        boxes = masks_to_boxes(masks)
        img = tv_tensors.Image(img)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=img.shape[-2:]),
            "masks": tv_tensors.Mask(masks),
            "labels": torch.ones((len(obj_ids),), dtype=torch.int64),
            "image_id": idx,
        }
        return self.transforms(img, target)

    def __len__(self):
        return len(self.names)


def tutorial_train_one_epoch(model, optimizer, loader, clip_grad: float, warmup: bool) -> tuple[float, dict]:
    """references/detection/engine.py's loop: warm-up in epoch 0, summed losses (plus the same gradient clipping).
    Returns its seconds and the mean of each loss (to set beside visiontune's log)."""
    model.train()
    sched = None
    if warmup:
        sched = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=min(1000, len(loader) - 1))
    sums: dict[str, float] = {}
    start = time.perf_counter()
    for images, targets in loader:
        loss_dict = model(list(images), [dict(t) for t in targets])
        losses = sum(loss_dict.values())
        for k, v in loss_dict.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        optimizer.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        if sched is not None:
            sched.step()
    return time.perf_counter() - start, {k: round(v / len(loader), 4) for k, v in sums.items()}


def tutorial_baseline(root: Path, names: list[str], cfg: DetectConfig) -> dict:
    """The tutorial's training, ``cfg.epochs`` epochs (its StepLR(3, 0.1) per epoch), on torchvision's model code
    (its RoIAlign), evaluated with the same COCO evaluation as visiontune's run. Seconds per epoch and final AP."""
    torch.manual_seed(cfg.seed)
    model = build_detector("maskrcnn", 2, min_size=cfg.min_size, max_size=cfg.max_size, sparse_roi_align=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=0.1)
    loader = torch.utils.data.DataLoader(
        PennFudanDataset(root, names), batch_size=2, shuffle=True, num_workers=0, collate_fn=lambda b: tuple(zip(*b))
    )
    seconds, losses = [], []
    for epoch in range(cfg.epochs):
        secs, mean_losses = tutorial_train_one_epoch(model, optimizer, loader, cfg.clip_grad, warmup=epoch == 0)
        seconds.append(secs)
        losses.append(mean_losses)
        lr_scheduler.step()
    _, val_records, data = load_splits(cfg)
    metrics, _ = evaluate_model(model.eval(), val_records, data.classes, data.has_masks, torch.device("cpu"))
    return {"epoch_seconds": [round(x, 1) for x in seconds], "epoch_losses": losses, "final": {k: round(metrics[k], 4) for k in AP_KEYS}}


def tta_comparison(run: Path, cfg: DetectConfig, modes=("none", "flip")) -> dict:
    """The run's kept model on its validation images, plain and with flip TTA: AP and seconds of each."""
    from visiontune.inference.detect import with_detect_tta
    from visiontune.inference.load import load_detector

    model, _ = load_detector(run, "cpu")
    _, val_records, data = load_splits(cfg)
    out = {}
    for tta in modes:
        start = time.perf_counter()
        metrics, _ = evaluate_model(with_detect_tta(model, tta), val_records, data.classes, data.has_masks, torch.device("cpu"))
        out[tta] = {**{k: round(metrics[k], 4) for k in AP_KEYS}, "seconds": round(time.perf_counter() - start, 1)}
    return out


def postprocess_ablation(run: Path, cfg: DetectConfig) -> dict:
    """The run's kept model on its validation images without box voting ("no_box_voting"), then without mask-quality
    scores too ("box_scores": torchvision's boxes and scores, as before both): each change's A/B on the same weights."""
    from visiontune.inference.load import load_detector
    from visiontune.models.postprocess import use_box_voting, use_mask_quality_scores

    model, _ = load_detector(run, "cpu")
    _, val_records, data = load_splits(cfg)
    out = {}
    for name, turn_off in (("no_box_voting", use_box_voting), ("box_scores", use_mask_quality_scores)):  # cumulative
        metrics, _ = evaluate_model(turn_off(model, False), val_records, data.classes, data.has_masks, torch.device("cpu"))
        out[name] = {k: round(metrics[k], 4) for k in AP_KEYS}
    return out


EPOCH_KEYS = ("epoch", "train_loss", "loss_mask", *AP_KEYS, "train_seconds", "elapsed_seconds")


def epoch_rows(log: list[dict]) -> list[dict]:
    return [{k: round(e[k], 4) if isinstance(e[k], float) else e[k] for k in EPOCH_KEYS if k in e} for e in log]


def budget_comparison(args, data: Path, work: Path) -> dict:
    """Issue 16's --budget mode: each recipe trains and validates for ``args.budget`` minutes (--time-budget; the
    tutorial's schedule may run as many epochs as fit), per seed; per-epoch and final AP, and the mean over seeds."""
    out = {"benchmark": "detect_budget", "budget_minutes": args.budget, "seeds": args.seeds, "copy_paste": args.copy_paste}
    out.update(val_every=args.val_every, max_epochs=args.max_epochs, min_size=args.min_size, max_size=args.max_size, ema=args.ema)
    out.update(backbone=args.backbone or "efficientnet_lite0", anchors=args.anchors, recipes={})
    for recipe in args.recipes.split(","):
        runs = []
        for seed in args.seeds:
            run = work / f"{recipe}-{seed}"
            cfg = DetectConfig(
                data=str(data),
                out=str(run),
                val_last=args.val_last,
                recipe=recipe,
                epochs=args.max_epochs or (None if recipe == "default" else 1000),
                time_budget=args.budget,
                val_every=args.val_every,
                copy_paste=args.copy_paste,
                ema=args.ema,
                anchors=args.anchors,
                backbone=args.backbone,
                min_size=args.min_size,
                max_size=args.max_size,
                seed=seed,
                quiet=True,
            )
            load_before = load_average()
            metrics = fit(cfg)
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            final = {k: round(metrics[k], 4) for k in AP_KEYS}
            runs.append(
                {
                    "seed": seed,
                    "epochs": metrics["epochs"],
                    "best_epoch": metrics["best_epoch"],
                    "final": final,  # the kept model: the best epoch by segm AP on the validation images
                    "last": {k: round(log[-1][k], 4) for k in AP_KEYS},  # the last epoch's, chosen by nothing
                    "train_and_validate_seconds": round(log[-1]["elapsed_seconds"], 1),
                    "load_average_before": load_before,
                    "per_epoch": epoch_rows(log),
                }
            )
            if args.tta:  # the kept model again, with flip TTA (its plain AP is "final")
                runs[-1]["final_tta_flip"] = tta_comparison(run, cfg, modes=("flip",))["flip"]
            runs[-1].update({f"final_{k}": v for k, v in postprocess_ablation(run, cfg).items()})
            print(json.dumps({"recipe": recipe, "seed": seed, "epochs": metrics["epochs"], **final}), file=sys.stderr, flush=True)
            shutil.rmtree(run, ignore_errors=True)
        kinds = ("final", "last", "final_no_box_voting", "final_box_scores") + (("final_tta_flip",) if args.tta else ())
        means = {which: {k: round(sum(r[which][k] for r in runs) / len(runs), 4) for k in AP_KEYS} for which in kinds}
        out["recipes"][recipe] = {"mean": means, "runs": runs}
    return out


def subset(src: Path, n: int, dst: Path) -> Path:
    names = sorted(p.stem for p in (src / "PNGImages").glob("*.png"))[:n]
    for sub, suffix in (("PNGImages", ""), ("PedMasks", "_mask")):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(src / sub / f"{name}{suffix}.png", dst / sub / f"{name}{suffix}.png")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "PennFudanPed"))
    ap.add_argument("--val-last", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--recipe", default="tutorial", help="visiontune's recipe; tutorial (the default here) trains as the tutorial loop beside it does"
    )
    ap.add_argument("--budget", type=float, help="minutes: train each of --recipes for this long (--time-budget), per seed")
    ap.add_argument("--recipes", default="default,tutorial", help="--budget: the recipes to compare")
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")], help="--budget: seeds")
    ap.add_argument("--min-size", type=int, default=320)
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--lr-step", type=int, help="StepLR step (epochs), both loops (default: the recipe's)")
    ap.add_argument("--schedule", help="visiontune's LR schedule: step or cosine (default: the recipe's)")
    ap.add_argument("--scale-jitter", type=float, help="visiontune's multi-scale training (default: the recipe's)")
    ap.add_argument("--copy-paste", type=float, help="visiontune's copy-paste probability (default: the recipe's)")
    ap.add_argument("--ema", type=float, help="visiontune's weight average, decay per step (default: the recipe's)")
    ap.add_argument("--anchors", help="visiontune's RPN anchors: fit or fixed (default: the recipe's)")
    ap.add_argument("--backbone", help="--budget: the detector's registry backbone (default: efficientnet_lite0)")
    ap.add_argument("--val-every", type=int, default=1, help="--budget: validate every N epochs (and the first and last)")
    ap.add_argument("--max-epochs", type=int, help="--budget: the most epochs each run trains (default: the recipe's)")
    ap.add_argument("--precision", default=DetectConfig.precision, help="visiontune's training precision (the tutorial loop: fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="16 images, 1 epoch, 160-224 px: a few minutes")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--tta", action="store_true", help="also evaluate the run (--budget: each kept model) with flip TTA (AP and seconds beside plain)"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vt-bench-detect-"))
    data = Path(args.data)
    if args.quick:
        data = subset(data, 16, work / "data")
        args.val_last, args.epochs, args.min_size, args.max_size = 4, 1, 160, 224
    if args.budget:
        print(json.dumps(budget_comparison(args, data, work)))
        shutil.rmtree(work, ignore_errors=True)
        return
    result = {
        "benchmark": "detect",
        "data": str(data),
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_average(),
    }

    cfg = DetectConfig(
        data=str(data),
        out=str(work / "run"),
        val_last=args.val_last,
        recipe=args.recipe,
        epochs=args.epochs,
        min_size=args.min_size,
        max_size=args.max_size,
        lr_step=args.lr_step,
        schedule=args.schedule,
        scale_jitter=args.scale_jitter,
        copy_paste=args.copy_paste,
        ema=args.ema,
        anchors=args.anchors,
        precision=args.precision,
        seed=args.seed,
        quiet=True,
    )
    cfg = resolve_settings(cfg)  # the recipe's values, for the tutorial loop and the settings printed
    start = time.perf_counter()
    metrics = fit(cfg)
    result["visiontune_wall_seconds"] = round(time.perf_counter() - start, 1)
    log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    result["per_epoch"] = epoch_rows(log)
    result["final"] = {k: round(metrics[k], 4) for k in AP_KEYS}
    result["settings"] = {
        "model": "maskrcnn + FPN over efficientnet_lite0 (embedded ImageNet weights)",
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "epochs": cfg.epochs,
        "lr_step": cfg.lr_step,
        "schedule": cfg.schedule,
        "scale_jitter": cfg.scale_jitter,
        "copy_paste": cfg.copy_paste,
        "ema": cfg.ema,
        "anchors": cfg.anchors,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "clip_grad": cfg.clip_grad,
        "val_last": cfg.val_last,
        "rois_per_image": cfg.rois_per_image,
        "precision": "bf16" if use_bf16(cfg.precision, torch.device("cpu")) else "fp32",
        "tutorial_loop_rois_per_image": 512,
    }

    names = sorted(p.stem for p in (data / "PNGImages").glob("*.png"))[: -args.val_last]
    ours = [e["train_seconds"] for e in log]
    result["epoch_seconds_visiontune"] = [round(x, 1) for x in ours]
    if not args.skip_baseline:
        baseline = tutorial_baseline(data, names, cfg)
        result["tutorial_loop"] = baseline
        theirs = baseline["epoch_seconds"]
        result["epoch_ratio_visiontune_over_tutorial"] = round(sum(ours) / sum(theirs), 3)
        # the same training length on both sides: visiontune's last epoch (its "final" is its best epoch's model)
        result["AP_difference_visiontune_minus_tutorial"] = {k: round(log[-1][k] - baseline["final"][k], 4) for k in AP_KEYS}

    val_images = [
        str(data / "PNGImages" / f"{n}.png") for n in sorted(p.stem for p in (data / "PNGImages").glob("*.png"))[-args.val_last :]
    ]
    pred = predict_run(work / "run", val_images, score_threshold=0.5, output=str(work / "predict"), quiet=True)
    result["predict_images_per_second"] = pred["images_per_second"]
    result["predict_images"] = pred["images"]
    if args.tta:
        result["tta"] = tta_comparison(work / "run", cfg)
    result["load_average_after"] = load_average()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
