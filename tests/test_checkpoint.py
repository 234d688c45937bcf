"""Model files and checkpoints you can trust: checksums, atomic writes, exact training state, resume helpers."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visiontune import checkpoint as ckpt
from visiontune.engine.resume import Interrupted, stop_on_interrupt
from visiontune.errors import UserError
from visiontune.runs import MAY_CHANGE_ON_RESUME, check_out_dir, check_same_settings, create_out_dir


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_model_file_round_trip_and_metadata(tmp_path):
    model = tiny_model()
    ckpt.save_model(tmp_path / "m.safetensors", model, {"classes": ["a", "b", "c"]})
    sd, meta = ckpt.load_model_file(tmp_path / "m.safetensors")
    assert meta["classes"] == ["a", "b", "c"] and meta["format"] == ckpt.FORMAT and len(meta["weights_sha256"]) == 64
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def header_end(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_in_tensors", "truncated or corrupt"),
        ("truncate_in_header", "truncated or corrupt"),
        ("zero_bytes", "truncated or corrupt"),
        ("flip_a_weight_byte", "checksum mismatch"),
        ("swap_in_other_weights", "checksum mismatch"),
        ("metadata_not_json", "damaged visiontune metadata"),
        ("no_metadata", "not a visiontune file"),
    ],
)
def test_damaged_files_are_refused_never_loaded_half(tmp_path, damage, message):
    p = tmp_path / "m.safetensors"
    ckpt.save_model(p, tiny_model(), {"classes": ["a", "b", "c"]})
    data = bytearray(p.read_bytes())
    if damage == "truncate_in_tensors":
        p.write_bytes(data[: (header_end(p) + len(data)) // 2])
    elif damage == "truncate_in_header":
        p.write_bytes(data[: header_end(p) // 2])
    elif damage == "zero_bytes":
        p.write_bytes(b"")
    elif damage == "flip_a_weight_byte":
        data[header_end(p) + 5] ^= 0x01
        p.write_bytes(bytes(data))
    elif damage == "swap_in_other_weights":  # a valid file with the old header, other tensors: someone edited the weights
        tensors, header = load_file(str(p)), json.loads(data[8 : header_end(p)])["__metadata__"]
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, str(p), metadata=header)
    elif damage == "metadata_not_json":
        save_file(load_file(str(p)), str(p), metadata={ckpt.META_KEY: "{broken"})
    elif damage == "no_metadata":
        save_file(load_file(str(p)), str(p))
    with pytest.raises(UserError) as e:
        ckpt.load_model_file(p)
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "model.safetensors"
    ckpt.save_model(p, tiny_model(0), {"v": 1})
    before = p.read_bytes()

    def half_then_crash(tmp):
        Path(tmp).write_bytes(before[:100])
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.atomic_write(p, half_then_crash)
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["model.safetensors"]


def test_sigkill_while_replacing_the_best_model_leaves_the_old_one(tmp_path):
    """A real process killed (VISIONTUNE_FAULT) halfway through writing: the previous best stays whole."""
    p = tmp_path / "model.safetensors"
    ckpt.save_model(p, tiny_model(0), {"v": 1})
    before = p.read_bytes()
    code = (
        "import sys, torch; from torch import nn; from visiontune import checkpoint as c; "
        "c.save_model(sys.argv[1], nn.Linear(300, 300), {'v': 2})"
    )
    env = dict(os.environ, VISIONTUNE_FAULT="write-model:1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, str(p)], env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert p.read_bytes() == before and ckpt.load_model_file(p)[1]["v"] == 1
    leftover = list(tmp_path.glob(".model.safetensors.*.tmp"))  # the half-written temporary file, never renamed
    assert len(leftover) == 1 and leftover[0].stat().st_size < 300 * 300 * 4
    create_out_dir(tmp_path, overwrite=False, resume=True)  # a resumed run sweeps it away
    assert not list(tmp_path.glob(".*.tmp")) and p.read_bytes() == before


def train_steps(model, opt, sched, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        x = x + torch.randn_like(x) * 0.01  # draws from the global RNG, like dropout and augmentation
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_state_resumes_bit_identically(tmp_path, optimizer):
    def make():
        model = tiny_model()
        params = [
            {"params": model[0].parameters(), "name": "backbone"},
            {"params": [*model[1].parameters(), *model[3].parameters()], "name": "head"},
        ]
        opt = (
            torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
            if optimizer == "sgd"
            else torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
        )
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.1 * 0.9**s, lambda s: 0.9**s])

    torch.manual_seed(123), np.random.seed(5), random.seed(7)
    model, opt, sched = make()
    train_steps(model, opt, sched, 3, seed=1)
    ckpt.save_training_state(tmp_path / "last.safetensors", model, opt, sched, {"epoch": 0, "step": 3})
    expected_draws = (torch.rand(2), np.random.rand(), random.random())
    expected = train_steps(model, opt, sched, 4, seed=2)

    torch.manual_seed(999), np.random.seed(0), random.seed(0)  # some other state, as in a new process
    model2, opt2, sched2 = make()
    meta = ckpt.load_training_state(tmp_path / "last.safetensors", model2, opt2, sched2)
    assert (meta["epoch"], meta["step"]) == (0, 3)
    draws = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    assert train_steps(model2, opt2, sched2, 4, seed=2) == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_training_state_refuses_a_model_file_and_another_architecture(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_model(tmp_path / "model.safetensors", model, {})
    with pytest.raises(UserError, match="not a training checkpoint"):
        ckpt.load_training_state(tmp_path / "model.safetensors", model, opt, sched)
    ckpt.save_training_state(tmp_path / "last.safetensors", model, opt, sched, {})
    other = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(UserError, match="does not fit this run's model"):
        ckpt.load_training_state(
            tmp_path / "last.safetensors", other, other_opt, torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1.0)
        )
    two_groups = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[3].parameters()}], lr=0.1)
    with pytest.raises(UserError, match="parameter groups"):
        ckpt.load_training_state(tmp_path / "last.safetensors", model, two_groups, None)


def test_resume_loader_skips_batches_without_touching_the_global_rng():
    ds = TensorDataset(torch.arange(10))
    full = DataLoader(ds, batch_size=3, sampler=torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist())
    batches = [b[0].tolist() for b in full]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    rest = [b[0].tolist() for b in ckpt.resume_loader(full, 2)]
    assert rest == batches[2:] and len(ckpt.resume_loader(full, 2)) == 2
    assert torch.equal(torch.get_rng_state(), state)
    assert list(ckpt.resume_loader(full, len(batches))) == []


def test_out_dir_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_text("earlier")
    with pytest.raises(UserError, match="--overwrite"):
        check_out_dir(run, overwrite=False)
    assert check_out_dir(run, overwrite=True) == run and (run / "model.safetensors").read_text() == "earlier"  # only checked
    create_out_dir(run, overwrite=True)  # replaced only now, when training starts
    assert not (run / "model.safetensors").exists()
    with pytest.raises(UserError, match="nothing to resume"):
        check_out_dir(tmp_path / "new", overwrite=False, resume=True)


def test_settings_that_may_differ_on_resume():
    saved = {"epochs": 3, "lr": 0.05, "quiet": False, "device": "cpu", "out": "a"}
    check_same_settings(saved, {"epochs": 3, "lr": 0.05, "quiet": True, "device": "cuda", "out": "b"}, "run")
    check_same_settings(saved, {"lr": 5e-2, "epochs": 3.0}, "run")  # YAML may give 3.0 for 3
    with pytest.raises(UserError, match="--lr 0.1 differs from the run's 0.05"):
        check_same_settings(saved, {"lr": 0.1}, "run")
    assert {"epochs", "lr", "strategy", "seed", "data", "batch_size", "sync_bn"}.isdisjoint(MAY_CHANGE_ON_RESUME)


def test_first_ctrl_c_asks_to_stop_the_second_stops_now():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with stop_on_interrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler before it is restored
    assert Interrupted("x").exit_code == 130
