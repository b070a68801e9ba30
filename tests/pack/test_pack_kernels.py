"""Kernels: spmm / spmm_t / sparse_conv2d equal the dense references at every level."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestedsparse.pack import kernels as K
from nestedsparse.pack.csr import from_dense, to_dense, validate

ATOL = 1e-5


def _layer(rows, cols, L=3, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    lm = rng.integers(0, L + 1, size=(rows, cols)).astype(np.uint8)  # value L = never active
    return w, lm, from_dense(w, lm, L, dtype=dtype)


def _x(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("shape", [(7, 5), (13, 29)])
@pytest.mark.parametrize("batch", [1, 3, 123])
@pytest.mark.parametrize("parallel", [False, True])
def test_spmm_matches_reference_every_level(dtype, shape, batch, parallel):
    w, lm, csr = _layer(*shape, seed=shape[0] + batch, dtype=dtype)
    x = _x((batch, shape[1]), seed=batch)
    for k in range(csr.num_levels):
        ref = x @ to_dense(csr, k).T  # int8: the dequantised reference
        if dtype == "float32":
            np.testing.assert_array_equal(to_dense(csr, k), w * (lm <= k))
        np.testing.assert_allclose(K.spmm(csr, x, k, parallel=parallel), ref, atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(K.spmm_reference(csr, x, k), ref, atol=ATOL, rtol=1e-5)
        yt = K.spmm_t(csr, np.ascontiguousarray(x.T), k, parallel=parallel)
        np.testing.assert_allclose(yt.T, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("vals_dtype", [np.float32, np.int8])
def test_residual_tiles_equal_tile_then_add(vals_dtype):
    """The plane convs' residual tiles (``_tile_span_npr``: residual added in the epilogue, then
    the clamp) equal the plain tiles with no clamp, plus the residual, then the clamp -- bit for
    bit, at every tile width and remainder, for either sign of ``roff`` and NaN in the residual."""
    rng = np.random.default_rng(0)
    npr, np_ = K._kernel("tile_span_npr"), K._kernel("tile_span_np")
    nnz = 9
    cols = rng.integers(0, 40, nnz).astype(np.int32)
    vals = (rng.integers(-100, 100, nnz) if vals_dtype == np.int8 else rng.standard_normal(nnz)).astype(vals_dtype)
    code = 2 * 2 + (1 if vals_dtype == np.int8 else 0)
    for n in (1, 3, 8, 13, 16, 31, 32, 64, 71, 100, 137):
        for roff in (-(n + 50), n + 7):
            for lo in (np.float32(0.0), np.float32(-np.inf)):
                arena = rng.standard_normal(4 * n + 400).astype(np.float32)
                yb, xb = 2 * n + 160, 20
                arena[yb + roff + n // 2] = np.nan
                res = arena[yb + roff:yb + roff + n].copy()
                a1, a2 = arena.copy(), arena.copy()
                np_(cols.view(np.uint8), vals.view(np.uint8), code, 0, nnz, a1.reshape(-1, 1), xb - yb, yb, n, a1,
                    np.float32(0.7), np.float32(0.1), np.float32(-np.inf))
                want = a1[yb:yb + n] + res
                want = np.where(want < lo, lo, want)
                npr(cols.view(np.uint8), vals.view(np.uint8), code, 0, nnz, a2.reshape(-1, 1), xb - yb, yb, n, a2,
                    np.float32(0.7), np.float32(0.1), lo, roff)
                np.testing.assert_array_equal(a2[yb:yb + n], want)
                a2[yb:yb + n] = a1[yb:yb + n]
                np.testing.assert_array_equal(a2, a1)  # nothing else written


def test_int8_close_to_float_weights():
    w, lm, csr8 = _layer(13, 29, dtype="int8")
    x = _x((3, 29))
    y = K.spmm(csr8, x, 2)
    exact = x @ (w * (lm <= 2)).T
    assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()


def test_bias_relu_out_and_torch_io():
    _, _, csr = _layer(13, 29, seed=4)
    x = _x((9, 29))
    bias = _x((13,), seed=7)
    for k in range(3):
        ref = x @ to_dense(csr, k).T + bias
        np.testing.assert_allclose(K.spmm(csr, x, k, bias=bias), ref, atol=ATOL)
        np.testing.assert_allclose(K.spmm(csr, x, k, bias=bias, relu=True), np.maximum(ref, 0), atol=ATOL)
        np.testing.assert_allclose(K.spmm_reference(csr, x, k, bias=bias), ref, atol=ATOL)
        out = np.full((9, 13), np.nan, np.float32)
        assert K.spmm(csr, x, k, out=out, bias=bias) is out
        np.testing.assert_allclose(out, ref, atol=ATOL)
        out_t = np.empty((13, 9), np.float32)
        assert K.spmm_t(csr, x.T.copy(), k, out=out_t, bias=bias, relu=True) is out_t
        np.testing.assert_allclose(out_t, np.maximum(ref, 0).T, atol=ATOL)
        yt = K.spmm(csr, torch.from_numpy(x), k)
        assert isinstance(yt, torch.Tensor)
        np.testing.assert_allclose(yt.numpy(), x @ to_dense(csr, k).T, atol=ATOL)
    # 1-D input and non-contiguous / float64 input
    np.testing.assert_allclose(K.spmm(csr, x[0], 1), x[0] @ to_dense(csr, 1).T, atol=ATOL)
    xf = np.asfortranarray(x.astype(np.float64))
    np.testing.assert_allclose(K.spmm(csr, xf, 1), x @ to_dense(csr, 1).T, atol=ATOL)
    with pytest.raises(ValueError):
        K.spmm(csr, _x((2, 28)), 0)
    with pytest.raises(ValueError):
        K.spmm(csr, x, 0, out=np.empty((9, 12), np.float32))
    with pytest.raises(ValueError):
        K.spmm(csr, x, 3)


def test_bind_spmm_t_chain_reuses_buffers():
    _, _, l1 = _layer(13, 29, seed=21)
    _, _, l2 = _layer(7, 13, seed=22, dtype="int8")
    b1 = _x((13,), seed=3)
    xt = np.empty((29, 9), np.float32)
    h = np.empty((13, 9), np.float32)
    o = np.empty((7, 9), np.float32)
    for k in range(3):
        f1 = K.bind_spmm_t(l1, k, xt, h, bias=b1, relu=True)
        f2 = K.bind_spmm_t(l2, k, h, o, parallel=True)
        for seed in (1, 2):  # new input written in place, same bound calls
            x = _x((9, 29), seed=seed)
            xt[...] = x.T
            f1()
            assert f2() is o
            ref = np.maximum(x @ to_dense(l1, k).T + b1, 0) @ to_dense(l2, k).T
            np.testing.assert_allclose(o.T, ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError):
        K.bind_spmm_t(l1, 0, xt, np.empty((13, 8), np.float32))
    with pytest.raises(ValueError):
        K.bind_spmm_t(l1, 0, xt.T, h)


def test_empty_rows_and_all_inactive():
    w = _x((6, 5))
    lm = np.full((6, 5), 3, np.uint8)
    lm[2, 1] = 0
    lm[4] = 1
    csr = from_dense(w, lm, 3)
    x = _x((4, 5))
    for k in range(3):
        np.testing.assert_allclose(K.spmm(csr, x, k), x @ to_dense(csr, k).T, atol=ATOL)


def test_prepare_and_have_numba():
    _, _, csr = _layer(13, 29, seed=30)
    K.prepare(csr, batch=9)
    assert K.have_numba()
    np.testing.assert_allclose(K.spmm(csr, _x((9, 29)), 2), _x((9, 29)) @ to_dense(csr, 2).T, atol=ATOL)


def test_transpose_odd_shapes():
    for shape in [(1, 1), (3, 17), (13, 29), (64, 40), (9, 130), (301, 517), (517, 301), (7, 20001)]:  # last 3: parallel
        a = _x(shape)
        np.testing.assert_array_equal(K.transpose(a), a.T)
        buf = K.aligned_empty(shape[::-1])
        assert buf.ctypes.data % 64 == 0 and buf.flags.c_contiguous and buf.dtype == np.float32
        assert K.transpose(a, out=buf) is buf
        np.testing.assert_array_equal(buf, a.T)


CONV_CASES = [
    # (N, C, H, W, O, k, stride, padding, dilation, groups)
    (2, 4, 9, 7, 6, 3, 1, 0, 1, 1),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 1),
    (1, 4, 11, 10, 6, 3, 1, 2, 2, 1),
    (2, 4, 8, 9, 6, 3, 1, 1, 1, 2),
    (1, 3, 13, 12, 5, 1, 2, 0, 1, 1),
    (2, 6, 9, 8, 6, 3, 1, 1, 1, 6),  # depthwise
    (1, 4, 10, 9, 8, 3, 2, 1, 2, 4),  # depthwise, channel multiplier 2, stride 2, dilation 2
    (1, 4, 12, 12, 4, 5, 1, 2, 1, 4),  # depthwise 5x5
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_matches_f_conv2d(case, with_bias):
    N, C, H, W, O, k, s, p, d, g = case
    rng = np.random.default_rng(sum(case))
    wshape = (O, C // g, k, k)
    w = rng.standard_normal(wshape).astype(np.float32)
    lm = rng.integers(0, 4, size=wshape).astype(np.uint8)
    csr = from_dense(w, lm, 3)
    x = torch.from_numpy(_x((N, C, H, W), seed=3))
    bias = torch.from_numpy(_x((O,), seed=5)) if with_bias else None
    for lvl in range(3):
        wk = torch.from_numpy(w * (lm <= lvl))
        ref = F.conv2d(x, wk, bias, s, p, d, g)
        got = K.sparse_conv2d(csr, x, lvl, wshape, s, p, d, g, bias=bias)
        assert isinstance(got, torch.Tensor) and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)
        ref2 = K.conv2d_reference(csr, x, lvl, wshape, s, p, d, g, bias=bias)
        torch.testing.assert_close(ref2, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_int8_relu_parallel(groups):
    rng = np.random.default_rng(9)
    wshape = (4, 4 // groups, 3, 3)
    w = rng.standard_normal(wshape).astype(np.float32)
    lm = rng.integers(0, 3, size=wshape).astype(np.uint8)
    csr = from_dense(w, lm, 2, dtype="int8")
    x = _x((2, 4, 9, 9))
    b = _x((4,), seed=2)
    for lvl in range(2):
        ref = np.maximum(K.conv2d_reference(csr, x, lvl, wshape, 1, 1, 1, groups, bias=b), 0)
        for par in (False, True):
            got = K.sparse_conv2d(csr, x, lvl, wshape, 1, 1, 1, groups, bias=b, relu=True, parallel=par)
            assert isinstance(got, np.ndarray)
            np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-5)


def test_choose_threshold():
    _, _, csr = _layer(13, 29)
    d0, d2 = csr.density(0), csr.density(2)
    assert d0 < d2
    mid = (d0 + d2) / 2
    assert K.choose(csr, 0, 64, density_threshold=mid) == "sparse"
    assert K.choose(csr, 2, 64, density_threshold=mid) == "dense"
    w = _x((8, 8))
    sparse = from_dense(w, (np.arange(64).reshape(8, 8) % 50 != 0).astype(np.uint8), 1)  # ~3% dense
    dense = from_dense(w, np.zeros((8, 8), np.uint8), 1)
    for b in (1, 64):
        assert K.choose(sparse, 0, b) == "sparse"
        assert K.choose(dense, 0, b) == "dense"


def test_torch_fallback(monkeypatch):
    monkeypatch.setattr(K, "_numba", lambda: None)
    _, _, csr = _layer(13, 29, seed=8)
    x = _x((3, 29))
    b = _x((13,))
    for k in range(3):
        ref = x @ to_dense(csr, k).T + b
        np.testing.assert_allclose(K.spmm(csr, x, k, bias=b), ref, atol=ATOL)
        np.testing.assert_allclose(K.spmm_t(csr, x.T.copy(), k, bias=b, relu=True), np.maximum(ref, 0).T, atol=ATOL)
    wshape = (6, 2, 3, 3)
    w = _x(wshape)
    lm = np.random.default_rng(0).integers(0, 3, size=wshape).astype(np.uint8)
    c = from_dense(w, lm, 2)
    xc = _x((1, 4, 7, 7))
    np.testing.assert_allclose(
        K.sparse_conv2d(c, xc, 1, wshape, 1, 1, 1, 2),
        F.conv2d(torch.from_numpy(xc), torch.from_numpy(w * (lm <= 1)), None, 1, 1, 1, 2).numpy(), atol=ATOL,
    )
    np.testing.assert_array_equal(K.transpose(x), x.T)


# ------------------------------------------------ hostile arrays: never crash
_FIELDS = ["row_offsets", "level_counts", "col_indices", "values", "scales"]


@st.composite
def _mutated(draw):
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 9))
    L = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(["float32", "int8"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    lm = rng.integers(0, L + 1, size=(rows, cols)).astype(np.uint8)
    csr = from_dense(w, lm, L, dtype=dtype)
    kind = draw(st.sampled_from(["set", "set", "set", "truncate", "extend", "dtype", "levels", "shape"]))
    name = draw(st.sampled_from(_FIELDS))
    arr = getattr(csr, name)
    if kind == "levels":
        return dataclasses.replace(csr, num_levels=draw(st.integers(-1, 5)))
    if kind == "shape":
        return dataclasses.replace(csr, shape=(draw(st.integers(-2, 8)), draw(st.integers(-2, 12))))
    if arr is None:
        return csr
    a = arr.copy()
    if kind == "set" and a.size:
        idx = draw(st.integers(0, a.size - 1))
        if a.dtype.kind == "f":
            val = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                 st.sampled_from([0.0, -1.0, 1e-30])))
        else:
            info = np.iinfo(a.dtype)
            val = draw(st.one_of(st.integers(int(info.min), int(info.max)), st.integers(-2, 12)).filter(
                lambda v: info.min <= v <= info.max))
        a.reshape(-1)[idx] = val
    elif kind == "truncate" and a.size:
        a = a[: draw(st.integers(0, a.shape[0] - 1))]
    elif kind == "extend":
        a = np.concatenate([a, a[:1]]) if a.ndim == 1 else np.concatenate([a, a[:1]], axis=0)
    elif kind == "dtype":
        a = a.astype(draw(st.sampled_from([np.int64, np.float64, np.int16, np.uint32])))
    return dataclasses.replace(csr, **{name: a})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_hostile_arrays_rejected_or_consistent(csr):
    try:
        validate(csr)
    except ValueError:
        return
    x = np.random.default_rng(0).standard_normal((3, csr.shape[1])).astype(np.float32)
    for k in range(csr.num_levels):
        ref = x @ to_dense(csr, k).T
        np.testing.assert_allclose(K.spmm_t(csr, np.ascontiguousarray(x.T), k).T, ref, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(K.spmm(csr, x[:1], k), ref[:1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1024, 1024), (10, 1024), (7, 3), (1, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_gemv_matches_torch(shape, relu):
    """The batch-1 dense path: ``max(w @ x + b, lo)`` over row blocks (parallel from 150k
    multiply-adds, serial below), with and without bias; NaN and -inf propagate as in torch."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    x = torch.randn(shape[1], generator=g)
    b = torch.randn(shape[0], generator=g)
    for bias in (b, None):
        ref = w @ x + (0 if bias is None else bias)
        ref = ref.relu() if relu else ref
        got = K.gemv(w.numpy(), x.numpy(), None if bias is None else bias.numpy(), relu)
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)
    x[0] = float("nan")
    got = K.gemv(w.numpy(), x.numpy(), b.numpy(), relu)
    assert np.isnan(got).all()
    w[0, :] = 0.0
    w[0, 0] = 1.0
    x[0] = float("-inf")
    got = K.gemv(w.numpy(), x.numpy(), b.numpy(), relu)
    assert got[0] == (0.0 if relu else -np.inf)


def test_bind_gemv_rejects_wrong_buffers():
    w = np.zeros((4, 3), np.float32)
    x, b, y = np.zeros(3, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    K.bind_gemv(w, x, b, False, y)()
    with pytest.raises(ValueError, match="C-contiguous 2-D float32"):
        K.bind_gemv(w.T, np.zeros(4, np.float32), np.zeros(3, np.float32), False, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="C-contiguous 2-D float32"):
        K.bind_gemv(w.astype(np.float64), x, b, False, y)
    with pytest.raises(ValueError, match=r"x must be .* shape \(3,\)"):
        K.bind_gemv(w, np.zeros(4, np.float32), b, False, y)
    with pytest.raises(ValueError, match=r"y must be .* shape \(4,\)"):
        K.bind_gemv(w, x, b, False, np.zeros((4, 1), np.float32))
