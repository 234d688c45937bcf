"""Every --head learns on cached features, is saved in the model file, and is the one eval and predict use."""

from __future__ import annotations

import json

import pytest
from conftest import make_class_folders

from visiontune.cli import main
from visiontune.inference.classify import evaluate, predict
from visiontune.inference.load import load_classifier

CLASSES = ("blue", "green", "red")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Three colour classes and one feature cache for all heads (the first run computes, the others reuse)."""
    root = tmp_path_factory.mktemp("heads")
    return make_class_folders(root / "data", classes=CLASSES, per_class=4), root / "cache"


@pytest.mark.parametrize("head", ["linear", "mlp", "logreg", "svm", "knn"])
def test_head_learns_and_is_used_by_eval_and_predict(shared, tmp_path, head, capsys):
    data, cache = shared
    out = tmp_path / head
    assert (
        main(
            [
                "classify",
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--head",
                head,
                "--image-size",
                "64",
                "--views",
                "2",
                "--epochs",
                "15",
                "--cache-dir",
                str(cache),
                "--quiet",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"] == head and metrics["best_val_accuracy"] >= 0.9

    model, meta = load_classifier(out)
    assert meta.head == head and model.head_kind == head
    if head == "knn":  # the bank holds the training features of every view
        assert model.head.bank.shape == (2 * 12, 1280) and model.head.bank.abs().sum() > 0
        assert sorted(model.head.bank_labels.unique().tolist()) == [0, 1, 2]

    # a head that was not the trained one would score about 1/3 on three classes
    assert evaluate(out, data)["accuracy"] >= 0.9
    results = predict(out, [data / "val"])
    right = sum(r["predictions"][0]["label"] in r["path"] for r in results)
    assert len(results) == 12 and right >= 11
