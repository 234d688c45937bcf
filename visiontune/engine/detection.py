"""Detection / instance segmentation, readable top to bottom: data -> detector -> loop -> COCO metrics and files.

``fit(cfg)`` is the whole run (the detection tutorial's recipe: SGD 0.005/0.9/5e-4, warm-up in the first epoch,
StepLR(3, 0.1), batch 2, horizontal flip), with what makes it faster on a CPU: images decoded once, batches of
similar aspect ratio, channels_last, bf16 autocast in training where the hardware has it (``--precision``).
Gradient-norm clipping keeps heads trained from scratch from diverging.
``evaluate_run`` and ``predict_run`` use a finished run's model file.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from .. import runs
from ..config import DetectConfig, from_dict, to_dict, to_yaml
from ..data.coco import load_coco, to_coco_api
from ..data.images import load_rgb
from ..data.instance import DetectionDataset, InstanceData, Record, collate, grouped_batches, load_pennfudan, split_records
from ..errors import UserError
from ..models.detection import CUSTOM_MODELS, build_detector, is_mask_model, trainable_parameters
from ..report import write_report
from ..faults import fault_point
from ..runs import (StepCheckpoints, append_jsonl, check_out_dir, check_same_settings, open_run_dir, saved_settings,
                    stop_on_interrupt, write_json, write_jsonl)
from . import distributed
from .train import Diverged, seed_everything, select_device, use_bf16

log = logging.getLogger("visiontune")
METRIC_KEYS = ("AP", "AP50", "AP75")


# --------------------------------------------------------------------------------------------- data

def load_instances(fmt: str, data: str, annotations: str | None, what: str = "--data") -> InstanceData:
    if fmt == "pennfudan":
        return load_pennfudan(data)
    if fmt == "coco":
        if not annotations:
            raise UserError(f"{what} {data}: --format coco needs the annotations file (--annotations FILE.json)")
        return load_coco(data, annotations)
    raise UserError(f"--format: unknown format {fmt!r}; choose pennfudan or coco")


def load_splits(cfg: DetectConfig) -> tuple[list[Record], list[Record], InstanceData]:
    data = load_instances(cfg.format, cfg.data, cfg.annotations)
    if cfg.val_data:
        val = load_instances(cfg.format, cfg.val_data, cfg.val_annotations, "--val-data")
        if val.classes != data.classes:
            raise UserError(f"--val-data: classes {val.classes} differ from the training data's {data.classes}")
        return data.records, val.records, data
    train, val = split_records(data, cfg.val_split, cfg.val_last, cfg.seed)
    return train, val, data


def resolve_model_name(cfg: DetectConfig, has_masks: bool) -> str:
    """Boxes-only data trains Faster R-CNN: the custom maskrcnn switches; a torchvision Mask R-CNN is refused."""
    if has_masks or not is_mask_model(cfg.model):
        return cfg.model
    if cfg.model in CUSTOM_MODELS:
        log.info("the annotations have boxes only: training fasterrcnn (detection, no masks)")
        return "fasterrcnn"
    raise UserError(f"--model {cfg.model}: the annotations have boxes only (no segmentation); use --model {cfg.model.replace('mask', 'faster')}")


# --------------------------------------------------------------------------------------------- the loop

def lr_factor(step: int, steps_per_epoch: int, lr_step: int) -> float:
    """The tutorial's schedule per step: linear warm-up over the first epoch (from 1/1000), then StepLR(lr_step, 0.1)."""
    warmup = min(1000, steps_per_epoch - 1)
    epoch = step // steps_per_epoch
    factor = 0.1 ** (epoch // lr_step)
    if step < warmup:
        alpha = step / warmup
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


def epoch_batches(dataset: DetectionDataset, batch_size: int, seed: int, epoch: int, workers: int) -> DataLoader:
    """Batches of similar aspect ratio in an order that depends only on (seed, epoch); under torchrun each process
    takes its share of every global batch, and each image's flip is seeded by (seed, epoch, index) (distributed.py)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = distributed.split_batches(grouped_batches(dataset, batch_size, g))
    return DataLoader(distributed.SeededPerSample(dataset, seed, epoch), batch_sampler=batches, collate_fn=collate, num_workers=workers)


def train_one_epoch(model, loader, optimizer, scheduler, device, epoch: int, clip_grad: float, progress: bool,
                    start_step: int = 0, totals: dict | None = None, after_step=None, bf16: bool = False) -> dict:
    """One pass: summed losses, stop on a non-finite loss, clip the gradient norm, step the per-step schedule.
    Resuming mid-epoch: ``loader`` lacks the first ``start_step`` batches and ``totals`` holds their running sums
    (flat numbers, JSON for the checkpoint). ``after_step(step, totals)`` runs after each step (checkpoints, Ctrl-C)."""
    from tqdm import tqdm

    model.train()
    params = trainable_parameters(model)
    t = dict(totals or {"steps": 0, "seen": 0, "loss_sum": 0.0, "seconds": 0.0, "first_step_loss": None, "last_step_loss": None})
    start = time.perf_counter() - t["seconds"]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress, initial=start_step,
               total=start_step + len(loader))
    for step, (images, targets) in enumerate(bar, start=start_step):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()} for target in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise Diverged(f"training diverged: non-finite loss at epoch {epoch + 1}, step {step + 1} "
                           f"({', '.join(f'{k} {v.item():.3g}' for k, v in loss_dict.items())}); the last good checkpoint is kept "
                           f"(try a lower --lr or --clip-grad)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        t["steps"] += 1
        t["seen"] += len(images)
        t["loss_sum"] += value
        for k, v in loss_dict.items():  # loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg
            t[k] = t.get(k, 0.0) + v.item()
        if t["first_step_loss"] is None:
            t["first_step_loss"] = value
        t["last_step_loss"] = value
        bar.set_postfix(loss=f"{t['loss_sum'] / t['steps']:.3f}")
        if after_step is not None:
            after_step(step + 1, dict(t, seconds=time.perf_counter() - start))
    secs = time.perf_counter() - start
    n = max(1, t["steps"])
    return {"train_loss": t["loss_sum"] / n if t["steps"] else None, **{k: v / n for k, v in t.items() if k.startswith("loss_")},
            "train_seconds": secs, "train_images_per_second": t["seen"] / secs if secs > 0 else 0.0,
            "first_step_loss": t["first_step_loss"], "last_step_loss": t["last_step_loss"]}


# --------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_records(model, images: list[torch.Tensor], device, batch_size: int = 4) -> list[dict]:
    """Model outputs (on the CPU) for uint8 images."""
    model.eval()
    outputs = []
    for i in range(0, len(images), batch_size):
        batch = [im.to(device).float().div_(255) for im in images[i:i + batch_size]]
        outputs += [{k: v.cpu() for k, v in o.items()} for o in model(batch)]
    return outputs


def coco_results(outputs: list[dict], image_ids: list[int], category_ids: list[int] | None = None, min_score: float = 0.0) -> list[dict]:
    """Model outputs -> COCO results (xywh boxes; masks as RLE with string counts, thresholded at 0.5)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        keep = out["scores"] >= min_score
        boxes, scores, labels = out["boxes"][keep], out["scores"][keep], out["labels"][keep]
        rles = None
        if "masks" in out:
            binary = (out["masks"][keep][:, 0] > 0.5).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for j in range(len(boxes)):
            x1, y1, x2, y2 = boxes[j].tolist()
            label = int(labels[j])
            r = {"image_id": image_id, "category_id": category_ids[label - 1] if category_ids else label,
                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(float(scores[j]), 5)}
            if rles is not None:
                r["segmentation"] = {"size": rles[j]["size"], "counts": rles[j]["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_metrics(records: list[Record], results: list[dict], classes: list[str], has_masks: bool) -> dict:
    """bbox (and segm) AP, AP50, AP75 overall and per class, by pycocotools' COCOeval."""
    from pycocotools.cocoeval import COCOeval

    metrics: dict = {}
    per_class = {c: {} for c in classes}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = to_coco_api(records, classes)
        for iou_type in ("bbox", "segm") if has_masks else ("bbox",):
            if not results:  # no detection above the model's score threshold
                metrics.update({f"{iou_type}_{k}": 0.0 for k in METRIC_KEYS})
                for name in classes:
                    per_class[name].update({f"{iou_type}_AP": 0.0, f"{iou_type}_AP50": 0.0})
                continue
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            metrics.update({f"{iou_type}_{k}": max(0.0, float(ev.stats[i])) for i, k in enumerate(METRIC_KEYS)})
            precision = ev.eval["precision"]  # [iou thresholds, recall, class, area, max dets]
            for k, name in enumerate(classes):
                p = precision[:, :, k, 0, -1]
                per_class[name][f"{iou_type}_AP"] = float(p[p > -1].mean()) if (p > -1).any() else None
                p50 = precision[0, :, k, 0, -1]
                per_class[name][f"{iou_type}_AP50"] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else None
    metrics["per_class"] = per_class
    return metrics


def evaluate_model(model, records: list[Record], classes: list[str], has_masks: bool, device) -> tuple[dict, list[dict]]:
    outputs = predict_records(model, [r.image for r in records], device)
    return coco_metrics(records, coco_results(outputs, [r.image_id for r in records]), classes, has_masks), outputs


def evaluate_sharded(model, records: list[Record], classes: list[str], has_masks: bool, device) -> dict:
    """``evaluate_model`` over all processes: each predicts its slice of ``records``, the COCO results are gathered,
    and COCOeval sees every image once. Adds ``val_images``, the number of images predicted."""
    distributed.broadcast_buffers(model)  # rank 0's model, the one saved
    mine = distributed.shard(records)
    outputs = predict_records(model, [r.image for r in mine], device)
    parts = distributed.gather_objects((len(mine), coco_results(outputs, [r.image_id for r in mine])))
    fault_point("validate")
    results = [r for _, part in parts for r in part]
    return {**coco_metrics(records, results, classes, has_masks), "val_images": sum(n for n, _ in parts)}


# --------------------------------------------------------------------------------------------- fit

def fit(cfg: DetectConfig, resume: bool = False) -> dict:
    """Train a detector as ``cfg`` says and write the run directory. Returns metrics.json's content."""
    if resume:  # the run's own settings; the caller's may only add what changes nothing (runs.MAY_CHANGE_ON_RESUME)
        saved = saved_settings(cfg.out)
        given = {k: v for k, v in to_dict(cfg).items() if v != getattr(DetectConfig, k, None)}
        check_same_settings(saved, given, cfg.out)
        cfg = from_dict(DetectConfig, {**saved, **given})
    cfg.validate()
    out = check_out_dir(cfg.out, cfg.overwrite, resume)
    device = distributed.init(select_device(cfg.device))
    distributed.per_process_batch(cfg.batch_size)
    progress = not cfg.quiet and distributed.is_main()
    bf16 = use_bf16(cfg.precision, device)
    seed_everything(cfg.seed)

    train_records, val_records, data = load_splits(cfg)
    model_name = resolve_model_name(cfg, data.has_masks)
    model = build_detector(model_name, len(data.classes) + 1, backbone=cfg.backbone, weights=cfg.weights,
                           backbone_weights=cfg.backbone_weights, neck=cfg.neck, trainable_backbone_layers=cfg.trainable_backbone_layers,
                           min_size=cfg.min_size, max_size=cfg.max_size, rois_per_image=cfg.rois_per_image)
    train_ds = DetectionDataset(train_records, train=True)
    workers = 0 if cfg.workers is None else cfg.workers

    distributed.barrier()  # every process has checked --out before rank 0 changes it
    if distributed.is_main():
        open_run_dir(out, to_yaml(cfg), cfg.overwrite, resume)
    model.to(device).to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        model = distributed.sync_batchnorm(model, device)
    meta = {"task": "detection", "model": model_name, "backbone": cfg.backbone, "neck": cfg.neck, "classes": data.classes,
            "category_ids": data.category_ids, "masks": data.has_masks, "data_format": cfg.format, "min_size": cfg.min_size,
            "max_size": cfg.max_size, "pretrained": getattr(model, "pretrained", "none")}
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(distributed.split_batches(grouped_batches(train_ds, cfg.batch_size, torch.Generator())))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.lr_step))
    key = "segm_AP" if data.has_masks else "bbox_AP"
    state = {"best": -1.0, "best_epoch": -1, "history": [], "start": time.perf_counter(), "elapsed_before": 0.0}
    # what a checkpoint must match to be resumed: the same images (by count and classes) give the same batches
    data_check = {"classes": data.classes, "train_images": len(train_records), "val_images": len(val_records), "steps_per_epoch": steps_per_epoch}
    last = out / "last.safetensors"

    def save_last(epoch: int, step: int = 0, totals: dict | None = None) -> None:
        runs.save_last(last, model, optimizer, scheduler, state, data_check, epoch, step, totals)

    first_epoch, first_step, epoch_totals = 0, 0, None
    if resume and last.is_file():
        saved_meta = ckpt.load_training_state(last, model, optimizer, scheduler)  # restores the RNG state too
        distributed.check_resume(saved_meta, last)
        if saved_meta.get("data", data_check) != data_check:  # (checkpoints of earlier versions lack "data")
            raise UserError(f"--resume: the images in {cfg.data} changed since {last} was saved "
                            f"(then {saved_meta.get('data')}, now {data_check}); resume needs the same data")
        first_epoch, first_step, epoch_totals = saved_meta["epoch"], saved_meta.get("step", 0), saved_meta.get("epoch_totals")
        state.update(best=saved_meta["best"], best_epoch=saved_meta["best_epoch"], history=saved_meta["history"],
                     elapsed_before=saved_meta["elapsed_seconds"])
        if progress:
            print(f"resuming {out} at epoch {first_epoch + 1}/{cfg.epochs}, step {first_step}/{steps_per_epoch}", flush=True)
    elif resume and progress:
        print(f"{out} has no checkpoint yet: starting the run over", flush=True)
    if resume and distributed.is_main():
        write_jsonl(out / "log.jsonl", state["history"])  # drops a line logged after the checkpoint
    if progress:
        print(f"{model_name}{' on ' + cfg.backbone if cfg.backbone else ''}, "
              f"{len(data.classes)} class(es), {len(train_records)} train / {len(val_records)} val images, "
              f"{steps_per_epoch} steps per epoch", flush=True)

    with stop_on_interrupt() as stop:
        duties = StepCheckpoints(stop, save_last, cfg.checkpoint_every, steps_per_epoch, last,
                                 f"visiontune detect train --out {out} --resume", distributed.any_process)
        for epoch in range(first_epoch, cfg.epochs):
            loader = epoch_batches(train_ds, cfg.batch_size, cfg.seed, epoch, workers)
            if first_step:  # mid-epoch: skip the batches done; the RNG state (proposal sampling) is the checkpoint's
                loader = ckpt.resume_loader(loader, first_step)
            else:
                torch.manual_seed(cfg.seed * 100_003 + epoch)  # random draws: a function of (seed, epoch) alone
            stats = train_one_epoch(distributed.for_training(model, device), loader, optimizer, scheduler, device, epoch, cfg.clip_grad,
                                    progress, start_step=first_step, totals=epoch_totals,
                                    after_step=lambda step, totals: duties.after_step(epoch, step, totals), bf16=bf16)
            first_step, epoch_totals = 0, None
            stats = distributed.reduce_stats(stats)
            m = evaluate_sharded(model, val_records, data.classes, data.has_masks, device)
            entry = {"epoch": epoch + 1, **stats, "lr": optimizer.param_groups[0]["lr"], **{k: v for k, v in m.items() if k != "per_class"},
                     "elapsed_seconds": state["elapsed_before"] + time.perf_counter() - state["start"]}
            state["history"].append(entry)
            if distributed.is_main():  # rank 0 alone logs, saves and prints
                append_jsonl(out / "log.jsonl", entry)
                if m[key] > state["best"]:
                    state["best"], state["best_epoch"] = m[key], epoch + 1
                    ckpt.save_model(out / "model.safetensors", model,
                                    dict(meta, metrics={k: v for k, v in m.items() if k != "per_class"}, epoch=epoch + 1))
            save_last(epoch + 1)
            if progress:
                shown = "  ".join(f"{k} {m[k]:.3f}" for k in m if k.endswith(("_AP", "_AP50")))
                print(f"epoch {epoch + 1:>3}/{cfg.epochs} loss {stats['train_loss']:.3f}  {shown}  ({entry['elapsed_seconds']:.0f}s)", flush=True)
            duties.after_epoch(epoch + 1)

    fault_point("finish")
    metrics = finish(out, cfg, model, meta, state, len(train_records), val_records, data, device) if distributed.is_main() else None
    return distributed.broadcast_object(metrics)


def finish(out: Path, cfg: DetectConfig, model, meta: dict, state: dict, n_train: int, val_records: list[Record], data: InstanceData,
           device) -> dict:
    """Reload the best model, write metrics.json and predictions.png."""
    best_sd, _ = ckpt.load_model_file(out / "model.safetensors")
    model.load_state_dict(best_sd)
    m, outputs = evaluate_model(model, val_records, data.classes, data.has_masks, device)
    train_seconds = state["history"][-1]["elapsed_seconds"] if state["history"] else 0.0
    metrics = {k: m[k] for k in m if k != "per_class"}
    metrics.update(epochs=cfg.epochs, best_epoch=state["best_epoch"], train_seconds=round(train_seconds, 2), model=meta["model"],
                   backbone=meta["backbone"], classes=data.classes, per_class=m["per_class"], train_images=n_train,
                   val_images=len(val_records), dropped_degenerate_boxes=data.dropped_boxes)
    write_json(out / "metrics.json", metrics)
    predictions_png(out / "predictions.png", val_records[:6], outputs[:6], data.classes)
    write_report(out)
    if not cfg.quiet:
        shown = "  ".join(f"{k} {metrics[k]:.3f}" for k in metrics if k.endswith(("_AP", "_AP50", "_AP75")))
        print(f"best epoch {state['best_epoch']}: {shown}  ({train_seconds:.0f}s)", flush=True)
        print(f"outputs in {out}/: model.safetensors metrics.json log.jsonl predictions.png report.html config.yaml", flush=True)
    return metrics


# --------------------------------------------------------------------------------------------- pictures

def draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], masks: torch.Tensor | None) -> torch.Tensor:
    """uint8 image with masks (bool (N, H, W)) and labelled boxes drawn over it."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324"]
    colors = [palette[i % len(palette)] for i in range(len(boxes))]
    if masks is not None and len(masks):
        image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colors)
    if len(boxes):
        image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)
    return image


def predictions_png(path: Path, records: list[Record], outputs: list[dict], classes: list[str], min_score: float = 0.5) -> None:
    """Ground truth (left) beside predicted masks, boxes and scores (right), one validation image a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(records))
    fig, axes = plt.subplots(rows, 2, figsize=(8, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (r, o) in enumerate(zip(records, outputs)):
        gt = draw(r.image, r.boxes, [classes[int(i) - 1] for i in r.labels], r.masks)
        keep = o["scores"] >= min_score
        masks = o["masks"][keep][:, 0] > 0.5 if "masks" in o else None
        pred = draw(r.image, o["boxes"][keep], [f"{classes[int(i) - 1]} {s:.2f}" for i, s in zip(o["labels"][keep], o["scores"][keep])], masks)
        axes[row, 0].imshow(gt.permute(1, 2, 0).numpy())
        axes[row, 0].set_title(f"ground truth: {len(r.boxes)}", fontsize=9)
        axes[row, 1].imshow(pred.permute(1, 2, 0).numpy())
        axes[row, 1].set_title(f"predicted (score >= {min_score}): {int(keep.sum())}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- using a run

def load_detector(run: str | Path, device: str = "cpu"):
    """Rebuild the detector from the model file's metadata (no pretrained weights needed) and load its weights,
    in eval mode on ``device`` (auto, cpu, cuda or mps)."""
    p = Path(run)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise UserError(f"{run}: no model file (expected a run directory with model.safetensors, or the file itself)")
    sd, meta = ckpt.load_model_file(p)
    if meta.get("task") != "detection":
        raise UserError(f"{run}: not a detection model (task: {meta.get('task')})")
    model = build_detector(meta["model"], len(meta["classes"]) + 1, backbone=meta.get("backbone"), weights="none",
                           backbone_weights="none", neck=meta.get("neck", "fpn"), min_size=meta["min_size"], max_size=meta["max_size"])
    trained_bn = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in sd)
    if meta["model"] not in CUSTOM_MODELS and not trained_bn:  # as trained from COCO weights: frozen BatchNorm in the body
        from ..models.detection import freeze_batch_norm

        model.backbone.body = freeze_batch_norm(model.backbone.body)
    model.load_state_dict(sd)
    model.eval().to(select_device(device), memory_format=torch.channels_last)
    return model, meta


def evaluate_run(run: str | Path, data: str, fmt: str | None = None, annotations: str | None = None, device: str = "auto") -> dict:
    """COCO bbox (and segm) AP/AP50/AP75, overall and per class, of a trained run on ``data``."""
    model, meta = load_detector(run, device)
    instances = load_instances(fmt or meta["data_format"], data, annotations)
    classes = meta["classes"]
    if (fmt or meta["data_format"]) == "pennfudan":
        instances.classes = classes
    unknown = sorted(set(instances.classes) - set(classes))
    if unknown:
        raise UserError(f"--data: classes the model does not know: {', '.join(unknown)} (it knows {', '.join(classes)})")
    remap = torch.tensor([0] + [classes.index(c) + 1 for c in instances.classes])
    for r in instances.records:
        r.labels = remap[r.labels]
    has_masks = meta["masks"] and instances.has_masks
    m, _ = evaluate_model(model, instances.records, classes, has_masks, next(model.parameters()).device)
    return {**m, "images": len(instances.records)}


def predict_run(run: str | Path, inputs: list[str], score_threshold: float = 0.5, output: str | None = None,
                batch_size: int = 4, quiet: bool = False, device: str = "auto") -> dict:
    """COCO-results JSON (RLE masks) and a rendered PNG per image in ``output`` (default RUN/predict)."""
    from torchvision.io import write_png
    from torchvision.transforms.v2 import functional as TF

    from ..inference import expand_inputs

    if not 0.0 <= score_threshold <= 1.0:
        raise UserError(f"--score-threshold: must be between 0 and 1, got {score_threshold}")
    if str(run).endswith(".onnx"):  # a file from `visiontune export`, run by ONNX Runtime
        from ..export import OnnxDetector, onnx_on_cpu

        onnx_on_cpu(device)
        model, on = OnnxDetector(run), torch.device("cpu")
        meta = model.meta
    else:
        model, meta = load_detector(run, device)
        on = next(model.parameters()).device
        # boxes under the threshold dropped inside the model: no masks pasted for them, the same output (~1.2x the images/s)
        model.roi_heads.score_thresh = max(model.roi_heads.score_thresh, score_threshold)
    paths = expand_inputs(inputs)
    out_dir = Path(output) if output else (Path(run) if Path(run).is_dir() else Path(run).parent) / "predict"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output: cannot create {out_dir} ({e.strerror})") from None
    classes, results, rendered = meta["classes"], [], []
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        images = [TF.pil_to_tensor(load_rgb(p)) for p in chunk]
        outputs = predict_records(model, images, on, batch_size)
        for j, (p, image, o) in enumerate(zip(chunk, images, outputs)):
            image_id = i + j + 1
            for r in coco_results([o], [image_id], meta["category_ids"], score_threshold):
                results.append({"file_name": str(p), "category": classes[meta["category_ids"].index(r["category_id"])], **r})
            keep = o["scores"] >= score_threshold
            masks = o["masks"][keep][:, 0] > 0.5 if "masks" in o else None
            labels = [f"{classes[int(k) - 1]} {s:.2f}" for k, s in zip(o["labels"][keep], o["scores"][keep])]
            png = out_dir / f"{image_id:05d}_{p.stem}.png"
            write_png(draw(image, o["boxes"][keep], labels, masks), str(png))
            rendered.append(str(png))
    seconds = time.perf_counter() - start
    (out_dir / "predictions.json").write_text(json.dumps(results))
    summary = {"images": len(paths), "detections": len(results), "output": str(out_dir), "seconds": round(seconds, 3),
               "images_per_second": round(len(paths) / seconds, 3) if seconds > 0 else None}
    if not quiet:
        print(json.dumps(summary), flush=True)
    return summary
