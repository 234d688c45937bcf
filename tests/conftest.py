"""Shared fixtures: tiny synthetic image folders, and the shared datasets (required under CI=true)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The suite asserts bit-identical runs, which CUDA does not promise: every test (and every process it starts)
# runs on the CPU. tests/test_cuda.py runs the GPU paths in subprocesses given this variable back.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path to ../shared/datasets/NAME; skip without it, fail under CI=true."""
    path = SHARED / name
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared dataset {path} is missing")
        pytest.skip(f"shared dataset {path} not present on this machine")
    return path


@pytest.fixture
def hymenoptera() -> Path:
    return shared_dataset("hymenoptera_data")


@pytest.fixture
def pennfudan() -> Path:
    return shared_dataset("PennFudanPed")


def make_image(path: Path, color: tuple[int, int, int], size=(48, 40), seed: int = 0, mode: str = "RGB") -> Path:
    """A noisy image dominated by ``color``: easy for any classifier to separate by class."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGB").convert(mode).save(path)
    return path


def stable_seed(*parts) -> int:
    """A seed from names that is the same in every process (``hash`` of a str changes with PYTHONHASHSEED)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def write_pretrained_weights(path: Path, model: str = "timm:test_efficientnet", seed: int = 3) -> Path:
    """A backbone's random weights as a file: given as --weights, a run treats them as pretrained."""
    import torch
    from safetensors.torch import save_file

    from visiontune.models.backbones import build_backbone

    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in build_backbone(model, "none").module.state_dict().items()}, str(path))
    return path


def make_class_folders(root: Path, classes=("red", "blue"), per_class: int = 6, splits=("train", "val")) -> Path:
    colors = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40)}
    for split in splits:
        for c in classes:
            for i in range(per_class):
                make_image(root / split / c / f"{c}_{i}.png", colors.get(c, (128, 128, 128)), seed=stable_seed(split, c, i))
    return root


@pytest.fixture
def tiny_folders(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "data")


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path_factory, monkeypatch):
    """Tests never write into the user's ~/.cache: each session gets its own feature cache."""
    if "VISIONTUNE_CACHE" not in os.environ:
        monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
