"""Detection --tta flip: the mirrored image's detections mapped back and merged with the image's own."""

from __future__ import annotations

import json

import pytest
import torch
from detection_helpers import make_pennfudan

from visiontune.cli import main
from visiontune.config import DetectConfig
from visiontune.inference.detect_tta import FlipTTA, merge, unflip
from visiontune.tasks.detect import fit


def detections(boxes, scores, labels, width=100, height=50):
    boxes = torch.tensor(boxes, dtype=torch.float).reshape(-1, 4)
    masks = torch.zeros(len(boxes), 1, height, width)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, 0, y1:y2, x1:x2] = 1.0
    return {
        "boxes": boxes,
        "scores": torch.tensor(scores, dtype=torch.float),
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": masks,
    }


def test_unflip_moves_boxes_and_masks_back_to_the_original_image():
    d = detections([[10, 5, 30, 20]], [0.9], [1])
    back = unflip(d, 100)
    assert back["boxes"].tolist() == [[70.0, 5.0, 90.0, 20.0]]
    assert back["masks"][0, 0, 10, 75] == 1 and back["masks"][0, 0, 10, 15] == 0


def test_merge_fuses_what_both_views_found_and_halves_what_one_view_found():
    a = detections([[10, 10, 30, 30], [60, 10, 80, 30]], [0.9, 0.8], [1, 1])
    b = detections([[12, 10, 32, 30], [62, 10, 82, 30]], [0.7, 0.6], [1, 2])  # the second: another class
    out = merge(a, b)
    assert out["scores"].tolist() == pytest.approx([0.8, 0.4, 0.3])  # fused (0.9+0.7)/2; a's second alone; b's second alone
    fused = (torch.tensor([10.0, 10, 30, 30]) * 0.9 + torch.tensor([12.0, 10, 32, 30]) * 0.7) / 1.6
    assert torch.allclose(out["boxes"][0], fused) and out["labels"].tolist() == [1, 1, 2]
    assert out["masks"][0, 0, 20, 11].item() == 0.5 and out["masks"][0, 0, 20, 20].item() == 1.0  # the two masks, averaged
    assert merge(a, detections([], [], []))["scores"].tolist() == pytest.approx([0.45, 0.4])


def test_a_mirror_symmetric_scene_gives_the_same_detection_with_the_same_score():
    def model(images):  # finds the bright square of each image
        outs = []
        for im in images:
            ys, xs = (im[0] > 0.5).nonzero(as_tuple=True)
            box = [[xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]]
            outs.append(detections(box, [0.9], [1], im.shape[-1], im.shape[-2]))
        return outs

    image = torch.zeros(3, 50, 100)
    image[:, 10:30, 40:60] = 1.0  # centred: its mirror is itself
    out = FlipTTA(model)([image])[0]
    assert out["boxes"].tolist() == [[40.0, 10.0, 60.0, 30.0]] and out["scores"].tolist() == pytest.approx([0.9])


def test_detect_eval_and_predict_take_tta_flip(tmp_path, capsys):
    data = make_pennfudan(tmp_path / "pf", n=4)
    run = tmp_path / "run"
    fit(DetectConfig(data=str(data), out=str(run), epochs=1, val_last=2, min_size=64, max_size=64, quiet=True, backbone_weights="none"))
    capsys.readouterr()
    assert main(["detect", "eval", str(run), "--data", str(data), "--tta", "flip"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["tta"] == "flip" and 0.0 <= m["segm_AP"] <= 1.0
    image = str(data / "PNGImages" / "img00.png")
    assert main(["detect", "predict", str(run), image, "--tta", "flip", "--score-threshold", "0", "--output", str(tmp_path / "p")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tta"] == "flip"
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert all(r["score"] <= 1.0 for r in results) and (tmp_path / "p" / "00001_img00.png").is_file()
