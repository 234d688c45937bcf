"""Bad input, tried systematically: every kind ends with exit code 2, one line on stderr naming the problem,
no traceback, and an earlier run in --out untouched (even with --overwrite: nothing is replaced before the
inputs are known good).

Each case builds its own broken input in a fresh folder and runs the CLI in this process (warnings and log
warnings count as stderr lines, as they would be in a terminal); a few run as real subprocesses too.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders, make_image
from PIL import Image
from safetensors.torch import save_file

from visiontune import checkpoint as ckpt
from visiontune.cli import main

TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--epochs", "1", "--quiet"]


class WritesAFile:
    """Unpickling this writes ``path``: the payload of a hostile model file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """An earlier run's directory."""
    run = tmp_path / "earlier"
    run.mkdir()
    (run / "config.yaml").write_text("data: somewhere\n")
    (run / "model.safetensors").write_bytes(b"the earlier model" * 100)
    (run / "metrics.json").write_text('{"best_val_accuracy": 0.9}\n')
    return run


def snapshot(run: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir())}


def model_file(path: Path, classes=("blue", "red")) -> Path:
    """A classification model file as training writes it (random weights of a tiny timm model)."""
    from visiontune.models.backbones import build_backbone
    from visiontune.models.classifier import Classifier

    torch.manual_seed(0)
    model = Classifier(build_backbone("timm:test_efficientnet", "none"), len(classes))
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_model(
        path,
        model,
        {
            "task": "classification",
            "model": "timm:test_efficientnet",
            "classes": list(classes),
            "head": "linear",
            "bank_size": 1,
            "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 64, "resize_size": 73},
        },
    )
    return path


@contextmanager
def unprivileged():
    """Run as user nobody when we are root (root reads any file, whatever its mode)."""
    if os.geteuid() != 0:
        yield
        return
    import visiontune.tasks.classify  # noqa: F401 - every module the run needs is imported while we can read them
    from visiontune.models.backbones import build_backbone

    build_backbone("timm:test_efficientnet", "none")
    try:
        os.setegid(65534)
        os.seteuid(65534)
    except PermissionError:
        os.setegid(0)
        pytest.skip("root, but not allowed to switch user: cannot make a file unreadable")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


# --------------------------------------------------------------------------------------------- the cases
# Each builds its input under ``t`` (a fresh folder) and returns (argv, text the error line must contain).
# ``out`` is the earlier run; training cases pass --overwrite to prove it is still not touched.


@dataclass(frozen=True)
class Case:
    """One kind of bad input: ``build(t, out)`` makes it and returns (argv, text the error line must contain)."""

    id: str
    build: Callable[[Path, Path], tuple[list[str], str]]
    unreadable: tuple[str, ...] = ()
    """Paths under ``t`` made unreadable (mode 0) just before the run; such a case runs as user nobody when we
    are root, with its input and the earlier run in a folder nobody can reach."""

    @property
    def unprivileged(self) -> bool:
        return bool(self.unreadable)


CASES: list[Case] = []


def case(*, unreadable: tuple[str, ...] = ()):
    """Adds the decorated build function to CASES, named by the function."""

    def register(build):
        assert build.__name__ not in {c.id for c in CASES}, build.__name__
        CASES.append(Case(build.__name__, build, unreadable))
        return build

    return register


def train(data, out, *extra):
    return ["classify", "train", "--data", str(data), "--out", str(out), "--overwrite", *TINY, *extra]


def folders(t: Path, **kw) -> Path:
    return make_class_folders(t / "data", per_class=3, **kw)


@case()
def missing_data(t, out):
    return train(t / "nowhere", out), "nowhere: no such directory"


@case()
def data_not_given(t, out):
    return ["classify", "train", "--out", str(out), "--overwrite", *TINY], "--data: required"


@case()
def data_is_a_file(t, out):
    (t / "images.zip").write_bytes(b"PK")
    return train(t / "images.zip", out), "images.zip: not a directory"


@case()
def no_class_folders(t, out):
    (t / "data" / "train").mkdir(parents=True)
    (t / "data" / "val").mkdir()
    return train(t / "data", out), "no class folders"


@case()
def empty_class(t, out):
    data = folders(t)
    for f in (data / "train" / "red").iterdir():
        f.unlink()
    return train(data, out), "red has no images"


@case()
def class_of_non_images(t, out):
    data = folders(t)
    shutil.rmtree(data / "val" / "blue")
    (data / "val" / "blue").mkdir()
    (data / "val" / "blue" / "notes.txt").write_text("no pictures here")
    return train(data, out), "blue has no images"


@case()
def one_class(t, out):
    return train(folders(t, classes=("red",)), out), "only one class"


@case()
def train_val_classes_differ(t, out):
    data = folders(t)
    (data / "val" / "blue").rename(data / "val" / "green")
    return train(data, out), "only in train: ['blue']"


@case()
def no_train_val_and_no_split(t, out):
    data = folders(t, splits=("",))
    return train(data, out), "--val-split"


@case()
def val_split_too_few(t, out):
    data = make_class_folders(t / "data", per_class=1, splits=("",))
    return train(data, out, "--val-split", "0.5"), "too few to split"


@case()
def missing_val_data(t, out):
    return train(folders(t), out, "--val-data", str(t / "nope")), "--val-data"


def index(t: Path, text: str, name: str = "index.csv") -> Path:
    """An index file in ``t`` beside two images it may name, a.png and b.png."""
    make_image(t / "a.png", (200, 0, 0))
    make_image(t / "b.png", (0, 0, 200))
    (t / name).write_text(text)
    return t / name


@case()
def index_names_a_missing_image(t, out):
    data = index(t, "path,label\na.png,red\ngone.jpg,blue\n")
    return train(data, out, "--val-split", "0.5"), f"index.csv, line 3: {t / 'gone.jpg'}: no such file"


@case()
def index_without_label_column(t, out):
    return train(index(t, "path,class\na.png,red\nb.png,blue\n"), out, "--val-split", "0.5"), "line 1: no 'label' column"


@case()
def index_bad_split_value(t, out):
    data = index(t, "path,label,split\na.png,red,train\nb.png,blue,test\n")
    return train(data, out), "index.csv, line 3: split 'test' is not one of train, val"


@case()
def class_weights_unknown_class(t, out):
    (t / "weights.json").write_text('{"green": 2}')
    return train(folders(t), out, "--class-weights", str(t / "weights.json")), "weights.json: unknown class(es) green"


@case()
def sampler_unknown(t, out):
    return train(folders(t), out, "--sampler", "weighted"), "--sampler: unknown sampler 'weighted'; choose shuffle or balanced"


@case()
def monitor_not_in_the_log(t, out):
    return train(folders(t), out, "--patience", "1", "--monitor", "val_acc"), "--monitor: unknown monitor 'val_acc'"


@case()
def index_duplicate_image(t, out):
    data = index(
        t, '{"path": "a.png", "label": "red"}\n{"path": "b.png", "label": "blue"}\n{"path": "./a.png", "label": "blue"}\n', "i.jsonl"
    )
    return train(data, out, "--val-split", "0.5"), f"i.jsonl, lines 1 and 3: the same image twice ({t / 'a.png'})"


@case()
def index_without_split_or_val_split(t, out):
    return train(index(t, "path,label\na.png,red\nb.png,blue\n"), out), "has no split column; pass --val-split"


@case()
def corrupt_image(t, out):
    data = folders(t)
    (data / "train" / "red" / "red_1.png").write_bytes(os.urandom(2000))
    return train(data, out), "red_1.png"


@case()
def truncated_png(t, out):
    data = folders(t)
    p = make_image(data / "train" / "blue" / "big.png", (0, 0, 200), size=(256, 256))
    p.write_bytes(p.read_bytes()[:3000])
    return train(data, out), "big.png: corrupt or truncated"


@case()
def truncated_jpeg(t, out):
    data = folders(t)
    p = data / "val" / "red" / "photo.jpg"
    Image.new("RGB", (256, 256), (200, 0, 0)).save(p, quality=90)
    p.write_bytes(p.read_bytes()[:400])
    return train(data, out), "photo.jpg"


@case()
def zero_byte_image(t, out):
    data = folders(t)
    (data / "train" / "red" / "empty.jpg").write_bytes(b"")
    return train(data, out), "empty.jpg"


@case()
def text_with_image_extension(t, out):
    data = folders(t)
    (data / "train" / "blue" / "readme.png").write_text("this is not a picture")
    return train(data, out), "readme.png: not an image"


@case()
def decompression_bomb(t, out):
    data = folders(t)
    Image.new("1", (9000, 9000)).save(data / "train" / "red" / "bomb.png")
    return train(data, out), "bomb.png"


@case(unreadable=("data/train/red/red_0.png",))
def unreadable_image(t, out):
    return train(folders(t), out), "red_0.png: permission denied"


@case()
def unknown_model(t, out):
    return train(folders(t), out, "--model", "efficientnet_lite9"), "did you mean"


@case()
def unknown_timm_model(t, out):
    return train(folders(t), out, "--model", "timm:resnet_does_not_exist"), "timm has no model"


@case()
def unknown_strategy(t, out):
    return train(folders(t), out, "--strategy", "everything"), "--strategy"


@case()
def unknown_head(t, out):
    return train(folders(t), out, "--head", "forest"), "--head"


@case()
def unknown_recipe(t, out):
    return train(folders(t), out, "--recipe", "grandma"), "--recipe"


@case()
def unknown_device(t, out):
    return train(folders(t), out, "--device", "tpu"), "--device"


@case()
def unknown_flag(t, out):
    return train(folders(t), out, "--epochz", "3"), "--epochz"


@case()
def unknown_stage(t, out):
    return train(folders(t), out, "--strategy", "partial", "--freeze-until", "blocks.99"), "--freeze-until"


@case()
def too_many_trainable_stages(t, out):
    return train(folders(t), out, "--strategy", "partial", "--trainable-stages", "99"), "--trainable-stages"


@case()
def sklearn_head_with_full(t, out):
    return train(folders(t), out, "--strategy", "full", "--head", "svm"), "--head svm"


@case()
def zero_epochs(t, out):
    return train(folders(t), out, "--epochs", "0"), "--epochs"


@case()
def negative_epochs(t, out):
    return train(folders(t), out, "--epochs", "-3"), "--epochs"


@case()
def zero_batch_size(t, out):
    return train(folders(t), out, "--batch-size", "0"), "--batch-size"


@case()
def negative_lr(t, out):
    return train(folders(t), out, "--lr", "-0.1"), "--lr"


@case()
def lr_not_a_number(t, out):
    return train(folders(t), out, "--lr", "fast"), "--lr"


@case()
def negative_checkpoint_every(t, out):
    return train(folders(t), out, "--checkpoint-every", "-5"), "--checkpoint-every"


@case()
def zero_val_split(t, out):
    return train(folders(t), out, "--val-split", "0"), "--val-split"


@case()
def val_split_out_of_range(t, out):
    return train(folders(t), out, "--val-split", "1.5"), "--val-split"


@case()
def tiny_image_size(t, out):
    return train(folders(t), out, "--image-size", "8"), "--image-size"


@case()
def negative_workers(t, out):
    return train(folders(t), out, "--workers", "-1"), "--workers"


@case()
def out_is_a_file(t, out):
    (t / "run.txt").write_text("x")
    return ["classify", "train", "--data", str(folders(t)), "--out", str(t / "run.txt"), *TINY], "not a directory"


@case()
def out_not_writable(t, out):
    return ["classify", "train", "--data", str(folders(t)), "--out", "/proc/visiontune-run", *TINY], "--out: cannot write"


@case()
def existing_run_without_overwrite(t, out):
    return ["classify", "train", "--data", str(folders(t)), "--out", str(out), *TINY], "--overwrite"


@case()
def weights_missing(t, out):
    return train(folders(t), out, "--weights", str(t / "none.pth")), "none.pth: no such file"


@case()
def weights_directory(t, out):
    (t / "weights").mkdir()
    return train(folders(t), out, "--weights", str(t / "weights")), "is a directory"


@case()
def weights_zero_byte(t, out):
    (t / "w.safetensors").write_bytes(b"")
    return train(folders(t), out, "--weights", str(t / "w.safetensors")), "w.safetensors: cannot read weights"


@case()
def weights_truncated(t, out):
    save_file({"w": torch.zeros(1000)}, str(t / "w.safetensors"))
    (t / "w.safetensors").write_bytes((t / "w.safetensors").read_bytes()[:2000])
    return train(folders(t), out, "--weights", str(t / "w.safetensors")), "w.safetensors: cannot read weights"


@case()
def weights_random_bytes(t, out):
    (t / "w.pth").write_bytes(os.urandom(4096))
    return train(folders(t), out, "--weights", str(t / "w.pth")), "w.pth: cannot read weights"


@case()
def weights_other_architecture(t, out):
    save_file({"fc.weight": torch.zeros(10, 5), "conv.weight": torch.zeros(3, 3, 3, 3)}, str(t / "other.safetensors"))
    return train(folders(t), out, "--weights", str(t / "other.safetensors")), "do not match this architecture"


@case()
def weights_not_tensors(t, out):
    torch.save({"epoch": 3, "note": "a training log, not weights"}, t / "log.pth")
    return train(folders(t), out, "--weights", str(t / "log.pth")), "not a state dict of tensors"


@case()
def config_malformed_yaml(t, out):
    (t / "c.yaml").write_text("epochs: [3\nstrategy: full\n")
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "not valid YAML"


@case()
def config_unknown_key(t, out):
    (t / "c.yaml").write_text(f"data: {folders(t)}\nepocs: 3\n")
    return [
        "classify",
        "train",
        "--config",
        str(t / "c.yaml"),
        "--out",
        str(out),
        "--overwrite",
    ], "unknown setting 'epocs'; did you mean 'epochs'?"


@case()
def config_wrong_type(t, out):
    (t / "c.yaml").write_text(f"data: {folders(t)}\nepochs: three\n")
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "epochs: expected a whole number"


@case()
def config_not_a_mapping(t, out):
    (t / "c.yaml").write_text("- epochs\n- 3\n")
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "mapping"


@case()
def config_missing(t, out):
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "c.yaml: no such file"


@case()
def config_directory(t, out):
    (t / "c.yaml").mkdir()
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "is a directory"


@case()
def config_binary(t, out):
    Image.new("RGB", (8, 8)).save(t / "c.yaml", format="PNG")
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "c.yaml"


@case(unreadable=("c.yaml",))
def config_unreadable(t, out):
    (t / "c.yaml").write_text("epochs: 3\n")
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "c.yaml"


@case()
def config_python_object(t, out):
    (t / "c.yaml").write_text(f"epochs: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{t / 'pwned'}']]\n")
    return ["classify", "train", "--config", str(t / "c.yaml"), "--out", str(out), "--overwrite"], "not valid YAML"


@case()
def resume_not_a_run(t, out):
    (t / "empty").mkdir()
    return ["classify", "train", "--out", str(t / "empty"), "--resume"], "nothing to resume"


@case()
def predict_missing_run(t, out):
    return ["classify", "predict", str(t / "norun"), str(t)], "no model file"


@case()
def predict_truncated_model(t, out):
    p = model_file(t / "run" / "model.safetensors")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    make_image(t / "img.png", (200, 0, 0))
    return ["classify", "predict", str(t / "run"), str(t / "img.png")], "truncated or corrupt"


@case()
def predict_altered_weights(t, out):
    p = model_file(t / "run" / "model.safetensors")
    data = bytearray(p.read_bytes())
    data[-8] ^= 0xFF  # one flipped byte in the last tensor
    p.write_bytes(bytes(data))
    make_image(t / "img.png", (200, 0, 0))
    return ["classify", "predict", str(t / "run"), str(t / "img.png")], "checksum mismatch"


@case()
def predict_foreign_safetensors(t, out):
    save_file({"w": torch.zeros(3)}, str(t / "model.safetensors"))
    make_image(t / "img.png", (200, 0, 0))
    return ["classify", "predict", str(t / "model.safetensors"), str(t / "img.png")], "not a visiontune file"


@case()
def predict_corrupt_image(t, out):
    model_file(t / "run" / "model.safetensors")
    (t / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return ["classify", "predict", str(t / "run"), str(t / "broken.jpg")], "broken.jpg"


@case()
def predict_missing_image(t, out):
    model_file(t / "run" / "model.safetensors")
    return ["classify", "predict", str(t / "run"), str(t / "gone.jpg")], "gone.jpg: no such file"


@case()
def predict_zero_topk(t, out):
    model_file(t / "run" / "model.safetensors")
    make_image(t / "img.png", (200, 0, 0))
    return ["classify", "predict", str(t / "run"), str(t / "img.png"), "--topk", "0"], "--topk"


@case()
def predict_unknown_device(t, out):
    model_file(t / "run" / "model.safetensors")
    make_image(t / "img.png", (200, 0, 0))
    return ["classify", "predict", str(t / "run"), str(t / "img.png"), "--device", "tpu"], "--device: unknown device 'tpu'"


@case()
def int8_as_torchscript(t, out):
    return ["export", str(t / "run"), "--output", str(t / "m.pt"), "--int8", "--format", "torchscript"], "--int8: INT8 exports are ONNX"


@case()
def int8_into_a_missing_folder(t, out):
    return ["export", str(out), "--output", str(t / "nowhere" / "m.onnx"), "--int8"], "--output: "


@case()
def predict_onnx_on_a_gpu(t, out):
    (t / "model.onnx").write_bytes(b"exported elsewhere")
    make_image(t / "img.png", (200, 0, 0))
    return ["detect", "predict", str(t / "model.onnx"), str(t / "img.png"), "--device", "cuda"], "run on the CPU"


@case()
def eval_unknown_classes(t, out):
    model_file(t / "run" / "model.safetensors")
    data = make_class_folders(t / "data", classes=("red", "green"), per_class=2, splits=("val",))
    return ["classify", "eval", str(t / "run"), "--data", str(data)], "green"


@case()
def eval_labels_for_a_single_label_model(t, out):
    model_file(t / "run" / "model.safetensors")
    data = make_class_folders(t / "data", per_class=2, splits=("val",))
    (t / "labels.csv").write_text("path,labels\nval/red/red_0.png,red\n")
    return ["classify", "eval", str(t / "run"), "--data", str(data), "--labels", str(t / "labels.csv")], "--labels: only for multi-label"


@case()
def eval_tta_unknown(t, out):
    model_file(t / "run" / "model.safetensors")
    return ["classify", "eval", str(t / "run"), "--data", str(t), "--tta", "crops"], "--tta: invalid choice: 'crops'"


@case()
def detect_eval_tta_unknown(t, out):
    return ["detect", "eval", str(t / "run"), "--data", str(t), "--tta", "flip+crops"], "--tta: invalid choice: 'flip+crops'"


@case()
def labels_file_missing(t, out):
    return train(folders(t), out, "--labels", str(t / "nope.csv")), "nope.csv: no such file"


@case()
def labels_file_names_a_missing_image(t, out):
    (t / "labels.csv").write_text("path,labels,split\ntrain/red/red_0.png,red,train\ngone.png,blue,val\n")
    return train(folders(t), out, "--labels", str(t / "labels.csv")), "labels.csv, line 3: "


@case()
def labels_file_without_validation(t, out):
    (t / "labels.csv").write_text("path,labels\ntrain/red/red_0.png,red\ntrain/blue/blue_0.png,blue\n")
    return train(folders(t), out, "--labels", str(t / "labels.csv")), "no rows with split val; pass --val-split"


@case()
def labels_with_val_data(t, out):
    (t / "labels.csv").write_text("path,labels\ntrain/red/red_0.png,red\n")
    return train(folders(t), out, "--labels", str(t / "labels.csv"), "--val-data", str(t)), "--val-data: not with --labels"


@case()
def threshold_not_a_number(t, out):
    return train(folders(t), out, "--threshold", "high"), "--threshold: auto or a number between 0 and 1"


def coco_train(root: Path, annotations: Path, out: Path) -> list[str]:
    argv = ["detect", "train", "--format", "coco", "--data", str(root), "--annotations", str(annotations), "--out", str(out)]
    return [*argv, "--overwrite", "--quiet"]


@case()
def coco_file_name_escapes_root(t, out):
    pytest.importorskip("visiontune.data.coco")
    root = t / "images"
    make_image(root / "a.png", (1, 2, 3))
    make_image(t / "secret.png", (1, 2, 3))
    (t / "ann.json").write_text(
        '{"images": [{"id": 1, "file_name": "../secret.png"}], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}'
    )
    return coco_train(root, t / "ann.json", out), "escapes the image root"


@case()
def coco_absolute_file_name(t, out):
    pytest.importorskip("visiontune.data.coco")
    root = t / "images"
    make_image(root / "a.png", (1, 2, 3))
    (t / "ann.json").write_text(
        '{"images": [{"id": 1, "file_name": "/etc/hostname"}], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}'
    )
    return coco_train(root, t / "ann.json", out), "escapes the image root"


@case()
def wise_alpha_out_of_range(t, out):
    return train(folders(t), out, "--strategy", "full", "--wise-alpha", "0"), "--wise-alpha"


@case()
def detect_zero_rois_per_image(t, out):
    root = t / "images"
    make_image(root / "a.png", (1, 2, 3))
    return (
        ["detect", "train", "--data", str(root), "--out", str(out), "--rois-per-image", "0", "--overwrite", "--quiet"],
        "--rois-per-image",
    )


def run_main(argv: list[str], capsys, caplog) -> tuple[int, list[str]]:
    """Exit code, and every line a terminal would show on stderr (log and Python warnings included)."""
    capsys.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in sorted(CASES, key=lambda c: c.id)])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path, earlier_run, capsys, caplog):
    if case.unprivileged:  # everything where user nobody can reach it
        base = Path(tempfile.mkdtemp(prefix="visiontune-bad-input-"))
        base.chmod(0o777)
        earlier_run = Path(shutil.copytree(earlier_run, base / "earlier"))
    else:
        base = tmp_path
    t = base / "input"
    t.mkdir()
    argv, expected = case.build(t, earlier_run)
    before = snapshot(earlier_run)
    try:
        if case.unprivileged:
            for p in [*t.rglob("*"), *earlier_run.rglob("*"), earlier_run, t]:
                p.chmod(0o777 if p.is_dir() else 0o666)
            for rel in case.unreadable:
                (t / rel).chmod(0)
            with unprivileged():
                rc, lines = run_main(argv, capsys, caplog)
        else:
            rc, lines = run_main(argv, capsys, caplog)
        assert rc == 2, (case.id, lines)
        assert len(lines) == 1, (case.id, lines)
        assert lines[0].startswith("visiontune: error: ") and "Traceback" not in lines[0], lines
        assert expected in lines[0], (case.id, expected, lines[0])
        assert snapshot(earlier_run) == before, f"{case.id}: the earlier run was changed"
        assert not (t / "pwned").exists()
    finally:
        if case.unprivileged:
            shutil.rmtree(base)


def test_there_are_at_least_25_kinds():
    assert len(CASES) >= 25


# --------------------------------------------------------------------------------------------- hostile files


@pytest.fixture
def hostile_pickles(tmp_path) -> tuple[list[Path], Path]:
    """Model files whose unpickling writes ``marker``: a plain pickle and torch.save's zip format."""
    marker = tmp_path / "pwned.txt"
    legacy = tmp_path / "evil.pth"
    legacy.write_bytes(pickle.dumps({"state_dict": WritesAFile(marker)}))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"weight": WritesAFile(marker)}, zipped)
    pickle.loads(legacy.read_bytes())  # the payload is live: loading it the unsafe way writes the file
    assert marker.exists()
    marker.unlink()
    return [legacy, zipped], marker


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", VISIONTUNE_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "visiontune", *args], env=env, capture_output=True, text=True, timeout=120)


def test_hostile_pickle_is_never_unpickled(hostile_pickles, tmp_path, tiny_folders, earlier_run, capsys, caplog):
    """As --weights and as the model for predict: refused with one line, and the payload never runs."""
    files, marker = hostile_pickles
    run = tmp_path / "run_dir"
    run.mkdir()
    shutil.copy(files[0], run / "model.safetensors")  # a pickle posing as a model file
    before = snapshot(earlier_run)
    image = next((tiny_folders / "val" / "red").iterdir())
    for args in (
        train(tiny_folders, earlier_run, "--weights", str(files[1])),
        ["classify", "predict", str(files[0]), str(image)],
        ["classify", "predict", str(run), str(image)],
    ):
        rc, lines = run_main(args, capsys, caplog)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("visiontune: error:"), (args, lines)
        assert not marker.exists()
    # and in a real process, where stderr also gets whatever torch prints
    r = run_cli(train(tiny_folders, earlier_run, "--weights", str(files[0])))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "evil.pth: cannot read weights" in r.stderr, r.stderr
    assert not marker.exists()
    assert snapshot(earlier_run) == before
