"""The forward pass of weights that do not train, run by the engine measured fastest for it on this machine.

A frozen base computes the same function every time, so it can leave PyTorch: ONNX Runtime ran the embedded
EfficientNet-Lite0 (batch 32, 224 px) at 185 images/s where PyTorch eager managed 48 in fp32 and 155 under bf16
autocast (2-core AMD EPYC with native bf16), and about 5x PyTorch fp32 on a 2-core AVX-512 Xeon. Neither wins
everywhere, so ``engine="auto"`` times both on a batch once per machine and model and remembers the answer
(``<cache>/engines.json``). ONNX Runtime runs the module's ONNX graph, written once beside the feature cache
(``<cache>/graphs/``, named by a hash of the weights); a module that cannot be exported runs in PyTorch, with one
log line saying why. GPUs keep PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_write, atomic_write_text, weights_digest
from ..config import ENGINES
from ..errors import UserError
from .runtime import machine_name

log = logging.getLogger("visiontune")


class TorchForward:
    """``module`` under ``torch.no_grad`` (bf16 autocast if asked), channels-last; returns float32 on the CPU."""

    def __init__(self, module: nn.Module, bf16: bool = False):
        self.module, self.bf16 = module.eval(), bf16
        self.device = next(module.parameters()).device
        self.name = f"torch {'bf16' if bf16 else 'fp32'}"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(x).float().cpu()


class OnnxForward:
    """``module`` on ONNX Runtime's CPU provider, on this process's cores, from its ONNX graph: written on the first
    call into ``cache_dir``/graphs (None: kept in memory only), or read from there when a run wrote it before.

    The session opens on the first call, so a run whose features come from the cache never pays for it. A module
    that cannot be exported runs in PyTorch fp32 instead, with one log line saying why. ``spin=False`` lets ONNX
    Runtime's threads sleep between calls instead of spinning: DataLoader workers decoding on the same cores need them.
    """

    name = "onnxruntime fp32"

    def __init__(self, name: str, module: nn.Module, size: int, cache_dir: Path | None = None, spin: bool = True):
        self.model_name, self.module, self.size, self.cache_dir, self.spin = name, module, size, cache_dir, spin
        self.session = self.fallback = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is None and self.fallback is None:
            self._open()
        if self.fallback is not None:
            return self.fallback(x)
        out = self.session.run(None, {"images": x.float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _open(self) -> None:
        try:
            self.session = self._opened_session()
        except Exception as e:  # noqa: BLE001 - any export failure leaves PyTorch to do the work
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            log.warning("%s: the frozen pass runs in PyTorch (its ONNX export failed: %s)", self.model_name, why)
            self.fallback = TorchForward(self.module)

    def _session(self, graph: Path | bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options, providers=["CPUExecutionProvider"])

    def _opened_session(self):
        """A session of the graph file in the cache (written now if missing or unreadable), or of one in memory."""
        example = torch.zeros(1, 3, self.size, self.size)
        module = self.module.eval()
        if self.cache_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                write_onnx(module, example, Path(tmp) / "graph.onnx", "images", "features")
                return self._session((Path(tmp) / "graph.onnx").read_bytes())
        path = graph_path(self.cache_dir, self.model_name, module, self.size)
        if path.is_file():
            try:
                return self._session(path)
            except Exception:  # noqa: BLE001 - a truncated or foreign file: write it again
                log.warning("ONNX graph %s is unreadable; writing it again", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: write_onnx(module, example, tmp, "images", "features"))
        return self._session(path)


def write_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, input_name: str, output_name: str) -> None:
    """``module`` as an ONNX graph (opset 17) taking a batch of any size of ``example``'s shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
        )


def graph_path(cache_dir: Path, name: str, module: nn.Module, size: int) -> Path:
    digest = hashlib.sha256(f"{weights_digest(module.state_dict())}|{size}|{torch.__version__}".encode()).hexdigest()[:20]
    return cache_dir / "graphs" / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}-{digest}.onnx"


def frozen_forward(
    name: str,
    module: nn.Module,
    size: int,
    engine: str = "auto",
    bf16: bool = False,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    spin: bool = True,
):
    """A callable batch -> float32 features on the CPU for the frozen ``module`` (images of ``size`` px):
    ``engine`` "torch", "onnxruntime" (CPU only), or "auto": the faster of the two on this machine (timed once,
    remembered in ``cache_dir``; ``None``: not remembered). Its ``name`` says which engine runs."""
    if engine not in ENGINES:
        raise UserError(f"--engine: unknown engine {engine!r}; choose {', '.join(ENGINES)}")
    on_cpu = next(module.parameters()).device.type == "cpu"
    if engine == "torch" or (engine == "auto" and not on_cpu):
        return TorchForward(module, bf16)
    if not on_cpu:
        raise UserError("--engine onnxruntime: runs on the CPU; use --engine torch (or auto) with --device cuda/mps")
    ort_forward = OnnxForward(name, module, size, cache_dir, spin)
    if engine == "onnxruntime":
        return ort_forward
    torch_forward = TorchForward(module, bf16)
    key = f"{machine_name(torch.device('cpu'))} | {name} | {size}px batch {batch_size} | {torch_forward.name} vs {ort_forward.name}"
    return ort_forward if _faster_is_onnx(key, torch_forward, ort_forward, size, batch_size, cache_dir) else torch_forward


def _faster_is_onnx(key: str, torch_forward, ort_forward, size: int, batch_size: int, cache_dir: Path | None) -> bool:
    cache_file = cache_dir / "engines.json" if cache_dir is not None else None
    known = _read_json(cache_file)
    if isinstance(known.get(key), dict) and isinstance(known[key].get("onnxruntime"), bool):
        return known[key]["onnxruntime"]
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    seconds = {engine.name: _time(engine, x) for engine in (torch_forward, ort_forward)}
    if ort_forward.fallback is not None:  # no graph: nothing to remember
        return False
    known[key] = {"onnxruntime": seconds[ort_forward.name] < seconds[torch_forward.name], "seconds": seconds}
    log.info("frozen pass: %s", ", ".join(f"{n} {batch_size * 2 / s:.0f} images/s" for n, s in seconds.items()))
    if cache_file is not None:
        try:  # a read-only cache costs a probe next time, never this run
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(known, indent=1) + "\n")
        except OSError:
            pass
    return known[key]["onnxruntime"]


def _time(forward, x: torch.Tensor) -> float:
    """Seconds for two calls after two warm-up calls (bf16 autocast is slow on its first)."""
    forward(x)
    forward(x)
    start = time.perf_counter()
    forward(x)
    forward(x)
    return round(time.perf_counter() - start, 4)


def _read_json(path: Path | None) -> dict:
    try:
        known = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
