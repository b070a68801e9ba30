"""Depth-first conv regions: each image runs through a whole region of packed convolutions on one core.

The layer-by-layer runtime runs a conv over the whole batch, writes the result through memory and
starts the next layer: for a 32x32 ResNet at batch 64 every activation is 4 MiB, so every layer
streams the batch in and out of L3, re-pads its input, pays a parallel fork/join and a Python
call. A :class:`PlaneProgram` replaces a region of the traced graph -- packed Conv2d units (with
their fused BatchNorm, residual add, ReLU, max-pool), identities, option-A ResNet shortcuts
(subsample + zero channels), a closing global average pool and the Linear classifier on it --
with one compiled call: each core takes a run of images and runs the *whole region* on one
image before the next (``kernels._prog_par``). An image's activations (74 KiB for 16x32x32)
stay in that core's L2 from the first layer to the last, kept as zero-bordered planes so a
conv writes straight into the next conv's padded input (no copy, no re-padding; a stride-2
conv through phases split at its output's pitch, which a conv read only by stride-2 convs
writes itself); per output channel its positions run as 64-wide register tiles (whole rows
where rows are 16, 32 or 64 wide).
8-wide planes are strip planes (pitch 16, one cache line per row): their convs compute the
valid columns only and no tap load splits a line. Batch 1 runs the same program on the calling
thread with no fork/join at all.

The program is compiled per input shape (steps, tap offsets, activation slots reused by liveness)
and its per-level arrays per level map; per thread it keeps one arena (zeroed once: borders stay
zero). It runs when every conv in it is on the sparse path for the call's level and batch; else
the region runs unit by unit, exactly as before. ``PackedRuntime.tune`` times the program against
the unit path and keeps the faster.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from ..models.resnet import PadShortcut
from .kernels import (PROG_CONV_DIRECT, PROG_CONV_WIDE, PROG_COPY_IN, PROG_COPY_OUT, PROG_FIELDS, PROG_GAP,
                      PROG_SPLIT, PROG_SUBPAD)
from .runtime import (_LEVEL, _MODE_EPOCH, FusedSparse, SparseConv, SparseLinear, _as_numpy, _faster,
                      _is_flatten1, _level_for, _median_times, _position)
from .runtime import _unit_parts as _parts

__all__ = ["PlaneProgram", "plane_programs"]

#: Lay 8-wide planes out as strip planes where a stride-1 conv reads or writes them (see
#: ``_compile``); a switch for in-process A/B runs (``benchmarks/runtime_ab.py``), read when a
#: program compiles an input shape.
STRIP_PLANES = True
_STRIP_COL = 4  # a strip plane's first value column (its left border)
#: Split a stride-2 conv's input into phase rows at its output's pitch, so it runs direct (A/B switch).
PHASE_AT_OUTPUT_PITCH = True
#: Direct convs whose rows are 16 / 32 / 64 wide run whole-row tiles (no junk columns; A/B switch).
ROW_TILES = True
#: Such a conv whose readers are all stride-2 convs writes their phase split itself (A/B switch).
FUSE_SPLITS = True
#: A Linear tail with more non-zeros at the call's level runs after the program at batch > 1.
TAIL_MAX_NNZ = 4096

#: (kind, unit index or -1, source value, residual value or -1); value 0 is the region's input,
#: op ``i`` produces value ``i + 1``
Op = tuple[str, int, int, int]


class _Split(NamedTuple):
    """A stride-phase split of a value for its strided readers (``_compile``): ``key`` = (value,
    sh, sw, Wd, cd, x0) names it; bordered source height ``Hp``; ``Hq x Wq`` phases with rows at
    pitch ``Wd``, values from column ``cd``; source columns ``[x0, x0 + Wv)``."""

    key: tuple
    Hp: int
    Hq: int
    Wq: int
    Wd: int
    cd: int
    x0: int
    Wv: int


def _call_unit(u: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, force: str | None) -> torch.Tensor:
    """A conv unit on the unit path (a fused one with its residual)."""
    if isinstance(u, FusedSparse):
        return u(x, residual, force=force)
    return u(x, force=force)


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


class _Geometry:
    """A program compiled for one input shape: step table, tap offsets, arena size, output dims."""

    __slots__ = ("steps", "offs_b", "arena", "out_dims", "out_size")

    def __init__(self, steps: np.ndarray, offs: np.ndarray, arena: int, out_dims: tuple) -> None:
        self.steps = steps
        self.offs_b = offs.view(np.uint8)
        self.arena = arena
        self.out_dims = out_dims
        self.out_size = int(np.prod(out_dims))


def _share_values(units: list[nn.Module], vals: np.ndarray) -> None:
    """Each unit's weights become its slice of the program's concatenated ``vals`` (held once)."""
    off = 0
    for u in units:
        csr = _parts(u)[0].csr
        n = csr.values.shape[0]
        kernels.share_arrays(csr, values=vals[off:off + n])
        off += n


class PlaneProgram(nn.Module):
    """A region of packed convs run depth-first per image (see the module docstring).

    ``ops``: the region in order -- ``("conv", unit, src, res)``, ``("identity", -1, src, -1)``,
    ``("subpad", shortcut, src, -1)`` (an option-A ResNet shortcut, ``shortcuts[shortcut]``),
    ``("gap", -1, src, -1)`` (global average pool, last), ``("flatten", -1, src, -1)`` (after it).
    """

    def __init__(self, ops: list[Op], units: list[nn.Module], shortcuts: list[nn.Module] = ()) -> None:
        super().__init__()
        if [op[1] for op in ops if op[0] == "conv"] != list(range(len(units))):
            raise ValueError("PlaneProgram: the conv ops must use units 0, 1, ... once each, in order")
        if [op[1] for op in ops if op[0] == "subpad"] != list(range(len(shortcuts))):
            raise ValueError("PlaneProgram: the subpad ops must use shortcuts 0, 1, ... once each, in order")
        self.units = nn.ModuleList(units)
        self.shortcuts = nn.ModuleList(shortcuts)
        self.ops = list(ops)
        #: the region ends with a Linear on the pooled features (the classifier): run per image in
        #: the program as a 1x1 conv on a [C, 1, 1] plane when on the sparse path at batch 1
        self._tail = isinstance(_parts(units[-1])[0], SparseLinear)
        if (any(isinstance(_parts(u)[0], SparseLinear) for u in units[:-1]) or self._tail and (
                len(ops) < 3 or [op[0] for op in ops[-3:]] != ["gap", "flatten", "conv"])):
            raise ValueError("PlaneProgram: a Linear unit may only be last, after the closing global pool and flatten")
        self._unit_geos = [self._unit_geo(u) for u in units]
        self.name = _parts(units[0])[0].name
        dtypes = {_parts(u)[0].csr.values.dtype for u in units}
        self._vals = self._vals_b = None
        if len(dtypes) == 1:  # one value dtype for the whole region (the kernel takes one code)
            vals = np.concatenate([np.ascontiguousarray(_parts(u)[0].csr.values).reshape(-1) for u in units])
            self._vals = np.ascontiguousarray(vals)
            self._vals_b = self._vals.view(np.uint8)  # the kernels' byte view, made once
            _share_values(units, self._vals)
            self._code = 2 * 2 + (1 if vals.dtype == np.int8 else 0)  # int32 offsets
            assert self._code in kernels.PROGRAM_CODES  # the only dtypes the programs' tiles compile
        self._entry0 = np.cumsum([0] + [_parts(u)[0].csr.col_indices.shape[0] for u in units]).tolist()
        self._row0 = np.cumsum([0] + [_parts(u)[0].csr.shape[0] for u in units]).tolist()
        self._geos: dict[tuple, _Geometry | None] = {}
        self._level_arrays: dict[tuple, tuple] = {}
        self._arenas: dict[tuple, np.ndarray] = {}
        self._states: dict[tuple, object] = {}
        self._unit_only: set[tuple] = set()  # (levels, batch, force) where tune() found unit by unit faster
        self._lock = threading.Lock()

    @staticmethod
    def _unit_geo(u: nn.Module) -> kernels.ConvGeometry:
        layer = _parts(u)[0]
        if isinstance(layer, SparseLinear):  # a 1x1 conv on a [in, 1, 1] plane
            O, C = layer.csr.shape
            return kernels.ConvGeometry((O, C, 1, 1), (1, 1), (0, 0), (1, 1), 1)
        return layer.geo

    @property
    def _convs(self) -> list[nn.Module]:
        """The conv units (every unit but a Linear tail, which decides its path for itself)."""
        return list(self.units[:-1] if self._tail else self.units)

    def _geo(self, ui: int) -> kernels.ConvGeometry:
        """Unit ``ui``'s conv geometry (the Linear tail's as a 1x1 conv)."""
        return self._unit_geos[ui]

    # ------------------------------------------------------------------ unit path
    def _unit_path(self, x: torch.Tensor, force: str | None = None) -> torch.Tensor:
        """The region unit by unit. When every conv in it runs dense at this call, its
        activations are channels-last (oneDNN's faster conv layout on CPU: ResNet-20 at full
        density, batch 64, 0.80x the time of NCHW) and a 4-D result is returned as NCHW again."""
        cl = (x.dim() == 4 and x.is_cpu and x.dtype == torch.float32 and x.shape[0] > 1
              and self._all_on("dense", x.shape[0], force))
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self._run_ops(x, lambda u, v, r: _call_unit(u, v, r, force))
        return y.contiguous() if cl and isinstance(y, torch.Tensor) else y

    def _all_on(self, way: str, N: int, force: str | None) -> bool:
        """Every conv of the region runs ``way`` ("sparse" / "dense") at this call's levels and batch."""
        return all((force or layer.choice(_level_for(layer.name, layer.top), N)) == way
                   for layer in (_parts(u)[0] for u in self._convs))

    def _run_ops(self, x: torch.Tensor, conv: Callable) -> torch.Tensor:
        """The region op by op in torch; each conv unit through ``conv(unit, input, residual)``."""
        vals = [x]
        for kind, ui, src, res in self.ops:
            v = vals[src]
            if kind == "conv":
                v = conv(self.units[ui], v, vals[res] if res >= 0 else None)
            elif kind == "subpad":
                v = self.shortcuts[ui](v)
            elif kind == "gap":
                v = F.adaptive_avg_pool2d(v, 1)
            elif kind == "flatten":
                v = v.flatten(1)
            vals.append(v)
        return vals[-1]

    # ------------------------------------------------------------------ compiled path
    def _levels(self):
        for u in self.units:
            layer, bn = _parts(u)[:2]
            yield _level_for(layer.name, layer.top), (-1 if bn is None else _level_for(bn.name, bn.top))

    def forward(self, x: torch.Tensor, force: str | None = None) -> torch.Tensor:
        if (self._vals is None or force == "dense" or x.dtype != torch.float32 or not x.is_cpu
                or x.dim() != 4 or x.shape[0] == 0 or x.requires_grad):
            return self._unit_path(x, force)
        arg = _LEVEL.get()
        levels = arg if isinstance(arg, int) else tuple(self._levels())
        N = x.shape[0]
        key = (tuple(x.shape), force, levels, _MODE_EPOCH[0])
        st = self._states.get(key, False)
        if st is False:
            if len(self._states) > 256:  # stale epochs / many level maps: start over
                self._states.clear()
            st = self._states[key] = self._state(N, tuple(x.shape[1:]), force, levels)
        if st is None:
            return self._unit_path(x, force)
        geo, (starts, ends, scales, bias, blk), tail = st
        T = max(1, min(kernels._threads(), N))
        arena = self._arena(geo, T, (tuple(x.shape[1:]), tail))
        out = np.empty((N, *geo.out_dims), np.float32)
        kern = kernels._kernel("prog_par" if T > 1 else "prog_ser")
        kern(_as_numpy(x).reshape(-1), out.reshape(-1), arena, geo.arena, T, N, geo.steps, geo.offs_b, self._vals_b,
             self._code, starts, ends, scales, bias, blk)
        y = torch.from_numpy(out)
        if self._tail and not tail:  # the Linear tail outside the program (its own path)
            y = _call_unit(self.units[-1], y, None, force)
        return y

    def _state(self, N: int, in_shape: tuple, force: str | None, levels):
        """``(geometry, level arrays, tail in the program)``, or None when the call goes unit by unit."""
        if (levels, N, force) in self._unit_only or not self._all_on("sparse", N, force):
            return None
        tail = self._tail and self._tail_in(N)
        geo = self._geometry(in_shape, tail)
        if geo is None:
            return None
        return geo, self._arrays(levels), tail

    def _tail_in(self, N: int) -> bool:
        """Whether the Linear tail runs inside the program at this call's level and batch ``N``:
        per image it is a batch-1 SpMV, so when the batch-1 density rule calls its level sparse
        (``kernels.choose``), and, at ``N > 1``, when it is small (at most ``TAIL_MAX_NNZ``
        non-zeros; a large classifier runs faster as one batched call after the program). Not
        ``tune()``'s pick: that times the layer on its own, with the call overhead (Python,
        transposes) a program does not pay -- ResNet-20 at 5%, batch 1: the whole call 0.76x
        the time with the classifier inside."""
        layer = _parts(self.units[-1])[0]
        k = _level_for(layer.name, layer.top)
        if N > 1 and layer.csr.nnz(k) > TAIL_MAX_NNZ:
            return False
        return kernels.choose(layer.csr, k, 1) == "sparse"

    def _arena(self, geo: _Geometry, T: int, gkey: tuple) -> np.ndarray:
        """This thread's arena for ``T`` tasks of geometry ``geo``, named by its ``_geometry`` key
        ``(input shape, tail)``: one per geometry, as each lays its planes out differently and
        relies on their borders having stayed zero."""
        key = (threading.get_ident(), gkey, T)
        got = self._arenas.get(key)
        if got is None:
            with self._lock:
                if len(self._arenas) >= 32:  # many threads / shapes: drop the old arenas
                    self._arenas.clear()
            got = kernels.aligned_empty((T * geo.arena,))
            got.fill(0.0)  # plane borders are zero from here on: steps write interiors only
            self._arenas[key] = got
        return got

    def _arrays(self, levels) -> tuple:
        """Per-row ``(starts, ends, scales, bias, blk)`` over all the region's convs at ``levels`` (an
        int, or per unit its ``(conv level, BatchNorm level)`` as :meth:`_levels` gives them);
        ``blk[r] = 1`` where rows ``r..r+3`` (one group, the first a multiple of 4 into its conv)
        have the same columns at their level: a 4x1 block, run four rows per tile."""
        got = self._level_arrays.get(levels)
        if got is not None:
            return got
        starts, ends, scales, bias, blk = [], [], [], [], []
        for i, u in enumerate(self.units):
            layer, bn = _parts(u)[:2]
            # levels: one level for the whole call, or each unit's (conv, BatchNorm) levels (_levels)
            k, kb = (levels, levels) if isinstance(levels, int) else levels[i]
            kb = -1 if bn is None else kb
            plan = kernels.plan_for(layer.csr, k)
            blk.append(kernels.row_blocks4(layer.csr, plan, self._geo(i).groups))
            starts.append(plan.starts + self._entry0[i])
            ends.append(plan.ends + self._entry0[i])
            sc, bb = layer._epilogue(k, bn, kb)
            scales.append(sc)
            bias.append(bb)
        got = (np.ascontiguousarray(np.concatenate(starts), dtype=np.int64),
               np.ascontiguousarray(np.concatenate(ends), dtype=np.int64),
               np.ascontiguousarray(np.concatenate(scales), dtype=np.float32),
               np.ascontiguousarray(np.concatenate(bias), dtype=np.float32),
               np.ascontiguousarray(np.concatenate(blk), dtype=np.int8))
        if len(self._level_arrays) > 64:
            self._level_arrays.clear()
        self._level_arrays[levels] = got
        return got

    def _geometry(self, in_shape: tuple, tail: bool = False) -> _Geometry | None:
        got = self._geos.get((in_shape, tail), False)
        if got is False:
            got = self._geos[(in_shape, tail)] = self._compile(in_shape, tail)
        return got

    def _compile(self, in_shape: tuple, tail: bool = False) -> _Geometry | None:  # noqa: C901 - one pass per stage
        """Shapes, borders, liveness-reused slots, steps and tap offsets for one input shape (with
        the Linear tail as a 1x1 conv on the pooled ``[C, 1, 1]`` plane when ``tail``); None if the
        input does not fit the region (the unit path then raises the usual error)."""
        if len(in_shape) != 3:
            return None
        ops = self.ops if tail or not self._tail else self.ops[:-1]
        # -- shapes (values: 0 the input, i + 1 op i's output; identities alias their source)
        alias, shape = {0: 0}, {0: tuple(int(v) for v in in_shape)}
        for i, (kind, ui, src, res) in enumerate(ops):
            v, s = i + 1, alias[src]
            if kind in ("identity", "flatten"):
                alias[v] = s
                continue
            alias[v] = v
            C, H, W = shape[s]
            if kind == "gap":
                shape[v] = (C, 1, 1)
                continue
            if kind == "subpad":
                sc = self.shortcuts[ui]
                shape[v] = (C + sc.extra, -(-H // sc.stride), -(-W // sc.stride))
                continue
            pool = _parts(self.units[ui])[3]
            geo = self._geo(ui)
            if C != geo.wshape[1] * geo.groups:
                return None
            oh, ow = geo.out_hw(H, W)
            if oh // pool <= 0 or ow // pool <= 0:
                return None
            shape[v] = (geo.wshape[0], oh // pool, ow // pool)
            if res >= 0 and (shape[alias[res]] != shape[v] or pool != 1):
                return None
        last_op = max(i for i, op in enumerate(ops) if op[0] not in ("identity", "flatten"))
        out_val = alias[len(ops)]
        gap = ops[last_op][0] == "gap"
        # -- borders: the largest padding any conv reading the value needs
        border = {v: (0, 0) for v in shape}
        uses: dict[int, int] = {}  # value -> index of its last reading op
        for i, (kind, ui, src, res) in enumerate(ops):
            if kind in ("identity", "flatten"):
                continue
            s = alias[src]
            uses[s] = i
            if res >= 0:
                uses[alias[res]] = i
            if kind == "conv":
                pool = _parts(self.units[ui])[3]
                geo = self._geo(ui)
                ph, pw = geo.padding
                bw = pw
                if (STRIP_PLANES and geo.stride == (1, 1) and pool == 1 and shape[s][2] == shape[i + 1][2] == 8
                        and pw <= _STRIP_COL):  # every tap inside the row's line
                    bw = _STRIP_COL  # strip planes (pitch 16): see the strip flag below
                    border[i + 1] = (border[i + 1][0], max(border[i + 1][1], _STRIP_COL))
                border[s] = (max(border[s][0], ph), max(border[s][1], bw))
        uses[out_val] = len(ops)  # the output is read at the end
        for _ in range(len(ops)):  # a residual and its sum share a border: the add then runs in place, in one pass
            changed = False
            for i, (kind, ui, src, res) in enumerate(ops):
                if kind == "conv" and res >= 0:
                    r, v = alias[res], i + 1
                    b = (max(border[r][0], border[v][0]), max(border[r][1], border[v][1]))
                    changed |= b != border[r] or b != border[v]
                    border[r] = border[v] = b
            if not changed:
                break
        # -- slots (offsets in one image's arena), reused once their value is dead
        free: dict[tuple, list[int]] = {}
        top = [0]
        slot: dict = {}

        # a direct conv's last junk columns land up to bw floats past its plane (when bh == 0)
        slack = 16 + _round16(max(b[1] for b in border.values()))

        def alloc(key: tuple, size: int) -> int:
            lst = free.get(key)
            if lst:
                return lst.pop()
            off = top[0]
            top[0] += _round16(size) + slack
            return off

        def layout(v: int) -> tuple[int, int, int, int, int, int]:
            """(C, H, W, pitch, plane, interior offset) of value v's plane."""
            C, H, W = shape[v]
            bh, bw = border[v]
            pitch = W + 2 * bw
            return C, H, W, pitch, (H + 2 * bh) * pitch, bh * pitch + bw

        def plane_key(v: int) -> tuple:
            return ("plane", *shape[v], *border[v])

        steps: list[list[int]] = []
        offs_parts: list[np.ndarray] = []
        max_read = 0
        max_wide = 0
        wide_steps: list[int] = []
        C, H, W, pitch, plane, inner = layout(0)
        slot[0] = alloc(plane_key(0), C * plane)
        steps.append([PROG_COPY_IN, slot[0] + inner, C, H, W, pitch, plane])
        splits: dict[tuple, tuple] = {}
        split_last: dict[tuple, int] = {}
        split_pw: dict[tuple, int] = {}  # the widest padding among a split's readers
        for i, (kind, ui, src, res) in enumerate(ops):
            if kind == "conv":
                geo = self._geo(ui)
                if geo.stride != (1, 1):
                    k = (alias[src], *geo.stride)
                    split_last[k] = i
                    split_pw[k] = max(split_pw.get(k, 0), geo.padding[1])

        def split_of(i: int) -> _Split:
            """A strided conv op's phase split (:class:`_Split`). Phases of the
            source columns the split's readers use (their widest padding, not a wider border);
            phase rows at the output's pitch when they fit in it: the conv then writes straight
            into its output plane (direct), as a stride-1 conv; as strip rows (pitch 16, values
            from column 4) when the output is a strip plane and every tap stays inside a row's
            line (a strip conv)."""
            _, ui, src, _ = ops[i]
            s = alias[src]
            geo = self._geo(ui)
            pool = _parts(self.units[ui])[3]
            (sh, sw), pw, kw, dw = geo.stride, geo.padding[1], geo.wshape[3], geo.dilation[1]
            Hs, Ws = shape[s][1], shape[s][2]
            bh, bw = border[s]
            OW = geo.out_hw(Hs, Ws)[1]
            po = layout(i + 1)[3]
            Hp = Hs + 2 * bh
            pwm = split_pw[(s, sh, sw)]
            x0, Wv = bw - pwm, Ws + 2 * pwm
            Hq, Wq = -(-Hp // sh), -(-Wv // sw)
            qx_max = ((kw - 1) * dw + pwm - pw) // sw
            Wd, cd = Wq, 0
            if (STRIP_PLANES and pool == 1 and OW == 8 and po == kernels.STRIP_PITCH
                    and Wq + _STRIP_COL <= po and qx_max <= po - 8 - _STRIP_COL):
                Wd, cd = po, _STRIP_COL
            elif pool == 1 and Wq <= po and PHASE_AT_OUTPUT_PITCH:
                Wd = po
            return _Split((s, sh, sw, Wd, cd, x0), Hp, Hq, Wq, Wd, cd, x0, Wv)

        # values whose producer may write their 2x2 phase split directly (no SPLIT step): every
        # reader is a stride-2 conv taking that one split, or an option-A shortcut of stride 2
        # (it then copies phase (0, 0) rows); the producer decides below (whole-row tiles only)
        fusable: dict[int, tuple] = {}
        if FUSE_SPLITS:
            readers: dict[int, list[int]] = {}
            for i, (kind, ui, src, res) in enumerate(ops):
                if kind not in ("identity", "flatten"):
                    for val in {alias[src], alias[res] if res >= 0 else alias[src]}:
                        readers.setdefault(val, []).append(i)
            for i, (kind, ui, src, res) in enumerate(ops):
                v = i + 1
                if kind != "conv" or v == out_val or v not in readers:
                    continue
                keys, last = set(), 0
                for j in readers[v]:
                    kj, uj, sj, rj = ops[j]
                    if (kj == "conv" and alias[sj] == v and (rj < 0 or alias[rj] != v)
                            and self._geo(uj).stride == (2, 2)):
                        keys.add(split_of(j))
                    elif not (kj == "subpad" and self.shortcuts[uj].stride == 2):
                        keys = set()
                        break
                    last = j
                if len(keys) == 1:
                    fusable[v] = (next(iter(keys)), last)
        fused: dict[int, tuple] = {}  # value -> its split's (offset, Hq, Wd, cd, pwm), when fused

        for i, (kind, ui, src, res) in enumerate(ops):
            v, s = i + 1, alias[src]
            if kind in ("identity", "flatten"):
                continue
            Cs, Hs, Ws, ps, pls, ins = layout(s)
            if kind == "gap":
                if v == out_val:  # the region's output: pooled straight into the output
                    steps.append([PROG_GAP, slot[s] + ins, Cs, Hs, Ws, ps, pls, -1])
                else:  # the Linear tail's input: a [C, 1, 1] plane
                    slot[v] = alloc(plane_key(v), Cs * layout(v)[4])
                    steps.append([PROG_GAP, slot[s] + ins, Cs, Hs, Ws, ps, pls, slot[v], layout(v)[4]])
            elif kind == "subpad":
                sc = self.shortcuts[ui]
                Co, Ho, Wo, po, plo, ino = layout(v)
                slot[v] = alloc(plane_key(v), Co * plo)
                if s in fused:  # the source exists as its phases only: copy phase (bh % 2, pwm % 2)'s rows
                    off, Hq, Wd, cd, pwm = fused[s]
                    at = kernels._phase_row(off, Hq * Wd, Wd, border[s][0], pwm, cd, 0, 0)  # channel 0, row 0
                    steps.append([PROG_SUBPAD, at, slot[v] + ino, Cs, Ho, Wo, 1, Wd, 4 * Hq * Wd, po, plo,
                                  sc.before, Co])
                else:
                    steps.append([PROG_SUBPAD, slot[s] + ins, slot[v] + ino, Cs, Ho, Wo, sc.stride, ps, pls, po, plo,
                                  sc.before, Co])
            else:
                layer, _, relu, pool, _ = _parts(self.units[ui])
                geo = self._geo(ui)
                O, Cg, kh, kw = geo.wshape
                (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
                bh, bw = border[s]
                Hp = Hs + 2 * bh
                OH, OW = geo.out_hw(Hs, Ws)
                Co, Ho, Wo, po, plo, ino = layout(v)
                strided = (sh, sw) != (1, 1)
                if not strided:
                    view, Hq, Wq = slot[s], Hp, ps
                else:
                    k, _, Hq, Wq, Wd, cd, x0, Wv = split_of(i)
                    if k not in splits:  # (a fused producer made it already)
                        key = ("split", Cs, Hq, Wq, Wd, sh, sw)
                        off = alloc(key, Cs * sh * sw * Hq * Wd)
                        splits[k] = (off, key)
                        steps.append([PROG_SPLIT, slot[s], off, Cs, Hp, ps, sh, sw, Hq, Wq, Wd, cd, x0, Wv])
                    view, Wq = splits[k][0] + cd, Wd
                col = layer.csr.col_indices.astype(np.int64)
                c, tap = np.divmod(col, kh * kw)
                ky, kx = np.divmod(tap, kw)
                qy, ay = np.divmod(ky * dh + bh - ph, sh)
                qx, ax = np.divmod(kx * dw + bw - pw - (x0 if strided else 0), sw)
                offs = (((c * sh + ay) * sw + ax) * Hq + qy) * Wq + qx
                gstride = Cg * sh * sw * Hq * Wq
                if gstride * geo.groups >= 2**31:
                    return None
                offs_parts.append(offs.astype(np.int32))
                L = OH * Wq
                if offs.size:
                    max_read = max(max_read, view + (geo.groups - 1) * gstride + int(offs.max()) + L)
                slot[v] = alloc(plane_key(v), Co * plo)
                r = alias[res] if res >= 0 else -1
                direct = pool == 1 and Wq == po and (r < 0 or border[r] == border[v])
                row = [0] * PROG_FIELDS
                row[:14] = [PROG_CONV_DIRECT if direct else PROG_CONV_WIDE, view, slot[v] + ino,
                            self._row0[ui], O, O // geo.groups, gstride, L, Wq, OH, OW, plo, -1, int(relu)]
                # strip planes: 8 wide at pitch 16, each row one 64-byte line (the slots and plane
                # sizes are multiples of 16 floats), so no tap load splits a line and the conv
                # computes the 8 valid columns only (kernels._strip_rows)
                row[19] = int(direct and OW == 8 and Wq == kernels.STRIP_PITCH)
                if direct and ROW_TILES and OW in (16, 32, 64):
                    row[19] = 2  # whole-row tiles: the valid columns only (kernels._row_rows)
                    if v in fusable:  # ... straight into the phase split its readers take
                        sp, last = fusable[v]
                        # keyed by its exact layout: phase positions no producer writes stay zero
                        key = ("fused split", Co, sp.Hq, sp.Wq, sp.Wd, sp.cd, sp.x0, sp.Hp, po, *border[v])
                        off = alloc(key, Co * 4 * sp.Hq * sp.Wd)
                        splits[sp.key] = (off, key)
                        split_last[sp.key[:3]] = max(split_last[sp.key[:3]], last)  # shortcuts included
                        pwm = border[v][1] - sp.x0
                        fused[v] = (off, sp.Hq, sp.Wd, sp.cd, pwm)
                        row[20:27] = [1, off, sp.Hq * sp.Wd, sp.Wd, border[v][0], pwm, sp.cd]
                if r >= 0:
                    rC, rH, rW, rp, rpl, rin = layout(r)
                    row[12] = slot[r] + rin
                    row[17], row[18] = rp, rpl
                if not direct:
                    row[14], row[16] = po, pool
                    max_wide = max(max_wide, L)
                    wide_steps.append(len(steps))
                steps.append(row)
            # free what this op read for the last time (after its output took a slot)
            for val in {s, alias[res] if res >= 0 else s}:
                if uses.get(val) == i and val != out_val:
                    free.setdefault(plane_key(val), []).append(slot[val])
            if v in fused:  # its plane held only the producer's own leftover rows: free it now
                free.setdefault(plane_key(v), []).append(slot[v])
                uses[v] = -1  # (its readers take the phases, and must not free the plane again)
            for k in [k for k in splits if split_last[k[:3]] == i]:
                off, key = splits.pop(k)
                free.setdefault(key, []).append(off)
        Co, Ho, Wo, po, plo, ino = layout(out_val)
        if not gap:
            steps.append([PROG_COPY_OUT, slot[out_val] + ino, Co, Ho, Wo, po, plo])
        wide = top[0]
        for si in wide_steps:
            steps[si][15] = wide
        A = _round16(max(wide + max_wide + 64, max_read + 64))
        table = np.zeros((len(steps), PROG_FIELDS), dtype=np.int64)
        for si, st in enumerate(steps):
            table[si, :len(st)] = st
        if ops[-1][0] == "flatten" or (tail and self._tail):  # flattened (and the Linear's [O, 1, 1])
            out_dims = (Co,)
        else:
            out_dims = (Co, Ho, Wo)
        offs = np.ascontiguousarray(np.concatenate(offs_parts)) if offs_parts else np.zeros(0, np.int32)
        return _Geometry(table, self._shared_offsets(in_shape, offs), A, out_dims)

    def _shared_offsets(self, in_shape: tuple, offs: np.ndarray) -> np.ndarray:
        """``offs``, or the same numbers as a prefix of the other geometry compiled for this input
        shape (with / without the Linear tail, whose taps come last): the tap offsets are as large
        as the weights, so they are held once."""
        for tail in (False, True):
            other = self._geos.get((in_shape, tail))
            if other is None or other is False:
                continue
            theirs = other.offs_b.view(np.int32)
            if theirs.shape[0] >= offs.shape[0] and np.array_equal(theirs[:offs.shape[0]], offs):
                return theirs[:offs.shape[0]]
            if offs.shape[0] > theirs.shape[0] and np.array_equal(offs[:theirs.shape[0]], theirs):
                other.offs_b = offs[:theirs.shape[0]].view(np.uint8)  # the longer array serves both
        return offs

    # ------------------------------------------------------------------ tuning
    def tune_level(self, args: tuple, level: int, repeats: int, keys: set | None = None) -> dict:
        """Time each conv sparse vs dense on its own input (the unit path), then the whole
        program against the unit path; the program runs for this level and batch only when it
        is at least 5% faster (its convs are then all on the sparse path)."""
        x = args[0]
        N = x.shape[0]
        out: dict = {}

        def timed(u: nn.Module, v: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
            layer = _parts(u)[0]
            t = _median_times({w: (lambda w=w: _call_unit(u, v, r, w)) for w in ("sparse", "dense")}, repeats)
            k = _level_for(layer.name, layer.top)
            layer.mode[(k, N)] = out[(layer.name, k)] = _faster(t)
            if keys is not None:
                keys.add((layer, N))
            return _call_unit(u, v, r, None)

        self._run_ops(x, timed)
        fits = (self._vals is not None and x.dtype == torch.float32 and x.is_cpu and x.dim() == 4
                and self._geometry(tuple(x.shape[1:])) is not None)
        if not fits:
            return out
        arg = _LEVEL.get()
        levels = arg if isinstance(arg, int) else tuple(self._levels())
        self._unit_only.discard((levels, N, None))
        t = _median_times({"program": lambda: self.forward(x, force="sparse"), "units": lambda: self._unit_path(x)},
                          repeats)
        if t["program"] < 0.95 * t["units"]:
            for u in self._convs:  # (a Linear tail keeps its own pick)
                layer = _parts(u)[0]
                k = _level_for(layer.name, layer.top)
                layer.mode[(k, N)] = out[(layer.name, k)] = "sparse"
        else:
            self._unit_only.add((levels, N, None))
        return out

    def extra_repr(self) -> str:
        return f"convs={len(self._convs)}, ops={len(self.ops)}" + (", linear tail" if self._tail else "")


# ====================================================================== graph pass
#: Identities at inference on any 4-D input (``Dropout1d`` would raise on one, so it stays outside).
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def _conv_unit(node: torch.fx.Node, modules: dict) -> nn.Module | None:
    if node.op != "call_module" or node.kwargs:
        return None
    m = modules.get(node.target)
    if isinstance(m, FusedSparse):
        layer = m.layer
        if not (isinstance(layer, SparseConv) and layer.pl.kind == "conv2d"):
            return None
        return m if len(node.args) == (2 if m.residual else 1) else None
    if isinstance(m, SparseConv) and m.pl.kind == "conv2d" and len(node.args) == 1:
        return m
    return None


def _linear_unit(node: torch.fx.Node, modules: dict) -> nn.Module | None:
    """A packed Linear unit (with its fused BatchNorm / ReLU, no residual) called on one value."""
    if node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return None
    m = modules.get(node.target)
    if isinstance(m, FusedSparse) and isinstance(m.layer, SparseLinear) and not m.residual and m.pool == 1:
        return m
    return m if isinstance(m, SparseLinear) else None


def _feeds_packed(node: torch.fx.Node, modules: dict, depth: int = 4) -> bool:
    """``node``'s value reaches another packed layer within ``depth`` nodes (an MLP head: the
    Linear then starts a feature-major chain instead of closing a program)."""
    if depth == 0:
        return False
    for u in node.users:
        if u.op == "call_module" and isinstance(modules.get(u.target), (FusedSparse, SparseLinear, SparseConv)):
            return True
        if _feeds_packed(u, modules, depth - 1):
            return True
    return False


def _is_gap(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module" and type(modules.get(node.target)) is nn.AdaptiveAvgPool2d:
        return len(node.args) == 1 and not node.kwargs and modules[node.target].output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return len(node.args) + len(node.kwargs) == 2 and size in (1, (1, 1))
    return False


def plane_programs(graph: torch.fx.Graph, modules: dict[str, nn.Module], min_convs: int = 2) -> bool:
    """Replace each maximal region of conv units (+ identities, residual adds already fused,
    a closing global average pool and flatten, and a Linear unit on that: the classifier) that
    reads one outside value and is read only through its last node by a :class:`PlaneProgram`.
    Returns True if any was made."""
    made = False
    nodes = list(graph.nodes)
    i = 0
    while i < len(nodes):
        first = nodes[i]
        if _conv_unit(first, modules) is None or not isinstance(first.args[0], torch.fx.Node):
            i += 1
            continue
        x = first.args[0]
        region: list[torch.fx.Node] = []
        inside: set = set()
        for n in nodes[i:]:
            deps = [a for a in n.args if isinstance(a, torch.fx.Node)]
            if not n.args or not all(d is x or d in inside for d in deps):
                break
            if len(region) >= 2 and _is_gap(region[-2], modules) and _is_flatten1(region[-1], modules):
                if (_linear_unit(n, modules) is not None and n.args[0] is region[-1]
                        and not _feeds_packed(n, modules)):
                    region.append(n)  # the classifier on the pooled features (not a chain's first layer)
                break
            after_gap = bool(region) and _is_gap(region[-1], modules)
            gap_flatten = after_gap and n.args[0] is region[-1] and _is_flatten1(n, modules)
            if after_gap and not gap_flatten:
                break  # a global pool (and its flatten, and a Linear on that) closes the region
            ok = gap_flatten or _is_gap(n, modules) or (len(deps) == len(n.args) and (
                _conv_unit(n, modules) is not None or (
                    n.op == "call_module" and type(modules.get(n.target)) in _IDENTITIES + (PadShortcut,)
                    and len(n.args) == 1 and not n.kwargs)))
            if not ok:
                break
            region.append(n)
            inside.add(n)
        # trim until only the last node is read from outside the region
        while region:
            members = set(region)
            escaping = [n for n in region if any(u not in members for u in n.users)]
            if escaping == [region[-1]]:
                break
            region.pop()
        convs = [n for n in region if _conv_unit(n, modules) is not None]
        if len(convs) < min_convs:
            i += 1
            continue
        ids = {x: 0}
        ops: list[Op] = []
        units: list[nn.Module] = []
        shortcuts: list[nn.Module] = []
        for n in region:
            unit = _conv_unit(n, modules) or _linear_unit(n, modules)
            src = ids[n.args[0]]
            if unit is not None:
                res = ids[n.args[1]] if len(n.args) == 2 else -1
                ops.append(("conv", len(units), src, res))
                units.append(unit)
            elif n.op == "call_module" and type(modules.get(n.target)) is PadShortcut:
                ops.append(("subpad", len(shortcuts), src, -1))
                shortcuts.append(modules[n.target])
            elif _is_gap(n, modules):
                ops.append(("gap", -1, src, -1))
            elif _is_flatten1(n, modules):
                ops.append(("flatten", -1, src, -1))
            else:
                ops.append(("identity", -1, src, -1))
            ids[n] = len(ops)
        name = f"_program{len(modules)}_{first.target.replace('.', '_')}"
        modules[name] = PlaneProgram(ops, units, shortcuts)
        last = region[-1]
        with graph.inserting_before(last):
            new = graph.call_module(name, (x,))
        last.replace_all_uses_with(new)
        for n in sorted(region, key=lambda n: -_position(graph, n)):
            graph.erase_node(n)
        made = True
        nodes = list(graph.nodes)
        i = nodes.index(new) + 1
    return made
