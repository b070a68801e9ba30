"""NestedCSR: one CSR-like structure that holds every nested sparsity level.

A prunable weight ``W`` (Linear ``[out, in]`` or Conv2d ``[out, in/groups, kh, kw]``,
viewed as the 2-D matrix ``[out, in*kh*kw/groups]``) comes with a *level map*
``M`` of the same shape: ``M[r, c]`` is the lowest level at which the weight is
active.  ``mask(k) = M <= k`` so level 0 (sparsest) ⊆ level 1 ⊆ ... ⊆ level L-1.
:class:`NestedCSR` stores the levels ``0 .. num_levels-1``; an entry whose level
is ``>= num_levels`` is not stored (pass ``num_levels = L - 1`` to leave out a
dense top level, which is run from the dense weight instead).

Layout (``R = rows = shape[0]``, ``C = cols = shape[1]``, ``L = num_levels``)::

    row_offsets  [R + 1]       int32 (int64 if nnz >= 2**31)  row r = [row_offsets[r], row_offsets[r+1])
    level_counts [R, L - 1]    uint8 | uint16 | int32          level_counts[r, k] = nnz of row r at level k
    col_indices  [nnz]         uint8 | uint16 | int32          smallest that holds C - 1
    values       [nnz]         float32 | int8
    scales       [R] float32 (int8 only; None for float32)     w = values * scales[row]

Inside a row, entries are ordered by (level, column).  Hence level ``k`` of row
``r`` is the *prefix* slice ``[row_offsets[r], row_offsets[r] + level_counts[r, k])``
for ``k < L - 1`` and the whole row ``[row_offsets[r], row_offsets[r + 1])`` for
``k = L - 1`` (the last level's count would be redundant and is not stored).
Every level is run from the same arrays: no copy per level.

Invariants (checked by :func:`validate`; :func:`from_dense` builds them):

* dtypes exactly as above (native byte order; the column dtype holds ``C - 1``), 1-D / 2-D
  shapes as above;
* ``row_offsets[0] == 0``, non-decreasing, ``row_offsets[-1] == len(values) == len(col_indices)``;
* ``0 <= level_counts[r, 0] <= ... <= level_counts[r, L-2] <= row length``;
* ``0 <= col_indices < C``; columns strictly increasing inside each (row, level)
  segment; no column appears twice in a row (a weight is stored once);
* float32 values finite; int8 values in ``[-127, 127]``; scales finite and ``> 0``.

INT8: symmetric per-row quantisation, ``scale[r] = max|w| / 127`` over the row's
stored (densest stored level) weights (1.0 for an all-zero or empty row), ``q =
clip(round(w / scale), -127, 127)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

__all__ = [
    "NestedCSR",
    "NestedCSRError",
    "from_dense",
    "to_dense",
    "validate",
    "column_coding",
    "encode_columns",
    "decode_columns",
    "index_dtype_for",
    "count_dtype_for",
    "INDEX_DTYPES",
    "COUNT_DTYPES",
    "OFFSET_DTYPES",
    "VALUE_DTYPES",
]

ArrayLike = Union[np.ndarray, "Any"]  # numpy array or torch.Tensor

#: Allowed column-index dtypes, smallest first.
INDEX_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32))
#: Allowed per-row level-count dtypes, smallest first.
COUNT_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32))
#: Allowed row-offset dtypes.
OFFSET_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.int32), np.dtype(np.int64))
#: Value dtype for each ``NestedCSR.dtype`` string.
VALUE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "int8": np.dtype(np.int8)}

_MAX_DIM = 2**31 - 1  # rows and cols must fit int32 (column indices are at most int32)
_MAX_LEVELS = 255  # level maps are uint8


class NestedCSRError(ValueError):
    """A :class:`NestedCSR` breaks an invariant.

    ``fault`` names the broken invariant (one of ``"type"``, ``"dtype"``, ``"shape"``,
    ``"levels"``, ``"offsets"``, ``"nnz"``, ``"level_counts"``, ``"column_range"``,
    ``"column_order"``, ``"duplicate_column"``, ``"values"``, ``"scales"``,
    ``"malformed"``); the message starts with it.
    """

    def __init__(self, fault: str, message: str) -> None:
        super().__init__(f"{fault}: {message}")
        self.fault = fault


def index_dtype_for(cols: int) -> np.dtype:
    """Smallest column-index dtype (uint8, uint16, int32) that holds ``cols - 1``."""
    if cols <= 2**8:
        return np.dtype(np.uint8)
    if cols <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def count_dtype_for(max_count: int) -> np.dtype:
    """Smallest per-row count dtype (uint8, uint16, int32) that holds ``max_count``."""
    if max_count < 2**8:
        return np.dtype(np.uint8)
    if max_count < 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True, eq=False)
class NestedCSR:
    """All nested sparsity levels of one 2-D weight in a single CSR-like structure.

    See the module docstring for the layout and invariants.  Instances are
    immutable and compared by identity; kernels cache per-level derived arrays
    (row start/end pointers, thread partitions) in ``_cache``.

    Fields:
        shape: ``(rows, cols)`` = ``(out, in*kh*kw/groups)``.
        num_levels: number of stored levels ``L >= 1``.
        row_offsets: ``[rows + 1]`` int32/int64 start of each row (all levels).
        level_counts: ``[rows, L - 1]`` uint8/uint16/int32 nnz of row r at level k < L-1.
        col_indices: ``[nnz]`` uint8/uint16/int32 column of each entry.
        values: ``[nnz]`` float32, or int8 when ``dtype == "int8"``.
        dtype: ``"float32"`` or ``"int8"``.
        scales: ``[rows]`` float32 per-row dequantisation scale (int8), else ``None``.
    """

    shape: tuple[int, int]
    num_levels: int
    row_offsets: np.ndarray
    level_counts: np.ndarray
    col_indices: np.ndarray
    values: np.ndarray
    dtype: str = "float32"
    scales: Optional[np.ndarray] = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ levels
    def _check_level(self, level: int) -> int:
        level = int(level)
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level {level} out of range [0, {self.num_levels})")
        return level

    def level_bounds(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)`` int64 ``[rows]``: level ``level`` of row r is ``[starts[r], ends[r])``."""
        level = self._check_level(level)
        starts = self.row_offsets[:-1].astype(np.int64)
        if level == self.num_levels - 1:
            ends = self.row_offsets[1:].astype(np.int64)
        else:
            ends = starts + self.level_counts[:, level].astype(np.int64)
        return starts, ends

    def row_nnz(self, level: int) -> np.ndarray:
        """``[rows]`` int64 number of active weights of each row at ``level``."""
        level = self._check_level(level)
        if level == self.num_levels - 1:
            return np.diff(self.row_offsets.astype(np.int64))
        return self.level_counts[:, level].astype(np.int64)

    def nnz(self, level: Optional[int] = None) -> int:
        """Number of active weights at ``level`` (``None``: all stored entries = densest level)."""
        if level is None or int(level) == self.num_levels - 1:
            if level is not None:
                self._check_level(level)
            return int(self.values.shape[0])
        return int(self.row_nnz(level).sum())

    def density(self, level: int) -> float:
        """Fraction of the ``rows * cols`` weights active at ``level``."""
        rows, cols = self.shape
        return self.nnz(level) / max(1, rows * cols)

    # ------------------------------------------------------------------- sizes
    def _value_bytes(self) -> int:
        return self.values.dtype.itemsize + self.col_indices.dtype.itemsize

    def nbytes(self, level: Optional[int] = None) -> int:
        """Bytes of the arrays.

        ``level=None``: everything stored (all levels).  ``level=k``: the bytes a
        kernel touches to run level k alone: its ``nnz(k)`` values and column
        indices, the row offsets, the level-count column ``k`` (none for the
        last level) and the scales.
        """
        scale_b = 0 if self.scales is None else int(self.scales.nbytes)
        if level is None:
            return int(
                self.row_offsets.nbytes + self.level_counts.nbytes + self.col_indices.nbytes
                + self.values.nbytes + scale_b
            )
        level = self._check_level(level)
        counts_b = 0 if level == self.num_levels - 1 else self.shape[0] * self.level_counts.dtype.itemsize
        return int(self.nnz(level) * self._value_bytes() + self.row_offsets.nbytes + counts_b + scale_b)

    def plain_csr_nbytes(self, level: int) -> int:
        """Bytes of a plain single-level CSR of ``level`` with the same index/value/offset dtypes.

        ``(rows+1)`` row offsets + ``nnz(level)`` column indices and values (+ the
        per-row scales for int8): the baseline for the nested-size overhead.
        """
        level = self._check_level(level)
        scale_b = 0 if self.scales is None else int(self.scales.nbytes)
        return int(self.nnz(level) * self._value_bytes() + self.row_offsets.nbytes + scale_b)

    def stored_nbytes(self, level: Optional[int] = None) -> int:
        """Bytes of the arrays a packed file holding levels ``0 .. level`` stores (``None``: every
        level): row offsets, level counts (in the dtypes such a file uses), values, int8 scales,
        and the columns as :func:`column_coding` codes those levels (each segment as indices or a
        bitmap, whichever is smaller; none for a complete level).  Monotone in ``level``."""
        top = self.num_levels - 1 if level is None else self._check_level(level)
        rows, cols = self.shape
        bitmaps, implied = _coding(self, top)
        item = self.col_indices.dtype.itemsize
        col_b, prev = 0, 0
        for k in range(top + 1):
            n = self.nnz(k)
            if k in bitmaps:
                col_b += _bitmap_nbytes(rows, cols)
            elif implied is None or k < implied:
                col_b += (n - prev) * item
            prev = n
        count_item = count_dtype_for(int(self.row_nnz(top - 1).max())).itemsize if top and rows else 0
        offset_item = 4 if prev < 2**31 else 8
        scale_b = 0 if self.scales is None else int(self.scales.nbytes)
        return int((rows + 1) * offset_item + rows * top * count_item + prev * self.values.dtype.itemsize
                   + scale_b + col_b)

    def to_dense(self, level: int) -> np.ndarray:
        """Same as :func:`to_dense` (``[rows, cols]`` float32 weight of ``level``)."""
        return to_dense(self, level)


# ---------------------------------------------------------------------- build
def _as_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    try:  # torch.Tensor without importing torch
        return a.detach().cpu().numpy()
    except AttributeError:
        return np.asarray(a)


def from_dense(
    weight2d: ArrayLike,
    level_map2d: ArrayLike,
    num_levels: int,
    dtype: str = "float32",
) -> NestedCSR:
    """Pack a weight and its level map into a :class:`NestedCSR`.

    Args:
        weight2d: ``[rows, cols]`` weight (numpy or torch); an N-D conv weight
            ``[out, in/groups, kh, kw]`` is flattened to ``[out, in/groups*kh*kw]``.
        level_map2d: same shape, integer lowest active level of each weight.
        num_levels: levels to store (``1..255``); entries with level ``>= num_levels``
            are dropped.
        dtype: ``"float32"`` or ``"int8"`` (symmetric per-row scale, see module doc).

    Every entry active at some stored level is stored, even if its value is 0,
    so ``nnz(k) == (level_map <= k).sum()``.
    """
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'int8', got {dtype!r}")
    num_levels = int(num_levels)
    if not 1 <= num_levels <= _MAX_LEVELS:
        raise ValueError(f"num_levels must be in [1, {_MAX_LEVELS}], got {num_levels}")
    w = _as_numpy(weight2d)
    lm = _as_numpy(level_map2d)
    if w.ndim < 2:
        raise ValueError(f"weight must have >= 2 dims, got shape {w.shape}")
    if lm.shape != w.shape:
        raise ValueError(f"level map shape {lm.shape} != weight shape {w.shape}")
    if not np.issubdtype(lm.dtype, np.integer) and lm.dtype != np.bool_:
        raise ValueError(f"level map must be integer, got {lm.dtype}")
    rows = int(w.shape[0])
    flat = (rows, int(np.prod(w.shape[1:])))
    w = np.ascontiguousarray(w.reshape(flat), dtype=np.float32)
    lm = lm.reshape(flat)
    cols = int(w.shape[1])
    if rows > _MAX_DIM or cols > _MAX_DIM:
        raise ValueError(f"shape {(rows, cols)} too large")
    if lm.size and lm.min() < 0:
        raise ValueError("level map has negative entries")
    lm64 = lm.astype(np.int64)

    active = lm64 < num_levels  # [rows, cols]
    r_idx, c_idx = np.nonzero(active)  # row-major: sorted by row, then column
    lv = lm64[r_idx, c_idx]
    order = np.lexsort((c_idx, lv, r_idx))  # by row, then level, then column
    r_idx, c_idx, lv = r_idx[order], c_idx[order], lv[order]
    nnz = int(r_idx.shape[0])

    off_dtype = np.dtype(np.int32) if nnz < 2**31 else np.dtype(np.int64)
    per_level = np.bincount(r_idx * num_levels + lv, minlength=rows * num_levels).reshape(rows, num_levels)
    cum = np.cumsum(per_level, axis=1)  # [rows, L]
    row_offsets = np.zeros(rows + 1, dtype=off_dtype)
    if rows:
        row_offsets[1:] = np.cumsum(cum[:, -1])
    max_count = int(cum[:, : num_levels - 1].max()) if rows and num_levels > 1 else 0
    level_counts = np.ascontiguousarray(cum[:, : num_levels - 1].astype(count_dtype_for(max_count)))
    col_indices = c_idx.astype(index_dtype_for(cols))
    vals = w[r_idx, c_idx]

    scales: Optional[np.ndarray] = None
    if dtype == "int8":
        absmax = np.zeros(rows, dtype=np.float32)
        if nnz:
            np.maximum.at(absmax, r_idx, np.abs(vals))
        scales = np.where(absmax > 0, absmax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        q = np.rint(vals / scales[r_idx]) if nnz else vals
        values = np.clip(q, -127, 127).astype(np.int8)
    else:
        values = vals.astype(np.float32)
    return NestedCSR(
        shape=(rows, cols),
        num_levels=num_levels,
        row_offsets=row_offsets,
        level_counts=level_counts,
        col_indices=np.ascontiguousarray(col_indices),
        values=np.ascontiguousarray(values),
        dtype=dtype,
        scales=scales,
    )


def to_dense(csr: NestedCSR, level: int) -> np.ndarray:
    """Reference: the ``[rows, cols]`` float32 weight of ``level`` (int8 dequantised).

    Equals ``weight * (level_map <= level)`` for a float32 structure built by
    :func:`from_dense` (int8: the quantised weights times the row scales).
    """
    rows, cols = csr.shape
    starts, ends = csr.level_bounds(level)
    lens = ends - starts
    total = int(lens.sum())
    out = np.zeros((rows, cols), dtype=np.float32)
    if total == 0:
        return out
    r_ids = np.repeat(np.arange(rows, dtype=np.int64), lens)
    # entry positions: for each row, starts[r] + 0..len-1
    first = np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.arange(total, dtype=np.int64) - first + np.repeat(starts, lens)
    vals = csr.values[pos].astype(np.float32)
    if csr.scales is not None:
        vals = vals * csr.scales[r_ids]
    out[r_ids, csr.col_indices[pos].astype(np.int64)] = vals
    return out


# ------------------------------------------------------------ column coding
# A level segment that holds many of a row's columns costs less as a bit per column than as an
# index per entry, and a complete level (every weight: a dense top level above all) needs
# neither: its columns are the ones the levels below leave out, and the levels above it add none.
# A file stores columns that way; the in-memory structure the kernels read is always the one
# above, only the file differs.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _bitmap_nbytes(rows: int, cols: int) -> int:
    return rows * ((cols + 7) // 8)


def _coding(csr: NestedCSR, top: int) -> tuple[tuple[int, ...], Optional[int]]:
    """:func:`column_coding` of levels ``0 .. top``."""
    rows, cols = csr.shape
    full = rows * cols
    implied = next((k for k in range(top + 1) if full and csr.nnz(k) == full), None)
    bitmap, item = _bitmap_nbytes(rows, cols), csr.col_indices.dtype.itemsize
    out, prev = [], 0
    for k in range(top + 1 if implied is None else implied):
        n = csr.nnz(k)
        if bitmap < (n - prev) * item:
            out.append(k)
        prev = n
    return tuple(out), implied


def column_coding(csr: NestedCSR) -> tuple[tuple[int, ...], Optional[int]]:
    """How a file stores ``csr``'s columns: ``(bitmap levels, implied level)``.

    ``implied level``: the lowest level that holds every weight (``None`` if none does); its
    segment (the entries it adds to each row) is the columns the lower levels do not hold, and
    the levels above it add nothing, so no column of theirs is stored.  ``bitmap levels``: the
    levels below it whose segment is smaller as a ``[rows, ceil(cols / 8)]`` bitmap than as
    column indices (ties stay indices).  The other segments are stored as column indices."""
    return _coding(csr, csr.num_levels - 1)


def _segment(ro64: np.ndarray, lens: np.ndarray, lc64: Optional[np.ndarray], L: int, k: int,
             through_top: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level ``k``'s segment of every row (``through_top``: levels ``k .. L-1``'s): ``(entry
    positions, their rows, per-row lengths)``."""
    rows = lens.shape[0]
    if rows == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    lo = np.zeros(rows, dtype=np.int64) if k == 0 else lc64[:, k - 1]
    hi = lens if k == L - 1 or through_top else lc64[:, k]
    seg = hi - lo
    total = int(seg.sum())
    r_ids = np.repeat(np.arange(rows, dtype=np.int64), seg)
    pos = np.repeat(ro64[:-1] + lo - (np.cumsum(seg) - seg), seg) + np.arange(total, dtype=np.int64)
    return pos, r_ids, seg


def encode_columns(csr: NestedCSR) -> tuple[np.ndarray, Optional[np.ndarray], tuple[int, ...], Optional[int]]:
    """A file's form of ``csr.col_indices``: ``(indices, bitmaps, bitmap levels, implied level)``.

    See :func:`column_coding`.  ``bitmaps[j]`` is level ``levels[j]``'s segment as a ``[rows,
    ceil(cols / 8)]`` uint8 bitmap (column ``c`` is bit ``c % 8`` of byte ``c // 8``), or ``None``
    when no level is bitmap-coded; ``indices`` are the index-coded entries' columns in their
    order.  :func:`decode_columns` inverts it."""
    levels, implied = column_coding(csr)
    if not levels and implied is None:
        return csr.col_indices, None, (), None
    rows, cols = csr.shape
    ro64 = csr.row_offsets.astype(np.int64)
    lens = np.diff(ro64)
    lc64 = csr.level_counts.astype(np.int64)
    kept = np.ones(csr.values.shape[0], dtype=bool)
    if implied is not None:  # its segment and the (empty) ones above it
        kept[_segment(ro64, lens, lc64, csr.num_levels, implied, through_top=True)[0]] = False
    maps = np.zeros((len(levels), rows, (cols + 7) // 8), dtype=np.uint8) if levels else None
    for j, k in enumerate(levels):
        pos, r_ids, _ = _segment(ro64, lens, lc64, csr.num_levels, k)
        kept[pos] = False
        bits = np.zeros((rows, cols), dtype=bool)
        bits[r_ids, csr.col_indices[pos].astype(np.int64)] = True
        maps[j] = np.packbits(bits, axis=1, bitorder="little")
    return np.ascontiguousarray(csr.col_indices[kept]), maps, levels, implied


def decode_columns(*, shape: tuple[int, int], num_levels: int, row_offsets: np.ndarray, level_counts: np.ndarray,
                   values: np.ndarray, dtype: str, scales: Optional[np.ndarray], indices: np.ndarray,
                   bitmaps: Optional[np.ndarray], levels: Any, implied: Any) -> NestedCSR:
    """Rebuild a :class:`NestedCSR` from a file's column coding (:func:`encode_columns`).

    Safe on untrusted input: the layout (offsets, level counts) and the index dtype (it must hold
    ``cols - 1``) are checked before anything is decoded; a bitmap's per-row bit counts are
    checked on the packed bytes before it is unpacked, and its padding bits must be zero; an
    implied level needs rows complete at that level and in-range, distinct lower columns.
    Memory stays within a small multiple of the arrays present.  The result still needs
    :func:`validate` (column order, duplicates, values).  Faults raise :class:`NestedCSRError`:
    ``"column_bitmap"``, ``"nnz"``, ``"dtype"``, ``"column_range"``, ``"duplicate_column"``,
    a layout fault, or ``"malformed"``."""
    try:
        return _decode_columns(shape, num_levels, row_offsets, level_counts, values, dtype, scales, indices,
                               bitmaps, levels, implied)
    except NestedCSRError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile input must only ever give ValueError
        raise NestedCSRError("malformed", f"{type(exc).__name__}: {exc}") from exc


def _decode_columns(shape, num_levels, row_offsets, level_counts, values, dtype, scales, indices, bitmaps,
                    levels, implied) -> NestedCSR:  # type: ignore[no-untyped-def]
    _check_array("col_indices", indices, INDEX_DTYPES, 1)
    if not isinstance(values, np.ndarray):
        _fail("type", f"values must be a numpy.ndarray, got {type(values).__name__}")
    ci = np.zeros(values.shape[0] if values.ndim == 1 else 0, dtype=indices.dtype)
    shell = NestedCSR(shape=shape, num_levels=num_levels, row_offsets=row_offsets, level_counts=level_counts,
                      col_indices=ci, values=values, dtype=dtype, scales=scales)
    rows, cols, L, ro64, lens, lc64, _, _, _ = _validate_layout(shell)
    if implied is not None and not (_is_int(implied) and 0 <= implied < L):
        _fail("column_bitmap", f"the implied level must be null or a level in [0, {L}), got {implied!r}")
    below = L if implied is None else int(implied)
    if not isinstance(levels, (list, tuple)) or not all(_is_int(k) and 0 <= k < below for k in levels) or list(
            levels) != sorted(set(levels)):
        _fail("column_bitmap", f"bitmap levels must be increasing levels in [0, {below}), got {levels!r}")
    if not levels and bitmaps is not None:
        _fail("column_bitmap", "a column bitmap is stored but no level is bitmap-coded")
    if not levels and implied is None:
        return NestedCSR(shape=shape, num_levels=num_levels, row_offsets=row_offsets, level_counts=level_counts,
                         col_indices=indices, values=values, dtype=dtype, scales=scales)
    _index_dtype_holds(indices.dtype, cols)  # decoded columns are stored in it
    kept = np.ones(ci.shape[0], dtype=bool)  # the entries whose columns are stored as indices
    top_pos = None
    if implied is not None:
        full = lens if implied == L - 1 else (lc64[:, implied] if rows else lens)
        if rows * cols == 0 or (full != cols).any():
            _fail("column_bitmap", f"implied level {implied} needs every row complete at that level")
        top_pos, _, top_seg = _segment(ro64, lens, lc64, L, implied, through_top=True)
        kept[top_pos] = False
    if levels:
        nb = (cols + 7) // 8
        _check_array("col_bitmap", bitmaps, (np.dtype(np.uint8),), 3)
        if bitmaps.shape != (len(levels), rows, nb):
            _fail("column_bitmap", f"col_bitmap shape {bitmaps.shape} != (bitmap levels, rows, ceil(cols / 8)) = "
                                   f"{(len(levels), rows, nb)}")
        if cols % 8 and rows and (bitmaps[:, :, -1] >> (cols % 8)).any():
            _fail("column_bitmap", "bits past the last column are set")
    for j, k in enumerate(levels):
        pos, _, seg = _segment(ro64, lens, lc64, L, int(k))
        # bit counts on the packed bytes: nothing is unpacked before they match
        if (_POPCOUNT[bitmaps[j]].sum(axis=1, dtype=np.int64) != seg).any():
            _fail("column_bitmap", f"level {int(k)}'s bitmap does not hold as many columns per row as its "
                                   f"level counts say")
        bits = np.unpackbits(bitmaps[j], axis=1, count=cols, bitorder="little")
        ci[pos] = np.nonzero(bits)[1]  # row-major: by row, then column, as a segment is ordered
        kept[pos] = False
    n_kept = int(kept.sum())
    if indices.shape[0] != n_kept:
        _fail("nnz", f"{indices.shape[0]} column indices stored, the index-coded levels hold {n_kept}")
    ci[kept] = indices
    if top_pos is not None:  # the implied level: every column the levels below leave out, in order
        lower = np.ones(ci.shape[0], dtype=bool)
        lower[top_pos] = False
        lo_cols = ci[lower].astype(np.int64)
        if lo_cols.size and (lo_cols.min() < 0 or lo_cols.max() >= cols):
            _fail("column_range", f"column index out of range [0, {cols})")
        free = np.ones((rows, cols), dtype=bool)  # rows * cols == len(values): complete rows
        free[np.repeat(np.arange(rows, dtype=np.int64), lens)[lower], lo_cols] = False
        r_ids, c_ids = np.nonzero(free)
        if r_ids.shape[0] != top_pos.shape[0] or (np.bincount(r_ids, minlength=rows) != top_seg).any():
            _fail("duplicate_column", f"a column appears twice in one row below implied level {implied}")
        ci[top_pos] = c_ids
    return NestedCSR(shape=shape, num_levels=num_levels, row_offsets=row_offsets, level_counts=level_counts,
                     col_indices=np.ascontiguousarray(ci), values=values, dtype=dtype, scales=scales)


# ------------------------------------------------------------------- validate
def _fail(fault: str, message: str) -> None:
    raise NestedCSRError(fault, message)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_array(name: str, a: Any, dtypes: tuple[np.dtype, ...], ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        _fail("type", f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes:
        _fail("dtype", f"{name} dtype {a.dtype.str} not in {[d.name for d in dtypes]}")
    if a.ndim != ndim:
        _fail("shape", f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def validate(csr: NestedCSR) -> None:
    """Check every invariant of ``csr``; raise :class:`NestedCSRError` naming the first fault.

    Safe on untrusted input: only vectorised numpy work, ``O(nnz log nnz)`` time
    (the duplicate check sorts), memory proportional to the arrays actually
    present (never to a claimed shape).  Any unexpected failure is reported as
    fault ``"malformed"``.  Returns ``None`` when the structure is valid.
    """
    try:
        _validate(csr)
    except NestedCSRError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile input must only ever give ValueError
        raise NestedCSRError("malformed", f"{type(exc).__name__}: {exc}") from exc


def _validate(csr: NestedCSR) -> None:
    rows, cols, L, ro64, lens, lc64, ci, va, sc = _validate_layout(csr)
    nnz = int(va.shape[0])
    # ---- columns
    _index_dtype_holds(ci.dtype, cols)
    if nnz:
        ci64 = ci.astype(np.int64)
        if ci64.min() < 0 or ci64.max() >= cols:
            _fail("column_range", f"column index out of range [0, {cols})")
        # segment starts: every row start and every level boundary inside a row
        seg_start = np.zeros(nnz + 1, dtype=bool)
        seg_start[ro64[:-1]] = True
        if L > 1 and rows:
            seg_start[(ro64[:-1, None] + lc64).ravel()] = True
        same_seg = ~seg_start[1:nnz]
        if (same_seg & (ci64[1:] <= ci64[:-1])).any():
            bad = int(np.argmax(same_seg & (ci64[1:] <= ci64[:-1]))) + 1
            _fail("column_order", f"columns not strictly increasing within a (row, level) segment at entry {bad}")
        if L > 1:
            r_ids = np.repeat(np.arange(rows, dtype=np.int64), lens)
            keys = np.sort(r_ids * max(cols, 1) + ci64)
            if (keys[1:] == keys[:-1]).any():
                _fail("duplicate_column", "a column appears twice in one row")
    # ---- values and scales
    if csr.dtype == "float32":
        if nnz and not np.isfinite(va).all():
            _fail("values", "values contain NaN or Inf")
    else:
        if nnz and (va == -128).any():
            _fail("values", "int8 values must be in [-127, 127]")
        if rows and not (np.isfinite(sc).all() and (sc > 0).all()):
            _fail("scales", "scales must be finite and > 0")


def _index_dtype_holds(dt: np.dtype, cols: int) -> None:
    if cols and np.iinfo(dt).max < cols - 1:
        _fail("dtype", f"col_indices dtype {dt.name} cannot hold column {cols - 1}")


def _validate_layout(csr: NestedCSR) -> tuple:
    """The checks that do not read columns or values: types, dtypes, shapes, offsets, level counts.
    Returns ``(rows, cols, L, row_offsets int64, row lengths, level_counts int64, col_indices,
    values, scales)``."""
    if not isinstance(csr, NestedCSR):
        _fail("type", f"expected NestedCSR, got {type(csr).__name__}")
    # ---- scalars
    shape = csr.shape
    if not isinstance(shape, tuple) or len(shape) != 2 or not all(_is_int(s) for s in shape):
        _fail("shape", f"shape must be a tuple of 2 ints, got {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    if not (0 <= rows <= _MAX_DIM and 0 <= cols <= _MAX_DIM):
        _fail("shape", f"shape {shape} out of range [0, 2**31)")
    if not _is_int(csr.num_levels) or not 1 <= int(csr.num_levels) <= _MAX_LEVELS:
        _fail("levels", f"num_levels must be an int in [1, {_MAX_LEVELS}], got {csr.num_levels!r}")
    L = int(csr.num_levels)
    if not isinstance(csr.dtype, str) or csr.dtype not in VALUE_DTYPES:
        _fail("dtype", f"dtype must be 'float32' or 'int8', got {csr.dtype!r}")
    # ---- arrays: type, dtype, ndim
    ro = _check_array("row_offsets", csr.row_offsets, OFFSET_DTYPES, 1)
    lc = _check_array("level_counts", csr.level_counts, COUNT_DTYPES, 2)
    ci = _check_array("col_indices", csr.col_indices, INDEX_DTYPES, 1)
    va = _check_array("values", csr.values, (VALUE_DTYPES[csr.dtype],), 1)
    if csr.dtype == "int8":
        sc = _check_array("scales", csr.scales, (np.dtype(np.float32),), 1)
    else:
        sc = None
        if csr.scales is not None:
            _fail("scales", "scales must be None for dtype 'float32'")
    # ---- shapes
    if ro.shape[0] != rows + 1:
        _fail("shape", f"row_offsets has length {ro.shape[0]}, expected rows + 1 = {rows + 1}")
    if lc.shape != (rows, L - 1):
        _fail("levels", f"level_counts shape {lc.shape} != (rows, num_levels - 1) = {(rows, L - 1)}")
    nnz = int(va.shape[0])
    if ci.shape[0] != nnz:
        _fail("nnz", f"len(col_indices) = {ci.shape[0]} != len(values) = {nnz}")
    if sc is not None and sc.shape[0] != rows:
        _fail("shape", f"scales has length {sc.shape[0]}, expected rows = {rows}")
    # ---- offsets
    ro64 = ro.astype(np.int64)
    if ro64[0] != 0:
        _fail("offsets", f"row_offsets[0] = {int(ro64[0])}, expected 0")
    lens = np.diff(ro64)
    if lens.size and lens.min() < 0:
        bad = int(np.argmax(lens < 0))
        _fail("offsets", f"row_offsets not monotone non-decreasing at row {bad}")
    if ro64[-1] != nnz:
        _fail("offsets", f"final offset row_offsets[-1] = {int(ro64[-1])} != len(values) = {nnz}")
    # ---- level counts
    lc64 = None
    if L > 1 and rows:
        lc64 = lc.astype(np.int64)
        if lc64.min() < 0:
            _fail("level_counts", "level_counts has negative entries")
        if L > 2 and (np.diff(lc64, axis=1) < 0).any():
            _fail("level_counts", "level_counts not non-decreasing across levels (levels must be nested)")
        if (lc64[:, -1] > lens).any():
            bad = int(np.argmax(lc64[:, -1] > lens))
            _fail("level_counts", f"level_counts of row {bad} exceed its length {int(lens[bad])}")
    return rows, cols, L, ro64, lens, lc64, ci, va, sc
