"""The frozen forward pass on PyTorch or ONNX Runtime: the same features, the faster engine chosen once and remembered,
the graph written once, and PyTorch when a module cannot be exported."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_class_folders
from torch import nn

from visiontune.cli import main
from visiontune.engine import features as F
from visiontune.engine import frozen
from visiontune.engine.frozen import GraphForward, TorchForward, frozen_forward
from visiontune.errors import UserError
from visiontune.models.backbones import build_backbone


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0").module.eval()


@pytest.mark.parametrize("engine,tolerance", [("onnxruntime", 1e-4), ("openvino", 1e-4), ("openvino-bf16", 0.05)])
def test_graph_engines_compute_pytorch_fp32s_features(lite0, tmp_path, engine, tolerance):
    """fp32 engines within 1e-4 of the largest feature; bf16 within 5% (measured: 2%), which is why auto picks it only
    for runs that compute in bf16."""
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    expected = TorchForward(lite0)(x)
    got = GraphForward("efficientnet_lite0", lite0, 96, tmp_path, engine)(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (4, 1280)
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    assert len(list((tmp_path / "graphs").glob("efficientnet_lite0-*.onnx"))) == 1


def test_auto_times_both_engines_once_and_remembers(lite0, tmp_path, monkeypatch):
    first = frozen_forward("efficientnet_lite0", lite0, 64, "auto", cache_dir=tmp_path, batch_size=4)
    (key, record), *others = json.loads((tmp_path / "engines.json").read_text()).items()
    assert not others and "efficientnet_lite0 | 64px batch 4" in key
    assert set(record["seconds"]) == {"torch fp32", "onnxruntime fp32", "openvino fp32"}
    assert first.name == record["fastest"] == min(record["seconds"], key=record["seconds"].get)

    def no_timing(*a):
        raise AssertionError("timed again although the answer was remembered")

    monkeypatch.setattr(frozen, "_time", no_timing)
    assert frozen_forward("efficientnet_lite0", lite0, 64, "auto", cache_dir=tmp_path, batch_size=4).name == first.name


@pytest.mark.parametrize("bf16", [False, True])
def test_auto_times_bf16_engines_only_for_bf16_runs(lite0, tmp_path, monkeypatch, bf16):
    fake_seconds = {"openvino bf16": 0.1, "onnxruntime fp32": 0.5}
    monkeypatch.setattr(frozen, "_time", lambda forward, x: fake_seconds.get(forward.name, 1.0))
    chosen = frozen_forward("efficientnet_lite0", lite0, 64, "auto", bf16=bf16, cache_dir=tmp_path, batch_size=4)
    (record,) = json.loads((tmp_path / "engines.json").read_text()).values()
    expected = (
        {"torch bf16", "onnxruntime fp32", "openvino fp32", "openvino bf16"}
        if bf16
        else {"torch fp32", "onnxruntime fp32", "openvino fp32"}
    )
    assert set(record["seconds"]) == expected
    assert chosen.name == ("openvino bf16" if bf16 else "onnxruntime fp32")


def test_the_graph_is_written_once_and_rewritten_when_damaged(lite0, tmp_path, monkeypatch, caplog):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = GraphForward("efficientnet_lite0", lite0, 64, tmp_path)(x)
    (graph,) = (tmp_path / "graphs").glob("*.onnx")
    real_write = frozen.write_onnx
    monkeypatch.setattr(frozen, "write_onnx", lambda *a: pytest.fail("exported again although the graph was there"))
    assert torch.equal(GraphForward("efficientnet_lite0", lite0, 64, tmp_path)(x), expected)
    graph.write_bytes(graph.read_bytes()[:1000])  # truncated
    monkeypatch.setattr(frozen, "write_onnx", real_write)
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        assert torch.equal(GraphForward("efficientnet_lite0", lite0, 64, tmp_path)(x), expected)
    assert "unreadable; writing it again" in caplog.text


class NotExportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            raise RuntimeError("this module has no ONNX form")
        return self.conv(x).mean((2, 3))


def test_a_module_that_cannot_be_exported_runs_in_pytorch(tmp_path, caplog):
    module = NotExportable()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        got = frozen_forward("odd", module, 16, "onnxruntime", cache_dir=tmp_path)(x)
        auto = frozen_forward("odd", module, 16, "auto", cache_dir=tmp_path / "b", batch_size=2)
    assert torch.allclose(got, module(x)) and auto.name == "torch fp32"
    assert "odd: the frozen pass runs in PyTorch (its ONNX export failed: this module has no ONNX form)" in caplog.text
    assert not (tmp_path / "b" / "engines.json").exists()


def test_the_engine_is_part_of_the_feature_cache_key(lite0, tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=2, splits=("train",)) / "train"
    from visiontune.data.classification import open_images
    from visiontune.data.splits import scan_folder
    from visiontune.data.transforms import classification_eval

    ds, _ = open_images(scan_folder(root), 64, classification_eval(64, 64, (0.5,) * 3, (0.5,) * 3), "ram", progress=False)
    runs = [TorchForward(lite0), GraphForward("efficientnet_lite0", lite0, 64, tmp_path)]
    feats = [F.cached_extract("efficientnet_lite0", lite0, f, ds, "eval 64", cache_dir=tmp_path, progress=False)[0] for f in runs]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert (feats[0] - feats[1]).abs().max() <= 1e-4 * feats[0].abs().max()


def test_unknown_engine_and_a_missing_package_are_refused(lite0, monkeypatch):
    with pytest.raises(UserError, match="--engine: unknown engine 'tensorrt'"):
        frozen_forward("efficientnet_lite0", lite0, 64, "tensorrt")
    monkeypatch.setattr(frozen.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--engine openvino: the openvino package is not installed; pip install openvino"):
        frozen_forward("efficientnet_lite0", lite0, 64, "openvino")
    assert frozen_forward("efficientnet_lite0", lite0, 64, "auto").name == "torch fp32"  # nothing else to time
    assert main(["classify", "train", "--data", "x", "--engine", "tensorrt"]) == 2


@pytest.mark.slow
def test_linear_runs_learn_the_same_head_on_either_engine(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    common = ["classify", "train", "--data", str(data), "--image-size", "64", "--quiet", "--epochs", "5", "--precision", "fp32"]
    for engine in ("torch", "onnxruntime"):
        assert main([*common, "--engine", engine, "--out", str(tmp_path / engine), "--cache-dir", str(tmp_path / f"c-{engine}")]) == 0
    a, b = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("torch", "onnxruntime"))
    assert a["best_val_accuracy"] == b["best_val_accuracy"] >= 0.9
    assert a["feature_extraction"]["engine"] == "torch fp32" and b["feature_extraction"]["engine"] == "onnxruntime fp32"
    assert b["feature_extraction"]["train"]["images"] == 8 * 2 and b["feature_extraction"]["val"]["images_per_second"] > 0


def test_eval_and_predict_keep_the_graph_in_their_cache_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "default"))
    data = make_class_folders(tmp_path / "data", per_class=4)
    run, mine = tmp_path / "run", tmp_path / "mine"
    assert main(["classify", "train", "--data", str(data), "--out", str(run), "--image-size", "64", "--quiet", "--cache-dir", "none"]) == 0
    assert main(["classify", "predict", str(run), str(data / "val"), "--cache-dir", str(mine)]) == 0
    predicted = capsys.readouterr().out
    assert list((mine / "graphs").glob("*classifier*.onnx")) and (mine / "engines.json").is_file()
    assert main(["classify", "eval", str(run), "--data", str(data), "--cache-dir", str(mine)]) == 0
    assert main(["classify", "predict", str(run), str(data / "val"), "--cache-dir", "none", "--engine", "onnxruntime"]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()[-8:]]
    for a, b in zip(again, map(json.loads, predicted.splitlines()), strict=True):  # a temporary graph, the same answers
        assert a["path"] == b["path"] and [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert all(abs(p["probability"] - q["probability"]) <= 1e-4 for p, q in zip(a["predictions"], b["predictions"]))
    assert not (tmp_path / "default").exists()  # neither run wrote into the default folder
