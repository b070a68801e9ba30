"""Fashion-MNIST from IDX files (gzipped ``*-idx?-ubyte.gz`` or plain).

The folder is searched in this order: the explicit ``root`` argument,
``$NESTEDSPARSE_DATA`` (the folder itself or its ``fashion-mnist`` subfolder),
then Debian's ``/usr/share/datasets/fashion-mnist`` (package
``dataset-fashion-mnist``). Nothing is ever downloaded implicitly; call
:func:`download_fashion_mnist` yourself to fetch the official files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
import shutil
import struct
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ._common import (
    DatasetFormatError,
    ImageDataset,
    PathLike,
    candidate_dirs,
    check_split,
    find_dataset_dir,
    format_searched,
)
from .hierarchy import FASHION_MNIST_COARSE_CLASSES, FASHION_MNIST_HIERARCHY, coarse_labels

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_URLS",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

logger = logging.getLogger(__name__)

#: Class names; index ``i`` is label ``i``.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Mean and standard deviation of the training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Official download locations (Zalando Research), tried in order.
FASHION_MNIST_URLS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

_SUBFOLDER = "fashion-mnist"
_IMAGE_SIZE = 28
_NUM_CLASSES = 10
_SPLIT_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# SHA-256 and size of the *decompressed* official IDX files. Hashing the payload
# rather than the .gz archive accepts any faithful re-compression (Debian ships
# re-compressed archives) while still pinning every byte of the data.
_PAYLOAD_SHA256: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    "train-labels-idx1-ubyte": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
    "t10k-images-idx3-ubyte": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    "t10k-labels-idx1-ubyte": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
}

_IDX_UBYTE = 0x08
_CHUNK = 1 << 22


# --------------------------------------------------------------------------- IDX


def _read_exact(stream: BinaryIO, size: int, path: Path, what: str) -> bytes:
    """Read exactly ``size`` bytes (in chunks) or raise a truncation error."""
    parts: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(min(remaining, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    data = b"".join(parts)
    if len(data) != size:
        raise DatasetFormatError(
            f"{path}: truncated {what}: expected {size} bytes, found only {len(data)}"
        )
    return data


def _parse_idx_header(stream: BinaryIO, path: Path, expected_ndim: int | None) -> tuple[int, ...]:
    """Parse and check the magic number and dimensions; return the dims."""
    magic = _read_exact(stream, 4, path, "header")
    number = int.from_bytes(magic, "big")
    if magic[0] != 0 or magic[1] != 0:
        raise DatasetFormatError(
            f"{path}: wrong magic number 0x{number:08X}: an IDX file starts with two zero bytes"
        )
    if magic[2] != _IDX_UBYTE:
        raise DatasetFormatError(
            f"{path}: magic number 0x{number:08X} has data type code 0x{magic[2]:02X}; "
            f"only 0x{_IDX_UBYTE:02X} (unsigned byte) is supported"
        )
    ndim = magic[3]
    if ndim == 0 or (expected_ndim is not None and ndim != expected_ndim):
        wanted = expected_ndim if expected_ndim is not None else "at least 1"
        raise DatasetFormatError(
            f"{path}: magic number 0x{number:08X} declares {ndim} dimensions, expected {wanted}"
        )
    dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, path, "dimension sizes"))
    return tuple(int(d) for d in dims)


def _parse_idx(stream: BinaryIO, path: Path, expected_ndim: int | None) -> np.ndarray:
    """Parse a whole IDX stream; the payload must match the header exactly."""
    dims = _parse_idx_header(stream, path, expected_ndim)
    count = math.prod(dims)
    payload = _read_exact(stream, count, path, f"payload for shape {dims}")
    if stream.read(1):
        raise DatasetFormatError(
            f"{path}: padded payload: found bytes after the {count} declared by shape {dims}"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_idx(path: PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped when its name ends in ``.gz``).

    Args:
        path: the file.
        expected_ndim: if given, the number of dimensions the header must declare.

    Returns:
        A read-only ``uint8`` array shaped as the header declares.

    Raises:
        DatasetFormatError: bad magic number, data type, dimension count,
            truncated or padded payload, or corrupt gzip data.
    """
    path = Path(path)
    if not path.name.endswith(".gz"):
        with path.open("rb") as stream:
            return _parse_idx(stream, path, expected_ndim)
    try:
        with gzip.open(path, "rb") as stream:
            return _parse_idx(stream, path, expected_ndim)  # type: ignore[arg-type]
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt gzip data: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int, expected_ndim: int) -> np.ndarray:
    """Memoised :func:`read_idx`, keyed on the file's identity and version."""
    del mtime_ns, size  # only part of the cache key
    array = read_idx(path, expected_ndim)
    array.setflags(write=False)
    return array


def _read_idx_file(path: Path, expected_ndim: int) -> np.ndarray:
    """Read ``path`` through the in-memory cache."""
    stat = path.stat()
    return _read_idx_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, expected_ndim)


# ---------------------------------------------------------------------- locating


def _locate(folder: Path, stem: str) -> Path | None:
    """The ``stem.gz`` or plain ``stem`` file in ``folder``, preferring gzip."""
    for name in (f"{stem}.gz", stem):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _not_found_message(split: str, searched: Sequence[Path]) -> str:
    """The one message that lists every way to get Fashion-MNIST."""
    images, labels = _SPLIT_STEMS[split]
    return (
        f"Fashion-MNIST ({split} split) not found: no folder holds {images}[.gz] "
        f"and {labels}[.gz].\nSearched:\n{format_searched(searched)}\n"
        "Get it in any one of these ways:\n"
        "  1. point to a folder holding the files: --data-dir DIR on the command line, "
        "or root=DIR in Python;\n"
        "  2. set $NESTEDSPARSE_DATA to that folder, or to a folder with a "
        "fashion-mnist/ subfolder;\n"
        "  3. on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
        f"(installs {FASHION_MNIST_SYSTEM_DIR});\n"
        '  4. download the official files: python -c "import nestedsparse.data as d; '
        "d.download_fashion_mnist('DIR')\", then use 1 or 2."
    )


def find_fashion_mnist(root: PathLike | None = None, split: str = "train") -> Path:
    """Return the first searched folder holding the IDX files of ``split``.

    Raises:
        DatasetNotFoundError: no folder has them; the message lists every way to get them.
    """
    check_split(split)
    searched = candidate_dirs(root, _SUBFOLDER, [FASHION_MNIST_SYSTEM_DIR])
    folder = find_dataset_dir(
        searched,
        lambda d: all(_locate(d, stem) is not None for stem in _SPLIT_STEMS[split]),
        lambda dirs: _not_found_message(split, dirs),
    )
    if root is not None and Path(root).expanduser() not in (folder, folder.parent):
        logger.warning("Fashion-MNIST not in %s; using %s instead", root, folder)
    return folder


# ----------------------------------------------------------------------- loading


def _check_arrays(
    images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path
) -> None:
    """Check image size, label range and matching counts."""
    rows, cols = images.shape[1:]
    if (rows, cols) != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise DatasetFormatError(
            f"{images_path}: images are {rows}x{cols}, Fashion-MNIST images are "
            f"{_IMAGE_SIZE}x{_IMAGE_SIZE}"
        )
    if len(images) != len(labels):
        raise DatasetFormatError(
            f"count mismatch: {images_path} has {len(images)} images but "
            f"{labels_path} has {len(labels)} labels"
        )
    bad = np.flatnonzero(labels >= _NUM_CLASSES)
    if bad.size:
        raise DatasetFormatError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
            f"0..{_NUM_CLASSES - 1} ({bad.size} bad labels in total)"
        )


def _normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float32 [N, 1, 28, 28]."""
    x = images.astype(np.float32).reshape(len(images), 1, _IMAGE_SIZE, _IMAGE_SIZE)
    x /= 255.0
    x -= FASHION_MNIST_MEAN
    x /= FASHION_MNIST_STD
    return torch.from_numpy(x)


def load_fashion_mnist(root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """Load a Fashion-MNIST split as normalised float32 [N, 1, 28, 28] images and int64 labels.

    The returned dataset also carries ``coarse_targets`` from
    :data:`~nestedsparse.data.hierarchy.FASHION_MNIST_HIERARCHY`.

    Raises:
        DatasetNotFoundError: no searched folder holds the files.
        DatasetFormatError: a file is malformed (the message names it).
    """
    folder = find_fashion_mnist(root, split)
    images_stem, labels_stem = _SPLIT_STEMS[split]
    images_path = _locate(folder, images_stem)
    labels_path = _locate(folder, labels_stem)
    assert images_path is not None and labels_path is not None  # checked by find_fashion_mnist
    images = _read_idx_file(images_path, 3)
    labels = _read_idx_file(labels_path, 1)
    _check_arrays(images, labels, images_path, labels_path)
    targets = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(
        _normalize(images),
        targets,
        name="fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
        coarse_targets=coarse_labels(targets, FASHION_MNIST_HIERARCHY),
        coarse_classes=FASHION_MNIST_COARSE_CLASSES,
    )


# ---------------------------------------------------------------------- download


def _payload_problem(path: Path, stem: str) -> str | None:
    """Why the gzip file ``path`` is not the official ``stem`` payload, or None if it is."""
    expected_sha, expected_size = _PAYLOAD_SHA256[stem]
    digest = hashlib.sha256()
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while size <= expected_size:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        return f"corrupt gzip data ({exc})"
    if size != expected_size:
        return f"decompressed size {size} bytes, expected {expected_size}"
    if digest.hexdigest() != expected_sha:
        return f"SHA-256 {digest.hexdigest()} of the content, expected {expected_sha}"
    return None


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` (overwriting it)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)


def _download_one(stem: str, target: Path, timeout: float) -> None:
    """Fetch ``stem.gz`` from the first URL that yields verified content."""
    failures: list[str] = []
    bad_content = False
    partial = target.with_name(target.name + ".part")
    for base in FASHION_MNIST_URLS:
        url = base + target.name
        try:
            _fetch(url, partial, timeout)
        except OSError as exc:
            failures.append(f"{url}: {exc}")
            continue
        problem = _payload_problem(partial, stem)
        if problem is None:
            os.replace(partial, target)
            return
        bad_content = True
        failures.append(f"{url}: {problem}")
    partial.unlink(missing_ok=True)
    message = f"could not download {target.name}:\n  " + "\n  ".join(failures)
    raise DatasetFormatError(message) if bad_content else OSError(message)


def download_fashion_mnist(
    dest: PathLike, *, overwrite: bool = False, timeout: float = 60.0
) -> Path:
    """Download the 4 official Fashion-MNIST ``.gz`` files into ``dest`` and verify them.

    Every file is checked against the SHA-256 of the official content before it
    is moved into place; files already present and valid are kept unless
    ``overwrite`` is true. Only ever called explicitly: loaders never download.

    Returns:
        ``dest`` as a Path, usable as ``root=`` or ``$NESTEDSPARSE_DATA``.

    Raises:
        DatasetFormatError: a download did not match the official checksum.
        OSError: no URL could be reached.
    """
    folder = Path(dest).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for stem in _PAYLOAD_SHA256:
        target = folder / f"{stem}.gz"
        if target.is_file() and not overwrite and _payload_problem(target, stem) is None:
            logger.info("%s already present and verified", target)
            continue
        logger.info("downloading %s", target.name)
        _download_one(stem, target, timeout)
    return folder
