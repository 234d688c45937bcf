"""Every setting is documented in --help, and --config / flags combine as documented."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import make_class_folders

from visiontune.cli import build_parser, main
from visiontune.config import ClassifyConfig, DetectConfig


@pytest.mark.parametrize("cls", [ClassifyConfig, DetectConfig])
def test_every_setting_has_help(cls):
    undocumented = [f.name for f in dataclasses.fields(cls) if len(f.metadata.get("help", "")) < 10]
    assert not undocumented


@pytest.mark.parametrize("task", ["classify", "detect"])
def test_help_lists_every_flag(task, capsys):
    cls = ClassifyConfig if task == "classify" else DetectConfig
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([task, "train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in text


def test_flags_override_the_config_file(tmp_path):
    from visiontune.cli import _config_from

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: images\nepochs: 7\nstrategy: full\n")
    args = build_parser().parse_args(["classify", "train", "--config", str(cfg_file), "--epochs", "3", "--out", "r"])
    cfg = _config_from(args, ClassifyConfig)
    assert (cfg.data, cfg.epochs, cfg.strategy, cfg.out) == ("images", 3, "full", "r")


def test_resume_takes_the_run_itself(tmp_path, capsys):
    """`--resume RUN` is `--out RUN --resume`: it continues RUN (here: finished, so nothing changes); two runs named
    differently are refused in one line."""
    data = make_class_folders(tmp_path / "data")
    run = tmp_path / "run"
    tiny = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--strategy", "full", "--epochs", "1"]
    assert main(["classify", "train", "--data", str(data), "--out", str(run), "--quiet", *tiny]) == 0
    before = (run / "model.safetensors").read_bytes()
    assert main(["classify", "train", "--resume", str(run)]) == 0
    assert (run / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main(["classify", "train", "--resume", str(run), "--out", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.strip() == f"visiontune: error: --resume {run}: and --out {tmp_path / 'other'}: name one run to continue"


def test_a_mistyped_flag_is_named_once_with_the_closest_flag(capsys):
    assert main(["classify", "train", "--data", "x", "--cache-imgaes", "disk"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["visiontune: error: unrecognized arguments: --cache-imgaes disk (did you mean --cache-images?)"], err
