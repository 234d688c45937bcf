"""Multi-label classification: --labels FILE (path,labels rows), sigmoid + BCE, per-class thresholds kept in the
model file, mAP/F1 in metrics.json, eval and predict, and the ONNX export carrying the thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import stable_seed
from PIL import Image

from visiontune.checkpoint import load_model_file
from visiontune.cli import main
from visiontune.data.multilabel import read_label_file
from visiontune.errors import UserError
from visiontune.metrics.multilabel import choose_thresholds, multilabel_metrics

TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--quiet"]
SETS = [(), ("red",), ("blue",), ("blue", "red")]


def make_multilabel_set(root, train: int = 32, val: int = 16):
    """Grey noise with a red square and/or a blue square (or neither) at random places; labels.csv with a split."""
    rows = ["path,labels,split"]
    for i in range(train + val):
        labels = SETS[i % 4]
        rng = np.random.default_rng(stable_seed("multilabel", i))
        a = np.clip(128 + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        for name, color in (("red", (230, 30, 30)), ("blue", (30, 30, 230))):
            if name in labels:
                y, x = rng.integers(0, 40, 2)
                a[y : y + 24, x : x + 24] = color
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "images" / f"{i:03d}.png")
        rows.append(f"images/{i:03d}.png,{' '.join(labels)},{'train' if i < train else 'val'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, root / "labels.csv"


def test_the_label_file_reads_the_planet_layout_and_names_its_mistakes(tmp_path):
    (tmp_path / "train-jpg").mkdir()
    for name in ("train_0", "train_1", "train_2"):
        Image.new("RGB", (8, 8)).save(tmp_path / "train-jpg" / f"{name}.jpg")
    (tmp_path / "planet.csv").write_text("image_name,tags\ntrain-jpg/train_0,haze primary\ntrain-jpg/train_1,\ntrain-jpg/train_2,clear\n")
    rows = read_label_file(tmp_path / "planet.csv", tmp_path)
    assert rows.classes == ["clear", "haze", "primary"] and rows.val is None
    assert [(p.name, y) for p, y in rows.train] == [("train_0.jpg", (1, 2)), ("train_1.jpg", ()), ("train_2.jpg", (0,))]
    (tmp_path / "twice.jsonl").write_text(
        '{"path": "train-jpg/train_0.jpg", "labels": ["a"]}\n{"path": "train-jpg/train_0", "labels": []}\n'
    )
    with pytest.raises(UserError, match=r"twice.jsonl, lines 1 and 2: the same image twice"):
        read_label_file(tmp_path / "twice.jsonl", tmp_path)
    (tmp_path / "missing.csv").write_text("path,labels\ntrain-jpg/nope.jpg,a\n")
    with pytest.raises(UserError, match=r"missing.csv, line 2: .*nope.jpg: no such file"):
        read_label_file(tmp_path / "missing.csv", tmp_path)


def test_thresholds_sit_where_f1_is_best_and_perfect_scores_give_map_1():
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.float)
    logits = torch.tensor([[3.0, -3], [2, 1], [-2, 2], [-3, -1]])
    cut = choose_thresholds(logits.sigmoid(), targets)
    assert logits.sigmoid()[1, 0] > cut[0] > logits.sigmoid()[2, 0]  # between the last positive and the first negative
    m = multilabel_metrics(logits, targets, ["a", "b"], cut)
    assert m["mAP"] == 1.0 and m["f1_micro"] == 1.0 and m["exact_match"] == 1.0
    assert m["per_class"]["b"]["support"] == 2 and m["per_class"]["a"]["threshold"] == pytest.approx(cut[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multilabel")
    data, labels = make_multilabel_set(tmp / "data")
    run = tmp / "run"
    args = ["classify", "train", "--data", str(data), "--labels", str(labels), "--out", str(run), "--cache-dir", str(tmp / "cache")]
    assert main([*args, *TINY, "--epochs", "40"]) == 0
    return data, labels, run


def test_a_linear_head_learns_which_colours_each_image_holds(trained, capsys):
    data, labels, run = trained
    m = json.loads((run / "metrics.json").read_text())
    assert m["multi_label"] and m["mAP"] >= 0.9 and m["f1_macro"] >= 0.8, m
    assert set(m["per_class"]) == {"blue", "red"} and all("AP" in v and 0 < v["threshold"] < 1 for v in m["per_class"].values())
    _, meta = load_model_file(run / "model.safetensors")
    assert meta["multi_label"] and meta["thresholds"] == [m["per_class"][c]["threshold"] for c in ("blue", "red")]
    capsys.readouterr()
    assert main(["classify", "eval", str(run), "--data", str(data), "--labels", str(labels), "--engine", "torch"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["mAP"] == pytest.approx(m["mAP"], abs=1e-6) and again["f1_micro"] == pytest.approx(m["f1_micro"], abs=1e-6)
    val_only = labels.with_name("val_only.csv")  # eval reads a file of val rows alone, in the model's classes
    val_only.write_text("".join(line for line in labels.read_text().splitlines(True) if not line.rstrip().endswith(",train")))
    assert main(["classify", "eval", str(run), "--data", str(data), "--labels", str(val_only), "--engine", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == pytest.approx(m["mAP"], abs=1e-6)
    import visiontune as vt

    assert vt.evaluate(str(run), str(data), labels=str(labels))["mAP"] == pytest.approx(m["mAP"], abs=1e-4)  # the API, any engine


def test_predict_names_every_label_above_its_threshold_also_from_the_onnx_export(trained, capsys, tmp_path):
    data, _, run = trained
    images = [str(data / "images" / f"{i:03d}.png") for i in range(32, 48)]
    capsys.readouterr()
    assert main(["classify", "predict", str(run), *images, "--engine", "torch"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    predicted = [sorted(x["label"] for x in r["labels"]) for r in lines]
    truth = [sorted(SETS[i % 4]) for i in range(32, 48)]
    assert sum(p == t for p, t in zip(predicted, truth)) >= 12, list(zip(predicted, truth))
    assert main(["export", str(run), "--output", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["classify", "predict", str(tmp_path / "m.onnx"), *images]) == 0
    from_onnx = [sorted(x["label"] for x in json.loads(r)["labels"]) for r in capsys.readouterr().out.splitlines()]
    assert from_onnx == predicted


def test_scikit_learn_heads_fit_one_model_per_class(tmp_path):
    data, labels = make_multilabel_set(tmp_path / "data")
    run = tmp_path / "run"
    args = ["classify", "train", "--data", str(data), "--labels", str(labels), "--out", str(run), "--head", "logreg", "--cache-dir", "none"]
    assert main([*args, *TINY]) == 0
    assert json.loads((run / "metrics.json").read_text())["mAP"] >= 0.9


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--head", "knn"], "--head knn: not for multi-label training"),
        (["--sampler", "balanced"], "--sampler balanced: not for multi-label training"),
        (["--threshold", "1.5"], "--threshold: auto or a number between 0 and 1"),
    ],
)
def test_settings_multi_label_cannot_take_are_one_line(tmp_path, capsys, extra, message):
    data, labels = make_multilabel_set(tmp_path / "data", train=4, val=4)
    args = ["classify", "train", "--data", str(data), "--labels", str(labels), "--out", str(tmp_path / "run")]
    assert main([*args, *TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_real_photo_pairs_of_ants_bees_and_pedestrians(hymenoptera, pennfudan, tmp_path):
    """Two real photos of different classes side by side (bench/multilabel.py): the embedded backbone's linear head on
    cached features finds both (bench, 400 training pairs: see the README)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from multilabel import build_mosaics

    from visiontune.config import ClassifyConfig
    from visiontune.tasks.classify import fit

    data, labels = build_mosaics(hymenoptera, pennfudan, tmp_path / "data", 96, 48, layout="pair")
    m = fit(ClassifyConfig(data=str(data), labels=str(labels), out=str(tmp_path / "run"), quiet=True).validate())
    assert m["mAP"] >= 0.9 and m["f1_macro"] >= 0.8, m
