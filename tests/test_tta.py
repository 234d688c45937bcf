"""--tta flip / flip+crops: the class probabilities of an image and its mirror, averaged; recorded in eval's and predict's output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_class_folders

from visiontune.cli import main
from visiontune.errors import UserError
from visiontune.inference.classify import with_tta


def left_vs_right(x: torch.Tensor) -> torch.Tensor:
    """A model that only looks at which half is brighter: flipping the image swaps its answer."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], 1) * 10


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror():
    x = torch.zeros(1, 3, 4, 4)
    x[..., :2] = 1.0  # bright on the left
    plain = left_vs_right(x).softmax(1)
    flipped = with_tta(left_vs_right, "flip")(x).exp()
    assert plain[0, 0] > 0.99 and torch.allclose(flipped, torch.tensor([[0.5, 0.5]]))
    assert with_tta(left_vs_right, "none") is left_vs_right
    with pytest.raises(UserError, match="--tta: unknown 'crops'"):
        with_tta(left_vs_right, "crops")


def test_flip_and_crops_average_six_views_the_corner_crops_enlarged_to_the_input_size():
    x = torch.arange(8.0).expand(1, 3, 8, 8).clone()  # each pixel's value is its column
    seen = []

    def recording(v):
        seen.append(v)
        return left_vs_right(v)

    probs = with_tta(recording, "flip+crops")(x).exp()
    assert len(seen) == 6 and all(v.shape == x.shape for v in seen)
    assert torch.equal(seen[0], x) and torch.equal(seen[1], x.flip(-1))
    top_left, top_right, bottom_left = seen[2], seen[3], seen[4]
    assert (top_right - top_left).mean().item() == pytest.approx(1.0)  # 7/8 crops, one column apart
    assert torch.equal(top_left, bottom_left)  # every row is the same
    assert top_left.min() >= 0 and top_left.max() <= 6  # column 7 is cut off
    assert torch.allclose(probs.sum(1), torch.ones(1))


def test_eval_and_predict_record_the_tta(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data")
    run = tmp_path / "run"
    tiny = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--epochs", "3", "--quiet"]
    assert main(["classify", "train", "--data", str(data), "--out", str(run), *tiny]) == 0
    capsys.readouterr()
    assert main(["classify", "eval", str(run), "--data", str(data), "--tta", "flip"]) == 0
    flip = json.loads(capsys.readouterr().out)
    assert main(["classify", "eval", str(run), "--data", str(data)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (flip["tta"], plain["tta"]) == ("flip", "none") and flip["accuracy"] >= plain["accuracy"] - 1 / 12
    assert main(["classify", "predict", str(run), str(data / "val" / "red"), "--tta", "flip"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6 and all(r["tta"] == "flip" and abs(sum(p["probability"] for p in r["predictions"]) - 1) < 1e-4 for r in lines)
