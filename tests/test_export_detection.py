"""Detection export: ONNX Runtime gives PyTorch's boxes, labels, scores and masks on real photos (Penn-Fudan where present,
else synthetic), at image sizes other than the traced one; class names travel along; ``detect predict`` runs the file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SHARED, shared_dataset
from detection_helpers import make_pennfudan
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torchvision.transforms.v2 import functional as TF

from visiontune import checkpoint as ckpt
from visiontune.cli import main
from visiontune.data.images import load_rgb
from visiontune.inference.detect import predict_run
from visiontune.inference.load import load_detector
from visiontune.metrics.coco import predict_records
from visiontune.models.detection import build_detector

# measured over 238 detections on 7 Penn-Fudan images: boxes <= 0.0005 px, scores <= 2.5e-5, mask IoU 1.0, mean |dp| 4e-8
BOX_TOL_PX = 0.05
SCORE_TOL = 1e-4
MASK_MIN_IOU = 0.99  # binary masks (probability > 0.5) of each matched detection
MASK_MEAN_ABS = 1e-3  # mean |p_onnx - p_torch| over each mask


@pytest.fixture(scope="module")
def run_dir(images, tmp_path_factory) -> Path:
    """A random-init Mask R-CNN on EfficientNet-Lite0 saved as a detection run. Its class logits are redrawn wider than
    torchvision's init (std 0.01: 100 detections per image, all scores near 0.5 in near-ties) and shifted so that on a
    real image about 20 proposals score above the 0.05 threshold: a few detections with distinct scores (the mask head
    costs ~0.5 GFLOP per detection)."""
    torch.manual_seed(0)
    model = build_detector("maskrcnn", 2, backbone="efficientnet_lite0", backbone_weights="none", min_size=128, max_size=192).eval()
    cls_score = model.roi_heads.box_predictor.cls_score
    torch.nn.init.normal_(cls_score.weight, std=0.2)
    features = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda _m, _i, out: features.append(out))
    with torch.no_grad():
        model([TF.pil_to_tensor(load_rgb(images[0])).float().div(255)])
        hook.remove()
        logits = cls_score(features[0])
        margin = (logits[:, 1] - logits[:, 0]).sort(descending=True).values
        cls_score.bias[1] -= margin[20] - math.log(0.05 / 0.95)
    out = tmp_path_factory.mktemp("runs") / "run"
    out.mkdir()
    ckpt.save_model(
        out / "model.safetensors",
        model,
        {
            "task": "detection",
            "model": "maskrcnn",
            "backbone": "efficientnet_lite0",
            "neck": "fpn",
            "classes": ["pedestrian"],
            "category_ids": [1],
            "masks": True,
            "data_format": "pennfudan",
            "min_size": 128,
            "max_size": 192,
            "pretrained": "none",
            "mask_quality_scores": True,  # as runs write them: the export traces the rescoring
            "box_voting": True,  # and the box voting
        },
    )
    return out


@pytest.fixture(scope="module")
def onnx_file(run_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "detector.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Four small photos as PNG files: two Penn-Fudan images scaled down, a portrait crop (another aspect ratio than
    the traced example) and a crop whose scale is not a round number; synthetic rectangles where ../shared is absent (Penn-Fudan is required under CI=true)."""
    if (SHARED / "PennFudanPed").is_dir() or os.environ.get("CI") == "true":
        source = sorted((shared_dataset("PennFudanPed") / "PNGImages").glob("*.png"))[:2]
    else:
        source = sorted((make_pennfudan(tmp_path_factory.mktemp("synthetic"), n=2) / "PNGImages").glob("*.png"))
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, p in enumerate(source):
        x = TF.resize(TF.pil_to_tensor(load_rgb(p)), 160, max_size=200)
        paths.append(folder / f"{i}_{p.stem}.png")
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(paths[-1])
    Image.fromarray(x[:, :, : x.shape[2] // 2].permute(1, 2, 0).numpy()).save(folder / "2_portrait.png")
    # 103 x 151 scales by 128/103: torchvision's traced resize computes that in float32 and makes the image 127 px high
    Image.fromarray(x[:, :103, :151].permute(1, 2, 0).numpy()).save(folder / "3_odd_size.png")
    return paths + [folder / "2_portrait.png", folder / "3_odd_size.png"]


def match(expected: dict, got: dict) -> list[tuple[int, int]]:
    """Pairs (pytorch index, onnx index) by nearest box: near-tied scores may list the same detections in another order."""
    cost = np.abs(expected["boxes"].numpy()[:, None] - got["boxes"].numpy()[None]).max(-1)
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows.tolist(), cols.tolist()))


def test_onnx_matches_pytorch_boxes_labels_scores_masks(run_dir, onnx_file, images):
    import onnxruntime as ort

    model, _ = load_detector(run_dir)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "labels", "scores", "masks"]
    compared = 0
    for path in images:
        x = TF.pil_to_tensor(load_rgb(path)).float().div(255)
        with torch.no_grad():
            expected = model([x])[0]
        got = {k: torch.from_numpy(v) for k, v in zip(names, session.run(names, {"image": x.numpy()}))}
        assert len(expected["boxes"]) > 0, "the test model should detect something"
        assert got["boxes"].shape == expected["boxes"].shape and got["masks"].shape == expected["masks"].shape == (
            len(got["boxes"]),
            1,
            *x.shape[1:],
        )
        for i, j in match(expected, got):
            assert (expected["boxes"][i] - got["boxes"][j]).abs().max() <= BOX_TOL_PX, path
            assert expected["labels"][i] == got["labels"][j]
            assert abs(expected["scores"][i] - got["scores"][j]) <= SCORE_TOL
            a, b = expected["masks"][i, 0], got["masks"][j, 0]
            union = ((a > 0.5) | (b > 0.5)).sum()
            assert union == 0 or ((a > 0.5) & (b > 0.5)).sum() / union >= MASK_MIN_IOU, path
            assert (a - b).abs().mean() <= MASK_MEAN_ABS
            compared += 1
    assert compared >= 3 * len(images)


def test_detections_of_an_image_do_not_depend_on_the_images_beside_it(run_dir, images):
    """eval and predict run one image per forward pass: in a batch, a larger image widens the padding of a smaller one,
    and that changed its detections (and AP) in PyTorch, while the exported graph runs one image per call."""
    model, _ = load_detector(run_dir)
    small, large = (TF.pil_to_tensor(load_rgb(p)) for p in (images[3], images[0]))
    alone = predict_records(model, [small], "cpu")[0]
    beside = predict_records(model, [small, large], "cpu")[0]
    assert len(alone["boxes"]) > 0 and all(torch.equal(alone[k], beside[k]) for k in alone)


def test_onnx_pools_rois_without_scatter(onnx_file):
    """The traced RoI pooler merges its FPN levels by a gather: torchvision's scatter into a zero tensor of every RoI
    took half of ONNX Runtime's time per Penn-Fudan image (633 against 270 ms, identical outputs)."""
    ops = {n.op_type for n in onnx.load(str(onnx_file)).graph.node}
    assert "RoiAlign" in ops and "ScatterElements" not in ops


def test_onnx_metadata_carries_classes_preprocessing_and_model(onnx_file):
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["classes"]) == ["pedestrian"]
    prep = json.loads(props["preprocessing"])
    assert (prep["min_size"], prep["max_size"]) == (128, 192) and prep["mean"] == [0.5] * 3 and prep["std"] == [0.5] * 3
    assert prep["outputs"] == ["boxes", "labels", "scores", "masks"] and "[0, 1]" in prep["steps"]
    record = json.loads(props["visiontune"])
    assert record["task"] == "detection" and record["model"] == "maskrcnn" and record["backbone"] == "efficientnet_lite0"
    assert record["category_ids"] == [1] and "weights_sha256" not in record


def test_detect_predict_runs_the_onnx_file_like_the_run(run_dir, onnx_file, images, tmp_path):
    # one image per batch, as the ONNX file runs: a batch pads its images to one size, which moves a random model's scores
    predict_run(run_dir, list(map(str, images)), score_threshold=0.3, output=str(tmp_path / "pt"))
    assert (
        main(["detect", "predict", str(onnx_file), *map(str, images), "--output", str(tmp_path / "ort"), "--score-threshold", "0.3"]) == 0
    )
    by_file = {}
    for name in ("pt", "ort"):
        for r in json.loads((tmp_path / name / "predictions.json").read_text()):
            by_file.setdefault((r["file_name"], name), []).append(r)
    assert by_file, "the test model should detect something above 0.3"
    for path in images:
        pt, ort_ = by_file.get((str(path), "pt"), []), by_file.get((str(path), "ort"), [])
        boxes = [{"boxes": torch.tensor([r["bbox"] for r in rs])} for rs in (pt, ort_)]
        assert len(pt) == len(ort_)
        if not pt:
            continue
        for i, j in match(*boxes):
            assert (pt[i]["category"], pt[i]["category_id"]) == (ort_[j]["category"], ort_[j]["category_id"]) == ("pedestrian", 1)
            assert np.abs(np.subtract(pt[i]["bbox"], ort_[j]["bbox"])).max() <= BOX_TOL_PX + 0.01  # bbox is rounded to 0.01
            assert "segmentation" in ort_[j]
    assert len(list((tmp_path / "ort").glob("*.png"))) == len(images)


def test_wrong_uses_are_one_line_errors(run_dir, onnx_file, images, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--format onnx" in err and not out.exists()
    assert main(["classify", "predict", str(onnx_file), str(images[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "detect predict" in err and str(onnx_file) in err
