"""--class-weights: inverse-frequency or given weights reach the loss; balanced accuracy is reported beside accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from visiontune.errors import UserError
from visiontune.metrics.classification import class_weights, classification_metrics


def test_auto_weights_are_inverse_frequency_averaging_one_per_image():
    w = class_weights("auto", [0, 0, 0, 1, 2, 2], ["a", "b", "c"])
    assert torch.allclose(w, torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    assert torch.isclose((w[torch.tensor([0, 0, 0, 1, 2, 2])]).mean(), torch.tensor(1.0))
    assert class_weights("none", [0, 1], ["a", "b"]) is None


def test_weights_from_a_file_and_its_mistakes(tmp_path):
    good = tmp_path / "w.json"
    good.write_text(json.dumps({"bees": 3}))
    assert class_weights(str(good), [0, 1], ["ants", "bees"]).tolist() == [1.0, 3.0]
    cases = {
        "{": "not a readable JSON file",
        json.dumps({"wasps": 2}): r"unknown class\(es\) wasps",
        json.dumps({"bees": -1}): "a number >= 0",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(UserError, match=message):
            class_weights(str(good), [0, 1], ["ants", "bees"])
    with pytest.raises(UserError, match="nothing.json"):
        class_weights(str(tmp_path / "nothing.json"), [0, 1], ["ants", "bees"])


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
    logits = torch.tensor([[1.0, 0.0]] * 9 + [[1.0, 0.0]])  # everything predicted as class 0
    labels = torch.tensor([0] * 9 + [1])
    m = classification_metrics(logits, labels, ["ants", "bees"])
    assert m["accuracy"] == pytest.approx(0.9) and m["balanced_accuracy"] == pytest.approx(0.5)


def test_weights_change_what_the_loss_asks_for():
    """The same logits, the same labels: with the minority class weighted up, the loss grows with its error."""
    from torch import nn

    logits, labels = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 0, 1])
    plain = nn.CrossEntropyLoss()(logits, labels)
    weighted = nn.CrossEntropyLoss(weight=class_weights("auto", labels.tolist(), ["a", "b"]))(logits, labels)
    assert weighted > plain
