"""The model file's metadata: typed, versioned, and files of the first version still read."""

from __future__ import annotations

import pytest

from visiontune.errors import UserError
from visiontune.meta import META_VERSION, ClassifierMeta, DetectorMeta, EvalPreprocessing, read_meta

# as version 1 wrote them: plain dicts, no version, "epoch" inside detection's top level, extra keys of the file format
V1_CLASSIFIER = {
    "task": "classification",
    "model": "efficientnet_lite0",
    "classes": ["ants", "bees"],
    "head": "linear",
    "num_features": 1280,
    "bank_size": 1,
    "strategy": "linear",
    "recipe": "default",
    "pretrained": "embedded",
    "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 224, "resize_size": 256},
    "advice": None,
    "metrics": {"val_accuracy": 0.95, "epoch": 7},
    "format": "visiontune/1",
    "kind": "model",
    "weights_sha256": "0" * 64,
}
V1_DETECTOR = {
    "task": "detection",
    "model": "maskrcnn",
    "backbone": None,
    "neck": "fpn",
    "classes": ["person"],
    "category_ids": [1],
    "masks": True,
    "data_format": "pennfudan",
    "min_size": 320,
    "max_size": 512,
    "pretrained": "none",
    "metrics": {"segm_AP": 0.4},
    "epoch": 3,
    "format": "visiontune/1",
    "kind": "model",
}


def test_version_1_files_read_as_typed_records():
    c = read_meta(V1_CLASSIFIER, "model.safetensors")
    assert isinstance(c, ClassifierMeta) and c.preprocessing == EvalPreprocessing([0.5] * 3, [0.5] * 3, 224, 256)
    assert c.classes == ["ants", "bees"] and c.metrics["val_accuracy"] == 0.95
    d = read_meta(V1_DETECTOR, "model.safetensors")
    assert isinstance(d, DetectorMeta) and d.category_ids == [1] and d.epoch == 3 and d.masks is True
    assert (d.anchor_ratios, d.anchors_per_octave) == ([0.5, 1.0, 2.0], 1)  # the anchors it was trained with
    assert d.mask_quality_scores is False and d.box_voting is False  # and its scores and boxes: torchvision's


@pytest.mark.parametrize("record", [V1_CLASSIFIER, V1_DETECTOR])
def test_written_records_carry_task_and_version_and_read_back_equal(record):
    meta = read_meta(record, "f")
    written = meta.to_dict()
    assert written["task"] == record["task"] and written["meta_version"] == META_VERSION
    assert read_meta(written, "f") == meta


def test_a_foreign_or_incomplete_record_is_named_in_one_line():
    with pytest.raises(UserError, match="f.safetensors: not a visiontune model"):
        read_meta({"task": "segmentation"}, "f.safetensors")
    with pytest.raises(UserError, match="lacks head, preprocessing"):
        read_meta({"task": "classification", "model": "m", "classes": ["a"]}, "f.safetensors")
