"""Image classification by transfer learning, as a task of the one loop (engine/loop.py).

data (class folders, decoded once) -> backbone + new head -> strategy (what trains, in which phase) -> the loop
-> metrics.json, pictures and report. A head on a frozen base trains on cached features (cached_head.py)
instead of pushing every image through the base each epoch.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from .. import strategies
from ..caches import cache_folder, default_cache_dir
from ..config import ClassifyConfig
from ..data.classification import open_images
from ..data.splits import find_splits
from ..data.transforms import classification_eval, classification_train
from ..engine import distributed, loop, wise
from ..engine.features import cached_extract
from ..engine.frozen import engine_setting, frozen_forward
from ..engine.runtime import faster_in_bf16
from ..errors import UserError
from ..faults import fault_point
from ..meta import ClassifierMeta, EvalPreprocessing
from ..metrics.classification import class_weights, predict_logits
from ..metrics.label_issues import training_suspects
from ..models.backbones import build_backbone
from ..models.classifier import Classifier
from ..models.prefix import split_frozen_prefix
from ..runs import write_json
from ..strategies import AUTO, STRATEGIES, WHOLE_BACKBONE, Recipe, recipe_for, views_for
from .cached_head import SKLEARN_HEADS, train_head_on_features
from .objective import check_multi_label_settings, objective_for
from .schedule import epoch_loader, make_scheduler

SUSPECTS_UP_TO = 20_000  # training images: the report's label check (5 logistic regressions on features) stays seconds


def fit(cfg: ClassifyConfig, resume: bool = False, given: dict | None = None) -> dict:
    """Train a classifier as ``cfg`` says and write the run directory. Returns metrics.json's content."""
    return loop.fit(ClassifyTask(cfg), resume, given)


def resolve_settings(cfg: ClassifyConfig) -> tuple[ClassifyConfig, Recipe]:
    """Fill every unset value from the recipe; explicit settings win. (``views`` waits for setup: it depends on the
    number of training images.)"""
    recipe = recipe_for(cfg.recipe, cfg.strategy)
    cfg = replace(
        cfg,
        epochs=cfg.epochs or recipe.epochs,
        batch_size=cfg.batch_size or recipe.batch_size,
        lr=cfg.lr or recipe.lr,
        weight_decay=recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        wise_alpha=recipe.wise_alpha if cfg.wise_alpha is None else cfg.wise_alpha,
    )
    if cfg.head in SKLEARN_HEADS and not STRATEGIES[cfg.strategy].frozen_base:
        raise UserError(f"--head {cfg.head}: only with --strategy linear (it is fitted on cached features)")
    if cfg.head in SKLEARN_HEADS and not recipe.use_feature_cache:
        raise UserError(f"--head {cfg.head}: needs the default recipe (the tutorial recipe trains a linear head)")
    return cfg, recipe


class ClassifyTask:
    """Classification's hooks for engine.loop.fit (see its ``Task``)."""

    command = "classify"
    clip_grad = 0.0

    def __init__(self, cfg: ClassifyConfig):
        self.cfg, self.advice, self.val_features, self.frozen, self.suspects = cfg, None, None, None, None
        self.feature_timing: dict[str, dict] = {}  # per split: images, seconds, images/s of a feature pass (not a cache hit)
        self.prefixes: dict[str, tuple | None] = {}  # per phase: (engine, rest) running its frozen prefix, or None

    def resolve(self, cfg: ClassifyConfig) -> ClassifyConfig:
        if cfg.labels:
            check_multi_label_settings(cfg)
        if cfg.strategy == AUTO:
            from ..advisor import choose_strategy

            self.advice = choose_strategy(cfg)
            cfg = replace(cfg, strategy=self.advice.strategy, trainable_stages=cfg.trainable_stages or self.advice.trainable_stages)
        cfg, self.recipe = resolve_settings(cfg)
        return cfg

    def setup(self, device: torch.device, bf16: bool, progress: bool) -> None:
        cfg, recipe = self.cfg, self.recipe
        self.device, self.bf16, self.progress = device, bf16, progress
        self.train_s, self.val_s = find_splits(cfg.data, cfg.val_data, cfg.val_split, cfg.seed, cfg.labels, cfg.cache_dir)
        cfg.views = cfg.views or views_for(recipe, len(self.train_s))  # in config.yaml, which is written after setup
        backbone = build_backbone(cfg.model, cfg.weights)
        prep = backbone.preprocessing
        size = cfg.image_size or prep.input_size
        resize = prep.resize_for(size)
        bank_size = len(self.train_s) * cfg.views if cfg.head == "knn" else 1
        self.model = Classifier(backbone, len(self.train_s.classes), head=cfg.head, bank_size=bank_size)
        # WiSE-FT averages with the pretrained base; taken before a resume loads the checkpoint, so it is the same then
        keep_base = cfg.wise_alpha < 1.0 and backbone.pretrained != "none"
        self.pretrained_base = wise.snapshot(self.model.backbone) if keep_base else None
        self.phases = strategies.plan(
            cfg.strategy,
            backbone.stages,
            cfg.epochs,
            trainable_stages=cfg.trainable_stages,
            freeze_until=cfg.freeze_until,
            head_epochs=recipe.head_epochs,
            backbone_lr_scale=recipe.backbone_lr_scale,
        )
        cores = len(os.sched_getaffinity(0))
        self.cache_dir = cache_folder(cfg.cache_dir)  # None: no cache (--cache-dir none)
        images = dict(cache=cfg.cache_images, skip_bad=cfg.skip_bad, threads=cores, progress=progress, cache_dir=self.cache_dir)
        train_tf = classification_train(size, prep.mean, prep.std, recipe.crop_scale_min)
        start = time.perf_counter()
        self.train_ds, self.bad_train = open_images(self.train_s, resize, train_tf, **images)
        self.val_ds, self.bad_val = open_images(self.val_s, resize, classification_eval(size, resize, prep.mean, prep.std), **images)
        self.image_loading = {"cache": self.train_ds.cache, "seconds": round(time.perf_counter() - start, 2)}
        self.val_labels = self.val_ds.targets()
        # images decoded ahead (RAM, image cache) transform fast in this process; files decode in one worker per core
        self.workers = cfg.workers if cfg.workers is not None else (0 if self.train_ds.predecoded else cores)
        self.val_loader = DataLoader(distributed.shard(self.val_ds), batch_size=64, shuffle=False, num_workers=self.workers)
        weights = class_weights(cfg.class_weights, [y for _, y in self.train_s.items], self.train_s.classes)
        multi = self.train_s.multi_label
        self.objective = objective_for(multi, self.train_s.classes, weights, recipe.label_smoothing, cfg.threshold)
        self.loss_fn = self.objective.loss_fn(device)
        self.meta = ClassifierMeta(
            model=backbone.name,
            classes=self.train_s.classes,
            pretrained=backbone.pretrained,
            head=cfg.head,
            num_features=backbone.num_features,
            bank_size=bank_size,
            strategy=cfg.strategy,
            recipe=cfg.recipe,
            preprocessing=EvalPreprocessing(list(prep.mean), list(prep.std), size, resize),
            advice=self.advice.as_dict() if self.advice else None,
            multi_label=multi,
        )

    def train_bf16(self, bf16: bool) -> bool:
        """--precision auto trains the base in the precision measured faster here for this model (a cached probe);
        frozen-base passes keep bf16 where it is native (twice fp32's speed for a forward pass)."""
        cfg = self.cfg
        if not bf16 or cfg.precision != "auto" or STRATEGIES[cfg.strategy].frozen_base:
            return bf16
        probe = copy.deepcopy(self.model).train()
        size = self.meta.preprocessing.input_size
        x = torch.randn(distributed.per_process_batch(cfg.batch_size), 3, size, size, generator=torch.Generator().manual_seed(0))
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        y = self.val_labels[:1].expand(len(x), *self.val_labels.shape[1:]).to(self.device)  # a target of the loss's shape

        def step(bf16: bool) -> None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = self.loss_fn(probe(x).float(), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # dropout in the probe draws nothing from the run's random numbers
            key = f"{self.meta.model} train step, batch {len(x)} at {size} px"
            return faster_in_bf16(step, key, self.device, default_cache_dir().parent / "precision.json")

    def optimizer(self, start_epoch: int):
        """Two parameter groups, backbone then head, always: resume then finds the same groups in every phase."""
        cfg, recipe = self.cfg, self.recipe
        groups = self.model.param_groups()
        params = [{"params": groups["backbone"], "name": "backbone"}, {"params": groups["head"], "name": "head"}]
        if recipe.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=recipe.momentum, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = len(self.epoch_loader(0))
        return optimizer, make_scheduler(optimizer, recipe, self.phases, steps, cfg.epochs, start_epoch * steps), steps

    def data_check(self) -> dict:
        return {"classes": self.train_s.classes, "train_images": len(self.train_ds), "val_images": len(self.val_ds)}

    def prologue(self, record) -> int:
        """A first phase with the whole base frozen trains the head on cached features; returns its epochs."""
        cfg, first = self.cfg, self.phases[0]
        if not (self.recipe.use_feature_cache and first.frozen == (WHOLE_BACKBONE,)):
            return 0
        fault_point("features")
        strategies.apply(self.model, first)
        train = distributed.computed_on_main(lambda: self._features(self.train_ds, cfg.views, cfg.seed, "train"))
        val = distributed.computed_on_main(lambda: self._features(self.val_ds, 1, 0, "val"))
        settings = (cfg.head, cfg.batch_size, cfg.weight_decay, self.objective, cfg.seed)
        head = partial(train_head_on_features, self.model, *settings, train, val, balanced=cfg.sampler == "balanced")
        if STRATEGIES[cfg.strategy].frozen_base:  # the whole run is the head on cached features
            self._label_check(*train)  # (staged: a resume past this phase would not have it)
            self.val_features = val[0]  # finish scores the kept head on them: no second pass over the images
            head(cfg.epochs, cfg.lr, lambda p, stats, logits: self._record(record, p, "linear (cached features)", stats, logits))
            return cfg.epochs
        last = {}  # staged: the head's passes on cached features count as the head phase

        def keep(p, stats, logits):
            last["stats"], last["logits"] = stats, logits

        head(STRATEGIES["linear"].recipe.epochs, self.recipe.head_lr or cfg.lr, keep)
        self._record(record, first.epochs - 1, "head (cached features)", last["stats"], last["logits"])
        return first.epochs

    def _label_check(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """The training images whose label looks wrong, from their first view's features (metrics/label_issues.py)."""
        n, paths = len(self.train_ds), [str(p) for p in self.train_ds.paths]
        if not self.objective.multi_label and n <= SUSPECTS_UP_TO and distributed.is_main():
            self.suspects = training_suspects(feats[:n], labels[:n], paths, self.train_s.classes, 12, self.cfg.seed)

    def _features(self, dataset, views: int, seed: int, split: str):
        """Features from the frozen base, on the engine measured faster here (engine/frozen.py), through the cache."""
        cfg, prep, base = self.cfg, self.meta.preprocessing, self.model.backbone
        if self.frozen is None:  # ONNX Runtime's threads sleep between batches: faster with or without workers (185 vs 158/s)
            self.frozen = frozen_forward(self.meta.model, base, prep.input_size, cfg.engine, self.bf16, self.cache_dir, spin=False)
        how = f"decode {prep.resize_size}; {dataset.transform!r}"
        run = dict(
            desc=f"features ({split})", progress=self.progress, workers=self.workers, timing=self.feature_timing.setdefault(split, {})
        )
        return cached_extract(self.meta.model, base, self.frozen, dataset, how, views, seed, self.cache_dir or "none", **run)

    def epoch_loader(self, epoch: int) -> DataLoader:
        return epoch_loader(self.train_ds, self.cfg.batch_size, self.cfg.seed, epoch, self.workers, self.cfg.sampler == "balanced")

    def before_epoch(self, epoch: int) -> None:
        self.phase = strategies.phase_at(self.phases, epoch)
        strategies.apply(self.model, self.phase)
        if self.phase.name not in self.prefixes:
            self.prefixes[self.phase.name] = self._prefix_engine()
        if self.prefixes[self.phase.name] is not None:
            self.model.run_prefix_on(*self.prefixes[self.phase.name])

    def _prefix_engine(self) -> tuple | None:
        """partial on the CPU: (engine, rest) where the engine measured faster than PyTorch runs the frozen stages
        (models/prefix.py); None where PyTorch is faster or the backbone cannot be cut."""
        split = split_frozen_prefix(self.model.backbone, list(self.phase.frozen)) if self.device.type == "cpu" else None
        if split is None:
            return None
        prefix, rest = split
        name, size = f"{self.meta.model}-prefix{len(prefix)}", self.meta.preprocessing.input_size
        main = distributed.is_main()  # rank 0 chooses, every process runs its choice: the same numbers as one process
        engine = frozen_forward(name, prefix, size, self.cfg.engine, self.bf16, self.cache_dir, spin=False) if main else None
        chosen = distributed.broadcast_object(engine_setting(engine.name) if main else None)
        if chosen == "torch":
            return None
        if not main:
            engine = frozen_forward(name, prefix, size, chosen, self.bf16, self.cache_dir, spin=False)
        return engine, rest

    def forward(self, model, batch, device):
        x, y = batch
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        loss = self.loss_fn(logits.float(), y)
        return loss, len(y), {"correct": self.objective.correct(logits, y), "loss_x_images": loss.item() * len(y)}

    def summarize(self, totals: dict, seconds: float) -> dict:
        seen = max(1, totals["seen"])
        return {"train_loss": totals.get("loss_x_images", 0.0) / seen, "train_accuracy": totals.get("correct", 0) / seen}

    def validate(self, epoch: int, stats: dict, record) -> None:
        fault_point("validate")
        distributed.broadcast_buffers(self.model)  # validate rank 0's model, one shard per process
        with wise.averaged_with(self.model.backbone, self.pretrained_base, self.cfg.wise_alpha):  # validated and kept averaged
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = distributed.gather_cat(predict_logits(self.model, self.val_loader)[0])
            self._record(record, epoch, self.phase.name, stats, logits)

    def _record(self, record, epoch: int, phase: str, stats: dict, logits: torch.Tensor) -> None:
        logits = logits.cpu()
        self.meta.thresholds = self.objective.thresholds(logits, self.val_labels)  # multi-label: kept with this epoch's model
        m = self.objective.metrics(logits, self.val_labels, self.meta.thresholds)
        score, val_fields, shown = self.objective.log_fields(m)
        fields = {"phase": phase, **stats, "val_loss": m["loss"], **val_fields, "lr": stats.get("lr")}
        train_loss = f"{stats['train_loss']:.4f}" if stats.get("train_loss") is not None else "-"
        line = f"[{phase}] train_loss {train_loss}  val_loss {m['loss']:.4f}  {shown}"
        record(epoch, fields, score, {self.objective.score_name: score}, line)

    def finish(self, out: Path, state) -> dict:
        """Reload the best model, write metrics.json, the pictures and report.html."""
        from ..report import write_report
        from ..visualize import confusion_matrix_png, prediction_grid_png, write_val_predictions

        cfg, classes = self.cfg, self.train_s.classes
        best_sd, best_meta = ckpt.load_model_file(out / "model.safetensors")
        final = state.history[-1][self.objective.score_name]
        self.model.load_state_dict(best_sd)
        if self.val_features is not None:
            with torch.no_grad():
                logits, labels = (
                    self.model.eval().forward_head(self.val_features.to(self.device)).float().cpu(),
                    self.val_labels,
                )
        else:
            logits, labels = predict_logits(self.model, DataLoader(self.val_ds, batch_size=64, num_workers=self.workers))
        m = self.objective.metrics(logits, labels, best_meta.get("thresholds"))
        trainable, total = self.model.count_params()
        train_seconds = state.elapsed()
        metrics = {
            "task": "classification",
            **self.objective.summary(m, state.best, final),
            "best_epoch": state.best_epoch,
            "stopped_epoch": state.stopped_epoch,
            "epochs": cfg.epochs,
            "train_seconds": round(train_seconds, 2),
            "strategy": cfg.strategy,
            "model": self.meta.model,
            "head": cfg.head,
            "recipe": cfg.recipe,
            "trainable_params": trainable,
            "total_params": total,
            "classes": classes,
            "skipped_bad_images": self.bad_train + self.bad_val,
            "skipped_non_images": self.train_s.skipped,
        }
        metrics["image_loading"] = self.image_loading  # decoding (ram, disk) or reading headers (none) before training
        if self.frozen is not None:  # this process computed or read features (a resumed run may have done neither)
            metrics["feature_extraction"] = {"engine": self.frozen.name, **{split: t for split, t in self.feature_timing.items() if t}}
        engines = {ph: p[0].name for ph, p in self.prefixes.items() if p is not None}
        if engines:
            metrics["frozen_prefix_engine"] = engines
        if self.meta.advice:
            metrics["advice"] = self.meta.advice
        if self.suspects is not None:
            metrics["label_suspects"] = self.suspects
        write_json(out / "metrics.json", metrics)
        val_paths, cut = [str(p) for p in self.val_ds.paths], best_meta.get("thresholds")
        write_val_predictions(out / "val_predictions.json", self.val_ds.decoded, logits, labels, classes, val_paths, cut)
        prediction_grid_png(out / "predictions.png", self.val_ds, logits, labels, classes, vars(self.meta.preprocessing), thresholds=cut)
        if "confusion_matrix" in m:
            confusion_matrix_png(out / "confusion_matrix.png", m["confusion_matrix"], classes)
        write_report(out)
        if not cfg.quiet:
            score = self.objective.score_name.removeprefix("val_")
            print(f"best val {score} {state.best:.4f} (epoch {state.best_epoch}), final {final:.4f}, {train_seconds:.0f}s", flush=True)
            print(f"outputs in {out}/: model.safetensors metrics.json log.jsonl report.html predictions.png config.yaml", flush=True)
        return metrics
