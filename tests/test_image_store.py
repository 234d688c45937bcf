"""--cache-images disk: decoded images stored once, read back as the same pixels; never a partial or stale store."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import make_class_folders
from test_streaming import TINY, train

from visiontune import checkpoint as ckpt
from visiontune.data import classification as C
from visiontune.data import image_store
from visiontune.data.classification import open_images
from visiontune.data.splits import scan_folder
from visiontune.data.transforms import classification_eval
from visiontune.errors import UserError

TF = classification_eval(32, 40, (0.5,) * 3, (0.5,) * 3)


def stores(cache):
    return sorted(d for d in (cache / "images").iterdir() if d.is_dir() and not d.name.startswith("."))


def test_a_disk_cached_run_equals_the_in_ram_run_and_the_next_run_decodes_nothing(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "data", classes=("red", "blue", "green"), per_class=20)
    common = ["--strategy", "full", "--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--cache-dir", str(tmp_path / "c")]
    ram = train(data, tmp_path / "ram", *common, "--cache-images", "ram")
    disk = train(data, tmp_path / "disk", *common, "--cache-images", "disk")
    assert len(stores(tmp_path / "c")) == 2  # train and val
    monkeypatch.setattr(C, "load_downsized", lambda *a, **k: pytest.fail("decoded although the image cache had the pixels"))
    again = train(data, tmp_path / "again", *common, "--cache-images", "disk")
    assert ram["best_val_accuracy"] == disk["best_val_accuracy"] == again["best_val_accuracy"]
    assert [m["image_loading"]["cache"] for m in (ram, disk, again)] == ["ram", "disk", "disk"]
    weights = [ckpt.load_model_file(tmp_path / r / "model.safetensors")[0] for r in ("ram", "disk", "again")]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


def test_stored_pixels_are_the_decoded_pixels(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    ram, _ = open_images(scan_folder(root), 40, TF, "ram", progress=False)
    disk, _ = open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    read_back, _ = open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    assert isinstance(read_back.images, image_store.ImageStore) and len(read_back) == 6
    assert all(torch.equal(ram.decoded(i), disk.decoded(i)) and torch.equal(ram.decoded(i), read_back.decoded(i)) for i in range(6))


def test_a_build_killed_midway_is_never_read_and_is_cleaned_up(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    samples = scan_folder(root)
    key = image_store.store_key(samples.items, 40)
    writer = image_store.StoreWriter(tmp_path / "c", key)  # as a process SIGKILLed before commit leaves it
    writer.add(torch.zeros(3, 40, 48, dtype=torch.uint8))
    writer.file.close()
    dead = writer.tmp.with_name(writer.tmp.name.rsplit("-", 1)[0] + "-999999999")
    writer.tmp.rename(dead)
    ds, _ = open_images(samples, 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    assert not dead.exists() and len(stores(tmp_path / "c")) == 1
    assert not torch.equal(ds.decoded(0), torch.zeros(3, 40, 48, dtype=torch.uint8))


def test_a_damaged_or_outdated_store_is_built_again(tmp_path, caplog):
    root = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    first, _ = open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    expected = [first.decoded(i) for i in range(len(first))]
    (store,) = stores(tmp_path / "c")
    shard = store / "pixels-000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        again, _ = open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    assert "is damaged (pixels-000.bin)" in caplog.text
    assert all(torch.equal(again.decoded(i), e) for i, e in enumerate(expected))
    st = os.stat(first.paths[0])  # a file changed: another key, another store
    os.utime(first.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    assert len(stores(tmp_path / "c")) == 2


def test_the_cache_folder_stays_under_its_bound(tmp_path, monkeypatch, caplog):
    root = make_class_folders(tmp_path / "data", per_class=3) / "train"
    other = make_class_folders(tmp_path / "other", classes=("green", "blue"), per_class=3) / "train"
    open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    (first,) = stores(tmp_path / "c")
    one = sum(f.stat().st_size for f in first.iterdir())
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE_GB", str(1.5 * one / (1 << 30)))  # room for one store, not two
    open_images(scan_folder(other), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    (kept,) = stores(tmp_path / "c")
    assert kept != first  # the least recently used went
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE_GB", "0.000001")  # a set larger than the bound is not stored at all
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        ds, _ = open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    assert not ds.predecoded and "exceed the image cache bound" in caplog.text


def test_bad_files_are_remembered_and_still_refused_without_skip_bad(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    (root / "red" / "broken.png").write_bytes(b"not a png")
    ds, bad = open_images(scan_folder(root), 40, TF, "disk", skip_bad=True, progress=False, cache_dir=tmp_path / "c")
    assert len(ds) == 6 and len(bad) == 1 and "broken.png" in bad[0]
    again, bad_again = open_images(scan_folder(root), 40, TF, "disk", skip_bad=True, progress=False, cache_dir=tmp_path / "c")
    assert len(again) == 6 and bad_again == bad
    with pytest.raises(UserError, match=r"broken\.png.*pass --skip-bad"):
        open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")


def test_disk_cache_without_a_cache_folder_is_one_line(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data")
    rc = train_rc(data, tmp_path / "run", "--cache-images", "disk", "--cache-dir", "none")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["visiontune: error: --cache-images disk: needs a cache folder, and --cache-dir is none"], err
    assert not (tmp_path / "run").exists()


def train_rc(data, out, *extra) -> int:
    from visiontune.cli import main

    return main(["classify", "train", "--data", str(data), "--out", str(out), *TINY, *extra])


def test_meta_names_its_key(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=2, splits=("train",)) / "train"
    open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
    (store,) = stores(tmp_path / "c")
    meta = json.loads((store / "meta.json").read_text())
    assert meta["key"]["short_side"] == 40 and meta["count"] == 4 and meta["key"]["files"]["count"] == 4


def test_auto_stores_what_ram_cannot_hold_and_streams_without_a_cache_folder(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    small, _ = open_images(scan_folder(root), 40, TF, "auto", progress=False, cache_dir=tmp_path / "c")
    monkeypatch.setattr(C, "RAM_BUDGET_BYTES", 0)
    large, _ = open_images(scan_folder(root), 40, TF, "auto", progress=False, cache_dir=tmp_path / "c")
    no_folder, _ = open_images(scan_folder(root), 40, TF, "auto", progress=False, cache_dir=None)
    assert (small.cache, large.cache, no_folder.cache) == ("ram", "disk", "none")


def test_processes_building_the_same_store_decode_each_image_once(tmp_path, monkeypatch):
    """As torchrun's processes on one machine do: one builds under the lock, the other waits and reads its store."""
    import threading

    root = make_class_folders(tmp_path / "data", per_class=4, splits=("train",)) / "train"
    decoded, real = [], C.load_downsized
    monkeypatch.setattr(C, "load_downsized", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    results = []

    def build():
        ds, _ = open_images(scan_folder(root), 40, TF, "disk", progress=False, cache_dir=tmp_path / "c")
        results.append(ds)

    threads = [threading.Thread(target=build) for _ in range(2)]  # flock is per open file: threads contend like processes
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len(decoded) == 8 == len(set(decoded))
    assert all(torch.equal(results[0].decoded(i), results[1].decoded(i)) for i in range(8))
    assert len(stores(tmp_path / "c")) == 1
