"""Frozen-backbone feature cache: compute backbone features once, then train heads on tensors.

With the base frozen, each epoch of the tutorial's loop recomputes the same convolutions. Here each
training image is augmented ``views`` times, once, and its features kept; the head then trains for
many passes over those features in seconds. Validation images get one center-crop view.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.classification import DecodedImages


@torch.no_grad()
def extract(backbone: nn.Module, dataset: DecodedImages, views: int = 1, batch_size: int = 32, seed: int = 0,
            channels_last: bool = True, desc: str = "features", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``views`` passes over ``dataset`` (its transform may be random): (views*N, F), (views*N,)."""
    from tqdm import tqdm

    backbone.eval()
    feats, labels = [], []
    gen = torch.Generator().manual_seed(seed)
    total = views * len(dataset)
    with tqdm(total=total, desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for _ in range(views):
            # The transforms draw from torch's global RNG: seed it per view so the cache is repeatable.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats.append(backbone(x).float())
                labels.append(torch.as_tensor(y))
                bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)


def fit_sklearn_head(kind: str, head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> None:
    """Fit logistic regression / linear SVM / kNN with scikit-learn (or torch for kNN) and copy into ``head``."""
    if kind == "knn":
        head.set_bank(feats, labels)
        return
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    x, y = feats.numpy(), labels.numpy()
    est = LogisticRegression(max_iter=2000, C=1.0) if kind == "logreg" else LinearSVC(C=0.1, random_state=seed, max_iter=5000)
    est.fit(x, y)
    coef, bias = torch.as_tensor(est.coef_, dtype=torch.float32), torch.as_tensor(est.intercept_, dtype=torch.float32)
    linear = head[-1]
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row; make two symmetric logits
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    with torch.no_grad():
        linear.weight.copy_(coef)
        linear.bias.copy_(bias)
