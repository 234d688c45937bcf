"""WiSE-FT: the model evaluated and kept is alpha * fine-tuned + (1 - alpha) * pretrained; training goes on unaveraged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_class_folders, write_pretrained_weights
from safetensors.torch import load_file
from torch import nn

from visiontune.cli import main
from visiontune.engine import wise


def test_inside_the_average_and_after_exactly_the_weights_before():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    pretrained = wise.snapshot(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
        m[1].running_mean.add_(1.0)
        m[1].num_batches_tracked += 5
    tuned = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError), wise.averaged_with(m, pretrained, 0.25):
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                assert torch.allclose(v, 0.25 * tuned[k] + 0.75 * pretrained[k], atol=1e-6), k
            else:  # counters are not averaged
                assert torch.equal(v, tuned[k])
        raise RuntimeError("an evaluation that fails still gets the weights back")
    assert all(torch.equal(v, tuned[k]) for k, v in m.state_dict().items())


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A 'pretrained' tiny timm backbone as a weights file (averaging is off for random init: nothing to keep)."""
    return write_pretrained_weights(tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors")


@pytest.mark.parametrize("alpha", [None, "1"])
def test_full_run_keeps_the_average_of_fine_tuned_and_pretrained_base(pretrained_file, tmp_path, alpha):
    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "run"
    extra = [] if alpha is None else ["--wise-alpha", alpha]
    assert (
        main(
            [
                "classify",
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--model",
                "timm:test_efficientnet",
                "--weights",
                str(pretrained_file),
                "--image-size",
                "64",
                "--strategy",
                "full",
                "--epochs",
                "1",
                "--quiet",
                *extra,
            ]
        )
        == 0
    )
    kept = load_file(out / "model.safetensors")  # the best (only) epoch's model
    tuned = {k.removeprefix("model/"): v for k, v in load_file(out / "last.safetensors").items() if k.startswith("model/")}
    pretrained = load_file(pretrained_file)
    a = 0.5 if alpha is None else 1.0  # the default recipe's full: 0.5
    base = [k for k in kept if k.startswith("backbone.") and kept[k].is_floating_point()]
    assert len(base) > 10
    moved = 0
    for k in base:
        p = pretrained[k.removeprefix("backbone.").removeprefix("module.")]
        assert torch.allclose(kept[k], a * tuned[k] + (1 - a) * p, atol=1e-6), k
        moved += not torch.equal(tuned[k], p)
    assert moved > 10  # fine-tuning did move the base
    head = [k for k in kept if k.startswith("head.")]
    assert head and all(torch.equal(kept[k], tuned[k]) for k in head)  # the head is not averaged
