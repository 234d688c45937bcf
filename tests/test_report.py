"""RUN/report.html: self-contained, and it renders in headless Chromium (curves, gallery, every image decoded)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders, make_image
from PIL import Image

from visiontune.cli import main
from visiontune.report import write_report
from visiontune.visualize import gallery_order, write_val_predictions

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Injected into a copy of the report: after load, write what rendered into the DOM that --dump-dom prints.
PROBE = """<script>window.addEventListener('load', () => { const im = [...document.images];
document.body.setAttribute('data-probe', JSON.stringify({images: im.length,
  decoded: im.filter(i => i.complete && i.naturalWidth > 0).length,
  curves: document.querySelectorAll('img.curves').length,
  gallery: document.querySelectorAll('.gallery:not(.suspects) figure img').length})); });</script>"""


def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {CHROMIUM} is missing (make test installs the Debian package chromium)")
        pytest.skip(f"{CHROMIUM} not installed (make test installs it)")
    return CHROMIUM


def render(report: Path, tmp: Path) -> tuple[dict, np.ndarray]:
    """Open the report in headless Chromium: what the probe saw, and a screenshot as an RGB array."""
    page = tmp / "page.html"
    page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    common = [chromium(), *FLAGS, "--window-size=1280,2400", "--virtual-time-budget=10000"]
    dom = subprocess.run(
        [*common, f"--user-data-dir={tmp / 'profile-dom'}", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60
    ).stdout
    shot = tmp / "shot.png"
    subprocess.run(
        [*common, f"--user-data-dir={tmp / 'profile-shot'}", f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=60
    )
    probe = re.search(r'data-probe="([^"]*)"', dom)
    assert probe, f"the page did not load (no probe result in the DOM): {dom[:300]}"
    return json.loads(probe.group(1).replace("&quot;", '"')), np.asarray(Image.open(shot).convert("RGB"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    data = make_class_folders(tmp_path_factory.mktemp("data"), classes=("red", "blue", "green"), per_class=5)
    out = tmp_path_factory.mktemp("runs") / "run"
    assert (
        main(
            [
                "classify",
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--image-size",
                "64",
                "--quiet",
                "--strategy",
                "linear",
                "--epochs",
                "3",
                "--views",
                "2",
            ]
        )
        == 0
    )
    return out


def test_training_writes_a_self_contained_report(run_dir):
    page = (run_dir / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # every image embedded
    assert not re.search(r"<link|<script|https?://", page)  # nothing fetched from elsewhere
    for text in ("Training curves", "Confusion matrix", "Validation predictions", "strategy: linear", "precision"):
        assert text in page
    preds = json.loads((run_dir / "val_predictions.json").read_text())
    assert len(preds["items"]) == 15 and {it["true"] for it in preds["items"]} == {"red", "blue", "green"}
    assert all(Path(it["path"]).is_file() for it in preds["items"])


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    probe, shot = render(run_dir / "report.html", tmp_path)
    assert probe["curves"] == 1
    assert probe["gallery"] == 15  # every validation image of the run
    assert probe["images"] >= 17 and probe["decoded"] == probe["images"]  # curves, confusion matrix, gallery: all decoded
    gray = shot.mean(axis=2)
    assert (gray < 200).mean() > 0.02 and gray.std() > 20  # not a blank page
    r, g, b = (shot[..., i].astype(int) for i in range(3))
    assert ((r - g > 100) & (r - b > 100)).sum() > 500  # the red validation images are on screen
    assert ((b - r > 100) & (b - g > 100)).sum() > 500  # and the blue ones


def test_the_browser_check_catches_a_broken_image(run_dir, tmp_path):
    broken = tmp_path / "report.html"
    page = (run_dir / "report.html").read_text()
    broken.write_text(re.sub(r'src="data:image/jpeg;base64,[^"]*"', 'src="data:image/jpeg;base64,bm90IGFuIGltYWdl"', page, count=1))
    probe, _ = render(broken, tmp_path)
    assert probe["decoded"] == probe["images"] - 1


def test_report_embeds_the_runs_confusion_matrix_unless_metrics_are_newer(run_dir, tmp_path):
    import base64
    import shutil

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    drawn = base64.b64encode((run / "confusion_matrix.png").read_bytes()).decode("ascii")
    assert drawn in write_report(run).read_text()  # the picture training drew, not a second drawing
    (run / "confusion_matrix.png").write_bytes(b"stale")
    os.utime(run / "confusion_matrix.png", ns=(1, 1))  # older than metrics.json: drawn again from its numbers
    page = write_report(run).read_text()
    assert base64.b64encode(b"stale").decode() not in page and 'class="confusion"' in page


def test_gallery_shows_mistakes_first(tmp_path):
    classes = ["a", "b"]
    labels = torch.tensor([0, 0, 1, 1, 0])
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [2.5, 0.0], [0.5, 0.0]])  # 1 and 3 are wrong
    images = [torch.full((3, 20, 24), 30 * i, dtype=torch.uint8) for i in range(5)]
    write_val_predictions(tmp_path / "val_predictions.json", images.__getitem__, logits, labels, classes)
    items = json.loads((tmp_path / "val_predictions.json").read_text())["items"]
    assert [it["index"] for it in items] == [3, 1, 4, 2, 0]  # confident mistakes first, then the least sure correct
    assert [it["correct"] for it in items] == [False, False, True, True, True]
    assert gallery_order([0, 1], [1, 1], [0.9, 0.9]) == [0, 1]


def test_detection_report_from_run_files(tmp_path):
    run = tmp_path / "det"
    run.mkdir()
    (run / "config.yaml").write_text("model: maskrcnn\nepochs: 2\n")
    # what tasks/detect.py writes: flat COCO numbers and per-class AP in metrics.json, predictions.png
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "task": "detection",
                "bbox_AP": 0.612,
                "bbox_AP50": 0.923,
                "segm_AP": 0.571,
                "segm_AP50": 0.884,
                "train_seconds": 12.5,
                "per_class": {"person": {"bbox_AP": 0.612, "bbox_AP50": 0.923, "segm_AP": 0.571, "segm_AP50": None}},
            }
        )
    )
    (run / "log.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "train_loss": 2.0 / e, "bbox_AP": 0.3 * e, "val_images": 50}) + "\n" for e in (1, 2))
    )
    make_image(run / "predictions.png", (200, 60, 60), size=(120, 80))
    page = write_report(run).read_text()
    for text in ("Average precision", "0.6120", "0.8840", "segm", "person", "predictions.png", "Training curves"):
        assert text in page
    probe, shot = render(run / "report.html", tmp_path)
    assert probe["curves"] == 1 and probe["gallery"] == 1 and probe["decoded"] == probe["images"] == 2
    assert shot.mean(axis=2).std() > 10


def test_report_of_an_unfinished_run_says_so(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    page = write_report(run).read_text()
    assert "did not finish" in page and "No log.jsonl entries" in page


def test_tensorboard_without_the_package_is_a_one_line_error(tiny_folders, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        out = tmp_path / "run"
        assert main(["classify", "train", "--data", str(tiny_folders), "--out", str(out), "--tensorboard", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "pip install tensorboard" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    else:
        out = tmp_path / "run"
        assert (
            main(
                [
                    "classify",
                    "train",
                    "--data",
                    str(tiny_folders),
                    "--out",
                    str(out),
                    "--tensorboard",
                    "--quiet",
                    "--image-size",
                    "64",
                    "--epochs",
                    "2",
                ]
            )
            == 0
        )
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
