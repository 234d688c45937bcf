"""Every setting is documented in --help, and --config / flags combine as documented."""

from __future__ import annotations

import dataclasses

import pytest

from visiontune.cli import build_parser
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
