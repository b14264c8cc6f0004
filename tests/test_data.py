"""Data: checksums accept the real files and reject damaged ones without leaving partial
files; `make data` twice only verifies; splits are disjoint, seeded, and binarized right."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.data import (
    DATASETS,
    DataError,
    fetch,
    install_file,
    load_splits,
    raw_dir,
    sha256_of,
    verify_present,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_real_files_verify(data_root, dataset):
    assert verify_present(data_root, dataset)
    for name, expected in DATASETS[dataset]["files"].items():
        assert sha256_of(raw_dir(data_root, dataset) / name) == expected


def _copy_dataset(src_root: Path, dst_root: Path, dataset: str) -> Path:
    dst = raw_dir(dst_root, dataset)
    dst.mkdir(parents=True)
    for name in DATASETS[dataset]["files"]:
        shutil.copy(raw_dir(src_root, dataset) / name, dst / name)
    return dst


def _flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
def test_damaged_present_file_is_one_clear_error(data_root, tmp_path, damage):
    folder = _copy_dataset(data_root, tmp_path, "mnist")
    target = folder / "t10k-labels-idx1-ubyte"
    damage(target)
    found = sha256_of(target)
    with pytest.raises(DataError) as err:
        fetch("mnist", tmp_path, sources=[], log=lambda *_: None)
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert DATASETS["mnist"]["files"]["t10k-labels-idx1-ubyte"] in message
    assert found in message and "make data" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
@pytest.mark.parametrize("compressed", [False, True], ids=["idx", "gz"])
def test_damaged_source_leaves_no_partial_file(data_root, tmp_path, damage, compressed):
    name = "train-labels-idx1-ubyte"
    source = tmp_path / "src" / name
    source.parent.mkdir()
    shutil.copy(raw_dir(data_root, "fashion") / name, source)
    damage(source)
    if compressed:
        gz = source.with_name(name + ".gz")
        gz.write_bytes(gzip.compress(source.read_bytes()))
        source.unlink()
        source = gz
    dest = tmp_path / "root" / "FashionMNIST" / "raw" / name
    with pytest.raises(DataError) as err:
        install_file(source, dest, DATASETS["fashion"]["files"][name])
    assert name in str(err.value)
    assert list(dest.parent.iterdir()) == []  # neither the file nor its temporary name


def test_truncated_gzip_source_is_clear_error(data_root, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    gz = tmp_path / (name + ".gz")
    blob = gzip.compress((raw_dir(data_root, "mnist") / name).read_bytes())
    gz.write_bytes(blob[: len(blob) // 2])
    dest = tmp_path / "out" / name
    with pytest.raises(DataError, match="truncated or damaged"):
        install_file(gz, dest, DATASETS["mnist"]["files"][name])
    assert list(dest.parent.iterdir()) == []


def test_source_is_installed_from_gz_and_verified(data_root, tmp_path):
    """The registry path: gzipped idx files (Debian layout) land verified, nothing left over."""
    src = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    src.mkdir(parents=True)
    for name in DATASETS["fashion"]["files"]:
        (src / (name + ".gz")).write_bytes(
            gzip.compress((raw_dir(data_root, "fashion") / name).read_bytes(), compresslevel=1)
        )
    messages = []
    root = tmp_path / "root"
    fetch("fashion", root, sources=[("local copy", lambda ds, work: src)], log=messages.append)
    assert verify_present(root, "fashion")
    assert any("fetched and verified from local copy" in m for m in messages)
    assert sorted(p.name for p in root.iterdir()) == ["FashionMNIST"]  # no temp folders left


def test_no_source_lists_every_answer(tmp_path):
    def refuses(dataset, work):
        raise ConnectionError("no route to host")

    def empty(dataset, work):
        return work

    with pytest.raises(DataError) as err:
        fetch("mnist", tmp_path, sources=[("first", refuses), ("second", empty)],
              log=lambda *_: None)
    message = str(err.value)
    assert "first: no route to host" in message
    assert "second: the download lacks" in message
    assert not raw_dir(tmp_path, "mnist").exists() or not any(raw_dir(tmp_path, "mnist").iterdir())


def test_second_make_data_only_verifies(data_root):
    before = {p: p.stat().st_mtime_ns for p in data_root.rglob("*-ubyte")}
    proc = subprocess.run(
        [sys.executable, "-m", "study.data", "--root", str(data_root)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already present and verified") == len(DATASETS)
    assert "trying" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in data_root.rglob("*-ubyte")} == before


def test_cli_corrupt_file_exits_2(data_root, tmp_path):
    folder = _copy_dataset(data_root, tmp_path, "mnist")
    _flip_byte(folder / "train-images-idx3-ubyte", offset=5000)
    proc = subprocess.run(
        [sys.executable, "-m", "study.data", "--root", str(tmp_path), "mnist"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte is corrupt" in lines[0]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_splits_shapes_dtype_range(data_root, dataset):
    splits = load_splits(dataset, data_root, val_size=5000, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55_000, 5_000, 10_000)
    assert splits.image_shape == (1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    x = splits.val.served()
    assert x.dtype == torch.float32 and x.shape == (5000, 1, 28, 28)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert splits.train.labels.dtype == torch.int64
    assert set(splits.test.labels.unique().tolist()) == set(range(10))


def _digests(split) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in split.images}


def test_validation_is_disjoint_and_seeded(data_root):
    a = load_splits("mnist", data_root, val_size=2000, seed=3)
    b = load_splits("mnist", data_root, val_size=2000, seed=3)
    c = load_splits("mnist", data_root, val_size=2000, seed=4)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)
    # disjoint by index: validation + train together are a permutation of the official split
    official = load_splits("mnist", data_root, val_size=1, seed=0)
    n_official = len(official.train) + len(official.val)
    assert len(a.train) + len(a.val) == n_official
    # and by content (MNIST has no exact duplicate pairs spanning these splits)
    assert not (_digests(a.val) & _digests(a.train))


def test_static_binarization_fixed_dynamic_fresh(data_root):
    splits = load_splits("fashion", data_root, val_size=1000, seed=0, binarize="static")
    s0, s1 = splits.val.served(epoch=0), splits.val.served(epoch=1)
    assert torch.equal(s0, s1)
    assert set(s0.unique().tolist()) == {0.0, 1.0}
    grey_mean = float(splits.val.grey().mean())
    assert abs(float(s0.mean()) - grey_mean) < 0.005

    dyn = load_splits("fashion", data_root, val_size=1000, seed=0, binarize="dynamic")
    d0, d1 = dyn.val.served(epoch=0), dyn.val.served(epoch=1)
    assert not torch.equal(d0, d1)
    assert set(d0.unique().tolist()) == {0.0, 1.0}
    for d in (d0, d1):
        assert abs(float(d.mean()) - grey_mean) < 0.005
    # a pixel's binary draws average to its grey value over many epochs
    draws = torch.stack([dyn.val.served(epoch=e)[:50] for e in range(200)]).mean(0)
    assert float((draws - dyn.val.grey()[:50]).abs().max()) < 0.15


def test_unknown_dataset_and_binarization(data_root):
    with pytest.raises(DataError, match="unknown dataset"):
        load_splits("cifar", data_root)
    with pytest.raises(DataError, match="unknown binarization"):
        load_splits("mnist", data_root, binarize="sometimes")


def test_missing_files_say_run_make_data(tmp_path):
    with pytest.raises(DataError, match="run `make data`"):
        load_splits("mnist", tmp_path)


@pytest.mark.parametrize("binarize", ["none", "static", "dynamic"])
def test_serving_into_a_reused_buffer_gives_the_same_images(data_root, binarize):
    """The Trainer's path (one buffer refilled every epoch) serves exactly what a fresh
    gather serves, in any order and epoch, without touching the split's uint8 images."""
    split = load_splits("mnist", data_root, val_size=1000, seed=2, binarize=binarize).val
    images = split.images.clone()
    buffer = torch.full((len(split), *split.shape), float("nan"))
    gen = torch.Generator().manual_seed(0)
    for epoch in (0, 1, 5):
        order = torch.randperm(len(split), generator=gen)
        assert split.served(epoch, order, out=buffer) is buffer
        assert torch.equal(buffer, split.served(epoch, order))
    assert torch.equal(split.served(3, out=buffer), split.served(3))
    assert torch.equal(split.images, images)
