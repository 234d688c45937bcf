"""The weight average (--ema): its arithmetic, the model's own weights back after validating the average, the
checkpoint's copy, and a bad decay refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visiontune.cli import main
from visiontune.engine.ema import WeightAverage


def test_the_average_follows_the_weights_with_a_warm_up():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.5)
    expected = torch.zeros(1, 2)
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        d = min(0.5, (1 + n) / (10 + n))  # 0.18, 0.25, 0.31, 0.36: below the decay while n is small
        expected = d * expected + (1 - d) * value
    assert torch.allclose(average.average["weight"], expected)


def test_validating_the_average_leaves_the_models_own_weights_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    own = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_in(model):
        state = model.state_dict()
        assert all(torch.equal(state[k], average.average[k]) for k in average.average)
        assert not torch.equal(state["0.weight"], trained["0.weight"]) and not torch.equal(state["0.weight"], own["0.weight"])
        assert torch.equal(state["1.num_batches_tracked"], trained["1.num_batches_tracked"])  # integers are not averaged
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_a_checkpoints_copy_restores_the_average():
    model = nn.Linear(3, 2)
    first = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model.weight.mul_(2)
    first.update(model)
    second = WeightAverage(nn.Linear(3, 2), decay=0.99)
    second.load(first.tensors())
    assert second.updates == 1 and all(torch.equal(second.average[k], v) for k, v in first.average.items())
    with pytest.raises(KeyError, match="bias"):
        second.load({"weight": first.average["weight"], "_updates": torch.tensor(1)})


def test_a_decay_out_of_range_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--ema", "1.5"])
    assert code == 2 and "--ema: 1.5 is out of range" in capsys.readouterr().err
