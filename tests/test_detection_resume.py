"""Crash-safe detection runs: SIGKILL at four points, Ctrl-C, changed settings; every resume ends bit-identical to one run.

Each run is the CLI in its own process (forked from a launcher that has imported torch, as in test_resume.py):
Mask R-CNN on the smallest registry backbone (timm test_efficientnet, random init) over 6 synthetic 64 px
Penn-Fudan images (4 train = 2 steps per epoch, 2 val), 2 epochs, a checkpoint every 3 steps (so one in the
middle of epoch 2). One thread per process: the results are then reproducible on the CPU, and the resumed runs
are compared bit for bit (weights, optimizer and RNG states, log, metrics; timings aside). At this size the RPN and
RoI samplers take every candidate, so torch's RNG state (also compared) would not show in the weights alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_resume
from detection_helpers import make_pennfudan
from test_resume import assert_same_run, run_chains

from visiontune import checkpoint as ckpt

# The default recipe: its --scale-jitter draws each batch's size from the (seed, epoch) generator of the batch order,
# so a run resumed mid-epoch resizes its batches as the uninterrupted run did; with a weight average (--ema), which the
# checkpoint carries: the kept model is the average, so a resume that lost it would end with other weights
TRAIN = [
    "detect",
    "train",
    "--ema",
    "0.9",
    "--backbone",
    "timm:test_efficientnet",
    "--backbone-weights",
    "none",
    "--min-size",
    "64",
    "--max-size",
    "64",
    "--epochs",
    "2",
    "--val-last",
    "2",
    "--checkpoint-every",
    "3",
    "--quiet",
]


class Launcher(test_resume.Launcher):
    """test_resume's launcher with the detection engine imported before any fork."""

    def __init__(self, workdir: Path):
        self.workdir, self.count = workdir, 0
        env = {k: v for k, v in os.environ.items() if k != "VISIONTUNE_FAULT"}
        env.update(OMP_NUM_THREADS="1", VISIONTUNE_OFFLINE="1")
        script = test_resume.LAUNCHER.replace(
            "from visiontune.cli import main", "import visiontune.tasks.detect\nfrom visiontune.cli import main", 1
        )
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


# Where each process of the SIGKILL chain kills itself (counted within that process), and the checkpoint it
# leaves as (epochs done, steps into the next). Global steps 1..4, two per epoch; `last` after step 3 and each epoch.
KILLS = [
    ("write-last:1", None),  # writing the first checkpoint (end of epoch 1, after the best model): none yet, the resume starts over
    ("step:3", (1, 1)),  # mid-epoch 2, after the step-3 checkpoint
    ("validate:1", (1, 1)),  # in epoch 2's COCO evaluation (the predictions made, not yet scored)
    ("finish:1", (2, 0)),  # writing the final files
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two chains, one thread each: the SIGKILL chain; the uninterrupted baseline, then a Ctrl-C and its resume."""
    root = tmp_path_factory.mktemp("detection_runs")
    data = make_pennfudan(root / "data", n=6)
    start = lambda out: [*TRAIN, "--data", str(data), "--out", str(out)]  # noqa: E731
    resume = lambda out: ["detect", "train", "--out", str(out), "--resume"]  # noqa: E731
    return dict(run_chains(root, Launcher, start, resume, KILLS, "step:3:INT"), root=root, data=data)


def test_sigkill_at_four_points_then_resume_is_bit_identical(runs):
    seen = runs["kills"]
    for (fault, left), s in zip(KILLS, seen):
        assert s["rc"] == -9, (fault, s["stderr"])
        assert not s["corrupt"], (fault, s["corrupt"])
        assert s["last"] == left, fault
    assert seen[0]["model"] and seen[0]["last"] is None  # the best model of epoch 1 was written, its checkpoint not
    final = seen[-1]
    assert final["rc"] == 0 and not final["corrupt"], final["stderr"]
    out = runs["root"] / "killed"
    assert not list(out.glob(".*.tmp")), "a killed write's temporary file was left behind"
    assert_same_run(out, runs["root"] / "baseline")  # weights, log.jsonl and metrics.json (timings aside)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_says_how_to_resume(runs):
    _, stopped, resumed = runs["others"]
    assert stopped["rc"] == 130 and "Traceback" not in stopped["stderr"], stopped["stderr"]
    last_line = stopped["stderr"].strip().splitlines()[-1]
    assert last_line.startswith("visiontune: interrupted: checkpoint saved at epoch 2, step 2/2"), last_line
    assert "visiontune detect train --resume " in last_line, last_line
    assert stopped["last"] == (1, 2)  # the signal came after step 3; step 4 finished, then it saved (before validating)
    assert resumed["rc"] == 0 and not resumed["corrupt"], resumed["stderr"]
    assert_same_run(runs["root"] / "interrupted", runs["root"] / "baseline")


def test_resume_refuses_changed_settings_and_data_in_one_line(runs, tmp_path, capsys):
    from visiontune.cli import main

    baseline = runs["root"] / "baseline"
    before = {f.name: f.read_bytes() for f in baseline.iterdir()}
    # --epochs 3 differs from the run's 2: a flag given must agree with the run's settings
    for flag in (["--lr", "0.01"], ["--epochs", "3"], ["--min-size", "96"], ["--backbone", "mobilenet_v2"]):
        assert main(["detect", "train", "--out", str(baseline), "--resume", *flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag[0] in err[0] and "differs" in err[0], err
    assert {f.name: f.read_bytes() for f in baseline.iterdir()} == before
    # the run's data folder now holds one more image: the batches would not be the same
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    more = make_pennfudan(tmp_path / "more", n=7)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(runs["data"]), str(more)))
    assert main(["detect", "train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed" in err[0] and "resume needs the same data" in err[0], err


def test_checkpoint_metadata_keys_of_its_own_cannot_be_overwritten(tmp_path):
    from torch import nn

    for meta in ({"format": "pennfudan"}, {"weights_sha256": "0" * 64}, {"kind": "mine"}):
        with pytest.raises(ValueError, match="written by visiontune.checkpoint itself"):
            ckpt.save_model(tmp_path / "m.safetensors", nn.Linear(2, 2), meta)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    ckpt.save_model(tmp_path / "m.safetensors", nn.Linear(2, 2), {"data_format": "pennfudan"})
    _, meta = ckpt.load_model_file(tmp_path / "m.safetensors")
    assert meta["format"] == ckpt.FORMAT and meta["data_format"] == "pennfudan" and meta["kind"] == "model"
