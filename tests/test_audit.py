"""``classify audit``: planted label flips rank first, planted train/val copies come back as leakage, distinct images
never pair up; bad input is one line and exit 2; the tiled nearest-neighbour search equals the plain one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_class_folders, stable_seed, write_pretrained_weights
from PIL import Image, ImageDraw

from visiontune import audit as A
from visiontune.caches import default_cache_dir
from visiontune.cli import build_parser, main

FAST = ["--engine", "torch"]  # no engine probe or ONNX export: the features are the same function
# Drawn shapes sit closer together in an ImageNet network's features than photos do (nearest distinct neighbour up
# to ~0.87 here, against 0.80 on hymenoptera): these tests set their own threshold; bench/audit.py measures the default.
THRESHOLD = 0.95
TINY = dict(model="timm:test_efficientnet", weights="none", engine="torch", progress=False)  # random weights: mechanics only


def shape_image(path: Path, kind: str, seed: int, size: int = 96) -> Path:
    """Circles or triangles of random colours over a random striped or checked gradient."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(0, 256, (2, 3))
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    yy, xx = np.mgrid[:size, :size]
    period = int(rng.integers(4, 24))
    pattern = ((xx // period + yy // period) % 2) if rng.random() < 0.5 else ((xx + yy * rng.integers(0, 3)) // period) % 2
    a = (c0 * (1 - t) + c1 * t) * (0.75 + 0.25 * pattern[..., None])
    im = Image.fromarray(np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 4))):
        r = int(rng.integers(16, 34))
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if kind == "circles":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline="white", width=3)
        else:
            draw.polygon([(x - r, y + r), (x, y - r), (x + r, y + r)], fill=fill, outline="black", width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """15 train images a class (2 of them drawn as the other class: flipped labels) and 4 val; 2 val images copied into
    train under new names (leakage), and 1 train image copied inside train."""
    root = tmp_path_factory.mktemp("audit") / "shapes"
    kinds = ("circles", "triangles")
    for split, n in (("train", 15), ("val", 4)):
        for kind in kinds:
            for i in range(n):
                shape_image(root / split / kind / f"{kind}_{i}.png", kind, stable_seed(split, kind, i))
    flipped = [shape_image(root / "train" / kinds[1 - k] / f"flipped_{k}.png", kinds[k], stable_seed("flip", k)) for k in (0, 1)]
    copies = []
    for kind in kinds:
        original = root / "val" / kind / f"{kind}_0.png"
        copies.append((shutil.copy(original, root / "train" / kind / f"copy_of_val_{kind}.png"), original))
    inside = (
        shutil.copy(root / "train" / "circles" / "circles_1.png", root / "train" / "circles" / "again.png"),
        root / "train" / "circles" / "circles_1.png",
    )
    cache = str(root.parent / "cache")  # module-scoped: the per-test cache fixture is not there yet
    result = A.audit(
        str(root), out=str(root.parent / "audit"), duplicate_threshold=THRESHOLD, cache_dir=cache, engine="torch", progress=False
    )
    return root, [str(p) for p in flipped], [(str(a), str(b)) for a, b in copies], tuple(sorted(map(str, inside))), result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flipped_labels_are_the_top_suspects(planted):
    root, flipped, _, _, result = planted
    rows = read_jsonl(root.parent / "audit" / "label_issues.jsonl")
    assert len(rows) == 35 + 8 and [r["given_probability"] for r in rows] == sorted(r["given_probability"] for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    assert {r["path"] for r in train[:2]} == set(flipped), train[:4]
    assert all(r["suspect"] and r["predicted"] != r["given"] for r in train[:2])
    assert result["summary"]["label_suspects"]["train"] <= 4  # the two flips, and at most a couple of honest doubts


def test_train_val_copies_are_found_and_distinct_images_never_pair(planted):
    root, _, copies, inside, result = planted
    pairs = read_jsonl(root.parent / "audit" / "duplicates.jsonl")
    leaks, rest = pairs[:2], pairs[2:]  # train-val first
    assert {(p["path_a"], p["path_b"]) for p in leaks} == set(copies), pairs
    assert all(p["split_a"] == "train" and p["split_b"] == "val" and p["cosine"] > 0.999 for p in leaks)
    assert [(p["path_a"], p["path_b"], p["split_b"]) for p in rest] == [(*inside, "train")] and rest[0]["cosine"] > 0.999
    summary = json.loads((root.parent / "audit" / "audit.json").read_text())
    assert summary["duplicates"] == {"train-val": 2, "train-train": 1} and summary == result["summary"]
    page = (root.parent / "audit" / "audit.html").read_text()
    assert page.count('class="pair"') == 3 and page.count("data:image/jpeg;base64,") == 20 + 6
    assert "http" not in page.replace("http-equiv", "")  # self-contained


def test_cli_audit_prints_the_summary_and_reuses_the_features(planted, tmp_path, capsys, caplog):
    root = planted[0]
    argv = ["classify", "audit", "--data", str(root), "--out", str(tmp_path / "a"), "--duplicate-threshold", str(THRESHOLD), *FAST]
    argv += ["--cache-dir", str(root.parent / "cache")]
    with caplog.at_level("INFO", logger="visiontune"):
        assert main(argv) == 0  # the fixture's features, from the cache
    assert caplog.text.count("features from cache") == 2
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["label_suspects"]["train"] >= 2 and summary["duplicates"] == {"train-val": 2, "train-train": 1}
    assert "flipped_" in err and "2 train-val (leakage)" in err and "audit.html" in err
    assert main(argv + ["--top", "3"]) == 0  # an earlier audit's files are replaced
    assert json.loads(capsys.readouterr().out) == summary | {"seconds": json.loads((tmp_path / "a" / "audit.json").read_text())["seconds"]}


def test_help_states_the_default_threshold(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["classify", "audit", "--help"])
    assert f"(default: {A.DEFAULT_THRESHOLD})" in " ".join(capsys.readouterr().out.split())


def test_class_folders_without_val_and_too_many_folds(tmp_path, caplog):
    """Class folders alone audit their training images; --folds above the smallest class's count is lowered, said once."""
    data = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    with caplog.at_level("INFO", logger="visiontune"):
        s = A.audit(str(data), out=str(tmp_path / "a"), folds=5, **TINY)["summary"]
    assert (s["train_images"], s["val_images"], s["folds"], s["duplicates"]["train-val"]) == (6, 0, 3, 0)
    assert "using that many folds" in caplog.text


def test_the_default_cache_is_used(tmp_path, caplog):
    """No --cache-dir: the features go to the default cache ($VISIONTUNE_CACHE here) and come back from it."""
    data = make_class_folders(tmp_path / "data", per_class=3)
    tiny = TINY | {"weights": str(write_pretrained_weights(tmp_path / "w.safetensors"))}  # the same weights both times
    A.audit(str(data), out=str(tmp_path / "a"), **tiny)
    with caplog.at_level("INFO", logger="visiontune"):
        A.audit(str(data), out=str(tmp_path / "a"), **tiny)
    assert caplog.text.count(f"features from cache {default_cache_dir()}") == 2


def test_an_index_file_and_the_default_out_dir(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "data", per_class=3)
    rows = [f"{p.relative_to(data)},{p.parent.name},{p.parts[-3]}" for p in sorted(data.rglob("*.png"))]
    (data / "images.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    s = A.audit(str(data / "images.csv"), **TINY)["summary"]
    written = sorted(p.name for p in (tmp_path / "runs" / "audit-images").iterdir())  # named after the index file
    assert (s["train_images"], s["val_images"]) == (6, 6) and written == sorted(A.OUTPUTS)


def test_the_tiled_search_equals_the_plain_one(monkeypatch):
    monkeypatch.setattr(A, "BLOCK", 7)  # rows and columns both cross tile edges
    x = F.normalize(torch.randn(30, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    y = F.normalize(torch.randn(23, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    values, indices = A.nearest(x, y, 4)
    expected = (x @ y.T).topk(4, dim=1)
    assert torch.allclose(values, expected.values, atol=1e-6) and torch.equal(indices, expected.indices)
    sims = (x @ x.T).fill_diagonal_(-2)
    values, indices = A.nearest(x, x, 3, same=True)
    assert torch.allclose(values, sims.topk(3, dim=1).values, atol=1e-6) and (indices != torch.arange(30)[:, None]).all()


def bad_cases(t: Path) -> dict:
    data = make_class_folders(t / "data", per_class=3)
    (t / "empty").mkdir()
    (t / "taken").mkdir()
    (t / "taken" / "model.safetensors").write_text("an earlier run")
    broken = make_class_folders(t / "broken", per_class=3)
    (broken / "train" / "red" / "bad.png").write_bytes(b"not an image")
    return {
        "no data": (["--out", str(t / "o")], "--data"),
        "empty folder": (["--data", str(t / "empty")], "no class folders"),
        "folds": (["--data", str(data), "--folds", "1"], "--folds: must be at least 2"),
        "top": (["--data", str(data), "--top", "0"], "--top: must be at least 1"),
        "threshold": (["--data", str(data), "--duplicate-threshold", "1.5"], "--duplicate-threshold"),
        "bad image": (["--data", str(broken), "--out", str(t / "o")], "bad.png"),
        "out holds a run": (["--data", str(data), "--out", str(t / "taken")], "--out"),
    }


@pytest.mark.parametrize("case", ["no data", "empty folder", "folds", "top", "threshold", "bad image", "out holds a run"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    argv, expected = bad_cases(tmp_path)[case]
    assert main(["classify", "audit", *argv, "--model", "timm:test_efficientnet", "--weights", "none", *FAST]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visiontune: error: ") and expected in lines[0], lines
    assert not (tmp_path / "o").exists() and (tmp_path / "taken" / "model.safetensors").read_text() == "an earlier run"


def test_skip_bad_leaves_the_bad_image_out(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=3)
    (data / "train" / "red" / "bad.png").write_bytes(b"not an image")
    s = A.audit(str(data), out=str(tmp_path / "a"), skip_bad=True, **TINY)["summary"]
    assert s["train_images"] == 6 and "bad.png" not in (tmp_path / "a" / "label_issues.jsonl").read_text()
