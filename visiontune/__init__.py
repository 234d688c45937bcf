"""visiontune: fine-tune pretrained vision models on your own images.

import visiontune as vt
metrics = vt.fit(vt.ClassifyConfig(data="images/", out="run", strategy="linear"))
vt.predict("run", ["photo.jpg"])
"""

from .config import ClassifyConfig, DetectConfig
from .errors import UserError

__version__ = "0.1.0"
__all__ = [
    "ClassifyConfig",
    "DetectConfig",
    "UserError",
    "build_classifier",
    "fit",
    "evaluate",
    "predict",
    "build_detector",
    "fit_detector",
]


def build_classifier(model: str = "efficientnet_lite0", num_classes: int = 2, weights: str | None = None, head: str = "linear"):
    """A Classifier (backbone + new head) for ``num_classes`` classes."""
    from .models.backbones import build_backbone
    from .models.classifier import Classifier

    return Classifier(build_backbone(model, weights), num_classes, head=head)


def fit(cfg: ClassifyConfig, resume: bool = False) -> dict:
    """Train a classifier; writes cfg.out and returns its metrics."""
    from .tasks.classify import fit as _fit

    return _fit(cfg, resume=resume)


def evaluate(run: str, data: str, labels: str | None = None, tta: str = "none") -> dict:
    """Accuracy and per-class metrics of a run on ``data`` (a multi-label run: mAP and F1 on ``labels``);
    ``tta``: none, flip or flip+crops."""
    from .inference.classify import evaluate as _evaluate

    return _evaluate(run, data, labels=labels, tta=tta)


def predict(run: str, inputs: list[str], topk: int = 3, tta: str = "none") -> list[dict]:
    from .inference.classify import predict as _predict

    return _predict(run, inputs, topk=topk, tta=tta)


def build_detector(*args, **kwargs):
    """A Mask/Faster R-CNN for the user's classes (see models/detection.py)."""
    from .models.detection import build_detector as _build

    return _build(*args, **kwargs)


def fit_detector(cfg: DetectConfig, resume: bool = False) -> dict:
    from .tasks.detect import fit as _fit

    return _fit(cfg, resume=resume)
