"""visiontune export --int8: a calibrated INT8 ONNX file that predicts as the fp32 model does, measured before it is kept
(classifiers and detectors); visiontune benchmark times it and the run's engines."""

from __future__ import annotations

import json

from conftest import make_class_folders
from detection_helpers import make_pennfudan

from visiontune.cli import main


def test_int8_export_agrees_with_fp32_and_predicts_like_an_fp32_file(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    tiny = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--epochs", "4", "--quiet"]
    assert main(["classify", "train", "--data", str(data), "--out", str(run), *tiny]) == 0
    out = tmp_path / "model.int8.onnx"
    assert main(["export", str(run), "--output", str(out), "--int8", "--calibration-images", "16", "--force"]) == 0
    report = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert report["top1_agreement"] >= 0.9 and report["int8_bytes"] < report["fp32_bytes"] and report["calibration_images"] == 16
    assert _conv_weights_in_fp32(out) == ["stem"]
    top1 = {}
    for model in (run, out):  # the run's fp32 model, then the INT8 file, on the training images
        capsys.readouterr()
        assert main(["classify", "predict", str(model), str(data / "train")]) == 0
        top1[model] = [json.loads(line)["predictions"][0]["label"] for line in capsys.readouterr().out.splitlines()]
    assert len(top1[run]) == 16 and sum(a == b for a, b in zip(top1[run], top1[out])) >= 15
    for model, engines in ((run, {"torch fp32", "onnxruntime fp32", "openvino fp32"}), (out, {"onnxruntime (file)", "openvino (file)"})):
        capsys.readouterr()
        assert main(["benchmark", str(model), "--calls", "10"]) == 0
        timed = json.loads(capsys.readouterr().out)["engines"]
        assert set(timed) == engines
        assert all(0 < t["p50_ms"] <= t["p90_ms"] and t["batch32_images_per_second"] > 0 for t in timed.values())


def test_int8_past_its_max_drop_writes_nothing(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    tiny = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--epochs", "2", "--quiet"]
    assert main(["classify", "train", "--data", str(data), "--out", str(run), *tiny]) == 0
    capsys.readouterr()
    out = tmp_path / "model.int8.onnx"
    assert main(["export", str(run), "--output", str(out), "--int8", "--calibration-images", "8", "--max-drop", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("visiontune: error: INT8 loses") and "nothing written" in err[-1], err
    assert not out.exists() and not (tmp_path / "model.int8.onnx.json").exists()


def test_int8_detector_is_measured_in_ap_and_runs_in_predict_and_benchmark(tmp_path, capsys):
    data = make_pennfudan(tmp_path / "pf", n=8)
    run = tmp_path / "run"
    tiny = ["--epochs", "2", "--min-size", "64", "--max-size", "64", "--quiet"]
    assert main(["detect", "train", "--data", str(data), "--out", str(run), *tiny]) == 0
    out = tmp_path / "detector.int8.onnx"
    assert main(["export", str(run), "--output", str(out), "--int8", "--calibration-images", "4", "--force"]) == 0
    report = json.loads((tmp_path / "detector.int8.onnx.json").read_text())
    assert report["calibration_images"] == 4 and report["val_images"] == 2
    assert {"fp32_bbox_AP", "int8_bbox_AP", "fp32_segm_AP", "int8_segm_AP"} <= set(report)
    assert report["int8_bytes"] < 0.4 * report["fp32_bytes"]
    assert _conv_weights_in_fp32(out) == ["stem", "1"]  # the backbone's stem and its first depthwise convolution
    assert main(["detect", "predict", str(out), str(data / "PNGImages"), "--output", str(tmp_path / "predict")]) == 0
    assert len(list((tmp_path / "predict").glob("*.png"))) == 8 and (tmp_path / "predict" / "predictions.json").is_file()
    photo = data / "PNGImages" / "img01.png"
    for model, engines in ((run, {"torch fp32", "onnxruntime fp32"}), (out, {"onnxruntime (file)"})):
        capsys.readouterr()
        assert main(["benchmark", str(model), "--calls", "3", "--image", str(photo)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["image"] == str(photo) and set(report["engines"]) == engines
        assert all(0 < t["p50_ms"] <= t["p90_ms"] and t["detections"] >= 0 for t in report["engines"].values())


def _conv_weights_in_fp32(path) -> list[str]:
    """Which convolutions of an ONNX file read float weights directly ('stem' for the first, else its index)."""
    import onnx

    graph = onnx.load(str(path)).graph
    produced_by_dequantize = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return ["stem" if i == 0 else str(i) for i, n in enumerate(convs) if n.input[1] not in produced_by_dequantize]
