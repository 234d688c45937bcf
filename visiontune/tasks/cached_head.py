"""A new head trained on cached backbone features: ``linear``'s whole run, ``staged``'s head phase.

The frozen base runs once per image and view (engine/features.py); the head then trains for many passes over
those features in seconds. scikit-learn heads (logreg, svm) and kNN are fitted on them instead.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ..engine.distributed import balanced_draw
from ..models.classifier import Classifier

SKLEARN_HEADS = ("logreg", "svm", "knn")


def train_head_on_features(
    model: Classifier,
    head: str,
    batch_size: int,
    weight_decay: float,
    objective,
    seed: int,
    train_feats,
    val_feats,
    passes: int,
    lr: float,
    on_epoch,
    balanced: bool = False,
) -> None:
    """The head alone, many passes over cached features; ``on_epoch(pass, train stats, val logits)`` after each.
    ``objective`` (objective.py): the loss and what counts as right. ``balanced``: each pass draws its features with
    replacement, every class equally likely (``--sampler balanced``; scikit-learn heads are fitted on one such draw)."""
    device = next(itertools.chain(model.head.parameters(), model.head.buffers())).device
    (xf, yf), (xv, yv) = [(x.to(device), y.to(device)) for x, y in (train_feats, val_feats)]
    g = torch.Generator().manual_seed(seed)
    if head in SKLEARN_HEADS:
        if balanced:
            keep = balanced_draw(yf.cpu(), g)
            xf, yf = xf[keep], yf[keep]
        fit_sklearn_head(head, model.head, xf.cpu(), yf.cpu(), seed, objective.class_weights)
        with torch.no_grad():
            on_epoch(0, {"train_loss": None, "train_accuracy": None}, model.forward_head(xv))
        return
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = math.ceil(len(xf) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=passes * steps)
    loss_fn = objective.loss_fn(device)
    for p in range(passes):
        model.head.train()
        order = balanced_draw(yf.cpu(), g) if balanced else torch.randperm(len(xf), generator=g)
        loss_sum = correct = 0.0
        for i in range(0, len(xf), batch_size):
            idx = order[i : i + batch_size]
            logits = model.head(xf[idx])
            loss = loss_fn(logits, yf[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += objective.correct(logits, yf[idx])
        model.head.eval()
        with torch.no_grad():
            on_epoch(p, {"train_loss": loss_sum / len(xf), "train_accuracy": correct / len(xf)}, model.head(xv))


def fit_sklearn_head(
    kind: str, head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, seed: int = 0, class_weights: torch.Tensor | None = None
) -> None:
    """Fit logistic regression / linear SVM / kNN with scikit-learn (or torch for kNN; it ignores ``class_weights``)
    and copy into ``head``. Multi-hot ``labels`` (multi-label): one binary model per class."""
    if kind == "knn":
        head.set_bank(feats, labels)
        return
    x = feats.numpy()
    if labels.dim() == 2:
        rows = [_fit_linear(kind, x, labels[:, k].numpy() > 0.5, seed, None) for k in range(labels.shape[1])]
        coef, bias = torch.cat([c for c, _ in rows]), torch.cat([b for _, b in rows])
    else:
        weights = None if class_weights is None else dict(enumerate(class_weights.tolist()))
        coef, bias = _fit_linear(kind, x, labels.numpy(), seed, weights)
        if coef.shape[0] == 1:  # binary: scikit-learn keeps one row; make two symmetric logits
            coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    linear = head[-1]
    with torch.no_grad():
        linear.weight.copy_(coef)
        linear.bias.copy_(bias)


def _fit_linear(kind: str, x, y, seed: int, weights: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef, intercept) of a logistic regression or linear SVM; one class present: a constant, confident answer."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if len(np.unique(y)) < 2:
        return torch.zeros(1, x.shape[1]), torch.tensor([10.0 if y[0] else -10.0])
    if kind == "logreg":
        est = LogisticRegression(max_iter=2000, C=1.0, class_weight=weights)
    else:
        est = LinearSVC(C=0.1, random_state=seed, max_iter=5000, class_weight=weights)
    est.fit(x, y)
    return torch.as_tensor(est.coef_, dtype=torch.float32), torch.as_tensor(est.intercept_, dtype=torch.float32)
