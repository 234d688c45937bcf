"""Detection and instance segmentation (Mask/Faster R-CNN), as a task of the one loop (engine/loop.py).

The detection tutorial's recipe (SGD 0.005/0.9/5e-4, warm-up in the first epoch, StepLR(3, 0.1), batch 2,
horizontal flip), with what makes it faster on a CPU: images decoded once, batches of similar aspect ratio,
channels_last, bf16 autocast in training where the hardware has it (``--precision``). Gradient-norm clipping
keeps heads trained from scratch from diverging. Validation is COCO bbox (and segm) AP (metrics/coco.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from ..config import DETECT_RECIPES, DetectConfig
from ..data.formats import load_splits
from ..data.instance import DetectionDataset, collate, grouped_batches
from ..engine import distributed, loop
from ..errors import UserError
from ..faults import fault_point
from ..meta import DetectorMeta
from ..metrics.coco import coco_metrics, evaluate_model, predict_results
from ..models.detection import CUSTOM_MODELS, FIXED_ANCHOR_RATIOS, build_detector, fit_anchor_ratios, is_mask_model, trainable_parameters
from ..runs import write_json

log = logging.getLogger("visiontune")


def fit(cfg: DetectConfig, resume: bool = False, given: dict | None = None) -> dict:
    """Train a detector as ``cfg`` says and write the run directory. Returns metrics.json's content."""
    return loop.fit(DetectTask(cfg), resume, given)


def resolve_model_name(model: str, has_masks: bool) -> str:
    """Boxes-only data trains Faster R-CNN: the custom maskrcnn switches; a torchvision Mask R-CNN is refused."""
    if has_masks or not is_mask_model(model):
        return model
    if model in CUSTOM_MODELS:
        log.info("the annotations have boxes only: training fasterrcnn (detection, no masks)")
        return "fasterrcnn"
    raise UserError(f"--model {model}: the annotations have boxes only (no segmentation); use --model {model.replace('mask', 'faster')}")


def lr_factor(step: int, steps_per_epoch: int, lr_step: int, schedule: str = "step", epochs: int = 1) -> float:
    """Per step: linear warm-up over the first epoch (from 1/1000), then the tutorial's StepLR(lr_step, 0.1), or a
    cosine decay from the end of the warm-up to 0 at the end of the last epoch."""
    warmup = min(1000, steps_per_epoch - 1)
    epoch = step // steps_per_epoch
    if schedule == "cosine":
        progress = max(0, step - warmup) / max(1, epochs * steps_per_epoch - warmup)
        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    else:
        factor = 0.1 ** (epoch // lr_step)
    if step < warmup:
        alpha = step / warmup
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


def epoch_batches(dataset: DetectionDataset, cfg: DetectConfig, epoch: int, workers: int) -> DataLoader:
    """Batches of similar aspect ratio in an order that depends only on (seed, epoch); under torchrun each process
    takes its share of every global batch, and each image's flip is seeded by (seed, epoch, index) (distributed.py).
    With --scale-jitter each global batch is drawn one of seven scales, from the same generator: a batch needs no
    padding between sizes, and a resumed or multi-process run resizes as an uninterrupted one does."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    batches = grouped_batches(dataset, cfg.batch_size, g)
    items = distributed.SeededPerSample(dataset, cfg.seed, epoch)
    if cfg.scale_jitter:
        factors = jitter_factors(cfg.scale_jitter)
        picks = torch.randint(len(factors), (len(batches),), generator=g).tolist()
        batches = [[(i, factors[k]) for i in b] for b, k in zip(batches, picks)]
        items = ScaledItems(items)
    return DataLoader(items, batch_sampler=distributed.split_batches(batches), collate_fn=collate, num_workers=workers)


def jitter_factors(jitter: float) -> list[float]:
    """Seven scales evenly from 1 - jitter to 1 + jitter."""
    return [1 - jitter + 2 * jitter * k / 6 for k in range(7)]


class ScaledItems(torch.utils.data.Dataset):
    """``dataset[(index, scale)]``: the item, its target carrying the batch's training scale for ``forward``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float]):
        image, target = self.dataset[key[0]]
        return image, {**target, "scale": key[1]}


def set_scales(model, cfg: DetectConfig, scale: float = 1.0) -> None:
    """The size the model resizes images to: --min-size (and --max-size) times ``scale`` (a batch's, in training)."""
    model.transform.min_size, model.transform.max_size = (round(cfg.min_size * scale),), round(cfg.max_size * scale)


def evaluate_sharded(model, records, classes: list[str], has_masks: bool, device) -> dict:
    """``evaluate_model`` over all processes: each predicts its slice of ``records``, the COCO results are gathered,
    and COCOeval sees every image once. Adds ``val_images``, the number of images predicted."""
    distributed.broadcast_buffers(model)  # rank 0's model, the one saved
    mine = list(distributed.shard(records))
    parts = distributed.gather_objects((len(mine), predict_results(model, mine, device)[0]))
    fault_point("validate")
    results = [r for _, part in parts for r in part]
    return {**coco_metrics(records, results, classes, has_masks), "val_images": sum(n for n, _ in parts)}


def resolve_settings(cfg: DetectConfig) -> DetectConfig:
    """Fill every unset setting from the recipe; explicit settings win. With --time-budget, these epochs are the
    most the run trains: the loop lowers the number after the first epoch if they do not fit (engine/loop.py)."""
    recipe = DETECT_RECIPES[cfg.recipe]
    unset = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **unset)


class DetectTask:
    """Detection's hooks for engine.loop.fit (see its ``Task``)."""

    command = "detect"

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg

    def resolve(self, cfg: DetectConfig) -> DetectConfig:
        self.clip_grad = cfg.clip_grad
        return resolve_settings(cfg)

    def setup(self, device: torch.device, bf16: bool, progress: bool) -> None:
        cfg = self.cfg
        self.device = device
        self.train_records, self.val_records, self.data = load_splits(cfg)
        model_name = resolve_model_name(cfg.model, self.data.has_masks)
        fitted = cfg.anchors == "fit" and model_name in CUSTOM_MODELS
        ratios = fit_anchor_ratios([r.boxes for r in self.train_records]) if fitted else FIXED_ANCHOR_RATIOS
        per_octave = 2 if fitted else 1
        self.has_masks = self.data.has_masks and is_mask_model(model_name)  # a boxes-only model has no segm AP
        postprocess = dict(mask_quality_scores=self.has_masks, box_voting=True)  # the model's, and its file's
        self.model = build_detector(
            model_name,
            len(self.data.classes) + 1,
            backbone=cfg.backbone,
            weights=cfg.weights,
            backbone_weights=cfg.backbone_weights,
            neck=cfg.neck,
            trainable_backbone_layers=cfg.trainable_backbone_layers,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            rois_per_image=cfg.rois_per_image,
            anchor_ratios=ratios,
            anchors_per_octave=per_octave,
            **postprocess,
        )
        if cfg.copy_paste and not self.data.has_masks:
            log.info("--copy-paste: the annotations have no masks to cut objects by; training without it")
        self.train_ds = DetectionDataset(self.train_records, train=True, copy_paste=cfg.copy_paste)
        self.workers = 0 if cfg.workers is None else cfg.workers
        self.steps_per_epoch = len(distributed.split_batches(grouped_batches(self.train_ds, cfg.batch_size, torch.Generator())))
        self.meta = DetectorMeta(
            model=model_name,
            classes=self.data.classes,
            pretrained=getattr(self.model, "pretrained", "none"),
            backbone=cfg.backbone,
            neck=cfg.neck,
            category_ids=self.data.category_ids,
            masks=self.has_masks,
            data_format=cfg.format,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            anchor_ratios=list(ratios),
            anchors_per_octave=per_octave,
            **postprocess,
        )
        if progress:
            print(
                f"{model_name}{' on ' + cfg.backbone if cfg.backbone else ''}, {len(self.data.classes)} class(es), "
                f"{len(self.train_records)} train / {len(self.val_records)} val images, {self.steps_per_epoch} steps per epoch"
                + (f", anchors fitted to the training boxes (height / width {', '.join(map(str, ratios))})" if fitted else ""),
                flush=True,
            )

    def train_bf16(self, bf16: bool) -> bool:
        return bf16  # measured over 5 seeds: epochs 0.65-0.72 of fp32's, the same AP

    def optimizer(self, start_epoch: int):
        cfg = self.cfg
        optimizer = torch.optim.SGD(trainable_parameters(self.model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        steps = self.steps_per_epoch
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps, cfg.lr_step, cfg.schedule, cfg.epochs), last_epoch=start_epoch * steps - 1
        )
        return optimizer, scheduler, steps

    def data_check(self) -> dict:
        return {"classes": self.data.classes, "train_images": len(self.train_records), "val_images": len(self.val_records)}

    def prologue(self, record) -> int:
        return 0

    def epoch_loader(self, epoch: int) -> DataLoader:
        return epoch_batches(self.train_ds, self.cfg, epoch, self.workers)

    def before_epoch(self, epoch: int) -> None:
        set_scales(self.model, self.cfg)

    def forward(self, model, batch, device):
        images, targets = batch
        scales = {t.pop("scale") for t in targets if "scale" in t}
        if scales:
            set_scales(self.model, self.cfg, scales.pop())
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)  # loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg
        return sum(loss_dict.values()), len(images), {k: v.item() for k, v in loss_dict.items()}

    def summarize(self, totals: dict, seconds: float) -> dict:
        n = max(1, totals["steps"])
        return {
            "train_loss": totals["loss_sum"] / n if totals["steps"] else None,
            **{k: v / n for k, v in totals.items() if k.startswith("loss_")},
            "first_step_loss": totals["first_step_loss"],
            "last_step_loss": totals["last_step_loss"],
        }

    def validate(self, epoch: int, stats: dict, record) -> None:
        every = self.cfg.val_every
        if epoch and (epoch + 1) % every and epoch + 1 < self.cfg.epochs:  # --val-every: a logged epoch, no AP
            record(epoch, stats, -math.inf, {}, f"loss {stats['train_loss']:.3f}  (validating every {every} epochs)")
            return
        set_scales(self.model, self.cfg)
        m = evaluate_sharded(self.model, self.val_records, self.data.classes, self.has_masks, self.device)
        overall = {k: v for k, v in m.items() if k != "per_class"}
        shown = "  ".join(f"{k} {m[k]:.3f}" for k in m if k.endswith(("_AP", "_AP50")))
        record(
            epoch, {**stats, **overall}, m["segm_AP" if self.has_masks else "bbox_AP"], overall, f"loss {stats['train_loss']:.3f}  {shown}"
        )

    def finish(self, out: Path, state) -> dict:
        """Reload the best model, write metrics.json, predictions.png and report.html."""
        from ..report import write_report
        from ..visualize import detection_predictions_png

        cfg, data = self.cfg, self.data
        best_sd, _ = ckpt.load_model_file(out / "model.safetensors")
        self.model.load_state_dict(best_sd)
        set_scales(self.model, cfg)
        m, outputs = evaluate_model(self.model, self.val_records, data.classes, self.has_masks, self.device)
        train_seconds = state.history[-1]["elapsed_seconds"] if state.history else 0.0
        metrics = {"task": "detection", **{k: m[k] for k in m if k != "per_class"}}
        metrics.update(
            epochs=cfg.epochs,
            best_epoch=state.best_epoch,
            stopped_epoch=state.stopped_epoch,
            train_seconds=round(train_seconds, 2),
            model=self.meta.model,
            backbone=cfg.backbone,
            classes=data.classes,
            per_class=m["per_class"],
            train_images=len(self.train_records),
            val_images=len(self.val_records),
            dropped_degenerate_boxes=data.dropped_boxes,
        )
        write_json(out / "metrics.json", metrics)
        detection_predictions_png(out / "predictions.png", self.val_records[:6], outputs[:6], data.classes)
        write_report(out)
        if not cfg.quiet:
            shown = "  ".join(f"{k} {metrics[k]:.3f}" for k in metrics if k.endswith(("_AP", "_AP50", "_AP75")))
            print(f"best epoch {state.best_epoch}: {shown}  ({train_seconds:.0f}s)", flush=True)
            print(f"outputs in {out}/: model.safetensors metrics.json log.jsonl predictions.png report.html config.yaml", flush=True)
        return metrics
