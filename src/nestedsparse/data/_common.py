"""Shared pieces of the dataset loaders: errors, the dataset type and folder search."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATA_ENV_VAR",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageDataset",
    "candidate_dirs",
    "check_split",
    "find_dataset_dir",
]

#: Environment variable naming a folder that holds the data sets.
DATA_ENV_VAR = "NESTEDSPARSE_DATA"

#: The splits every loader accepts.
SPLITS = ("train", "test")

PathLike = str | os.PathLike[str]


class DatasetNotFoundError(FileNotFoundError):
    """No searched folder holds the files of the requested data set."""


class DatasetFormatError(ValueError):
    """A data set file exists but its content is malformed or unsafe."""


class ImageDataset(TensorDataset):
    """A ``TensorDataset`` of ``(image, label)`` pairs with class metadata.

    Indexing yields ``(image, label)`` exactly like ``TensorDataset``; the extra
    attributes describe the classes and, where the data set has them, coarse
    (super-class) labels aligned with ``targets``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        name: str,
        classes: Sequence[str],
        coarse_targets: torch.Tensor | None = None,
        coarse_classes: Sequence[str] | None = None,
    ) -> None:
        """Wrap ``images`` [N, C, H, W] and int64 ``targets`` [N]."""
        super().__init__(images, targets)
        if coarse_targets is not None and coarse_targets.shape != targets.shape:
            raise ValueError(
                f"coarse_targets has shape {tuple(coarse_targets.shape)}, "
                f"expected {tuple(targets.shape)} like targets"
            )
        self.name = name
        self.classes = tuple(classes)
        self.coarse_targets = coarse_targets
        self.coarse_classes = tuple(coarse_classes) if coarse_classes is not None else None

    @property
    def images(self) -> torch.Tensor:
        """All images as one float tensor [N, C, H, W]."""
        return self.tensors[0]

    @property
    def targets(self) -> torch.Tensor:
        """All fine labels as one int64 tensor [N]."""
        return self.tensors[1]

    @property
    def num_classes(self) -> int:
        """Number of (fine) classes."""
        return len(self.classes)

    def __repr__(self) -> str:
        """Short description: name, size and image shape."""
        shape = tuple(self.images.shape[1:])
        return f"ImageDataset(name={self.name!r}, len={len(self)}, image_shape={shape})"


def check_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"test"``, else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


def candidate_dirs(
    root: PathLike | None,
    subfolder: str,
    system_dirs: Iterable[PathLike] = (),
) -> list[Path]:
    """Folders to search, in order: ``root``, ``$NESTEDSPARSE_DATA``, system folders.

    ``root`` and the environment folder are each tried as the data folder itself
    and as the parent of ``subfolder``.
    """
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        bases.append(Path(env).expanduser())
    dirs: list[Path] = []
    for base in bases:
        dirs.extend([base, base / subfolder])
    dirs.extend(Path(d) for d in system_dirs)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_dataset_dir(
    candidates: Sequence[Path],
    has_files: Callable[[Path], bool],
    not_found_message: Callable[[Sequence[Path]], str],
) -> Path:
    """Return the first folder of ``candidates`` for which ``has_files`` is true.

    Raises:
        DatasetNotFoundError: none qualifies; the message comes from
            ``not_found_message(candidates)``.
    """
    for folder in candidates:
        if folder.is_dir() and has_files(folder):
            return folder
    raise DatasetNotFoundError(not_found_message(candidates))


def format_searched(candidates: Sequence[Path]) -> str:
    """Render the searched folders as an indented list for error messages."""
    if not candidates:
        return "  (no folder: no root given and $NESTEDSPARSE_DATA unset)"
    return "\n".join(f"  - {c}" for c in candidates)
