"""The run's HTML report: ``RUN/report.html``, one self-contained file (images embedded as base64).

``write_report(run_dir)`` reads only the files in the run directory, so it works for any finished run:

- ``config.yaml`` (the settings), ``log.jsonl`` (one line per epoch: the curves), ``metrics.json``;
- classification: ``metrics.json`` per-class metrics and confusion matrix, and ``val_predictions.json``
  (written by ``visualize.write_val_predictions`` at the end of training) for the gallery, mistakes first;
- detection (the model file's metadata, or ``metrics.json``, says ``"task": "detection"``): the COCO numbers
  (``bbox_AP``, ``segm_AP50``, ... and ``per_class``), and the rendered predictions beside the ground truth:
  the images in ``RUN/gallery/``, or failing that the PNGs at the top of the run directory.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime
from pathlib import Path

from .checkpoint import atomic_write_text
from .visualize import thumbnail_jpeg

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ------------------------------------------------------------------------------ reading the run


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash: skip it
            continue
    return [r for r in rows if isinstance(r, dict) and "epoch" in r]


def _run_task(metrics: dict) -> str:
    """metrics.json names its task (runs of earlier versions: detection's alone has bbox_AP)."""
    return metrics.get("task") or ("detection" if "bbox_AP" in metrics else "classification")


# ------------------------------------------------------------------------------ pictures


def _png_base64(draw) -> str:
    buf = io.BytesIO()
    draw(buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, mime: str = "image/png", cls: str = "") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:{mime};base64,{b64}">'


def _curves(history: list[dict]) -> str:
    """Losses on the left; accuracy or AP on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    skip = {"epoch", "lr", "elapsed_seconds", "train_seconds", "train_images_per_second"}
    keys = [
        k
        for k in dict.fromkeys(k for h in history for k in h)
        if k not in skip and any(isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool) for h in history)
    ]
    panels = [("loss", [k for k in keys if "loss" in k]), ("accuracy / AP", [k for k in keys if "accuracy" in k or "AP" in k])]
    panels = [(title, ks) for title, ks in panels if ks]
    if not panels:
        return "<p>No numbers per epoch in log.jsonl.</p>"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels):
        for k in ks:  # the epochs that have the number (detection's --val-every leaves some without AP)
            points = [(h["epoch"], h[k]) for h in history if isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool)]
            ax.plot([e for e, _ in points], [y for _, y in points], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    b64 = _png_base64(lambda buf: fig.savefig(buf, format="png", dpi=90))
    plt.close(fig)
    return _img(b64, "training curves", cls="curves")


def _confusion(run: Path, metrics: dict) -> str:
    """The run's confusion_matrix.png when it was drawn with (or after) metrics.json, else drawn again from it."""
    from .visualize import confusion_matrix_png

    png, numbers = run / "confusion_matrix.png", run / "metrics.json"
    if png.is_file() and png.stat().st_mtime_ns >= numbers.stat().st_mtime_ns:
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    else:
        b64 = _png_base64(lambda buf: confusion_matrix_png(buf, metrics["confusion_matrix"], metrics["classes"]))
    return _img(b64, "confusion matrix", cls="confusion")


# ------------------------------------------------------------------------------ sections


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) <= 1 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(metrics: dict, task: str) -> str:
    keys = [
        "model",
        "strategy",
        "head",
        "recipe",
        "epochs",
        "best_val_accuracy",
        "best_val_mAP",
        "best_epoch",
        "final_val_accuracy",
        "final_val_mAP",
        "val_balanced_accuracy",
        "f1_micro",
        "f1_macro",
        "exact_match",
        "train_seconds",
        "trainable_params",
        "total_params",
    ]
    rows = [[k.replace("_", " "), metrics[k]] for k in keys if k in metrics]
    if task != "classification":
        rows = [
            [k.replace("_", " "), v]
            for k, v in metrics.items()
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and not k.startswith(("bbox_", "segm_"))
        ]
    return _table(["", "value"], rows) if rows else "<p>metrics.json is missing: the run did not finish.</p>"


def _advice(metrics: dict) -> str:
    advice = metrics.get("advice")
    if not advice:
        return ""
    rows = [[k.replace("_", " "), v] for k, v in advice.get("measurements", {}).items()]
    return (
        f"<section><h2>Strategy advisor</h2><p>Chose <b>{html.escape(advice['strategy'])}</b>: "
        f"{html.escape(advice['reason'])}</p>{_table(['measurement', 'value'], rows)}</section>"
    )


def _per_class(metrics: dict) -> str:
    """Precision, recall, F1 and images per class; multi-label adds AP and the threshold."""
    per_class = metrics.get("per_class", {})
    extra = [k for k in ("AP", "threshold") if any(k in v for v in per_class.values())]
    rows = [
        [name, *["-" if v.get(k) is None else v[k] for k in extra], v["precision"], v["recall"], v["f1"], v["support"]]
        for name, v in per_class.items()
    ]
    return _table(["class", *extra, "precision", "recall", "F1", "images"], rows)


def _label_suspects(rows: list[dict]) -> str:
    """The training images whose given label a cross-validated model on their features finds least likely."""
    from .data.images import BadImage, load_rgb

    cards = []
    for r in rows:
        name = Path(r["path"]).name
        try:
            picture = _img(thumbnail_jpeg(load_rgb(r["path"], 160)), name, "image/jpeg")
        except (BadImage, OSError):  # moved or deleted since training
            picture = ""
        cards.append(
            f'<figure class="{"wrong" if r["suspect"] else "ok"}">{picture}<figcaption>given <b>{html.escape(r["given"])}</b>, '
            f"looks like <b>{html.escape(r['predicted'])}</b><br>p(given) {r['given_probability']:.3f}<br>"
            f"<small>{html.escape(name)}</small></figcaption></figure>"
        )
    return (
        "<p>Out-of-fold probabilities of a logistic regression on the frozen features (the least likely given labels "
        "first; red: a suspect by confident learning). <code>visiontune classify audit</code> checks every image and "
        f'finds near duplicates.</p><div class="gallery suspects">{"".join(cards)}</div>'
    )


def _classification_gallery(preds: dict | None) -> str:
    if not preds:
        return "<p>No val_predictions.json in this run.</p>"
    items = [it for it in preds["items"] if "thumbnail_jpeg" in it]
    mistakes = sum(1 for it in preds["items"] if not it["correct"])
    cards = []
    for it in items:
        name = Path(it["path"]).name if it.get("path") else f"image {it['index']}"
        mark = "" if it["correct"] else " ✗"
        cards.append(
            f'<figure class="{"ok" if it["correct"] else "wrong"}">{_img(it["thumbnail_jpeg"], name, "image/jpeg")}'
            f"<figcaption>pred <b>{html.escape(it['predicted'])}</b> ({it['confidence']:.2f}){mark}<br>"
            f"true {html.escape(it['true'])}<br><small>{html.escape(name)}</small></figcaption></figure>"
        )
    return (
        f"<p>{mistakes} mistake(s) of {len(preds['items'])} validation images; showing {len(items)}, mistakes first.</p>"
        f'<div class="gallery">{"".join(cards)}</div>'
    )


def _ap_table(metrics: dict) -> str:
    """COCO numbers as written by the detection engine: ``bbox_AP``, ``segm_AP50``, ... and ``per_class``."""
    kinds = [k for k in ("bbox", "segm") if any(key.startswith(k + "_") for key in metrics)]
    if not kinds:
        return "<p>No AP numbers in metrics.json.</p>"
    cols = list(
        dict.fromkeys(key.split("_", 1)[1] for key in metrics if key.split("_", 1)[0] in kinds and isinstance(metrics[key], (int, float)))
    )
    overall = _table(["", *cols], [[k, *[metrics.get(f"{k}_{c}", "") for c in cols]] for k in kinds])
    per_class = metrics.get("per_class") or {}
    class_cols = list(dict.fromkeys(c for v in per_class.values() for c in v))
    rows = [[name, *["-" if v.get(c) is None else v[c] for c in class_cols]] for name, v in per_class.items()]
    return overall + (f"<h3>Per class</h3>{_table(['class', *class_cols], rows)}" if rows else "")


def _detection_gallery(run: Path) -> str:
    folder = run / "gallery"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        files = sorted(p for p in run.glob("*.png"))
    if not files:
        return "<p>No rendered predictions in this run.</p>"
    cards = []
    for p in files:
        mime = "image/png" if p.suffix.lower() == ".png" else "image/jpeg"
        cards.append(
            f'<figure class="wide">{_img(base64.b64encode(p.read_bytes()).decode("ascii"), p.name, mime)}'
            f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(cards)}</div>'


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0} section{margin:28px 0}
table{border-collapse:collapse;font-size:14px} th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}
th{background:#f3f3f3} pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:13px}
.row{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;padding:6px;border:3px solid #2e7d32;border-radius:6px;width:170px;font-size:12px}
figure.wrong{border-color:#c62828;background:#fff3f3} figure.wide{width:auto;max-width:100%;border-color:#ccc}
figure img{display:block;max-width:100%} figcaption small{word-break:break-all;color:#555} img.curves,img.confusion{max-width:100%}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.html`` from the files in the run directory and return its path."""
    run = Path(run_dir)
    metrics = _read_json(run / "metrics.json") or {}
    task = _run_task(metrics)
    history = _read_log(run / "log.jsonl")
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else "(no config.yaml)"
    parts = [
        f"<section><h2>Summary</h2>{_summary(metrics, task)}</section>",
        _advice(metrics),
        f"<section><h2>Training curves</h2>{_curves(history) if history else '<p>No log.jsonl entries.</p>'}</section>",
    ]
    if task == "classification":
        if "confusion_matrix" in metrics:
            parts.append(
                f'<section><h2>Confusion matrix and per-class metrics</h2><div class="row">{_confusion(run, metrics)}'
                f"{_per_class(metrics)}</div></section>"
            )
        elif metrics.get("per_class"):  # multi-label: no confusion matrix
            parts.append(f"<section><h2>Per-class metrics</h2>{_per_class(metrics)}</section>")
        if metrics.get("label_suspects"):
            parts.append(f"<section><h2>Training labels to check</h2>{_label_suspects(metrics['label_suspects'])}</section>")
        parts.append(
            f"<section><h2>Validation predictions</h2>{_classification_gallery(_read_json(run / 'val_predictions.json'))}</section>"
        )
    else:
        parts.append(f"<section><h2>Average precision</h2>{_ap_table(metrics)}</section>")
        parts.append(f"<section><h2>Predictions beside the ground truth</h2>{_detection_gallery(run)}</section>")
    parts.append(f"<section><h2>Settings (config.yaml)</h2><pre>{html.escape(config)}</pre></section>")
    title = f"visiontune {task} run: {run.resolve().name}"
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="sub">{html.escape(str(run.resolve()))} · report written {datetime.now():%Y-%m-%d %H:%M}</p>'
        f"{''.join(parts)}</body></html>\n"
    )
    path = run / "report.html"
    atomic_write_text(path, page)
    return path
