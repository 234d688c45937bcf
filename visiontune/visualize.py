"""Pictures of what a model predicts: prediction grids (mistakes marked), confusion matrices, detections drawn."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .checkpoint import atomic_write_text  # noqa: E402
from .metrics.classification import decisions  # noqa: E402


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """A normalized CHW tensor back to an HWC image in [0, 1]."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 0)


def prediction_grid_png(
    path: Path,
    dataset,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    preprocessing: dict,
    max_images: int = 16,
    thresholds: list[float] | None = None,
) -> None:
    """Validation images with predicted and true labels; mistakes first, framed and captioned in red (the tutorial's
    visualize_model). ``thresholds``: multi-label (the labels at or above them). Drawn with PIL: matplotlib's 16 axes
    cost ~1.2 s of every run."""
    from PIL import Image, ImageDraw, ImageFont

    answers = decisions(logits, labels, classes, thresholds)
    wrong = [i for i, a in enumerate(answers) if not a["correct"]]
    order = (wrong + [i for i, a in enumerate(answers) if a["correct"]])[:max_images]
    font, title_font = ImageFont.load_default(13), ImageFont.load_default(15)
    tile, caption, pad, cols = 224, 38, 8, 4
    rows = max(1, -(-len(order) // cols))
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, 30 + rows * (tile + caption + pad)), "white")
    pen = ImageDraw.Draw(sheet)
    pen.text((pad, 7), f"validation predictions: {len(wrong)} mistake(s) of {len(answers)}", fill="black", font=title_font)
    for k, i in enumerate(order):
        x0, y0 = pad + (k % cols) * (tile + pad), 30 + (k // cols) * (tile + caption + pad)
        image, _ = dataset[i]
        rgb = (denormalize(image, preprocessing["mean"], preprocessing["std"]) * 255).round().byte().numpy()
        sheet.paste(Image.fromarray(rgb).resize((tile, tile)), (x0, y0 + caption))
        a = answers[i]
        color = (0, 128, 0) if a["correct"] else (210, 0, 0)
        text = f"pred: {a['predicted']} ({a['confidence']:.2f})\ntrue: {a['true']}"
        pen.multiline_text((x0, y0 + 2), _fit(pen, text, font, tile), fill=color, font=font, spacing=3)
        if not a["correct"]:
            pen.rectangle((x0 - 3, y0 + caption - 3, x0 + tile + 2, y0 + caption + tile + 2), outline=color, width=3)
    sheet.save(path, format="PNG")


def _fit(pen, text: str, font, width: int) -> str:
    """Each line of ``text`` cut (with an ellipsis) to ``width`` pixels."""
    lines = []
    for line in text.splitlines():
        while len(line) > 4 and pen.textlength(line, font=font) > width:
            line = line[:-2] + "…"
        lines.append(line)
    return "\n".join(lines)


def confusion_matrix_png(path: Path, confusion: list[list[int]], classes: list[str]) -> None:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(r) for r in confusion) if confusion else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center", color="white" if confusion[i][j] > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- detection

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324"]


def draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], masks: torch.Tensor | None) -> torch.Tensor:
    """uint8 image with masks (bool (N, H, W)) and labelled boxes drawn over it."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    if masks is not None and len(masks):
        image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colors)
    if len(boxes):
        image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)
    return image


def draw_detections(image: torch.Tensor, output: dict, classes: list[str], min_score: float) -> torch.Tensor:
    """A detector's ``output`` for ``image`` (scores at least ``min_score``) drawn over it, labelled with class and score."""
    keep = output["scores"] >= min_score
    masks = output["masks"][keep][:, 0] > 0.5 if "masks" in output else None
    labels = [f"{classes[int(k) - 1]} {s:.2f}" for k, s in zip(output["labels"][keep], output["scores"][keep])]
    return draw(image, output["boxes"][keep], labels, masks)


def detection_predictions_png(path: Path, records: list, outputs: list[dict], classes: list[str], min_score: float = 0.5) -> None:
    """Ground truth (left) beside predicted masks, boxes and scores (right), one validation image a row."""
    rows = max(1, len(records))
    fig, axes = plt.subplots(rows, 2, figsize=(8, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (r, o) in enumerate(zip(records, outputs)):
        image = r.read_image()
        gt = draw(image, r.boxes, [classes[int(i) - 1] for i in r.labels], r.read_masks())
        axes[row, 0].imshow(gt.permute(1, 2, 0).numpy())
        axes[row, 0].set_title(f"ground truth: {len(r.boxes)}", fontsize=9)
        axes[row, 1].imshow(draw_detections(image, o, classes, min_score).permute(1, 2, 0).numpy())
        axes[row, 1].set_title(f"predicted (score >= {min_score}): {int((o['scores'] >= min_score).sum())}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ the report's gallery, written in training

GALLERY_SIZE = 48  # validation images shown (mistakes first); the JSON keeps every prediction
THUMBNAIL_PX = 160


def gallery_order(labels: list[int], preds: list[int], confidences: list[float]) -> list[int]:
    """Mistakes first (the most confident mistakes on top), then correct ones, least confident first."""
    wrong = [i for i in range(len(labels)) if preds[i] != labels[i]]
    right = [i for i in range(len(labels)) if preds[i] == labels[i]]
    return sorted(wrong, key=lambda i: -confidences[i]) + sorted(right, key=lambda i: confidences[i])


def thumbnail_jpeg(image, px: int = THUMBNAIL_PX) -> str:
    """A uint8 CHW tensor (or a PIL image) as a small base64 JPEG."""
    from PIL import Image

    im = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()) if isinstance(image, torch.Tensor) else image.copy()
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_val_predictions(
    path: Path,
    image_at,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    paths: list[str] | None = None,
    thresholds: list[float] | None = None,
) -> None:
    """Every validation prediction, in gallery order, with thumbnails for the first ``GALLERY_SIZE``
    (``image_at(i)``: validation image ``i`` as uint8 CHW; only those are read). ``thresholds``: multi-label."""
    answers = decisions(logits, labels, classes, thresholds)
    order = gallery_order([a["true"] for a in answers], [a["predicted"] for a in answers], [a["confidence"] for a in answers])
    items = []
    for rank, i in enumerate(order):
        a = answers[i]
        item = {"index": i, **a, "confidence": round(a["confidence"], 6), "probabilities": [round(p, 6) for p in a["probabilities"]]}
        if paths is not None:
            item["path"] = str(paths[i])
        if rank < GALLERY_SIZE:
            item["thumbnail_jpeg"] = thumbnail_jpeg(image_at(i))
        items.append(item)
    atomic_write_text(path, json.dumps({"classes": classes, "items": items}) + "\n")
