"""What trains: the four fine-tuning strategies as lists of frozen module prefixes.

- ``full``:    every weight trains (large data, unlike the pretraining data).
- ``partial``: the first stages of the base stay frozen, the rest and a new head train (large, similar data).
- ``linear``:  the whole base is frozen; only a new head trains (little data or compute; similar data).
- ``staged``:  the head alone first, then the whole network with a lower learning rate for the base.

Frozen means bit-identical: frozen parameters get no gradient and are left out of weight decay, and
frozen modules stay in eval mode, so BatchNorm running statistics never move.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .models.classifier import Classifier

WHOLE_BACKBONE = ""


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


def plan(strategy: str, stages, epochs: int, *, trainable_stages: int | None = None, freeze_until: str | None = None,
         head_epochs: int | None = None, backbone_lr_scale: float = 0.1) -> list[Phase]:
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


def apply(model: Classifier, phase: Phase) -> None:
    model.set_frozen(list(phase.frozen))
