"""Command line: ``visiontune classify|detect train|eval|predict``, ``visiontune export``.

Settings come from the config dataclasses' defaults, then ``--config FILE.yaml``, then flags (flags win).
A user's mistake prints one line and exits 2; it never shows a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .config import ENGINES, TTA, ClassifyConfig, DetectConfig, checked_types, from_dict, load_yaml
from .engine.heap import keep_freed_memory
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2; main() adds "visiontune: error:"
        where = self.prog.removeprefix("visiontune").strip()
        raise UserError(f"{where + ': ' if where else ''}{message}{_did_you_mean(self, message)}")


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """For a mistyped flag: the closest flag any subcommand has ("--class-weigts" -> "--class-weights")."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    flags = set()

    def collect(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)

    collect(parser)
    typed = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("-")]
    close = [m for a in typed for m in difflib.get_close_matches(a, sorted(flags), n=1, cutoff=0.75)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _add_config_args(p: argparse.ArgumentParser, cls, skip: set[str] = frozenset(), positional: tuple[str, ...] = ()) -> None:
    """One flag per config field, documented with its default; flags left out do not appear in the namespace."""
    p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS, help="read settings from a YAML file; flags override it")
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in positional:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default not in (None, "", False) and "(default" not in help_text:
            help_text += f" (default: {f.default})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def _settings(args: argparse.Namespace, cls) -> dict:
    """The settings the user gave: ``--config`` file values (type-checked), then flags."""
    values = {}
    if getattr(args, "config", None):
        values.update(checked_types(load_yaml(args.config), cls, args.config))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def _config_from(args: argparse.Namespace, cls):
    return from_dict(cls, _settings(args, cls))


def _add_train(commands, help_text: str, cls, func) -> None:
    p = commands.add_parser("train", help=help_text)
    _add_config_args(p, cls)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=argparse.SUPPRESS,
        metavar="RUN",
        help="continue the run RUN (or the one in --out) from its last checkpoint",
    )
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visiontune", description="Fine-tune pretrained vision models on your own images.")
    parser.add_argument("--verbose", action="store_true", help="debug logging (and tracebacks)")
    tasks = parser.add_subparsers(dest="task", required=True, parser_class=_Parser)

    classify = tasks.add_parser("classify", help="image classification by transfer learning")
    csub = classify.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(csub, "fine-tune a classifier on class folders", ClassifyConfig, _classify_train)
    e = csub.add_parser("eval", help="accuracy, per-class metrics and confusion matrix of a trained run")
    e.add_argument("run", help="run directory or model.safetensors")
    e.add_argument("--data", required=True, help="class folders (or a DIR with val/)")
    e.add_argument("--labels", default=None, metavar="FILE", help="a multi-label model: the label file of the images in --data")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    _add_inference_args(e)
    e.set_defaults(func=_classify_eval)
    pr = csub.add_parser("predict", help="top-k labels for images, one JSON line each")
    pr.add_argument("run", help="run directory, model.safetensors, or an exported .onnx file")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--topk", type=int, default=3, help="labels per image (default: 3)")
    _add_inference_args(pr)
    pr.set_defaults(func=_classify_predict)
    cmp_ = csub.add_parser("compare", help="train every strategy under the same budget; table and plot")
    _add_config_args(cmp_, ClassifyConfig, skip={"strategy"})
    cmp_.set_defaults(func=_classify_compare)
    au = csub.add_parser("audit", help="likely label errors, near duplicates and train/val leakage (JSONL and an HTML page)")
    au.add_argument("--data", required=True, help="as for classify train: DIR with train/ and val/, class folders, or an index")
    au.add_argument("--val-data", default=None, help="validation class folders or index, when not DIR/val")
    au.add_argument("--model", default=ClassifyConfig.model, help=f"backbone that gives the features (default: {ClassifyConfig.model})")
    au.add_argument("--weights", default=None, help="weights file for --model (default: as classify train)")
    au.add_argument("--out", default=None, help="folder for the audit files (default: runs/audit-<data folder name>)")
    au.add_argument("--top", type=int, default=20, help="label suspects and duplicate pairs shown (default: 20)")
    au.add_argument("--folds", type=int, default=5, help="cross-validation folds of the label check (default: 5)")
    au.add_argument("--duplicate-threshold", type=float, default=None, help="near duplicates: cosine from this (default: 0.82)")
    _add_cache_arg(au)
    au.add_argument("--seed", type=int, default=0, help="seed of the folds (default: 0)")
    au.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    _add_engine_arg(au)
    au.set_defaults(func=_classify_audit)

    detect = tasks.add_parser("detect", help="object detection and instance segmentation (Mask/Faster R-CNN)")
    dsub = detect.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(dsub, "fine-tune a detector", DetectConfig, _detect_train)
    de = dsub.add_parser("eval", help="COCO bbox/segm AP of a trained run")
    de.add_argument("run")
    de.add_argument("--data", required=True)
    de.add_argument("--format", default=None, help="pennfudan or coco (default: the run's)")
    de.add_argument("--annotations", default=None, help="COCO JSON for --format coco")
    de.add_argument("--tta", default="none", choices=("none", "flip"), help="flip: detections of the image and its mirror, merged")
    _add_device_arg(de)
    de.set_defaults(func=_detect_eval)
    dp = dsub.add_parser("predict", help="COCO-results JSON and rendered PNGs")
    dp.add_argument("run", help="run directory, model.safetensors, or a .onnx file from visiontune export")
    dp.add_argument("inputs", nargs="+")
    dp.add_argument("--score-threshold", type=float, default=0.5, help="(default: 0.5)")
    dp.add_argument("--output", default=None, help="folder for predictions.json and PNGs (default: RUN/predict)")
    dp.add_argument("--tta", default="none", choices=("none", "flip"), help="flip: detections of the image and its mirror, merged")
    _add_device_arg(dp)
    dp.set_defaults(func=_detect_predict)

    ex = tasks.add_parser("export", help="export a trained model to ONNX or TorchScript")
    ex.add_argument("run")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: onnx)")
    ex.add_argument("--output", required=True, help="output file")
    ex.add_argument("--int8", action="store_true", help="ONNX: INT8 (static quantization, calibrated on the run's images)")
    ex.add_argument("--calibration-images", type=int, default=None, help="--int8: images to calibrate on (default: 200; detectors 50)")
    ex.add_argument("--max-drop", type=float, default=1.0, help="--int8: val accuracy/AP points it may lose, else exit 2 (default: 1)")
    ex.add_argument("--force", action="store_true", help="--int8: keep the file even past --max-drop")
    ex.set_defaults(func=_export)

    bench = tasks.add_parser("benchmark", help="a model's latency (classifiers: and throughput) on this CPU, per engine (JSON)")
    bench.add_argument("run", help="run directory, model.safetensors, or an exported .onnx file (fp32 or INT8)")
    bench.add_argument("--calls", type=int, default=100, help="single-image calls timed per engine (default: 100)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    bench.add_argument("--image", default=None, help="detectors: time them on this photo (default: noise, where they find little)")
    bench.set_defaults(func=_benchmark)
    return parser


def _classify_train(args):
    from .tasks.classify import fit

    _train(args, ClassifyConfig, fit)


def _train(args: argparse.Namespace, cls, fit) -> None:
    """A new run from the settings given, or with --resume the run in --out, which keeps its own settings: a flag given
    on the command line must agree with them, even one equal to the default (runs.resume_config)."""
    given = _settings(args, cls)
    resume = getattr(args, "resume", False)
    if isinstance(resume, str):  # --resume RUN
        if given.get("out") and Path(given["out"]) != Path(resume):
            raise UserError(f"--resume {resume}: and --out {given['out']}: name one run to continue")
        given["out"] = resume
    if resume and not given.get("out"):
        raise UserError("--resume: pass the run to continue: --resume RUN (or --out RUN --resume)")
    fit(from_dict(cls, given), resume=resume, given=given if resume else None)


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto, as training)")


def _add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="on the CPU: torch, onnxruntime, openvino, openvino-bf16, or auto: the fp32 engine measured fastest here for "
        "this model (default: auto)",
    )


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    """classify eval's and predict's --device, --engine, --cache-dir and --tta."""
    for add in (_add_device_arg, _add_engine_arg, _add_cache_arg, _add_tta_arg):
        add(parser)


def _add_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache folder (features, engine graphs and timings, shard listings), or none (default: as classify train)",
    )


def _add_tta_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta", default="none", choices=TTA, help="flip: mean of the image and its mirror; flip+crops: also 4 corner crops"
    )


def _classify_eval(args):
    from .inference.classify import evaluate

    settings = dict(
        skip_bad=args.skip_bad, device=args.device, engine=args.engine, tta=args.tta, labels=args.labels, cache_dir=args.cache_dir
    )
    m = evaluate(args.run, args.data, **settings)
    if "mAP" in m:
        print(f"mAP {m['mAP']:.4f}  F1 micro {m['f1_micro']:.4f}  macro {m['f1_macro']:.4f}", file=sys.stderr)
    else:
        print(f"accuracy {m['accuracy']:.4f} on {sum(v['support'] for v in m['per_class'].values())} images", file=sys.stderr)
    for name, v in m["per_class"].items():
        print(f"  {name:<20} precision {v['precision']:.3f}  recall {v['recall']:.3f}  f1 {v['f1']:.3f}  n={v['support']}", file=sys.stderr)
    print(json.dumps(m))


def _classify_predict(args):
    if args.topk < 1:
        raise UserError("--topk: must be at least 1")
    from .inference.classify import predict

    settings = dict(topk=args.topk, device=args.device, engine=args.engine, tta=args.tta, cache_dir=args.cache_dir)
    for r in predict(args.run, args.inputs, **settings):
        print(json.dumps(r))


def _classify_audit(args):
    from .audit import audit, describe

    result = audit(**{k: v for k, v in vars(args).items() if k not in ("task", "command", "func", "verbose")}, progress=sys.stderr.isatty())
    print(describe(result), file=sys.stderr)
    print(json.dumps(result["summary"]))


def _classify_compare(args):
    from .compare import compare

    compare(_config_from(args, ClassifyConfig))


def _detect_train(args):
    from .tasks.detect import fit

    _train(args, DetectConfig, fit)


def _detect_eval(args):
    from .inference.detect import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data, fmt=args.format, annotations=args.annotations, device=args.device, tta=args.tta)))


def _detect_predict(args):
    from .inference.detect import predict_run

    predict_run(args.run, args.inputs, score_threshold=args.score_threshold, output=args.output, device=args.device, tta=args.tta)


def _benchmark(args):
    if args.calls < 2:
        raise UserError("--calls: must be at least 2")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads: must be at least 1")
    from .benchmark import benchmark

    benchmark(args.run, args.calls, args.threads, args.image)


def _export(args):
    if args.int8:
        if args.format != "onnx":
            raise UserError("--int8: INT8 exports are ONNX files; use --format onnx")
        if args.calibration_images is not None and args.calibration_images < 1:
            raise UserError("--calibration-images: must be at least 1")
        from .quantize import export_int8

        export_int8(args.run, args.output, args.calibration_images, args.max_drop, args.force)
        return
    from .export import export

    export(args.run, args.format, args.output)


def main(argv: list[str] | None = None) -> int:
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    if not verbose:  # library warnings are for developers; a user's problem is one line (--verbose shows them)
        warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="visiontune: %(levelname)s: %(message)s")
    keep_freed_memory()  # every command's large tensors reused, not mapped anew
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        if verbose:
            raise
        print(f"visiontune: {'interrupted' if e.exit_code == 130 else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `visiontune classify predict ... | head`: the reader left, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
