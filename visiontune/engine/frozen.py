"""The forward pass of weights that do not train, run by the engine measured fastest for it on this machine.

A frozen base computes the same function every time, so it can leave PyTorch eager. The embedded EfficientNet-Lite0
(batch 32, 224 px, 2-core AMD EPYC with native bf16), images/s: PyTorch fp32 44, PyTorch bf16 autocast 158, ONNX
Runtime fp32 157, OpenVINO f32 274 (bf16 385, features off by up to 0.12 on a scale of 5.7); on a 2-core AVX-512/AMX
Xeon ONNX Runtime was 2.5x PyTorch bf16. No engine wins everywhere, so ``engine="auto"`` times the engines at the
run's precision (fp32 graph engines always; PyTorch in that precision; OpenVINO bf16 only where the run computes in
bf16, as PyTorch's autocast would) on a batch once per machine and model, and remembers the fastest
(``<cache>/engines.json``). Graph engines run the module's ONNX graph, written once beside the feature cache
(``<cache>/graphs/``, named by a hash of the weights); a module that cannot be exported runs in PyTorch, with one
log line saying why. GPUs keep PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_write, atomic_write_text, weights_digest
from ..config import ENGINES
from ..errors import UserError
from ..models.static_padding import for_input_size
from .runtime import machine_name

log = logging.getLogger("visiontune")
GRAPH_FORMAT = "graph 2"  # 2: constant "same" padding; part of the graph file's name and of a remembered timing's key
GRAPH_ENGINES = {"onnxruntime": ("onnxruntime", "fp32"), "openvino": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16")}
Module = nn.Module | Callable[[], nn.Module]  # a module, or what builds it when first needed (on the CPU)


def built(module: Module) -> nn.Module:
    return module if isinstance(module, nn.Module) else module()


def torch_engine_name(bf16: bool) -> str:
    return f"torch {'bf16' if bf16 else 'fp32'}"


class TorchForward:
    """``module`` under ``torch.no_grad`` (bf16 autocast if asked), channels-last; returns float32 on the CPU."""

    def __init__(self, module: nn.Module, bf16: bool = False):
        self.module, self.bf16 = module.eval(), bf16
        self.device = next(module.parameters()).device
        self.name = torch_engine_name(bf16)
        self.own_threads = False  # computes on torch's threads

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(x).float().cpu()


class GraphForward:
    """``module``'s ONNX graph on a CPU inference engine (ONNX Runtime or OpenVINO), on this process's cores. The graph is
    written on the first call into ``cache_dir``/graphs (None: a temporary file), or read from there when a run wrote it.

    The engine opens on the first call, so a run whose features come from the cache never pays for it. A module that
    cannot be exported runs in PyTorch fp32 instead, with one log line saying why. ``spin=False`` lets ONNX Runtime's
    threads sleep between calls instead of spinning, for DataLoader workers decoding on the same cores.
    ``module`` may be a function that builds it, and ``digest`` its ``weights_digest`` when known: a graph already in
    the cache then opens without the module ever being built (predict: ~0.07 s of ~1.1 s).
    """

    def __init__(
        self,
        name: str,
        module: Module,
        size: int,
        cache_dir: Path | None = None,
        engine: str = "onnxruntime",
        spin: bool = True,
        digest: str | None = None,
    ):
        self.model_name, self._module, self.size, self.cache_dir, self.spin, self.digest = name, module, size, cache_dir, spin, digest
        self.runtime, self.precision = GRAPH_ENGINES[engine]
        self.name = f"{self.runtime} {self.precision}"
        self.run = self.fallback = None

    @property
    def module(self) -> nn.Module:
        self._module = built(self._module)
        return self._module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is None and self.fallback is None:
            self._open()
        if self.fallback is not None:
            return self.fallback(x)
        return tensor_call(self.run, x)

    @property
    def own_threads(self) -> bool:
        """Whether the engine computes on threads of its own, not torch's (opening it now): then torch's threads should
        leave the cores to it (data/prefetch.py)."""
        if self.run is None and self.fallback is None:
            self._open()
        return self.fallback is None

    def _open(self) -> None:
        try:
            self.run = self._compiled()
        except Exception as e:  # noqa: BLE001 - any export failure leaves PyTorch to do the work
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            log.warning("%s: the frozen pass runs in PyTorch (its ONNX export failed: %s)", self.model_name, why)
            self.fallback = TorchForward(self.module)

    def _compiled(self):
        """The engine's callable numpy batch -> numpy output, from the graph file in the cache (written now if missing
        or unreadable), or from a temporary one."""
        example = torch.zeros(1, 3, self.size, self.size)
        if self.cache_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                write_onnx(self.module.eval(), example, Path(tmp) / "graph.onnx", "images", "features")
                return self._load(Path(tmp) / "graph.onnx")
        path = graph_path(self.cache_dir, self.model_name, self.digest or weights_digest(self.module.state_dict()), self.size)
        if path.is_file():
            try:
                return self._load(path)
            except Exception:  # noqa: BLE001 - a truncated or foreign file: write it again
                log.warning("ONNX graph %s is unreadable; writing it again", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: write_onnx(self.module.eval(), example, tmp, "images", "features"))
        return self._load(path)

    def _load(self, path: Path):
        return open_graph(path, self.runtime, self.precision, self.spin, self.cache_dir)


def open_graph(path: Path, runtime: str, precision: str = "fp32", spin: bool = True, cache_dir: Path | None = None):
    """An ONNX file on ``runtime`` (onnxruntime or openvino) with this process's threads: numpy batch -> first output.
    OpenVINO computes in ``precision`` where the file has floating-point ops (it would pick bf16 on its own)."""
    threads = torch.get_num_threads()
    if runtime == "openvino":
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads}
        if cache_dir is not None:  # OpenVINO keeps the compiled model: a later process opens it ~4x faster
            hint["CACHE_DIR"] = str(cache_dir / "graphs" / "openvino")
        request = openvino_core().compile_model(str(path), "CPU", hint).create_infer_request()
        return lambda x: request.infer({0: x})[0]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(Path(path).read_bytes(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


@functools.cache
def openvino_core():
    """One OpenVINO Core for the process, as OpenVINO asks. A Core per graph, dropped after compiling, corrupted the
    heap: a bf16 model used and then destroyed after its Core had gone, and a later test of the suite crashed in
    Python's own objects (reproduced with three tests in one process, every time; never with the Core kept)."""
    import openvino as ov

    return ov.Core()


def tensor_call(run, x: torch.Tensor) -> torch.Tensor:
    """``run`` (an ``open_graph`` callable, numpy in and out) on a tensor batch: float32 tensor out, on the CPU."""
    return torch.from_numpy(np.ascontiguousarray(run(x.float().contiguous().cpu().numpy()), dtype=np.float32))


def write_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, input_name: str, output_name: str) -> None:
    """``module`` as an ONNX graph (opset 17) taking a batch of any size of ``example``'s shape; "same" padding is
    constant for that size (models/static_padding.py)."""
    module = for_input_size(module, example.shape[-1])
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


def graph_path(cache_dir: Path, name: str, weights: str, size: int) -> Path:
    """Where the graph of the module whose ``weights_digest`` is ``weights`` is kept."""
    digest = hashlib.sha256(f"{weights}|{size}|{torch.__version__}|{GRAPH_FORMAT}".encode()).hexdigest()[:20]
    return cache_dir / "graphs" / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}-{digest}.onnx"


def frozen_forward(
    name: str,
    module: Module,
    size: int,
    engine: str = "auto",
    bf16: bool = False,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    spin: bool = True,
    digest: str | None = None,
):
    """A callable batch -> float32 features on the CPU for the frozen ``module`` (images of ``size`` px).

    ``engine``: "torch" (bf16 autocast if ``bf16``), "onnxruntime", "openvino", "openvino-bf16" (CPU), or "auto": the
    fastest of torch, onnxruntime and openvino (fp32; with ``bf16`` also openvino-bf16; where installed) on this
    machine, timed once and remembered in ``cache_dir`` (``None``: not remembered). Its ``name`` says which engine
    runs. ``module`` may be a function that builds it on the CPU, with ``digest``, as ``GraphForward`` takes them:
    built only if the chosen engine needs it."""
    if engine not in ENGINES:
        raise UserError(f"--engine: unknown engine {engine!r}; choose {', '.join(ENGINES)}")
    on_cpu = not isinstance(module, nn.Module) or next(module.parameters()).device.type == "cpu"
    if engine == "torch" or (engine == "auto" and not on_cpu):
        return TorchForward(built(module), bf16)
    if not on_cpu:
        raise UserError(f"--engine {engine}: runs on the CPU; use --engine torch (or auto) with --device cuda/mps")
    if engine != "auto":
        if importlib.util.find_spec(GRAPH_ENGINES[engine][0]) is None:
            raise UserError(
                f"--engine {engine}: the {GRAPH_ENGINES[engine][0]} package is not installed; pip install {GRAPH_ENGINES[engine][0]}"
            )
        return GraphForward(name, module, size, cache_dir, engine, spin, digest)
    module = module if isinstance(module, nn.Module) else functools.cache(module)  # one build for every candidate
    usable = ("onnxruntime", "openvino", "openvino-bf16") if bf16 else ("onnxruntime", "openvino")
    graphs = {" ".join(GRAPH_ENGINES[e]): e for e in usable if importlib.util.find_spec(GRAPH_ENGINES[e][0])}
    names = [torch_engine_name(bf16), *graphs]

    def make(engine_name: str):
        if engine_name in graphs:
            return GraphForward(name, module, size, cache_dir, graphs[engine_name], spin, digest)
        return TorchForward(built(module), bf16)

    key = f"{machine_name(torch.device('cpu'))} | {name} | {size}px batch {batch_size} | {' vs '.join(names)} | {GRAPH_FORMAT}"
    cache_file = cache_dir / "engines.json" if cache_dir is not None else None
    remembered = _read_json(cache_file).get(key)
    if isinstance(remembered, dict) and remembered.get("fastest") in names:
        return make(remembered["fastest"])
    candidates = [make(n) for n in names]
    fastest = _probe(key, candidates, size, batch_size, cache_file)
    return next(c for c in candidates if c.name == fastest)


def engine_setting(name: str) -> str:
    """The ``--engine`` value that runs the engine called ``name`` ("onnxruntime fp32" -> "onnxruntime")."""
    by_name = {f"{runtime} {precision}": key for key, (runtime, precision) in GRAPH_ENGINES.items()}
    return by_name.get(name, "torch")


def _probe(key: str, candidates: list, size: int, batch_size: int, cache_file: Path | None) -> str:
    """The name of the fastest candidate, timed now on a random batch; remembered in ``cache_file`` (engines.json)."""
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    seconds = {c.name: _time(c, x) for c in candidates}
    runnable = {c.name: seconds[c.name] for c in candidates if getattr(c, "fallback", None) is None}
    fastest = min(runnable, key=runnable.get)
    log.info("frozen pass: %s", ", ".join(f"{n} {batch_size * 2 / s:.0f} images/s" for n, s in runnable.items()))
    if len(runnable) < len(candidates):  # no graph: nothing to remember
        return fastest
    known = _read_json(cache_file)
    known[key] = {"fastest": fastest, "seconds": seconds}
    if cache_file is not None:
        try:  # a read-only cache costs a probe next time, never this run
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(known, indent=1) + "\n")
        except OSError:
            pass
    return fastest


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
