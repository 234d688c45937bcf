"""Detection recipes (--recipe default|tutorial), --time-budget, and their options: --schedule step|cosine and
--scale-jitter (multi-scale training, evaluation at one size)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from detection_helpers import make_pennfudan

from visiontune.config import DetectConfig
from visiontune.data.formats import load_splits
from visiontune.data.instance import DetectionDataset
from visiontune.engine.loop import fit_epochs_to_budget
from visiontune.errors import UserError
from visiontune.inference.load import load_detector
from visiontune.metrics.coco import evaluate_model
from visiontune.models.detection import build_detector, fit_anchor_ratios
from visiontune.tasks.detect import epoch_batches, fit, jitter_factors, lr_factor, resolve_settings, set_scales

TINY = dict(min_size=64, max_size=64, quiet=True, backbone_weights="none", seed=0)


def test_the_step_schedule_is_the_tutorials_and_cosine_decays_to_zero_after_the_same_warm_up():
    steps, epochs = 10, 4
    step = [lr_factor(s, steps, 3) for s in range(steps * epochs)]
    cosine = [lr_factor(s, steps, 3, "cosine", epochs) for s in range(steps * epochs)]
    assert step[0] == cosine[0] == pytest.approx(0.001) and step[9] == cosine[9] == pytest.approx(1.0)  # warm-up: 9 steps
    assert step[29] == 1.0 and step[30] == pytest.approx(0.1)  # /10 after --lr-step 3 epochs
    assert cosine[9 + (40 - 9) // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 31)))
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:])) and cosine[-1] < 0.01


def test_scale_jitter_draws_one_size_per_global_batch_from_the_batch_order_and_evaluates_at_min_size(tmp_path):
    data = make_pennfudan(tmp_path / "pf", 12)
    train, _, _ = load_splits(DetectConfig(data=str(data), val_last=2))
    ds = DetectionDataset(train, train=True)
    cfg = DetectConfig(min_size=320, max_size=512, scale_jitter=0.25, batch_size=2, seed=3)
    loaders = [epoch_batches(ds, cfg, epoch, 0) for epoch in (0, 0, 1)]
    scales = [[{t["scale"] for t in targets} for _, targets in loader] for loader in loaders]
    assert all(len(s) == 1 and min(s) in jitter_factors(0.25) for s in scales[0])  # one scale a batch
    assert scales[0] == scales[1] != scales[2]  # a function of (seed, epoch): a resumed epoch draws the same
    model = build_detector("maskrcnn", 2, backbone_weights="none", min_size=320, max_size=512)
    set_scales(model, cfg, 0.75)
    assert model.transform.min_size == (240,) and model.transform.max_size == 384
    set_scales(model, cfg)
    assert model.transform.min_size == (320,) and model.transform.max_size == 512
    model.eval()
    images, _ = model.transform([torch.rand(3, 200, 300)])
    assert images.image_sizes == [(320, 480)]  # the shorter side at --min-size, as without jitter


def test_bad_schedule_and_jitter_are_one_line():
    with pytest.raises(UserError, match="--schedule: unknown schedule 'linear'"):
        DetectConfig(schedule="linear").validate()
    with pytest.raises(UserError, match=r"--scale-jitter: must be in \[0, 1\), got 1.5"):
        DetectConfig(scale_jitter=1.5).validate()
    with pytest.raises(UserError, match="--anchors: unknown anchors 'kmeans'; choose fit or fixed"):
        DetectConfig(anchors="kmeans").validate()


def test_recipes_fill_what_is_unset_and_explicit_settings_win():
    default = resolve_settings(DetectConfig())
    assert (default.epochs, default.schedule, default.scale_jitter) == (24, "cosine", 0.3)
    tutorial = resolve_settings(DetectConfig(recipe="tutorial"))
    assert (tutorial.epochs, tutorial.schedule, tutorial.lr_step, tutorial.scale_jitter) == (10, "step", 3, 0.0)
    mine = resolve_settings(DetectConfig(recipe="tutorial", epochs=3, scale_jitter=0.2))
    assert (mine.epochs, mine.schedule, mine.scale_jitter) == (3, "step", 0.2)  # the previous default: tutorial, 3 epochs
    with pytest.raises(UserError, match="--recipe: unknown recipe 'fast'"):
        DetectConfig(recipe="fast").validate()


def test_anchor_shapes_are_the_middles_of_the_thirds_of_the_training_boxes_height_to_width():
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 30.0]]), torch.tensor([[5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 10.0, 40.0]])]
    assert fit_anchor_ratios(boxes) == (2.33, 3.0, 3.67)  # heights / widths 3, 2, 4: quantiles 1/6, 1/2, 5/6
    assert fit_anchor_ratios([]) == fit_anchor_ratios([torch.zeros((0, 4))]) == (0.5, 1.0, 2.0)


@pytest.mark.parametrize("recipe, per_octave", [("default", 2), ("tutorial", 1)])
def test_the_default_recipe_fits_the_anchors_and_the_model_file_rebuilds_them(tmp_path, recipe, per_octave):
    data = make_pennfudan(tmp_path / "pf", n=5)
    cfg = DetectConfig(data=str(data), out=str(tmp_path / "run"), recipe=recipe, epochs=1, val_last=2, **TINY)
    m = fit(cfg)
    train, val, _ = load_splits(cfg)
    expected = fit_anchor_ratios([r.boxes for r in train]) if recipe == "default" else (0.5, 1.0, 2.0)
    assert expected != (0.5, 1.0, 2.0) or recipe == "tutorial"  # the synthetic rectangles are not torchvision's shapes
    model, meta = load_detector(tmp_path / "run")  # a size mismatch of the RPN head would raise here
    assert (tuple(meta.anchor_ratios), meta.anchors_per_octave) == (expected, per_octave)
    generator = model.rpn.anchor_generator
    assert generator.aspect_ratios[0] == expected and generator.num_anchors_per_location() == [3 * per_octave] * 4
    assert meta.mask_quality_scores and model.roi_heads.mask_quality_scores  # scored as it was validated
    assert meta.box_voting and model.roi_heads.box_voting  # and its boxes voted
    again, _ = evaluate_model(model, val, meta.classes, True, torch.device("cpu"))
    assert again["bbox_AP"] == pytest.approx(m["bbox_AP"], abs=0.02)  # the model trained, not one of other anchors
    assert again["segm_AP"] == pytest.approx(m["segm_AP"], abs=0.02)


def test_time_budget_lowers_the_epochs_after_the_first_and_saves_them(tmp_path):
    data = make_pennfudan(tmp_path / "pf", n=3)
    m = fit(DetectConfig(data=str(data), out=str(tmp_path / "run"), epochs=3, time_budget=0.001, val_last=1, **TINY))
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert m["epochs"] == 1 and len(log) == 1  # 0.06 s: one epoch, the least a run trains
    assert "epochs: 1\n" in (tmp_path / "run" / "config.yaml").read_text()  # a resumed run keeps the decided schedule


def test_time_budget_never_adds_epochs(tmp_path):
    data = make_pennfudan(tmp_path / "pf", n=3)
    m = fit(DetectConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, time_budget=600, val_last=1, **TINY))
    assert m["epochs"] == 2 and len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_val_every_validates_the_first_every_nth_and_the_last_epoch_and_keeps_a_validated_model(tmp_path):
    data = make_pennfudan(tmp_path / "pf", n=4)
    m = fit(DetectConfig(data=str(data), out=str(tmp_path / "run"), epochs=4, val_every=2, val_last=1, **TINY))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3, 4] and all("train_loss" in e for e in log)
    assert [e["epoch"] for e in log if "bbox_AP" in e] == [1, 2, 4]
    assert m["best_epoch"] in (1, 2, 4)
    with pytest.raises(UserError, match="--val-every"):
        DetectConfig(val_every=0).validate()


def test_time_budget_plans_from_the_second_epoch_on_with_a_share_of_the_validation(tmp_path):
    """A first epoch of 20 s, 10 of them training, then one of 8 s training, in a 1-minute budget: after the first,
    no decision (3 would fit at its pace); after the second, 3 epochs when each validates (later ones cost 8 s + 10 s),
    5 with --val-every 5 (8 s + 10/5 s); a slower third epoch lowers that again, a faster one never raises it."""
    first, second = {"train_seconds": 10.0, "elapsed_seconds": 20.0}, {"train_seconds": 8.0, "elapsed_seconds": 28.0}
    for every, expected in ((1, 3), (5, 5)):
        cfg = DetectConfig(epochs=100, time_budget=1.0, val_every=every)
        fit_epochs_to_budget(cfg, [first], tmp_path, progress=False)
        assert cfg.epochs == 100
        fit_epochs_to_budget(cfg, [first, second], tmp_path, progress=False)
        assert cfg.epochs == expected
    slow, fast = {"train_seconds": 14.0, "elapsed_seconds": 44.0}, {"train_seconds": 1.0, "elapsed_seconds": 33.0}
    fit_epochs_to_budget(cfg, [first, second, fast], tmp_path, progress=False)
    assert cfg.epochs == 5
    fit_epochs_to_budget(cfg, [first, second, slow], tmp_path, progress=False)
    assert cfg.epochs == 4  # 3 + (60 - 44) // (14 + 2)
    assert "epochs: 4\n" in (tmp_path / "config.yaml").read_text()
    cfg = DetectConfig(epochs=100, time_budget=0.5)  # 30 s: after the first epoch, room for one more at most
    fit_epochs_to_budget(cfg, [first], tmp_path, progress=False)
    assert cfg.epochs == 1
