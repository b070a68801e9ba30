"""Fast CPU kernels that run any level of a :class:`~nestedsparse.pack.csr.NestedCSR`.

All kernels read the same arrays for every level: level ``k`` of row ``r`` is the
prefix ``[row_offsets[r], row_offsets[r] + level_counts[r, k])`` of the row (see
``csr.py``), so switching level only switches the per-row end pointers (cached
per level in ``csr._cache``).

Public API
----------
* :func:`spmm` -- Linear, batch-major: ``y[B, out] = x[B, in] @ W_k^T (+ bias)``.
* :func:`spmm_t` -- Linear, feature-major (the fast layout):
  ``yt[out, B] = W_k @ xt[in, B] (+ bias[:, None])``, optional fused ReLU.  Chain
  layers in this layout to avoid two transposes per layer.
* :func:`bind_spmm_t` -- :func:`spmm_t` pre-bound to fixed buffers: ``fn()`` costs
  only numba's dispatch (~1.3 us), for runtimes chaining preallocated layers.
* :func:`sparse_conv2d` / :func:`run_conv` -- direct sparse Conv2d (any stride,
  padding, dilation, groups): the input is zero-padded and split into stride
  phases once, each non-zero becomes a flat offset into it, and every output row
  is one register-tile pass (the same tiles as the Linear kernels) -- no im2col.
* :func:`spmm_reference`, :func:`conv2d_reference` -- plain torch on ``to_dense``.
* :func:`choose` -- ``"sparse"`` or ``"dense"`` from a density threshold.
* :func:`prepare` -- validate, build the per-level plans and JIT-compile ahead of time.
* :func:`transpose` -- fast 2-D float32 transpose (``[B, F] <-> [F, B]``).
* :func:`aligned_empty` -- 64-byte aligned float32 buffers for activations.

Implementation
--------------
numba is imported lazily on first use (``import nestedsparse`` stays cheap); if it
is missing (or ``NESTEDSPARSE_NO_NUMBA=1``) every kernel falls back to torch.

Each thread owns a contiguous, nnz-balanced block of rows (one parallel region
per call, ``prange`` over the blocks).  For a row and a tile of W = 64 / 32 /
16 / 8 batch columns the output tile lives in ``W/8`` ymm registers and each
non-zero ``(c, v)`` does ``acc += v * xt[c, b0:b0+W]``: a broadcast and ``W/8``
FMAs with a memory operand on a contiguous row of ``xt``.  Narrow tiles unroll
over ``8/(W/8)`` non-zeros so there are always 8 independent accumulators (FMA
latency x throughput on Zen3/AVX2); a remainder of < U non-zeros rotates
through the accumulator sets.  A batch remainder of 1..7 columns is one more
8-wide pass with masked loads/stores; batch 1 is a sparse dot product with 4
scalar accumulators.  Scale (int8), bias and ReLU are applied to the tile in
registers before its single store.

The inner loops are numba *intrinsics* that emit LLVM IR directly with
``<8 x float>`` vectors (``_make_tile``); the column-index dtype (uint8 /
uint16 / int32) and value dtype (float32 / int8) are dispatched at run time
inside the intrinsic (a switch over six specialised loops) on byte views of the
arrays, so each kernel compiles to exactly ONE machine-code variant (~2 s) for
every weight.  The kernels' Python source is copied into a module file in a
cache directory named by a hash of this file, so numba's ``cache=True`` is
valid across processes and checkouts.

Threads: numba's OpenMP layer shares torch's libgomp (torch loads it globally
first), whose default spin-wait makes every 2-thread call stall for a whole
scheduler slice (~8 ms measured) whenever another process keeps a core busy: a
worker preempted while spinning misses the next region.  On shared machines
start the process with ``GOMP_SPINCOUNT=300`` (~15 us of spinning; or
``OMP_WAIT_POLICY=PASSIVE``): measured under load, a tiny call 8 ms -> 25 us and
1024x1024 / 2% / batch 64 8 ms -> ~110 us.  It must be set before ``import
torch``; the library cannot change it afterwards.

Invariants the kernels rely on (guaranteed by :func:`~nestedsparse.pack.csr.validate`,
which the plan runs once per ``NestedCSR`` object before any kernel sees it):
offsets in range, ``col_indices < cols``; there are no bounds checks inside the
kernels.  Inputs are converted to C-contiguous float32 if needed.  Outputs are
freshly allocated unless ``out=`` is given.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import tempfile
import threading
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .csr import NestedCSR, to_dense, validate

__all__ = [
    "spmm",
    "spmm_t",
    "bind_spmm_t",
    "sparse_conv2d",
    "run_conv",
    "linear_into",
    "linear_into_t",
    "bind_linear_t",
    "bind_conv_t",
    "gemv",
    "bind_gemv",
    "plan_for",
    "ConvGeometry",
    "spmm_reference",
    "conv2d_reference",
    "choose",
    "prepare",
    "transpose",
    "aligned_empty",
    "have_numba",
    "DEFAULT_DENSITY_THRESHOLD",
    "PARALLEL_MIN_WORK",
]

Array = Any  # numpy.ndarray or torch.Tensor
IntPair = Union[int, Sequence[int]]

#: Default density at or below which :func:`choose` picks the sparse kernel, by
#: batch size (the largest key <= batch applies).  Measured on the 2-core Zen3
#: (AVX2, shared) dev machine, 1024x1024 layer, 2 threads, sparse = ``spmm_t``
#: vs torch ``x @ W.T``: batch 1 crosses at ~8% (torch's dense GEMV streams the
#: weight at ~40 GB/s), batch 2 at ~30%, batch >= 4 sparse still wins at 50%
#: (torch is slow on skinny batches here; at batch 64 1.97 vs 2.05 ms at 50%).
DEFAULT_DENSITY_THRESHOLD: dict[int, float] = {1: 0.07, 2: 0.3, 4: 0.5}
#: Below this many multiply-adds per call the serial kernel is used (a parallel
#: region costs a few us of fork/join on this machine).
PARALLEL_MIN_WORK: int = 40_000
#: Batch 1 (SpMV) goes parallel only from this many non-zeros: a call is tens of microseconds,
#: about what waking a parked worker thread costs when the process is not in a tight loop
#: (measured: 1024x1024 at 5%, serial ~65 us, 2 threads ~50 us back to back but slower than
#: serial inside a whole batch-1 forward interleaved with other work). The one-call Linear chain
#: (``_chain_par``) uses the same thresholds per layer: with no per-layer dispatch left, 2%
#: 1024x1024 took 23 us on two threads vs 37 on one back to back, but on a loaded host a whole
#: batch-1 MLP forward was 2x slower with parallel layers (each waits for the other core).
PARALLEL_MIN_WORK_SPMV: int = 150_000

_F32_LOWEST = np.float32(-np.inf)  # the "no ReLU" floor: -inf outputs stay -inf, NaN stays NaN
#: The 64-wide tile prefetches the x row of the entry this many non-zeros ahead (rows are
#: visited in random order, so the hardware prefetcher cannot; measured on the Zen3 dev
#: machine, 1024x1024, batch 64: +15-20% at 5-10% density, neutral at 2%; 6-12 all similar).
PREFETCH_AHEAD = 8
#: Batch-1 rows prefetch the entries of the row this many rows on (``_spmv_rows``).
SPMV_PREFETCH_ROWS = 8
#: ... and the one-call chain's Linear rows (``_linear_rows``, its table's column 5) the row this many on.
LINEAR_PREFETCH_ROWS = 4
#: Row pitch (floats) of a strip plane: an 8-wide plane whose every row is one 64-byte line,
#: the 8 values at columns 4..11 and zeros around them (see ``pack/program.py``).
STRIP_PITCH = 16
_ZERO = np.float32(0.0)
_DUMMY2 = np.zeros((1, 1), dtype=np.float32)  # x / y placeholder of the feature-major kernel call
_COL_CODE = {np.dtype(np.uint8): 0, np.dtype(np.uint16): 1, np.dtype(np.int32): 2}
_VAL_CODE = {np.dtype(np.float32): 0, np.dtype(np.int8): 1}


# ============================================================== numba plumbing
class _Numba:
    """Lazily imported numba and the compiled kernels."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tried = False
        self.numba: Any = None
        self.kernels: dict[str, Callable[..., Any]] = {}
        self.get_threads: Optional[Callable[[], int]] = None


_NB = _Numba()
_SCRATCH = threading.local()  # per-thread reusable transpose buffers


def have_numba() -> bool:
    """True when the numba kernels are available (numba importable and not disabled)."""
    return _numba() is not None


def _numba() -> Any:
    if _NB.tried:
        return _NB.numba
    with _NB.lock:
        if not _NB.tried:
            if os.environ.get("NESTEDSPARSE_NO_NUMBA", "") not in ("", "0"):
                _NB.numba = None
            else:
                try:
                    import numba  # noqa: PLC0415 - lazy on purpose

                    _NB.numba = numba
                except Exception:  # pragma: no cover - numba missing/broken
                    _NB.numba = None
            _NB.tried = True
    return _NB.numba


_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # no nnan/ninf: NaN/Inf keep their meaning


def _kernel(name: str) -> Any:
    """Kernel dispatcher: ``spmm_par``/``spmm_ser``, ``conv_par``/``conv_ser``, ``phase_split_*``, ``transpose``."""
    k = _NB.kernels.get(name)
    if k is not None:
        return k
    with _NB.lock:
        if not _NB.kernels:
            _build_kernels()
        return _NB.kernels[name]


# ================================================================ intrinsics
def _make_intrinsics(nb: Any) -> dict[str, Any]:
    """numba intrinsics emitting LLVM IR: ``_tile{64,32,16,8,1}`` and ``_tr8x8``."""
    from llvmlite import ir  # noqa: PLC0415
    from numba.core import cgutils, types  # noqa: PLC0415

    f32 = ir.FloatType()
    i64 = ir.IntType(64)
    i8p = ir.IntType(8).as_pointer()
    cols_t = [(ir.IntType(8), False, 1), (ir.IntType(16), False, 2), (ir.IntType(32), True, 4)]
    vals_t = [(f32, 4), (ir.IntType(8), 1)]

    def _dtype_cases(builder: Any, code_v: Any, name: str, codes: Optional[tuple] = None) -> tuple[Any, list]:
        """A switch on the kernels' dtype code (``2*col_code + val_code``): returns the end block
        (an unknown code branches straight to it) and, per code, ``(block, (col type, signed,
        size), (value type, size))``; each case's code starts at its block and ends at the end.
        ``codes``: only these cases (the rest are unknown codes)."""
        fn = builder.function
        end_bb = fn.append_basic_block(f"{name}_end")
        default_bb = fn.append_basic_block(f"{name}_default")
        sw = builder.switch(code_v, default_bb)
        with builder.goto_block(default_bb):
            builder.branch(end_bb)
        cases = []
        for ci, col in enumerate(cols_t):
            for vi, val in enumerate(vals_t):
                if codes is not None and ci * 2 + vi not in codes:
                    continue
                bb = fn.append_basic_block(f"{name}_c{ci}v{vi}")
                sw.add_case(ir.Constant(i64, ci * 2 + vi), bb)
                cases.append((bb, col, val))
        return end_bb, cases

    #: shuffle masks: the even / odd lanes of two concatenated 8-float vectors
    even8 = ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(0, 16, 2)))
    odd8 = ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(1, 16, 2)))

    def _prefetch_line(builder: Any, p: Any) -> None:
        """A read prefetch (``llvm.prefetch``, keep in all cache levels) of the line of ``p`` (``i8*``)."""
        pf = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]),
            "llvm.prefetch.p0")
        builder.call(pf, [p, ir.IntType(32)(0), ir.IntType(32)(3), ir.IntType(32)(1)])

    def _splat(builder: Any, v: Any, lanes: int) -> Any:
        """A scalar broadcast to ``lanes`` lanes (the scalar itself when ``lanes == 1``)."""
        if lanes == 1:
            return v
        u = ir.Constant(ir.VectorType(v.type, lanes), ir.Undefined)
        t = builder.insert_element(u, v, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(t, u, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))

    def _make_tile(W: int, masked: bool = False, prefetch: bool = True, residual: bool = False,
                   vstride: int = 0, vgroup: int = 0, phase: bool = False, codes: Optional[tuple] = None) -> Any:
        """``_tileW(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo[, nv][, roff])``:
        ``yr[b0:b0+W] = max(sc * sum_{j in [s, e)} vals[j] * xn[xoff + cols[j], b0:b0+W] + bb, lo)``
        (the max propagates NaN from the sum).  ``masked`` (W = 8): only the first
        ``nv`` (1..7) columns are read and written (masked vector loads/stores), so a
        batch remainder is one pass instead of ``nv`` scalar passes.  ``residual``: the
        residual ``yr[b0+roff : b0+roff+W]`` is added after the bias and before the clamp
        (``max((sc*acc + bb) + r, lo)``, the order of a separate residual pass), so the
        output is written once and never read back.  ``vstride`` (floats, default the
        vector width): the tile's 8-float vectors lie that far apart in ``xn``'s rows and in
        ``yr`` (rows of a strip plane, see ``_strip_rows``) instead of back to back.  ``vgroup``
        (g): the tile is ``W / (8 g)`` plane rows of ``g`` back-to-back vectors, the rows a
        run-time ``pitch`` floats apart (an argument after ``lo``; ``_row_rows``).  ``phase``
        (with an even ``vgroup``): the tile is not stored at ``b0`` but split into stride-2 phases
        -- each row's even columns (``2m``) go to ``yr[E + m]``, its odd ones to ``yr[E + deo + m]``,
        ``E = e0 + (t // 2) * wd + (t % 2) * da`` for the tile's row ``t`` (arguments ``e0, da, wd,
        deo`` after ``pitch`` and ``roff``; ``_row_rows``), the layout ``_prog_image``'s SPLIT builds.
        ``codes``: compile only these dtype codes (another code stores nothing).

        ``cols_b``/``vals_b`` are uint8 byte views, ``code = 2*col_code + val_code``
        (cols uint8/uint16/int32 = 0/1/2, values float32/int8 = 0/1), ``xn`` a 2-D
        float32 array with contiguous rows, ``yr`` a contiguous float32 row.
        """
        lanes = min(W, 8)
        nvec = W // lanes
        vstep = 4 * (vstride or lanes)  # bytes from one vector of the tile to the next
        if vgroup and (masked or vstride or lanes != 8 or nvec % vgroup or nvec == vgroup):
            raise ValueError("_make_tile: vgroup needs unmasked 8-float vectors, several rows of vgroup each")
        if phase and (not vgroup or vgroup % 2):
            raise ValueError("_make_tile: phase stores need rows of an even number of vectors (vgroup)")
        U = 4 if W == 1 else max(1, 8 // nvec)  # non-zeros per iteration (U*nvec accumulators; 4 suffice for W=1)
        vt = ir.VectorType(f32, lanes) if lanes > 1 else f32
        fname = f"llvm.fmuladd.v{lanes}f32" if lanes > 1 else "llvm.fmuladd.f32"

        def splat(builder: Any, v: Any) -> Any:
            return _splat(builder, v, lanes)

        def typer(cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any, xoff: Any, b0: Any,
                  yr: Any, extra: tuple[Any, ...]) -> Any:
            ok = (isinstance(xn, types.Array) and xn.dtype == types.float32 and xn.ndim == 2
                  and isinstance(yr, types.Array) and yr.dtype == types.float32 and yr.ndim == 1)
            if not ok:
                return None
            sig = types.void(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, types.float32, types.float32,
                             types.float32, *extra)

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                at = signature.args
                cb, vb, code_v, s_v, e_v, xn_v, xoff_v, b0_v, yr_v, sc_v, bb_v, lo_v = args[:12]

                def as64(v: Any, t: Any) -> Any:
                    return context.cast(builder, v, t, types.int64)

                code_v, s_v, e_v = as64(code_v, at[2]), as64(s_v, at[3]), as64(e_v, at[4])
                xoff_v, b0_v = as64(xoff_v, at[6]), as64(b0_v, at[7])
                cptr = builder.bitcast(context.make_array(at[0])(context, builder, cb).data, i8p)
                vptr = builder.bitcast(context.make_array(at[1])(context, builder, vb).data, i8p)
                xary = context.make_array(at[5])(context, builder, xn_v)
                xstride = cgutils.unpack_tuple(builder, xary.strides, 2)[0]  # bytes per xn row
                four_b0 = builder.mul(b0_v, i64(4))
                xbase = builder.gep(builder.bitcast(xary.data, i8p), [four_b0])
                yary = context.make_array(at[8])(context, builder, yr_v)
                ybase = builder.gep(builder.bitcast(yary.data, i8p), [four_b0])
                if residual:  # the residual row starts roff floats past the output row
                    ri = 12 + int(masked) + int(bool(vgroup))
                    rbase = builder.gep(ybase, [builder.mul(as64(args[ri], at[ri]), i64(4))])
                if phase:  # e0, da, wd, deo (floats): where the tile's rows go in the phases
                    pi = 13 + int(residual)
                    e0_v, da_v, wd_v, deo_v = (as64(args[pi + q], at[pi + q]) for q in range(4))
                if vgroup:  # byte offset of each vector: its row's start, then its place in the row
                    pitch4 = builder.mul(as64(args[12], at[12]), i64(4))
                    voffs = [builder.add(builder.mul(pitch4, i64(k // vgroup)), i64(32 * (k % vgroup)))
                             for k in range(nvec)]
                else:
                    voffs = [i64(vstep * k) for k in range(nvec)]
                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), fname)
                if masked:  # lanes < nv are live
                    i32 = ir.IntType(32)
                    nv_v = builder.trunc(as64(args[12], at[12]), i32)
                    nv_s = builder.insert_element(ir.Constant(ir.VectorType(i32, 8), ir.Undefined), nv_v, i32(0))
                    nv_s = builder.shuffle_vector(nv_s, nv_s, ir.Constant(ir.VectorType(i32, 8), [0] * 8))
                    lane_mask = builder.icmp_signed("<", ir.Constant(ir.VectorType(i32, 8), list(range(8))), nv_s)
                    mvt = ir.VectorType(ir.IntType(1), 8)
                    mload = cgutils.get_or_insert_function(
                        builder.module, ir.FunctionType(vt, [vt.as_pointer(), i32, mvt, vt]),
                        "llvm.masked.load.v8f32.p0")
                    mstore = cgutils.get_or_insert_function(
                        builder.module, ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), i32, mvt]),
                        "llvm.masked.store.v8f32.p0")
                mod = builder.module
                no_vec = mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.vectorize.enable"), ir.IntType(1)(0)])
                no_unroll = mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.disable")])

                def latch(br: Any) -> None:
                    """Mark a loop back-edge: the loop is already vectorised/unrolled by hand,
                    so LLVM's vectoriser and unroller leave it alone (less code, faster compile)."""
                    tag = mod.add_metadata([ir.MetaDataString(mod, f"nestedsparse.loop.{len(mod.metadata)}")])
                    md = mod.add_metadata([tag, no_vec, no_unroll])
                    md.operands = (md,) + tuple(md.operands)  # loop IDs refer to themselves
                    br.set_metadata("llvm.loop", md)
                zero = ir.Constant(vt, None)
                fn = builder.function
                end_bb, cases = _dtype_cases(builder, code_v, "tile", codes)
                for start_bb, (ct, csigned, csz), (vtyp, vsz) in cases:

                    def entry(j: Any) -> tuple[Any, Any]:
                        cp = builder.gep(cptr, [builder.mul(j, i64(csz))])
                        c = builder.load(builder.bitcast(cp, ct.as_pointer()), align=1)
                        c = builder.sext(c, i64) if csigned else builder.zext(c, i64)
                        row = builder.gep(xbase, [builder.mul(builder.add(c, xoff_v), xstride)])
                        vp = builder.gep(vptr, [builder.mul(j, i64(vsz))])
                        v = builder.load(builder.bitcast(vp, vtyp.as_pointer()), align=1)
                        if vtyp is not f32:
                            v = builder.sitofp(v, f32)
                        return row, splat(builder, v)

                    def xload(row: Any, k: Any) -> Any:
                        p = builder.bitcast(builder.gep(row, [voffs[k]]), vt.as_pointer())
                        if masked:
                            return builder.call(mload, [p, ir.IntType(32)(4), lane_mask, zero])
                        return builder.load(p, align=4)

                    builder.position_at_end(start_bb)
                    if U > 1:
                        # -- main loop: U non-zeros per iteration, U*nvec independent accumulators
                        h1, b1, x1 = (fn.append_basic_block(n) for n in ("u_hdr", "u_body", "u_exit"))
                        builder.branch(h1)
                        builder.position_at_end(h1)
                        j = builder.phi(i64)
                        j.add_incoming(s_v, start_bb)
                        accs = [[builder.phi(vt) for _ in range(nvec)] for _ in range(U)]
                        for a in accs:
                            for p in a:
                                p.add_incoming(zero, start_bb)
                        j_next = builder.add(j, i64(U))
                        builder.cbranch(builder.icmp_signed("<=", j_next, e_v), b1, x1)
                        builder.position_at_end(b1)
                        new = []
                        for u in range(U):
                            row, vs = entry(builder.add(j, i64(u)))
                            new.append([builder.call(fma, [vs, xload(row, k), accs[u][k]]) for k in range(nvec)])
                        j.add_incoming(j_next, builder.basic_block)
                        for u in range(U):
                            for k in range(nvec):
                                accs[u][k].add_incoming(new[u][k], builder.basic_block)
                        latch(builder.branch(h1))
                        builder.position_at_end(x1)
                        j_rem, acc_rem, pre_rem = j, accs, x1
                    else:  # W == 64: 8 accumulators already, a single loop
                        j_rem, acc_rem, pre_rem = s_v, [[zero] * nvec], start_bb
                    # -- remainder (< U non-zeros; all of them for W == 64): one per
                    # iteration, rotating through the U accumulator sets so that
                    # consecutive FMAs stay independent (SSA rotation = renaming only)
                    h2, b2, x2 = (fn.append_basic_block(n) for n in ("r_hdr", "r_body", "r_exit"))
                    builder.branch(h2)
                    builder.position_at_end(h2)
                    j2 = builder.phi(i64)
                    j2.add_incoming(j_rem, pre_rem)
                    acc2 = [[builder.phi(vt) for _ in range(nvec)] for _ in acc_rem]
                    for u, a in enumerate(acc_rem):
                        for k in range(nvec):
                            acc2[u][k].add_incoming(a[k], pre_rem)
                    builder.cbranch(builder.icmp_signed("<", j2, e_v), b2, x2)
                    builder.position_at_end(b2)
                    row, vs = entry(j2)
                    if W == 64 and not masked and prefetch:  # prefetch the x row of a later entry (random rows in L2)
                        ahead = builder.add(j2, i64(PREFETCH_AHEAD))
                        ahead = builder.select(builder.icmp_signed("<", ahead, e_v), ahead, j2)
                        prow, _ = entry(ahead)
                        for line in range(0, 4 * W, 64):
                            _prefetch_line(builder, builder.gep(prow, [i64(line)]))
                    new2 = [builder.call(fma, [vs, xload(row, k), acc2[0][k]]) for k in range(nvec)]
                    j2.add_incoming(builder.add(j2, i64(1)), builder.basic_block)
                    rotated = acc2[1:] + [new2]
                    for u in range(len(acc2)):
                        for k in range(nvec):
                            acc2[u][k].add_incoming(rotated[u][k], builder.basic_block)
                    latch(builder.branch(h2))
                    # -- tree-reduce the accumulator sets, scale + bias + clamp, store the tile
                    builder.position_at_end(x2)
                    scs, bbs, los = splat(builder, sc_v), splat(builder, bb_v), splat(builder, lo_v)
                    tots = []
                    for k in range(nvec):
                        part = [a[k] for a in acc2]
                        while len(part) > 1:
                            part = [builder.fadd(part[i], part[i + 1]) if i + 1 < len(part) else part[i]
                                    for i in range(0, len(part), 2)]
                        tot = builder.call(fma, [part[0], scs, bbs])
                        if residual:
                            rp = builder.bitcast(builder.gep(rbase, [voffs[k]]), vt.as_pointer())
                            rv = (builder.call(mload, [rp, ir.IntType(32)(4), lane_mask, zero]) if masked
                                  else builder.load(rp, align=4))
                            tot = builder.fadd(tot, rv)
                        tots.append(builder.select(builder.fcmp_ordered("<", tot, los), los, tot))
                    if phase:  # per row: even / odd columns of each vector pair to the two phases
                        ydata = builder.bitcast(yary.data, i8p)
                        for t in range(nvec // vgroup):
                            e_t = e0_v
                            if t // 2:
                                e_t = builder.add(e_t, builder.mul(wd_v, i64(t // 2)))
                            if t % 2:
                                e_t = builder.add(e_t, da_v)
                            pe = builder.gep(ydata, [builder.mul(e_t, i64(4))])
                            podd = builder.gep(ydata, [builder.mul(builder.add(e_t, deo_v), i64(4))])
                            for m in range(vgroup // 2):
                                v0, v1 = tots[t * vgroup + 2 * m], tots[t * vgroup + 2 * m + 1]
                                for ptr, sel in ((pe, even8), (podd, odd8)):
                                    q = builder.bitcast(builder.gep(ptr, [i64(32 * m)]), vt.as_pointer())
                                    builder.store(builder.shuffle_vector(v0, v1, sel), q, align=4)
                    for k, tot in enumerate(tots if not phase else ()):
                        p = builder.bitcast(builder.gep(ybase, [voffs[k]]), vt.as_pointer())
                        if masked:
                            builder.call(mstore, [tot, p, ir.IntType(32)(4), lane_mask])
                        else:
                            builder.store(tot, p, align=4)
                    builder.branch(end_bb)
                builder.position_at_end(end_bb)
                return context.get_dummy_value()

            return sig, codegen

        if phase and residual:
            @nb.extending.intrinsic
            def tile(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any, xoff: Any,
                     b0: Any, yr: Any, sc: Any, bb: Any, lo: Any, pitch: Any, roff: Any, e0: Any, da: Any, wd: Any,
                     deo: Any) -> Any:
                return typer(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, (pitch, roff, e0, da, wd, deo))
        elif phase:
            @nb.extending.intrinsic
            def tile(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any, xoff: Any,
                     b0: Any, yr: Any, sc: Any, bb: Any, lo: Any, pitch: Any, e0: Any, da: Any, wd: Any,
                     deo: Any) -> Any:
                return typer(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, (pitch, e0, da, wd, deo))
        elif vgroup and residual:
            @nb.extending.intrinsic
            def tile(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any,
                     xoff: Any, b0: Any, yr: Any, sc: Any, bb: Any, lo: Any, pitch: Any, roff: Any) -> Any:
                return typer(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, (pitch, roff))
        elif masked and residual:
            @nb.extending.intrinsic
            def tile(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any,
                     xoff: Any, b0: Any, yr: Any, sc: Any, bb: Any, lo: Any, nv: Any, roff: Any) -> Any:
                return typer(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, (nv, roff))
        elif vgroup or masked or residual:
            @nb.extending.intrinsic
            def tile(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any,
                     xoff: Any, b0: Any, yr: Any, sc: Any, bb: Any, lo: Any, extra: Any) -> Any:
                return typer(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, (extra,))
        else:
            @nb.extending.intrinsic
            def tile(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, s: Any, e: Any, xn: Any,
                     xoff: Any, b0: Any, yr: Any, sc: Any, bb: Any, lo: Any) -> Any:
                return typer(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, ())
        return tile

    def _make_rows4(residual: bool, codes: Optional[tuple] = None) -> Any:
        """``_rows4[r](cols_b, vals_b, code, starts, r, n, xn, xoff, b0, yr, ystride, scales, bias, lo,
        ntiles[, roff])``: four output rows ``r..r+3`` that share their columns (a 4x1 block-sparse
        conv or Linear: rows ``r+k`` have ``n`` entries from ``starts[r+k]``, with row ``r``'s
        columns), over ``ntiles`` tiles of 24 positions (``p < 24*ntiles``): ``yr[b0 + k*ystride + p] = max(scales[r+k] * sum_i vals[starts[r+k] + i] *
        xn[xoff + cols[starts[r] + i], b0 + p] + bias[r+k] (+ yr[... + roff]), lo)``. Each input
        load feeds four FMAs (12 accumulators), where a single-row tile does one FMA per load;
        per row and lane the sum runs in entry order, as in the single-row tiles."""

        def typer(cols_b: Any, vals_b: Any, code: Any, starts: Any, r: Any, n: Any, xn: Any, xoff: Any, b0: Any,
                  yr: Any, ystride: Any, scales: Any, bias: Any, lo: Any, extra: tuple) -> Any:
            ok = (isinstance(xn, types.Array) and xn.dtype == types.float32 and xn.ndim == 2
                  and _f32_arrays(yr, scales, bias) and isinstance(starts, types.Array)
                  and starts.dtype == types.int64)
            if not ok:
                return None
            sig = types.void(cols_b, vals_b, code, starts, r, n, xn, xoff, b0, yr, ystride, scales, bias,
                             types.float32, types.int64, *extra)

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                at = signature.args

                def as64(k: int) -> Any:
                    return context.cast(builder, args[k], at[k], types.int64)

                code_v, r_v, n_v, xoff_v, b0_v, ys_v = as64(2), as64(4), as64(5), as64(7), as64(8), as64(10)
                lo_v = args[13]
                nt_v = as64(14)
                cptr = builder.bitcast(context.make_array(at[0])(context, builder, args[0]).data, i8p)
                vptr = builder.bitcast(context.make_array(at[1])(context, builder, args[1]).data, i8p)
                st_p = builder.bitcast(context.make_array(at[3])(context, builder, args[3]).data,
                                       ir.IntType(64).as_pointer())
                sc_p = builder.bitcast(context.make_array(at[11])(context, builder, args[11]).data, f32.as_pointer())
                bb_p = builder.bitcast(context.make_array(at[12])(context, builder, args[12]).data, f32.as_pointer())
                xary = context.make_array(at[6])(context, builder, args[6])
                xstride = cgutils.unpack_tuple(builder, xary.strides, 2)[0]
                xbase = builder.gep(builder.bitcast(xary.data, i8p), [builder.mul(b0_v, i64(4))])
                ydata = builder.bitcast(context.make_array(at[9])(context, builder, args[9]).data, i8p)
                rows = [builder.add(r_v, i64(k)) for k in range(4)]
                starts_k = [builder.load(builder.gep(st_p, [rk])) for rk in rows]
                ybase = [builder.gep(ydata, [builder.mul(builder.add(b0_v, builder.mul(ys_v, i64(k))), i64(4))])
                         for k in range(4)]
                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f8, [f8, f8, f8]),
                                                     "llvm.fmuladd.v8f32")

                def splat(v: Any) -> Any:
                    return _splat(builder, v, 8)

                zero = ir.Constant(f8, None)
                fn = builder.function
                end_bb, cases = _dtype_cases(builder, code_v, "r4", codes)
                for case_bb, (ct, csigned, csz), (vtyp, vsz) in cases:
                    builder.position_at_end(case_bb)
                    los = splat(lo_v)  # the epilogue's constants, loaded once per call
                    scs = [splat(builder.load(builder.gep(sc_p, [rk]))) for rk in rows]
                    bbs = [splat(builder.load(builder.gep(bb_p, [rk]))) for rk in rows]
                    # -- tiles of 24 positions, ntiles of them (the code switch once per call)
                    t_hdr, t_body = fn.append_basic_block("r4_t_hdr"), fn.append_basic_block("r4_t_body")
                    builder.branch(t_hdr)
                    builder.position_at_end(t_hdr)
                    t = builder.phi(i64)
                    t.add_incoming(i64(0), case_bb)
                    builder.cbranch(builder.icmp_signed("<", t, nt_v), t_body, end_bb)
                    builder.position_at_end(t_body)
                    toff = builder.mul(t, i64(96))
                    xb_t = builder.gep(xbase, [toff])
                    yb_t = [builder.gep(yb, [toff]) for yb in ybase]
                    start_bb = t_body
                    hdr, body, exit_ = (fn.append_basic_block(nm) for nm in ("r4_hdr", "r4_body", "r4_exit"))
                    builder.branch(hdr)
                    builder.position_at_end(hdr)
                    i = builder.phi(i64)
                    i.add_incoming(i64(0), start_bb)
                    accs = [[builder.phi(f8) for _ in range(3)] for _ in range(4)]
                    for a in accs:
                        for ph in a:
                            ph.add_incoming(zero, start_bb)
                    builder.cbranch(builder.icmp_signed("<", i, n_v), body, exit_)
                    builder.position_at_end(body)
                    cp = builder.gep(cptr, [builder.mul(builder.add(starts_k[0], i), i64(csz))])
                    c = builder.load(builder.bitcast(cp, ct.as_pointer()), align=1)
                    c = builder.sext(c, i64) if csigned else builder.zext(c, i64)
                    xrow = builder.gep(xb_t, [builder.mul(builder.add(c, xoff_v), xstride)])
                    xv = [builder.load(builder.bitcast(builder.gep(xrow, [i64(32 * m)]), f8.as_pointer()), align=4)
                          for m in range(3)]
                    new = []
                    for k in range(4):
                        vp = builder.gep(vptr, [builder.mul(builder.add(starts_k[k], i), i64(vsz))])
                        v = builder.load(builder.bitcast(vp, vtyp.as_pointer()), align=1)
                        if vtyp is not f32:
                            v = builder.sitofp(v, f32)
                        w = splat(v)
                        new.append([builder.call(fma, [w, xv[m], accs[k][m]]) for m in range(3)])
                    i.add_incoming(builder.add(i, i64(1)), builder.basic_block)
                    for k in range(4):
                        for m in range(3):
                            accs[k][m].add_incoming(new[k][m], builder.basic_block)
                    builder.branch(hdr)
                    builder.position_at_end(exit_)
                    for k in range(4):
                        for m in range(3):
                            tot = builder.call(fma, [accs[k][m], scs[k], bbs[k]])
                            yp = builder.gep(yb_t[k], [i64(32 * m)])
                            if residual:
                                rp = builder.gep(yp, [builder.mul(as64(15), i64(4))])
                                tot = builder.fadd(tot, builder.load(builder.bitcast(rp, f8.as_pointer()), align=4))
                            tot = builder.select(builder.fcmp_ordered("<", tot, los), los, tot)
                            builder.store(tot, builder.bitcast(yp, f8.as_pointer()), align=4)
                    t.add_incoming(builder.add(t, i64(1)), builder.basic_block)
                    builder.branch(t_hdr)
                builder.position_at_end(end_bb)
                return context.get_dummy_value()

            return sig, codegen

        if residual:
            @nb.extending.intrinsic
            def rows4(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, starts: Any, r: Any, n: Any, xn: Any,
                      xoff: Any, b0: Any, yr: Any, ystride: Any, scales: Any, bias: Any, lo: Any, ntiles: Any,
                      roff: Any) -> Any:
                return typer(cols_b, vals_b, code, starts, r, n, xn, xoff, b0, yr, ystride, scales, bias, lo, (roff,))
        else:
            @nb.extending.intrinsic
            def rows4(typingctx: Any, cols_b: Any, vals_b: Any, code: Any, starts: Any, r: Any, n: Any, xn: Any,
                      xoff: Any, b0: Any, yr: Any, ystride: Any, scales: Any, bias: Any, lo: Any, ntiles: Any) -> Any:
                return typer(cols_b, vals_b, code, starts, r, n, xn, xoff, b0, yr, ystride, scales, bias, lo, ())
        return rows4

    f8 = ir.VectorType(f32, 8)

    def mask(idx: list[int]) -> Any:
        return ir.Constant(ir.VectorType(ir.IntType(32), 8), idx)

    lo, hi = mask([0, 8, 1, 9, 4, 12, 5, 13]), mask([2, 10, 3, 11, 6, 14, 7, 15])
    s44, see = mask([0, 1, 8, 9, 4, 5, 12, 13]), mask([2, 3, 10, 11, 6, 7, 14, 15])
    p20, p31 = mask([0, 1, 2, 3, 8, 9, 10, 11]), mask([4, 5, 6, 7, 12, 13, 14, 15])

    @nb.extending.intrinsic
    def tr8x8(typingctx: Any, src: Any, i0: Any, j0: Any, dst: Any) -> Any:
        """``dst[j:j+8, i:i+8] = src[i:i+8, j:j+8].T``: 8 loads, 24 shuffles, 8 stores."""
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == types.float32
                and dst.dtype == types.float32 and src.ndim == 2 and dst.ndim == 2):
            return None
        sig = types.void(src, i0, j0, dst)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            srct, it, jt, dstt = signature.args
            s, i, j, d = args
            sary = context.make_array(srct)(context, builder, s)
            dary = context.make_array(dstt)(context, builder, d)
            i = context.cast(builder, i, it, types.intp)
            j = context.cast(builder, j, jt, types.intp)
            rows = []
            for k in range(8):
                p = cgutils.get_item_pointer(context, builder, srct, sary, [builder.add(i, i64(k)), j],
                                             wraparound=False)
                rows.append(builder.load(builder.bitcast(p, f8.as_pointer()), align=4))
            t = []
            for k in range(0, 8, 2):
                t.append(builder.shuffle_vector(rows[k], rows[k + 1], lo))
                t.append(builder.shuffle_vector(rows[k], rows[k + 1], hi))
            tt = []
            for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):
                tt.append(builder.shuffle_vector(t[a], t[b], s44))
                tt.append(builder.shuffle_vector(t[a], t[b], see))
            outs = [builder.shuffle_vector(tt[k], tt[k + 4], p20) for k in range(4)]
            outs += [builder.shuffle_vector(tt[k], tt[k + 4], p31) for k in range(4)]
            for k in range(8):
                p = cgutils.get_item_pointer(context, builder, dstt, dary, [builder.add(j, i64(k)), i],
                                             wraparound=False)
                builder.store(outs[k], builder.bitcast(p, f8.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    def tiles(prefix: str, codes: Optional[tuple], program: bool) -> dict[str, Any]:
        """The tile family, every width and flavour, compiled for dtype ``codes`` (None: all six)."""
        t = {f"{prefix}{w}": _make_tile(w, codes=codes) for w in (64, 32, 16, 8, 1)}
        t[f"{prefix}8m"] = _make_tile(8, masked=True, codes=codes)
        t[f"{prefix}64np"] = _make_tile(64, prefetch=False, codes=codes)
        # residual twins for the plane convs (no prefetch at 64, as _tile64np)
        t.update({f"{prefix}{w}r": _make_tile(w, prefetch=False, residual=True, codes=codes)
                  for w in (64, 32, 16, 8, 1)})
        t[f"{prefix}8mr"] = _make_tile(8, masked=True, residual=True, codes=codes)
        t["_prows4" if program else "_rows4"] = _make_rows4(False, codes)
        t["_prows4r" if program else "_rows4r"] = _make_rows4(True, codes)
        if not program:
            return t
        # strip-plane twins: 8 / 4 / 2 vectors one 64-byte line apart (an 8-wide plane at pitch 16)
        t.update({f"{prefix}{w}s": _make_tile(w, prefetch=False, vstride=STRIP_PITCH, codes=codes)
                  for w in (64, 32, 16)})
        t.update({f"{prefix}{w}sr": _make_tile(w, prefetch=False, residual=True, vstride=STRIP_PITCH, codes=codes)
                  for w in (64, 32, 16)})
        # row-group twins: plane rows of 2 / 4 vectors (16 / 32 valid columns), a run-time pitch apart
        for w, g in ((64, 4), (64, 2), (32, 2)):
            t[f"{prefix}{w}g{g}"] = _make_tile(w, prefetch=False, vgroup=g, codes=codes)
            t[f"{prefix}{w}g{g}r"] = _make_tile(w, prefetch=False, residual=True, vgroup=g, codes=codes)
        # ... whose rows go straight into a stride-2 phase split (a producer fused with its SPLIT)
        for w, g in ((64, 4), (64, 2)):
            t[f"{prefix}{w}g{g}p"] = _make_tile(w, prefetch=False, vgroup=g, phase=True, codes=codes)
            t[f"{prefix}{w}g{g}pr"] = _make_tile(w, prefetch=False, residual=True, vgroup=g, phase=True,
                                                 codes=codes)
        return t

    out = tiles("_tile", None, False)
    # the programs' tiles (``_ptile*``, ``_prows4*``): their tap offsets are always int32
    # (PROGRAM_CODES), so two dtype cases instead of six -- a third of the code to compile
    out.update(tiles("_ptile", PROGRAM_CODES, True))
    out["_tr8x8"] = tr8x8

    def _flat_ptr(context: Any, builder: Any, aty: Any, arr: Any, off: Any, offty: Any) -> Any:
        data = builder.bitcast(context.make_array(aty)(context, builder, arr).data, i8p)
        return builder.gep(data, [builder.mul(context.cast(builder, off, offty, types.int64), i64(4))])

    def _f32_arrays(*arrs: Any) -> bool:
        """All the typing-time arguments are float32 arrays (the intrinsics' precondition)."""
        return all(isinstance(a, types.Array) and a.dtype == types.float32 for a in arrs)

    def _fptr(context: Any, builder: Any, sig_args: Any, args: Any, arr: int, off: int) -> Any:
        """``float*`` to element ``args[off]`` of the flat array ``args[arr]``."""
        return builder.bitcast(_flat_ptr(context, builder, sig_args[arr], args[arr], args[off], sig_args[off]),
                               f32.as_pointer())

    @nb.extending.intrinsic
    def prefetch(typingctx: Any, arr: Any, idx: Any) -> Any:
        """A read prefetch of ``arr.flat[idx]``'s cache line (any 1-D array, no checks)."""
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(idx, types.Integer)):
            return None
        sig = types.void(arr, idx)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            aty, ity = signature.args
            ary = context.make_array(aty)(context, builder, args[0])
            stride = cgutils.unpack_tuple(builder, ary.strides, 1)[0]
            off = builder.mul(context.cast(builder, args[1], ity, types.int64), stride)
            _prefetch_line(builder, builder.gep(builder.bitcast(ary.data, i8p), [off]))
            return context.get_dummy_value()

        return sig, codegen

    @nb.extending.intrinsic
    def zero_f32(typingctx: Any, dst: Any, doff: Any, n: Any) -> Any:
        """``dst.flat[doff:doff+n] = 0`` (float32, one ``llvm.memset``, no checks)."""
        if not _f32_arrays(dst):
            return None
        sig = types.void(dst, doff, n)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            dt, dot, nt = signature.args
            d = _flat_ptr(context, builder, dt, args[0], args[1], dot)
            nbytes = builder.mul(context.cast(builder, args[2], nt, types.int64), i64(4))
            cgutils.memset(builder, d, nbytes, 0)
            return context.get_dummy_value()

        return sig, codegen

    @nb.extending.intrinsic
    def gather_f32(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any, n: Any, step: Any) -> Any:
        """``dst.flat[doff + j] = src.flat[soff + j*step]`` for ``j < n`` (float32, no checks)."""
        if not _f32_arrays(dst, src):
            return None
        sig = types.void(dst, doff, src, soff, n, step)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            dt, dot, st, sot, nt, stt = signature.args
            d = builder.bitcast(_flat_ptr(context, builder, dt, args[0], args[1], dot), f32.as_pointer())
            s_ = builder.bitcast(_flat_ptr(context, builder, st, args[2], args[3], sot), f32.as_pointer())
            n_ = context.cast(builder, args[4], nt, types.int64)
            step_ = context.cast(builder, args[5], stt, types.int64)
            with cgutils.for_range(builder, n_) as loop:
                j = loop.index
                v = builder.load(builder.gep(s_, [builder.mul(j, step_)]), align=4)
                builder.store(v, builder.gep(d, [j]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    def _nanmax(builder: Any, a: Any, b: Any) -> Any:
        """max(a, b), NaN if either is NaN (torch's max-pool semantics)."""
        take_b = builder.or_(builder.fcmp_unordered("uno", b, b), builder.fcmp_ordered(">", b, a))
        return builder.select(take_b, b, a)

    @nb.extending.intrinsic
    def pool_rows(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any, n: Any, k: Any, rows: Any,
                  rstride: Any) -> Any:
        """``dst.flat[doff + i] = max_{a < rows, j < k} src.flat[soff + a*rstride + i*k + j]`` for
        ``i < n`` (float32, NaN propagates, no checks): one output row of a ``rows x k``
        max-pool window sweep."""
        if not _f32_arrays(dst, src):
            return None
        sig = types.void(dst, doff, src, soff, n, k, rows, rstride)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            at = signature.args
            d = _fptr(context, builder, at, args, 0, 1)
            s_ = _fptr(context, builder, at, args, 2, 3)
            n_, k_, rows_, rs_ = (context.cast(builder, args[i], at[i], types.int64) for i in (4, 5, 6, 7))
            with cgutils.for_range(builder, n_) as loop:
                i = loop.index
                base = builder.mul(i, k_)
                first = builder.load(builder.gep(s_, [base]), align=4)
                acc = cgutils.alloca_once_value(builder, first)
                with cgutils.for_range(builder, rows_) as la:
                    rb = builder.add(base, builder.mul(la.index, rs_))
                    with cgutils.for_range(builder, k_) as lj:
                        v = builder.load(builder.gep(s_, [builder.add(rb, lj.index)]), align=4)
                        builder.store(_nanmax(builder, builder.load(acc), v), acc)
                builder.store(builder.load(acc), builder.gep(d, [i]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    @nb.extending.intrinsic
    def pool2_row(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any, n: Any, pitch: Any) -> Any:
        """``dst.flat[doff + i] = max(src.flat[soff + 2i + {0, 1, pitch, pitch + 1}])`` for ``i < n``: one
        output row of a 2x2 / stride-2 max-pool (float32, NaN propagates, no checks); 8 outputs per
        step from four 8-float loads, a vertical max and an even/odd shuffle."""
        if not _f32_arrays(dst, src):
            return None
        sig = types.void(dst, doff, src, soff, n, pitch)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            at = signature.args
            d = _fptr(context, builder, at, args, 0, 1)
            s_ = _fptr(context, builder, at, args, 2, 3)
            n_ = context.cast(builder, args[4], at[4], types.int64)
            pt = context.cast(builder, args[5], at[5], types.int64)
            v8 = f8.as_pointer()
            nvec = builder.sdiv(n_, i64(8))
            with cgutils.for_range(builder, nvec) as loop:
                base = builder.mul(loop.index, i64(16))

                def ld(o: Any) -> Any:
                    return builder.load(builder.bitcast(builder.gep(s_, [o]), v8), align=4)
                a0, a1 = ld(base), ld(builder.add(base, i64(8)))
                b0, b1 = ld(builder.add(base, pt)), ld(builder.add(builder.add(base, pt), i64(8)))
                m0, m1 = _nanmax(builder, a0, b0), _nanmax(builder, a1, b1)
                r = _nanmax(builder, builder.shuffle_vector(m0, m1, even8), builder.shuffle_vector(m0, m1, odd8))
                builder.store(r, builder.bitcast(builder.gep(d, [builder.mul(loop.index, i64(8))]), v8), align=4)
            with cgutils.for_range(builder, builder.sub(n_, builder.mul(nvec, i64(8)))) as loop:
                i = builder.add(builder.mul(nvec, i64(8)), loop.index)
                o = builder.mul(i, i64(2))

                def ls(off: Any) -> Any:
                    return builder.load(builder.gep(s_, [off]), align=4)
                m0 = _nanmax(builder, ls(o), ls(builder.add(o, i64(1))))
                m1 = _nanmax(builder, ls(builder.add(o, pt)), ls(builder.add(builder.add(o, pt), i64(1))))
                builder.store(_nanmax(builder, m0, m1), builder.gep(d, [i]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    @nb.extending.intrinsic
    def deint2(typingctx: Any, dst: Any, d0: Any, d1: Any, src: Any, soff: Any, n: Any) -> Any:
        """``dst.flat[d0 + j] = src.flat[soff + 2j]``, ``dst.flat[d1 + j] = src.flat[soff + 2j + 1]``
        for ``j < n`` (float32, no checks): a row split into its even and odd columns, 8 of each per
        step from two 8-float loads and two shuffles."""
        if not _f32_arrays(dst, src):
            return None
        sig = types.void(dst, d0, d1, src, soff, n)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            at = signature.args
            e_ = _fptr(context, builder, at, args, 0, 1)
            o_ = _fptr(context, builder, at, args, 0, 2)
            s_ = _fptr(context, builder, at, args, 3, 4)
            n_ = context.cast(builder, args[5], at[5], types.int64)
            v8 = f8.as_pointer()
            nvec = builder.sdiv(n_, i64(8))
            with cgutils.for_range(builder, nvec) as loop:
                b = builder.mul(loop.index, i64(16))
                a0 = builder.load(builder.bitcast(builder.gep(s_, [b]), v8), align=4)
                a1 = builder.load(builder.bitcast(builder.gep(s_, [builder.add(b, i64(8))]), v8), align=4)
                o = builder.mul(loop.index, i64(8))
                builder.store(builder.shuffle_vector(a0, a1, even8), builder.bitcast(builder.gep(e_, [o]), v8), align=4)
                builder.store(builder.shuffle_vector(a0, a1, odd8), builder.bitcast(builder.gep(o_, [o]), v8), align=4)
            with cgutils.for_range(builder, builder.sub(n_, builder.mul(nvec, i64(8)))) as loop:
                j = builder.add(builder.mul(nvec, i64(8)), loop.index)
                t = builder.mul(j, i64(2))
                builder.store(builder.load(builder.gep(s_, [t]), align=4), builder.gep(e_, [j]), align=4)
                builder.store(builder.load(builder.gep(s_, [builder.add(t, i64(1))]), align=4), builder.gep(o_, [j]),
                              align=4)
            return context.get_dummy_value()

        return sig, codegen

    @nb.extending.intrinsic
    def vsum_rows(typingctx: Any, src: Any, soff: Any, n: Any, rows: Any, pitch: Any) -> Any:
        """``sum`` of ``rows`` rows of ``n`` floats (``n`` a multiple of 8) at ``src.flat[soff +
        i*pitch]`` in float32: one 8-lane accumulator over every row, then its lanes (no checks)."""
        if not _f32_arrays(src):
            return None
        sig = types.float32(src, soff, n, rows, pitch)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            at = signature.args
            s_ = _fptr(context, builder, at, args, 0, 1)
            nvec = builder.sdiv(context.cast(builder, args[2], at[2], types.int64), i64(8))
            rows_ = context.cast(builder, args[3], at[3], types.int64)
            pitch_ = context.cast(builder, args[4], at[4], types.int64)
            acc = cgutils.alloca_once_value(builder, ir.Constant(f8, None))
            with cgutils.for_range(builder, rows_) as rl:
                row = builder.gep(s_, [builder.mul(rl.index, pitch_)])
                with cgutils.for_range(builder, nvec) as loop:
                    v = builder.load(builder.bitcast(builder.gep(row, [builder.mul(loop.index, i64(8))]),
                                                     f8.as_pointer()), align=4)
                    builder.store(builder.fadd(builder.load(acc), v), acc)
            a = builder.load(acc)
            tot = builder.extract_element(a, ir.IntType(32)(0))
            for k in range(1, 8):
                tot = builder.fadd(tot, builder.extract_element(a, ir.IntType(32)(k)))
            return tot

        return sig, codegen

    @nb.extending.intrinsic
    def vsum(typingctx: Any, src: Any, soff: Any, n: Any) -> Any:
        """``sum(src.flat[soff:soff+n])`` in float32: 8 lanes, then the lanes and the tail (no checks)."""
        if not _f32_arrays(src):
            return None
        sig = types.float32(src, soff, n)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            at = signature.args
            s_ = _fptr(context, builder, at, args, 0, 1)
            n_ = context.cast(builder, args[2], at[2], types.int64)
            nvec = builder.sdiv(n_, i64(8))
            acc = cgutils.alloca_once_value(builder, ir.Constant(f8, None))
            with cgutils.for_range(builder, nvec) as loop:
                v = builder.load(builder.bitcast(builder.gep(s_, [builder.mul(loop.index, i64(8))]), f8.as_pointer()),
                                 align=4)
                builder.store(builder.fadd(builder.load(acc), v), acc)
            tot = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
            a = builder.load(acc)
            for k in range(8):
                builder.store(builder.fadd(builder.load(tot), builder.extract_element(a, ir.IntType(32)(k))), tot)
            with cgutils.for_range(builder, builder.sub(n_, builder.mul(nvec, i64(8)))) as loop:
                j = builder.add(builder.mul(nvec, i64(8)), loop.index)
                builder.store(builder.fadd(builder.load(tot), builder.load(builder.gep(s_, [j]), align=4)), tot)
            return builder.load(tot)

        return sig, codegen

    v8p = f8.as_pointer()
    i32t = ir.IntType(32)

    @nb.extending.intrinsic
    def vcopy(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any, n: Any) -> Any:
        """``dst.flat[doff:doff+n] = src.flat[soff:soff+n]`` inline: 8-float vector moves and one
        masked tail (no libc call -- short rows are the common case here)."""
        if not _f32_arrays(dst, src):
            return None
        sig = types.void(dst, doff, src, soff, n)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            at = signature.args
            d = _fptr(context, builder, at, args, 0, 1)
            s_ = _fptr(context, builder, at, args, 2, 3)
            n_ = context.cast(builder, args[4], at[4], types.int64)
            nvec = builder.sdiv(n_, i64(8))
            with cgutils.for_range(builder, nvec) as loop:
                off = builder.mul(loop.index, i64(8))
                v = builder.load(builder.bitcast(builder.gep(s_, [off]), v8p), align=4)
                builder.store(v, builder.bitcast(builder.gep(d, [off]), v8p), align=4)
            tail = builder.sub(n_, builder.mul(nvec, i64(8)))
            with builder.if_then(builder.icmp_signed(">", tail, i64(0))):
                off = builder.mul(nvec, i64(8))
                t32 = builder.trunc(tail, i32t)
                splat = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(ir.VectorType(i32t, 8), ir.Undefined), t32, i32t(0)),
                    ir.Constant(ir.VectorType(i32t, 8), ir.Undefined), ir.Constant(ir.VectorType(i32t, 8), [0] * 8))
                msk = builder.icmp_signed("<", ir.Constant(ir.VectorType(i32t, 8), list(range(8))), splat)
                mvt = ir.VectorType(ir.IntType(1), 8)
                mload = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(f8, [v8p, i32t, mvt, f8]), "llvm.masked.load.v8f32.p0")
                mstore = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [f8, v8p, i32t, mvt]), "llvm.masked.store.v8f32.p0")
                v = builder.call(mload, [builder.bitcast(builder.gep(s_, [off]), v8p), i32t(4), msk,
                                         ir.Constant(f8, None)])
                builder.call(mstore, [v, builder.bitcast(builder.gep(d, [off]), v8p), i32t(4), msk])
            return context.get_dummy_value()

        return sig, codegen

    out["_vcopy"] = vcopy
    out["_pool_rows"] = pool_rows
    out["_pool2_row"] = pool2_row
    out["_deint2"] = deint2
    out["_vsum"] = vsum
    out["_vsum_rows"] = vsum_rows
    out["_gather_f32"] = gather_f32
    out["_zero_f32"] = zero_f32
    out["_prefetch"] = prefetch
    return out


# ============================================================ kernel sources
# The functions below are never called as Python: their source is copied into
# the generated kernel module (see _gen_module) and compiled there by numba.
# Names they use (_tile*, _tr8x8, _transpose_region, prange) are bound in that
# module.
prange = range


def _tile_span(cols_b, vals_b, code, s, e, xn, xoff, b0, n, yr, sc, bb, lo):  # type: ignore[no-untyped-def]
    """``yr[b0:b0+n] = max(sc * sum_{j in [s, e)} vals[j] * xn[xoff + cols[j], b0:b0+n] + bb, lo)``:
    the span covered by 64/32/16/8-wide register tiles, then one masked 8-wide pass for a
    remainder of 1..7 columns; a single column (``n == 1``) is a dot product."""
    end = b0 + n
    while b0 + 64 <= end:
        _tile64(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo)
        b0 += 64
    if b0 + 32 <= end:
        _tile32(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo)
        b0 += 32
    if b0 + 16 <= end:
        _tile16(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo)
        b0 += 16
    if b0 + 8 <= end:
        _tile8(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo)
        b0 += 8
    if n == 1:
        _tile1(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo)
    elif b0 < end:
        _tile8m(cols_b, vals_b, code, s, e, xn, xoff, b0, yr, sc, bb, lo, end - b0)


def _spmm_par(bounds, starts, ends, cols_b, vals_b, code, scales, bias, lo, x, xt, yt, y,  # type: ignore
              rows_per_group, k_per_group, batch_major):
    """``yt[n] = max(W @ xt[n] * scales[:, None] + bias[:, None], lo)`` for n < N.

    xt ``[N, G*K, B]``, yt ``[N, R, B]`` float32; row ``r`` is in group
    ``r // rows_per_group`` and reads ``xt[n, g*K + col]`` (``K = k_per_group``);
    its entries are ``[starts[r], ends[r])`` (uint8 byte views ``cols_b`` /
    ``vals_b``, dtype ``code``).  ``bounds`` ``[T+1]``: nnz-balanced row blocks,
    one task per (n, block).  ``batch_major`` (N == 1): first ``xt[0] = x.T``
    (x ``[B, K]``), and each task writes its rows transposed into y ``[B, R]``.
    """
    if batch_major:
        _transpose_region(x, xt[0], 0, x.shape[0], 0, x.shape[1])
    N = xt.shape[0]
    nch = bounds.shape[0] - 1
    for t in prange(N * nch):
        n = t // nch
        ch = t - n * nch
        xn = xt[n]
        yn = yt[n]
        B = xn.shape[1]
        r0 = bounds[ch]
        r1 = bounds[ch + 1]
        g = r0 // rows_per_group  # group of row r, tracked without a division per row
        g_end = (g + 1) * rows_per_group
        for r in range(r0, r1):
            if r == g_end:
                g += 1
                g_end += rows_per_group
            _tile_span(cols_b, vals_b, code, starts[r], ends[r], xn, g * k_per_group, 0, B, yn[r], scales[r],
                       bias[r], lo)
        if batch_major:
            _transpose_region(yn, y, r0, r1, 0, B)


def _linear_rows(r0, r1, rb, blk, cols_b, vals_b, code, starts, ends, scales, bias, lo, acts, af, xin, yout,  # type: ignore
                 pfd):
    """Rows ``[r0, r1)`` of one feature-major Linear layer (its first row is ``rb``): row ``r``
    reads ``acts[xin + col]`` and writes ``acts[yout + r]``; where ``blk[r]``, rows ``r..r+3`` (a
    4x1 block) run together over 24-column tiles of the batch (``_rows4``, the rest of the batch
    row by row). A block that starts before ``r0`` belongs to the previous task, which runs it
    whole -- when the batch has a 24-column tile; below that every row runs alone, so each task
    runs exactly its rows. Each row prefetches the entries of the row ``pfd`` on (0: none); a
    level is a short prefix of each row, rows far apart (``LINEAR_PREFETCH_ROWS``)."""
    B = acts.shape[1]
    nt = B // 24
    csz = 1 << (code >> 1)  # bytes per column index (uint8 / uint16 / int32) ...
    vsz = 1 if code & 1 else 4  # ... and per value (int8 / float32)
    r = r0
    k = (r - rb) % 4
    if nt > 0 and k != 0 and blk[r - k] != 0:  # below 24 columns blocks run row by row: no overlap
        r += 4 - k
    while r < r1:
        if pfd > 0 and r + pfd < r1:
            p = starts[r + pfd]
            _prefetch(cols_b, p * csz)
            _prefetch(vals_b, p * vsz)
            _prefetch(vals_b, p * vsz + 64)
        if blk[r] != 0 and nt > 0:
            _rows4(cols_b, vals_b, code, starts, r, ends[r] - starts[r], acts, xin, 0, af[(yout + r) * B:], B,
                   scales, bias, lo, nt)
            for i in range(4):
                _tile_span(cols_b, vals_b, code, starts[r + i], ends[r + i], acts, xin, nt * 24, B - nt * 24,
                           acts[yout + r + i], scales[r + i], bias[r + i], lo)
            r += 4
        else:
            _tile_span(cols_b, vals_b, code, starts[r], ends[r], acts, xin, 0, B, acts[yout + r], scales[r], bias[r],
                       lo)
            r += 1


def _chain_par(x, y, acts, table, bounds, starts, ends, cols_b, vals_b, code, cols, vals, scales, bias, los,  # type: ignore
               blk, T):
    """A whole chain of sparse Linear layers in one call: ``x`` ``[B, K]`` (batch-major) is
    transposed into ``acts`` (``[rows, B]``, every layer's feature-major activations), each layer
    runs :func:`_linear_rows` (batch 1: :func:`_spmv_rows` on the typed ``cols`` / ``vals``) over
    ``T`` nnz-balanced row blocks, in parallel when ``table[l, 4]``, and the last layer's output
    is transposed into ``y`` ``[B, R]``.  Layer ``l`` (``table[l] = in_row, out_row, row0, rows,
    parallel, prefetch rows``) reads ``acts[in_row + col]`` and writes ``acts[out_row + r - row0]`` for its
    global rows ``r`` in ``[row0, row0 + rows)`` (blocks ``bounds[l*(T+1) : (l+1)*(T+1)]``); its
    entries are ``[starts[r], ends[r])`` of the concatenated entries, epilogue
    ``max(scales[r]*acc + bias[r], los[l])``; ``blk[r]``: rows ``r..r+3`` are a 4x1 block.  One
    compiled call instead of a Python call, a dispatch and argument checks per layer and per
    transpose."""
    B = x.shape[0]
    K = x.shape[1]
    in0 = table[0, 0]
    if B == 1:
        for j in range(K):
            acts[in0 + j, 0] = x[0, j]
    else:
        step = ((K + T - 1) // T + 7) // 8 * 8
        for p in prange(T):
            j0 = min(p * step, K)
            _transpose_region(x, acts[in0:in0 + K], 0, B, j0, min(j0 + step, K))
    a1 = acts[:, 0]
    af = acts.reshape(-1)
    for li in range(table.shape[0]):
        xin = table[li, 0]
        yout = table[li, 1] - table[li, 2]
        rb = table[li, 2]
        lo = los[li]
        b0 = li * (T + 1)
        if table[li, 4] == 0:  # small: on this thread, no fork/join
            if B == 1:
                _spmv_rows(bounds[b0], bounds[b0 + T], starts, ends, cols, vals, scales, bias, lo, a1[xin:], a1[yout:])
            else:
                _linear_rows(bounds[b0], bounds[b0 + T], rb, blk, cols_b, vals_b, code, starts, ends, scales, bias, lo,
                             acts, af, xin, yout, table[li, 5])
        elif B == 1:
            for t in prange(T):
                _spmv_rows(bounds[b0 + t], bounds[b0 + t + 1], starts, ends, cols, vals, scales, bias, lo, a1[xin:],
                           a1[yout:])
        else:
            for t in prange(T):
                _linear_rows(bounds[b0 + t], bounds[b0 + t + 1], rb, blk, cols_b, vals_b, code, starts, ends, scales,
                             bias, lo, acts, af, xin, yout, table[li, 5])
    last = table.shape[0] - 1
    o0 = table[last, 1]
    _transpose_region(acts[o0:o0 + table[last, 3]], y, 0, table[last, 3], 0, B)


def _spmv_rows(r0, r1, starts, ends, cols, vals, scales, bias, lo, x, y):  # type: ignore[no-untyped-def]
    """Batch 1, rows ``[r0, r1)``: ``y[r] = max(scales[r] * sum_j vals[j] * x[cols[j]] + bias[r], lo)``.

    A plain typed loop (numba specialises it per index / value dtype on first use) with four
    independent accumulators; the row loop lives inside the compiled code, so a row costs a
    few cycles beyond its non-zeros (the tile kernels' per-call set-up dominated at batch 1).
    Entry indices are unsigned: a signed index makes numba wrap negatives around, several
    instructions per load (1.6x the time per row at 10% density).  A level is a short prefix of
    each row, rows far apart, which no hardware prefetcher follows: each row prefetches the
    entries of the row ``SPMV_PREFETCH_ROWS`` on (MLP 1024x3 at 2%: 0.58x the time).
    """
    for r in range(r0, r1):
        if r + SPMV_PREFETCH_ROWS < r1:
            p = starts[r + SPMV_PREFETCH_ROWS]
            _prefetch(cols, p)
            _prefetch(vals, p)
            _prefetch(vals, p + 16)
        s = np.uint64(starts[r])
        e = np.uint64(ends[r])
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        j = s
        while j + np.uint64(4) <= e:
            a0 += np.float32(vals[j]) * x[cols[j]]
            a1 += np.float32(vals[j + np.uint64(1)]) * x[cols[j + np.uint64(1)]]
            a2 += np.float32(vals[j + np.uint64(2)]) * x[cols[j + np.uint64(2)]]
            a3 += np.float32(vals[j + np.uint64(3)]) * x[cols[j + np.uint64(3)]]
            j += np.uint64(4)
        while j < e:
            a0 += np.float32(vals[j]) * x[cols[j]]
            j += np.uint64(1)
        v = ((a0 + a1) + (a2 + a3)) * scales[r] + bias[r]
        y[r] = lo if v < lo else v


def _spmv_par(bounds, starts, ends, cols, vals, scales, bias, lo, x, y):  # type: ignore[no-untyped-def]
    """Batch 1 (:func:`_spmv_rows`) over the row blocks ``bounds``, one task each."""
    nch = bounds.shape[0] - 1
    for ch in prange(nch):
        _spmv_rows(bounds[ch], bounds[ch + 1], starts, ends, cols, vals, scales, bias, lo, x, y)


def _gemv_par(bounds, w, K, x, bias, lo, y):  # type: ignore[no-untyped-def]
    """Dense batch 1: ``y[r] = max(sum_k w[r*K + k] * x[k] + bias[r], lo)`` (``w`` a flat
    row-major matrix), row blocks ``bounds`` one task each.  Each row is one contiguous dot
    product, vectorised (fastmath reassociates it into 8-lane partial sums); unsigned row offsets
    keep numba's negative-index wraparound out of the loop."""
    for t in prange(bounds.shape[0] - 1):
        for r in range(bounds[t], bounds[t + 1]):
            base = np.uint64(r) * np.uint64(K)
            acc = np.float32(0.0)
            for k in range(K):
                acc += w[base + np.uint64(k)] * x[k]
            v = acc + bias[r]
            y[r] = lo if v < lo else v


def _transpose_region(src, dst, i0, i1, j0, j1):  # type: ignore[no-untyped-def]
    """``dst[j, i] = src[i, j]`` for ``i in [i0, i1)``, ``j in [j0, j1)`` (float32 2-D).

    Full 8x8 blocks go through registers; the inner loop runs along the longer
    side so both streams stay sequential (avoids 4 KiB-stride L1 set conflicts).
    """
    ie = i0 + ((i1 - i0) // 8) * 8
    je = j0 + ((j1 - j0) // 8) * 8
    if j1 - j0 >= i1 - i0:
        for i in range(i0, ie, 8):
            for j in range(j0, je, 8):
                _tr8x8(src, i, j, dst)
    else:
        for j in range(j0, je, 8):
            for i in range(i0, ie, 8):
                _tr8x8(src, i, j, dst)
    for i in range(ie, i1):
        for j in range(j0, j1):
            dst[j, i] = src[i, j]
    for i in range(i0, ie):
        for j in range(je, j1):
            dst[j, i] = src[i, j]


def _conv_rows(r0, r1, starts, ends, offs_b, vals_b, code, scales, bias, lo, xq, img_base, yn, rn,  # type: ignore
               has_res, pool, rows_per_group, group_stride, Wq, OH, OW, wide):
    """Output channels ``[r0, r1)`` of one image.

    ``acc[r, p] = sum_j vals[j] * xq[img_base + g*group_stride + offs[j] + p]`` over the *wide*
    plane ``p = oy*Wq + ox`` (``ox < Wq``; g = group of r): the flat plane is covered by 64-wide
    register tiles whatever the row width (the tiles of :func:`_spmm_par` on the flat ``[L, 1]``
    view ``xq``, so a "column index" is a flat offset).  The tile lands in the cache-resident
    ``wide`` scratch, and its ``ox < OW`` columns are copied to ``yn[r]``:
    ``max(sc*acc + bb (+ rn[r]), lo)`` -- the residual ``rn`` (``has_res``) fused in; or, with
    ``pool > 1``, the ``pool x pool`` / stride ``pool`` max-pool of ``max(sc*acc + bb, lo)``
    goes to ``yn[r]`` (``[OH // pool, OW // pool]``) -- a following MaxPool2d fused in.
    """
    L = OH * Wq
    tlo = np.float32(-np.inf) if has_res else lo
    for r in range(r0, r1):
        s = starts[r]
        e = ends[r]
        sc = scales[r]
        bb = bias[r]
        base = img_base + (r // rows_per_group) * group_stride
        _tile_span_np(offs_b, vals_b, code, s, e, xq, base, 0, L, wide, sc, bb, tlo)
        yr = yn[r]
        if pool > 1:  # NaN propagates, as in torch
            PW = OW // pool
            if pool == 2:  # the common case, vectorised
                for py in range(OH // 2):
                    _pool2_row(yr, py * PW, wide, py * 2 * Wq, PW, Wq)
            else:
                for py in range(OH // pool):
                    _pool_rows(yr, py * PW, wide, py * pool * Wq, PW, pool, pool, Wq)
        elif has_res:
            rflat = rn[r].reshape(OH * OW)
            yflat = yr.reshape(OH * OW)
            for oy in range(OH):
                w0 = oy * Wq
                o0 = oy * OW
                for ox in range(OW):
                    v = wide[np.uint64(w0 + ox)] + rflat[np.uint64(o0 + ox)]
                    yflat[np.uint64(o0 + ox)] = lo if v < lo else v
        else:
            for oy in range(OH):
                _vcopy(yr, oy * OW, wide, oy * Wq, OW)


def _split_image(xc, dst, ph, pw, sh, sw):  # type: ignore[no-untyped-def]
    """Write one image ``xc`` ``[C, H, W]`` into the interior of its zero-padded stride-phase
    split: ``dst[(c*sh + a)*sw + b, i, j] = xpad[c, i*sh + a, j*sw + b]``, ``dst``
    ``[C*sh*sw, Hq, Wq]``.  A stride-``s`` convolution is then a stride-1 one on the phases,
    and every tap reads contiguous rows.  Only positions inside ``xc`` are written: the
    padding must be zeroed once beforehand (it is the same for every image)."""
    C = xc.shape[0]
    H = xc.shape[1]
    W = xc.shape[2]
    Hq = dst.shape[1]
    Wq = dst.shape[2]
    for c in range(C):
        for a in range(sh):
            # rows i with 0 <= i*sh + a - ph < H: [i0, i1)
            i0 = (ph - a + sh - 1) // sh if ph > a else 0
            i1 = min((H + ph - a + sh - 1) // sh, Hq)
            i0 = min(i0, i1)
            for b in range(sw):
                pbase = ((c * sh + a) * sw + b) * Hq * Wq
                j0 = (pw - b + sw - 1) // sw if pw > b else 0
                j1 = min((W + pw - b + sw - 1) // sw, Wq)
                j0 = min(j0, j1)
                for i in range(i0, i1):
                    o = pbase + i * Wq
                    si = (c * H + i * sh + a - ph) * W + b - pw
                    if sw == 1:
                        _vcopy(dst, o + j0, xc, si + j0, j1 - j0)
                    else:
                        _gather_f32(dst, o + j0, xc, si + j0 * sw, j1 - j0, sw)


def _phase_split_par(x, xq, ph, pw, sh, sw):  # type: ignore[no-untyped-def]
    """Zero-padded stride-phase split (:func:`_split_image`) of every image of ``x``
    ``[N, C, H, W]`` into ``xq`` ``[N, C*sh*sw, Hq, Wq]``."""
    P = xq.shape[1] * xq.shape[2] * xq.shape[3]
    for n in prange(x.shape[0]):
        if ph or pw or x.shape[2] < xq.shape[2] * sh or x.shape[3] < xq.shape[3] * sw:
            _zero_f32(xq[n], 0, P)
        _split_image(x[n], xq[n], ph, pw, sh, sw)


def _conv_par(bounds, starts, ends, offs_b, vals_b, code, scales, bias, lo, x, xq, xqf, out, res,  # type: ignore
              has_res, pool, OH, OW, rows_per_group, group_stride, ph, pw, sh, sw, mode):
    """Direct sparse convolution (no im2col); entry ``j`` of output channel ``r`` has the
    precomputed flat offset ``offs[j]`` (int32) of its tap inside a phase-split group.

    ``mode`` 0: ``xq`` ``[N, P, Hq, Wq]`` holds every image already split (``xqf`` its flat
    ``[L, 1]`` view, with slack after the end); one task per (image, nnz-balanced block of
    channels in ``bounds``).  ``mode`` 1: ``xq`` ``[T, P, Hq, Wq]`` is scratch; task ``t`` of
    ``T`` takes a contiguous run of images and pads/splits each into ``xq[t]`` just before
    convolving it, so the split image is still in cache (no padded copy through memory).
    ``res`` ``[N, O, OH, OW]`` is added before the clamp when ``has_res``; ``pool > 1``: ``out``
    is the max-pooled ``[N, O, OH // pool, OW // pool]``.
    """
    N = out.shape[0]
    O = out.shape[1]
    Wq = xq.shape[3]
    img_stride = xq.shape[1] * xq.shape[2] * Wq
    Lw = OH * Wq + OW + 64
    if mode == 1:
        T = xq.shape[0]
        for t in prange(T):
            wide = np.empty(Lw, dtype=np.float32)
            n0 = (t * N) // T
            n1 = ((t + 1) * N) // T
            _zero_f32(xq[t], 0, img_stride)  # the padding; images then only fill the interior
            for n in range(n0, n1):
                _split_image(x[n], xq[t], ph, pw, sh, sw)
                _conv_rows(0, O, starts, ends, offs_b, vals_b, code, scales, bias, lo, xqf, t * img_stride,
                           out[n], res[n if has_res else 0], has_res, pool, rows_per_group, group_stride, Wq,
                           OH, OW, wide)
    else:
        nch = bounds.shape[0] - 1
        for t in prange(N * nch):
            wide = np.empty(Lw, dtype=np.float32)
            n = t // nch
            ch = t - n * nch
            _conv_rows(bounds[ch], bounds[ch + 1], starts, ends, offs_b, vals_b, code, scales, bias, lo, xqf,
                       n * img_stride, out[n], res[n if has_res else 0], has_res, pool, rows_per_group,
                       group_stride, Wq, OH, OW, wide)


def _transpose_par(src, dst, parts):  # type: ignore[no-untyped-def]
    """:func:`_transpose_region` of the whole array, the longer side split into ``parts`` blocks
    (multiples of 8) run in parallel."""
    R = src.shape[0]
    Cn = src.shape[1]
    if R >= Cn:
        step = ((R + parts - 1) // parts + 7) // 8 * 8
        for p in prange(parts):
            i0 = min(p * step, R)
            _transpose_region(src, dst, i0, min(i0 + step, R), 0, Cn)
    else:
        step = ((Cn + parts - 1) // parts + 7) // 8 * 8
        for p in prange(parts):
            j0 = min(p * step, Cn)
            _transpose_region(src, dst, 0, R, j0, min(j0 + step, Cn))


def _batch_tiles(cols_b, vals_b, code, s, e, xn, xoff, yflat, yrow, sc, bb, lo):  # type: ignore
    """Row ``yrow`` of ``yflat`` (a flat ``[rows * B]`` array) ``= max(sc * sum_{j in [s, e)} vals[j] *
    xn[xoff + cols[j], :] + bb, lo)`` over the row width ``B``.  Flat output, no per-row array
    views (a numba view costs two atomic reference-count updates): the tiles' column offset ``b0``
    moves both x and y, so y's row offset ``yrow*B`` goes into ``b0`` and is taken back out of x
    as ``yrow`` rows."""
    B = xn.shape[1]
    _tile_span(cols_b, vals_b, code, s, e, xn, xoff - yrow, yrow * B, B, yflat, sc, bb, lo)


def _convt_par(bounds, starts, ends, offs_b, vals_b, code, scales, bias, lo, xt, yt,  # type: ignore
               rows_per_group, group_rows, sh, sw, Wp, PH, PW, pool, out_Hp, out_Wp, out_ph, out_pw):
    """Feature-major direct sparse convolution: activations are ``[C*Hp*Wp, B]`` (row = one
    zero-padded input position, the batch along the row), so every non-zero
    ``(c, ky, kx)`` of output channel ``r`` is one AXPY over a contiguous batch row:
    ``y[r, oy, ox, :] += v * xt[g*group_rows + offs[j] + oy*sh*Wp + ox*sw, :]`` with the
    flat offset ``offs[j] = c*Hp*Wp + ky*dh*Wp + kx*dw``.  No im2col, no junk columns, no
    layout change between layers.  The ``PH x PW`` (pooled) output goes to the interior
    of the next layer's zero-padded input ``yt`` ``[O*out_Hp*out_Wp, B]`` (offset
    ``out_ph, out_pw``); ``pool > 1`` takes the max of each ``pool x pool`` window
    (NaN propagates).  Tasks: (nnz-balanced block of output channels, pooled output row).
    """
    B = xt.shape[1]
    yflat = yt.reshape(yt.shape[0] * B)
    nch = bounds.shape[0] - 1
    pp = pool * pool
    for t in prange(nch * PH):
        ch = t // PH
        py = t - ch * PH
        win = np.empty(pp * B, dtype=np.float32)
        for r in range(bounds[ch], bounds[ch + 1]):
            s = starts[r]
            e = ends[r]
            sc = scales[r]
            bb = bias[r]
            gbase = (r // rows_per_group) * group_rows
            obase = r * out_Hp * out_Wp + (py + out_ph) * out_Wp + out_pw
            for px in range(PW):
                if pool == 1:
                    _batch_tiles(offs_b, vals_b, code, s, e, xt, gbase + py * sh * Wp + px * sw, yflat, obase + px,
                                 sc, bb, lo)
                    continue
                for i in range(pool):
                    for jj in range(pool):
                        xoff = gbase + (py * pool + i) * sh * Wp + (px * pool + jj) * sw
                        _batch_tiles(offs_b, vals_b, code, s, e, xt, xoff, win, i * pool + jj, sc, bb, lo)
                yo = np.uint64((obase + px) * B)
                for b in range(B):
                    yflat[yo + np.uint64(b)] = win[b]
                for q in range(1, pp):
                    qo = np.uint64(q * B)
                    for b in range(B):
                        v = win[qo + np.uint64(b)]
                        m = yflat[yo + np.uint64(b)]
                        yflat[yo + np.uint64(b)] = v if (v > m) | (v != v) else m



# Per-image program steps (rows of an int64 table; see _prog_image and pack/program.py).
PROG_COPY_IN, PROG_SPLIT, PROG_CONV_DIRECT, PROG_CONV_WIDE, PROG_GAP, PROG_COPY_OUT, PROG_SUBPAD = range(7)
PROG_FIELDS = 27  # columns of the step table
#: The dtype codes a program runs (int32 tap offsets; float32 or int8 values): its tiles compile
#: only these (``_ptile*``; see ``_program_source``).
PROGRAM_CODES = (4, 5)


def _copy_rows(dst, d0, dpitch, dplane, src, s0, spitch, splane, C, H, W):  # type: ignore[no-untyped-def]
    """``C x H`` rows of ``W`` floats between two planar layouts (flat offsets, pitches, plane sizes)."""
    for c in range(C):
        for i in range(H):
            _vcopy(dst, d0 + c * dplane + i * dpitch, src, s0 + c * splane + i * spitch, W)


def _plane_rows(offs_b, vals_b, code, starts, ends, scales, bias, blk, arena, arena2, src, dst, row0, O, rpg,  # type: ignore
                gstride, dplane, L, lo, has_res, roff):
    """Rows ``[row0, row0 + O)`` of a direct plane conv, each over its ``L`` wide positions, stored
    at ``dst + rr*dplane``; ``has_res``: plus the residual plane ``roff`` floats further on, in
    the tiles' epilogue. Where ``blk[r]``, rows ``r..r+3`` share their columns (a 4x1 block) and
    run together in 24-position tiles (``_rows4``), the remainder row by row (a function of its
    own: inlined into the program's big loop, the tile loop's invariants spilled to the stack)."""
    rr = 0
    while rr < O:  # row by row: a row's tiles share its loop lengths (predicted)
        r = row0 + rr
        yb = dst + rr * dplane
        xb = src + (rr // rpg) * gstride
        if blk[r] != 0:
            n = ends[r] - starts[r]
            q = (L // 24) * 24
            if has_res:
                _rows4r(offs_b, vals_b, code, starts, r, n, arena2, xb - yb, yb, arena, dplane, scales, bias, lo,
                        L // 24, roff)
            else:
                _rows4(offs_b, vals_b, code, starts, r, n, arena2, xb - yb, yb, arena, dplane, scales, bias, lo,
                       L // 24)
            if q < L:
                for k in range(4):
                    y0 = yb + k * dplane
                    if has_res:
                        _tile_span_npr(offs_b, vals_b, code, starts[r + k], ends[r + k], arena2, xb - y0, y0 + q,
                                       L - q, arena, scales[r + k], bias[r + k], lo, roff)
                    else:
                        _tile_span_np(offs_b, vals_b, code, starts[r + k], ends[r + k], arena2, xb - y0, y0 + q,
                                      L - q, arena, scales[r + k], bias[r + k], lo)
            rr += 4
            continue
        if has_res:
            _tile_span_npr(offs_b, vals_b, code, starts[r], ends[r], arena2, xb - yb, yb, L, arena, scales[r],
                           bias[r], lo, roff)
        else:
            _tile_span_np(offs_b, vals_b, code, starts[r], ends[r], arena2, xb - yb, yb, L, arena, scales[r],
                          bias[r], lo)
        rr += 1


def _strip_rows(offs_b, vals_b, code, starts, ends, scales, bias, arena, arena2, src, dst, row0, O, rpg, gstride,  # type: ignore
                dplane, OH, lo, has_res, roff):
    """Rows ``[row0, row0 + O)`` of a stride-1 conv between strip planes (8 wide, pitch 16): the
    ``OH`` output rows of a channel are ``OH`` vectors one cache line apart, computed as tiles of
    8 / 4 / 2 / 1 of them (``_tile{64,32,16}s``, ``_tile8``).  No junk column is computed or
    written; on strip planes and strip phases (values from column 4) each tap's 8 floats lie
    inside one line, so no load splits a line (phases split at pitch 16 from column 0, when a
    wider border forces it, may)."""
    for rr in range(O):
        r = row0 + rr
        yb = dst + rr * dplane
        xo = src + (rr // rpg) * gstride - yb
        s = starts[r]
        e = ends[r]
        sc = scales[r]
        bb = bias[r]
        oy = 0
        if has_res:
            while oy + 8 <= OH:
                _tile64sr(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo, roff)
                oy += 8
            if oy + 4 <= OH:
                _tile32sr(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo, roff)
                oy += 4
            if oy + 2 <= OH:
                _tile16sr(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo, roff)
                oy += 2
            if oy < OH:
                _tile8r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo, roff)
        else:
            while oy + 8 <= OH:
                _tile64s(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo)
                oy += 8
            if oy + 4 <= OH:
                _tile32s(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo)
                oy += 4
            if oy + 2 <= OH:
                _tile16s(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo)
                oy += 2
            if oy < OH:
                _tile8(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * 16, arena, sc, bb, lo)


def _phase_row(P, HqWd, Wd, bh, pwm, cd, c, y):  # type: ignore[no-untyped-def]
    """Where row ``y`` (of the interior) of channel ``c`` puts its even columns in a 2x2 phase split
    (SPLIT's layout, see ``_row_rows``): plane row ``y + bh`` is phase row ``(y + bh) // 2`` of row
    phase ``(y + bh) % 2``; column ``2m`` is source column ``2m + pwm`` past the split's first, so
    phase column ``m + pwm // 2`` of column phase ``pwm % 2``."""
    pr = y + bh
    return P + (c * 4 + 2 * (pr % 2) + pwm % 2) * HqWd + (pr // 2) * Wd + cd + pwm // 2


def _row_rows(offs_b, vals_b, code, starts, ends, scales, bias, blk, arena, arena2, src, dst, row0, O, rpg,  # type: ignore
              gstride, dplane, Wq, OH, OW, lo, has_res, roff, phased, P, HqWd, Wd, bh, pwm, cd):
    """Rows ``[row0, row0 + O)`` of a direct conv whose rows are 16, 32 or 64 valid columns (2, 4,
    8 vectors) at pitch ``Wq``: per output channel its ``OH`` rows as 64-position tiles of
    ``64 / OW`` whole rows (``_tile64g{2,4}``: the vectors of a row back to back, rows ``Wq``
    apart; one row = the plain 64-wide tile), the last rows as 32 / 16-wide tiles.  Only valid
    columns are computed and written -- no junk, nothing to clear, no narrow tail tiles -- where
    ``_plane_rows`` runs the flat span ``OH * Wq`` (the two junk columns of every row too) and
    clears the junk after.  4x1-blocked rows (``blk``) go through ``_plane_rows`` and clear theirs.

    ``phased``: the output's only readers are stride-2 convs (and option-A shortcuts), so the rows go
    straight into its 2x2 phase split (the SPLIT step's layout: phases at ``P``, ``HqWd`` floats
    each, rows ``Wd`` apart, the plane's border ``bh`` rows, the readers' padding ``pwm``, the
    first value at column ``cd``) -- whole-row tiles split in registers (``_tile64g{4,2}p``),
    other rows stored at ``dst`` as usual and split from there (``_deint2``)."""
    deo = HqWd if pwm % 2 == 0 else 1 - HqWd  # odd columns' place in the phases minus even columns'
    rr = 0
    while rr < O:
        r = row0 + rr
        yb = dst + rr * dplane
        xb = src + (rr // rpg) * gstride
        n_rows = 1
        y_done = 0  # rows [y_done, OH) of these n_rows channels were stored at dst: split them below
        if blk[r] != 0:  # four rows sharing their columns: the 24-position tiles of the flat span
            _plane_rows(offs_b, vals_b, code, starts, ends, scales, bias, blk, arena, arena2, xb, yb, r, 4, 4,
                        0, dplane, OH * Wq, lo, has_res, roff)
            for k in range(4):
                for oy in range(OH):
                    _zero_f32(arena, yb + k * dplane + oy * Wq + OW, Wq - OW)
            n_rows = 4
        else:
            xo = xb - yb
            s = starts[r]
            e = ends[r]
            sc = scales[r]
            bb = bias[r]
            oy = 0
            if OW == 32:
                while oy + 2 <= OH:
                    if phased:
                        e0 = _phase_row(P, HqWd, Wd, bh, pwm, cd, rr, oy)
                        e1 = _phase_row(P, HqWd, Wd, bh, pwm, cd, rr, oy + 1)
                        if has_res:
                            _tile64g4pr(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq,
                                        roff, e0, e1 - e0, Wd, deo)
                        else:
                            _tile64g4p(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq,
                                       e0, e1 - e0, Wd, deo)
                    elif has_res:
                        _tile64g4r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq, roff)
                    else:
                        _tile64g4(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq)
                    oy += 2
                y_done = oy if phased else OH
                if oy < OH:
                    if has_res:
                        _tile32r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, roff)
                    else:
                        _tile32(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo)
            elif OW == 16:
                while oy + 4 <= OH:
                    if phased:
                        e0 = _phase_row(P, HqWd, Wd, bh, pwm, cd, rr, oy)
                        e1 = _phase_row(P, HqWd, Wd, bh, pwm, cd, rr, oy + 1)
                        if has_res:
                            _tile64g2pr(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq,
                                        roff, e0, e1 - e0, Wd, deo)
                        else:
                            _tile64g2p(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq,
                                       e0, e1 - e0, Wd, deo)
                    elif has_res:
                        _tile64g2r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq, roff)
                    else:
                        _tile64g2(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq)
                    oy += 4
                y_done = oy if phased else OH
                if oy + 2 <= OH:
                    if has_res:
                        _tile32g2r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq, roff)
                    else:
                        _tile32g2(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, Wq)
                    oy += 2
                if oy < OH:
                    if has_res:
                        _tile16r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, roff)
                    else:
                        _tile16(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo)
            else:  # OW == 64: a row is one plain 64-wide tile
                while oy < OH:
                    if has_res:
                        _tile64r(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo, roff)
                    else:
                        _tile64np(offs_b, vals_b, code, s, e, arena2, xo, yb + oy * Wq, arena, sc, bb, lo)
                    oy += 1
        if phased:  # rows stored at dst: their even / odd columns into the phases
            for k in range(n_rows):
                c = rr + k
                for y in range(y_done, OH):
                    e0 = _phase_row(P, HqWd, Wd, bh, pwm, cd, c, y)
                    _deint2(arena, e0, e0 + deo, arena, yb + k * dplane + y * Wq, OW // 2)
        rr += n_rows


def _prog_image(xf, n, of, arena, arena2, base, steps, offs_b, vals_b, code, starts, ends, scales, bias, blk):  # type: ignore
    """Run every step of a per-image program on image ``n`` (see :func:`_prog_par`).

    Activations live in ``arena`` (this task's region starts at ``base``) as zero-bordered planes
    ``[C, H + 2*bh, W + 2*bw]``; a step's offsets are relative to ``base``.  Steps:

    * ``COPY_IN dst C H W pitch plane``: image ``n`` of ``xf`` (flat NCHW) into a plane interior
      (``dst`` points at the interior's first element).
    * ``SPLIT src dst C Hp Wp sh sw Hq Wq Wd cd x0 Wv``: stride-phase split of a bordered plane,
      ``dst[(c*sh + a)*sw + b, i, cd + j] = src[c, i*sh + a, x0 + j*sw + b]`` for source columns
      ``x0 + j*sw + b < x0 + Wv`` (0 outside; ``x0``: border columns the conv does not read),
      phase rows at pitch ``Wd`` (``Wq`` and ``cd = 0``; or strip rows: ``Wd = 16``, ``cd = 4``).
    * ``CONV_DIRECT src dst row0 O rpg gstride L Wq OH OW dplane res relu``: a stride-1 conv whose
      output pitch equals its input pitch ``Wq``: per output channel, its ``L`` positions as
      64/32/16/8-wide tiles (:func:`_plane_rows`) stored straight into the output plane
      (``dst`` = interior start); the columns past ``OW`` land on the border and are zeroed
      after; ``res >= 0``: a residual plane of the same layout is added before the clamp.
      Field 19: 1 -- both planes are strip planes (``OW == 8``, pitch 16, :func:`_strip_rows`);
      2 -- rows of ``OW`` = 16 / 32 / 64 valid columns as whole-row tiles (:func:`_row_rows`);
      neither computes a junk column, so there is nothing to clear.  Fields 20-26 (with 2):
      ``phased P HqWd Wd bh pwm cd`` -- when ``phased``, the output goes into the 2x2 phase split
      its stride-2 readers use (the SPLIT layout at ``P``): whole-row tiles straight from
      registers, other rows through ``dst`` (stored, then split).
    * ``CONV_WIDE src dst row0 O rpg gstride L Wq OH OW dplane res relu dpitch wide pool rpitch
      rplane``: any other conv: each channel's ``OH x Wq`` wide result goes to the ``wide``
      scratch, then its ``OW`` valid columns (+ residual, clamp; or the ``pool x pool`` max-pool)
      into the output plane (pitch ``dpitch``).
    * ``GAP src C H W pitch plane dst dplane``: global average pool of a plane interior into
      ``of`` (``dst < 0``), or into the ``[C, 1, 1]`` plane at ``dst`` (planes ``dplane`` apart),
      the input of a Linear tail: a 1x1 CONV_DIRECT over one position, then COPY_OUT.
    * ``COPY_OUT src C H W pitch plane``: a plane interior into ``of`` (NCHW).
    * ``SUBPAD src dst Ci Ho Wo s spitch splane dpitch dplane before Co``: the option-A ResNet
      shortcut, ``dst[c] = src[c - before, ::s, ::s]`` for ``before <= c < before + Ci``, else 0.

    Row ``r`` of conv rows ``[row0, row0 + O)`` (global numbering) reads entries
    ``[starts[r], ends[r])``; an entry's column is the flat offset of its tap in the input view
    of its group (``src + g*gstride``)."""
    for si in range(steps.shape[0]):
        kind = steps[si, 0]
        if kind == 0 or kind == 5:  # COPY_IN: image n -> plane interior; COPY_OUT: plane interior -> output n
            C = steps[si, 2]
            H = steps[si, 3]
            W = steps[si, 4]
            if kind == 0:
                _copy_rows(arena, base + steps[si, 1], steps[si, 5], steps[si, 6], xf, n * C * H * W, W, H * W, C, H, W)
            else:
                _copy_rows(of, n * C * H * W, W, H * W, arena, base + steps[si, 1], steps[si, 5], steps[si, 6], C, H, W)
        elif kind == 1:  # SPLIT
            src = base + steps[si, 1]
            dst = base + steps[si, 2]
            C = steps[si, 3]
            Hp = steps[si, 4]
            Wp = steps[si, 5]
            sh = steps[si, 6]
            sw = steps[si, 7]
            Hq = steps[si, 8]
            Wq = steps[si, 9]
            Wd = steps[si, 10]  # phase rows' pitch (Wq, or a strip plane's 16) ...
            cd = steps[si, 11]  # ... and the column their first value goes to
            x0 = steps[si, 12]  # the source columns split: [x0, x0 + Wv) of each row (pitch Wp)
            Wv = steps[si, 13]
            if sw == 2:  # the usual stride: both column phases of a row in one pass
                h0 = min((Wv + 1) // 2, Wq)  # columns 0, 2, 4, ... -> phase 0; 1, 3, ... -> phase 1
                h1 = min(Wv // 2, Wq)
                for c in range(C):
                    for a in range(sh):
                        p0 = dst + ((c * sh + a) * 2) * Hq * Wd + cd
                        for i in range(Hq):
                            r = i * sh + a
                            o0 = np.uint64(p0 + i * Wd)
                            o1 = o0 + np.uint64(Hq * Wd)
                            if r >= Hp:
                                _zero_f32(arena, o0, Wq)
                                _zero_f32(arena, o1, Wq)
                                continue
                            s0 = np.uint64(src + (c * Hp + r) * Wp + x0)
                            _deint2(arena, o0, o1, arena, s0, h1)
                            if h0 > h1:
                                arena[o0 + np.uint64(h1)] = arena[s0 + np.uint64(2 * h1)]
                            for j in range(h0, Wq):
                                arena[o0 + np.uint64(j)] = np.float32(0.0)
                            for j in range(h1, Wq):
                                arena[o1 + np.uint64(j)] = np.float32(0.0)
                continue
            for c in range(C):
                for a in range(sh):
                    for b in range(sw):
                        pbase = dst + ((c * sh + a) * sw + b) * Hq * Wd + cd
                        j1 = min((Wv - b + sw - 1) // sw, Wq)
                        for i in range(Hq):
                            r = i * sh + a
                            o = pbase + i * Wd
                            if r >= Hp:
                                _zero_f32(arena, o, Wq)
                                continue
                            s0 = src + (c * Hp + r) * Wp + x0 + b
                            if sw == 1:
                                _vcopy(arena, o, arena, s0, j1)
                            else:
                                _gather_f32(arena, o, arena, s0, j1, sw)
                            if j1 < Wq:
                                _zero_f32(arena, o + j1, Wq - j1)
        elif kind == 2 or kind == 3:  # CONV
            src = base + steps[si, 1]
            dst = base + steps[si, 2]
            row0 = steps[si, 3]
            O = steps[si, 4]
            rpg = steps[si, 5]
            gstride = steps[si, 6]
            L = steps[si, 7]
            Wq = steps[si, 8]
            OH = steps[si, 9]
            OW = steps[si, 10]
            dplane = steps[si, 11]
            res = steps[si, 12]
            lo = np.float32(0.0) if steps[si, 13] else np.float32(-np.inf)
            tlo = np.float32(-np.inf) if res >= 0 else lo
            if kind == 2 and steps[si, 19] == 1:  # strip planes: valid columns only, nothing to clear
                _strip_rows(offs_b, vals_b, code, starts, ends, scales, bias, arena, arena2, src, dst, row0, O, rpg,
                            gstride, dplane, OH, lo, res >= 0, base + res - dst)
            elif kind == 2 and steps[si, 19] == 2:  # rows of 16 / 32 / 64: valid columns only
                _row_rows(offs_b, vals_b, code, starts, ends, scales, bias, blk, arena, arena2, src, dst, row0, O,
                          rpg, gstride, dplane, Wq, OH, OW, lo, res >= 0, base + res - dst, steps[si, 20],
                          base + steps[si, 21], steps[si, 22], steps[si, 23], steps[si, 24], steps[si, 25],
                          steps[si, 26])
            elif kind == 2:  # the residual (same layout) is added in the tiles' epilogue, then the clamp
                _plane_rows(offs_b, vals_b, code, starts, ends, scales, bias, blk, arena, arena2, src, dst, row0, O, rpg,
                            gstride, dplane, L, lo, res >= 0, base + res - dst)
                gap = Wq - OW
                for rr in range(O):
                    g0 = np.uint64(dst + rr * dplane + OW)
                    if gap == 2:  # a 1-wide border: two stores per row, no inner loop
                        for oy in range(OH):
                            arena[g0] = np.float32(0.0)
                            arena[g0 + np.uint64(1)] = np.float32(0.0)
                            g0 += np.uint64(Wq)
                    else:
                        for oy in range(OH):
                            for j in range(gap):
                                arena[g0 + np.uint64(j)] = np.float32(0.0)
                            g0 += np.uint64(Wq)
            else:
                dpitch = steps[si, 14]
                wb = base + steps[si, 15]
                pool = steps[si, 16]
                rpitch = steps[si, 17]
                rplane = steps[si, 18]
                for rr in range(O):
                    r = row0 + rr
                    xb = src + (rr // rpg) * gstride
                    _tile_span_np(offs_b, vals_b, code, starts[r], ends[r], arena2, xb - wb, wb, L, arena,
                                  scales[r], bias[r], tlo)
                    yb = dst + rr * dplane
                    if pool == 2:  # the common case, vectorised; NaN propagates, as in torch
                        for py in range(OH // 2):
                            _pool2_row(arena, yb + py * dpitch, arena, wb + py * 2 * Wq, OW // 2, Wq)
                    elif pool > 1:
                        for py in range(OH // pool):
                            _pool_rows(arena, yb + py * dpitch, arena, wb + py * pool * Wq, OW // pool, pool, pool, Wq)
                    elif res >= 0:
                        rb = base + res + rr * rplane
                        for oy in range(OH):
                            for ox in range(OW):
                                v = arena[wb + oy * Wq + ox] + arena[rb + oy * rpitch + ox]
                                arena[yb + oy * dpitch + ox] = lo if v < lo else v
                    else:
                        for oy in range(OH):
                            _vcopy(arena, yb + oy * dpitch, arena, wb + oy * Wq, OW)
        elif kind == 4:  # GAP
            src = base + steps[si, 1]
            C = steps[si, 2]
            H = steps[si, 3]
            W = steps[si, 4]
            pitch = steps[si, 5]
            plane = steps[si, 6]
            dst = steps[si, 7]
            dplane = steps[si, 8]
            inv = np.float32(1.0) / np.float32(H * W)
            for c in range(C):
                if W % 8 == 0:  # one vector accumulator over all rows, one horizontal sum
                    acc = _vsum_rows(arena, src + c * plane, W, H, pitch)
                else:
                    acc = np.float32(0.0)
                    for i in range(H):
                        acc += _vsum(arena, src + c * plane + i * pitch, W)
                if dst < 0:
                    of[n * C + c] = acc * inv
                else:  # into a [C, 1, 1] plane (the Linear tail's input)
                    arena[base + dst + c * dplane] = acc * inv
        elif kind == 6:  # SUBPAD
            src = base + steps[si, 1]
            dst = base + steps[si, 2]
            Ci = steps[si, 3]
            Ho = steps[si, 4]
            Wo = steps[si, 5]
            st = steps[si, 6]
            spitch = steps[si, 7]
            splane = steps[si, 8]
            dpitch = steps[si, 9]
            dplane = steps[si, 10]
            before = steps[si, 11]
            Co = steps[si, 12]
            for c in range(Co):
                for i in range(Ho):
                    o = dst + c * dplane + i * dpitch
                    if c < before or c >= before + Ci:
                        _zero_f32(arena, o, Wo)
                    elif st == 1:
                        _vcopy(arena, o, arena, src + (c - before) * splane + i * spitch, Wo)
                    else:
                        _gather_f32(arena, o, arena, src + (c - before) * splane + i * st * spitch, Wo, st)


def _prog_par(xf, of, arena, A, T, N, steps, offs_b, vals_b, code, starts, ends, scales, bias, blk):  # type: ignore
    """A per-image program (:func:`_prog_image`) over images ``[0, N)``: ``T`` tasks, each a
    contiguous run of images in its own arena region ``[t*A, (t+1)*A)``, the whole program per
    image, so an image's activations stay in that core's cache from the first layer to the last."""
    arena2 = arena.reshape(arena.shape[0], 1)
    for t in prange(T):
        n0 = (t * N) // T
        n1 = ((t + 1) * N) // T
        for n in range(n0, n1):
            _prog_image(xf, n, of, arena, arena2, t * A, steps, offs_b, vals_b, code, starts, ends, scales, bias,
                        blk)

# Kernels whose source goes into the generated module, callees first.  Each
# ``*_par`` function also gets a serial twin ``*_ser``: the same source with
# ``prange`` -> ``range`` (no fork/join for small problems; separate cache entry).
#: Helpers inlined into their callers at numba's IR level: ``_tile_span`` is the tile dispatch of
#: every kernel's inner loop, and as a call it measured 4-7% slower (spmm_t, direct conv).
_INLINE = frozenset({"_tile_span", "_tile_span_np", "_tile_span_npr", "_ptile_span_np", "_ptile_span_npr"})
#: The programs' functions: generated with the programs' tiles (``_tile*`` -> ``_ptile*``,
#: ``_rows4*`` -> ``_prows4*``: PROGRAM_CODES only), see ``_module_source``.
_PROGRAM_FUNCS = frozenset({"_plane_rows", "_strip_rows", "_row_rows", "_prog_image"})
_KERNEL_FUNCS: tuple[Callable[..., Any], ...] = (
    _tile_span, _spmv_rows, _spmv_par, _gemv_par, _transpose_region, _transpose_par, _spmm_par, _linear_rows, _chain_par,
    _conv_rows,
    _split_image,
    _phase_split_par, _conv_par, _batch_tiles, _convt_par, _copy_rows, _plane_rows, _strip_rows, _phase_row,
    _row_rows,
    _prog_image,
    _prog_par)


def _span_twin(src: str, kind: str) -> str:
    """A textual twin of ``_tile_span``'s source: ``"np"`` calls the 64-wide tile without prefetch
    (``_tile64np``); ``"npr"`` takes a trailing ``roff`` and calls the residual tiles
    (``_tile{W}r(..., roff)``, no prefetch either) at every width."""
    out = src.replace("def _tile_span(", f"def _tile_span_{kind}(", 1)
    if kind == "np":
        return out.replace("_tile64(", "_tile64np(")
    n_calls = out.count("sc, bb, lo)") + out.count("sc, bb, lo, end - b0)")
    out = out.replace("sc, bb, lo)", "sc, bb, lo, roff)").replace("sc, bb, lo, end - b0)", "sc, bb, lo, end - b0, roff)")
    for w in ("64", "32", "16", "8m", "8", "1"):
        out = out.replace(f"_tile{w}(", f"_tile{w}r(")
    if n_calls != 7 or out.count("roff") != 7:  # the def line + six tile calls
        raise AssertionError("kernels._span_twin: _tile_span's call pattern changed; update the twin")
    return out


def _program_source(src: str) -> str:
    """A program function's source calling the programs' tiles: ``_tile*`` -> ``_ptile*`` and
    ``_rows4*`` -> ``_prows4*``, built for PROGRAM_CODES only."""
    return src.replace("_tile", "_ptile").replace("_rows4", "_prows4")


def _module_source() -> str:
    parts = [
        "# Generated by nestedsparse.pack.kernels._module_source -- do not edit.",
        "import numpy as np",
        "from numba import prange",
    ]
    for f in _KERNEL_FUNCS:
        src = inspect.getsource(f)
        if f.__name__ in _PROGRAM_FUNCS:
            src = _program_source(src)
        parts.append(src)
        if f is _tile_span:  # its twins for the plane convolutions, and the programs' ones
            twins = [_span_twin(src, "np"), _span_twin(src, "npr")]
            parts += twins + [_program_source(t) for t in twins]
        if f.__name__.endswith("_par"):
            ser = src.replace(f"def {f.__name__}(", f"def {f.__name__[:-4]}_ser(", 1).replace("prange(", "range(")
            parts.append(ser)
    return "\n\n".join(parts)


def _cache_dir() -> Optional[str]:
    cands = []
    if os.environ.get("NESTEDSPARSE_CACHE_DIR"):
        cands.append(os.environ["NESTEDSPARSE_CACHE_DIR"])
    cands.append(os.path.join(os.path.expanduser("~"), ".cache", "nestedsparse"))
    uid = os.getuid() if hasattr(os, "getuid") else 0
    cands.append(os.path.join(tempfile.gettempdir(), f"nestedsparse-{uid}"))
    for d in cands:
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return None


def _gen_module(nb: Any) -> tuple[Any, bool]:
    """Import the kernel module; returns ``(module, numba_cache_usable)``.

    Its file name carries a hash of this whole file (intrinsics included) and of
    the numba version, and an existing file is never rewritten, so its mtime is
    stable and numba's on-disk cache stays valid across processes and clones.
    """
    src = _module_source()
    h = hashlib.sha1(src.encode())
    h.update(nb.__version__.encode())
    try:
        with open(__file__, "rb") as f:
            h.update(f.read())
    except OSError:  # pragma: no cover
        pass
    modname = f"_nestedsparse_kernels_{h.hexdigest()[:16]}"
    d = _cache_dir()
    if d is not None:
        path = os.path.join(d, modname + ".py")
        try:
            if not os.path.exists(path):
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "w") as f:
                    f.write(src)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(modname, path)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules[modname] = mod
            return mod, True
        except Exception:  # pragma: no cover - unwritable cache: compile without caching
            pass
    import types  # noqa: PLC0415

    mod = types.ModuleType(modname)
    exec(compile(src, f"<{modname}>", "exec"), mod.__dict__)  # noqa: S102 - our own source
    return mod, False


def _build_kernels() -> None:
    """Create the dispatchers (numba compiles lazily, once, on first call)."""
    nb = _numba()
    mod, cacheable = _gen_module(nb)
    for name, fn in _make_intrinsics(nb).items():
        setattr(mod, name, fn)
    mod.SPMV_PREFETCH_ROWS = SPMV_PREFETCH_ROWS  # a compile-time constant of the kernels
    names = []
    for f in _KERNEL_FUNCS:
        names.append(f.__name__)
        if f is _tile_span:
            names += ["_tile_span_np", "_tile_span_npr", "_ptile_span_np", "_ptile_span_npr"]
        if f.__name__.endswith("_par"):
            names.append(f.__name__[:-4] + "_ser")
    for name in names:
        extra = {"inline": "always"} if name in _INLINE else {}
        disp = nb.njit(parallel=name.endswith("_par"), fastmath=_FASTMATH, cache=cacheable, nogil=True,
                       error_model="numpy", **extra)(getattr(mod, name))
        setattr(mod, name, disp)  # callers compiled later resolve the dispatcher
        _NB.kernels[name.lstrip("_")] = disp
    _NB.kernels["transpose"] = _NB.kernels["transpose_region"]


# ==================================================================== plans
class _Plan:
    """Per-(csr, level, threads) arrays the kernels take; built once, cached on the csr."""

    __slots__ = ("starts", "ends", "bounds", "bounds1", "scales", "zero_bias", "cols_b", "vals_b", "code",
                 "nnz", "rows", "cols_n", "cols", "vals")

    def __init__(self, csr: NestedCSR, level: int, threads: int) -> None:
        s64, e64 = csr.level_bounds(level)
        self.rows, self.cols_n = csr.shape
        self.starts = s64  # [rows] int64
        self.ends = e64  # [rows] int64
        lens = e64 - s64
        self.nnz = int(lens.sum())
        self.bounds = _balanced_bounds(lens, threads)  # [threads+1] int64 row blocks
        self.bounds1 = np.array([0, self.rows], dtype=np.int64)
        self.scales = (
            np.ascontiguousarray(csr.scales, dtype=np.float32)
            if csr.scales is not None
            else np.ones(self.rows, dtype=np.float32)
        )
        self.zero_bias = np.zeros(self.rows, dtype=np.float32)
        cols = np.ascontiguousarray(csr.col_indices)
        vals = np.ascontiguousarray(csr.values)
        self.cols, self.vals = cols, vals  # typed (the batch-1 kernel is specialised per dtype)
        self.cols_b = cols.view(np.uint8)  # byte views: dtype dispatched inside the kernel
        self.vals_b = vals.view(np.uint8)
        self.code = 2 * _COL_CODE[cols.dtype] + _VAL_CODE[vals.dtype]


def row_blocks4(csr: NestedCSR, plan: "_Plan", groups: int = 1) -> np.ndarray:
    """Per row at ``plan``'s level: 1 where rows ``r..r+3`` are a 4x1 block -- one group,
    ``r % 4 == 0``, the same non-empty column list (what ``nestify_(..., block=(4, 1))`` gives at
    every level) -- else 0. The kernels run such rows four per tile (``_rows4``)."""
    O = csr.shape[0]
    rpg = O // groups
    cols = csr.col_indices
    out = np.zeros(O, np.int8)
    lens = plan.ends - plan.starts
    for g in range(0, O - 3, 4):
        if g // rpg != (g + 3) // rpg or lens[g] == 0 or not (lens[g:g + 4] == lens[g]).all():
            continue
        c0 = cols[plan.starts[g]:plan.ends[g]]
        if all(np.array_equal(c0, cols[plan.starts[g + k]:plan.ends[g + k]]) for k in (1, 2, 3)):
            out[g] = 1
    return out


def _balanced_bounds(lens: np.ndarray, parts: int) -> np.ndarray:
    """Split rows into ``parts`` contiguous blocks of about equal cost (nnz + 4 per row)."""
    rows = lens.shape[0]
    parts = max(1, min(parts, rows)) if rows else 1
    cost = np.cumsum(lens + 4, dtype=np.int64)
    total = int(cost[-1]) if rows else 0
    targets = (np.arange(1, parts, dtype=np.int64) * total) // parts
    inner = np.searchsorted(cost, targets, side="left") + 1 if rows else np.zeros(0, np.int64)
    b = np.concatenate([[0], np.minimum(inner, rows), [rows]]).astype(np.int64)
    return np.maximum.accumulate(b)


def _threads() -> int:
    """numba's current thread count (fast path: the C getter, ~0.2 us instead of ~1 us)."""
    f = _NB.get_threads
    if f is not None:
        return f()
    nb = _numba()
    if nb is None:
        return 1
    n = int(nb.get_num_threads())  # launches the thread pool
    try:
        from numba.np.ufunc import parallel as _par  # noqa: PLC0415

        fast = _par._get_num_threads
        if int(fast()) == n:
            _NB.get_threads = fast
    except Exception:  # pragma: no cover - numba internals moved: keep the public call
        _NB.get_threads = lambda: int(nb.get_num_threads())
    return n


def _plan(csr: NestedCSR, level: int) -> _Plan:
    threads = _threads()
    key = ("plan", int(level), threads)
    p = csr._cache.get(key)
    if p is None:
        if not csr._cache.get("validated"):
            validate(csr)
            csr._cache["validated"] = True
        p = _Plan(csr, int(level), threads)
        csr._cache[key] = p
    return p


def prepare(csr: NestedCSR, level: Optional[int] = None, batch: int = 64) -> None:
    """Validate ``csr``, build the plans of ``level`` (all levels if None) and JIT-compile.

    Runs the kernels once on zeros so the first real call pays no compile cost
    (compiled code is also cached on disk by numba).
    """
    levels = range(csr.num_levels) if level is None else [level]
    rows, cols = csr.shape
    for k in levels:
        _plan(csr, k)
        for b in sorted({1, int(batch)}):
            spmm(csr, np.zeros((b, cols), np.float32), k)
            spmm_t(csr, np.zeros((cols, b), np.float32), k)


# ============================================================ input helpers
def _to_f32(x: Array) -> tuple[np.ndarray, bool]:
    """``(C-contiguous float32 numpy view/copy, was_torch)``."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
            x = np.array(x, dtype=np.float32, order="C")  # (read-only views would need their own compile)
        return x, False
    import torch  # noqa: PLC0415

    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype != torch.float32 or not t.is_cpu:
            t = t.to(device="cpu", dtype=torch.float32)
        return np.ascontiguousarray(t.numpy()), True
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)), False


def _bias_arr(bias: Optional[Array], plan: _Plan) -> np.ndarray:
    if bias is None:
        return plan.zero_bias
    b, _ = _to_f32(bias)
    b = b.reshape(-1)
    if b.shape[0] != plan.rows:
        raise ValueError(f"bias has {b.shape[0]} entries, expected {plan.rows}")
    return b


def _out_arr(out: Optional[Array], shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
    """``(numpy array to write, object to return)`` for an optional ``out=``."""
    if out is None:
        o = np.empty(shape, dtype=np.float32)
        return o, o
    if isinstance(out, np.ndarray):
        o = out
    else:
        o = out.detach().numpy()  # torch tensor sharing memory
    if o.shape != shape or o.dtype != np.float32 or not o.flags.c_contiguous or not o.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {shape}")
    return o, out


def _wrap(y: np.ndarray, as_torch: bool) -> Any:
    if as_torch:
        import torch  # noqa: PLC0415

        return torch.from_numpy(y)
    return y


def _use_parallel(parallel: Optional[bool], work: int, batch: int = 2) -> bool:
    if parallel is not None:
        return bool(parallel)
    return work >= (PARALLEL_MIN_WORK_SPMV if batch == 1 else PARALLEL_MIN_WORK) and _threads() > 1


# ==================================================================== Linear
def spmm_t(
    csr: NestedCSR,
    xt: Array,
    level: int,
    out: Optional[Array] = None,
    bias: Optional[Array] = None,
    relu: bool = False,
    parallel: Optional[bool] = None,
) -> Any:
    """Feature-major sparse Linear: ``yt[out, B] = W_level @ xt[in, B] (+ bias[:, None])``.

    The fastest entry point: ``xt`` rows are contiguous batch vectors, so each
    non-zero is one AXPY over the batch held in registers.  Chain layers in this
    layout (``spmm_t(l2, spmm_t(l1, xt, k, relu=True), k)``) and transpose once at
    the ends of the network.

    Args:
        csr: the packed weight ``[out, in]``.
        xt: ``[in, B]`` float32 (numpy or torch; copied if not C-contiguous float32).
        level: level to run, ``0 <= level < csr.num_levels``.
        out: optional ``[out, B]`` float32 C-contiguous destination (no allocation).
        bias: optional ``[out]`` bias added to every column.
        relu: apply ``max(., 0)`` after the bias (fused).
        parallel: force the 2-thread (True) or serial (False) kernel; None = by size.

    Returns:
        ``[out, B]`` float32, a torch tensor iff ``xt`` was one (``out`` if given).
    """
    x, as_torch = _to_f32(xt)
    if x.ndim != 2 or x.shape[0] != csr.shape[1]:
        raise ValueError(f"xt must be [in={csr.shape[1]}, B], got {tuple(x.shape)}")
    nb = _numba()
    if nb is None:
        y = _torch_linear(csr, x.T, level, bias, relu).T
        if out is not None:
            o, ret = _out_arr(out, (csr.shape[0], x.shape[1]))
            o[...] = y
            return ret
        return _wrap(np.ascontiguousarray(y), as_torch)
    plan = _plan(csr, level)
    B = x.shape[1]
    o, ret = _out_arr(out, (plan.rows, B))
    _run_spmm(
        _use_parallel(parallel, plan.nnz * B, B), plan, _bias_arr(bias, plan), relu,
        x.reshape(1, x.shape[0], B), o.reshape(1, plan.rows, B), plan.rows, plan.cols_n,
    )
    return ret if out is not None else _wrap(o, as_torch)


def _run_spmm(par: bool, plan: _Plan, bias: np.ndarray, relu: bool, xt: np.ndarray, yt: np.ndarray,
              rows_per_group: int, k_per_group: int, x: Optional[np.ndarray] = None,
              y: Optional[np.ndarray] = None, scales: Optional[np.ndarray] = None) -> None:
    """Call the ``spmm`` kernel (feature-major; batch-major when ``x``/``y`` are given)."""
    if xt.shape[0] == 1 and xt.shape[2] == 1 and rows_per_group == plan.rows:  # one vector: SpMV
        _kernel("spmv_par" if par else "spmv_ser")(
            plan.bounds if par else plan.bounds1, plan.starts, plan.ends, plan.cols, plan.vals,
            plan.scales if scales is None else scales, bias, _ZERO if relu else _F32_LOWEST,
            xt.reshape(-1) if x is None else x.reshape(-1), yt.reshape(-1) if y is None else y.reshape(-1))
        return
    _kernel("spmm_par" if par else "spmm_ser")(
        plan.bounds if par else plan.bounds1, plan.starts, plan.ends, plan.cols_b, plan.vals_b, plan.code,
        plan.scales if scales is None else scales, bias, _ZERO if relu else _F32_LOWEST,
        _DUMMY2 if x is None else x, xt, yt, _DUMMY2 if y is None else y,
        rows_per_group, k_per_group, x is not None,
    )


def bind_spmm_t(
    csr: NestedCSR,
    level: int,
    xt: np.ndarray,
    out: np.ndarray,
    bias: Optional[Array] = None,
    relu: bool = False,
    parallel: Optional[bool] = None,
) -> Callable[[], np.ndarray]:
    """Pre-bind :func:`spmm_t` to fixed buffers; the returned ``fn()`` recomputes ``out``.

    Every check, conversion and plan lookup happens once here, so a call costs
    only numba's dispatch (~1.3 us instead of ~4 us): write the next input into
    ``xt`` in place, call ``fn()``, read ``out``.  Meant for runtimes that chain
    layers on preallocated activations (``out`` of one layer is ``xt`` of the next).

    Args:
        csr, level, bias, relu, parallel: as in :func:`spmm_t`.
        xt: ``[in, B]`` float32 C-contiguous writable numpy buffer (kept by reference).
        out: ``[out, B]`` float32 C-contiguous writable numpy buffer (kept by reference).

    Returns:
        ``fn() -> out``.
    """
    for name, a, shape in (("xt", xt, (csr.shape[1], None)), ("out", out, (csr.shape[0], None))):
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2 and a.flags.c_contiguous
                and a.flags.writeable and a.shape[0] == shape[0]):
            raise ValueError(f"{name} must be a writable C-contiguous float32 numpy array [{shape[0]}, B]")
    if xt.shape[1] != out.shape[1]:
        raise ValueError("xt and out must have the same batch width")
    if _numba() is None:
        def fallback() -> np.ndarray:
            return spmm_t(csr, xt, level, out=out, bias=bias, relu=relu)

        return fallback
    plan = _plan(csr, level)
    B = xt.shape[1]
    par = _use_parallel(parallel, plan.nnz * B, B)
    b = _bias_arr(bias, plan)
    if b is not plan.zero_bias:
        b = b.copy()
    args = (
        plan.bounds if par else plan.bounds1, plan.starts, plan.ends, plan.cols_b, plan.vals_b, plan.code,
        plan.scales, b, _ZERO if relu else _F32_LOWEST, _DUMMY2, xt.reshape(1, xt.shape[0], B),
        out.reshape(1, plan.rows, B), _DUMMY2, plan.rows, plan.cols_n, False,
    )
    kern = _kernel("spmm_par" if par else "spmm_ser")

    def fn() -> np.ndarray:
        kern(*args)
        return out

    return fn


def spmm(
    csr: NestedCSR,
    x: Array,
    level: int,
    out: Optional[Array] = None,
    bias: Optional[Array] = None,
    relu: bool = False,
    parallel: Optional[bool] = None,
    scale: Optional[Array] = None,
) -> Any:
    """Batch-major sparse Linear: ``y[B, out] = x[B, in] @ W_level^T (* scale) (+ bias)``.

    Batch 1 is a sparse dot product per row read straight from ``x``.  Larger
    batches transpose ``x`` into a per-thread scratch buffer (8x8 register
    transposes), run the register-tile kernel of :func:`spmm_t`, and each thread
    transposes its block of output rows into ``y`` -- one parallel region.  The
    two transposes cost ~10-20 us at ``[64, 1024]``: networks should chain
    :func:`spmm_t` instead.  ``x`` may also be 1-D ``[in]`` (returns ``[out]``).

    Args:
        csr: the packed weight ``[out, in]``.
        x: ``[B, in]`` float32 (numpy or torch).
        level: level to run.
        out: optional ``[B, out]`` float32 C-contiguous destination.
        bias: optional ``[out]`` bias.
        relu: fused ReLU after the bias.
        parallel: force 2 threads (True) or serial (False); None = by size.
        scale: optional ``[out]`` multiplier applied before the bias (a folded
            BatchNorm: ``scale = gamma / sqrt(var + eps)``, ``bias = (b - mean) * scale + beta``).

    Returns:
        ``[B, out]`` float32, a torch tensor iff ``x`` was one (``out`` if given).
    """
    xa, as_torch = _to_f32(x)
    if xa.ndim == 1:
        y = spmm(csr, xa.reshape(1, -1), level, None if out is None else _flat_out(out), bias, relu, parallel, scale)
        return out if out is not None else _wrap(y.reshape(-1), as_torch)
    if xa.ndim != 2 or xa.shape[1] != csr.shape[1]:
        raise ValueError(f"x must be [B, in={csr.shape[1]}], got {tuple(xa.shape)}")
    nb = _numba()
    if nb is None:
        y = _torch_linear(csr, xa, level, bias, relu, scale)
        if out is not None:
            o, ret = _out_arr(out, y.shape)
            o[...] = y
            return ret
        return _wrap(y, as_torch)
    plan = _plan(csr, level)
    o, ret = _out_arr(out, (xa.shape[0], plan.rows))
    linear_into(plan, xa, o, _scale_arr(scale, plan), _bias_arr(bias, plan), relu, parallel)
    return ret if out is not None else _wrap(o, as_torch)


def linear_into(plan: _Plan, xa: np.ndarray, o: np.ndarray, scales: np.ndarray, bias: np.ndarray, relu: bool,
                parallel: Optional[bool] = None) -> None:
    """Low-level batch-major Linear: ``o = max((xa @ W^T) * scales + bias, 0 if relu else -inf)``.

    ``plan`` from :func:`plan_for`; ``xa`` ``[B, in]`` / ``o`` ``[B, out]`` C-contiguous float32;
    ``scales`` / ``bias`` ``[out]`` float32 (``scales`` already includes an int8 weight's row scales).
    """
    B = xa.shape[0] if getattr(xa, "ndim", 0) == 2 else -1
    _check_buf("xa", xa, (B, plan.cols_n))
    _check_buf("o", o, (B, plan.rows))
    _check_buf("scales", scales, (plan.rows,))
    _check_buf("bias", bias, (plan.rows,))
    K = plan.cols_n
    par = _use_parallel(parallel, plan.nnz * B, B)
    if B == 1:  # [1, in] is also [in, 1]: no transpose
        _run_spmm(par, plan, bias, relu, xa.reshape(1, K, 1), o.reshape(1, plan.rows, 1), plan.rows, K,
                  scales=scales)
    else:
        _run_spmm(par, plan, bias, relu, _scratch(0, (1, K, B)), _scratch(1, (1, plan.rows, B)), plan.rows, K, xa,
                  o, scales=scales)


def linear_into_t(plan: _Plan, xt: np.ndarray, yt: np.ndarray, scales: np.ndarray, bias: np.ndarray, relu: bool,
                  parallel: Optional[bool] = None) -> None:
    """Low-level feature-major Linear: ``yt = max((W @ xt) * scales[:, None] + bias[:, None], 0 | -inf)``.

    ``xt`` ``[in, B]`` / ``yt`` ``[out, B]`` C-contiguous float32 (64-byte aligned is fastest:
    :func:`aligned_empty`); ``scales`` / ``bias`` ``[out]`` float32 (``scales`` includes int8 row scales).
    """
    B = xt.shape[1] if getattr(xt, "ndim", 0) == 2 else -1
    _check_buf("xt", xt, (plan.cols_n, B))
    _check_buf("yt", yt, (plan.rows, B))
    _check_buf("scales", scales, (plan.rows,))
    _check_buf("bias", bias, (plan.rows,))
    _run_spmm(_use_parallel(parallel, plan.nnz * B, B), plan, bias, relu, xt.reshape(1, xt.shape[0], B),
              yt.reshape(1, plan.rows, B), plan.rows, plan.cols_n, scales=scales)


def _check_buf(name: str, a: Any, shape: tuple) -> None:
    """The low-level entries write through raw pointers: refuse anything but the exact buffer."""
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.shape == shape):
        got = (type(a).__name__, getattr(a, "dtype", None), getattr(a, "shape", None),
               getattr(getattr(a, "flags", None), "c_contiguous", None))
        raise ValueError(f"{name} must be a C-contiguous float32 numpy array of shape {shape}; got "
                         f"{got[0]} dtype={got[1]} shape={got[2]} c_contiguous={got[3]}")


def bind_linear_t(plan: _Plan, xt: np.ndarray, yt: np.ndarray, scales: np.ndarray, bias: np.ndarray, relu: bool,
                  parallel: Optional[bool] = None) -> Callable[[], None]:
    """:func:`linear_into_t` with every argument resolved once: ``fn()`` costs only the compiled
    kernel's dispatch (for runtimes replaying a fixed sequence of layers on fixed buffers).
    The arrays are kept by reference."""
    B = xt.shape[1] if getattr(xt, "ndim", 0) == 2 else -1
    _check_buf("xt", xt, (plan.cols_n, B))
    _check_buf("yt", yt, (plan.rows, B))
    _check_buf("scales", scales, (plan.rows,))
    _check_buf("bias", bias, (plan.rows,))
    par = _use_parallel(parallel, plan.nnz * B, B)
    lo = _ZERO if relu else _F32_LOWEST
    if B == 1:
        kern = _kernel("spmv_par" if par else "spmv_ser")
        args: tuple = (plan.bounds if par else plan.bounds1, plan.starts, plan.ends, plan.cols, plan.vals, scales,
                       bias, lo, xt.reshape(-1), yt.reshape(-1))
    else:
        kern = _kernel("spmm_par" if par else "spmm_ser")
        args = (plan.bounds if par else plan.bounds1, plan.starts, plan.ends, plan.cols_b, plan.vals_b, plan.code,
                scales, bias, lo, _DUMMY2, xt.reshape(1, xt.shape[0], B), yt.reshape(1, plan.rows, B), _DUMMY2,
                plan.rows, plan.cols_n, False)

    def fn() -> None:
        kern(*args)

    return fn


def bind_gemv(w: np.ndarray, x: np.ndarray, bias: np.ndarray, relu: bool, y: np.ndarray,
              parallel: Optional[bool] = None) -> Callable[[], None]:
    """A dense matrix-vector product bound to its arrays: ``fn()`` writes
    ``y = max(w @ x + bias, 0 if relu else -inf)``. ``w`` ``[R, K]`` (C-contiguous float32), ``x``
    ``[K]``, ``bias`` and ``y`` ``[R]``. The batch-1 path of a dense-chosen Linear layer: torch's
    GEMV (``addmv`` / ``F.linear`` on one row) took 2.2x the time on 1024x1024 layers, two threads
    (``docs/design.md``). Parallel over row blocks from ``PARALLEL_MIN_WORK_SPMV`` multiply-adds."""
    if not (isinstance(w, np.ndarray) and w.ndim == 2 and w.dtype == np.float32 and w.flags.c_contiguous):
        raise ValueError(f"bind_gemv: w must be a C-contiguous 2-D float32 array, got {getattr(w, 'dtype', type(w))} "
                         f"{getattr(w, 'shape', '')}")
    R, K = w.shape
    _check_buf("x", x, (K,))
    _check_buf("bias", bias, (R,))
    _check_buf("y", y, (R,))
    T = _threads() if _use_parallel(parallel, R * K, 1) else 1
    bounds = np.array([(t * R) // T for t in range(T + 1)], dtype=np.int64)
    kern = _kernel("gemv_par" if T > 1 else "gemv_ser")
    args = (bounds, w.reshape(-1), K, x, bias, _ZERO if relu else _F32_LOWEST, y)

    def fn() -> None:
        kern(*args)

    return fn


def gemv(w: np.ndarray, x: np.ndarray, bias: Optional[np.ndarray], relu: bool = False,
         out: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`bind_gemv` once: ``max(w @ x + bias, 0 if relu else -inf)`` into ``out`` (new if
    None); ``bias`` None is zeros."""
    R = w.shape[0] if getattr(w, "ndim", 0) == 2 else -1
    if bias is None:
        bias = np.zeros(max(R, 0), np.float32)
    y = np.empty(max(R, 0), np.float32) if out is None else out
    bind_gemv(w, x, bias, relu, y)()
    return y


def _convt_offsets(csr: NestedCSR, geo: "ConvGeometry", Hp: int, Wp: int) -> np.ndarray:
    """Row offset ``c*Hp*Wp + ky*dh*Wp + kx*dw`` of every entry (feature-major conv; cached)."""
    key = ("convt_offsets", geo.wshape, geo.dilation, Hp, Wp)
    got = csr._cache.get(key)
    if got is None:
        _, Cg, kh, kw = geo.wshape
        dh, dw = geo.dilation
        if Cg * Hp * Wp >= 2**31:
            raise ValueError("convolution input too large for 32-bit offsets")
        c, tap = np.divmod(csr.col_indices.astype(np.int64), kh * kw)
        ky, kx = np.divmod(tap, kw)
        got = csr._cache[key] = np.ascontiguousarray((c * Hp * Wp + ky * dh * Wp + kx * dw).astype(np.int32))
    return got


def bind_conv_t(csr: NestedCSR, plan: _Plan, geo: "ConvGeometry", in_hw: tuple[int, int], xt: np.ndarray,
                yt: np.ndarray, out_pad: tuple[int, int], scales: np.ndarray, bias: np.ndarray, relu: bool,
                pool: int = 1, parallel: Optional[bool] = None) -> Callable[[], None]:
    """A feature-major sparse Conv2d bound to fixed buffers; ``fn()`` runs it.

    ``xt`` ``[C*(H+2ph)*(W+2pw), B]``: the input ``[C, H, W]`` per batch column, zero-padded by the
    conv's own padding (the caller keeps the border rows zero); ``yt`` ``[O*(PH+2qh)*(PW+2qw), B]``
    receives the ``pool``-max-pooled output ``[O, PH, PW]`` inside a zero border ``out_pad =
    (qh, qw)`` (the next layer's padding).  Epilogue per output channel: ``max(acc * scales +
    bias, 0 if relu else -inf)``, before the pool.
    """
    O, Cg, kh, kw = geo.wshape
    H, W = in_hw
    (sh, sw), (ph, pw) = geo.stride, geo.padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    OH, OW = geo.out_hw(H, W)
    PH, PW = OH // pool, OW // pool
    qh, qw = out_pad
    B = xt.shape[1] if getattr(xt, "ndim", 0) == 2 else -1
    C = Cg * geo.groups
    if getattr(xt, "shape", None) != (C * Hp * Wp, B) or getattr(yt, "shape", None) != (
            O * (PH + 2 * qh) * (PW + 2 * qw), B):
        raise ValueError(f"buffers {getattr(xt, 'shape', None)} / {getattr(yt, 'shape', None)} do not fit the "
                         f"convolution (need [{C * Hp * Wp}, B] / [{O * (PH + 2 * qh) * (PW + 2 * qw)}, B])")
    _check_buf("xt", xt, (C * Hp * Wp, B))
    _check_buf("yt", yt, (O * (PH + 2 * qh) * (PW + 2 * qw), B))
    _check_buf("scales", scales, (O,))
    _check_buf("bias", bias, (O,))
    if PH <= 0 or PW <= 0:
        raise ValueError("convolution output would be empty")
    offs = _convt_offsets(csr, geo, Hp, Wp)
    par = _use_parallel(parallel, plan.nnz * B * OH * OW)
    kern = _kernel("convt_par" if par else "convt_ser")
    args = (plan.bounds if par else plan.bounds1, plan.starts, plan.ends, offs.view(np.uint8), plan.vals_b,
            2 * _COL_CODE[np.dtype(np.int32)] + _VAL_CODE[csr.values.dtype], scales, bias,
            _ZERO if relu else _F32_LOWEST, xt, yt, O // geo.groups, Cg * Hp * Wp, sh, sw, Wp, PH, PW, int(pool),
            PH + 2 * qh, PW + 2 * qw, qh, qw)

    def fn() -> None:
        kern(*args)

    return fn


def plan_for(csr: NestedCSR, level: int) -> _Plan:
    """The validated per-level arrays the low-level kernels take (cached on ``csr``).

    ``plan.scales`` holds the int8 row scales (ones for float32 values)."""
    return _plan(csr, level)


def share_arrays(csr: NestedCSR, values: Optional[np.ndarray] = None,
                 col_indices: Optional[np.ndarray] = None) -> None:
    """Point ``csr.values`` / ``csr.col_indices``, and the plans already built on them, at equal
    arrays held elsewhere (a slice of a fused chain's or program's concatenation), so the numbers
    are held once.  An array of another dtype, shape or content is ignored; a kernel running
    meanwhile keeps the old, equal array."""
    for name, new in (("values", values), ("col_indices", col_indices)):
        old = getattr(csr, name)
        if new is None or new is old or new.dtype != old.dtype or new.shape != old.shape or not new.flags.c_contiguous \
                or not np.array_equal(new, old):
            continue
        object.__setattr__(csr, name, new)  # frozen dataclass: the same numbers in a shared buffer
        for plan in list(csr._cache.values()):  # a copy: another thread may add a plan meanwhile
            if isinstance(plan, _Plan):
                if name == "values":
                    plan.vals, plan.vals_b = new, new.view(np.uint8)
                else:
                    plan.cols, plan.cols_b = new, new.view(np.uint8)


def _scale_arr(scale: Optional[Array], plan: _Plan) -> np.ndarray:
    if scale is None:
        return plan.scales
    sc = _to_f32(scale)[0].reshape(-1)
    if sc.shape[0] != plan.rows:
        raise ValueError(f"scale has {sc.shape[0]} entries, expected {plan.rows}")
    return np.ascontiguousarray(sc * plan.scales, dtype=np.float32)


def _scratch(slot: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Per-thread reusable float32 buffer, 64-byte aligned.

    Reuse avoids page-faulting fresh 256 KiB arrays on every call; alignment
    keeps the kernel's 32-byte row loads from splitting cache lines (a 16-byte
    aligned ``xt`` measured ~20% slower).
    """
    d = getattr(_SCRATCH, "bufs", None)
    if d is None:
        d = _SCRATCH.bufs = {}
    n = shape[0] * shape[1] * shape[2]
    buf = d.get(slot)
    if buf is None or buf.shape[0] < n:
        raw = np.empty(max(n, 1024) + 16, dtype=np.float32)
        off = (-raw.ctypes.data // 4) % 16  # float32 elements to the next 64-byte boundary
        buf = d[slot] = raw[off:off + max(n, 1024)]
    return buf[:n].reshape(shape)


def aligned_empty(shape: Sequence[int]) -> np.ndarray:
    """Uninitialised C-contiguous float32 array whose data is 64-byte aligned.

    Use it for activation buffers handed to :func:`spmm_t` / :func:`bind_spmm_t`:
    the kernel reads ``xt`` rows with 32-byte vector loads, and a 16-byte aligned
    buffer (what ``np.empty`` gives for small arrays) measured ~20% slower.
    """
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n + 16, dtype=np.float32)
    off = (-raw.ctypes.data // 4) % 16
    return raw[off:off + n].reshape(tuple(int(v) for v in shape))


def _flat_out(out: Array) -> Array:
    return out.reshape(1, -1)


def transpose(x: Array, out: Optional[Array] = None) -> Any:
    """Transpose a 2-D float32 array into a new C-contiguous one (numba, 8x8 register blocks).

    Use it to switch between the batch-major (``[B, F]``) and the feature-major
    (``[F, B]``) layouts at the ends of a chain of :func:`spmm_t` calls.
    """
    xa, as_torch = _to_f32(x)
    if xa.ndim != 2:
        raise ValueError("transpose expects a 2-D array")
    o, ret = _out_arr(out, (xa.shape[1], xa.shape[0]))
    if _numba() is None:
        o[...] = xa.T
    elif xa.size >= 131_072 and _threads() > 1:  # ~40 us and up: worth the second thread
        _kernel("transpose_par")(xa, o, _threads())
    else:
        _kernel("transpose")(xa, o, 0, xa.shape[0], 0, xa.shape[1])
    return ret if out is not None else _wrap(o, as_torch)


# ==================================================================== Conv2d
def _pair(v: IntPair) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def sparse_conv2d(
    csr: NestedCSR,
    x: Array,
    level: int,
    weight_shape: Sequence[int],
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    bias: Optional[Array] = None,
    relu: bool = False,
    parallel: Optional[bool] = None,
    scale: Optional[Array] = None,
) -> Any:
    """Sparse Conv2d of level ``level``, equal to ``F.conv2d(x, W_level, bias, ...)``.

    Args:
        csr: packed weight, rows = out channels, cols = ``in/groups * kh * kw``.
        x: ``[N, C, H, W]`` float32 (numpy or torch).
        level: level to run.
        weight_shape: ``(out, in/groups, kh, kw)``.
        stride, padding, dilation: int or pair (zero padding).
        groups: conv groups (depthwise: ``groups == C``).  One direct kernel for
            every case (:func:`run_conv`): no im2col buffer.
        bias: optional ``[out]``.
        relu: fused ReLU.
        parallel: force 2 threads (True) or serial (False); None = by size.
        scale: optional ``[out]`` multiplier applied before the bias (folded BatchNorm).

    Returns:
        ``[N, out, OH, OW]`` float32, a torch tensor iff ``x`` was one.
    """
    O, Cg, kh, kw = (int(v) for v in weight_shape)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    groups = int(groups)
    xa, as_torch = _to_f32(x)
    if xa.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got {tuple(xa.shape)}")
    N, C, H, Wd = xa.shape
    if csr.shape != (O, Cg * kh * kw) or C != Cg * groups or O % groups:
        raise ValueError(f"weight_shape {tuple(weight_shape)} / groups {groups} inconsistent with "
                         f"csr {csr.shape} and x {xa.shape}")
    OH = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    OW = (Wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("convolution output would be empty")
    nb = _numba()
    if nb is None:
        y = _torch_conv(csr, xa, level, (O, Cg, kh, kw), (sh, sw), (ph, pw), (dh, dw), groups, bias, relu, scale)
        return _wrap(y, as_torch)
    geo = ConvGeometry((O, Cg, kh, kw), (sh, sw), (ph, pw), (dh, dw), groups)
    plan = _plan(csr, level)
    out = np.empty((N, O, OH, OW), dtype=np.float32)
    run_conv(csr, plan, geo, xa, out, _scale_arr(scale, plan), _bias_arr(bias, plan), relu, parallel)
    return _wrap(out, as_torch)


class ConvGeometry:
    """A convolution's static shape: ``weight_shape (O, Cg, kh, kw)``, stride, padding, dilation, groups."""

    __slots__ = ("wshape", "stride", "padding", "dilation", "groups")

    def __init__(self, wshape: Sequence[int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int) -> None:
        self.wshape = tuple(int(v) for v in wshape)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, int(groups)

    def out_hw(self, H: int, W: int) -> tuple[int, int]:
        _, _, kh, kw = self.wshape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def phase_hw(self, H: int, W: int) -> tuple[int, int]:
        """``(Hq, Wq)``: the padded input's size in each stride phase."""
        (sh, sw), (ph, pw) = self.stride, self.padding
        return -(-(H + 2 * ph) // sh), -(-(W + 2 * pw) // sw)


def _conv_offsets(csr: NestedCSR, geo: ConvGeometry, Hq: int, Wq: int) -> np.ndarray:
    """Flat int32 offset of every entry's tap in a phase-split group (cached per input size).

    Column ``c*kh*kw + ky*kw + kx`` reads phase ``(ky*dh % sh, kx*dw % sw)`` of input
    channel ``c`` at row/column shift ``(ky*dh // sh, kx*dw // sw)``.  Level-independent:
    every level reads a prefix of the same array.
    """
    key = ("conv_offsets", geo.wshape, geo.stride, geo.dilation, Hq, Wq)
    got = csr._cache.get(key)
    if got is not None:
        return got
    _, Cg, kh, kw = geo.wshape
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    if Cg * sh * sw * Hq * Wq >= 2**31:
        raise ValueError("convolution input too large for 32-bit offsets")
    col = csr.col_indices.astype(np.int64)
    c, tap = np.divmod(col, kh * kw)
    ky, kx = np.divmod(tap, kw)
    ay, dy = (ky * dh) % sh, (ky * dh) // sh
    ax, dx = (kx * dw) % sw, (kx * dw) // sw
    off = (((c * sh + ay) * sw + ax) * Hq + dy) * Wq + dx
    got = np.ascontiguousarray(off.astype(np.int32))
    csr._cache[key] = got
    return got


def run_conv(csr: NestedCSR, plan: "_Plan", geo: ConvGeometry, xa: np.ndarray, out: np.ndarray,
             scales: np.ndarray, bias: np.ndarray, relu: bool, parallel: Optional[bool] = None,
             residual: Optional[np.ndarray] = None, pool: int = 1) -> None:
    """``out = max(conv(xa, W_level) * scales[o] + bias[o] (+ residual), 0 if relu else -inf)``.

    Low-level entry of the direct kernel: ``xa`` ``[N, C, H, W]`` C-contiguous float32, ``out``
    ``[N, O, OH, OW]`` likewise; ``scales`` / ``bias`` ``[O]`` float32 (the epilogue: int8 row
    scale, bias, folded BatchNorm); ``residual`` (optional) shaped like ``out`` (a fused skip
    connection); ``pool > 1`` (no residual): ``out`` is ``[N, O, OH // pool, OW // pool]``, the
    ``pool x pool`` stride-``pool`` max-pool of the result (a fused ``MaxPool2d``).
    ``plan`` from :func:`plan_for`.
    """
    if getattr(xa, "ndim", 0) != 4 or xa.shape[1] != geo.wshape[1] * geo.groups:
        raise ValueError(f"xa must be [N, {geo.wshape[1] * geo.groups}, H, W], got {getattr(xa, 'shape', None)}")
    N, C, H, Wd = xa.shape
    OH, OW = geo.out_hw(H, Wd)
    if residual is not None and pool > 1:
        raise ValueError("run_conv fuses a residual or a max-pool, not both")
    if OH // pool <= 0 or OW // pool <= 0:
        raise ValueError("convolution output would be empty")
    if getattr(out, "shape", None) != (N, geo.wshape[0], OH // pool, OW // pool):
        raise ValueError(f"out is {getattr(out, 'shape', None)}, expected {(N, geo.wshape[0], OH // pool, OW // pool)}")
    _check_buf("xa", xa, xa.shape)
    _check_buf("out", out, out.shape)
    _check_buf("scales", scales, (geo.wshape[0],))
    _check_buf("bias", bias, (geo.wshape[0],))
    if residual is not None:
        _check_buf("residual", residual, out.shape)
    O, Cg, kh, kw = geo.wshape
    (sh, sw), (ph, pw) = geo.stride, geo.padding
    Hq, Wq = geo.phase_hw(H, Wd)
    P = C * sh * sw
    par = _use_parallel(parallel, plan.nnz * N * OH * OW)
    T = _threads() if par else 1
    slack = kw * geo.dilation[1] + 16  # the last wide tile reads up to kw*dw floats past a plane
    if N >= 2 * T:  # whole images per task, each split just before use (cache-hot)
        mode, n_buf = 1, T
    else:  # few images: split them all first, then parallelise over channels too
        mode, n_buf = 0, N
    flat = _scratch(2, (1, 1, n_buf * P * Hq * Wq + slack)).reshape(-1)
    xq = flat[:n_buf * P * Hq * Wq].reshape(n_buf, P, Hq, Wq)
    if mode == 0:
        _kernel("phase_split_par" if par else "phase_split_ser")(xa, xq, ph, pw, sh, sw)
    offs = _conv_offsets(csr, geo, Hq, Wq)
    has_res = residual is not None
    _kernel("conv_par" if par else "conv_ser")(
        plan.bounds if par else plan.bounds1, plan.starts, plan.ends, offs.view(np.uint8), plan.vals_b,
        2 * _COL_CODE[np.dtype(np.int32)] + _VAL_CODE[csr.values.dtype], scales, bias,
        _ZERO if relu else _F32_LOWEST, xa, xq, flat.reshape(-1, 1), out, residual if has_res else out, has_res,
        int(pool), OH, OW, O // geo.groups, Cg * sh * sw * Hq * Wq, ph, pw, sh, sw, mode,
    )


# ================================================================ references
def spmm_reference(csr: NestedCSR, x: Array, level: int, bias: Optional[Array] = None) -> Any:
    """Plain torch reference: ``x @ to_dense(csr, level).T (+ bias)`` (same type as ``x``)."""
    import torch  # noqa: PLC0415

    xa, as_torch = _to_f32(x)
    w = torch.from_numpy(to_dense(csr, level))
    y = torch.from_numpy(xa) @ w.T
    if bias is not None:
        y = y + torch.as_tensor(_to_f32(bias)[0])
    return y if as_torch else y.numpy()


def conv2d_reference(
    csr: NestedCSR,
    x: Array,
    level: int,
    weight_shape: Sequence[int],
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    bias: Optional[Array] = None,
) -> Any:
    """Plain torch reference: ``F.conv2d`` with ``to_dense(csr, level)`` reshaped to ``weight_shape``."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    xa, as_torch = _to_f32(x)
    w = torch.from_numpy(to_dense(csr, level)).reshape(tuple(int(v) for v in weight_shape))
    b = None if bias is None else torch.as_tensor(_to_f32(bias)[0])
    y = F.conv2d(torch.from_numpy(xa), w, b, _pair(stride), _pair(padding), _pair(dilation), int(groups))
    return y if as_torch else y.numpy()


# ================================================================ torch fallback
def _torch_level_weight(csr: NestedCSR, level: int) -> Any:
    import torch  # noqa: PLC0415

    key = ("torch_dense", int(level))
    w = csr._cache.get(key)
    if w is None:
        if not csr._cache.get("validated"):
            validate(csr)
            csr._cache["validated"] = True
        w = torch.from_numpy(to_dense(csr, level))
        if csr.density(level) < 0.3:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                w = w.to_sparse_csr()
        csr._cache[key] = w
    return w


def _torch_linear(csr: NestedCSR, x: np.ndarray, level: int, bias: Optional[Array], relu: bool,
                  scale: Optional[Array] = None) -> np.ndarray:
    """Fallback without numba: torch sparse-CSR (or dense) matmul.  x ``[B, in]`` -> ``[B, out]``."""
    import torch  # noqa: PLC0415

    w = _torch_level_weight(csr, level)
    y = (w @ torch.from_numpy(np.ascontiguousarray(x)).T).T
    if scale is not None:
        y = y * torch.as_tensor(_to_f32(scale)[0])
    if bias is not None:
        y = y + torch.as_tensor(_to_f32(bias)[0])
    if relu:
        y = torch.relu(y)
    return np.ascontiguousarray(y.numpy())


def _torch_conv(csr: NestedCSR, x: np.ndarray, level: int, wshape: tuple[int, int, int, int],
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int, bias: Optional[Array], relu: bool, scale: Optional[Array] = None) -> np.ndarray:
    import torch  # noqa: PLC0415

    y = conv2d_reference(csr, torch.from_numpy(x), level, wshape, stride, padding, dilation, groups)
    if scale is not None:
        y = y * torch.as_tensor(_to_f32(scale)[0]).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + torch.as_tensor(_to_f32(bias)[0]).reshape(1, -1, 1, 1)
    if relu:
        y = torch.relu(y)
    return y.numpy()


# ==================================================================== choose
def choose(
    csr: NestedCSR,
    level: int,
    batch: int,
    density_threshold: Optional[float] = None,
) -> str:
    """``"sparse"`` if the level's density is at or below the threshold, else ``"dense"``.

    The runtime runs the dense matmul on the level's materialised weight when
    the sparse kernel would be slower.  ``density_threshold`` overrides the
    measured default :data:`DEFAULT_DENSITY_THRESHOLD` (by batch size).
    """
    if density_threshold is None:
        keys = [k for k in sorted(DEFAULT_DENSITY_THRESHOLD) if k <= max(1, int(batch))]
        density_threshold = DEFAULT_DENSITY_THRESHOLD[keys[-1] if keys else min(DEFAULT_DENSITY_THRESHOLD)]
    return "sparse" if csr.density(level) <= density_threshold else "dense"
