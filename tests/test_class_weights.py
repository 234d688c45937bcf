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


def test_balanced_draw_makes_every_class_equally_likely():
    from visiontune.engine.distributed import balanced_draw

    labels = torch.tensor([0] * 95 + [1] * 5)
    drawn = labels[balanced_draw(labels, torch.Generator().manual_seed(0), 4000)]
    assert 0.45 < drawn.float().mean().item() < 0.55  # class 1 is 5% of the images, half of the draws


def test_the_balanced_sampler_depends_on_seed_and_epoch_only():
    from visiontune.tasks.schedule import epoch_loader

    class Labels(torch.utils.data.Dataset):
        labels = [0] * 18 + [1] * 2

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return torch.zeros(1), self.labels[i]

    def order(epoch):
        return [y.tolist() for _, y in epoch_loader(Labels(), 4, seed=1, epoch=epoch, workers=0, balanced=True)]

    assert order(0) == order(0) and order(0) != order(1)
    assert sum(map(len, order(0))) == 20 and sum(map(sum, order(0))) >= 5  # as many draws as images; minority ~half


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_a_balanced_sampler_lifts_the_minority_class_recall(head):
    """Two overlapping classes, 95:5 in training, 1:1 in validation: the head trained on balanced draws finds
    many more of the minority class than the one trained on the images as they come."""
    from types import SimpleNamespace

    from torch import nn

    from visiontune.tasks.cached_head import train_head_on_features
    from visiontune.tasks.objective import SingleLabel

    g = torch.Generator().manual_seed(0)

    def points(n0, n1):
        x = torch.randn(n0 + n1, 2, generator=g)
        x[n0:, 0] += 1.5
        return x, torch.tensor([0] * n0 + [1] * n1)

    train, val = points(190, 10), points(200, 200)

    def minority_recall(balanced: bool) -> float:
        torch.manual_seed(0)
        linear = nn.Sequential(nn.Linear(2, 2))
        model = SimpleNamespace(head=linear, forward_head=linear)
        seen = {}
        objective = SingleLabel(["a", "b"], None, 0.0)
        train_head_on_features(
            model, head, 16, 0.0, objective, 0, train, val, 30, 0.05, lambda p, s, lg: seen.update(l=lg), balanced=balanced
        )
        return (seen["l"].argmax(1)[200:] == 1).float().mean().item()

    plain, balanced = minority_recall(False), minority_recall(True)
    assert balanced > plain + 0.3, (plain, balanced)
