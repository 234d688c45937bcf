"""Label audit and train/val leakage check: ``visiontune classify audit``.

Every train and val image goes once (eval preprocessing, centre crop) through the frozen backbone; the features go
through the on-disk cache (engine/features.py), so a second audit, or a training run's val pass, reuses them.

Label issues (metrics/label_issues.py: confident learning on out-of-fold probabilities of a logistic regression on
the L2-normalised training features). Val images are scored by a fit on all training images, against the same
class thresholds.

Near duplicates: cosine similarity of the normalised features, each image against its ``NEIGHBOURS`` nearest
training images, in tiles of ``BLOCK`` x ``BLOCK`` (memory stays bounded at any size). The default threshold, 0.82,
was measured on hymenoptera with the embedded EfficientNet-Lite0 (bench/audit.py): a distinct image's nearest
neighbour is at most 0.80 (two shots of one ant series; 99th percentile 0.795, median 0.67); an exact copy is 1.0; a
JPEG re-saved at quality 75 and resized 0.8x at least 0.84 (median 0.94); a mirror image at least 0.88; a 90 % centre
crop 0.78 (98.7 % at 0.82 or more). Quality 50 at half size moves the features further (median 0.79): most such copies
go unseen. Another backbone, or a large set (more distinct pairs come close), may want its own: see nearest_cosine_train.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .caches import cache_folder
from .checkpoint import atomic_write_text
from .config import ClassifyConfig
from .data.classification import open_images
from .data.images import load_rgb
from .data.shards import is_listing, read_listing
from .data.splits import Samples, find_splits, scan_folder
from .data.tar_members import listings_in
from .data.transforms import classification_eval
from .engine.features import cached_extract
from .engine.frozen import frozen_forward
from .engine.runtime import use_bf16
from .errors import UserError
from .metrics.label_issues import class_thresholds, label_rows, out_of_fold
from .models.backbones import build_backbone
from .visualize import thumbnail_jpeg

log = logging.getLogger("visiontune")
DEFAULT_MODEL = ClassifyConfig.model
DEFAULT_THRESHOLD = 0.82
NEIGHBOURS = 10  # nearest training images kept per image: pairs beyond the 10th of one image are not listed
BLOCK = 4096  # rows and columns of one similarity tile: 64 MB in float32
THUMBNAIL_PX = 96
OUTPUTS = ("label_issues.jsonl", "duplicates.jsonl", "audit.json", "audit.html")


def audit(
    data: str,
    val_data: str | None = None,
    model: str = DEFAULT_MODEL,
    weights: str | None = None,
    out: str | None = None,
    top: int = 20,
    folds: int = 5,
    duplicate_threshold: float | None = None,
    cache_dir: str | None = None,
    engine: str = "auto",
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Audit the images of ``data`` (as ``classify train --data``); write the four files into ``out``; return the summary."""
    if top < 1:
        raise UserError(f"--top: must be at least 1, got {top}")
    if folds < 2:
        raise UserError(f"--folds: must be at least 2, got {folds}")
    threshold = DEFAULT_THRESHOLD if duplicate_threshold is None else duplicate_threshold
    if not 0 < threshold <= 1:
        raise UserError(f"--duplicate-threshold: must be in (0, 1], got {threshold}")
    train_s, val_s = splits(data, val_data, seed, cache_dir)
    out_dir = _out_dir(out, data)
    laps = [time.perf_counter()]
    backbone = build_backbone(model, weights)
    cache = cache_folder(cache_dir)
    size = backbone.preprocessing.input_size
    bf16 = use_bf16("auto", torch.device("cpu"))  # as a training run's frozen pass: the same engine probe and cache keys
    forward = frozen_forward(backbone.name, backbone.module, size, engine, bf16, cache, spin=False)
    (xt, yt, pt), (xv, yv, pv) = [
        image_features(backbone, forward, s, n, cache or "none", skip_bad, progress) for s, n in ((train_s, "train"), (val_s, "val"))
    ]
    laps.append(time.perf_counter())
    classes = train_s.classes
    folds = _usable_folds(folds, yt, classes)
    probs_t, probs_v = out_of_fold(xt.numpy(), yt.numpy(), len(classes), folds, seed, xv.numpy())
    thresholds = class_thresholds(probs_t, yt.numpy(), len(classes))
    rows = label_rows(probs_t, yt, pt, "train", classes, thresholds) + label_rows(probs_v, yv, pv, "val", classes, thresholds)
    rows.sort(key=lambda r: r["given_probability"])
    laps.append(time.perf_counter())
    pairs, nearest_cos = duplicate_pairs(xt, pt, xv, pv, threshold)
    laps.append(time.perf_counter())
    summary = {
        "data": str(data),
        "val_data": val_data,
        "out": str(out_dir),
        "model": backbone.name,
        "engine": forward.name,
        "classes": classes,
        "train_images": len(pt),
        "val_images": len(pv),
        "folds": folds,
        "class_thresholds": {c: round(float(t), 4) for c, t in zip(classes, thresholds)},
        "label_suspects": {s: sum(r["suspect"] for r in rows if r["split"] == s) for s in ("train", "val")},
        "duplicate_threshold": threshold,
        "duplicates": {k: sum(p["kind"] == k for p in pairs) for k in ("train-val", "train-train")},
        "nearest_cosine_train": nearest_cos,
        "seconds": {k: round(b - a, 2) for k, a, b in zip(("features", "labels", "duplicates"), laps, laps[1:])}
        | {"total": round(laps[-1] - laps[0], 2)},
    }
    _write(out_dir, rows, pairs, summary, top)
    return {"summary": summary, "worst": rows[:top], "pairs": pairs[:top]}


def _write(out_dir: Path, rows: list[dict], pairs: list[dict], summary: dict, top: int) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {out_dir} ({e.strerror})") from None
    atomic_write_text(out_dir / "label_issues.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out_dir / "duplicates.jsonl", "".join(json.dumps({k: v for k, v in p.items() if k != "kind"}) + "\n" for p in pairs))
    atomic_write_text(out_dir / "audit.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out_dir / "audit.html", _html(rows, pairs, top, summary))


def describe(result: dict) -> str:
    """A few lines for the terminal: the counts, the worst suspects and pairs, where the page is."""
    s, n, d = result["summary"], result["summary"]["label_suspects"], result["summary"]["duplicates"]
    lines = [f"label suspects: {n['train']} of {s['train_images']} train, {n['val']} of {s['val_images']} val images"]
    lines += [
        f"  {r['path']} ({r['split']}): given {r['given']}, p {r['given_probability']:.3f}, predicted {r['predicted']}"
        for r in result["worst"][:5]
        if r["suspect"]
    ]
    lines.append(
        f"near duplicates (cosine >= {s['duplicate_threshold']}): {d['train-val']} train-val (leakage), {d['train-train']} in train"
    )
    lines += [f"  {p['path_a']} ({p['split_a']}) ~ {p['path_b']} ({p['split_b']}): {p['cosine']:.4f}" for p in result["pairs"][:5]]
    return "\n".join(lines + [f"wrote {s['out']}/audit.html ({s['seconds']['total']:.1f} s)"])


def splits(data: str, val_data: str | None, seed: int, cache_dir: str | None) -> tuple[Samples, Samples]:
    """As ``find_splits``; class folders (or an index) without a validation part audit their training images alone."""
    root = Path(data or "")
    if data and val_data is None and not is_listing(data) and root.is_dir() and not (root / "val").is_dir():
        train = scan_folder(root / "train" if (root / "train").is_dir() else root)
        return train, Samples([], train.classes)
    if data and val_data is None and is_listing(data):
        with listings_in(cache_folder(cache_dir)):
            rows = read_listing(data)
        return Samples(rows.train, rows.classes), Samples(rows.val or [], rows.classes)
    return find_splits(data, val_data, None, seed, cache_dir=cache_dir)


def _out_dir(out: str | None, data: str) -> Path:
    """``--out``, or runs/audit-<data name>: new, empty, or holding an earlier audit's files alone (then replaced).
    Made only once the audit is done, so bad input leaves nothing behind."""
    path = Path(data).resolve()
    out_dir = Path(out) if out else Path("runs") / f"audit-{path.stem if is_listing(data) else path.name}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a directory")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUTS) if out_dir.is_dir() else []
    if others:
        raise UserError(f"--out: {out_dir} holds other files ({others[0]}); name a new folder for the audit")
    return out_dir


def image_features(backbone, forward, samples: Samples, split: str, cache_dir, skip_bad: bool = False, progress: bool = True):
    """Unit-length features of one centre-crop view per image, their labels and paths (bad images skipped if asked).
    ``cache_dir``: the feature cache's folder, or "none"."""
    if not samples.items:
        return torch.empty(0, backbone.num_features), torch.empty(0, dtype=torch.long), []
    prep, cores = backbone.preprocessing, len(os.sched_getaffinity(0))
    resize = prep.resize_size
    tf = classification_eval(prep.input_size, resize, prep.mean, prep.std)
    # headers only: the pixels are decoded once, in the workers of the feature pass (and not at all on a cache hit)
    ds, _ = open_images(samples, resize, tf, cache="none", skip_bad=skip_bad, threads=cores, progress=progress)
    if not len(ds):
        raise UserError(f"--data: no readable {split} images")
    # the same description as a training run's, so its val features and the audit's share a cache entry
    how = f"decode {resize}; {tf!r}"
    x, y = cached_extract(backbone.name, backbone.module, forward, ds, how, 1, 0, cache_dir, f"features ({split})", progress, cores)
    return F.normalize(x.float(), dim=1), y, [str(p) for p in ds.paths]


def _usable_folds(folds: int, labels: torch.Tensor, classes: list[str]) -> int:
    counts = torch.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if counts[smallest] < 2:
        raise UserError(f"--data: class {classes[smallest]!r} has {int(counts[smallest])} training image(s); the audit needs 2 or more")
    if folds > counts[smallest]:
        log.info("--folds %d: class %r has only %d training images; using that many folds", folds, classes[smallest], counts[smallest])
        return int(counts[smallest])
    return folds


def nearest(a: torch.Tensor, b: torch.Tensor, k: int, same: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a``, the cosines and indices of its ``k`` nearest rows of ``b`` (unit vectors), in tiles;
    ``same``: ``a`` is ``b``, and a row is not its own neighbour."""
    k = min(k, len(b) - same)
    values, indices = torch.empty(len(a), max(k, 0)), torch.empty(len(a), max(k, 0), dtype=torch.long)
    for r in range(0, len(a) if k > 0 else 0, BLOCK):
        rows = a[r : r + BLOCK]
        best_v, best_i = torch.empty(len(rows), 0), torch.empty(len(rows), 0, dtype=torch.long)
        for c in range(0, len(b), BLOCK):
            sims = rows @ b[c : c + BLOCK].T
            if same and c == r:  # the tile on the diagonal: each row meets itself there
                sims.fill_diagonal_(-2.0)
            v, i = sims.topk(min(k, sims.shape[1]), dim=1)
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + c], 1)
            best_v, top = v.topk(min(k, v.shape[1]), dim=1)
            best_i = i.gather(1, top)
        values[r : r + BLOCK], indices[r : r + BLOCK] = best_v, best_i
    return values, indices


def duplicate_pairs(xt, pt, xv, pv, threshold: float) -> tuple[list[dict], dict]:
    """Pairs at or above ``threshold``: train-val (leakage) first, then inside train, each most similar first; and
    percentiles of the training images' nearest-neighbour cosines."""
    found = {}
    tv, ti = nearest(xt, xt, NEIGHBOURS, same=True)
    vv, vi = nearest(xv, xt, NEIGHBOURS)
    for kind, values, indices in (("train-train", tv, ti), ("train-val", vv, vi)):
        for a, b in (values >= threshold).nonzero().tolist():
            j = int(indices[a, b])  # a train image: the pair is (train j, image a)
            found[(kind, *sorted((a, j))) if kind == "train-train" else (kind, j, a)] = float(values[a, b])
    pairs = [
        dict(kind=kind, path_a=pt[a], split_a="train", path_b=(pv if kind == "train-val" else pt)[b], split_b=kind[6:], cosine=round(v, 4))
        for (kind, a, b), v in found.items()
    ]
    pairs.sort(key=lambda p: (p["kind"] != "train-val", -p["cosine"]))
    nn = tv[:, 0] if tv.shape[1] else torch.empty(0)
    return pairs, {f"p{q}": round(float(nn.quantile(q / 100)), 4) for q in (1, 50, 99, 100)} if len(nn) else {}


def _thumbnail(path: str) -> str:
    b64 = thumbnail_jpeg(load_rgb(path, THUMBNAIL_PX), THUMBNAIL_PX)
    return f'<img alt="{html.escape(path)}" src="data:image/jpeg;base64,{b64}">'


def _html(rows: list[dict], pairs: list[dict], top: int, summary: dict) -> str:
    """One self-contained page: the ``top`` worst-ranked images, then up to ``top`` duplicate pairs, train-val first."""

    def figure(path: str, caption: str, cls: str = "") -> str:
        return f'<figure class="{cls}">{_thumbnail(path)}<figcaption>{caption}</figcaption></figure>'

    labels = "".join(
        figure(
            r["path"],
            f"{html.escape(Path(r['path']).name)} ({r['split']})<br>given <b>{html.escape(r['given'])}</b>, "
            f"predicted <b>{html.escape(r['predicted'])}</b><br>p(given) {r['given_probability']:.3f}",
            "suspect" if r["suspect"] else "",
        )
        for r in rows[:top]
    )

    def side(p: dict, s: str) -> str:
        return figure(p[f"path_{s}"], f"{html.escape(Path(p[f'path_{s}']).name)} ({p[f'split_{s}']})")

    dups = "".join(f'<div class="pair">{side(p, "a")}{side(p, "b")}<p>cosine {p["cosine"]:.4f}</p></div>' for p in pairs[:top])
    facts = html.escape(json.dumps({k: summary[k] for k in ("label_suspects", "duplicates", "class_thresholds", "model", "engine")}))
    style = (
        "body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:4px;width:150px;font-size:11px;"
        "vertical-align:top}figure.suspect{outline:3px solid #c33}.pair{display:inline-block;border:1px solid #ccc;margin:4px;"
        "padding:4px;font-size:12px}img{max-width:96px;max-height:96px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>visiontune audit</title><style>{style}</style></head><body>"
        f"<h1>Audit of {html.escape(summary['data'])}</h1><p><code>{facts}</code></p>"
        f"<h2>Label issues (lowest probability of the given label first; red: suspect)</h2>{labels or '<p>none</p>'}"
        f"<h2>Near duplicates (cosine &ge; {summary['duplicate_threshold']}; train-val first)</h2>{dups or '<p>none</p>'}"
        "</body></html>\n"
    )
