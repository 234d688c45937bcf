"""The fine-tuning strategies, each defined once: what trains, when to choose it, its default recipe, its phases.

- ``linear``:  the whole base is frozen; only a new head trains (little data or compute; similar data).
- ``partial``: the first stages of the base stay frozen, the rest and a new head train (large, similar data).
- ``full``:    every weight trains (large data, unlike the pretraining data).
- ``staged``:  the head alone first, then the whole network with a lower learning rate for the base.

Frozen means bit-identical: frozen parameters get no gradient and are left out of weight decay, and
frozen modules stay in eval mode, so BatchNorm running statistics never move.

A recipe fills in every setting the user left out; explicit settings always win. ``--recipe tutorial`` is
PyTorch's transfer-learning tutorial, reproduced exactly, for every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UserError

WHOLE_BACKBONE = ""


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    schedule: str  # "step" (StepLR(step_epochs, 0.1)) | "cosine" (with linear warm-up)
    step_epochs: int = 7
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    label_smoothing: float = 0.0
    backbone_lr_scale: float = 1.0
    crop_scale_min: float = 0.08
    use_feature_cache: bool = False  # train the head on cached backbone features
    views: int = 1  # augmented views per image in the feature cache, for sets under ONE_VIEW_FROM training images
    head_epochs: int | None = None  # staged: epochs of the head-only phase
    head_lr: float | None = None  # staged: LR for the head-only phase on cached features
    wise_alpha: float = 1.0  # evaluate and keep alpha * fine-tuned + (1 - alpha) * pretrained base weights (wise.py)


# The "Transfer Learning for Computer Vision" tutorial: batch 4, SGD(1e-3, 0.9), StepLR(7, 0.1), 25 epochs.
TUTORIAL = Recipe(optimizer="sgd", lr=1e-3, weight_decay=0.0, batch_size=4, epochs=25, schedule="step")


@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune: what trains, when it is the right choice, and the default recipe it trains with."""

    name: str
    trains: str  # what trains, in a few words (--help)
    when: str  # when to choose it
    recipe: Recipe
    frozen_base: bool = False  # the whole base stays frozen for the whole run (a fixed feature extractor)


# Ours. Measured on hymenoptera with the embedded EfficientNet-Lite0, bf16 autocast (bench/classify.py).
# views: the linear head's best val accuracy (mean of 3 head seeds) on 1/2/4/8 augmented views per image was
# 0.959/0.956/0.954/0.952, the same within one of 153 val images, while each view costs a backbone pass over the training set: 2 views keep
# a second crop of every image (one random crop can miss the object) at a quarter of 8 views' extraction time.
# From ONE_VIEW_FROM training images on, one view (bench/scale.py, val accuracy 2 views / 1 view: 0.967 / 0.963 at
# 2,000 images, 0.974 / 0.979 at 8,000, 0.962 / 0.960 and 0.966 / 0.968 at 50,000): so many images leave a second
# crop of each nothing to add, and it doubles the largest cost of the run, the frozen pass.
# full, on an idle 2-core CPU (~15 s per epoch): this recipe's best val accuracy over seeds 0/1/2 is 0.948/0.941/0.935
# (mean 0.941), and every variant tried peaked in epoch 1 or 2 and then lost accuracy (seed 0 unless said):
# base LR 0.1x 0.941; 5 epochs at lr 5e-4 / 0.2x 0.928; SGD 3e-3 batch 8 0.948; BatchNorm statistics frozen 0.948
# (with SGD 0.902); crops from 50% of the image 0.948; a zero-initialised head 0.941 (with SGD 0.935); dropout 0.2
# + drop-path 0.2: 0.941 (seed 1: 0.935); the head fitted on cached features first (staged) 0.948; layer-wise LR
# decay 0.5 per stage (seeds 0/1/2) 0.941/0.954/0.941. fastai's fine_tune(5) shows the same: 0.935 after its
# frozen epoch, 0.876-0.895 once unfrozen. On these 244 images fine-tuning the whole base does not beat the fixed
# features (linear 0.956, partial 0.956: bench/classify.py --repeats 3).
# What does help is WiSE-FT (wise.py): keeping the average of the fine-tuned and the pretrained base. A probe on the
# runs above (seeds 0/1/2; best over the epochs) put alpha 0.3 at 0.954/0.948/0.941 and 0.5 and 0.7 at 0.954 on every
# seed; with alpha 0.5 this recipe then measured 0.954/0.961/0.954, mean 0.956, in 59 s (bench/classify.py
# --repeats 3 --strategies full,staged). staged with alpha 0.5 measured 0.948/0.935/0.948 (mean 0.943, as without),
# so it keeps its fine-tuned weights.
# What partial, full and staged share: the base trains, at a fraction of the head's learning rate.
FINE_TUNE = Recipe(
    optimizer="adamw",
    lr=1e-3,
    weight_decay=1e-2,
    batch_size=16,
    epochs=4,
    schedule="cosine",
    warmup_epochs=0.5,
    label_smoothing=0.1,
    backbone_lr_scale=0.1,
    crop_scale_min=0.25,
)
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "linear",
            "frozen base, new head only (fixed feature extractor)",
            "little data or compute, data similar to the pretraining data",
            Recipe(
                optimizer="adamw",
                lr=1e-3,
                weight_decay=1e-4,
                batch_size=64,
                epochs=30,
                schedule="cosine",
                use_feature_cache=True,
                views=2,
                crop_scale_min=0.25,
            ),
            frozen_base=True,
        ),
        Strategy(
            "partial",
            "first stages frozen, the rest and a new head train",
            "large data similar to the pretraining data (small data and a big model risk overfitting)",
            FINE_TUNE,
        ),
        Strategy(
            "full", "all weights train", "large data unlike the pretraining data", replace(FINE_TUNE, backbone_lr_scale=0.3, wise_alpha=0.5)
        ),
        Strategy(
            "staged",
            "head first, then all with a lower base LR",
            "as full, when a new head trained from scratch would first disturb the base",
            replace(FINE_TUNE, use_feature_cache=True, views=2, head_epochs=1, head_lr=1e-3),
        ),
    )
}
AUTO = "auto"  # --strategy auto: the advisor chooses one of STRATEGIES from the data
RECIPES = ("default", "tutorial")


ONE_VIEW_FROM = 5_000


def views_for(recipe: Recipe, train_images: int) -> int:
    """Augmented views per training image the recipe keeps for a set of this size."""
    return 1 if train_images >= ONE_VIEW_FROM else recipe.views


def recipe_for(name: str, strategy: str) -> Recipe:
    return TUTORIAL if name == "tutorial" else STRATEGIES[strategy].recipe


@dataclass(frozen=True)
class Phase:
    """One stretch of training: which prefixes are frozen, and the base's LR as a fraction of the head's."""

    name: str
    frozen: tuple[str, ...]
    backbone_lr_scale: float
    epochs: int


def frozen_stages(stages: list[tuple[str, tuple[str, ...]]], trainable_stages: int | None, freeze_until: str | None) -> list[str]:
    """Names of the stages that ``partial`` freezes."""
    names = [s for s, _ in stages]
    if freeze_until is not None:
        if freeze_until not in names:
            raise UserError(f"--freeze-until: unknown stage {freeze_until!r}; this backbone's stages are {', '.join(names)}")
        return names[: names.index(freeze_until) + 1]
    if trainable_stages is None:
        trainable_stages = max(1, (len(names) + 2) // 3)  # the last third trains
    if trainable_stages > len(names):
        raise UserError(f"--trainable-stages: {trainable_stages} is more than this backbone's {len(names)} stages ({', '.join(names)})")
    return names[: len(names) - trainable_stages]


def stage_prefixes(stages: list[tuple[str, tuple[str, ...]]], names: list[str]) -> tuple[str, ...]:
    by_name = dict(stages)
    return tuple(p for n in names for p in by_name[n])


def plan(
    strategy: str,
    stages,
    epochs: int,
    *,
    trainable_stages: int | None = None,
    freeze_until: str | None = None,
    head_epochs: int | None = None,
    backbone_lr_scale: float = 0.1,
) -> list[Phase]:
    """The phases of a run, in order. Their epochs add up to ``epochs``."""
    if strategy == "full":
        return [Phase("full", (), backbone_lr_scale, epochs)]
    if strategy == "linear":
        return [Phase("linear", (WHOLE_BACKBONE,), 0.0, epochs)]
    if strategy == "partial":
        frozen = stage_prefixes(stages, frozen_stages(stages, trainable_stages, freeze_until))
        return [Phase("partial", frozen, backbone_lr_scale, epochs)]
    if strategy == "staged":
        first = head_epochs if head_epochs is not None else max(1, epochs // 3)
        first = min(first, epochs - 1) if epochs > 1 else epochs
        phases = [Phase("head", (WHOLE_BACKBONE,), 0.0, first)]
        if epochs - first > 0:
            phases.append(Phase("unfrozen", (), backbone_lr_scale, epochs - first))
        return phases
    raise UserError(f"--strategy: unknown strategy {strategy!r}")


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that epoch ``epoch`` (0-based) belongs to."""
    end = 0
    for ph in phases:
        end += ph.epochs
        if epoch < end:
            return ph
    return phases[-1]


def apply(model, phase: Phase) -> None:
    """Freeze ``phase``'s prefixes of a Classifier (models/classifier.py), unfreeze the rest."""
    model.set_frozen(list(phase.frozen))
