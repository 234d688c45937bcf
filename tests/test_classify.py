"""Classification end to end through the CLI: train, eval, predict; splits; the shared ants/bees set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders, make_image

from visiontune import checkpoint as ckpt
from visiontune.cli import main
from visiontune.data.splits import find_splits, scan_folder

SMALL = ["--image-size", "64", "--quiet", "--seed", "0"]


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["classify", "train", "--data", str(data), "--out", str(out), *SMALL, *extra])


def test_linear_run_writes_everything_and_learns(tiny_folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_folders, out, "--epochs", "10") == 0
    for name in ("model.safetensors", "metrics.json", "log.jsonl", "config.yaml", "predictions.png", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "best_val_accuracy",
        "final_val_accuracy",
        "epochs",
        "train_seconds",
        "strategy",
        "model",
        "trainable_params",
        "total_params",
    ):
        assert key in m
    assert m["strategy"] == "linear" and m["model"] == "efficientnet_lite0" and m["epochs"] == 10
    assert m["best_val_accuracy"] >= 0.9  # red vs blue noise images
    assert m["trainable_params"] == 1280 * 2 + 2 < m["total_params"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 10

    _, meta = ckpt.load_model_file(out / "model.safetensors")  # self-contained: classes and preprocessing inside
    assert meta["classes"] == ["blue", "red"] and meta["preprocessing"]["input_size"] == 64

    capsys.readouterr()
    assert main(["classify", "predict", str(out), str(tiny_folders / "val" / "red"), "--topk", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6
    assert all(r["predictions"][0]["label"] == "red" for r in lines)
    assert abs(sum(p["probability"] for p in lines[0]["predictions"]) - 1) < 1e-4

    assert main(["classify", "eval", str(out), "--data", str(tiny_folders)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] >= 0.9 and set(ev["per_class"]) == {"blue", "red"}
    assert ev["per_class"]["red"]["support"] == 6 and sum(map(sum, ev["confusion_matrix"])) == 12


def test_large_sets_keep_one_view_unless_told(tiny_folders, tmp_path, monkeypatch):
    """The default recipe's 2 views per training image below strategies.ONE_VIEW_FROM images, 1 from there on (lowered
    here to the tiny set's size); --views wins either way; config.yaml records what ran."""
    import yaml

    from visiontune import strategies

    def run(name, *extra):
        assert _train(tiny_folders, tmp_path / name, "--epochs", "1", *extra) == 0
        views = yaml.safe_load((tmp_path / name / "config.yaml").read_text())["views"]
        images = json.loads((tmp_path / name / "metrics.json").read_text())["feature_extraction"]["train"]["images"]
        return views, images

    train_images = len(scan_folder(tiny_folders / "train").items)
    assert run("small") == (2, 2 * train_images)
    monkeypatch.setattr(strategies, "ONE_VIEW_FROM", train_images)
    assert run("large") == (1, train_images)
    assert run("told", "--views", "3") == (3, 3 * train_images)


@pytest.mark.parametrize("strategy", ["full", "partial", "staged"])
def test_gradient_strategies_run_and_record_trainable_params(tiny_folders, tmp_path, strategy):
    out = tmp_path / strategy
    assert _train(tiny_folders, out, "--strategy", strategy, "--epochs", "2", "--batch-size", "4") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == strategy
    if strategy == "partial":
        assert 1280 * 2 < m["trainable_params"] < m["total_params"]
    else:
        assert m["trainable_params"] == m["total_params"]
    assert m["best_val_accuracy"] >= 0.5


def test_tutorial_recipe_is_the_tutorials(tiny_folders, tmp_path):
    from visiontune.config import ClassifyConfig
    from visiontune.tasks.classify import resolve_settings

    cfg, recipe = resolve_settings(ClassifyConfig(data="x", out="y", strategy="full", recipe="tutorial"))
    assert (cfg.epochs, cfg.batch_size, cfg.lr, recipe.optimizer, recipe.momentum, recipe.schedule, recipe.step_epochs) == (
        25,
        4,
        1e-3,
        "sgd",
        0.9,
        "step",
        7,
    )
    assert recipe.crop_scale_min == 0.08
    out = tmp_path / "tut"
    assert _train(tiny_folders, out, "--recipe", "tutorial", "--strategy", "full", "--epochs", "1") == 0
    assert json.loads((out / "metrics.json").read_text())["recipe"] == "tutorial"


def test_same_seed_same_run(tiny_folders, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert _train(tiny_folders, out, "--strategy", "full", "--epochs", "1", "--batch-size", "4") == 0
    sa, _ = ckpt.load_model_file(a / "model.safetensors")
    sb, _ = ckpt.load_model_file(b / "model.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_val_split_is_stratified_and_seeded(tmp_path):
    root = make_class_folders(tmp_path / "flat", per_class=10, splits=("",))
    tr1, va1 = find_splits(root, val_split=0.2, seed=3)
    tr2, va2 = find_splits(root, val_split=0.2, seed=3)
    _, va3 = find_splits(root, val_split=0.2, seed=4)
    assert va1.items == va2.items and va1.items != va3.items
    assert va1.counts() == {"blue": 2, "red": 2} and tr1.counts() == {"blue": 8, "red": 8}
    assert not set(tr1.items) & set(va1.items)


def test_gif_placeholders_are_skipped_not_counted(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=3, splits=("",))
    make_image(root / "red" / "imageNotFound.gif", (255, 255, 255), mode="P")
    samples = scan_folder(root)
    assert len(samples) == 6
    assert any(s.endswith("imageNotFound.gif") for s in samples.skipped)


def test_image_modes_all_load(tmp_path):
    """Grayscale, RGBA, palette, CMYK and 16-bit images are data, not errors."""
    root = make_class_folders(tmp_path / "d", per_class=4)
    for i, mode in enumerate(["L", "RGBA", "P", "CMYK", "I;16"]):
        ext = ".jpg" if mode == "CMYK" else ".png"
        make_image(root / "train" / "red" / f"mode{i}{ext}", (220, 40, 40), mode=mode)
    assert _train(root, tmp_path / "run", "--epochs", "2") == 0


@pytest.mark.shared
def test_hymenoptera_linear_reaches_090_and_its_report_names_planted_label_errors(hymenoptera, tmp_path):
    """The real ants/bees set (symlinked, 5 ants filed under bees), the embedded backbone, a brief linear run (CI):
    it learns, and the run's label check puts the 5 among the 12 training images it asks to check."""
    data = tmp_path / "data"
    flipped = sorted((hymenoptera / "train" / "ants").glob("*.jpg"))[::25][:5]
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (data / split / cls).mkdir(parents=True)
        for cls in ("ants", "bees"):
            for f in (hymenoptera / split / cls).iterdir():
                to = "bees" if f in flipped else cls
                (data / split / to / f.name).symlink_to(f)
    out = tmp_path / "ants_bees"
    assert main(["classify", "train", "--data", str(data), "--out", str(out), "--quiet", "--epochs", "10", "--views", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_val_accuracy"] >= 0.9, m["best_val_accuracy"]
    assert any("imageNotFound.gif" in s for s in m["skipped_non_images"])
    named = {Path(r["path"]).name for r in m["label_suspects"]}
    assert len(named & {f.name for f in flipped}) >= 4, (named, flipped)
    assert "Training labels to check" in (out / "report.html").read_text()
