"""``--strategy auto``: choose a fine-tuning strategy from measurements of the data.

Two measurements, following the usual rules of thumb for transfer learning:

- **size**: training images per class (small below ``SMALL_PER_CLASS``);
- **similarity to the pretraining data**: a linear probe, i.e. cross-validated logistic regression on the
  pretrained features of a sample of the training images. When the frozen features already separate the
  classes, the data is "similar" to what the model learned from; its score is the probe's accuracy above
  chance, scaled to 0..1.

A third, compute, comes from the same pass: the feature extraction's speed gives an estimate of one full
fine-tuning run's time on this device.

Rules: no pretrained weights -> full; very similar -> linear; small and similar -> linear; small and
dissimilar -> partial with few trainable stages; large and low compute -> linear; large and similar ->
partial; large and dissimilar -> full.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import ClassifyConfig
from .data.classification import open_images
from .data.splits import Samples, find_splits
from .data.transforms import classification_eval
from .engine.features import extract
from .engine.frozen import TorchForward
from .engine.runtime import select_device
from .models.backbones import build_backbone
from .strategies import recipe_for

SMALL_PER_CLASS = 200  # fewer training images per class than this: "small"
SIMILAR_SCORE = 0.6  # probe score (0 = chance, 1 = perfect) from which the data counts as similar
VERY_SIMILAR_SCORE = 0.9
LOW_COMPUTE_SECONDS = 3600  # an estimated full fine-tuning run longer than this: "low compute"
PROBE_PER_CLASS = 40  # images per class the probe looks at
BACKWARD_COST = 3.0  # a training step costs about three forward passes


@dataclass
class Advice:
    strategy: str
    reason: str
    measurements: dict = field(default_factory=dict)
    trainable_stages: int | None = None  # for partial: how many of the last stages train

    def as_dict(self) -> dict:
        return asdict(self)


def decide(images_per_class: float, probe_score: float | None, estimated_full_seconds: float | None, num_stages: int) -> Advice:
    """The rules of thumb, as a pure function of the measurements (``probe_score`` None: no pretrained weights)."""
    small = images_per_class < SMALL_PER_CLASS
    size = f"{images_per_class:.0f} images per class ({'small' if small else 'large'}: the line is {SMALL_PER_CLASS})"
    if probe_score is None:
        return Advice("full", f"no pretrained weights: there is nothing to transfer, every layer has to learn; {size}")
    similarity = f"linear-probe score {probe_score:.2f} (0 = chance, 1 = perfect)"
    if probe_score >= VERY_SIMILAR_SCORE:
        return Advice("linear", f"the pretrained features already separate the classes ({similarity}): train only a new head")
    similar = probe_score >= SIMILAR_SCORE
    if small and similar:
        return Advice(
            "linear",
            f"{size} and similar to the pretraining data ({similarity}): a new head on the frozen base "
            "learns well and cannot overfit the base",
        )
    if small:
        few = max(1, num_stages // 4)
        return Advice(
            "partial",
            f"{size} but unlike the pretraining data ({similarity}): keep the generic early stages "
            f"frozen and let only the last {few} stage(s) adapt",
            trainable_stages=few,
        )
    if estimated_full_seconds is not None and estimated_full_seconds > LOW_COMPUTE_SECONDS:
        return Advice(
            "linear",
            f"{size}, but full fine-tuning would take about {estimated_full_seconds / 60:.0f} min on this "
            f"device (low compute; {similarity}): train a head on cached features",
        )
    if similar:
        return Advice(
            "partial", f"{size} and similar to the pretraining data ({similarity}): fine-tune the last stages, keep the early ones"
        )
    return Advice("full", f"{size} and unlike the pretraining data ({similarity}): enough data to adapt every layer")


def _probe_sample(samples: Samples, per_class: int, seed: int) -> Samples:
    rng = random.Random(seed)
    picked = []
    for c in range(len(samples.classes)):
        members = [s for s in samples.items if s[1] == c]
        rng.shuffle(members)
        picked += members[:per_class]
    return Samples(sorted(picked), samples.classes)


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """Cross-validated logistic-regression accuracy on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = labels.numpy()
    folds = int(min(5, torch.bincount(labels).min().item()))
    if folds < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1))
    scores = cross_val_score(clf, features.numpy(), y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(scores.mean())


def choose_strategy(cfg: ClassifyConfig) -> Advice:
    """Measure the data, apply the rules, print the measurements and the reason."""
    train_s, _ = find_splits(cfg.data, cfg.val_data, cfg.val_split, cfg.seed, cache_dir=cfg.cache_dir)
    counts = train_s.counts()
    per_class = len(train_s) / len(train_s.classes)
    measurements = {
        "train_images": len(train_s),
        "classes": len(train_s.classes),
        "images_per_class": round(per_class, 1),
        "smallest_class": min(counts.values()),
    }
    backbone = build_backbone(cfg.model, cfg.weights)
    probe_score = estimated = None
    if backbone.pretrained != "none":
        device = select_device(cfg.device)
        prep = backbone.preprocessing
        size = cfg.image_size or prep.input_size
        resize = prep.resize_for(size)
        sample = _probe_sample(train_s, PROBE_PER_CLASS, cfg.seed)
        images, _ = open_images(
            sample,
            resize,
            classification_eval(size, resize, prep.mean, prep.std),
            "ram",
            skip_bad=True,
            threads=len(os.sched_getaffinity(0)),
            progress=not cfg.quiet,
        )
        start = time.perf_counter()
        # PyTorch, not the faster engine the run may use: this pass is also the stopwatch for a full fine-tune's time
        feats, ys = extract(
            TorchForward(backbone.module.to(device)),
            images,
            desc="advisor: features",
            progress=not cfg.quiet,
        )
        per_second = len(ys) / max(1e-6, time.perf_counter() - start)
        accuracy = linear_probe_accuracy(feats.cpu(), ys, cfg.seed)
        chance = max(torch.bincount(ys).tolist()) / len(ys)
        probe_score = max(0.0, (accuracy - chance) / (1 - chance)) if accuracy == accuracy else 0.0
        full_epochs = cfg.epochs or recipe_for(cfg.recipe, "full").epochs
        estimated = full_epochs * len(train_s) * BACKWARD_COST / per_second
        measurements.update(
            probe_images=len(ys),
            probe_accuracy=round(accuracy, 4),
            chance_accuracy=round(chance, 4),
            probe_score=round(probe_score, 4),
            feature_images_per_second=round(per_second, 1),
            estimated_full_finetune_seconds=float(f"{estimated:.3g}"),
            device=str(device),
        )
    else:
        measurements["pretrained"] = "none"
    advice = decide(per_class, probe_score, estimated, len(backbone.stages))
    advice.measurements = measurements
    if not cfg.quiet:
        print("advisor: " + ", ".join(f"{k} {v}" for k, v in measurements.items()), flush=True)
        print(f"advisor: strategy {advice.strategy}: {advice.reason}", flush=True)
    return advice
