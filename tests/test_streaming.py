"""Images read from disk by DataLoader workers (--cache-images none) train the same model as images held in RAM."""

from __future__ import annotations

import json

import torch
from conftest import make_class_folders
from PIL import Image

from visiontune import checkpoint as ckpt
from visiontune.cli import main

TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--quiet", "--seed", "0"]


def train(data, out, *extra) -> dict:
    assert main(["classify", "train", "--data", str(data), "--out", str(out), *TINY, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_streamed_run_equals_the_in_ram_run(tmp_path):
    """A few hundred images, full fine-tuning for three epochs: 2 worker processes reading the files give the same
    weights, bit for bit, as one process transforming decoded images (each image's augmentation is seeded by
    (seed, epoch, index)), so the same accuracy."""
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=70)
    common = ["--strategy", "full", "--epochs", "3", "--batch-size", "32", "--lr", "0.01"]
    ram = train(data, tmp_path / "ram", *common, "--cache-images", "ram")
    streamed = train(data, tmp_path / "streamed", *common, "--cache-images", "none", "--workers", "2")
    assert streamed["best_val_accuracy"] == ram["best_val_accuracy"] >= 0.6  # chance: 1/3
    a, _ = ckpt.load_model_file(tmp_path / "ram" / "model.safetensors")
    b, _ = ckpt.load_model_file(tmp_path / "streamed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_bad_past_its_header_stops_a_streamed_run_in_one_line(tmp_path, capsys):
    """Streaming reads headers at the start and pixels later: a JPEG cut short is found then, and named."""
    data = make_class_folders(tmp_path / "data")
    p = data / "train" / "red" / "cut.jpg"
    Image.new("RGB", (256, 256), (200, 0, 0)).save(p, quality=90)
    p.write_bytes(p.read_bytes()[:400])
    capsys.readouterr()
    rc = main(["classify", "train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--cache-images", "none", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cut.jpg" in err[0] and "Traceback" not in err[0], err
