"""Tests for moco.data: parsing, validation, root resolution, loaders, splits, downloads (no network), checks."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moco
import moco.data.download as download_mod
from moco.data import (DataCheck, ImageDataset, available_datasets, check_root, download_dataset, load_cifar10,
                       load_dataset, load_digits, load_fashion_mnist, load_mnist, resolve_root, split)
from moco.data.catalog import CIFAR10, CIFAR10_ARCHIVE_FOLDER, MNIST
from moco.data.cifar import encode_cifar_batch, parse_cifar_batch, read_cifar_batch, write_cifar_batch
from moco.data.idx import encode_idx, parse_idx, read_idx_images, read_idx_labels, write_idx
from moco.errors import DataCorruptError, DataNotFoundError, MocoError

SHARED = Path(moco.__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------- fixtures: tiny synthetic dataset files


def make_idx_set(folder: Path, n: int = 12, *, prefix: str = "train", gz: bool = True, seed: int = 0,
                 size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Write ``{prefix}-images-idx3-ubyte[.gz]`` and labels into ``folder``; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def make_mnist_root(root: Path, *, folder: str = "mnist", gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A root with a full tiny MNIST-style dataset (train 20, test 10) under ``root/folder``."""
    return {"train": make_idx_set(root / folder, 20, prefix="train", gz=gz, seed=1),
            "test": make_idx_set(root / folder, 10, prefix="t10k", gz=gz, seed=2)}


def make_cifar_root(root: Path, *, per_batch: int = 4, gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A root with 5 tiny train batches and a test batch under ``root/cifar-10``."""
    rng = np.random.default_rng(3)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).astype(np.uint8)
        write_cifar_batch(root / "cifar-10" / (name + (".bin.gz" if gz else ".bin")), images, labels)
        out[name] = (images, labels)
    return out


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the caller's MOCO_DATA, and the cache lives in tmp_path."""
    monkeypatch.delenv("MOCO_DATA", raising=False)
    monkeypatch.setenv("MOCO_CACHE", str(tmp_path / "cache"))


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# ---------------------------------------------------------------- IDX parsing


def test_idx_round_trip_gz_and_plain(tmp_path):
    images, labels = make_idx_set(tmp_path / "gz", 7, gz=True)
    assert np.array_equal(read_idx_images(tmp_path / "gz" / "train-images-idx3-ubyte.gz"), images)
    got = read_idx_labels(tmp_path / "gz" / "train-labels-idx1-ubyte.gz")
    assert got.dtype == np.int64 and np.array_equal(got, labels)
    images, labels = make_idx_set(tmp_path / "plain", 3, gz=False)
    assert np.array_equal(read_idx_images(tmp_path / "plain" / "train-images-idx3-ubyte"), images)
    assert np.array_equal(read_idx_labels(tmp_path / "plain" / "train-labels-idx1-ubyte"), labels)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 5), rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_idx_encode_parse_property(n, rows, cols, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    assert np.array_equal(parse_idx(encode_idx(array), "x", magic=2051), array)
    labels = array.reshape(-1)[:n]
    assert np.array_equal(parse_idx(encode_idx(labels), "x", magic=2049), labels)


def _assert_corrupt(exc_info, path: Path, words: str) -> None:
    message = str(exc_info.value)
    assert str(path) in message, message
    assert words in message, message
    assert "re-download" in message and "MOCO_DATA" in message, message


def test_bad_gzip_is_corrupt(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataCorruptError) as exc_info:
        read_idx_images(path)
    _assert_corrupt(exc_info, path, "gzip")


def test_truncated_gzip_stream_is_corrupt(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.compress(encode_idx(np.zeros((5, 28, 28), np.uint8)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataCorruptError) as exc_info:
        read_idx_images(path)
    _assert_corrupt(exc_info, path, "gzip")


def test_wrong_magic_is_corrupt(tmp_path):
    make_idx_set(tmp_path, 4)
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    with pytest.raises(DataCorruptError) as exc_info:
        read_idx_images(labels_path)  # a labels file where images are expected
    _assert_corrupt(exc_info, labels_path, "magic")


@pytest.mark.parametrize("cut, words", [(-5, "truncated"), (-(28 * 28 * 4 + 5), "truncated"), (3, "truncated")])
def test_truncated_payload_is_corrupt(tmp_path, cut, words):
    data = encode_idx(np.ones((4, 28, 28), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data[:cut])
    with pytest.raises(DataCorruptError) as exc_info:
        read_idx_images(path)
    _assert_corrupt(exc_info, path, words)


def test_trailing_bytes_are_corrupt(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(encode_idx(np.arange(5, dtype=np.uint8)) + b"\x00\x00"))
    with pytest.raises(DataCorruptError) as exc_info:
        read_idx_labels(path)
    _assert_corrupt(exc_info, path, "trailing")


def test_label_out_of_range_is_corrupt(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.array([0, 1, 10, 3], np.uint8))
    with pytest.raises(DataCorruptError) as exc_info:
        read_idx_labels(path)
    _assert_corrupt(exc_info, path, "out of range")


def test_count_mismatch_names_both_files(tmp_path):
    folder = tmp_path / "mnist"
    make_mnist_root(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))  # 20 images, 19 labels
    with pytest.raises(DataCorruptError) as exc_info:
        load_mnist(tmp_path)
    _assert_corrupt(exc_info, folder / "train-images-idx3-ubyte.gz", "mismatch")
    assert str(folder / "train-labels-idx1-ubyte.gz") in str(exc_info.value)


def test_wrong_image_size_is_corrupt(tmp_path):
    make_idx_set(tmp_path / "mnist", 3, size=27)
    make_idx_set(tmp_path / "mnist", 3, prefix="t10k")
    with pytest.raises(DataCorruptError, match="27x27"):
        load_mnist(tmp_path)


def test_corrupt_error_is_a_value_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"junk")
    with pytest.raises(ValueError):
        read_idx_labels(path)


# ---------------------------------------------------------------- CIFAR parsing


def test_cifar_record_layout_is_label_then_chw():
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 0, 0, 1] = 11  # red, row 0, col 1
    image[0, 2, 31, 0] = 22  # blue, row 31, col 0
    data = encode_cifar_batch(image, np.array([7]))
    assert len(data) == 3073 and data[0] == 7 and data[1 + 1] == 11 and data[1 + 2 * 1024 + 31 * 32] == 22
    images, labels = parse_cifar_batch(data, "b")
    assert np.array_equal(images, image) and labels.tolist() == [7]


def test_cifar_corruptions(tmp_path):
    good = encode_cifar_batch(np.zeros((2, 3, 32, 32), np.uint8), np.array([1, 2]))
    cases = {"short.bin": (good[:-1], "whole number"), "long.bin": (good + b"\x00", "whole number"),
             "empty.bin": (b"", "empty"), "label.bin": (b"\x0a" + good[1:], "out of range"),
             "badgz.bin.gz": (b"\x1f\x8bnot really", "gzip")}
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataCorruptError) as exc_info:
            read_cifar_batch(path)
        _assert_corrupt(exc_info, path, words)


def test_load_cifar10_concatenates_batches_in_order(tmp_path):
    made = make_cifar_root(tmp_path)
    train = load_cifar10(tmp_path, normalize=False)
    expected = np.concatenate([made[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert train.images.shape == (20, 3, 32, 32) and train.input_shape == (3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected)
    assert train.targets.tolist() == np.concatenate([made[f"data_batch_{i}"][1] for i in range(1, 6)]).tolist()
    test = load_cifar10(tmp_path, train=False)
    assert np.array_equal(test.images.numpy(), made["test_batch"][0])
    assert test.classes[0] == "airplane" and test.name == "cifar10" and len(test.mean) == 3


def test_cifar_torchvision_layout_plain_bin(tmp_path):
    made = make_cifar_root(tmp_path / "staging", gz=False)
    (tmp_path / "root").mkdir()
    (tmp_path / "staging" / "cifar-10").rename(tmp_path / "root" / "cifar-10-batches-bin")
    test = load_dataset("cifar-10", tmp_path / "root", train=False)
    assert np.array_equal(test.images.numpy(), made["test_batch"][0])


# ---------------------------------------------------------------- loaders, missing files, layouts


def test_load_mnist_synthetic_round_trip(tmp_path):
    made = make_mnist_root(tmp_path)
    ds = load_mnist(tmp_path, normalize=False)
    assert len(ds) == 20 and ds.images.dtype == torch.uint8 and ds.images.shape == (20, 1, 28, 28)
    assert np.array_equal(ds.images[:, 0].numpy(), made["train"][0])
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == made["train"][1].tolist()
    assert ds.name == "mnist" and ds.source == str(tmp_path / "mnist") and ds.num_classes == 10
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and isinstance(y, int)
    assert torch.allclose(x, torch.from_numpy(made["train"][0][3]).float().unsqueeze(0) / 255)
    assert len(load_mnist(tmp_path, train=False)) == 10


def test_torchvision_layout_plain_idx(tmp_path):
    made = make_mnist_root(tmp_path, folder="FashionMNIST/raw", gz=False)
    ds = load_fashion_mnist(tmp_path, train=False)
    assert ds.name == "fashion_mnist" and ds.classes[-1] == "Ankle boot"
    assert np.array_equal(ds.images[:, 0].numpy(), made["test"][0])
    assert available_datasets(tmp_path) == ["fashion_mnist"]


def test_missing_file_error_names_file_folder_and_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as exc_info:
        load_mnist(tmp_path)
    message = str(exc_info.value)
    assert isinstance(exc_info.value, FileNotFoundError) and isinstance(exc_info.value, ValueError)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "mnist") in message
    assert str(tmp_path / "MNIST" / "raw") in message and "MOCO_DATA" in message and "download=True" in message


def test_missing_one_file_names_only_it(tmp_path):
    make_mnist_root(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    load_mnist(tmp_path)  # train is complete
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as exc_info:
        load_mnist(tmp_path, train=False)
    assert "t10k-images" not in str(exc_info.value)
    assert available_datasets(tmp_path) == []


def test_env_root_is_used_by_loaders(tmp_path, monkeypatch):
    make_mnist_root(tmp_path / "data")
    monkeypatch.setenv("MOCO_DATA", str(tmp_path / "data"))
    assert len(load_dataset("mnist", train=False)) == 10


def test_load_dataset_names(tmp_path):
    make_mnist_root(tmp_path / "fashion-mnist", folder=".")
    assert load_dataset("Fashion-MNIST", tmp_path).name == "fashion_mnist"
    assert load_dataset("fashion_mnist", tmp_path, train=False, normalize=False).normalize is False
    with pytest.raises(MocoError, match="mnist, fashion_mnist, cifar10, digits"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- root resolution


def test_resolve_root_order(tmp_path, monkeypatch):
    repo_parent = tmp_path / "fake"
    (repo_parent / "repo" / "moco").mkdir(parents=True)
    monkeypatch.setattr(moco, "__file__", str(repo_parent / "repo" / "moco" / "__init__.py"))
    work = tmp_path / "work" / "proj"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    # 5. nothing exists: the cache
    assert resolve_root() == tmp_path / "cache" / "data"
    # 4. shared/data beside the package's repository
    (repo_parent / "shared" / "data").mkdir(parents=True)
    assert resolve_root() == repo_parent / "shared" / "data"
    # 3. ../shared/data beside the working directory
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)
    assert resolve_root() == tmp_path / "work" / "shared" / "data"
    # 2. MOCO_DATA (empty counts as unset)
    monkeypatch.setenv("MOCO_DATA", "")
    assert resolve_root() == tmp_path / "work" / "shared" / "data"
    monkeypatch.setenv("MOCO_DATA", str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    # 1. the argument, made absolute
    assert resolve_root("relative") == work / "relative"
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"


def test_automatic_root_falls_back_to_download_cache(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    make_mnist_root(tmp_path / "cache" / "data")
    assert resolve_root() == shared
    assert load_mnist(train=False).source == str(tmp_path / "cache" / "data" / "mnist")
    assert available_datasets() == ["mnist"]


# ---------------------------------------------------------------- ImageDataset


def _tiny_dataset(n: int = 30, channels: int = 1) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    return ImageDataset(images=torch.randint(0, 256, (n, channels, 4, 4), dtype=torch.uint8, generator=gen),
                        targets=torch.arange(n) % 3, classes=("a", "b", "c"), name="tiny", source="memory",
                        mean=(0.5,) * channels, std=(0.25,) * channels)


def test_getitem_matches_tensors():
    ds = _tiny_dataset(channels=3)
    x, y = ds.tensors()
    assert x.dtype == torch.float32 and x.shape == (30, 3, 4, 4) and y.dtype == torch.int64
    for i in (0, 7, 29):
        xi, yi = ds[i]
        assert torch.allclose(xi, x[i]) and yi == int(y[i])
    raw, _ = ds.tensors(normalize=False)
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-6)
    plain = dataclasses.replace(ds, normalize=False)
    assert torch.allclose(plain[5][0], raw[5]) and torch.allclose(plain.tensors()[0], raw)


def test_subset_and_properties():
    ds = _tiny_dataset()
    sub = ds.subset([4, 2, 2])
    assert len(sub) == 3 and sub.targets.tolist() == [1, 2, 2]
    assert torch.equal(sub.images[0], ds.images[4]) and sub.classes == ds.classes and sub.mean == ds.mean
    assert len(ds.subset(torch.arange(30) < 5)) == 5 and len(ds.subset([])) == 0
    assert ds.input_shape == (1, 4, 4) and ds.num_classes == 3
    with pytest.raises(MocoError):
        ds.subset([30])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.tensors()[0], ds.tensors()[0])


def test_dataset_validation():
    good = _tiny_dataset()
    with pytest.raises(MocoError, match="uint8"):
        dataclasses.replace(good, images=good.images.float())
    with pytest.raises(MocoError, match="match"):
        dataclasses.replace(good, targets=good.targets[:-1])
    with pytest.raises(MocoError, match="per channel"):
        dataclasses.replace(good, mean=(0.1, 0.2))
    with pytest.raises(MocoError, match="0..2"):
        dataclasses.replace(good, classes=("a", "b"))


def test_works_with_dataloader():
    ds = _tiny_dataset()
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 1, 4, 4) and y.dtype == torch.int64


# ---------------------------------------------------------------- split


def test_split_sizes_disjoint_reproducible_stratified():
    ds = _tiny_dataset(n=101)
    train, val = split(ds, val_fraction=0.2, seed=5)
    assert (len(train), len(val)) == (81, 20)
    parts = split(ds, val_fraction=0.1, test_fraction=0.25, seed=5)
    assert [len(p) for p in parts] == [66, 10, 25]

    def rows(part):  # images are random, so identify rows by content
        return {bytes(img.numpy()) for img in part.images}

    sets = [rows(p) for p in parts]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 101
    again = split(ds, val_fraction=0.1, test_fraction=0.25, seed=5)
    assert all(torch.equal(a.images, b.images) for a, b in zip(parts, again))
    other = split(ds, val_fraction=0.1, test_fraction=0.25, seed=6)
    assert not torch.equal(parts[2].images, other[2].images)
    counts = torch.bincount(parts[2].targets, minlength=3).tolist()  # classes 34/34/33 -> ~8.4 each
    assert all(7 <= c <= 10 for c in counts), counts


@pytest.mark.parametrize("kwargs", [dict(val_fraction=-0.1), dict(val_fraction=1.0), dict(val_fraction="x"),
                                    dict(val_fraction=0.6, test_fraction=0.4), dict(val_fraction=0.001)])
def test_split_rejects_bad_fractions(kwargs):
    with pytest.raises(ValueError):
        split(_tiny_dataset(n=30), **kwargs)


# ---------------------------------------------------------------- digits


def test_digits_shape_labels_normalisation_and_split():
    train = load_digits(train=True)
    test = load_dataset("digits", train=False)
    assert train.input_shape == (1, 28, 28) and train.images.dtype == torch.uint8
    assert (len(train), len(test)) == (1438, 359) and len(load_digits()) == 1797
    assert sorted(set(train.targets.tolist())) == list(range(10)) and train.name == "digits"
    assert train.source == "sklearn digits (embedded)" and train.mean == test.mean
    x, _ = train.tensors()
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    train_rows = {bytes(img.numpy()) + bytes([t]) for img, t in zip(train.images, train.targets.tolist())}
    test_rows = {bytes(img.numpy()) + bytes([t]) for img, t in zip(test.images, test.targets.tolist())}
    assert not (train_rows & test_rows)
    assert torch.equal(load_digits(train=False).images, test.images)  # fixed split
    assert load_digits(size=8, normalize=False).input_shape == (1, 8, 8)
    with pytest.raises(MocoError):
        load_digits(size=0)


# ---------------------------------------------------------------- downloads (network replaced)


def _urlerror_fetch(urls: list[str]):
    def fetch(url, timeout):
        urls.append(url)
        assert timeout > 0
        raise urllib.error.URLError("no network")
    return fetch


def test_download_without_network_raises_not_found_and_writes_nothing(tmp_path, monkeypatch):
    urls: list[str] = []
    monkeypatch.setattr(download_mod, "_fetch", _urlerror_fetch(urls))
    with pytest.raises(DataNotFoundError) as exc_info:
        load_mnist(tmp_path / "root", download=True)
    message = str(exc_info.value)
    assert "train-images-idx3-ubyte" in message and "MOCO_DATA" in message and "no network" in message
    assert urls[:2] == ["https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
                        "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz"]
    assert all_files(tmp_path) == []


def test_download_timeout_is_not_found(tmp_path, monkeypatch):
    def fetch(url, timeout):
        raise TimeoutError("timed out")
    monkeypatch.setattr(download_mod, "_fetch", fetch)
    with pytest.raises(DataNotFoundError, match="timed out"):
        load_cifar10(tmp_path, train=False, download=True)
    assert all_files(tmp_path) == []


def test_download_md5_mismatch_is_corrupt_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(download_mod, "_fetch", lambda url, timeout: b"wrong bytes")
    with pytest.raises(DataCorruptError, match="md5"):
        load_fashion_mnist(tmp_path, download=True)
    with pytest.raises(DataCorruptError, match="md5"):
        load_cifar10(tmp_path, download=True)
    assert all_files(tmp_path) == []


def test_download_goes_to_cache_by_default(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(moco, "__file__", str(tmp_path / "a" / "b" / "moco" / "__init__.py"))
    monkeypatch.setattr(download_mod, "_fetch", _urlerror_fetch([]))
    with pytest.raises(DataNotFoundError) as exc_info:
        load_mnist(download=True)
    assert str(tmp_path / "cache" / "data" / "mnist") in str(exc_info.value)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"real MNIST files not found in {SHARED}")
def test_download_success_with_mirror_fallback(tmp_path, monkeypatch):
    def fetch(url, timeout):
        if "ossci" in url:
            raise urllib.error.URLError("mirror down")
        return (SHARED / "mnist" / url.rsplit("/", 1)[-1]).read_bytes()
    monkeypatch.setattr(download_mod, "_fetch", fetch)
    ds = load_mnist(tmp_path, train=False, download=True)
    assert len(ds) == 10000 and ds.source == str(tmp_path / "mnist")
    assert sorted(p.name for p in all_files(tmp_path)) == sorted(f.name + ".gz" for f in MNIST.files)
    assert check_root(tmp_path)["mnist"].ok


def _fake_cifar_archive(contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(f"{CIFAR10_ARCHIVE_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_cifar_download_extracts_verified_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    contents = {f.name: encode_cifar_batch(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), np.array([1, 2]))
                for f in CIFAR10.train + CIFAR10.test}
    contents["batches.meta.txt"] = b"airplane\n"
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in contents.items()}
    spec = dataclasses.replace(
        CIFAR10, train=tuple(dataclasses.replace(f, raw_md5=md5[f.name]) for f in CIFAR10.train),
        test=tuple(dataclasses.replace(f, raw_md5=md5[f.name]) for f in CIFAR10.test),
        extra=tuple(dataclasses.replace(f, raw_md5=md5[f.name]) for f in CIFAR10.extra))
    archive = _fake_cifar_archive(contents)
    monkeypatch.setattr(download_mod, "CIFAR10_ARCHIVE_MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(download_mod, "_fetch", lambda url, timeout: archive)
    folder = download_dataset(spec, tmp_path)
    assert folder == tmp_path / "cifar-10"
    assert sorted(p.name for p in all_files(tmp_path)) == sorted(contents)
    images, labels = read_cifar_batch(folder / "test_batch.bin")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]
    # a member whose content fails its md5: nothing is written
    contents["data_batch_3.bin"] = contents["data_batch_2.bin"]
    bad = _fake_cifar_archive(contents)
    monkeypatch.setattr(download_mod, "CIFAR10_ARCHIVE_MD5", hashlib.md5(bad).hexdigest())
    monkeypatch.setattr(download_mod, "_fetch", lambda url, timeout: bad)
    with pytest.raises(DataCorruptError, match="data_batch_3.bin"):
        download_dataset(spec, tmp_path / "other")
    assert all_files(tmp_path / "other") == []


# ---------------------------------------------------------------- check_root


def test_check_root_synthetic(tmp_path):
    make_mnist_root(tmp_path)
    make_cifar_root(tmp_path)
    (tmp_path / "cifar-10" / "test_batch.bin.gz").unlink()
    result = check_root(tmp_path)
    assert isinstance(result, DataCheck) and result.root == tmp_path and not result.ok
    mnist, fashion, cifar = result.datasets
    assert mnist.present and mnist.md5_ok is False and len(mnist.mismatched) == 4  # synthetic != published
    assert not fashion.present and len(fashion.missing) == 4 and fashion.found == ()
    assert cifar.missing == ("test_batch.bin",) and len(cifar.found) == 5
    text = result.to_text()
    assert "mnist" in text and "test_batch.bin" in text and "MISMATCH" in text and str(tmp_path) in text
    quick = check_root(tmp_path, verify_md5=False)
    assert quick["mnist"].md5_ok is None and quick["mnist"].ok and not quick.ok
    with pytest.raises(KeyError):
        quick["digits"]


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"real MNIST files not found in {SHARED}")
def test_check_root_accepts_torchvision_layout_and_plain_copies(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST.files:
        (raw / (f.name + ".gz")).symlink_to(SHARED / "mnist" / (f.name + ".gz"))
    images = raw / "t10k-images-idx3-ubyte"  # an uncompressed copy is found first and verified by content
    images.write_bytes(gzip.decompress((SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()))
    row = check_root(tmp_path)["mnist"]
    assert row.ok and images in row.found
    images.write_bytes(images.read_bytes()[:-1] + b"\x01")
    assert check_root(tmp_path)["mnist"].mismatched == (images,)


# ---------------------------------------------------------------- the real shared data


@pytest.fixture
def real_root(monkeypatch):
    monkeypatch.chdir(Path(moco.__file__).resolve().parents[1])
    root = resolve_root()
    if not (root / "mnist").is_dir() or not (root / "cifar-10").is_dir():
        pytest.skip(f"real datasets not present at {root} (expected shared/data beside the repo, or set MOCO_DATA)")
    return root


def test_real_shared_data(real_root):
    mnist = load_mnist(train=False)
    assert mnist.source == str(real_root / "mnist")
    assert len(mnist) == 10000 and mnist.input_shape == (1, 28, 28)
    assert torch.bincount(mnist.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    cifar = load_cifar10(train=False)
    assert len(cifar) == 10000 and cifar.input_shape == (3, 32, 32)
    assert torch.bincount(cifar.targets).tolist() == [1000] * 10
    result = check_root()
    assert result.ok, result.to_text()
    assert available_datasets() == ["mnist", "fashion_mnist", "cifar10"]
