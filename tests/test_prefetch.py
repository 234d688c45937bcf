"""Reading ahead in a thread (data/prefetch.py) gives the loader's batches unchanged, and predict opens a cached graph
without building the PyTorch model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_class_folders
from torch.utils.data import DataLoader, Dataset

from visiontune.cli import main
from visiontune.data.prefetch import in_background
from visiontune.engine.distributed import SeededPerSample
from visiontune.inference import classify


class RandomViews(Dataset):
    """Item i: a random draw from torch's generator (as an augmentation draws) next to i; ``broken`` raises."""

    def __init__(self, broken: int = -1):
        self.broken, self.threads = broken, {}

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        if i == self.broken:
            raise ValueError(f"item {i} is broken")
        self.threads[i] = torch.get_num_threads()
        return torch.rand(3), i


class OwnThreads:
    own_threads = True  # as an ONNX Runtime engine says


def test_batches_come_in_order_with_the_same_random_views_and_torchs_threads_restored():
    data, threads = RandomViews(), torch.get_num_threads()
    serial = list(DataLoader(SeededPerSample(data, 0, 1), batch_size=4))
    ahead = list(in_background(DataLoader(SeededPerSample(data, 0, 1), batch_size=4), OwnThreads()))
    assert torch.get_num_threads() == threads and len(ahead) == len(serial) == 3
    for (a, i), (b, j) in zip(ahead, serial):
        assert torch.equal(i, j) and torch.equal(a, b)
    assert set(data.threads.values()) == {1}


def test_an_error_in_the_thread_is_raised_at_its_batch():
    data = RandomViews(broken=5)
    got = []
    with pytest.raises(ValueError, match="item 5 is broken"):
        for _, i in in_background(DataLoader(data, batch_size=4)):
            got.append(i.tolist())
    assert got == [[0, 1, 2, 3]]


def test_predict_opens_the_cached_graph_without_building_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))  # no graph of another test's run
    data = make_class_folders(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    args = ["--image-size", "64", "--epochs", "3", "--quiet", "--cache-dir", "none"]
    assert main(["classify", "train", "--data", str(data), "--out", str(run), *args]) == 0
    builds = []
    build = classify.build_classifier
    monkeypatch.setattr(classify, "build_classifier", lambda *a, **k: builds.append(1) or build(*a, **k))
    images = [data / "val"]
    first = classify.predict(run, images, engine="onnxruntime")  # writes the graph: builds the model once
    assert len(builds) == 1
    again = classify.predict(run, images, engine="onnxruntime")
    assert len(builds) == 1 and again == first
    eager = classify.predict(run, images, engine="torch")
    assert len(builds) == 2 and len(eager) == len(first) == 8
    for a, b in zip(first, eager):
        assert a["path"] == b["path"] and a["predictions"][0]["label"] == b["predictions"][0]["label"]
        assert all(abs(p["probability"] - q["probability"]) <= 1e-4 for p, q in zip(a["predictions"], b["predictions"]))
