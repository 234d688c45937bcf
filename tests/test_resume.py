"""Crash-safe training: SIGKILL at many points, Ctrl-C, divergence; every resume ends bit-identical to one run.

Each training run is its own process running the CLI on a tiny timm model (random init, 64 px, 3 epochs of 3
steps, staged: one frozen-backbone epoch, then two unfrozen). ``VISIONTUNE_FAULT`` (see visiontune/faults.py)
makes a process kill itself at a chosen point. The processes are forked from a "launcher" that has imported
torch once (an import costs more than a whole tiny run). One thread per process: the results are then
reproducible and the runs do not fight over the two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders, make_image, write_pretrained_weights
from safetensors.torch import load_file

from visiontune import checkpoint as ckpt
from visiontune.cli import main

TRAIN = [
    "classify",
    "train",
    "--model",
    "timm:test_efficientnet",
    "--weights",
    "none",
    "--image-size",
    "64",
    "--strategy",
    "staged",
    "--recipe",
    "tutorial",
    "--epochs",
    "3",
    "--lr",
    "0.05",
    "--checkpoint-every",
    "2",
    "--quiet",
]
# The default recipe's staged run: the head on cached backbone features first (one epoch), then two unfrozen epochs,
# from a weights file (pretrained, as far as the run knows) and with --wise-alpha, so the kept model is an average.
CACHED = [
    "classify",
    "train",
    "--model",
    "timm:test_efficientnet",
    "--image-size",
    "64",
    "--strategy",
    "staged",
    "--epochs",
    "3",
    "--cache-dir",
    "none",
    "--engine",
    "torch",  # without a cache, "auto" would time the engines in each process and may choose differently
    "--wise-alpha",
    "0.5",
    "--quiet",
]
TIMING = {
    "train_seconds",
    "train_images_per_second",
    "elapsed_seconds",
    "feature_extraction",
    "image_loading",
}  # what this process measured or ran on


LAUNCHER = r"""
import json, os, sys, time, traceback
import matplotlib
matplotlib.use("Agg")
import visiontune.tasks.classify, visiontune.report, visiontune.visualize  # the slow imports, once, before any fork
from visiontune.cli import main

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the training process: stderr to a file, exit code as the CLI's
        os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        if job["fault"]:
            os.environ["VISIONTUNE_FAULT"] = job["fault"]
        try:
            code = main(job["argv"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + 300
    while not (status := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
        time.sleep(0.02)
    print(json.dumps(os.waitstatus_to_exitcode(status[1])), flush=True)
"""


class Launcher:
    """Runs ``visiontune ARGV`` in a fresh process forked from one that has done the imports."""

    def __init__(self, workdir: Path):
        self.workdir, self.count = workdir, 0
        env = {k: v for k, v in os.environ.items() if k != "VISIONTUNE_FAULT"}
        env.update(OMP_NUM_THREADS="1", VISIONTUNE_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
        self.count += 1
        stderr = self.workdir / f"stderr-{self.count}.txt"
        self.proc.stdin.write(json.dumps({"argv": argv, "fault": fault, "stderr": str(stderr)}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())
        return subprocess.CompletedProcess(argv, rc, "", stderr.read_text() if stderr.exists() else "")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("resume") / "data")


def observe(run: Path, fault: str | None, r: subprocess.CompletedProcess) -> dict:
    """What a process left behind: exit code, stderr, whether every file passed its checksum, where `last` stands."""
    seen = {
        "fault": fault,
        "rc": r.returncode,
        "stderr": r.stderr,
        "corrupt": [],
        "last": None,
        "model": (run / "model.safetensors").exists(),
        "model_tmp": bool(list(run.glob(".model.safetensors.*.tmp"))),
    }
    for f in [*run.glob("*.safetensors"), *run.glob("*.json")]:
        try:
            ckpt._load(f) if f.suffix == ".safetensors" else json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001 - recorded, asserted on by the tests
            seen["corrupt"].append(f"{f.name}: {e}")
    if (run / "last.safetensors").exists() and not seen["corrupt"]:
        meta = ckpt._load(run / "last.safetensors")[1]
        seen["last"] = (meta["epoch"], meta["step"])
    return seen


# Where each process of the SIGKILL chain kills itself, and the checkpoint it must leave as (epochs done, steps
# into the next). Global steps 1..9, three per epoch; a checkpoint every 2 steps and after each epoch.
KILLS = [
    ("step:1", None),  # the first step, before any checkpoint: the resume starts over
    ("write-model:1", (0, 2)),  # while writing the first best model (end of epoch 1)
    ("write-last:2", (1, 0)),  # while writing the step-4 checkpoint
    ("validate:1", (1, 3)),  # validating epoch 2, after every batch of it
    ("step:2", (2, 2)),  # in epoch 3, after step 8 and its checkpoint
    ("finish:1", (3, 0)),  # writing the final files
]


def run_chains(root: Path, launcher_cls, start, resume, kills, interrupt: str, **more) -> dict:
    """The experiments of both resume suites, two at a time, each in its own launcher (one thread each):
    "kills", the SIGKILL chain through ``kills`` and an uninterrupted finish; "others", the uninterrupted baseline,
    then a run stopped by the ``interrupt`` fault and its resume; and ``more`` (name: chain(run_cli))."""

    def kill_chain(run_cli) -> list[dict]:
        out, seen = root / "killed", []
        for i, (fault, _) in enumerate(kills + [(None, None)]):
            seen.append(observe(out, fault, run_cli(start(out) if i == 0 else resume(out), fault=fault)))
        return seen

    def baseline_then_ctrl_c(run_cli) -> list[dict]:
        seen = [observe(root / "baseline", None, run_cli(start(root / "baseline")))]
        out = root / "interrupted"
        seen.append(observe(out, interrupt, run_cli(start(out), fault=interrupt)))
        seen.append(observe(out, None, run_cli(resume(out))))
        return seen

    def in_own_launcher(chain) -> list[dict]:
        launcher = launcher_cls(Path(tempfile.mkdtemp(dir=root)))
        try:
            return chain(launcher.run)
        finally:
            launcher.close()

    chains = {"kills": kill_chain, "others": baseline_then_ctrl_c, **more}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(in_own_launcher, chain) for name, chain in chains.items()}
        result = {name: f.result() for name, f in futures.items()}
    baseline = result["others"][0]
    assert baseline["rc"] == 0, baseline["stderr"]
    return result


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """Three independent experiments, two at a time (one thread each): the SIGKILL chain; the uninterrupted
    baseline, then a Ctrl-C and its resume; a kill while caching features and one after the cached head phase."""
    root = tmp_path_factory.mktemp("runs")
    start = lambda out: [*TRAIN, "--data", str(data), "--out", str(out)]  # noqa: E731
    resume = lambda out: ["classify", "train", "--resume", str(out)]  # noqa: E731 - the run named by --resume itself

    cached = [*CACHED, "--weights", str(write_pretrained_weights(root / "test_efficientnet.safetensors"))]

    def cached_features_chain(run_cli) -> list[dict]:
        seen = [observe(root / "cached_baseline", None, run_cli([*cached, "--data", str(data), "--out", str(root / "cached_baseline")]))]
        out = root / "cached"
        seen.append(observe(out, "features:1", run_cli([*cached, "--data", str(data), "--out", str(out)], fault="features:1")))
        seen.append(observe(out, "step:1", run_cli(resume(out), fault="step:1")))
        seen.append(observe(out, None, run_cli(resume(out))))
        return seen

    return dict(run_chains(root, Launcher, start, resume, KILLS, "step:5:INT", cached=cached_features_chain), root=root)


def assert_same_run(run: Path, reference: Path) -> None:
    for name in ("model.safetensors", "last.safetensors"):
        a, b = load_file(run / name), load_file(reference / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"

    def without_timing(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in TIMING}

    log = [without_timing(json.loads(line)) for line in (run / "log.jsonl").read_text().splitlines()]
    ref = [without_timing(json.loads(line)) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert log == ref
    assert without_timing(json.loads((run / "metrics.json").read_text())) == without_timing(
        json.loads((reference / "metrics.json").read_text())
    )


def test_sigkill_at_six_points_then_resume_is_bit_identical(runs):
    seen = runs["kills"]
    for (fault, left), s in zip(KILLS, seen):
        assert s["rc"] == -9, (fault, s["stderr"])
        assert not s["corrupt"], (fault, s["corrupt"])
        assert s["last"] == left, fault
        if fault == "write-model:1":  # killed mid-write: no best model yet, not half of one
            assert not s["model"] and s["model_tmp"]
    final = seen[-1]
    assert final["rc"] == 0 and not final["corrupt"], final["stderr"]
    out = runs["root"] / "killed"
    assert not list(out.glob(".*.tmp")), "a killed write's temporary file was left behind"
    assert [row["phase"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == ["head", "unfrozen", "unfrozen"]
    assert_same_run(out, runs["root"] / "baseline")


def test_kill_while_caching_features_and_after_the_cached_head_phase(runs):
    baseline, in_features, in_unfrozen, resumed = runs["cached"]
    assert baseline["rc"] == 0, baseline["stderr"]
    assert in_features["rc"] == -9 and in_features["last"] is None  # nothing to keep yet: the resume starts over
    assert in_unfrozen["rc"] == -9 and in_unfrozen["last"] == (1, 0)  # the head phase is checkpointed when it ends
    assert resumed["rc"] == 0 and not resumed["corrupt"], resumed["stderr"]
    assert_same_run(runs["root"] / "cached", runs["root"] / "cached_baseline")


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(runs):
    _, stopped, resumed = runs["others"]
    assert stopped["rc"] == 130 and "Traceback" not in stopped["stderr"], stopped["stderr"]
    last_line = stopped["stderr"].strip().splitlines()[-1]
    assert last_line.startswith("visiontune: interrupted: checkpoint saved at epoch 2, step 3/3") and "--resume" in last_line
    assert stopped["last"] == (1, 3)  # the signal came after step 5; step 6 finished, then it saved
    assert resumed["rc"] == 0, resumed["stderr"]
    assert_same_run(runs["root"] / "interrupted", runs["root"] / "baseline")


def test_resume_refuses_other_settings_and_other_data(data, runs, tmp_path, capsys):
    baseline = runs["root"] / "baseline"
    before = {f.name: f.read_bytes() for f in baseline.iterdir()}
    for flag in (["--epochs", "5"], ["--lr", "0.1"], ["--strategy", "linear"], ["--image-size", "96"]):
        assert main(["classify", "train", "--out", str(baseline), "--resume", *flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag[0] in err[0] and "differs" in err[0], err
    # the same images but one more: the batches would not be the same
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    make_image(changed / "train" / "red" / "extra.png", (200, 30, 30), seed=99)
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    config = (run / "config.yaml").read_text().replace(str(data), str(changed))
    (run / "config.yaml").write_text(config)
    assert main(["classify", "train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed" in err[0] and "resume needs the same data" in err[0], err
    assert main(["classify", "train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in baseline.iterdir()} == before


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_nonfinite_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys, one_thread):
    from visiontune.models.classifier import Classifier

    calls, forward = {"train": 0}, Classifier.forward

    def poisoned(self, x):
        logits = forward(self, x)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 5:  # global step 5 = epoch 2, step 2
                return logits * float("nan")
        return logits

    monkeypatch.setattr(Classifier, "forward", poisoned)
    out = tmp_path / "run"
    # fp32 given: --precision auto would first time training steps on a copy of the model, which count here
    assert main([*TRAIN, "--data", str(data), "--out", str(out), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss at epoch 2, step 2" in err[0], err
    tensors, meta = ckpt._load(out / "last.safetensors")
    assert (meta["epoch"], meta["step"]) == (1, 1)  # the step-4 checkpoint, before the bad step
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/") and t.is_floating_point())
    ckpt._load(out / "model.safetensors")
