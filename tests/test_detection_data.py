"""Instance data: Penn-Fudan and COCO read into the same records; every bad input is one line naming the file, exit 2."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from detection_helpers import make_coco, make_pennfudan, rectangles
from PIL import Image

from visiontune.cli import main
from visiontune.data.coco import load_coco, to_coco_api
from visiontune.data.instance import DetectionDataset, load_pennfudan


def test_pennfudan_boxes_come_from_masks(tmp_path):
    data = load_pennfudan(make_pennfudan(tmp_path / "pf", n=3))
    assert data.classes == ["object"] and data.has_masks
    r = data.records[1]
    assert r.read_masks().shape == (2, 64, 64) and r.labels.tolist() == [1, 1]
    expected = [[x1, y1, x2 - 1, y2 - 1] for x1, y1, x2, y2 in rectangles(1)]  # masks_to_boxes: inclusive max
    assert r.boxes.tolist() == expected


def test_an_image_with_no_objects_is_background(tmp_path):
    root = make_pennfudan(tmp_path / "pf", n=2)
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(root / "PedMasks" / "img00_mask.png")
    r = load_pennfudan(root).records[0]
    assert r.boxes.shape == (0, 4) and r.read_masks().shape == (0, 64, 64)
    image, target = DetectionDataset([r], train=True)[0]
    assert image.dtype == torch.float32 and target["boxes"].shape == (0, 4)


def test_flip_moves_boxes_and_masks(tmp_path):
    r = load_pennfudan(make_pennfudan(tmp_path / "pf", n=1)).records[0]
    ds = DetectionDataset([r], train=True)
    flipped = None
    for seed in range(20):
        torch.manual_seed(seed)
        _, t = ds[0]
        if not torch.equal(t["boxes"], r.boxes):
            flipped = t
            break
    assert flipped is not None
    x1, y1, x2, y2 = r.boxes[0].tolist()
    assert flipped["boxes"][0].tolist() == [64 - x2, y1, 64 - x1, y2]
    assert torch.equal(flipped["masks"][0], r.read_masks()[0].flip(-1))


@pytest.mark.parametrize("masks", ["polygon", "rle", "none"])
def test_coco_formats_and_category_remap(tmp_path, masks):
    root, ann = make_coco(tmp_path / "c", n=3, masks=masks, category_ids=(7, 3))
    data = load_coco(root, ann)
    assert data.classes == ["right", "left"] and data.category_ids == [3, 7]  # ids sorted, names kept
    assert data.has_masks == (masks != "none")
    r = data.records[1]  # two rectangles: left (id 7 -> label 2), right (id 3 -> label 1)
    assert r.labels.tolist() == [2, 1]
    if masks != "none":
        x1, y1, x2, y2 = rectangles(1)[0]
        assert int(r.read_masks()[0].sum()) >= (x2 - x1) * (y2 - y1) * 0.9
    gt = to_coco_api(data.records, data.classes)
    assert len(gt.getAnnIds()) == sum(len(rect) for rect in map(rectangles, range(3)))


def test_coco_images_in_tar_shards_are_the_images_of_the_folder(tmp_path, capsys):
    """--data SHARDS with --annotations: the records of the folder (members found by file_name, "./" or not, read at
    their offsets, in DataLoader workers too); a detector trains on them; a file_name in no shard is named."""
    root, ann = make_coco(tmp_path / "c", n=6, masks="rle")
    for s, (prefix, names) in enumerate([("./", ["im0", "im1", "im2"]), ("", ["im3", "im4", "im5"])]):
        with tarfile.open(tmp_path / f"images-{s}.tar", "w") as tar:
            for name in names:
                tar.add(root / f"{name}.png", arcname=f"{prefix}{name}.png")
    pattern = str(tmp_path / "images-{0..1}.tar")
    folder, shards = load_coco(root, ann), load_coco(pattern, ann)
    assert "images-0.tar/im1.png" in shards.records[1].path and "images-1.tar/im4.png" in shards.records[4].path
    for a, b in zip(folder.records, shards.records, strict=True):
        assert torch.equal(a.read_image(), b.read_image()) and torch.equal(a.read_masks(), b.read_masks())
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels) and a.size == b.size
    out = tmp_path / "run"
    tiny = ["--min-size", "64", "--max-size", "64", "--backbone-weights", "none", "--quiet", "--workers", "2"]
    args = ["detect", "train", "--format", "coco", "--data", pattern, "--annotations", str(ann), "--epochs", "1", "--val-split", "0.34"]
    assert main([*args, "--out", str(out), *tiny]) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["segm_AP"] >= 0

    doc = json.loads(ann.read_text())
    doc["images"][2]["file_name"] = "elsewhere/im2.png"
    ann.write_text(json.dumps(doc))
    assert main([*args, "--out", str(tmp_path / "run2"), *tiny]) == 2
    assert "file_name 'elsewhere/im2.png' is not a member of the shards" in capsys.readouterr().err


def test_degenerate_boxes_are_dropped_and_counted(tmp_path, caplog):
    root, ann = make_coco(tmp_path / "c", n=2, masks="none")
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["bbox"] = [5, 5, 0, 10]
    ann.write_text(json.dumps(doc))
    data = load_coco(root, ann)
    assert data.dropped_boxes == 1 and "dropped 1 degenerate" in caplog.text


# ------------------------------------------------------------------------------------------- bad input, via the CLI


def _train(capsys, tmp_path, *args):
    out = tmp_path / "run"
    code = main(["detect", "train", "--out", str(out), "--epochs", "1", "--min-size", "64", "--max-size", "64", "--quiet", *args])
    err = capsys.readouterr().err
    return code, err, out


def _bad_pennfudan(tmp_path, case):
    root = make_pennfudan(tmp_path / "pf", n=3)
    if case == "missing_image":
        (root / "PNGImages" / "img01.png").unlink()
        return root, "img01_mask.png"
    if case == "size_mismatch":
        Image.fromarray(np.zeros((50, 64), np.uint8), "L").save(root / "PedMasks" / "img02_mask.png")
        return root, "img02_mask.png"
    if case == "palette":
        Image.open(root / "PedMasks" / "img01_mask.png").convert("P").save(root / "PedMasks" / "img01_mask.png")
        return root, "img01_mask.png"
    if case == "16bit":
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(root / "PedMasks" / "img00_mask.png")
        return root, "img00_mask.png"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_image", "size_mismatch", "palette", "16bit"])
def test_bad_pennfudan_input(tmp_path, capsys, case):
    root, named = _bad_pennfudan(tmp_path, case)
    code, err, out = _train(capsys, tmp_path, "--data", str(root))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("visiontune: error:") and named in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the inputs are known good


def _bad_coco(tmp_path, case):
    root, ann = make_coco(tmp_path / "c", n=3)
    doc = json.loads(ann.read_text())
    named = str(ann.name)
    if case == "not_json":
        ann.write_text("{ not json")
    elif case == "missing_key":
        del doc["categories"]
    elif case == "annotation_key":
        del doc["annotations"][1]["bbox"]
    elif case == "escape":
        (tmp_path / "outside.png").write_bytes((root / "im0.png").read_bytes())
        doc["images"][0]["file_name"] = "../../outside.png"
        named = "escapes the image root"
    elif case == "missing_image":
        (root / "im2.png").unlink()
        named = "im2.png"
    elif case == "size_mismatch":
        doc["images"][1]["width"] = 80
        named = "im1.png"
    if case not in ("not_json",):
        ann.write_text(json.dumps(doc))
    return root, ann, named


@pytest.mark.parametrize("case", ["not_json", "missing_key", "annotation_key", "escape", "missing_image", "size_mismatch"])
def test_bad_coco_input(tmp_path, capsys, case):
    root, ann, named = _bad_coco(tmp_path, case)
    code, err, out = _train(capsys, tmp_path, "--format", "coco", "--data", str(root), "--annotations", str(ann))
    assert code == 2
    assert err.count("\n") == 1 and named in err and "Traceback" not in err
    assert not out.exists()


def test_an_earlier_run_is_not_lost(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier")
    root = make_pennfudan(tmp_path / "pf", n=3)
    shutil.rmtree(root / "PedMasks")
    code, err, _ = _train(capsys, tmp_path, "--data", str(root), "--overwrite")
    assert code == 2 and "PedMasks" in err
    assert (out / "model.safetensors").read_bytes() == b"earlier"


@pytest.mark.parametrize("fmt", ["pennfudan", "polygon", "rle"])
def test_records_hold_no_pixels_until_a_batch_reads_them(tmp_path, fmt):
    """Loading keeps boxes, labels and sizes; images and masks come from their files (or the JSON's polygons/RLE)
    when read, the same every time: memory does not grow with the number of images."""
    if fmt == "pennfudan":
        data = load_pennfudan(make_pennfudan(tmp_path / "pf", n=3))
    else:
        data = load_coco(*make_coco(tmp_path / "c", n=3, masks=fmt, category_ids=(7, 3)))
    for r in data.records:
        assert r.image is None and not isinstance(r.masks, torch.Tensor)
        image, masks = r.read_image(), r.read_masks()
        assert image.dtype == torch.uint8 and tuple(image.shape[-2:]) == r.size == tuple(masks.shape[-2:])
        assert len(masks) == len(r.boxes) and torch.equal(masks, r.read_masks()) and torch.equal(image, r.read_image())
