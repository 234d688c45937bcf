"""Model files and training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A model file (``model.safetensors``) is self-contained: the weights plus, in the safetensors header,
the architecture name, class names, preprocessing, strategy, metrics and a SHA-256 of the weights.
A training checkpoint (``last.safetensors``) adds the optimizer, scheduler and RNG states for resume.
Every write is atomic (temporary file, flush, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .faults import fault_point

FORMAT = "visiontune/1"
META_KEY = "visiontune"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(tmp: str | Path, path: Path) -> None:
    """Sync the finished file ``tmp`` and rename it over ``path``, then sync the folder (the rename survives a crash)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    fault_point("write", f"write-{path.name.split('.')[0]}", before_kill=lambda: os.truncate(tmp, os.path.getsize(tmp) // 2))
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _with_ours(meta: dict[str, Any], **ours) -> dict[str, Any]:
    """``meta`` plus the keys this module writes itself; a caller's key of the same name is a bug, never overwritten."""
    clash = sorted(set(meta) & set(ours))
    if clash:
        raise ValueError(f"metadata key(s) {', '.join(clash)} are written by visiontune.checkpoint itself; name yours differently")
    return {**meta, **ours}


def _save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = _with_ours(meta, format=FORMAT, weights_sha256=weights_digest(tensors))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def _load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such model file")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{p}: not a readable visiontune file (truncated or corrupt: {reason})") from None
    if META_KEY not in header:
        raise UserError(f"{p}: not a visiontune file (no visiontune metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{p}: damaged visiontune metadata (not a JSON object); refusing to load")
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise UserError(f"{p}: checksum mismatch: the weights were altered or damaged; refusing to load")
    return tensors, meta


def save_model(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    _save(path, model.state_dict(), _with_ours(meta, kind="model"))


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = _load(path)
    return {k.removeprefix("model/"): v for k, v in tensors.items() if not k.startswith(("optim/", "rng/"))}, meta


# ------------------------------------------------------------------------- training state


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"python": _jsonable(random.getstate()), "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["rng/numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    random.setstate(_tuplify(meta["python"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            key = f"optim/{idx}/{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Everything needed to resume: model, optimizer, scheduler, RNG, the caller's progress in ``meta`` and its
    ``extra`` tensors (the weight average), which ``load_training_state`` returns as ``meta["extra"]``."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()} | opt_tensors | rng_tensors
    tensors |= {f"extra/{k}": v for k, v in (extra or {}).items()}
    meta = _with_ours(
        meta, kind="training_state", optimizer=opt_meta, scheduler=scheduler.state_dict() if scheduler else None, rng=rng_meta
    )
    _save(path, tensors, meta)


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    tensors, meta = _load(path)
    if meta.get("kind") != "training_state":
        raise UserError(f"{path}: not a training checkpoint")
    opt_sd = _unflatten_optimizer(tensors, meta["optimizer"])
    if len(opt_sd["param_groups"]) != len(optimizer.param_groups):
        raise UserError(
            f"{path}: the checkpoint has {len(opt_sd['param_groups'])} parameter groups, this run {len(optimizer.param_groups)}; resume with the same settings"
        )
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        optimizer.load_state_dict(opt_sd)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(
            f"{path}: does not fit this run's model or optimizer ({str(e).strip().splitlines()[0][:160]}); resume with the same settings"
        ) from None
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(tensors, meta["rng"])
    return {**meta, "extra": {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}}


def resume_loader(loader, batches_done: int):
    """``loader`` without its first ``batches_done`` batches, for resuming in the middle of an epoch.

    The skipped images are never loaded, and making this loader's iterator draws nothing from torch's global
    RNG (it has its own generator), so the RNG state restored from the checkpoint continues exactly.
    """
    from itertools import islice

    from torch.utils.data import DataLoader

    class Skipping(torch.utils.data.Sampler):
        def __init__(self, sampler, n):
            self.sampler, self.n = sampler, n

        def __iter__(self):
            return islice(iter(self.sampler), self.n, None)

        def __len__(self):
            return max(0, len(self.sampler) - self.n)

    common = dict(
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=torch.Generator(),
    )
    if loader.batch_size is None:  # batches from a batch sampler of its own (detection's aspect-ratio groups)
        return DataLoader(loader.dataset, batch_sampler=Skipping(loader.batch_sampler, batches_done), **common)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=Skipping(loader.sampler, batches_done * loader.batch_size),
        drop_last=loader.drop_last,
        **common,
    )
