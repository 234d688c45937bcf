"""Multi-process training (torchrun, DDP, gloo on CPU) learns what one process learns at the same global batch.

The model is timm's tiny ``test_vit`` with random weights: it normalizes with LayerNorm, which works per image,
so two processes with 4 images each compute exactly the gradient one process computes on 8. (A BatchNorm
network would not: its training statistics come from each process's own images unless synchronized, and
PyTorch synchronizes BatchNorm on CUDA only.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_class_folders
from visiontune import checkpoint as ckpt
from visiontune.cli import main
from visiontune.config import ClassifyConfig
from visiontune.engine.train import fit
from visiontune.errors import UserError

# Two processes vs one: float sums in another order; measured differences are ~5e-6 in weights, ~2e-7 in loss.
WEIGHT_ATOL = 1e-4
LOSS_RTOL = 1e-5

SETTINGS = dict(model="timm:test_vit", weights="none", strategy="staged", epochs=3, batch_size=8, image_size=64, quiet=True)


def torchrun(nproc: int, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "visiontune", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_args(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [] if v is False else [flag, str(v)]
    return out


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same staged run (head on cached features, then the whole network) on 1 process and on 2."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_class_folders(root / "data", per_class=8)  # 16 training images: 2 steps of 8 per epoch
    settings = dict(SETTINGS, data=str(data))
    one, two = root / "one", root / "two"
    fit(ClassifyConfig(**settings, out=str(one), cache_dir=str(root / "cache1")))
    settings.pop("quiet")  # rank 0 alone must print
    proc = torchrun(2, "classify", "train", *cli_args(settings), "--out", str(two), "--cache-dir", str(root / "cache2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"one": one, "two": two, "root": root, "stdout": proc.stdout}


def test_two_processes_follow_the_one_process_loss_curve(runs):
    one, two = log_lines(runs["one"]), log_lines(runs["two"])
    assert [e["epoch"] for e in two] == [e["epoch"] for e in one] == [1, 2, 3]  # rank 0 alone wrote the log
    for a, b in zip(one, two):
        assert b["phase"] == a["phase"]
        for key in ("train_loss", "val_loss", "lr"):
            assert b[key] == (None if a[key] is None else pytest.approx(a[key], rel=LOSS_RTOL)), (a["epoch"], key)
        assert b["val_accuracy"] == a["val_accuracy"]


def test_two_processes_end_with_the_one_process_weights(runs):
    a, meta_a = ckpt.load_model_file(runs["one"] / "last.safetensors")
    b, meta_b = ckpt.load_model_file(runs["two"] / "last.safetensors")
    assert meta_b["world_size"] == 2 and meta_a["world_size"] == 1
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < WEIGHT_ATOL
    assert any((a[k] != 0).any() for k in a)  # not a vacuous comparison of empty models


def test_rank_zero_alone_writes_and_prints(runs):
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    assert sum(v["support"] for v in metrics["per_class"].values()) == 16  # every validation image, once
    assert runs["stdout"].count("best val accuracy") == 1 and runs["stdout"].count("epoch   3/3") == 1
    assert len(list((runs["root"] / "cache2").glob("*.safetensors"))) == 2  # train and val features, built once


def test_resume_with_another_process_count_is_refused(runs, capsys):
    last = runs["two"] / "last.safetensors"
    before = last.read_bytes()
    with pytest.raises(UserError, match=r"trained with 2 process\(es\), this run has 1"):
        fit(ClassifyConfig(out=str(runs["two"])), resume=True)
    assert main(["classify", "train", "--out", str(runs["two"]), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visiontune: error: --resume:") and "nproc-per-node" in err[0]
    assert last.read_bytes() == before  # nothing of the run is lost


# --------------------------------------------------------------------------------------------- the helpers, 2 processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from torch import nn

    from visiontune.engine import distributed as d

    d.init(torch.device("cpu"))
    calls = []
    feats, labels = d.computed_on_main(lambda: (calls.append(1), torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 1]))[1:])
    shard = d.shard(list(range(5)))
    gathered = d.gather_cat(torch.tensor([float(i) for i in shard]))

    # Staged unfreezing: the DDP wrapper follows the trainable set; gradients are the full-batch ones each phase.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    grads_ok = []
    model[0].requires_grad_(False)
    for phase in range(3):
        if phase == 1:
            model[0].requires_grad_(True)
        model.zero_grad(set_to_none=True)
        ((d.for_training(model, torch.device("cpu"))(x[rank * 4:(rank + 1) * 4]) - y[rank * 4:(rank + 1) * 4]) ** 2).mean().backward()
        ref = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        ref.load_state_dict(model.state_dict())
        ((ref(x) - y) ** 2).mean().backward()
        grads_ok.append(all((p.grad is None) if not p.requires_grad else torch.allclose(p.grad, q.grad, atol=1e-6)
                            for p, q in zip(model.parameters(), ref.parameters())))
    try:
        d.per_process_batch(5)
        batch_error = ""
    except UserError as e:
        batch_error = str(e)
    results[rank] = {"calls": len(calls), "feats": feats.tolist(), "labels": labels.tolist(), "shard": list(shard),
                     "gathered": gathered.tolist(), "grads_ok": grads_ok, "batch_error": batch_error,
                     "sampler": list(d.epoch_sampler(list(range(7)), 3, 1))}


def test_distributed_helpers_on_two_processes():
    results = mp.Manager().dict()
    mp.spawn(_helpers_worker, args=(_free_port(), results), nprocs=2)
    r0, r1 = results[0], results[1]
    assert (r0["calls"], r1["calls"]) == (1, 0)  # computed on rank 0 alone ...
    assert r1["feats"] == r0["feats"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]] and r1["labels"] == [0, 1, 1]  # ... and shared
    assert r0["shard"] + r1["shard"] == [0, 1, 2, 3, 4]  # every validation item once
    assert r0["gathered"] == r1["gathered"] == [0.0, 1.0, 2.0, 3.0, 4.0]  # in order, on every rank
    assert r0["grads_ok"] == r1["grads_ok"] == [True, True, True]
    assert "--batch-size 5 is the global batch" in r0["batch_error"] and "2 processes" in r0["batch_error"]
    one = torch.randperm(7, generator=torch.Generator().manual_seed(3 + 1)).tolist()  # the one-process order
    assert sorted(r0["sampler"] + r1["sampler"]) == sorted(one + one[:1])  # padded to 8 by repeating the first
    assert r0["sampler"] == (one + one[:1])[0::2] and r1["sampler"] == (one + one[:1])[1::2]
