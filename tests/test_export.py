"""Export: ONNX Runtime and TorchScript give PyTorch's logits on real photos; class names and preprocessing travel along."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, make_class_folders
from torchvision.transforms.v2 import functional as TF

from visiontune.cli import main
from visiontune.data.images import load_rgb
from visiontune.data.transforms import classification_eval
from visiontune.inference.classify import predict
from visiontune.inference.load import load_classifier

REAL_IMAGES = sorted((REPO / "examples" / "hymenoptera_sample" / "val").rglob("*.jpg"))[::3]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    data = make_class_folders(tmp_path_factory.mktemp("data"), classes=("red", "blue", "green"), per_class=4)
    out = tmp_path_factory.mktemp("runs") / "run"
    assert (
        main(
            ["classify", "train", "--data", str(data), "--out", str(out), "--image-size", "64", "--quiet", "--epochs", "2", "--views", "2"]
        )
        == 0
    )
    return out


def real_batch(meta) -> torch.Tensor:
    p = meta.preprocessing
    tf = classification_eval(p.input_size, p.resize_size, p.mean, p.std)
    return torch.stack([tf(TF.pil_to_tensor(load_rgb(f))) for f in REAL_IMAGES])


def test_onnx_matches_pytorch_on_real_images(run_dir, tmp_path, capsys):
    import onnxruntime as ort

    path = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(path)]) == 0
    assert len(REAL_IMAGES) >= 8
    model, meta = load_classifier(run_dir)
    x = real_batch(meta)
    with torch.no_grad():
        expected = model(x.contiguous(memory_format=torch.channels_last)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"images": x.numpy()})[0]
    assert got.shape == (len(REAL_IMAGES), 3)
    assert np.abs(got - expected).max() <= 1e-4

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["classes"]) == ["blue", "green", "red"]
    prep = json.loads(props["preprocessing"])
    assert prep["input_size"] == 64 and prep["mean"] == [0.5, 0.5, 0.5] and "center-crop" in prep["steps"]

    # classify predict takes the .onnx file: same answers as the PyTorch model, no training data needed
    onnx_preds, torch_preds = predict(path, REAL_IMAGES, topk=2), predict(run_dir, REAL_IMAGES, topk=2)
    for a, b in zip(onnx_preds, torch_preds):
        assert a["path"] == b["path"] and [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert all(abs(p["probability"] - q["probability"]) <= 1e-4 for p, q in zip(a["predictions"], b["predictions"]))
    capsys.readouterr()
    assert main(["classify", "predict", str(path), str(REAL_IMAGES[0]), "--topk", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["path"] == str(REAL_IMAGES[0]) and line["predictions"][0]["label"] in ("blue", "green", "red")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_and_carries_metadata(run_dir, tmp_path):
    path = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--output", str(path)]) == 0
    extra = {"classes.json": "", "preprocessing.json": "", "visiontune.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == ["blue", "green", "red"]
    assert json.loads(extra["preprocessing.json"])["input_size"] == 64
    model, meta = load_classifier(run_dir)
    x = real_batch(meta)
    with torch.no_grad():
        assert (scripted(x) - model(x)).abs().max().item() <= 1e-4


def test_export_and_predict_mistakes_are_one_line_errors(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--output", str(tmp_path / "missing" / "m.onnx")]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "no model file" in capsys.readouterr().err
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not onnx")
    assert main(["classify", "predict", str(fake), str(REAL_IMAGES[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visiontune: error:") and "fake.onnx" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
