"""Frozen passes on the engine measured faster (issue 17): prints one JSON object.

In one invocation, each runner in its own process, one after another:
- ``standalone``: images/s of the embedded EfficientNet-Lite0 base (no classifier), batch 32 at 224 px, on PyTorch
  eager fp32, bf16 autocast (where native) and ONNX Runtime fp32 (the graph visiontune writes), after warm-up.
- ``linear``: hymenoptera ``--strategy linear`` (default recipe) with a cold feature cache, per seed: this code with
  ``--engine auto`` (the engine's one-time graph and probe already made: a machine's first run also pays those, reported
  once as ``first_run``), the same with ``--engine onnxruntime``, ``torch`` and ``openvino-bf16`` (for their accuracy:
  under bf16, auto may choose the last), and the code at ``--baseline-ref`` (before engines existed).
  Wall seconds count from ``fit`` (after imports), as bench/classify.py does; feature-extraction images/s from metrics.json.
- ``predict``: ``visiontune.predict`` images/s on val/ (the median of five calls after a warm-up call), this code and
  the baseline's, each predicting with a run of its own ``linear`` (trained here when ``--parts predict`` skips those).

    python bench/frozen.py [--data ../shared/datasets/hymenoptera_data] [--seeds 3] [--baseline-ref f296d6e]
                           [--parts standalone,linear,predict]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def standalone(batches: int = 8) -> dict:
    import torch

    from visiontune.engine.frozen import GraphForward, TorchForward
    from visiontune.engine.runtime import use_bf16
    from visiontune.models.backbones import build_backbone

    base = build_backbone("efficientnet_lite0").module.eval()
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    engines = [TorchForward(base)] + [
        GraphForward("efficientnet_lite0", base, 224, None, e) for e in ("onnxruntime", "openvino", "openvino-bf16")
    ]
    if use_bf16("auto", torch.device("cpu")):
        engines.insert(1, TorchForward(base, bf16=True))
    result = {}
    for engine in engines:
        for _ in range(3):  # kernels, arenas, bf16's first calls
            engine(x)
        start = time.perf_counter()
        for _ in range(batches):
            engine(x)
        result[engine.name] = round(32 * batches / (time.perf_counter() - start), 1)
    return {"images_per_second": result, "threads": torch.get_num_threads()}


def linear(data: str, seed: int, cache: str, out: str, engine: str | None) -> dict:
    from visiontune.config import ClassifyConfig
    from visiontune.tasks.classify import fit

    for f in Path(cache).glob("*.safetensors"):  # cold features; the engine's graph and probe stay
        f.unlink()
    settings = dict(data=data, out=out, strategy="linear", seed=seed, quiet=True, overwrite=True, cache_dir=cache)
    start = time.perf_counter()
    m = fit(ClassifyConfig(**settings, **({"engine": engine} if engine else {})))
    wall = time.perf_counter() - start
    return {
        "wall_seconds": round(wall, 2),
        "best_val_accuracy": m["best_val_accuracy"],
        "feature_extraction": m.get("feature_extraction", {"engine": "torch (before engines)"}),
    }


def predict(run: str, images: str) -> dict:
    from visiontune.data.images import expand_inputs
    from visiontune.inference.classify import predict as predict_images

    paths = expand_inputs([images])
    predict_images(run, paths[:1])  # warm-up (and, on this code, the run's graph written once)
    calls = []
    for _ in range(5):  # the median of five calls: one call of ~1 s moves by 10% on these machines
        start = time.perf_counter()
        predict_images(run, paths)
        calls.append(round(time.perf_counter() - start, 3))
    seconds = statistics.median(calls)
    return {"images": len(paths), "seconds": calls, "images_per_second": round(len(paths) / seconds, 1)}


def child(args) -> None:
    if args.child == "standalone":
        res = standalone()
    elif args.child == "linear":
        res = linear(args.data, args.seed, args.cache, args.out, args.engine or None)
    else:
        res = predict(args.out, str(Path(args.data) / "val"))
    print(json.dumps(res))


def spawn(code: Path, kind: str, **kw) -> dict:
    """One runner in a fresh process, importing visiontune from ``code`` (this tree or the baseline's)."""
    cmd = [sys.executable, __file__, "--child", kind] + [f"--{k}={v}" for k, v in kw.items()]
    env = dict(os.environ, PYTHONPATH=str(code))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"[bench] {kind} {kw.get('engine', '')} {code.name}: {json.dumps(res)[:160]}", file=sys.stderr, flush=True)
    return res


def mean(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r]
    return round(statistics.mean(values), 3) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--baseline-ref", default="f296d6e", help="git commit of the code before engines (default: f296d6e)")
    ap.add_argument("--parts", default="standalone,linear,predict", help="which measurements (default: all three)")
    for hidden in ("child", "cache", "out", "engine"):
        ap.add_argument(f"--{hidden}", default="", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    tmp = Path(tempfile.mkdtemp(prefix="vt-frozen-"))
    baseline = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline_ref], cwd=REPO, check=True)
    try:
        load_start = [round(x, 2) for x in os.getloadavg()]
        report = {"benchmark": "frozen", "data": args.data, "baseline_ref": args.baseline_ref, "parts": args.parts}
        parts, data, ratios = set(args.parts.split(",")), str(Path(args.data).resolve()), {}
        if "standalone" in parts:
            report["standalone"] = spawn(REPO, "standalone")
        if "linear" in parts:
            report["first_run"] = spawn(REPO, "linear", data=data, seed=0, cache=tmp / "c-auto", out=tmp / "first", engine="auto")
            ratios.update(linear_runs(report, data, args.seeds, tmp, baseline))
        elif "predict" in parts:  # a run of each code to predict with
            for name, code, engine in (("auto", REPO, "auto"), ("baseline", baseline, "")):
                spawn(code, "linear", data=data, seed=0, cache=tmp / f"c-{name}", out=tmp / f"run-{name}", engine=engine)
        if "predict" in parts:
            report["predict"] = {
                "auto": spawn(REPO, "predict", data=data, out=tmp / "run-auto"),
                "baseline": spawn(baseline, "predict", data=data, out=tmp / "run-baseline"),
            }
            ratios["predict auto/baseline images/s"] = _ratio(
                report["predict"]["auto"].get("images_per_second"), report["predict"]["baseline"].get("images_per_second")
            )
        report["ratios"] = ratios
        report["load_average"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(report, indent=1))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO)
        shutil.rmtree(tmp, ignore_errors=True)


def linear_runs(report: dict, data: str, seeds: int, tmp: Path, baseline: Path) -> dict:
    """Each engine's and the baseline's ``linear`` per seed, into ``report``; their ratios."""
    engines = ("auto", "onnxruntime", "torch", "openvino-bf16")
    variants = tuple((e, REPO, e) for e in engines) + (("baseline", baseline, ""),)
    runs = {name: [] for name, _, _ in variants}
    for seed in range(seeds):  # interleaved, so drifting machine speed hits all alike
        for name, code, engine in variants:
            kw = dict(data=data, seed=seed, cache=tmp / f"c-{name}", out=tmp / f"run-{name}", engine=engine)
            runs[name].append(spawn(code, "linear", **kw))
    report["linear"] = {
        n: {"wall_seconds": mean(r, "wall_seconds"), "best_val_accuracy": mean(r, "best_val_accuracy"), "runs": r} for n, r in runs.items()
    }
    chosen = report["linear"]["auto"]["runs"][0].get("feature_extraction", {}).get("engine")
    alone = report.get("standalone", {}).get("images_per_second", {}).get(chosen)
    inside = [r["feature_extraction"]["train"]["images_per_second"] for r in runs["auto"] if "train" in r.get("feature_extraction", {})]
    return {
        "linear_auto/baseline wall": _ratio(report["linear"]["auto"]["wall_seconds"], report["linear"]["baseline"]["wall_seconds"]),
        "linear_auto/torch wall": _ratio(report["linear"]["auto"]["wall_seconds"], report["linear"]["torch"]["wall_seconds"]),
        f"extraction inside linear / standalone {chosen}": _ratio(statistics.mean(inside), alone) if inside else None,
    }


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


if __name__ == "__main__":
    main()
