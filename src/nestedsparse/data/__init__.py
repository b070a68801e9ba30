"""Dataset loaders: Fashion-MNIST, CIFAR-10/100 and deterministic synthetic data.

Use :func:`load_dataset` with one of :data:`DATASETS`. Real data sets are read
from local files only (see each loader for the folder search order); nothing is
downloaded unless you call :func:`download_fashion_mnist` yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import (
    DATA_ENV_VAR,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    PathLike,
)
from .cifar import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR100_COARSE_CLASSES,
    CIFAR_STATS,
    RestrictedUnpickler,
    find_cifar,
    load_cifar10,
    load_cifar100,
    load_cifar_batch,
)
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    download_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from .hierarchy import (
    FASHION_MNIST_COARSE_CLASSES,
    FASHION_MNIST_HIERARCHY,
    FASHION_MNIST_HIERARCHY_GROUPS,
    HIERARCHIES,
    coarse_labels,
    mapping_from_dataset,
    mapping_from_groups,
    resolve_hierarchy,
)
from .synthetic import make_synthetic

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "CIFAR100_COARSE_CLASSES",
    "CIFAR_STATS",
    "DATASETS",
    "DATA_ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_COARSE_CLASSES",
    "FASHION_MNIST_HIERARCHY",
    "FASHION_MNIST_HIERARCHY_GROUPS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageDataset",
    "RestrictedUnpickler",
    "coarse_labels",
    "HIERARCHIES",
    "resolve_hierarchy",
    "mapping_from_dataset",
    "download_fashion_mnist",
    "find_cifar",
    "find_fashion_mnist",
    "load_cifar10",
    "load_cifar100",
    "load_cifar_batch",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "mapping_from_groups",
    "read_idx",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "synthetic")

_FILE_LOADERS: dict[str, Callable[[PathLike | None, str], ImageDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def load_dataset(
    name: str, root: PathLike | None = None, split: str = "train", **options: Any
) -> ImageDataset:
    """Load data set ``name`` (one of :data:`DATASETS`) for ``split`` ("train" or "test").

    Args:
        name: ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"synthetic"``.
        root: folder to search first (ignored by ``"synthetic"``).
        split: ``"train"`` or ``"test"``.
        **options: only for ``"synthetic"``: keyword arguments of :func:`make_synthetic`.

    Returns:
        An :class:`ImageDataset` (a ``TensorDataset`` of float32 images and int64 labels).

    Raises:
        ValueError: unknown name or split.
        TypeError: ``options`` given for a file-based data set.
        DatasetNotFoundError: the files are not in any searched folder.
        DatasetFormatError: a file is malformed.
    """
    if name == "synthetic":
        return make_synthetic(split=split, **options)
    if name not in _FILE_LOADERS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {list(DATASETS)}")
    if options:
        raise TypeError(
            f"dataset {name!r} takes no extra options, got {sorted(options)}; "
            "extra options are only for 'synthetic'"
        )
    return _FILE_LOADERS[name](root, split)
