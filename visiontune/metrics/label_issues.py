"""Which training labels look wrong: confident learning (Northcutt et al., 2021) on frozen-backbone features.

Out-of-fold probabilities of a K-fold logistic regression; a class's threshold is the mean probability of that class
over its own images; an image is a suspect when its given label's probability is below its class threshold while
another class's is above that class's. Used by ``classify audit`` and by a training run's report.
"""

from __future__ import annotations

import numpy as np
import torch

# on unit-length features C=1 gives soft probabilities: with 10 flipped labels in hymenoptera (5 seeds), C=10 flagged 42
# of the 50 as suspects (49 flags in all), C=1 35 (36); the top-20 ranking held 46-49 of 50 for any C from 0.1 to 100
LOGREG_C = 10.0


def out_of_fold(x: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int, val_x: np.ndarray | None = None):
    """(train probabilities, each from a fit that did not see the image; val probabilities from a fit on all of train)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    def fitted(idx):
        return LogisticRegression(C=LOGREG_C, max_iter=2000).fit(x[idx], y[idx])

    probs = np.zeros((len(y), n_classes))
    for fit_idx, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        m = fitted(fit_idx)
        probs[np.ix_(held, m.classes_)] = m.predict_proba(x[held])
    val_probs = np.zeros((0 if val_x is None else len(val_x), n_classes))
    if len(val_probs):
        m = fitted(np.arange(len(y)))
        val_probs[:, m.classes_] = m.predict_proba(val_x)
    return probs, val_probs


def class_thresholds(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's mean probability over the images labelled with it."""
    return np.array([probs[labels == c, c].mean() if (labels == c).any() else 1.0 for c in range(n_classes)])


def label_rows(probs: np.ndarray, labels: torch.Tensor, paths: list[str], split: str, classes: list[str], thresholds: np.ndarray):
    """One row per image; a suspect's given label is below its class threshold and another class is above its own."""
    rows = []
    for p, y, path in zip(probs, labels.tolist(), paths):
        above = p >= thresholds
        suspect = bool(not above[y] and above.sum() > 0)
        row = dict(path=path, split=split, given=classes[y], predicted=classes[int(p.argmax())], given_probability=round(float(p[y]), 4))
        rows.append(row | {"suspect": suspect})
    return rows


def training_suspects(features: torch.Tensor, labels: torch.Tensor, paths: list[str], classes: list[str], top: int, seed: int = 0):
    """The ``top`` training images whose given label is least likely (out of fold), suspects first; [] when a class has
    fewer than 2 images."""
    counts = torch.bincount(labels, minlength=len(classes))
    if int(counts.min()) < 2:
        return []
    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    probs, _ = out_of_fold(x, labels.numpy(), len(classes), min(5, int(counts.min())), seed)
    rows = label_rows(probs, labels, paths, "train", classes, class_thresholds(probs, labels.numpy(), len(classes)))
    return sorted(rows, key=lambda r: (not r["suspect"], r["given_probability"]))[:top]
