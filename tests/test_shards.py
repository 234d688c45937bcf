"""WebDataset-style .tar shards as classification input: the same samples and the same run, bit for bit, as the same
images in class folders, read member by member (by DataLoader workers too), and every bad shard named in one line."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders

from visiontune import checkpoint as ckpt
from visiontune.cli import main
from visiontune.data import tar_members
from visiontune.data.images import load_rgb
from visiontune.data.shards import read_shards
from visiontune.data.splits import find_splits
from visiontune.errors import UserError
from visiontune.inference.classify import predict

TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--quiet", "--seed", "0", "--engine", "torch"]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def webdataset_shards(split: Path, out: Path, shards: int) -> str:
    """``split/<class>/<image>`` as ``shards`` shards of KEY.png + KEY.cls samples (keys keep the folder order);
    returns the brace pattern naming them."""
    images = sorted(p for p in split.rglob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(out / f"{split.name}-{s:03d}.tar", "w") as tar:
            for p in images[s::shards]:
                key = f"{p.parent.name}/{p.stem}"
                add(tar, f"{key}.png", p.read_bytes())
                add(tar, f"{key}.cls", p.parent.name.encode())
    return str(out / f"{split.name}-{{000..{shards - 1:03d}}}.tar")


def folder_shard(split: Path, out: Path) -> Path:
    """``tar cf out -C split .``: class folders inside one shard, no .cls members."""
    with tarfile.open(out, "w") as tar:
        tar.add(split, arcname=".")
    return out


def train(data, out: Path, *extra) -> dict:
    assert main(["classify", "train", "--data", str(data), "--out", str(out), *TINY, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    x, _ = ckpt.load_model_file(a / "model.safetensors")
    y, _ = ckpt.load_model_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_shards_list_the_samples_of_their_folders(tmp_path):
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=4)
    pattern = webdataset_shards(data / "train", tmp_path / "shards", 3)
    train, val = find_splits(pattern, val_data=folder_shard(data / "val", tmp_path / "val.tar"))
    folders, _ = find_splits(data)
    assert train.classes == val.classes == folders.classes == ["blue", "green", "red"]
    assert sorted((p.name, y) for p, y in train.items) == sorted((p.name, y) for p, y in folders.items)
    member = train.items[0][0]
    file = next(p for p, _ in folders.items if p.name == member.name)
    assert "train-000.tar/" in str(member) and np.array_equal(np.asarray(load_rgb(member)), np.asarray(load_rgb(file)))


def test_a_shard_is_listed_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """A later run reads a shard's saved listing (its headers are not read again); a rewritten shard or a damaged
    listing is listed again."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=4)
    pattern = webdataset_shards(data / "train", tmp_path / "shards", 2)
    first = read_shards(pattern)
    assert len(list((tmp_path / "cache" / "shards").glob("*.npz"))) == 2
    tar_members._TABLES.clear()  # as in a new process
    with monkeypatch.context() as m:
        m.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a shard was listed again"))
        again = read_shards(pattern)
        image = np.asarray(load_rgb(again.train[0][0]))  # members are found through the saved table
    assert again.train == first.train and again.classes == first.classes
    assert np.array_equal(image, np.asarray(load_rgb(data / "train" / again.classes[again.train[0][1]] / again.train[0][0].name)))

    shard = tmp_path / "shards" / "train-000.tar"
    with tarfile.open(shard, "a") as tar:  # one more sample: the shard's size and time change
        add(tar, "red/extra.png", (data / "train" / "red" / "red_0.png").read_bytes())
        add(tar, "red/extra.cls", b"red")
    grown = read_shards(pattern)
    assert len(grown.train) == len(first.train) + 1 and any(p.name == "extra.png" for p, _ in grown.train)
    for f in (tmp_path / "cache" / "shards").glob("*.npz"):
        f.write_bytes(b"not a listing")
    tar_members._TABLES.clear()
    assert read_shards(pattern).train == grown.train
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "a-file"))  # a cache folder that cannot be made: listed, not saved
    assert read_shards(pattern).train == grown.train  # (it raised NotADirectoryError when cleaning up the failed save)


def test_shard_listings_follow_the_cache_dir(tmp_path, monkeypatch):
    """Listings are saved in the run's --cache-dir, and nowhere under --cache-dir none (the default folder untouched)."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "default"))
    data = make_class_folders(tmp_path / "data", classes=("red", "blue"), per_class=4)
    pattern = webdataset_shards(data / "train", tmp_path / "shards", 2)
    train, _ = find_splits(pattern, val_split=0.25, cache_dir=tmp_path / "mine")
    assert len(list((tmp_path / "mine" / "shards").glob("*.npz"))) == 2 and not (tmp_path / "default").exists()
    tar_members._TABLES.clear()
    again, _ = find_splits(pattern, val_split=0.25, cache_dir="none")
    assert again.items == train.items and not (tmp_path / "default").exists()
    tar_members._TABLES.clear()
    with monkeypatch.context() as m:  # the saved listings of --cache-dir are read: no shard is listed again
        m.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a shard was listed again"))
        assert find_splits(pattern, val_split=0.25, cache_dir=tmp_path / "mine")[0].items == train.items
    main(
        ["classify", "train", "--data", pattern, "--val-split", "0.25", "--out", str(tmp_path / "run"), "--strategy", "linear"]
        + ["--epochs", "1", "--cache-dir", "none", *TINY]
    )
    assert not (tmp_path / "default").exists()


def test_a_linear_run_on_shards_is_the_run_on_their_folders(tmp_path, capsys):
    """Features of images read out of a shard: the same model, bit for bit, as from the class folders (one shard, so
    the training order, which follows paths, is the folders' too)."""
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=6)
    common = ["--strategy", "linear", "--epochs", "30", "--lr", "0.5"]
    folders = train(data, tmp_path / "folders", *common, "--cache-dir", str(tmp_path / "c1"))
    shards = webdataset_shards(data / "train", tmp_path / "shards", 1)
    val = folder_shard(data / "val", tmp_path / "val.tar")
    sharded = train(shards, tmp_path / "sharded", *common, "--val-data", str(val), "--cache-dir", str(tmp_path / "c2"))
    assert sharded["best_val_accuracy"] == folders["best_val_accuracy"] >= 0.9  # chance: 1/3
    assert same_weights(tmp_path / "folders", tmp_path / "sharded")
    capsys.readouterr()
    assert main(["classify", "eval", str(tmp_path / "sharded"), "--data", str(val)]) == 0  # eval reads shards too
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == sharded["final_val_accuracy"]
    on_files, on_shard = (predict(tmp_path / "sharded", [where]) for where in (data / "val", val))  # predict reads a shard's images
    assert [r["predictions"] for r in on_shard] == [r["predictions"] for r in on_files] and ".tar/" in on_shard[0]["path"]


def test_workers_stream_members_of_shards_as_they_stream_files(tmp_path):
    """Full fine-tuning with 2 DataLoader workers reading members (no image cache): the folder run's weights."""
    data = make_class_folders(tmp_path / "data", classes=("red", "blue"), per_class=20)
    common = ["--strategy", "full", "--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--cache-images", "none", "--workers", "2"]
    train(data, tmp_path / "folders", *common)
    shard = folder_shard(data / "train", tmp_path / "train.tar")
    train(shard, tmp_path / "sharded", *common, "--val-data", str(folder_shard(data / "val", tmp_path / "val.tar")))
    assert same_weights(tmp_path / "folders", tmp_path / "sharded")


def test_bad_shards_are_named_in_one_line(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=3)
    with pytest.raises(UserError, match=r"--data: .*nothing-\{0\.\.2\}\.tar: no shard file matches|nothing-0\.tar: no such shard file"):
        find_splits(str(tmp_path / "nothing-{0..2}.tar"), val_split=0.3)
    packed = folder_shard(data / "train", tmp_path / "train.tar")
    gz = tmp_path / "gz.tar"
    gz.write_bytes(gzip.compress(packed.read_bytes()))
    with pytest.raises(UserError, match=r"gz\.tar: not a plain tar file .*not compressed"):
        find_splits(gz, val_split=0.3)
    with tarfile.open(tmp_path / "nolabel.tar", "w") as tar:
        add(tar, "a.png", (data / "train" / "red" / "red_0.png").read_bytes())
    with pytest.raises(UserError, match=r"nolabel\.tar: a\.png has no label"):
        find_splits(tmp_path / "nolabel.tar", val_split=0.3)
    with pytest.raises(UserError, match=r"no validation split in the shards; pass --val-split"):
        find_splits(packed)
    # a member cut short: the shard lists, the image fails when read, named by its path inside the shard
    cut = tmp_path / "cut.tar"
    with tarfile.open(cut, "w") as tar:
        for p in sorted((data / "train").rglob("*.png")):
            add(tar, f"{p.parent.name}/{p.name}", p.read_bytes())
        add(tar, "red/broken.png", (data / "train" / "red" / "red_0.png").read_bytes()[:60])
    capsys.readouterr()
    args = ["--data", str(cut), "--val-data", str(data / "val"), "--out", str(tmp_path / "run"), "--strategy", "linear"]
    rc = main(["classify", "train", *args, *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cut.tar/red/broken.png" in err[0] and "Traceback" not in err[0], err
