"""Deterministic synthetic data."""

from __future__ import annotations

import pytest
import torch

from nestedsparse.data import DATASETS, load_dataset, make_synthetic


def test_shapes_and_types() -> None:
    ds = make_synthetic(20, 4, (3, 8, 8))
    assert ds.images.shape == (20, 3, 8, 8) and ds.images.dtype == torch.float32
    assert ds.targets.shape == (20,) and ds.targets.dtype == torch.int64
    assert torch.bincount(ds.targets, minlength=4).tolist() == [5, 5, 5, 5]
    assert ds.num_classes == 4 and len(ds) == 20


def test_deterministic_and_seed_dependent() -> None:
    a = make_synthetic(16, 3, (1, 4, 4), seed=7)
    b = make_synthetic(16, 3, (1, 4, 4), seed=7)
    c = make_synthetic(16, 3, (1, 4, 4), seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_synthetic(8, 2, (2,))
    assert torch.equal(torch.rand(3), expected)


def test_splits_differ_but_share_prototypes() -> None:
    train = make_synthetic(400, 2, (32,), split="train", noise=0.5)
    test = make_synthetic(400, 2, (32,), split="test", noise=0.5)
    assert not torch.equal(train.images, test.images)
    for label in (0, 1):
        mean_train = train.images[train.targets == label].mean(0)
        mean_test = test.images[test.targets == label].mean(0)
        assert torch.allclose(mean_train, mean_test, atol=0.3)


def test_load_dataset_synthetic() -> None:
    assert "synthetic" in DATASETS
    ds = load_dataset("synthetic", split="test", num_samples=6, shape=(1, 28, 28))
    assert ds.images.shape == (6, 1, 28, 28)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_classes": 1}, "num_classes"),
        ({"shape": (3, 0)}, "shape"),
        ({"shape": ()}, "shape"),
        ({"seed": -1}, "seed"),
        ({"noise": -0.1}, "noise"),
        ({"split": "val"}, "split"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)
