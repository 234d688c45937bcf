"""--strategy auto: the rules of thumb, the measurements behind them, and their record in the run."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_class_folders, make_image, stable_seed

from visiontune.advisor import SMALL_PER_CLASS, choose_strategy, decide
from visiontune.cli import main
from visiontune.config import ClassifyConfig


@pytest.mark.parametrize(
    "per_class, score, seconds, expected",
    [
        (50, None, None, "full"),  # no pretrained weights: nothing to transfer
        (50, 0.95, 100, "linear"),  # very similar
        (5000, 0.95, 100, "linear"),  # very similar, even when large
        (50, 0.7, 100, "linear"),  # small and similar
        (50, 0.2, 100, "partial"),  # small and dissimilar: few trainable stages
        (5000, 0.7, 100, "partial"),  # large and similar
        (5000, 0.2, 100, "full"),  # large and dissimilar
        (5000, 0.2, 10 * 3600, "linear"),  # large but low compute
    ],
)
def test_rules_of_thumb(per_class, score, seconds, expected):
    advice = decide(per_class, score, seconds, num_stages=9)
    assert advice.strategy == expected
    assert advice.reason
    if expected == "partial" and per_class < SMALL_PER_CLASS:
        assert advice.trainable_stages == 2  # few: the last quarter of nine stages
    else:
        assert advice.trainable_stages is None


def test_classes_the_features_cannot_tell_apart_get_partial(tmp_path):
    for c in ("left", "right"):  # the same grey noise in both classes: nothing in the pretrained features separates them
        for i in range(20):  # with 10 per class a chance score of 0.7 turned up one time in a few dozen
            make_image(tmp_path / "train" / c / f"{i}.png", (128, 128, 128), seed=stable_seed("train", c, i))
            make_image(tmp_path / "val" / c / f"{i}.png", (128, 128, 128), seed=stable_seed("val", c, i))
    advice = choose_strategy(ClassifyConfig(data=str(tmp_path), image_size=64, quiet=True))
    assert advice.measurements["probe_score"] < 0.6
    assert advice.strategy == "partial" and advice.trainable_stages == 2


def test_auto_is_recorded_in_the_run(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=5)
    out = tmp_path / "run"
    assert (
        main(["classify", "train", "--data", str(data), "--out", str(out), "--image-size", "64", "--strategy", "auto", "--epochs", "2"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "advisor: train_images 10" in printed and "probe_accuracy" in printed and "advisor: strategy linear:" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "linear" and metrics["advice"]["strategy"] == "linear" and metrics["advice"]["reason"]
    m = metrics["advice"]["measurements"]  # red vs blue: the pretrained features separate them
    assert m["images_per_class"] == 5 and m["classes"] == 2 and m["probe_accuracy"] >= 0.9 and m["probe_score"] >= 0.8
    assert m["estimated_full_finetune_seconds"] > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"] == "linear"  # the effective setting
    assert "Strategy advisor" in (out / "report.html").read_text()
