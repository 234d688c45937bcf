"""--precision auto by measurement: the faster precision of a training step, timed once per machine and model; freed
heap memory handed back between phases."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders

from visiontune.cli import main
from visiontune.engine.heap import keep_freed_memory, release_free_memory
from visiontune.engine.runtime import faster_in_bf16
from visiontune.errors import UserError


def test_the_faster_precision_is_chosen_and_remembered(tmp_path):
    calls = []

    def step(bf16: bool) -> None:  # bf16 twice as slow here, as a full fine-tuning step was on a Xeon with AMX
        calls.append(bf16)
        time.sleep(0.02 if bf16 else 0.01)

    cache = tmp_path / "precision.json"
    assert faster_in_bf16(step, "model A", torch.device("cpu"), cache) is False
    assert calls == [False] * 3 + [True] * 3
    assert faster_in_bf16(step, "model A", torch.device("cpu"), cache) is False and len(calls) == 6  # remembered
    assert faster_in_bf16(lambda bf16: time.sleep(0.01 if bf16 else 0.02), "model B", torch.device("cpu"), cache) is True
    assert {v["bf16"] for v in json.loads(cache.read_text()).values()} == {False, True}


def test_a_run_records_the_precision_its_training_steps_used(tmp_path):
    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "run"
    argv = [
        "classify",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "timm:test_efficientnet",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--strategy",
        "full",
        "--epochs",
        "1",
        "--quiet",
    ]
    assert main([*argv, "--precision", "fp32"]) == 0
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["precision"] == "fp32"
    assert main([*argv, "--overwrite"]) == 0  # auto: bf16 where native and measured faster for this step, else fp32
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["precision"] in ("bf16", "fp32")


def test_patience_stops_after_epochs_without_a_better_score_and_a_resume_stays_stopped(tmp_path):
    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "run"
    tiny = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--strategy", "full", "--quiet"]
    assert (
        main(["classify", "train", "--data", str(data), "--out", str(out), *tiny, "--epochs", "12", "--lr", "0.01", "--patience", "2"]) == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    log = (out / "log.jsonl").read_text().splitlines()
    assert m["stopped_epoch"] == m["best_epoch"] + 2 == len(log) < 12, (m["stopped_epoch"], m["best_epoch"], len(log))
    assert max(json.loads(line)["val_accuracy"] for line in log) == m["best_val_accuracy"]
    assert main(["classify", "train", "--resume", str(out)]) == 0  # the checkpoint is past its patience: no more epochs
    assert (out / "log.jsonl").read_text().splitlines() == log


def test_monitor_watches_a_log_field_and_a_wrong_one_is_named():
    from visiontune.engine.loop import best_epoch
    from visiontune.engine.resume import RunState

    state = RunState(best_epoch=2, history=[{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.5}, {"epoch": 3, "val_loss": 0.5}])
    assert best_epoch("auto", state) == 2 and best_epoch("val_loss", state) == 2  # a tie is no improvement
    state.history.append({"epoch": 4, "val_loss": 0.4})
    assert best_epoch("val_loss", state) == 4
    with pytest.raises(UserError, match="--monitor val_acc: not in the log; choose auto or one of"):
        best_epoch("val_acc", state)


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or platform.libc_ver()[0] != "glibc", reason="glibc on Linux only")
def test_freed_heap_memory_goes_back_to_the_system():
    """What an epoch leaves behind: many freed blocks under one still alive at the heap's top, which glibc keeps."""

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [torch.ones(16_000) for _ in range(4_000)]  # 64 KB each, below malloc's mmap threshold: 250 MB of heap
    keep = torch.ones(16_000)  # allocated last: the heap cannot shrink from its top
    before = rss_mb()
    del blocks
    after_free = rss_mb()
    if before - after_free > 100:
        pytest.skip("this malloc gave the pages back on free")
    release_free_memory()
    assert after_free - rss_mb() > 200, (before, after_free, rss_mb())
    del keep


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def test_large_blocks_come_from_the_heap_and_stay_there():
    """After keep_freed_memory, a 64 MB tensor is carved from malloc's heap (not a fresh mapping), and once freed its
    pages wait there for the next one."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+")
    mallinfo2.restype = _MallInfo2
    keep_freed_memory()
    mapped = mallinfo2().hblkhd
    x = torch.ones(16 << 20)  # 64 MB: by default a mapping of its own (hblkhd grows by 64 MB), unmapped when freed
    assert mallinfo2().hblkhd == mapped
    heap = mallinfo2().arena
    del x
    assert mallinfo2().arena >= heap  # not trimmed away
