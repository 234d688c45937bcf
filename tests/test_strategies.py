"""Frozen means frozen: parameters and BatchNorm buffers bit-identical after training in train mode."""

from __future__ import annotations

import pytest
import torch

from visiontune import strategies as S
from visiontune.errors import UserError
from visiontune.models.backbones import build_backbone
from visiontune.models.classifier import Classifier


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(model: Classifier, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.1)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def lite():
    return build_backbone("efficientnet_lite0", weights="none")


def _model(lite) -> Classifier:
    import copy

    return Classifier(copy.deepcopy(lite), num_classes=2)


def test_linear_keeps_the_whole_base_bit_identical(lite):
    model = _model(lite)
    S.apply(model, S.plan("linear", lite.stages, 1)[0])
    before = _snapshot(model.backbone)
    head_before = _snapshot(model.head)
    _train_steps(model)
    after = _snapshot(model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen parameter or BatchNorm buffer changed"
    assert not torch.equal(head_before["1.weight"], model.head[1].weight)
    assert model.training and not model.backbone.training  # train() keeps the frozen base in eval mode


def test_partial_freezes_exactly_the_first_stages(lite):
    model = _model(lite)
    phase = S.plan("partial", lite.stages, 1, trainable_stages=3)[0]
    S.apply(model, phase)
    before = _snapshot(model.backbone)
    _train_steps(model)
    after = _snapshot(model.backbone)
    frozen_names = [n for n, _ in lite.stages][:-3]
    assert frozen_names == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    for k in before:
        is_frozen = k.startswith(("conv_stem", "bn1", *(f"blocks.{i}." for i in range(5))))
        changed = not torch.equal(before[k], after[k])
        if is_frozen:
            assert not changed, f"frozen {k} changed"
    assert not torch.equal(before["conv_head.weight"], after["conv_head.weight"])
    assert not torch.equal(before["bn2.running_mean"], after["bn2.running_mean"])  # trainable BN still adapts


def test_freeze_until_names_the_last_frozen_stage(lite):
    assert S.frozen_stages(lite.stages, None, "blocks.1") == ["stem", "blocks.0", "blocks.1"]
    with pytest.raises(UserError, match="unknown stage 'layer9'.*blocks.0"):
        S.frozen_stages(lite.stages, None, "layer9")
    with pytest.raises(UserError, match="--trainable-stages"):
        S.frozen_stages(lite.stages, 99, None)


def test_full_trains_everything(lite):
    model = _model(lite)
    S.apply(model, S.plan("full", lite.stages, 1)[0])
    before = _snapshot(model.backbone)
    _train_steps(model)
    assert not torch.equal(before["conv_stem.weight"], model.backbone.conv_stem.weight)


def test_staged_head_first_then_everything(lite):
    phases = S.plan("staged", lite.stages, 4, head_epochs=1, backbone_lr_scale=0.1)
    assert [p.name for p in phases] == ["head", "unfrozen"] and [p.epochs for p in phases] == [1, 3]
    assert S.phase_at(phases, 0).name == "head" and S.phase_at(phases, 1).name == "unfrozen"
    model = _model(lite)
    S.apply(model, phases[0])
    before = _snapshot(model.backbone)
    _train_steps(model)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    S.apply(model, phases[1])
    assert model.backbone.training
    _train_steps(model)
    assert not torch.equal(before["conv_stem.weight"], model.backbone.conv_stem.weight)
