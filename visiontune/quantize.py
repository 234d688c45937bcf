"""INT8 export: ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations; the stem stays fp32),
calibrated on a seeded sample of the run's own training images under its eval preprocessing, and measured against the
fp32 export before it is kept: top-1 agreement and accuracy (classifiers) or COCO AP (detectors) on the run's
validation images, file sizes, and single-image latency. A drop beyond ``max_drop`` points (accuracy; a detector's
segm AP, or bbox AP without masks) stops the export (exit 2) unless ``force``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from .benchmark import call_times_ms
from .checkpoint import atomic_write, atomic_write_text
from .config import DetectConfig, from_dict
from .data.classification import load_downsized
from .data.formats import load_splits
from .data.splits import find_splits
from .errors import UserError
from .export import write_classifier_onnx, write_detector_onnx
from .inference.classify import eval_transform
from .inference.load import OnnxClassifier, OnnxDetector, read_model_file
from .meta import ClassifierMeta, DetectorMeta
from .metrics.coco import evaluate_model
from .runs import saved_settings

# Classifiers: 200 of the run's training images, in batches of 8 (the histogram calibrators need equal batches).
# Measured on hymenoptera linear (fp32 0.9673): MinMax 0.9477, Entropy 0.9477, Percentile 0.9542 (top-1 agreement 0.987).
# Detectors: 50, one image each (any size, so MinMax): ONNX Runtime's calibrator keeps every image's activations
# (peak RSS 1.65 GB at 20 images, 2.0 GB at 60 on a 320-512 px Mask R-CNN); 20 and 60 images gave equal AP.
CALIBRATION_IMAGES = {"classification": 200, "detection": 50}
CALIBRATION_BATCH = 8
# Quantizing only the convolutions (head in fp32) measured worse on the full run (0.9346 against 0.9542): all ops but
# the stem (see _stem_convolutions). A detector's RoIAlign, NMS and mask upsampling (ConvTranspose) stay fp32.
DETECTOR_OPS = ["Conv", "Gemm", "MatMul"]


def export_int8(run: str | Path, output: str | Path, calibration_images: int | None = None, max_drop: float = 1.0, force=False) -> dict:
    """Write ``run``'s model as an INT8 ONNX file at ``output`` and its measurements beside it (``.json``)."""
    out = Path(output)
    if not out.parent.is_dir():
        raise UserError(f"--output: {out.parent} is not a directory")
    _, meta = read_model_file(run)
    if isinstance(meta, ClassifierMeta) and meta.multi_label:
        raise UserError(f"{run}: --int8 exports single-label classifiers for now (this one is multi-label); export it in fp32")
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run}: --int8 needs the run directory (its config.yaml names the images to calibrate on)")
    settings, count = saved_settings(run_dir), calibration_images or CALIBRATION_IMAGES[meta.task]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        quantize = _detector_int8 if isinstance(meta, DetectorMeta) else _classifier_int8
        report, metric = quantize(run, settings, meta, count, fp32, int8)
        report.update({f"{name}_bytes": path.stat().st_size for name, path in (("fp32", fp32), ("int8", int8))})
        report.update(
            size_ratio=round(report["int8_bytes"] / report["fp32_bytes"], 3),
            latency_ratio=round(report["int8_p50_ms"] / report["fp32_p50_ms"], 3),
            run=str(run),
        )
        drop = 100 * (report[f"fp32_{metric}"] - report[f"int8_{metric}"])
        print(json.dumps(report))
        if drop > max_drop and not force:
            raise UserError(f"INT8 loses {drop:.1f} points of {metric} (over --max-drop {max_drop}); nothing written (--force keeps it)")
        atomic_write(out, lambda t: shutil.copyfile(int8, t))
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} (INT8, {report['int8_bytes'] / 1e6:.1f} MB, {report['size_ratio']:.2f}x fp32's) and {out.name}.json")
    return report


def _classifier_int8(run, settings: dict, meta: ClassifierMeta, count: int, fp32: Path, int8: Path) -> tuple[dict, str]:
    train, val = find_splits(
        settings["data"], settings.get("val_data"), settings.get("val_split"), settings.get("seed", 0), cache_dir=settings.get("cache_dir")
    )
    count = max(CALIBRATION_BATCH, min(count, len(train)) // CALIBRATION_BATCH * CALIBRATION_BATCH)
    sample = random.Random(0).sample(train.items, min(count, len(train)))
    write_classifier_onnx(run, fp32)
    _quantize(fp32, int8, ({"images": b} for b in _batches([p for p, _ in sample], meta, CALIBRATION_BATCH)), detector=False)
    return {**_measure(fp32, int8, val.items, meta), "calibration_images": len(sample)}, "accuracy"


def _detector_int8(run, settings: dict, meta: DetectorMeta, count: int, fp32: Path, int8: Path) -> tuple[dict, str]:
    train, val, data = load_splits(from_dict(DetectConfig, settings))
    sample = random.Random(0).sample(train, min(count, len(train)))
    write_detector_onnx(run, fp32)
    _quantize(fp32, int8, ({"image": r.read_image().float().div(255).numpy()} for r in sample), detector=True)
    report = _measure_detector(fp32, int8, val, meta, meta.masks and data.has_masks)
    return {**report, "calibration_images": len(sample)}, "segm_AP" if "fp32_segm_AP" in report else "bbox_AP"


def _batches(paths: list[Path], meta: ClassifierMeta, batch_size: int = 32):
    tf = eval_transform(meta)
    for i in range(0, len(paths), batch_size):
        yield torch.stack([tf(load_downsized(p, meta.preprocessing.resize_size)) for p in paths[i : i + batch_size]]).numpy()


def _quantize(fp32: Path, int8: Path, inputs, detector: bool) -> None:
    """Quantize ``fp32`` into ``int8``, calibrated on ``inputs`` (an iterable of input feeds)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(inputs)

        def get_next(self):
            return next(self.feeds, None)

    prepared = fp32
    if not detector:  # a detector's loops defeat the symbolic shape inference this runs
        prepared = fp32.with_name("prepared.onnx")
        quant_pre_process(str(fp32), str(prepared))
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # the quantizer reports every rescaled bias at INFO, tips at WARNING
    try:
        quantize_static(
            str(prepared),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax if detector else CalibrationMethod.Percentile,
            op_types_to_quantize=DETECTOR_OPS if detector else None,
            nodes_to_exclude=_stem_convolutions(onnx.load(str(prepared)).graph),
        )
    finally:
        root.level = level
    source, target = onnx.load(str(fp32)), onnx.load(str(int8))
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)  # classes and preprocessing, so predict reads the file alone
    onnx.save(target, str(int8))


def _stem_convolutions(graph) -> list[str]:
    """The first convolution and the depthwise ones right after it, which stay fp32.

    At full resolution with few channels, ONNX Runtime's int8 kernels are slower than its fp32 ones (EfficientNet-Lite0,
    one image: stem 0.31 ms int8 against 0.14 fp32, first depthwise 0.16 against 0.11); later layers gain. Measured on
    hymenoptera, p50 over 400 calls, 3 rounds: INT8 / fp32 0.60-0.62x (all quantized: 0.63-0.64x), and accuracy equal
    to fp32's on the default linear and full runs (all quantized: one more mistake each).
    """
    convs = [n for n in graph.node if n.op_type == "Conv"]
    stem = convs[:1]
    for node in convs[1:]:
        if next((a.i for a in node.attribute if a.name == "group"), 1) == 1:
            break
        stem.append(node)
    return [n.name for n in stem]


def _measure(fp32: Path, int8: Path, val: list[tuple[Path, int]], meta: ClassifierMeta) -> dict:
    models = {"fp32": OnnxClassifier(fp32), "int8": OnnxClassifier(int8)}
    labels = torch.tensor([y for _, y in val])
    preds = {name: [] for name in models}
    for batch in _batches([p for p, _ in val], meta):
        for name, model in models.items():
            preds[name].append(model(torch.from_numpy(batch)).argmax(1))
    top1 = {name: torch.cat(p) for name, p in preds.items()}
    one = torch.from_numpy(next(_batches([val[0][0]], meta)))
    return {
        "val_images": len(val),
        "top1_agreement": round((top1["fp32"] == top1["int8"]).float().mean().item(), 4),
        **{f"{name}_accuracy": round((t == labels).float().mean().item(), 4) for name, t in top1.items()},
        **{f"{name}_p50_ms": round(statistics.median(call_times_ms(model, one, 30)), 2) for name, model in models.items()},
    }


def _measure_detector(fp32: Path, int8: Path, val: list, meta: DetectorMeta, masks: bool) -> dict:
    models = {"fp32": OnnxDetector(fp32), "int8": OnnxDetector(int8)}
    report = {"val_images": len(val)}
    for name, model in models.items():
        metrics, _ = evaluate_model(model, val, meta.classes, masks, torch.device("cpu"), keep_outputs=0)
        report.update({f"{name}_{k}": round(metrics[k], 4) for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50") if k in metrics})
    one = [val[0].read_image().float().div(255)]
    for name, model in models.items():
        report[f"{name}_p50_ms"] = round(statistics.median(call_times_ms(model, one, 10)), 1)
    return report
