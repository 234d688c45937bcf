"""A CSV or JSONL index (path,label[,split] rows) as classification input: the same samples, classes and run as the
same images laid out as class folders, and every bad row named with its line."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders, make_image

from visiontune import checkpoint as ckpt
from visiontune.cli import main
from visiontune.config import ClassifyConfig
from visiontune.data.splits import find_splits, scan_folder
from visiontune.errors import UserError
from visiontune.tasks.classify import fit


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def index_of_folders(data: Path, index: Path) -> Path:
    """A CSV naming every image of ``data/{train,val}/<class>`` (relative to the index: ../data/...), rows shuffled."""
    rows = [f"{os.path.relpath(p, index.parent)},{p.parent.name},{p.parent.parent.name}" for p in sorted(data.rglob("*.png"))]
    random.Random(1).shuffle(rows)
    return write_csv(index, "path,label,split", rows)


@pytest.fixture
def images(tmp_path) -> Path:
    """Flat folder of JPEGs and PNGs: cat_0..3, dog_0..3, owl_0..3."""
    root = tmp_path / "images"
    for i, (name, color) in enumerate([("cat", (200, 40, 40)), ("dog", (40, 40, 200)), ("owl", (40, 200, 40))]):
        for j in range(4):
            make_image(root / f"{name}_{j}.{'jpg' if j % 2 else 'png'}", color, seed=10 * i + j)
    return root


def test_csv_with_a_split_column_gives_its_samples_and_sorted_classes(images, tmp_path):
    """Relative paths (to the index's folder) and absolute ones; classes sorted, rows ordered by path."""
    rows = [
        f"images/{n}_{j}.{'jpg' if j % 2 else 'png'},{n},{'val' if j == 3 else 'train'}" for n in ("owl", "cat", "dog") for j in range(4)
    ]
    rows[0] = f"{images / 'owl_0.png'},owl,train"  # absolute
    index = write_csv(tmp_path / "index.csv", "path,label,split", rows)
    train, val = find_splits(index)
    assert train.classes == val.classes == ["cat", "dog", "owl"]
    assert [(p.name, train.classes[y]) for p, y in train.items] == [
        (f"{n}_{j}.{'jpg' if j % 2 else 'png'}", n) for n in ("cat", "dog", "owl") for j in range(3)
    ]
    assert [(p.name, y) for p, y in val.items] == [("cat_3.jpg", 0), ("dog_3.jpg", 1), ("owl_3.jpg", 2)]
    assert all(p.is_file() for p, _ in train.items + val.items)
    assert train.counts() == {"cat": 3, "dog": 3, "owl": 3}


def test_jsonl_reads_as_the_csv_does(images, tmp_path):
    """One object per line; blank lines skipped; a class number as the label is its name."""
    objs = [
        {"path": f"../images/{n}_{j}.{'jpg' if j % 2 else 'png'}", "label": n, "split": "val" if j == 0 else "train"}
        for n in ("cat", "dog")
        for j in range(4)
    ]
    index = write_jsonl(tmp_path / "lists" / "index.jsonl", objs)
    index.write_text(index.read_text() + "\n" + json.dumps({"path": str(images / "owl_0.png"), "label": "owl", "split": "train"}) + "\n")
    csv = write_csv(
        tmp_path / "lists" / "index.csv",
        "path,label,split",
        [f"{o['path']},{o['label']},{o['split']}" for o in objs] + [f"{images / 'owl_0.png'},owl,train"],
    )
    assert find_splits(index) == find_splits(csv)
    train, val = find_splits(index)
    assert train.classes == ["cat", "dog", "owl"] and len(train) == 7 and len(val) == 2

    numbered = write_jsonl(
        tmp_path / "numbered.jsonl", [{"path": f"images/cat_{j}.{'jpg' if j % 2 else 'png'}", "label": 7 + j % 2} for j in range(4)]
    )
    train, val = find_splits(numbered, val_split=0.5, seed=0)
    assert train.classes == ["7", "8"] and len(train) == len(val) == 2


def test_val_split_of_an_index_is_the_folders_split(tmp_path):
    """Without a split column, --val-split holds out the same images, seeded and stratified, as it does from folders."""
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=7, splits=("",))
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    random.Random(0).shuffle(rows)
    index = write_csv(tmp_path / "index.csv", "path,label", rows)
    for seed in (0, 5):
        assert find_splits(index, val_split=0.3, seed=seed) == find_splits(data, val_split=0.3, seed=seed)
    assert find_splits(index, val_split=0.3, seed=0) != find_splits(index, val_split=0.3, seed=5)
    with pytest.raises(UserError, match="has no split column; pass --val-split"):
        find_splits(index)


def test_val_data_may_be_an_index_or_folders(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=3)
    train_index = write_csv(
        tmp_path / "train.csv", "path,label", [f"data/train/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(3)]
    )
    val_index = write_csv(tmp_path / "val.csv", "path,label", [f"data/val/red/red_{i}.png,red" for i in range(3)])
    train, val = find_splits(train_index, val_data=val_index)
    assert train == scan_folder(data / "train") and val.classes == ["blue", "red"] and [y for _, y in val.items] == [1, 1, 1]
    assert find_splits(train_index, val_data=data / "val") == find_splits(data)
    assert find_splits(data / "train", val_data=val_index)[1] == val  # folders for training, an index to validate
    write_csv(val_index, "path,label", ["data/val/red/red_0.png,green"])
    with pytest.raises(UserError, match=r"val.csv, line 2: label 'green' is not a class of --data"):
        find_splits(train_index, val_data=val_index)
    write_csv(val_index, "path,label,split", ["data/val/red/red_0.png,red,val"])
    with pytest.raises(UserError, match="has a split column"):
        find_splits(train_index, val_data=val_index)


@pytest.mark.parametrize(
    "header, rows, message",
    [
        ("path,label", ["a.png,cat", "gone.png,dog"], r"index.csv, line 3: .*gone.png: no such file"),
        ("path,label", ["a.png,cat", "b.png,"], r"index.csv, line 3: empty label"),
        ("path,label", ["a.png,cat", "b.png"], r"index.csv, line 3: empty label"),
        ("path,label", ["a.png,cat", ",dog"], r"index.csv, line 3: empty path"),
        ("path,class", ["a.png,cat"], r"index.csv, line 1: no 'label' column in the header row \(path,class\)"),
        ("a.png,cat", ["b.png,dog"], r"no 'path' column"),
        ("path,label,split", ["a.png,cat,train", "b.png,dog,test"], r"index.csv, line 3: split 'test' is not one of train, val"),
        ("path,label", ["a.png,cat", "b.png,dog,extra"], r"index.csv, line 3: more fields than the header row's 2"),
        ("path,label", ["a.png,cat", "b.png,dog", "./a.png,owl"], r"index.csv, lines 2 and 4: the same image twice \(.*a.png\)"),
        ("path,label", ["a.png,cat", "sub,dog"], r"index.csv, line 3: .*sub: not a file"),
        ("path,label", ["a.png,cat", "b.png,cat"], r"only one class \(cat\)"),
        ("path,label,split", ["a.png,cat,train", "b.png,dog,val"], r"class 'dog' has no training rows"),
        ("path,label", [], r"no training rows"),
    ],
)
def test_a_bad_csv_row_is_named_with_its_line(tmp_path, header, rows, message):
    make_image(tmp_path / "a.png", (200, 0, 0))
    make_image(tmp_path / "b.png", (0, 0, 200))
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=message):
        find_splits(write_csv(tmp_path / "index.csv", header, rows), val_split=0.5)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"index.csv: empty; expected a header row"),
        (b"path,label\na.png,cat\nb.png,d\xe9og\n", r"index.csv: not UTF-8 text"),
        (b"path,label\na.png,cat\nb.png," + b"x" * 200_000 + b"\n", r"index.csv, line 3: not valid CSV \(field larger"),
        (b"\xef\xbb\xbfpath,label\na.png,cat\nb.png,dog\n", None),  # a byte-order mark (Excel's UTF-8) is no header
    ],
)
def test_an_unreadable_index_file_is_one_error(tmp_path, content, message):
    make_image(tmp_path / "a.png", (200, 0, 0))
    make_image(tmp_path / "b.png", (0, 0, 200))
    (tmp_path / "index.csv").write_bytes(content)
    if message is None:
        assert find_splits(tmp_path / "index.csv", val_data=tmp_path / "index.csv")[0].classes == ["cat", "dog"]
        return
    with pytest.raises(UserError, match=message):
        find_splits(tmp_path / "index.csv", val_split=0.5)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"path": "a.png", "label": "cat"}', "{not json"], r"index.jsonl, line 2: not JSON"),
        (['{"path": "a.png", "label": "cat"}', '["b.png", "dog"]'], r"line 2: expected a JSON object"),
        (['{"path": "a.png", "label": "cat"}', '{"path": "b.png"}'], r"line 2: no 'label' key"),
        (['{"path": "a.png", "label": "cat"}', '{"path": "b.png", "label": ["dog"]}'], r"line 2: label is not text"),
        (
            ['{"path": "a.png", "label": "cat", "split": "train"}', '{"path": "b.png", "label": "dog"}'],
            r"line 2: 'split' is on some rows only",
        ),
    ],
)
def test_a_bad_jsonl_line_is_named(tmp_path, lines, message):
    make_image(tmp_path / "a.png", (200, 0, 0))
    make_image(tmp_path / "b.png", (0, 0, 200))
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        find_splits(tmp_path / "index.jsonl", val_split=0.5)


def test_a_split_column_without_val_rows_asks_for_a_validation_set(images, tmp_path):
    index = write_csv(tmp_path / "index.csv", "path,label,split", ["images/cat_0.png,cat,train", "images/dog_0.png,dog,train"])
    with pytest.raises(UserError, match="has no rows with split val; pass --val-split"):
        find_splits(index)


def test_a_missing_index_is_named_as_a_file(tmp_path):
    with pytest.raises(UserError, match=r"--data: .*nowhere.csv: no such file"):
        find_splits(tmp_path / "nowhere.csv")
    with pytest.raises(UserError, match=r"--val-data: .*nowhere.jsonl: no such file"):
        find_splits(make_class_folders(tmp_path / "data", per_class=2), val_data=tmp_path / "nowhere.jsonl")


def test_training_on_an_index_is_training_on_its_folders(tmp_path):
    """The same images as folders and as a shuffled CSV with a split column, the same seed: the same run, bit for bit
    (each with its own feature cache, so neither reuses the other's features)."""
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=6)
    index = index_of_folders(data, tmp_path / "lists" / "index.csv")
    # one engine for both: with two caches, "auto" times the engines twice and may choose differently (features equal to 1e-6)
    common = dict(model="timm:test_efficientnet", weights="none", image_size=64, epochs=30, lr=0.5, quiet=True, seed=0, engine="torch")
    folders = fit(ClassifyConfig(data=str(data), out=str(tmp_path / "folders"), cache_dir=str(tmp_path / "cache1"), **common))
    indexed = fit(ClassifyConfig(data=str(index), out=str(tmp_path / "indexed"), cache_dir=str(tmp_path / "cache2"), **common))
    assert indexed["best_val_accuracy"] == folders["best_val_accuracy"] >= 0.9  # chance: 1/3
    a, meta_a = ckpt.load_model_file(tmp_path / "folders" / "model.safetensors")
    b, meta_b = ckpt.load_model_file(tmp_path / "indexed" / "model.safetensors")
    assert meta_a["classes"] == meta_b["classes"] == ["blue", "green", "red"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_relabeling_an_index_is_not_answered_from_the_feature_cache(tmp_path):
    """The same files with other labels: a class folder cannot do that (moving a file changes its path), an index can.
    A run on the relabeled index must learn its labels, not the ones cached with the features of the first run."""
    data = make_class_folders(tmp_path / "data", per_class=6)
    first = index_of_folders(data, tmp_path / "first.csv")
    swapped = {"red": "blue", "blue": "red"}
    rows = [line.split(",") for line in first.read_text().splitlines()[1:]]
    relabeled = write_csv(
        tmp_path / "relabeled.csv", "path,label,split", [f"{p},{swapped[c] if s == 'train' else c},{s}" for p, c, s in rows]
    )
    common = dict(model="timm:test_efficientnet", weights="none", image_size=64, epochs=30, lr=0.5, quiet=True, seed=0)
    fit(ClassifyConfig(data=str(first), out=str(tmp_path / "first"), cache_dir=str(tmp_path / "cache"), **common))
    shared = fit(ClassifyConfig(data=str(relabeled), out=str(tmp_path / "shared"), cache_dir=str(tmp_path / "cache"), **common))
    fresh = fit(ClassifyConfig(data=str(relabeled), out=str(tmp_path / "fresh"), cache_dir=str(tmp_path / "cache2"), **common))
    assert shared["final_val_accuracy"] == fresh["final_val_accuracy"]


def test_eval_reads_an_index_and_takes_its_val_rows(tmp_path):
    """`classify eval RUN --data INDEX` scores the rows of split val, as training validated on them."""
    data = make_class_folders(tmp_path / "data", per_class=4)
    rows = ["path,label,split"] + [f"{p.relative_to(data)},{p.parent.name},{p.parts[-3]}" for p in sorted(data.rglob("*.png"))]
    (data / "index.csv").write_text("\n".join(rows) + "\n")
    common = ["--image-size", "64", "--epochs", "3", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main(["classify", "train", "--data", str(data / "index.csv"), "--out", str(tmp_path / "run"), *common]) == 0
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    from visiontune.inference.classify import evaluate

    scored = evaluate(tmp_path / "run", data / "index.csv")
    assert sum(v["support"] for v in scored["per_class"].values()) == 8  # the val rows only
    assert scored["accuracy"] == trained["final_val_accuracy"]
