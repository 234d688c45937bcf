"""``visiontune benchmark RUN_OR_FILE``: how fast a trained model answers on this CPU, per engine.

Classifiers: single-image latency (p50 and p90 over many calls, after warm-up) and batched throughput (images/s at
batch 32) for PyTorch eager (fp32), the run's ONNX graph on ONNX Runtime and on OpenVINO (fp32), or for an exported
``.onnx`` file (fp32 or INT8) on ONNX Runtime and OpenVINO. Random inputs of the model's input size: the numbers are
the model's, not decoding's. Detectors (one image per call): latency on PyTorch eager and the run's ONNX graph, or of
an exported file, on a photo (``image``) or on noise of the model's input size, with the number of detections timed.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .data.images import load_rgb
from .engine.frozen import GraphForward, TorchForward, open_graph, tensor_call
from .export import write_detector_onnx
from .inference.load import OnnxClassifier, load_classifier, load_detector, open_onnx, read_model_file
from .meta import DetectorMeta


def benchmark(run_or_file: str | Path, calls: int = 100, threads: int | None = None, image: str | Path | None = None) -> dict:
    """Latency (and classifiers' throughput) of each engine for ``run_or_file``; printed as JSON and returned."""
    if threads:
        torch.set_num_threads(threads)
    onnx_file = str(run_or_file).endswith(".onnx")
    meta = open_onnx(run_or_file)[1] if onnx_file else read_model_file(run_or_file)[1]
    if isinstance(meta, DetectorMeta):
        report = _detector_benchmark(run_or_file, meta, onnx_file, calls, image)
        print(json.dumps(report, indent=1))
        return report
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


def _detector_benchmark(run_or_file: str | Path, meta: DetectorMeta, onnx_file: bool, calls: int, image: str | Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_file:
            graph = Path(run_or_file)
            engines = {"onnxruntime (file)": None}
        else:
            model, _ = load_detector(run_or_file, "cpu")
            graph = Path(tmp) / "detector.onnx"
            write_detector_onnx(run_or_file, graph)
            engines = {"torch fp32": torch.no_grad()(lambda x: len(model([x])[0]["boxes"])), "onnxruntime fp32": None}
        run = open_graph(graph, "onnxruntime")  # its first output: the boxes
        engines = {name: forward or (lambda x: len(run(x.numpy()))) for name, forward in engines.items()}
        if image is None:
            x = torch.rand(3, meta.min_size, meta.max_size, generator=torch.Generator().manual_seed(0))
        else:
            x = torch.from_numpy(np.asarray(load_rgb(image))).permute(2, 0, 1).float().div(255)
        results = {}
        for name, forward in engines.items():
            times = call_times_ms(forward, x, calls)
            p50, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
            results[name] = {"p50_ms": round(p50, 1), "p90_ms": round(p90, 1), "detections": forward(x)}
    size = f"{x.shape[1]}x{x.shape[2]}"
    return {"model": str(run_or_file), "threads": torch.get_num_threads(), "image": str(image or f"noise {size}"), "engines": results}
