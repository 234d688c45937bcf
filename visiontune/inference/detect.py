"""A trained detector at work: COCO metrics on labelled data, predictions (JSON and pictures) for images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torchvision.io import write_png

from ..data.formats import load_instances
from ..data.images import expand_inputs, load_rgb_tensor
from ..errors import UserError
from ..metrics.coco import coco_results, evaluate_model, predict_records
from ..visualize import draw_detections
from .detect_tta import FlipTTA
from .load import detector_for_predict, load_detector

DETECT_TTA = ("none", "flip")


def with_detect_tta(model, tta: str):
    """``model``, or with ``tta`` "flip" the image and its mirror, their detections merged (detect_tta.py)."""
    if tta not in DETECT_TTA:
        raise UserError(f"--tta: unknown {tta!r}; choose none or flip")
    return FlipTTA(model) if tta == "flip" else model


def evaluate_run(
    run: str | Path, data: str, fmt: str | None = None, annotations: str | None = None, device: str = "auto", tta: str = "none"
) -> dict:
    """COCO bbox (and segm) AP/AP50/AP75, overall and per class, of a trained run on ``data``; ``tta``: none or flip."""
    model, meta = load_detector(run, device)
    device = next(model.parameters()).device
    model = with_detect_tta(model, tta)
    fmt = fmt or meta.data_format
    instances = load_instances(fmt, data, annotations)
    classes = meta.classes
    if fmt == "pennfudan":
        instances.classes = classes
    unknown = sorted(set(instances.classes) - set(classes))
    if unknown:
        raise UserError(f"--data: classes the model does not know: {', '.join(unknown)} (it knows {', '.join(classes)})")
    remap = torch.tensor([0] + [classes.index(c) + 1 for c in instances.classes])
    for r in instances.records:
        r.labels = remap[r.labels]
    m, _ = evaluate_model(model, instances.records, classes, meta.masks and instances.has_masks, device)
    return {**m, "images": len(instances.records), "tta": tta}


def predict_run(
    run: str | Path,
    inputs: list[str],
    score_threshold: float = 0.5,
    output: str | None = None,
    quiet: bool = False,
    device: str = "auto",
    tta: str = "none",
) -> dict:
    """COCO-results JSON (RLE masks) and a rendered PNG per image in ``output`` (default RUN/predict).
    ``run``: a run directory, its model file, or an exported .onnx file (run by ONNX Runtime)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise UserError(f"--score-threshold: must be between 0 and 1, got {score_threshold}")
    model, on, meta = detector_for_predict(run, device)
    if hasattr(model, "roi_heads"):  # boxes under the threshold dropped inside the model: no masks pasted for them (~1.2x the images/s)
        model.roi_heads.score_thresh = max(model.roi_heads.score_thresh, score_threshold)
    model = with_detect_tta(model, tta)
    paths = expand_inputs(inputs)
    out_dir = Path(output) if output else (Path(run) if Path(run).is_dir() else Path(run).parent) / "predict"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output: cannot create {out_dir} ({e.strerror})") from None
    classes, results = meta.classes, []
    start = time.perf_counter()
    for image_id, p in enumerate(paths, start=1):
        image = load_rgb_tensor(p)
        o = predict_records(model, [image], on)[0]
        for r in coco_results([o], [image_id], meta.category_ids, score_threshold):
            results.append({"file_name": str(p), "category": classes[meta.category_ids.index(r["category_id"])], **r})
        write_png(draw_detections(image, o, classes, score_threshold), str(out_dir / f"{image_id:05d}_{p.stem}.png"))
    seconds = time.perf_counter() - start
    (out_dir / "predictions.json").write_text(json.dumps(results))
    summary = {
        "images": len(paths),
        "detections": len(results),
        "output": str(out_dir),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(paths) / seconds, 3) if seconds > 0 else None,
        "tta": tta,
    }
    if not quiet:
        print(json.dumps(summary), flush=True)
    return summary
