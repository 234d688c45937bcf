"""``visiontune benchmark RUN_OR_FILE``: how fast a trained classifier answers on this CPU, per engine.

Single-image latency (p50 and p90 over many calls, after warm-up) and batched throughput (images/s at batch 32) for
PyTorch eager (fp32), the run's ONNX graph on ONNX Runtime and on OpenVINO (fp32), or for an exported ``.onnx`` file
(fp32 or INT8) on ONNX Runtime and OpenVINO. Random inputs of the model's input size: the numbers are the model's,
not decoding's.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from .engine.frozen import GraphForward, TorchForward, open_graph, tensor_call
from .inference.load import OnnxClassifier, load_classifier


def benchmark(run_or_file: str | Path, calls: int = 100, threads: int | None = None) -> dict:
    """Latency and throughput of each engine for ``run_or_file``; printed as JSON and returned."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if str(run_or_file).endswith(".onnx"):
            model = OnnxClassifier(run_or_file)
            engines, size = {"onnxruntime (file)": model}, model.meta.preprocessing.input_size
            if importlib.util.find_spec("openvino"):  # the same file, fp32 or INT8, on OpenVINO: Intel CPUs' runtime
                engines["openvino (file)"] = partial(tensor_call, open_graph(Path(run_or_file), "openvino"))
        else:
            module, meta = load_classifier(run_or_file, "cpu")
            size = meta.preprocessing.input_size
            engines = {"torch fp32": TorchForward(module)}
            for engine in ("onnxruntime", "openvino"):
                engines[f"{engine} fp32"] = GraphForward(meta.model, module, size, Path(tmp), engine)
        results = {name: _measure(forward, size, calls) for name, forward in engines.items()}
    report = {"model": str(run_or_file), "threads": torch.get_num_threads(), "input_size": size, "engines": results}
    print(json.dumps(report, indent=1))
    return report


def _measure(forward, size: int, calls: int) -> dict:
    one = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
    times = call_times_ms(forward, one, calls)
    forward(batch)
    start = time.perf_counter()
    for _ in range(3):
        forward(batch)
    per_second = 3 * len(batch) / (time.perf_counter() - start)
    p50, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
    return {"p50_ms": round(p50, 2), "p90_ms": round(p90, 2), "batch32_images_per_second": round(per_second, 1)}


def call_times_ms(forward, x: torch.Tensor, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``forward(x)``, after 5 warm-up calls."""
    for _ in range(5):
        forward(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        forward(x)
        times.append(1000 * (time.perf_counter() - start))
    return times
