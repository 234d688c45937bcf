"""Where and how a run computes: device, precision, seeding, and what a diverged run raises."""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_text
from ..errors import UserError


class Diverged(UserError):
    """A non-finite loss: the run stops, its last good checkpoint stays."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or "auto" on hardware with native bf16 math (measured 1.5-2.5x faster on an AVX512-BF16 CPU)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def machine_name(device: torch.device) -> str:
    """What a speed measurement holds for: the processor (or GPU) model, its core count, torch's version."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        try:
            chip = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            chip = platform.processor() or platform.machine()
        chip = f"{chip} x{torch.get_num_threads()}"
    return f"{device.type} {chip} | torch {torch.__version__}"


def faster_in_bf16(step: Callable[[bool], None], key: str, device: torch.device, cache_file: Path) -> bool:
    """Whether ``step(bf16)`` (one training step) runs faster under bf16 autocast than in fp32 on this machine.

    Timed once (a warm-up step, then two timed ones, each precision) and remembered in ``cache_file`` per machine
    and ``key``: bf16 is not faster everywhere it is native (a full fine-tuning step of EfficientNet-Lite0 measured
    21.7 images/s in fp32 and 19.7 in bf16 on a 2-core AVX-512/AMX Xeon).
    """
    name = f"{machine_name(device)} | {key}"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(name), dict) and isinstance(known[name].get("bf16"), bool):
        return known[name]["bf16"]
    seconds = {}
    for bf16 in (False, True):
        step(bf16)
        start = time.perf_counter()
        step(bf16)
        step(bf16)
        seconds[bf16] = time.perf_counter() - start
    known[name] = {
        "bf16": seconds[True] < seconds[False],
        "fp32_seconds": round(seconds[False], 4),
        "bf16_seconds": round(seconds[True], 4),
    }
    try:  # a read-only cache costs a probe next time, never this run
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(known, indent=1) + "\n")
    except OSError:
        pass
    return known[name]["bf16"]


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no MPS device is available")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device: unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def tensorboard_writer(out: Path | None):
    """A SummaryWriter into RUN/tensorboard (``out`` None: only check that the tensorboard package is there)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed; pip install tensorboard") from None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard")) if out is not None else None
