"""CIFAR-10/100 pickle loader: parsing, validation, folder search and pickle safety."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nestedsparse.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR100_COARSE_CLASSES,
    DatasetFormatError,
    DatasetNotFoundError,
    load_cifar10,
    load_cifar100,
    load_cifar_batch,
    load_dataset,
)

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class _Hostile:
    """Unpickling this would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def batch(n: int, *, seed: int, labels_key: str = "labels", classes: int = 10) -> dict[bytes, Any]:
    """A CIFAR-like batch dict with bytes keys, as the official files load."""
    rng = np.random.default_rng(seed)
    content: dict[bytes, Any] = {
        b"batch_label": b"synthetic batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        labels_key.encode(): [int(v) for v in rng.integers(0, classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    return content


def dump(path: Path, obj: Any, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def make_cifar10(root: Path, n: int = 2, protocol: int = 2) -> list[dict[bytes, Any]]:
    """Write cifar-10-batches-py under ``root``; return the train batches in order."""
    folder = root / "cifar-10-batches-py"
    train = [batch(n, seed=i) for i in range(5)]
    for name, content in zip(CIFAR10_TRAIN, train, strict=True):
        dump(folder / name, content, protocol)
    dump(folder / "test_batch", batch(n + 1, seed=99), protocol)
    return train


def make_cifar100(root: Path, n: int = 3) -> dict[bytes, Any]:
    """Write cifar-100-python under ``root``; return the train dict."""
    train = batch(n, seed=1, labels_key="fine_labels", classes=100)
    train[b"coarse_labels"] = [label // 5 for label in train[b"fine_labels"]]
    dump(root / "cifar-100-python" / "train", train)
    test = batch(1, seed=2, labels_key="fine_labels", classes=100)
    test[b"coarse_labels"] = [0]
    dump(root / "cifar-100-python" / "test", test)
    return train


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NESTEDSPARSE_DATA", raising=False)


# ----------------------------------------------------------------- parsing


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_parses(tmp_path: Path, protocol: int) -> None:
    train = make_cifar10(tmp_path, protocol=protocol)
    ds = load_cifar10(tmp_path, "train")
    assert ds.images.shape == (10, 3, 32, 32) and ds.images.dtype == torch.float32
    assert ds.targets.dtype == torch.int64
    assert ds.targets.tolist() == [v for b in train for v in b[b"labels"]]
    raw = train[0][b"data"][1].reshape(3, 32, 32).astype(np.float32) / 255
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(ds.images[1].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert ds.classes == CIFAR10_CLASSES and ds.coarse_targets is None
    assert len(load_cifar10(tmp_path, "test")) == 3


def test_root_may_be_the_batches_folder(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    assert len(ds) == 10 and ds.name == "cifar10"


def test_str_keys_are_accepted(tmp_path: Path) -> None:
    content = {k.decode(): v for k, v in batch(2, seed=0).items()}
    path = dump(tmp_path / "data_batch_1", content, protocol=4)
    images, labels, coarse = load_cifar_batch(path)
    assert images.shape == (2, 3072) and labels.tolist() == content["labels"] and coarse is None


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    train = make_cifar100(tmp_path)
    ds = load_cifar100(tmp_path)
    assert ds.images.shape == (3, 3, 32, 32)
    assert ds.targets.tolist() == train[b"fine_labels"]
    assert ds.coarse_targets is not None
    assert ds.coarse_targets.tolist() == train[b"coarse_labels"]
    assert len(CIFAR100_CLASSES) == 100 and len(set(CIFAR100_CLASSES)) == 100
    assert len(CIFAR100_COARSE_CLASSES) == 20 and ds.coarse_classes == CIFAR100_COARSE_CLASSES
    assert len(load_dataset("cifar100", root=tmp_path, split="test")) == 1


# ------------------------------------------------------------------ safety


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_hostile_pickle_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    content = batch(2, seed=0)
    content[b"data"] = _Hostile(f"touch {marker}")
    path = dump(tmp_path / "data_batch_1", content, protocol)
    with pytest.raises(
        DatasetFormatError, match=r"refusing to load global (posix|nt)\.system"
    ) as info:
        load_cifar_batch(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"csubprocess\ncheck_call\n((S'true'\nltR.",
        b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
    ],
    ids=["eval", "subprocess", "codecs-other-encoding"],
)
def test_other_globals_are_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DatasetFormatError, match="data_batch_1"):
        load_cifar_batch(path)


# ------------------------------------------------------------------ faults


def _faulty(kind: str) -> Any:
    content = batch(3, seed=0)
    if kind == "shape":
        content[b"data"] = np.zeros((3, 100), dtype=np.uint8)
    elif kind == "dtype":
        content[b"data"] = np.zeros((3, 3072), dtype=np.float32)
    elif kind == "label-range":
        content[b"labels"] = [0, 10, 1]
    elif kind == "label-count":
        content[b"labels"] = [0, 1]
    elif kind == "label-type":
        content[b"labels"] = [b"cat", b"dog", b"cow"]
    elif kind == "no-labels":
        del content[b"labels"]
    elif kind == "no-data":
        del content[b"data"]
    elif kind == "not-dict":
        return [1, 2, 3]
    return content


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("shape", "(N, 3072)"),
        ("dtype", "uint8"),
        ("label-range", "value 10 at index 1 is outside 0..9"),
        ("label-count", "3 integers"),
        ("label-type", "3 integers"),
        ("no-labels", "missing key 'labels'"),
        ("no-data", "missing key 'data'"),
        ("not-dict", "expected dict"),
    ],
)
def test_malformed_batches(tmp_path: Path, kind: str, words: str) -> None:
    path = dump(tmp_path / "data_batch_1", _faulty(kind))
    with pytest.raises(DatasetFormatError) as info:
        load_cifar_batch(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_truncated_pickle(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch(2, seed=0), protocol=2)[:-200])
    with pytest.raises(DatasetFormatError, match="not a valid CIFAR pickle"):
        load_cifar_batch(path)


def test_cifar100_coarse_range_checked(tmp_path: Path) -> None:
    content = batch(2, seed=0, labels_key="fine_labels", classes=100)
    content[b"coarse_labels"] = [0, 20]
    path = dump(tmp_path / "train", content)
    with pytest.raises(DatasetFormatError, match="'coarse_labels' value 20"):
        load_cifar_batch(path, "cifar100")


# ------------------------------------------------------------------ search


def test_missing_lists_ways(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for way in ("--data-dir", "$NESTEDSPARSE_DATA", "cifar-10-python.tar.gz", str(tmp_path)):
        assert way in message


def test_partial_folder_is_not_found(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)
    assert len(load_cifar10(tmp_path, "test")) == 3


def test_env_var_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar100(tmp_path)
    monkeypatch.setenv("NESTEDSPARSE_DATA", str(tmp_path))
    assert len(load_dataset("cifar100")) == 3
