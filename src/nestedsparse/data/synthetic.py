"""Deterministic synthetic classification data for tests and smoke runs.

Each class has a fixed random prototype image; a sample is its class prototype
plus Gaussian noise. Prototypes depend only on ``seed``, so the train and test
splits share them (the task is learnable) while their samples differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._common import ImageDataset, check_split

__all__ = ["make_synthetic"]

_SPLIT_IDS = {"train": 1, "test": 2}


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, stream)`` without collisions between streams."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_args(
    num_samples: int, num_classes: int, shape: Sequence[int], seed: int, noise: float
) -> None:
    """Validate the arguments of :func:`make_synthetic`."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if len(shape) == 0 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")


def make_synthetic(
    num_samples: int = 256,
    num_classes: int = 10,
    shape: Sequence[int] = (1, 28, 28),
    *,
    seed: int = 0,
    split: str = "train",
    noise: float = 1.0,
) -> ImageDataset:
    """Build a deterministic dataset of float32 images ``[num_samples, *shape]`` and int64 labels.

    Labels are balanced (each class appears ``num_samples // num_classes`` or one
    more times) and shuffled. The same arguments always give the same tensors.

    Args:
        num_samples: number of samples.
        num_classes: number of classes (>= 2).
        shape: shape of one sample, e.g. ``(1, 28, 28)`` or ``(3, 32, 32)``.
        seed: base seed; prototypes depend only on it.
        split: ``"train"`` or ``"test"``; selects an independent sample stream.
        noise: standard deviation of the per-sample Gaussian noise.
    """
    check_split(split)
    shape = tuple(shape)
    _check_args(num_samples, num_classes, shape, seed, noise)
    prototypes = torch.randn((num_classes, *shape), generator=_generator(seed, 0))
    sample_gen = _generator(seed, _SPLIT_IDS[split])
    labels = torch.arange(num_samples, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(num_samples, generator=sample_gen)]
    images = prototypes[labels] + noise * torch.randn((num_samples, *shape), generator=sample_gen)
    return ImageDataset(
        images.to(torch.float32),
        labels,
        name="synthetic",
        classes=tuple(f"class_{i}" for i in range(num_classes)),
    )
