"""partial's frozen prefix on a faster engine (models/prefix.py): the cut computes what the whole backbone does, only
where it is certain; a run with its prefix on ONNX Runtime learns as one in PyTorch and leaves the frozen weights
bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from visiontune import checkpoint as ckpt
from visiontune.cli import main
from visiontune.models.backbones import build_backbone
from visiontune.models.prefix import split_frozen_prefix

STEM_AND_THREE = ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"]


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0").module.eval()


def test_the_cut_computes_the_whole_backbone(lite0):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prefix, rest = split_frozen_prefix(lite0, STEM_AND_THREE)
    assert len(prefix) == 5  # conv_stem, bn1 and three blocks
    with torch.no_grad():
        assert torch.equal(rest(prefix(x)), lite0(x))


@pytest.mark.parametrize(
    "frozen",
    [
        [""],  # the whole base: linear's feature cache
        ["conv_stem", "bn1"] + [f"blocks.{i}" for i in range(7)],  # every block: the same
        ["conv_stem", "bn1", "blocks.1"],  # a gap
        ["blocks.0"],  # no stem
    ],
)
def test_no_cut_where_it_is_not_a_prefix(lite0, frozen):
    assert split_frozen_prefix(lite0, frozen) is None


def test_no_cut_for_a_backbone_of_another_structure():
    assert split_frozen_prefix(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), ["0"]) is None


def test_partial_with_its_prefix_on_onnxruntime_learns_as_in_pytorch(tiny_folders, tmp_path):
    runs = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / engine
        args = ["--strategy", "partial", "--epochs", "6", "--batch-size", "4", "--image-size", "64", "--quiet", "--engine", engine]
        assert main(["classify", "train", "--data", str(tiny_folders), "--out", str(out), *args, "--cache-dir", str(tmp_path / "c")]) == 0
        runs[engine] = (json.loads((out / "metrics.json").read_text()), ckpt.load_model_file(out / "model.safetensors")[0])
    (on_graph, weights), (in_torch, torch_weights) = runs["onnxruntime"], runs["torch"]
    assert on_graph["frozen_prefix_engine"] == {"partial": "onnxruntime fp32"} and "frozen_prefix_engine" not in in_torch
    assert on_graph["best_val_accuracy"] >= 0.9 and in_torch["best_val_accuracy"] >= 0.9  # red against blue
    pretrained = build_backbone("efficientnet_lite0").module.state_dict()
    frozen = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(5)))  # the last third of 9 stages trains
    for key, value in pretrained.items():
        if key.startswith(frozen):
            assert torch.equal(weights[f"backbone.{key}"], value), key
    trained = [k for k in pretrained if k.startswith("blocks.6.") and k.endswith("weight")]
    assert trained and all(not torch.equal(weights[f"backbone.{k}"], pretrained[k]) for k in trained)
    # the same training in other numerics (the prefix in fp32 here, under bf16 autocast in PyTorch where it is native)
    assert all(torch.allclose(weights[k], torch_weights[k], rtol=0.05, atol=1e-2) for k in weights)
