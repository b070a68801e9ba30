"""NestedCSR layout: round trip, nested prefixes, dtypes, sizes, validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedsparse.levels import level_map_from_scores
from nestedsparse.pack.csr import (
    NestedCSR,
    NestedCSRError,
    column_coding,
    decode_columns,
    encode_columns,
    from_dense,
    to_dense,
    validate,
)


def _random_layer(rows: int, cols: int, L: int, seed: int = 0, never: float = 0.2):
    """Weight and a level map with values 0..L (L = never active) drawn at random."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    lm = rng.integers(0, L, size=(rows, cols)).astype(np.uint8)
    lm[rng.random((rows, cols)) < never] = L
    return w, lm


def _score_levels(rows: int, cols: int, densities, seed: int = 0):
    """Level map keeping the top densities[k] fraction of random scores at level k."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    scores = torch.from_numpy(rng.random((rows, cols)))
    counts = [int(round(d * rows * cols)) for d in densities]
    return w, level_map_from_scores(scores, counts, len(densities)).numpy()


SHAPES = [(7, 5), (13, 29), (1, 1), (4, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("L", [1, 2, 4])
def test_round_trip_every_level(shape, L):
    w, lm = _random_layer(*shape, L, seed=shape[0] * 31 + L)
    csr = from_dense(w, lm, L)
    validate(csr)
    assert csr.shape == shape and csr.num_levels == L
    assert csr.level_counts.shape == (shape[0], L - 1)
    for k in range(L):
        np.testing.assert_array_equal(to_dense(csr, k), w * (lm <= k))
        assert csr.nnz(k) == int((lm <= k).sum())


def test_entries_above_num_levels_dropped_and_torch_input():
    w, lm = _random_layer(13, 29, 4)
    csr = from_dense(torch.from_numpy(w), torch.from_numpy(lm.astype(np.int64)), 3)
    assert csr.nnz() == int((lm < 3).sum())
    for k in range(3):
        np.testing.assert_array_equal(csr.to_dense(k), w * (lm <= k))


def test_conv_weight_is_flattened():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    lm = rng.integers(0, 3, size=w.shape).astype(np.uint8)
    csr = from_dense(w, lm, 3)
    assert csr.shape == (6, 27)
    np.testing.assert_array_equal(to_dense(csr, 1), (w * (lm <= 1)).reshape(6, 27))


def test_each_level_is_a_prefix_of_every_row():
    w, lm = _random_layer(13, 29, 4, seed=3)
    csr = from_dense(w, lm, 4)
    ro = csr.row_offsets
    for r in range(13):
        row_cols = csr.col_indices[ro[r]:ro[r + 1]].astype(int)
        row_levels = lm[r, row_cols]
        assert np.all(np.diff(row_levels.astype(int)) >= 0), "entries not ordered by level"
        for k in range(4):
            n = csr.row_nnz(k)[r]
            assert set(row_cols[:n]) == set(np.flatnonzero(lm[r] <= k))
            seg = row_cols[(csr.row_nnz(k - 1)[r] if k else 0):n]
            assert np.all(np.diff(seg) > 0), "columns not increasing inside a level"


def test_int8_round_trip_and_scales():
    w, lm = _random_layer(13, 29, 3, seed=5)
    csr = from_dense(w, lm, 3, dtype="int8")
    validate(csr)
    assert csr.values.dtype == np.int8 and csr.scales.dtype == np.float32
    dense_levels = w * (lm <= 2)
    np.testing.assert_allclose(csr.scales, np.abs(dense_levels).max(1) / 127, rtol=1e-6)
    for k in range(3):
        ref = w * (lm <= k)
        got = to_dense(csr, k)
        assert np.all((got != 0) <= (lm <= k))
        assert np.all(np.abs(got - ref) <= csr.scales[:, None] / 2 + 1e-7)


def test_int8_empty_rows_get_unit_scale():
    w = np.zeros((3, 4), np.float32)
    lm = np.full((3, 4), 2, np.uint8)
    lm[1, 2] = 0
    csr = from_dense(w, lm, 2, dtype="int8")
    validate(csr)
    np.testing.assert_array_equal(csr.scales, np.ones(3, np.float32))


@pytest.mark.parametrize(
    "cols,expected", [(5, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.int32)]
)
def test_index_dtype_minimal(cols, expected):
    w = np.ones((1, cols), np.float32)
    lm = np.zeros((1, cols), np.uint8)
    lm[0, ::2] = 1
    csr = from_dense(w, lm, 2)
    assert csr.col_indices.dtype == expected
    assert csr.row_offsets.dtype == np.int32
    # level counts hold at most the row length
    max_count = (cols + 1) // 2
    assert csr.level_counts.dtype == (np.uint8 if max_count < 256 else np.uint16 if max_count < 65536 else np.int32)
    validate(csr)


def test_nbytes_monotone_in_level():
    w, lm = _score_levels(64, 96, (0.05, 0.1, 0.25, 0.6))
    for dt in ("float32", "int8"):
        csr = from_dense(w, lm, 4, dtype=dt)
        sizes = [csr.nbytes(k) for k in range(4)]
        assert sizes == sorted(sizes) and len(set(sizes)) == 4
        assert csr.nbytes() >= sizes[-1]
        assert [csr.plain_csr_nbytes(k) for k in range(4)] == sorted(csr.plain_csr_nbytes(k) for k in range(4))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_nested_size_within_10pct_of_plain_csr(dtype):
    # levels (0.05, 0.1, 0.25, 1.0): level 3 is dense and is not stored; the densest sparse level is 0.25
    w, lm = _score_levels(256, 256, (0.05, 0.1, 0.25, 1.0))
    csr = from_dense(w, lm, num_levels=3, dtype=dtype)
    assert abs(csr.density(2) - 0.25) < 1e-3
    ratio = csr.nbytes() / csr.plain_csr_nbytes(2)
    assert ratio <= 1.10, ratio
    # and the arithmetic of the plain CSR is what it says
    item = csr.values.itemsize + csr.col_indices.itemsize
    extra = 0 if csr.scales is None else 4 * 256
    assert csr.plain_csr_nbytes(2) == csr.nnz(2) * item + 257 * 4 + extra


def test_level_argument_checked():
    w, lm = _random_layer(7, 5, 2)
    csr = from_dense(w, lm, 2)
    with pytest.raises(ValueError):
        to_dense(csr, 2)
    with pytest.raises(ValueError):
        csr.nnz(-1)
    with pytest.raises(ValueError):
        from_dense(w, lm, 2, dtype="float16")
    with pytest.raises(ValueError):
        from_dense(w, lm[:, :3], 2)


# ------------------------------------------------------------------ validation
def _base(dtype="float32"):
    w, lm = _random_layer(7, 5, 3, seed=11, never=0.1)
    return from_dense(w, lm, 3, dtype=dtype)


def _with(csr, **kw):
    return dataclasses.replace(csr, **kw)


def _arr(csr, name, fn):
    a = getattr(csr, name).copy()
    fn(a)
    return _with(csr, **{name: a})


def _row_with_two_in_level0(csr):
    for r in range(csr.shape[0]):
        if csr.level_counts[r, 0] >= 2:
            return r
    raise AssertionError("fixture has no row with 2 level-0 entries")


def _swap_first_two(csr):
    r = _row_with_two_in_level0(csr)
    s = csr.row_offsets[r]
    ci = csr.col_indices.copy()
    ci[s], ci[s + 1] = ci[s + 1], ci[s]
    return _with(csr, col_indices=ci)


def _duplicate_across_levels(csr):
    # copy a level-0 column into the same row's level-1 segment (keeping that segment sorted)
    for r in range(csr.shape[0]):
        s = int(csr.row_offsets[r])
        n0, n1 = int(csr.level_counts[r, 0]), int(csr.level_counts[r, 1])
        if n0 >= 1 and n1 - n0 == 1:
            ci = csr.col_indices.copy()
            ci[s + n0] = ci[s]
            return _with(csr, col_indices=ci)
    raise AssertionError("fixture lacks a suitable row")


CORRUPTIONS = {
    "offset_dtype": (lambda c: _with(c, row_offsets=c.row_offsets.astype(np.float64)), "dtype"),
    "col_dtype": (lambda c: _with(c, col_indices=c.col_indices.astype(np.int64)), "dtype"),
    "value_dtype": (lambda c: _with(c, values=c.values.astype(np.float64)), "dtype"),
    "byteorder": (lambda c: _with(c, row_offsets=c.row_offsets.astype(">i4")), "dtype"),
    "dtype_string": (lambda c: _with(c, dtype="bfloat16"), "dtype"),
    "not_array": (lambda c: _with(c, values=list(c.values)), "type"),
    "offsets_2d": (lambda c: _with(c, row_offsets=c.row_offsets[None]), "shape"),
    "offsets_length": (lambda c: _with(c, row_offsets=c.row_offsets[:-1]), "shape"),
    "shape_type": (lambda c: _with(c, shape=[7, 5]), "shape"),
    "shape_huge": (lambda c: _with(c, shape=(7, 2**40)), "shape"),
    "first_offset": (lambda c: _arr(c, "row_offsets", lambda a: a.__setitem__(0, 1)), "offsets"),
    "non_monotone": (lambda c: _arr(c, "row_offsets", lambda a: a.__setitem__(3, a[5] + 1)), "offsets"),
    "final_offset": (lambda c: _arr(c, "row_offsets", lambda a: a.__setitem__(-1, a[-1] - 1)), "offsets"),
    "nnz_mismatch": (lambda c: _with(c, col_indices=c.col_indices[:-1]), "nnz"),
    "level_count_shape": (lambda c: _with(c, level_counts=c.level_counts[:, :1]), "levels"),
    "num_levels": (lambda c: _with(c, num_levels=0), "levels"),
    "num_levels_type": (lambda c: _with(c, num_levels=2.0), "levels"),
    "level_not_nested": (
        lambda c: _arr(c, "level_counts", lambda a: a.__setitem__((_row_with_two_in_level0(c), 1), 0)),
        "level_counts",
    ),
    "level_beyond_row": (lambda c: _arr(c, "level_counts", lambda a: a.__setitem__((0, 1), 200)), "level_counts"),
    "column_range": (lambda c: _arr(c, "col_indices", lambda a: a.__setitem__(2, 5)), "column_range"),
    "column_order": (_swap_first_two, "column_order"),
    "duplicate_column": (_duplicate_across_levels, "duplicate_column"),
    "nan_value": (lambda c: _arr(c, "values", lambda a: a.__setitem__(0, np.nan)), "values"),
    "scales_for_float": (lambda c: _with(c, scales=np.ones(7, np.float32)), "scales"),
}

INT8_CORRUPTIONS = {
    "scale_zero": (lambda c: _arr(c, "scales", lambda a: a.__setitem__(1, 0.0)), "scales"),
    "scale_nan": (lambda c: _arr(c, "scales", lambda a: a.__setitem__(1, np.nan)), "scales"),
    "scale_inf": (lambda c: _arr(c, "scales", lambda a: a.__setitem__(1, np.inf)), "scales"),
    "scale_missing": (lambda c: _with(c, scales=None), "type"),
    "scale_length": (lambda c: _with(c, scales=c.scales[:-1]), "shape"),
    "int8_min": (lambda c: _arr(c, "values", lambda a: a.__setitem__(0, -128)), "values"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_validate_rejects_float32(name):
    fn, fault = CORRUPTIONS[name]
    base = _base()
    validate(base)
    bad = fn(base)
    with pytest.raises(NestedCSRError) as ei:
        validate(bad)
    assert isinstance(ei.value, ValueError)
    assert ei.value.fault == fault
    assert str(ei.value).startswith(fault), str(ei.value)


@pytest.mark.parametrize("name", sorted(INT8_CORRUPTIONS))
def test_validate_rejects_int8(name):
    fn, fault = INT8_CORRUPTIONS[name]
    base = _base("int8")
    validate(base)
    with pytest.raises(NestedCSRError) as ei:
        validate(fn(base))
    assert ei.value.fault == fault and fault in str(ei.value)


def test_validate_rejects_non_csr():
    with pytest.raises(ValueError, match="type"):
        validate("not a csr")  # type: ignore[arg-type]


def test_validate_hostile_huge_claims_are_cheap():
    # offsets claiming a huge nnz never allocate anything of that size
    c = _base()
    ro = c.row_offsets.astype(np.int64)
    ro[1:] = 2**62
    with pytest.raises(NestedCSRError, match="offsets"):
        validate(_with(c, row_offsets=ro))
    neg = c.row_offsets.copy()
    neg[2] = -(2**31)
    with pytest.raises(NestedCSRError, match="offsets"):
        validate(_with(c, row_offsets=neg))


def test_empty_structures_are_valid():
    csr = from_dense(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.uint8), 2)
    validate(csr)
    assert csr.nnz() == 0 and to_dense(csr, 1).shape == (0, 4)
    csr = from_dense(np.ones((3, 4), np.float32), np.full((3, 4), 5, np.uint8), 2)
    validate(csr)
    assert csr.nnz(1) == 0
    assert isinstance(csr, NestedCSR)


# ---------------------------------------------------------------- column coding (the file's form)
def _decode(csr, indices, bitmaps, levels, implied, over=None):
    parts = dict(shape=csr.shape, num_levels=csr.num_levels, row_offsets=csr.row_offsets,
                 level_counts=csr.level_counts, values=csr.values, dtype=csr.dtype, scales=csr.scales,
                 indices=indices, bitmaps=bitmaps, levels=levels, implied=implied)
    parts.update(over or {})
    return decode_columns(**parts)


def _encoded_nbytes(csr, indices, bitmaps):
    scale_b = 0 if csr.scales is None else csr.scales.nbytes
    return (csr.row_offsets.nbytes + csr.level_counts.nbytes + csr.values.nbytes + scale_b + indices.nbytes
            + (0 if bitmaps is None else bitmaps.nbytes))


CODINGS = [  # (rows, cols, densities, expected bitmap levels, implied level)
    (16, 40, (0.05, 0.1, 1.0), (), 2),                 # sparse levels as indices, dense top implied
    (8, 1000, (0.02, 0.2, 0.6, 1.0), (1, 2), 3),       # uint16 columns: 18% and 40% segments as bitmaps
    (8, 1000, (0.02, 0.2, 0.6), (1, 2), None),         # no complete level: the 40% segment is a bitmap
    (9, 30, (0.05, 0.1), (), None),                    # all indices: the plain layout
    (5, 13, (1.0,), (), 0),                            # one complete level: no columns stored at all
    (6, 300, (0.1, 1.0, 1.0), (0,), 1),                # complete below the top: the top adds nothing
]


@pytest.mark.parametrize("rows, cols, densities, levels, implied", CODINGS)
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_column_coding_round_trips_and_sizes(rows, cols, densities, levels, implied, dtype):
    w, lm = _score_levels(rows, cols, densities, seed=rows + cols)
    csr = from_dense(w, lm, len(densities), dtype=dtype)
    assert column_coding(csr) == (levels, implied)
    indices, bitmaps, got_levels, got_implied = encode_columns(csr)
    assert (got_levels, got_implied) == (levels, implied)
    assert (bitmaps is None) == (not levels)
    back = _decode(csr, indices, bitmaps, list(levels), implied)
    validate(back)
    for f in ("row_offsets", "level_counts", "col_indices", "values"):
        np.testing.assert_array_equal(getattr(back, f), getattr(csr, f))
    assert back.col_indices.dtype == csr.col_indices.dtype
    # what a file stores is exactly the encoded arrays, and never more than the in-memory layout
    assert csr.stored_nbytes() == _encoded_nbytes(csr, indices, bitmaps) <= csr.nbytes()
    for k in range(csr.num_levels):  # levels 0..k alone: exactly a file packed with k + 1 levels
        part = from_dense(w, lm, k + 1, dtype=dtype)
        assert csr.stored_nbytes(k) == _encoded_nbytes(part, *encode_columns(part)[:2])
    if implied is not None:  # no column of the implied level or above is stored
        below = csr.nnz(implied - 1) if implied else 0
        assert indices.shape[0] == below - sum(csr.nnz(k) - (csr.nnz(k - 1) if k else 0) for k in levels)


def test_dense_top_level_costs_about_its_values():
    # the densest level of a 5 / 10 / 100% layer: 4 bytes per weight + the sparse levels' columns
    w, lm = _score_levels(64, 576, (0.05, 0.1, 1.0))
    csr = from_dense(w, lm, 3)
    assert csr.nbytes() > 1.2 * w.nbytes  # the in-memory layout: values + a column per weight
    # uint16 columns for the 10% below the top, then offsets and per-row counts
    assert csr.stored_nbytes() == w.nbytes + 2 * csr.nnz(1) + csr.row_offsets.nbytes + csr.level_counts.nbytes
    assert csr.stored_nbytes() < 1.06 * w.nbytes


def _coded(densities=(0.05, 0.3, 0.6, 1.0), rows=6, cols=20, seed=3):
    w, lm = _score_levels(rows, cols, densities, seed=seed)
    csr = from_dense(w, lm, len(densities))
    return csr, *encode_columns(csr)


def _flip_bitmap_bit(b):
    b = b.copy()
    b[0, 0, 0] ^= 1
    return b


def _set_padding(b):
    b = b.copy()
    b[0, 0, -1] |= 0x80  # column 23 of a 20-column row
    return b


def _lower_duplicate(csr, indices):
    ci = indices.copy()
    r = next(r for r in range(csr.shape[0]) if csr.level_counts[r, 0] >= 2)
    s = int(csr.level_counts[:r, 0].sum())  # level 0 is index-coded: row r's entries start here
    ci[s + 1] = ci[s]
    return ci


def test_coding_fixture_uses_every_form():
    csr, indices, bitmaps, levels, implied = _coded()
    assert levels == (1, 2) and implied == 3 and indices.shape[0] == csr.nnz(0)


@pytest.mark.parametrize("change, fault", [
    (lambda c, i, b, lv, im: dict(bitmaps=_flip_bitmap_bit(b)), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(bitmaps=_set_padding(b)), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(bitmaps=b[:1]), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(bitmaps=b.astype(np.int16)), "dtype"),
    (lambda c, i, b, lv, im: dict(bitmaps=None), "type"),
    (lambda c, i, b, lv, im: dict(levels=[2, 1]), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(levels=[1, 3]), "column_bitmap"),    # 3 is the implied level
    (lambda c, i, b, lv, im: dict(levels=[1, True]), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(levels="12"), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(implied=True), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(implied=4), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(implied="3"), "column_bitmap"),
    (lambda c, i, b, lv, im: dict(implied=2), "column_bitmap"),    # rows are not complete at level 2
    (lambda c, i, b, lv, im: dict(levels=[]), "column_bitmap"),    # a bitmap no level uses
    (lambda c, i, b, lv, im: dict(indices=i[:-1]), "nnz"),
    (lambda c, i, b, lv, im: dict(indices=i.astype(np.float32)), "dtype"),
    (lambda c, i, b, lv, im: dict(indices=_lower_duplicate(c, i)), "duplicate_column"),
    (lambda c, i, b, lv, im: dict(indices=np.full_like(i, 99)), "column_range"),
    (lambda c, i, b, lv, im: dict(row_offsets=c.row_offsets[::-1].copy()), "offsets"),
    (lambda c, i, b, lv, im: dict(level_counts=c.level_counts[:, :1]), "levels"),
])
def test_decode_refuses_hostile_coding(change, fault):
    csr, indices, bitmaps, levels, implied = _coded()
    with pytest.raises(NestedCSRError) as ei:
        _decode(csr, indices, bitmaps, list(levels), implied, change(csr, indices, bitmaps, levels, implied))
    assert ei.value.fault == fault, str(ei.value)


def test_decode_refuses_implied_level_on_incomplete_rows():
    w, lm = _score_levels(6, 20, (0.1, 0.5), seed=1)
    csr = from_dense(w, lm, 2)
    with pytest.raises(NestedCSRError, match="complete"):
        _decode(csr, csr.col_indices[: csr.nnz(0)], None, [], 1)


def test_decode_refuses_an_index_dtype_too_narrow_for_the_columns():
    # a uint8 index array for 300 columns would wrap decoded columns >= 256 onto valid ones
    csr, indices, bitmaps, levels, implied = _coded(densities=(0.05, 0.5, 1.0), cols=300)
    assert levels and csr.col_indices.dtype == np.uint16
    with pytest.raises(NestedCSRError) as ei:
        _decode(csr, indices.astype(np.uint8), bitmaps, list(levels), implied)
    assert ei.value.fault == "dtype"
    with pytest.raises(NestedCSRError, match="cannot hold column 299"):
        validate(dataclasses.replace(csr, col_indices=csr.col_indices.astype(np.uint8)))


def test_decode_memory_stays_near_the_arrays_present():
    # all-ones bitmaps over empty rows: the counts are checked before a bitmap is unpacked
    import tracemalloc

    rows, cols, L = 256, 4096, 3
    shell = from_dense(np.zeros((rows, cols), np.float32), np.full((rows, cols), L, np.uint8), L)
    bitmaps = np.full((2, rows, cols // 8), 0xFF, np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(NestedCSRError, match="bitmap"):
            _decode(shell, shell.col_indices, bitmaps, [0, 1], None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * bitmaps.nbytes


def _reference_decode(csr, indices, bitmaps, levels, implied):
    """Row by row, level by level: the columns the coding means (None if it means nothing)."""
    rows, cols = csr.shape
    L = csr.num_levels
    ro, lc = csr.row_offsets.astype(np.int64), csr.level_counts.astype(np.int64)
    it = iter(indices.tolist())
    out = []
    for r in range(rows):
        n = [0] + [int(lc[r, k]) for k in range(L - 1)] + [int(ro[r + 1] - ro[r])]
        row = []
        for k in range(L):
            seg = n[k + 1] - n[k]
            if implied is not None and k >= implied:
                if k == implied:
                    row += sorted(set(range(cols)) - set(row))
                continue
            if k in levels:
                bits = np.unpackbits(bitmaps[levels.index(k), r], count=cols, bitorder="little")
                row += np.nonzero(bits)[0].tolist()
            else:
                row += [next(it) for _ in range(seg)]
        out += row
    return np.array(out, dtype=np.int64)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_fuzz_decode_raises_or_decodes_what_the_coding_means(data):
    shape = data.draw(st.sampled_from([(6, 20), (5, 300)]))
    csr, indices, bitmaps, levels, implied = _coded(densities=(0.05, 0.3, 0.6, 1.0), rows=shape[0], cols=shape[1])
    parts = {"indices": indices.copy(), "bitmaps": bitmaps.copy(), "row_offsets": csr.row_offsets.copy(),
             "level_counts": csr.level_counts.copy()}
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(parts)))
        flat = parts[name].reshape(-1).view(np.uint8)
        if flat.size:
            flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.integers(0, 255))
    parts["indices"] = parts["indices"].astype(data.draw(st.sampled_from([np.uint8, np.uint16, np.int32])))
    implied = data.draw(st.sampled_from([implied, None, 2]))
    over = {k: v for k, v in parts.items() if k not in ("indices", "bitmaps")}
    try:
        back = _decode(csr, parts["indices"], parts["bitmaps"], list(levels), implied, over)
        validate(back)
    except NestedCSRError:
        return
    shell = dataclasses.replace(csr, row_offsets=parts["row_offsets"], level_counts=parts["level_counts"])
    expected = _reference_decode(shell, parts["indices"], parts["bitmaps"], list(levels), implied)
    np.testing.assert_array_equal(back.col_indices.astype(np.int64), expected)
