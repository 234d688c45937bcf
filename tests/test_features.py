"""The on-disk feature cache: reused when nothing changed, rebuilt when any input changed or the file is corrupt."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import make_class_folders
from torch import nn

from visiontune.cli import main
from visiontune.data.classification import open_images
from visiontune.data.splits import scan_folder
from visiontune.data.transforms import classification_train
from visiontune.engine import features as F
from visiontune.engine.frozen import TorchForward

PREP = "decode 40; train transform"


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Images on disk, a random-augmenting dataset over them, a tiny backbone, and a counter of real extractions."""
    root = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    samples = scan_folder(root)
    ds, _ = open_images(samples, 40, classification_train(32, (0.5,) * 3, (0.5,) * 3, 0.25), "ram", progress=False)
    paths = ds.paths
    calls = []
    real_extract = F.extract
    monkeypatch.setattr(F, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))

    def run(backbone=None, name="tiny", prep=PREP, views=2, seed=0):
        backbone = backbone or TinyBackbone()
        return F.cached_extract(name, backbone, TorchForward(backbone), ds, prep, views, seed, tmp_path / "cache", progress=False)

    run.dataset, run.paths = ds, paths
    return run, calls, paths, tmp_path / "cache"


def test_features_are_reused_across_runs(setup):
    run, calls, _, cache = setup
    feats, labels = run()
    assert len(calls) == 1 and feats.shape == (12, 8) and labels.tolist() == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3
    again, labels2 = run()  # a new run: a new backbone object with the same weights
    assert len(calls) == 1, "the second run recomputed instead of reading the cache"
    assert torch.equal(again, feats) and torch.equal(labels2, labels)
    assert len(list(cache.glob("*.safetensors"))) == 1


def mapped_files() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc to see the memory maps")
def test_features_are_pages_of_the_cache_file_not_a_copy_in_ram(setup):
    """A million images' features (10 GB) must not sit in anonymous memory: extraction writes them into the file's
    pages and a later run maps them; both are the same numbers as an extraction held in RAM."""
    run, _, _, cache = setup
    written, labels = run()
    [path] = cache.glob("*.safetensors")
    assert str(path) in mapped_files()
    read, read_labels = run()
    backbone = TinyBackbone()
    in_ram, ram_labels = F.extract(TorchForward(backbone), run.dataset, views=2, seed=0, progress=False)
    assert torch.equal(written, in_ram) and torch.equal(read, in_ram) and torch.equal(read_labels, ram_labels)
    read[0, 0] += 1  # copy-on-write: a consumer writing into its tensor never changes the cache
    assert torch.equal(
        F.load_features(path, json.loads(json.dumps(F.cache_key("tiny", backbone, PREP, 2, 0, run.dataset.items, "torch fp32"))))[0], in_ram
    )


def test_a_build_killed_midway_leaves_a_file_the_next_build_removes(setup):
    run, calls, _, cache = setup
    cache.mkdir(parents=True)
    dead = cache / ".tmp-tiny-0123.safetensors-999999999"  # what a SIGKILLed extraction leaves (its pid is gone)
    dead.write_bytes(b"half a file")
    run()
    assert not dead.exists() and len(list(cache.glob(".tmp-*"))) == 0 and len(list(cache.glob("*.safetensors"))) == 1


def test_the_streamed_checksum_is_the_checkpoint_checksum():
    from visiontune.checkpoint import weights_digest
    from visiontune.engine.feature_file import tensors_digest

    tensors = {"features": torch.randn(7, 5), "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0])}
    assert tensors_digest(tensors) == weights_digest(tensors)


@pytest.mark.parametrize("change", ["mtime", "size", "views", "seed", "preprocessing", "weights", "backbone"])
def test_any_changed_input_invalidates_the_cache(setup, change):
    run, calls, paths, _ = setup
    run()
    kwargs = {}
    if change == "mtime":
        st = os.stat(paths[0])
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "size":
        with open(paths[1], "ab") as f:
            f.write(b"\0")
    elif change == "views":
        kwargs["views"] = 3
    elif change == "seed":
        kwargs["seed"] = 1
    elif change == "preprocessing":
        kwargs["prep"] = "decode 48; train transform"
    elif change == "weights":
        bb = TinyBackbone()
        with torch.no_grad():
            bb.conv.bias[0] += 1e-3
        kwargs["backbone"] = bb
    elif change == "backbone":
        kwargs["name"] = "other"
    feats, _ = run(**kwargs)
    assert len(calls) == 2, f"changed {change} but the cache was used"
    assert feats.shape[0] == 6 * kwargs.get("views", 2)


@pytest.mark.parametrize("damage", ["flip_data_byte", "truncate", "garbage", "other_key"])
def test_corrupt_cache_is_detected_and_rebuilt(setup, damage, caplog):
    run, calls, _, cache = setup
    good, _ = run()
    good = good.clone()  # it maps the file damaged below in place (visiontune itself only ever replaces cache files)
    [path] = cache.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "flip_data_byte":  # inside the tensor data at the end: the file still parses, the checksum catches it
        raw[-5] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a safetensors file")
    if damage == "other_key":  # another cache file copied over this name
        F.save_features(path, {"format": F.CACHE_FORMAT, "backbone": "x"}, torch.zeros(12, 8), torch.zeros(12, dtype=torch.long))
    else:
        path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        feats, _ = run()
    assert len(calls) == 2, f"{damage}: the damaged cache was used"
    assert torch.equal(feats, good)
    assert str(path) in caplog.text and "rebuilding" in caplog.text
    assert (
        F.load_features(path, json.loads(json.dumps(F.cache_key("tiny", TinyBackbone(), PREP, 2, 0, setup[0].dataset.items, "torch fp32"))))
        is not None
    )


def test_unwritable_cache_dir_costs_only_speed(setup, tmp_path, caplog):
    run, calls, _, _ = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        backbone = TinyBackbone()
        feats, _ = F.cached_extract("tiny", backbone, TorchForward(backbone), run.dataset, PREP, 1, 0, blocker / "cache", progress=False)
    assert feats.shape == (6, 8) and "could not write the feature cache" in caplog.text


def test_training_runs_share_the_cache(tmp_path, monkeypatch):
    """Two linear runs on the same images: the second reads the features and learns the same head."""
    data = make_class_folders(tmp_path / "data", per_class=4)
    args = [
        "classify",
        "train",
        "--data",
        str(data),
        "--image-size",
        "64",
        "--quiet",
        "--views",
        "2",
        "--epochs",
        "5",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and val

    def no_extract(*a, **k):
        raise AssertionError("features were recomputed although nothing changed")

    monkeypatch.setattr(F, "extract", no_extract)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert a["best_val_accuracy"] == b["best_val_accuracy"] >= 0.9


def test_streamed_features_equal_in_ram_features_for_any_worker_count(tmp_path):
    """Images read from disk by 2 worker processes give the features of images held in RAM (same seed, same views)."""
    root = make_class_folders(tmp_path / "data", per_class=4, splits=("train",)) / "train"
    tf = classification_train(32, (0.5,) * 3, (0.5,) * 3, 0.25)
    in_ram, _ = open_images(scan_folder(root), 40, tf, "ram", progress=False)
    streamed, _ = open_images(scan_folder(root), 40, tf, "none", progress=False)
    assert in_ram.predecoded and not streamed.predecoded
    torch.manual_seed(0)
    backbone = TinyBackbone()
    a, ya = F.extract(TorchForward(backbone), in_ram, views=2, seed=3, progress=False)
    b, yb = F.extract(TorchForward(backbone), streamed, views=2, seed=3, progress=False, workers=2)
    assert a.shape == (16, 8) and torch.equal(ya, yb) and torch.equal(a, b)


def test_a_run_without_cache_dir_uses_the_default_cache(tmp_path, monkeypatch, caplog):
    """Unset --cache-dir means the default folder ($VISIONTUNE_CACHE here), not "none": the second run reads the
    features the first one wrote, and --cache-dir none writes nothing."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "default-cache"))
    caplog.set_level(logging.INFO, logger="visiontune")
    data = make_class_folders(tmp_path / "data", per_class=3)
    tiny = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--epochs", "1", "--quiet", "--engine", "torch"]
    for i in range(2):
        assert main(["classify", "train", "--data", str(data), "--out", str(tmp_path / f"run{i}"), *tiny]) == 0
    assert len(list((tmp_path / "default-cache").glob("*.safetensors"))) == 2  # train and val features
    assert caplog.text.count("features from cache") == 2  # the second run read both
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "unused"))
    assert main(["classify", "train", "--data", str(data), "--out", str(tmp_path / "run2"), *tiny, "--cache-dir", "none"]) == 0
    assert not (tmp_path / "unused").exists() or not list((tmp_path / "unused").glob("*.safetensors"))
