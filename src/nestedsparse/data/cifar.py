"""CIFAR-10 and CIFAR-100 from the standard "python version" pickle folders.

Expected layout (as extracted from the official ``*-python.tar.gz`` archives)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    cifar-100-python/train, test

The ``root`` folder may be the batches folder itself or its parent; after
``root``, ``$NESTEDSPARSE_DATA`` is searched the same way. Pickle files are read
with a restricted unpickler that can only rebuild numpy arrays, so a hostile
file cannot run code.
"""

from __future__ import annotations

import codecs
import functools
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

from ._common import (
    DatasetFormatError,
    ImageDataset,
    PathLike,
    candidate_dirs,
    check_split,
    find_dataset_dir,
    format_searched,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "CIFAR100_COARSE_CLASSES",
    "CIFAR_STATS",
    "find_cifar",
    "load_cifar10",
    "load_cifar100",
    "load_cifar_batch",
]

#: CIFAR-10 class names; index ``i`` is label ``i``.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

#: CIFAR-100 fine class names (alphabetical, as in the official ``meta`` file).
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

#: CIFAR-100 coarse (super-class) names; index ``i`` is coarse label ``i``.
CIFAR100_COARSE_CLASSES: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers",
    "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals",
    "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)  # fmt: skip

#: Per-channel (mean, std) of the training images scaled to [0, 1].
CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Spec:
    """Where one CIFAR variant lives and how its labels are stored."""

    name: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: str
    classes: tuple[str, ...]
    coarse_key: str | None = None
    coarse_classes: tuple[str, ...] | None = None
    download_hint: str = ""


_CIFAR10 = _Spec(
    name="cifar10",
    folder="cifar-10-batches-py",
    files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key="labels",
    classes=CIFAR10_CLASSES,
    download_hint="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)
_CIFAR100 = _Spec(
    name="cifar100",
    folder="cifar-100-python",
    files={"train": ("train",), "test": ("test",)},
    label_key="fine_labels",
    classes=CIFAR100_CLASSES,
    coarse_key="coarse_labels",
    coarse_classes=CIFAR100_COARSE_CLASSES,
    download_hint="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)


# ------------------------------------------------------------- safe unpickling


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to what protocol-2 pickles of bytes use."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may reference: numpy array rebuilding."""
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _np_multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = _np_numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only resolves numpy array reconstruction."""

    _ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; refuse anything else with UnpicklingError."""
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy array "
                "reconstruction is allowed in a CIFAR file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (CIFAR files have none)."""
        raise pickle.UnpicklingError("refusing persistent id: CIFAR files have none")


def _safe_unpickle(path: Path) -> dict[str, Any]:
    """Unpickle ``path`` safely and return its top-level dict with str keys."""
    data = path.read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any unpickling fault is a format fault of this file
        raise DatasetFormatError(f"{path}: not a valid CIFAR pickle: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: top-level object is {type(obj).__name__}, expected dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# ------------------------------------------------------------------ validation


def _labels_array(
    batch: dict[str, Any], key: str, count: int, limit: int, path: Path
) -> np.ndarray:
    """Extract ``batch[key]`` as int64 [count] with values in 0..limit-1."""
    if key not in batch:
        raise DatasetFormatError(f"{path}: missing key {key!r} (keys: {sorted(batch)})")
    try:
        labels = np.asarray(batch[key])
    except (TypeError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: {key!r} is not a list of integers: {exc}") from exc
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise DatasetFormatError(
            f"{path}: {key!r} must be {count} integers (one per image), got "
            f"shape {labels.shape} of dtype {labels.dtype}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= limit))
    if bad.size:
        raise DatasetFormatError(
            f"{path}: {key!r} value {int(labels[bad[0]])} at index {int(bad[0])} is outside "
            f"0..{limit - 1}"
        )
    return labels.astype(np.int64)


def _images_array(batch: dict[str, Any], path: Path) -> np.ndarray:
    """Extract ``batch["data"]`` and check it is uint8 [N, 3072]."""
    if "data" not in batch:
        raise DatasetFormatError(f"{path}: missing key 'data' (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray):
        raise DatasetFormatError(f"{path}: 'data' must be a numpy array, got {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DatasetFormatError(
            f"{path}: 'data' must be uint8 of shape (N, {_PIXELS}), got {data.dtype} {data.shape}"
        )
    return data


@functools.lru_cache(maxsize=12)
def _load_batch_cached(
    path: str, mtime_ns: int, size: int, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Parse and validate one batch file; memoised on the file's identity and version."""
    del mtime_ns, size  # only part of the cache key
    spec = _spec(name)
    file = Path(path)
    batch = _safe_unpickle(file)
    images = _images_array(batch, file)
    labels = _labels_array(batch, spec.label_key, len(images), len(spec.classes), file)
    coarse = None
    if spec.coarse_key is not None and spec.coarse_classes is not None:
        coarse = _labels_array(batch, spec.coarse_key, len(images), len(spec.coarse_classes), file)
    for array in (images, labels, coarse):
        if array is not None:
            array.setflags(write=False)
    return images, labels, coarse


def load_cifar_batch(
    path: PathLike, name: str = "cifar10"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Safely read one batch file: uint8 images [N, 3072], int64 labels, coarse labels or None.

    Raises:
        DatasetFormatError: unsafe or malformed pickle, bad shapes or label ranges.
    """
    spec = _spec(name)
    file = Path(path)
    stat = file.stat()
    return _load_batch_cached(str(file.resolve()), stat.st_mtime_ns, stat.st_size, spec.name)


# ---------------------------------------------------------------------- loading


def _spec(name: str) -> _Spec:
    """The spec of ``"cifar10"`` or ``"cifar100"`` (dashes allowed)."""
    key = name.lower().replace("-", "")
    specs = {"cifar10": _CIFAR10, "cifar100": _CIFAR100}
    if key not in specs:
        raise ValueError(f"unknown CIFAR variant {name!r}; allowed: ['cifar10', 'cifar100']")
    return specs[key]


def _not_found_message(spec: _Spec, split: str, searched: Sequence[Path]) -> str:
    """One message listing every way to provide the CIFAR files."""
    files = ", ".join(spec.files[split])
    return (
        f"{spec.name.upper()} ({split} split) not found: no folder holds {files} "
        f"(in {spec.folder}/ or directly).\nSearched:\n{format_searched(searched)}\n"
        "Get it in any one of these ways:\n"
        "  1. point to the folder: --data-dir DIR on the command line, or root=DIR in Python;\n"
        f"  2. set $NESTEDSPARSE_DATA to a folder holding {spec.folder}/ (or to it);\n"
        f"  3. download {spec.download_hint} and extract it into that folder "
        "(tar xzf ARCHIVE -C DIR)."
    )


def find_cifar(name: str, root: PathLike | None = None, split: str = "train") -> Path:
    """Return the first searched folder holding the batch files of ``split``.

    Raises:
        DatasetNotFoundError: none does; the message lists every way to get them.
    """
    spec = _spec(name)
    check_split(split)
    searched = candidate_dirs(root, spec.folder)
    return find_dataset_dir(
        searched,
        lambda d: all((d / f).is_file() for f in spec.files[split]),
        lambda dirs: _not_found_message(spec, split, dirs),
    )


def _normalize(images: np.ndarray, spec: _Spec) -> torch.Tensor:
    """uint8 [N, 3072] -> float32 [N, 3, 32, 32] normalised per channel."""
    mean, std = CIFAR_STATS[spec.name]
    x = images.astype(np.float32).reshape(len(images), 3, 32, 32)
    x /= 255.0
    x -= np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(x)


def _load(name: str, root: PathLike | None, split: str) -> ImageDataset:
    """Load and concatenate every batch file of one split."""
    spec = _spec(name)
    folder = find_cifar(spec.name, root, split)
    parts = [load_cifar_batch(folder / f, spec.name) for f in spec.files[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    coarse = None
    if spec.coarse_key is not None:
        coarse = torch.from_numpy(np.concatenate([p[2] for p in parts if p[2] is not None]))
    return ImageDataset(
        _normalize(images, spec),
        torch.from_numpy(labels),
        name=spec.name,
        classes=spec.classes,
        coarse_targets=coarse,
        coarse_classes=spec.coarse_classes,
    )


def load_cifar10(root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """Load CIFAR-10 as normalised float32 [N, 3, 32, 32] images and int64 labels 0..9."""
    return _load("cifar10", root, split)


def load_cifar100(root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """Load CIFAR-100: float32 [N, 3, 32, 32] images, int64 fine labels, ``coarse_targets``."""
    return _load("cifar100", root, split)
