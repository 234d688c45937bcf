"""classify compare: every strategy under the same epoch budget; the table (CSV/JSON/markdown, on screen) and the plot."""

from __future__ import annotations

import csv
import json

from conftest import make_class_folders
from PIL import Image

from visiontune.cli import main


def test_compare_runs_every_strategy_under_one_budget(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=3)
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "classify",
                "compare",
                "--data",
                str(data),
                "--out",
                str(out),
                "--image-size",
                "64",
                "--epochs",
                "1",
                "--views",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["strategy"] for r in rows] == ["linear", "partial", "full", "staged"]
    assert all(r["epochs"] == "1" for r in rows)  # the same budget for each
    params = {r["strategy"]: int(r["trainable_params"]) for r in rows}
    total = int(rows[0]["total_params"])
    assert params["linear"] == 1280 * 2 + 2 < params["partial"] < params["full"] == total
    assert all(0.0 <= float(r["best_val_accuracy"]) <= 1.0 and float(r["train_seconds"]) > 0 for r in rows)
    assert float(next(r for r in rows if r["strategy"] == "linear")["best_val_accuracy"]) >= 0.75  # red vs blue
    assert json.loads((out / "compare.json").read_text())["rows"][2]["strategy"] == "full"
    assert "| linear |" in printed and "| staged |" in printed and "trainable params" in printed  # the table on screen
    assert "| partial |" in (out / "compare.md").read_text()
    with Image.open(out / "compare.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    for s in ("linear", "partial", "full", "staged"):
        assert (out / s / "report.html").is_file() and (out / s / "model.safetensors").is_file()


def test_compare_refuses_bad_data_before_writing(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["classify", "compare", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err and not out.exists()
