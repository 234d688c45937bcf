"""Detection runs end to end: train -> metrics.json, model file, pictures -> eval and predict from the run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from detection_helpers import make_coco, make_pennfudan
from PIL import Image

from visiontune.checkpoint import load_model_file
from visiontune.cli import main
from visiontune.config import DetectConfig
from visiontune.data.instance import load_pennfudan
from visiontune.inference.detect import evaluate_run, predict_run
from visiontune.inference.load import load_detector
from visiontune.metrics.coco import evaluate_model
from visiontune.tasks.detect import fit

TINY = dict(min_size=64, max_size=64, quiet=True, backbone_weights="none", seed=0)
KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")


def test_pennfudan_run_writes_metrics_model_and_pictures(tmp_path):
    data = make_pennfudan(tmp_path / "pf", n=5)
    m = fit(DetectConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, val_last=2, **TINY))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert all(0.0 <= saved[k] <= 1.0 for k in KEYS) and saved["epochs"] == 2 and saved["model"] == "maskrcnn"
    assert saved == m and saved["train_seconds"] > 0 and set(saved["per_class"]) == {"object"}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and all("segm_AP50" in e for e in log)
    assert Image.open(run / "predictions.png").size[0] > 300
    _, meta = load_model_file(run / "model.safetensors")
    assert meta["classes"] == ["object"] and meta["model"] == "maskrcnn" and meta["min_size"] == 64 and meta["max_size"] == 64
    assert (run / "last.safetensors").is_file()

    again = evaluate_run(run, str(data))  # all 5 images, the run's format
    assert again["images"] == 5 and set(KEYS) <= set(again)
    pred = predict_run(
        run,
        [str(data / "PNGImages" / "img00.png"), str(data / "PNGImages" / "img01.png")],
        score_threshold=0.0,
        output=str(tmp_path / "pred"),
        quiet=True,
    )
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert pred["images"] == 2 and len(list((tmp_path / "pred").glob("*.png"))) == 2
    assert results and {"file_name", "bbox", "score", "segmentation", "category"} <= set(results[0])
    # a threshold inside the model (fewer masks pasted) gives exactly the detections above it
    scores = sorted({r["score"] for r in results})
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    predict_run(
        run,
        [str(data / "PNGImages" / "img00.png"), str(data / "PNGImages" / "img01.png")],
        score_threshold=threshold,
        output=str(tmp_path / "above"),
        quiet=True,
    )
    above = json.loads((tmp_path / "above" / "predictions.json").read_text())
    assert 0 < len(above) < len(results) and above == [r for r in results if r["score"] >= threshold]


def test_resume_continues_where_it_stopped(tmp_path):
    data = make_pennfudan(tmp_path / "pf", n=3)
    cfg = DetectConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, val_last=1, **TINY)
    fit(cfg)
    cfg_yaml = tmp_path / "run" / "config.yaml"
    cfg_yaml.write_text(cfg_yaml.read_text().replace("epochs: 1", "epochs: 2"))
    m = fit(DetectConfig(out=str(tmp_path / "run"), quiet=True), resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and m["epochs"] == 2


@pytest.mark.parametrize("masks", ["polygon", "none"])
def test_coco_run_keeps_category_names_and_ids(tmp_path, capsys, masks):
    images, ann = make_coco(tmp_path / "c", n=6, masks=masks, category_ids=(7, 3))
    out = tmp_path / "run"
    code = main(
        [
            "detect",
            "train",
            "--format",
            "coco",
            "--data",
            str(images),
            "--annotations",
            str(ann),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--val-split",
            "0.34",
            "--min-size",
            "64",
            "--max-size",
            "64",
            "--backbone-weights",
            "none",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["per_class"]) == {"left", "right"}
    assert ("segm_AP" in saved) == (masks != "none")
    assert saved["model"] == ("maskrcnn" if masks != "none" else "fasterrcnn")
    _, meta = load_model_file(out / "model.safetensors")
    assert meta["category_ids"] == [3, 7] and meta["classes"] == ["right", "left"]
    capsys.readouterr()
    assert main(["detect", "eval", str(out), "--data", str(images), "--annotations", str(ann)]) == 0
    assert "bbox_AP50" in json.loads(capsys.readouterr().out)
    pred = predict_run(out, [str(images / "im0.png")], score_threshold=0.0, output=str(tmp_path / "p"), quiet=True)
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert pred["images"] == 1 and {r["category_id"] for r in results} <= {3, 7}  # the user's own ids come back


def test_pennfudan_short_epoch_loss_falls_and_coco_eval_runs_on_real_masks(pennfudan, tmp_path):
    """CI: a few real Penn-Fudan images at low resolution, one short epoch with the embedded backbone."""
    data = tmp_path / "pf"
    names = sorted(p.stem for p in (pennfudan / "PNGImages").glob("*.png"))[:8]
    for sub, suffix in (("PNGImages", ""), ("PedMasks", "_mask")):
        (data / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(pennfudan / sub / f"{n}{suffix}.png", data / sub / f"{n}{suffix}.png")
    m = fit(
        DetectConfig(
            data=str(data), out=str(tmp_path / "run"), epochs=1, val_last=2, min_size=128, max_size=160, lr=0.01, quiet=True, seed=0
        )
    )
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert log["last_step_loss"] < log["first_step_loss"]  # 3 steps, warm-up included
    assert m["val_images"] == 2 and (tmp_path / "run" / "report.html").is_file()
    # after 3 steps few boxes pass the default score threshold: evaluate every proposal against the real masks
    model, _ = load_detector(tmp_path / "run")
    model.roi_heads.score_thresh = 0.0
    val = load_pennfudan(data).records[-2:]
    metrics, outputs = evaluate_model(model, val, ["object"], True, torch.device("cpu"))
    assert sum(len(o["masks"]) for o in outputs) > 0
    assert 0.0 <= metrics["segm_AP50"] <= 1.0 and metrics["per_class"]["object"]["segm_AP"] is not None


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_sets_the_training_forward_and_evaluation_stays_fp32(tmp_path, monkeypatch, precision, dtype):
    import visiontune.tasks.detect as D

    seen = []
    real = D.build_detector

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        model.roi_heads.box_head.register_forward_hook(lambda m, _i, out: seen.append((m.training, out.dtype)))
        return model

    monkeypatch.setattr(D, "build_detector", spy)
    data = make_pennfudan(tmp_path / "pf", n=4)
    fit(DetectConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, val_last=1, precision=precision, **TINY))
    assert {d for training, d in seen if training} == {dtype}
    assert {d for training, d in seen if not training} == {torch.float32}


def test_a_boxes_only_model_reports_no_segm_metrics_on_data_with_masks(tmp_path):
    """pycocotools would score Faster R-CNN's boxes as box-shaped masks: a model without masks has no segm AP."""
    data = make_pennfudan(tmp_path / "pf", n=4)
    m = fit(DetectConfig(data=str(data), out=str(tmp_path / "run"), model="fasterrcnn", epochs=1, val_last=2, **TINY))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert m["task"] == "detection" and "bbox_AP" in m and "bbox_AP" in log[0]
    assert not [k for k in (*m, *log[0], *m["per_class"]["object"]) if k.startswith("segm")]
    _, meta = load_model_file(tmp_path / "run" / "model.safetensors")
    assert meta["masks"] is False
    assert not [k for k in evaluate_run(tmp_path / "run", str(data)) if k.startswith("segm")]
