"""Classifier = backbone (features) + head (a new classifier for the user's classes).

The head is always a torch module, so every model file is safetensors + JSON and exports to ONNX:
``linear`` and ``mlp`` train by gradient descent; ``logreg`` and ``svm`` are fitted by scikit-learn on
cached features and their coefficients copied into a Linear layer; ``knn`` keeps the training features
as a buffer and votes in torch.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import Backbone


class KNNHead(nn.Module):
    """k-nearest-neighbours on L2-normalised features; returns log vote shares as logits."""

    def __init__(self, num_features: int, num_classes: int, k: int = 5, bank_size: int = 1):
        super().__init__()
        self.k, self.num_classes = k, num_classes
        self.register_buffer("bank", torch.zeros(bank_size, num_features))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.long))

    def set_bank(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank = nn.functional.normalize(features.float(), dim=1).to(self.bank.device)
        self.bank_labels = labels.long().to(self.bank.device)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        sims = nn.functional.normalize(f.float(), dim=1) @ self.bank.T
        k = min(self.k, self.bank.shape[0])
        top = sims.topk(k, dim=1).indices
        votes = nn.functional.one_hot(self.bank_labels[top], self.num_classes).float().sum(1)
        return torch.log((votes + 1e-3) / (k + 1e-3 * self.num_classes))


def make_head(kind: str, num_features: int, num_classes: int, dropout: float = 0.0, bank_size: int = 1) -> nn.Module:
    if kind in ("linear", "logreg", "svm"):
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    if kind == "mlp":
        hidden = min(512, num_features)
        return nn.Sequential(
            nn.Dropout(dropout), nn.Linear(num_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
    if kind == "knn":
        return KNNHead(num_features, num_classes, bank_size=bank_size)
    raise ValueError(kind)


class Classifier(nn.Module):
    """``forward(x) = head(backbone(x))``. Modules listed as frozen stay in eval mode even under ``train()``."""

    def __init__(self, backbone: Backbone, num_classes: int, head: str = "linear", dropout: float = 0.0, bank_size: int = 1):
        super().__init__()
        self.backbone = backbone.module
        self.head = make_head(head, backbone.num_features, num_classes, dropout, bank_size)
        self.info = backbone  # name, preprocessing, stages (not a module)
        self.head_kind = head
        self._frozen: list[str] = []
        self._prefix = None  # (engine running the frozen prefix, the rest of the backbone): see run_prefix_on

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._prefix is None:
            return self.backbone(x)
        engine, rest = self._prefix
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # the engine's own precision, no graph
            h = engine(x)
        return rest(h.to(x.device).contiguous(memory_format=torch.channels_last))

    def run_prefix_on(self, engine, rest) -> None:
        """Compute the frozen prefix with ``engine`` (a callable on the prefix module of models/prefix.py) and the
        rest of the backbone with ``rest``; ``run_prefix_on(None, None)`` goes back to the whole backbone."""
        self._prefix = (engine, rest) if engine is not None else None

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- freezing ------------------------------------------------------------------------------------
    def set_frozen(self, prefixes: list[str]) -> None:
        """Freeze backbone modules by name prefix ("" = the whole backbone); unfreeze the rest."""
        self._frozen, self._prefix = list(prefixes), None
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not self._is_frozen(name))
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def _is_frozen(self, name: str) -> bool:
        return any(pre == "" or name == pre or name.startswith(pre + ".") for pre in self._frozen)

    @property
    def frozen_prefixes(self) -> list[str]:
        return list(self._frozen)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self._frozen:  # BatchNorm statistics and dropout of frozen parts must not change
            for name, module in self.backbone.named_modules():
                if self._is_frozen(name):
                    module.eval()
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbone and head parameters (all of them: frozen ones simply get no gradient)."""
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}

    def count_params(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total
