"""Classification training, readable top to bottom: data -> model -> strategy -> loop -> metrics and files.

``fit(cfg)`` is the whole run. The loop itself is ``train_one_epoch``; the frozen-backbone path trains the
head on cached features (``features.py``) instead of pushing every image through the base each epoch.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from .. import runs, strategies
from ..config import ClassifyConfig, from_dict, to_dict, to_yaml
from ..data.classification import DecodedImages, decode_all, find_splits
from ..data.transforms import classification_eval, classification_train
from ..errors import UserError
from ..models.backbones import build_backbone
from ..models.classifier import Classifier
from ..faults import fault_point
from ..runs import (StepCheckpoints, append_jsonl, check_out_dir, check_same_settings, open_run_dir, saved_settings,
                    stop_on_interrupt, write_json, write_jsonl)
from . import distributed, wise
from .evaluate import classification_metrics, predict_logits
from .features import cached_extract, fit_sklearn_head
from .recipes import Recipe, recipe_for

log = logging.getLogger("visiontune")
SKLEARN_HEADS = ("logreg", "svm", "knn")


class Diverged(UserError):
    """A non-finite loss: the run stops, its last good checkpoint stays."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or "auto" on hardware with native bf16 math (measured 1.5-2.5x faster on an AVX512-BF16 CPU)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no MPS device is available")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device: unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def tensorboard_writer(out: Path | None):
    """A SummaryWriter into RUN/tensorboard (``out`` None: only check that the tensorboard package is there)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed; pip install tensorboard") from None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard")) if out is not None else None


# --------------------------------------------------------------------------------------------- settings

def resolve_settings(cfg: ClassifyConfig) -> tuple[ClassifyConfig, Recipe]:
    """Fill every unset value from the recipe; explicit settings win."""
    recipe = recipe_for(cfg.recipe, cfg.strategy)
    cfg = replace(
        cfg,
        epochs=cfg.epochs or recipe.epochs,
        batch_size=cfg.batch_size or recipe.batch_size,
        lr=cfg.lr or recipe.lr,
        weight_decay=recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        views=cfg.views or recipe.views,
        wise_alpha=recipe.wise_alpha if cfg.wise_alpha is None else cfg.wise_alpha,
        workers=0 if cfg.workers is None else cfg.workers,
    )
    if cfg.head in SKLEARN_HEADS and cfg.strategy != "linear":
        raise UserError(f"--head {cfg.head}: only with --strategy linear (it is fitted on cached features)")
    if cfg.head != "linear" and not recipe.use_feature_cache and cfg.strategy == "linear" and cfg.head in SKLEARN_HEADS:
        raise UserError(f"--head {cfg.head}: needs the default recipe (the tutorial recipe trains a linear head)")
    return cfg, recipe


def make_optimizer(model: Classifier, cfg: ClassifyConfig, recipe: Recipe) -> torch.optim.Optimizer:
    """Two parameter groups, backbone then head, always: resume then finds the same groups in every phase."""
    groups = model.param_groups()
    params = [{"params": groups["backbone"], "name": "backbone"}, {"params": groups["head"], "name": "head"}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=recipe.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, recipe: Recipe, phases, steps_per_epoch: int, epochs: int):
    """Per-step LR factors: the recipe's schedule times each phase's backbone scale. Pure functions of the step."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(recipe.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        if recipe.schedule == "step":
            return 0.1 ** ((step // steps_per_epoch) // recipe.step_epochs)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def backbone_factor(step: int) -> float:
        return schedule(step) * strategies.phase_at(phases, step // steps_per_epoch).backbone_lr_scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [backbone_factor, schedule])


# --------------------------------------------------------------------------------------------- the loop

def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, workers: int) -> DataLoader:
    """Shuffled in an order that depends only on (seed, epoch), so a resumed run sees the same batches.

    Under torchrun each process takes its share of that order and of the global ``batch_size``; each image's
    augmentation is seeded by (seed, epoch, index), so N processes see the batches of one (distributed.py).
    """
    sampler = distributed.epoch_sampler(dataset, seed * 100_003, epoch)
    per_process = distributed.per_process_batch(batch_size)
    drop_last = sampler.num_samples % per_process == 1  # a batch of one breaks BatchNorm in train mode
    return DataLoader(distributed.SeededPerSample(dataset, seed, epoch), batch_size=per_process, sampler=sampler,
                      drop_last=drop_last, num_workers=workers, persistent_workers=False)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer, scheduler, loss_fn, device: torch.device,
                    epoch: int, progress: bool, channels_last: bool = True, start_step: int = 0, totals: dict | None = None,
                    after_step=None, bf16: bool = False) -> dict:
    """One pass over ``loader``. Resuming mid-epoch: ``loader`` lacks the first ``start_step`` batches and ``totals``
    holds their running sums. ``after_step(step, totals)`` runs after each step (checkpoints, Ctrl-C)."""
    from tqdm import tqdm

    model.train()
    t = totals or {"seen": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0}
    seen, loss_sum, correct, start = t["seen"], t["loss_sum"], t["correct"], time.perf_counter() - t["seconds"]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress, initial=start_step,
               total=start_step + len(loader))
    for step, (x, y) in enumerate(bar, start=start_step):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise Diverged(f"training diverged: non-finite loss at epoch {epoch + 1}, step {step + 1}; the last good checkpoint is kept (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        if after_step is not None:
            after_step(step + 1, {"seen": seen, "loss_sum": loss_sum, "correct": correct, "seconds": time.perf_counter() - start})
    secs = time.perf_counter() - start
    return {"train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen), "train_seconds": secs,
            "train_images_per_second": seen / secs if secs > 0 else 0.0}


def train_head_on_features(model: Classifier, cfg: ClassifyConfig, recipe: Recipe, train_feats, val_feats, passes: int,
                           lr: float, on_epoch) -> None:
    """The head alone, many passes over cached features; keeps the best head by validation accuracy."""
    device = next(itertools.chain(model.head.parameters(), model.head.buffers())).device
    (xf, yf), (xv, yv) = [(x.to(device), y.to(device)) for x, y in (train_feats, val_feats)]
    if cfg.head in SKLEARN_HEADS:
        fit_sklearn_head(cfg.head, model.head, xf.cpu(), yf.cpu(), cfg.seed)
        with torch.no_grad():
            on_epoch(0, {"train_loss": None, "train_accuracy": None}, model.forward_head(xv))
        return
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(xf) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=passes * steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    g = torch.Generator().manual_seed(cfg.seed)
    for p in range(passes):
        model.head.train()
        order = torch.randperm(len(xf), generator=g)
        loss_sum = correct = 0.0
        for i in range(0, len(xf), cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            logits = model.head(xf[idx])
            loss = loss_fn(logits, yf[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yf[idx]).sum().item()
        model.head.eval()
        with torch.no_grad():
            on_epoch(p, {"train_loss": loss_sum / len(xf), "train_accuracy": correct / len(xf)}, model.head(xv))


# --------------------------------------------------------------------------------------------- fit

def fit(cfg: ClassifyConfig, resume: bool = False) -> dict:
    """Train a classifier as ``cfg`` says and write the run directory. Returns metrics.json's content."""
    if resume:  # the run's own settings; the caller's may only add what changes nothing (runs.MAY_CHANGE_ON_RESUME)
        saved = saved_settings(cfg.out)
        given = {k: v for k, v in to_dict(cfg).items() if v != getattr(ClassifyConfig, k, None) and not (k == "strategy" and v == "auto")}
        check_same_settings(saved, given, cfg.out)
        cfg = from_dict(ClassifyConfig, {**saved, **given})
    cfg.validate()
    out = check_out_dir(cfg.out, cfg.overwrite, resume)
    if cfg.tensorboard:
        tensorboard_writer(None)
    advice = None
    if cfg.strategy == "auto":
        from ..advisor import choose_strategy

        advice = choose_strategy(cfg)
        cfg = replace(cfg, strategy=advice.strategy, trainable_stages=cfg.trainable_stages or advice.trainable_stages)
    cfg, recipe = resolve_settings(cfg)
    device = distributed.init(select_device(cfg.device))
    bf16 = use_bf16(cfg.precision, device)
    distributed.per_process_batch(cfg.batch_size)
    progress = not cfg.quiet and distributed.is_main()
    seed_everything(cfg.seed)

    # data
    train_s, val_s = find_splits(cfg.data, cfg.val_data, cfg.val_split, cfg.seed)
    backbone = build_backbone(cfg.model, cfg.weights)
    prep = backbone.preprocessing
    size = cfg.image_size or prep.input_size
    resize = int(round(size / prep.crop_pct))
    model = Classifier(backbone, len(train_s.classes), head=cfg.head, bank_size=len(train_s) * cfg.views if cfg.head == "knn" else 1)
    # WiSE-FT averages with the pretrained base; taken before a resume loads the checkpoint, so it is the same then
    pretrained_base = wise.pretrained_snapshot(model.backbone) if cfg.wise_alpha < 1.0 and backbone.pretrained != "none" else None
    phases = strategies.plan(cfg.strategy, backbone.stages, cfg.epochs, trainable_stages=cfg.trainable_stages,
                             freeze_until=cfg.freeze_until, head_epochs=recipe.head_epochs, backbone_lr_scale=recipe.backbone_lr_scale)
    train_imgs, train_labels, bad_train = decode_all(train_s, resize, cfg.skip_bad)
    val_imgs, val_labels, bad_val = decode_all(val_s, resize, cfg.skip_bad)
    train_ds = DecodedImages(train_imgs, train_labels, classification_train(size, prep.mean, prep.std, recipe.crop_scale_min))
    val_ds = DecodedImages(val_imgs, val_labels, classification_eval(size, resize, prep.mean, prep.std))
    val_loader = DataLoader(distributed.shard(val_ds), batch_size=64, shuffle=False, num_workers=cfg.workers)

    # run directory: only now, with the inputs known good
    distributed.barrier()  # every process has checked --out before rank 0 changes it
    if distributed.is_main():
        open_run_dir(out, to_yaml(cfg), cfg.overwrite, resume)
    tb = tensorboard_writer(out) if cfg.tensorboard and distributed.is_main() else None
    model.to(device).to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        model = distributed.sync_batchnorm(model, device)
    classes = train_s.classes
    meta = {
        "task": "classification", "model": backbone.name, "classes": classes, "head": cfg.head, "num_features": backbone.num_features,
        "bank_size": len(train_s) * cfg.views if cfg.head == "knn" else 1, "strategy": cfg.strategy, "recipe": cfg.recipe,
        "preprocessing": {"mean": list(prep.mean), "std": list(prep.std), "input_size": size, "resize_size": resize},
        "pretrained": backbone.pretrained, "advice": advice.as_dict() if advice else None,
    }
    state = {"best": -1.0, "best_epoch": -1, "history": [], "start": time.perf_counter(), "elapsed_before": 0.0}

    def record(epoch: int, phase: str, train_stats: dict, val_logits: torch.Tensor) -> None:
        """Log one epoch, keep the best model."""
        m = classification_metrics(val_logits.cpu(), torch.as_tensor(val_labels), classes)
        entry = {"epoch": epoch + 1, "phase": phase, **{k: v for k, v in train_stats.items()}, "val_loss": m["loss"],
                 "val_accuracy": m["accuracy"], "lr": train_stats.get("lr"),
                 "elapsed_seconds": state["elapsed_before"] + time.perf_counter() - state["start"]}
        state["history"].append(entry)
        if not distributed.is_main():  # rank 0 alone logs and saves
            return
        append_jsonl(out / "log.jsonl", entry)
        if tb is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tb.add_scalar(key, value, epoch + 1)
            tb.flush()
        if m["accuracy"] > state["best"]:
            state["best"], state["best_epoch"] = m["accuracy"], epoch + 1
            ckpt.save_model(out / "model.safetensors", model, dict(meta, metrics={"val_accuracy": m["accuracy"], "epoch": epoch + 1}))
        if progress:
            tl = f"{entry['train_loss']:.4f}" if entry.get("train_loss") is not None else "-"
            print(f"epoch {epoch + 1:>3}/{cfg.epochs} [{phase}] train_loss {tl}  val_loss {m['loss']:.4f}  val_acc {m['accuracy']:.4f}"
                  f"  ({entry['elapsed_seconds']:.0f}s)", flush=True)

    first_epoch, first_step, epoch_totals = 0, 0, None
    last = out / "last.safetensors"
    from_checkpoint = resume and last.is_file()  # else (killed before the first checkpoint) the run starts over
    cached_head_phase = recipe.use_feature_cache and phases[0].frozen == (strategies.WHOLE_BACKBONE,)
    if cached_head_phase and not from_checkpoint:
        fault_point("features")
        strategies.apply(model, phases[0])
        tr = distributed.computed_on_main(lambda: cached_extract(backbone.name, model.backbone, train_ds, [p for p, _ in train_s.items], f"decode {resize}; {train_ds.transform!r}",
                            cfg.views, cfg.seed, cfg.cache_dir, bf16, desc="features (train)", progress=progress))
        va = distributed.computed_on_main(lambda: cached_extract(backbone.name, model.backbone, val_ds, [p for p, _ in val_s.items], f"decode {resize}; {val_ds.transform!r}",
                            1, 0, cfg.cache_dir, bf16, desc="features (val)", progress=progress))
        if cfg.strategy == "linear":
            train_head_on_features(model, cfg, recipe, tr, va, cfg.epochs, cfg.lr,
                                   lambda p, stats, logits: record(p, "linear (cached features)", stats, logits))
            first_epoch = cfg.epochs
        else:  # staged: the head on cached features counts as the head phase
            best_head = {}

            def keep(p, stats, logits):
                best_head["logits"], best_head["stats"] = logits, stats

            train_head_on_features(model, cfg, recipe, tr, va, recipe_for("default", "linear").epochs, recipe.head_lr or cfg.lr, keep)
            first_epoch = phases[0].epochs
            record(first_epoch - 1, "head (cached features)", best_head["stats"], best_head["logits"])

    optimizer = make_optimizer(model, cfg, recipe)
    steps_per_epoch = len(epoch_loader(train_ds, cfg.batch_size, cfg.seed, 0, 0))
    scheduler = make_scheduler(optimizer, recipe, phases, steps_per_epoch, cfg.epochs)
    # what a checkpoint must match to be resumed: the same images (by count and classes) give the same batches
    data_check = {"classes": classes, "train_images": len(train_ds), "val_images": len(val_ds), "steps_per_epoch": steps_per_epoch}

    def save_last(epoch: int, step: int = 0, totals: dict | None = None) -> None:
        runs.save_last(last, model, optimizer, scheduler, state, data_check, epoch, step, totals)

    if from_checkpoint:
        saved_meta = ckpt.load_training_state(last, model, optimizer, scheduler)  # restores the RNG state too
        distributed.check_resume(saved_meta, last)
        if saved_meta.get("data") != data_check:
            raise UserError(f"--resume: the images in {cfg.data} changed since {last} was saved "
                            f"(then {saved_meta.get('data')}, now {data_check}); resume needs the same data")
        first_epoch, first_step, epoch_totals = saved_meta["epoch"], saved_meta["step"], saved_meta["epoch_totals"]
        state.update(best=saved_meta["best"], best_epoch=saved_meta["best_epoch"], history=saved_meta["history"],
                     elapsed_before=saved_meta["elapsed_seconds"])
        if progress:
            print(f"resuming {out} at epoch {first_epoch + 1}/{cfg.epochs}, step {first_step}/{steps_per_epoch}", flush=True)
    if resume and distributed.is_main():
        write_jsonl(out / "log.jsonl", state["history"])  # drops lines logged after the checkpoint (all, without one)
    if 0 < first_epoch and not from_checkpoint:
        with warnings.catch_warnings():  # the head phase used its own optimizer: move the schedule past it
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(first_epoch * steps_per_epoch):
                scheduler.step()
        save_last(first_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    with stop_on_interrupt() as stop:
        duties = StepCheckpoints(stop, save_last, cfg.checkpoint_every, steps_per_epoch, last,
                                 f"visiontune classify train --out {out} --resume", distributed.any_process)
        for epoch in range(first_epoch, cfg.epochs):
            phase = strategies.phase_at(phases, epoch)
            strategies.apply(model, phase)
            loader = epoch_loader(train_ds, cfg.batch_size, cfg.seed, epoch, cfg.workers)
            if first_step:  # mid-epoch: skip the batches done; the RNG state is the checkpoint's
                loader = ckpt.resume_loader(loader, first_step)
            else:
                torch.manual_seed(cfg.seed * 100_003 + epoch)  # random draws (dropout): a function of (seed, epoch) alone
            stats = train_one_epoch(distributed.for_training(model, device), loader, optimizer, scheduler, loss_fn, device, epoch,
                                    progress, start_step=first_step, totals=epoch_totals,
                                    after_step=lambda step, totals: duties.after_step(epoch, step, totals), bf16=bf16)
            first_step, epoch_totals = 0, None
            stats = distributed.reduce_stats(stats)
            stats["lr"] = optimizer.param_groups[1]["lr"]
            fault_point("validate")
            distributed.broadcast_buffers(model)  # validate rank 0's model, one shard per process
            with wise.averaged_with(model.backbone, pretrained_base, cfg.wise_alpha):  # validated and kept averaged
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = distributed.gather_cat(predict_logits(model, val_loader)[0])
                record(epoch, phase.name, stats, logits)
            save_last(epoch + 1)
            duties.after_epoch(epoch + 1)

    fault_point("finish")
    val_paths = None if bad_val else [str(p) for p, _ in val_s.items]  # aligned with val_ds only when none was skipped
    metrics = finish(out, cfg, model, meta, state, val_ds, classes, bad_train + bad_val, train_s.skipped, val_paths) if distributed.is_main() else None
    return distributed.broadcast_object(metrics)


def finish(out: Path, cfg: ClassifyConfig, model: Classifier, meta: dict, state: dict, val_ds, classes, bad, skipped,
           val_paths: list[str] | None = None) -> dict:
    """Reload the best model, write metrics.json, the pictures and report.html."""
    from ..report import write_report, write_val_predictions
    from ..visualize import confusion_matrix_png, prediction_grid_png

    best_sd, _ = ckpt.load_model_file(out / "model.safetensors")
    final_acc = state["history"][-1]["val_accuracy"]
    model.load_state_dict(best_sd)
    logits, labels = predict_logits(model, DataLoader(val_ds, batch_size=64))
    m = classification_metrics(logits, labels, classes)
    trainable, total = model.count_params()
    train_seconds = state["elapsed_before"] + time.perf_counter() - state["start"]
    metrics = {
        "task": "classification", "best_val_accuracy": state["best"], "best_epoch": state["best_epoch"], "final_val_accuracy": final_acc,
        "epochs": cfg.epochs, "train_seconds": round(train_seconds, 2), "strategy": cfg.strategy, "model": meta["model"],
        "head": cfg.head, "recipe": cfg.recipe, "trainable_params": trainable,
        "total_params": total, "classes": classes, "per_class": m["per_class"],
        "confusion_matrix": m["confusion_matrix"], "skipped_bad_images": bad, "skipped_non_images": skipped,
    }
    if meta.get("advice"):
        metrics["advice"] = meta["advice"]
    write_json(out / "metrics.json", metrics)
    write_val_predictions(out / "val_predictions.json", val_ds.images, logits, labels, classes, val_paths)
    prediction_grid_png(out / "predictions.png", val_ds, logits, labels, classes, meta["preprocessing"])
    confusion_matrix_png(out / "confusion_matrix.png", m["confusion_matrix"], classes)
    write_report(out)
    if not cfg.quiet:
        print(f"best val accuracy {state['best']:.4f} (epoch {state['best_epoch']}), final {final_acc:.4f}, {train_seconds:.0f}s", flush=True)
        print(f"outputs in {out}/: model.safetensors metrics.json log.jsonl report.html predictions.png confusion_matrix.png config.yaml", flush=True)
    return metrics
