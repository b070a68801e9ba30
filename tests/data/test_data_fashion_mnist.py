"""Fashion-MNIST IDX loader, folder search, download verification and hierarchy."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import nestedsparse.data.fashion_mnist as fm
from nestedsparse.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_HIERARCHY,
    DatasetFormatError,
    DatasetNotFoundError,
    coarse_labels,
    download_fashion_mnist,
    load_dataset,
    load_fashion_mnist,
    mapping_from_groups,
    read_idx,
)

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, *, magic: bytes | None = None) -> bytes:
    """Serialise a uint8 array as IDX (optionally with a forged magic number)."""
    head = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return head + dims + array.astype(np.uint8).tobytes()


def write_file(folder: Path, stem: str, payload: bytes, gz: bool = True) -> Path:
    """Write ``payload`` as ``stem.gz`` (gzipped) or plain ``stem``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{stem}.gz" if gz else stem)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_split(
    folder: Path, split: str, n: int, *, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write a valid split with ``n`` samples; return (images, labels) arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_file(folder, STEMS[split][0], idx_bytes(images), gz)
    write_file(folder, STEMS[split][1], idx_bytes(labels), gz)
    return images, labels


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No env var and no system folder unless a test sets them."""
    monkeypatch.delenv("NESTEDSPARSE_DATA", raising=False)
    monkeypatch.setattr(fm, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")


# ----------------------------------------------------------------- parsing


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_parses_split(tmp_path: Path, gz: bool) -> None:
    images, labels = make_split(tmp_path, "train", 5, gz=gz)
    ds = load_fashion_mnist(tmp_path, "train")
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.targets.dtype == torch.int64
    assert ds.targets.tolist() == labels.tolist()
    expected = (images.astype(np.float32) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.images[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and int(label) == 3
    assert ds.classes == FASHION_MNIST_CLASSES and ds.num_classes == 10
    assert torch.equal(ds.coarse_targets, FASHION_MNIST_HIERARCHY[ds.targets])


def test_test_split_and_load_dataset(tmp_path: Path) -> None:
    make_split(tmp_path, "test", 3)
    ds = load_dataset("fashion-mnist", root=tmp_path, split="test")
    assert len(ds) == 3 and ds.name == "fashion-mnist"


def test_returned_tensors_are_independent_of_the_cache(tmp_path: Path) -> None:
    make_split(tmp_path, "train", 4)
    first = load_fashion_mnist(tmp_path)
    first.images.zero_()
    second = load_fashion_mnist(tmp_path)
    assert second.images.abs().sum() > 0


# ------------------------------------------------------------------ faults


def _images_path(folder: Path) -> Path:
    return folder / "train-images-idx3-ubyte.gz"


def _write_images(folder: Path, payload: bytes) -> Path:
    """A valid label file for 2 samples plus the given image payload."""
    write_file(folder, STEMS["train"][1], idx_bytes(np.array([1, 2], dtype=np.uint8)))
    return write_file(folder, STEMS["train"][0], payload)


def _valid_images(n: int = 2) -> bytes:
    return idx_bytes(np.zeros((n, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (_valid_images()[:-10], "truncated"),
        (_valid_images()[:12], "truncated"),
        (_valid_images()[:2], "truncated header"),
        (_valid_images() + b"\x00", "padded"),
        (b"\x01\x02" + _valid_images()[2:], "magic number"),
        (bytes([0, 0, 0x0D, 3]) + _valid_images()[4:], "data type code 0x0D"),
        (bytes([0, 0, 0x08, 2]) + _valid_images()[4:], "2 dimensions"),
        (idx_bytes(np.zeros((2, 27, 27), dtype=np.uint8)), "28x28"),
    ],
    ids=["short-payload", "no-payload", "short-header", "padded", "magic", "dtype", "ndim", "size"],
)
def test_malformed_images_name_file_and_fault(tmp_path: Path, payload: bytes, words: str) -> None:
    path = _write_images(tmp_path, payload)
    with pytest.raises(DatasetFormatError) as info:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_bad_label(tmp_path: Path) -> None:
    write_file(tmp_path, STEMS["train"][0], _valid_images(3))
    path = write_file(tmp_path, STEMS["train"][1], idx_bytes(np.array([0, 10, 3], dtype=np.uint8)))
    with pytest.raises(DatasetFormatError, match=r"label 10 at index 1 is outside 0\.\.9") as info:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(info.value)


def test_count_mismatch(tmp_path: Path) -> None:
    images = write_file(tmp_path, STEMS["train"][0], _valid_images(3))
    labels = write_file(tmp_path, STEMS["train"][1], idx_bytes(np.array([0, 1], dtype=np.uint8)))
    with pytest.raises(DatasetFormatError, match="count mismatch") as info:
        load_fashion_mnist(tmp_path)
    assert str(images) in str(info.value) and str(labels) in str(info.value)


@pytest.mark.parametrize("kind", ["not-gzip", "cut-stream", "bad-crc"])
def test_bad_gzip(tmp_path: Path, kind: str) -> None:
    compressed = gzip.compress(_valid_images())
    if kind == "not-gzip":
        compressed = b"this is not gzip data at all"
    elif kind == "cut-stream":
        compressed = compressed[: len(compressed) // 2]
    else:
        compressed = compressed[:-8] + bytes(8)  # zero the CRC32 and size trailer
    _write_images(tmp_path, b"")
    path = _images_path(tmp_path)
    path.write_bytes(compressed)
    with pytest.raises(DatasetFormatError, match="gzip") as info:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(info.value)


def test_read_idx_plain_generic(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path, "cube-idx3-ubyte", idx_bytes(data), gz=False)
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, data)
    with pytest.raises(DatasetFormatError, match="expected 1"):
        read_idx(path, expected_ndim=1)


# ------------------------------------------------------------------ search


def test_missing_lists_every_way(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(tmp_path / "empty")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for way in (
        "--data-dir",
        "$NESTEDSPARSE_DATA",
        "apt-get install dataset-fashion-mnist",
        "nestedsparse.data",
        "download_fashion_mnist(",
    ):
        assert way in message
    assert str(tmp_path / "empty") in message


def test_missing_labels_file_is_not_found(tmp_path: Path) -> None:
    write_file(tmp_path, STEMS["train"][0], _valid_images())
    with pytest.raises(DatasetNotFoundError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("layout", ["folder-itself", "subfolder"])
def test_env_var_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    folder = tmp_path if layout == "folder-itself" else tmp_path / "fashion-mnist"
    make_split(folder, "train", 4)
    monkeypatch.setenv("NESTEDSPARSE_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist")) == 4


def test_root_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_split(tmp_path / "root", "train", 2)
    make_split(tmp_path / "env", "train", 6)
    monkeypatch.setenv("NESTEDSPARSE_DATA", str(tmp_path / "env"))
    assert len(load_fashion_mnist(tmp_path / "root")) == 2
    assert len(load_fashion_mnist(tmp_path / "nowhere")) == 6  # falls through to the env folder


def test_system_dir_is_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_split(tmp_path / "debian", "train", 3)
    monkeypatch.setattr(fm, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "debian")
    assert len(load_fashion_mnist()) == 3


def test_load_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*fashion-mnist"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("fashion-mnist", root=tmp_path, split="val")
    with pytest.raises(TypeError, match="num_samples"):
        load_dataset("fashion-mnist", root=tmp_path, num_samples=3)


# ---------------------------------------------------------------- download


def test_download_rejects_bad_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path, timeout: float) -> None:
        fetched.append(url)
        dest.write_bytes(gzip.compress(b"not the real data"))

    monkeypatch.setattr(fm, "_fetch", fake_fetch)
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte\.gz"):
        download_fashion_mnist(tmp_path / "dl")
    assert len(fetched) == len(fm.FASHION_MNIST_URLS)
    assert not any((tmp_path / "dl").iterdir())  # nothing unverified left behind


def test_download_network_error_is_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fetch(url: str, dest: Path, timeout: float) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(fm, "_fetch", failing_fetch)
    with pytest.raises(OSError, match="network is unreachable"):
        download_fashion_mnist(tmp_path)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_download_accepts_official_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def local_fetch(url: str, dest: Path, timeout: float) -> None:
        shutil.copyfile(REAL_DIR / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(fm, "_fetch", local_fetch)
    folder = download_fashion_mnist(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in REAL_DIR.glob("*.gz"))


# --------------------------------------------------------------- hierarchy


def test_hierarchy_groups() -> None:
    assert FASHION_MNIST_HIERARCHY.dtype == torch.int64 and FASHION_MNIST_HIERARCHY.shape == (10,)
    groups = {}
    for fine, coarse in enumerate(FASHION_MNIST_HIERARCHY.tolist()):
        groups.setdefault(coarse, set()).add(fine)
    assert sorted(map(sorted, groups.values())) == [[0, 2, 6], [1], [3], [4], [5, 7, 9], [8]]
    fine = torch.tensor([[0, 9], [8, 1]])
    assert coarse_labels(fine, FASHION_MNIST_HIERARCHY).tolist() == [[0, 5], [4, 1]]


def test_hierarchy_errors() -> None:
    with pytest.raises(ValueError, match=r"span 0\.\.10"):
        coarse_labels(torch.tensor([0, 10]), FASHION_MNIST_HIERARCHY)
    with pytest.raises(TypeError, match="integer"):
        coarse_labels(torch.tensor([0.0]), FASHION_MNIST_HIERARCHY)
    with pytest.raises(ValueError, match=r"fine labels \[2\] belong to no group"):
        mapping_from_groups({"a": [0], "b": [1]}, 3)
    with pytest.raises(ValueError, match="more than one group"):
        mapping_from_groups({"a": [0, 1], "b": [1]}, 2)


# -------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "FASHION_MNIST_SYSTEM_DIR", REAL_DIR)
    train = load_fashion_mnist(split="train")
    test = load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and train.targets.shape == (60000,)
    assert test.images.shape == (10000, 1, 28, 28) and test.targets.shape == (10000,)
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert abs(float(train.images.mean())) < 0.01 and abs(float(train.images.std()) - 1) < 0.01
