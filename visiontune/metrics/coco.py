"""COCO evaluation of detections: model outputs -> COCO results -> bbox (and segm) AP by pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..data.coco import to_coco_api
from ..data.instance import Record

METRIC_KEYS = ("AP", "AP50", "AP75")


def coco_results(outputs: list[dict], image_ids: list[int], category_ids: list[int] | None = None, min_score: float = 0.0) -> list[dict]:
    """Model outputs -> COCO results (xywh boxes; masks as RLE with string counts, thresholded at 0.5)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        keep = out["scores"] >= min_score
        boxes, scores, labels = out["boxes"][keep], out["scores"][keep], out["labels"][keep]
        rles = None
        if "masks" in out:
            binary = (out["masks"][keep][:, 0] > 0.5).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for j in range(len(boxes)):
            x1, y1, x2, y2 = boxes[j].tolist()
            label = int(labels[j])
            r = {
                "image_id": image_id,
                "category_id": category_ids[label - 1] if category_ids else label,
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(scores[j]), 5),
            }
            if rles is not None:
                r["segmentation"] = {"size": rles[j]["size"], "counts": rles[j]["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_metrics(records: list[Record], results: list[dict], classes: list[str], has_masks: bool) -> dict:
    """bbox (and, for a model with masks, segm) AP, AP50, AP75 overall and per class, by pycocotools' COCOeval."""
    from pycocotools.cocoeval import COCOeval

    metrics: dict = {}
    per_class = {c: {} for c in classes}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = to_coco_api(records, classes)
        for iou_type in ("bbox", "segm") if has_masks else ("bbox",):
            if not results:  # no detection above the model's score threshold
                metrics.update({f"{iou_type}_{k}": 0.0 for k in METRIC_KEYS})
                for name in classes:
                    per_class[name].update({f"{iou_type}_AP": 0.0, f"{iou_type}_AP50": 0.0})
                continue
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            metrics.update({f"{iou_type}_{k}": max(0.0, float(ev.stats[i])) for i, k in enumerate(METRIC_KEYS)})
            precision = ev.eval["precision"]  # [iou thresholds, recall, class, area, max dets]
            for k, name in enumerate(classes):
                p = precision[:, :, k, 0, -1]
                per_class[name][f"{iou_type}_AP"] = float(p[p > -1].mean()) if (p > -1).any() else None
                p50 = precision[0, :, k, 0, -1]
                per_class[name][f"{iou_type}_AP50"] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else None
    metrics["per_class"] = per_class
    return metrics


@torch.no_grad()
def predict_records(model, images: list[torch.Tensor], device) -> list[dict]:
    """Model outputs (on the CPU) for uint8 images, one image per forward pass, as the exported graph runs them.

    A batch pads its images to a common size, and the padding changes the detections of the smaller ones: a 4-epoch
    Penn-Fudan run measured bbox / segm AP 0.4844 / 0.4553 batched by 4, 0.4773 / 0.4501 one by one (its ONNX export:
    0.4773 / 0.4501), so results depended on which images shared a call. One by one took 14.0 s, batched 14.2 (CPU).
    """
    model.eval()
    return [{k: v.cpu() for k, v in model([im.to(device).float().div_(255)])[0].items()} for im in images]


def predict_results(model, records: list[Record], device, chunk: int = 4, keep_outputs: int = 0) -> tuple[list[dict], list[dict]]:
    """COCO results of ``model`` on ``records`` (images read ``chunk`` at a time), and its first ``keep_outputs`` raw
    outputs (for pictures): the dense masks of the rest are dropped chunk by chunk, so memory stays flat."""
    results, kept = [], []
    for i in range(0, len(records), chunk):
        chunk_records = records[i : i + chunk]
        outputs = predict_records(model, [r.read_image() for r in chunk_records], device)
        results += coco_results(outputs, [r.image_id for r in chunk_records])
        kept += outputs[: max(0, keep_outputs - len(kept))]
    return results, kept


def evaluate_model(
    model, records: list[Record], classes: list[str], has_masks: bool, device, keep_outputs: int = 6
) -> tuple[dict, list[dict]]:
    """COCO metrics of ``model`` on ``records``, and its outputs for the first ``keep_outputs`` of them."""
    results, outputs = predict_results(model, records, device, keep_outputs=keep_outputs)
    return coco_metrics(records, results, classes, has_masks), outputs
