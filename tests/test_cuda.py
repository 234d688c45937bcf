"""The GPU paths, run where a CUDA device is present (skipped elsewhere, CI included).

The rest of the suite runs on the CPU (conftest hides the GPU: it asserts bit-identical runs). These tests give
the GPU back to the processes they start and check that each command finishes on CUDA with bf16 autocast, and
that what it writes is right: the first CUDA run on a lent H200 found the metrics step mixing CUDA and CPU tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VISIBLE_GPUS, make_class_folders
from detection_helpers import make_pennfudan


def gpu_env() -> dict:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES")
    if VISIBLE_GPUS is not None:
        env["CUDA_VISIBLE_DEVICES"] = VISIBLE_GPUS
    return env


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=gpu_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    probe = run("-c", "import torch; print(torch.cuda.is_available())", timeout=120)
    if probe.stdout.strip() != "True":
        pytest.skip("no CUDA device on this machine")


@pytest.mark.parametrize("strategy", ["full", "linear"])
def test_classification_trains_evaluates_and_predicts_on_cuda(tmp_path: Path, strategy: str):
    data = make_class_folders(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    train = run(
        "-m",
        "visiontune",
        "classify",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--strategy",
        strategy,
        "--device",
        "cuda",
        "--image-size",
        "64",
        "--epochs",
        "3",
        "--quiet",
    )
    assert train.returncode == 0, train.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_accuracy"] >= 0.9 and sum(map(sum, metrics["confusion_matrix"])) == 16
    evaluated = {d: run("-m", "visiontune", "classify", "eval", str(out), "--data", str(data), "--device", d) for d in ("cuda", "cpu")}
    assert all(e.returncode == 0 for e in evaluated.values()), evaluated["cuda"].stderr
    assert json.loads(evaluated["cuda"].stdout)["accuracy"] == json.loads(evaluated["cpu"].stdout)["accuracy"]
    predicted = {
        d: run("-m", "visiontune", "classify", "predict", str(out), str(data / "val" / "red"), "--device", d) for d in ("cuda", "cpu")
    }
    lines = {d: [json.loads(line) for line in p.stdout.splitlines()] for d, p in predicted.items()}
    assert predicted["cuda"].returncode == 0 and len(lines["cuda"]) == 8, predicted["cuda"].stderr
    assert sum(line["predictions"][0]["label"] == "red" for line in lines["cuda"]) >= 7
    for on_gpu, on_cpu in zip(lines["cuda"], lines["cpu"]):  # the same model on either device: the same answers
        assert on_gpu["predictions"][0]["label"] == on_cpu["predictions"][0]["label"]
        assert abs(on_gpu["predictions"][0]["probability"] - on_cpu["predictions"][0]["probability"]) < 1e-3


def test_torchrun_one_process_uses_nccl_on_cuda(tmp_path: Path):
    data = make_class_folders(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    proc = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        "-m",
        "visiontune",
        "classify",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cuda",
        "--image-size",
        "64",
        "--epochs",
        "2",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["best_val_accuracy"] >= 0.9


def test_detection_trains_and_evaluates_on_cuda(tmp_path: Path):
    data = make_pennfudan(tmp_path / "data", n=8)
    out = tmp_path / "run"
    proc = run(
        "-m",
        "visiontune",
        "detect",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--val-last",
        "2",
        "--epochs",
        "1",
        "--min-size",
        "64",
        "--max-size",
        "64",
        "--device",
        "cuda",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bbox_AP", "segm_AP"} <= metrics.keys()
    assert (out / "predictions.png").stat().st_size > 0
    evaluated = run("-m", "visiontune", "detect", "eval", str(out), "--data", str(data), "--device", "cuda")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["images"] == 8
    predicted = run(
        "-m", "visiontune", "detect", "predict", str(out), str(data / "PNGImages"), "--output", str(tmp_path / "p"), "--device", "cuda"
    )
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "p").glob("*.png"))) == 8 and (tmp_path / "p" / "predictions.json").is_file()
