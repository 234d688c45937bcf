"""Loading a trained run for eval, predict and export: a classifier or a detector, from its PyTorch model file
(rebuilt from the file's metadata, no pretrained weights needed) or from an ONNX file of ``visiontune export``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..engine.runtime import select_device
from ..errors import UserError
from ..meta import ClassifierMeta, DetectorMeta, read_meta
from ..models.backbones import build_backbone
from ..models.classifier import Classifier
from ..models.detection import CUSTOM_MODELS, build_detector, freeze_batch_norm


def model_path(run_or_file: str | Path) -> Path:
    p = Path(run_or_file)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise UserError(f"{run_or_file}: no model file (expected a run directory with model.safetensors, or the file itself)")
    return p


def read_model_file(run_or_file: str | Path) -> tuple[dict[str, torch.Tensor], ClassifierMeta | DetectorMeta]:
    sd, record = ckpt.load_model_file(model_path(run_or_file))
    return sd, read_meta(record, run_or_file)


def _placed(model: torch.nn.Module, device: str) -> torch.nn.Module:
    return model.eval().to(select_device(device), memory_format=torch.channels_last)


def load_classifier(run_or_file: str | Path, device: str = "cpu") -> tuple[Classifier, ClassifierMeta]:
    """The classifier in eval mode on ``device`` (auto, cpu, cuda or mps)."""
    sd, meta = read_classifier(run_or_file)
    return build_classifier(sd, meta, device), meta


def read_classifier(run_or_file: str | Path) -> tuple[dict[str, torch.Tensor], ClassifierMeta]:
    """A classification model file's weights (checked against its checksum) and metadata."""
    sd, meta = read_model_file(run_or_file)
    if not isinstance(meta, ClassifierMeta):
        raise UserError(f"{run_or_file}: not a classification model (task: {meta.task})")
    return sd, meta


def build_classifier(sd: dict[str, torch.Tensor], meta: ClassifierMeta, device: str = "cpu") -> Classifier:
    """The classifier of ``meta`` holding the weights ``sd``, in eval mode on ``device``."""
    model = Classifier(build_backbone(meta.model, weights="none"), len(meta.classes), head=meta.head, bank_size=meta.bank_size)
    model.load_state_dict(sd)
    return _placed(model, device)


def load_detector(run_or_file: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, DetectorMeta]:
    """The detector in eval mode on ``device`` (auto, cpu, cuda or mps)."""
    sd, meta = read_model_file(run_or_file)
    if not isinstance(meta, DetectorMeta):
        raise UserError(f"{run_or_file}: not a detection model (task: {meta.task})")
    model = build_detector(
        meta.model,
        len(meta.classes) + 1,
        backbone=meta.backbone,
        weights="none",
        backbone_weights="none",
        neck=meta.neck,
        min_size=meta.min_size,
        max_size=meta.max_size,
        anchor_ratios=tuple(meta.anchor_ratios),
        anchors_per_octave=meta.anchors_per_octave,
        mask_quality_scores=meta.mask_quality_scores,
        box_voting=meta.box_voting,
    )
    trained_bn = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in sd)
    if meta.model not in CUSTOM_MODELS and not trained_bn:  # as trained from COCO weights: frozen BatchNorm in the body
        model.backbone.body = freeze_batch_norm(model.backbone.body)
    model.load_state_dict(sd)
    return _placed(model, device), meta


# --------------------------------------------------------------------------------------------- ONNX files


def onnx_on_cpu(device: str) -> None:
    """Exported files run on ONNX Runtime's CPU provider: a GPU asked for is refused, not silently ignored."""
    if device not in ("auto", "cpu"):
        raise UserError(f"--device {device}: .onnx files run on the CPU (ONNX Runtime); predict from the run directory to use {device}")


def open_onnx(path: str | Path):
    """An ONNX Runtime session of an exported file, its typed metadata, and its preprocessing record."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - anything ONNX Runtime cannot read is the user's file
        raise UserError(f"{p}: not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    props = session.get_modelmeta().custom_metadata_map
    if "classes" not in props or "preprocessing" not in props:
        raise UserError(f"{p}: not a visiontune export (no class names or preprocessing in its metadata)")
    record = {"task": "classification", **json.loads(props.get("visiontune", "{}"))}
    preprocessing = json.loads(props["preprocessing"])
    if record["task"] == "classification":
        record.setdefault("preprocessing", preprocessing)
    return session, read_meta({**record, "classes": json.loads(props["classes"])}, p), preprocessing


class OnnxClassifier:
    """An exported classifier behind the PyTorch model's interface: a (N, 3, S, S) float batch -> logits."""

    own_threads = True  # ONNX Runtime's, not torch's

    def __init__(self, path: str | Path):
        self.session, self.meta, _ = open_onnx(path)
        if not isinstance(self.meta, ClassifierMeta):
            raise UserError(f"{path}: an exported {self.meta.task} model; use visiontune detect predict")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], {"images": x.float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(logits))


class OnnxDetector:
    """An exported detector behind the PyTorch model's interface: a list of (3, H, W) float images in [0, 1] -> a list of
    dicts of boxes, labels, scores (and masks), so ``detect predict`` runs it as it runs the PyTorch model."""

    def __init__(self, path: str | Path):
        self.session, self.meta, preprocessing = open_onnx(path)
        if not isinstance(self.meta, DetectorMeta):
            raise UserError(f"{path}: an exported {self.meta.task} model; use visiontune classify predict")
        self.outputs = preprocessing["outputs"]

    def eval(self) -> OnnxDetector:
        return self

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:
            values = self.session.run(self.outputs, {"image": image.float().contiguous().cpu().numpy()})
            results.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(self.outputs, values)})
        return results


def detector_for_predict(run_or_file: str | Path, device: str):
    """(the detector, its device, the metadata) for predict: a run's PyTorch model, or an exported .onnx file on the CPU."""
    if str(run_or_file).endswith(".onnx"):
        onnx_on_cpu(device)
        model = OnnxDetector(run_or_file)
        return model, torch.device("cpu"), model.meta
    model, meta = load_detector(run_or_file, device)
    return model, next(model.parameters()).device, meta
