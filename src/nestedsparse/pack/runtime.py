"""The packed model at run time: any level per call, sparse CPU kernels, no shared level state.

``load_packed`` builds the model from its factory (or the registry), swaps every nested layer
for a :class:`SparseLinear` / :class:`SparseConv` holding its NestedCSR and every per-level
BatchNorm for :class:`LevelBatchNorm`, and loads the other tensors. ``rt(x, level=k)`` puts the
level in a ``contextvars.ContextVar`` for the duration of the call (each thread has its own), so
threads may run different levels at once; per-layer levels ``{"features": 3, "classifier": 0}``
reroute part-way through the network.

Per layer and level the runtime runs the sparse kernel, or a dense matmul on that level's weight
(materialised once, on first use) where the sparse kernel would be slower. :meth:`PackedRuntime.tune`
times both on the user's own input shape and keeps the faster; without tuning a density rule
(``kernels.choose``) decides. Every packed layer runs exactly the masked dense model's math.
"""
from __future__ import annotations

import contextvars
import operator
import os
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from ..levels import LevelSpec
from ..nest import NestedBatchNorm, _resolve, check_level_arg, iter_nested, nestify_
from . import kernels
from .csr import to_dense
from .format import PackedFormatError, PackedLayer, PackedModel, read_packed

__all__ = ["PackedRuntime", "SparseLinear", "SparseConv", "LevelBatchNorm", "FusedSparse", "FeatureMajorChain",
           "load_packed", "runtime_from_packed", "SLIM"]

_LEVEL: contextvars.ContextVar = contextvars.ContextVar("nestedsparse_level", default=None)
#: The "layer" name under which :meth:`PackedRuntime.tune` reports a level run as its slim network.
SLIM = "<slim network>"


def _level_for(name: str, top: int) -> int:
    arg = _LEVEL.get()
    if arg is None:
        return top
    return _resolve(name, arg, top) if isinstance(arg, Mapping) else arg


def _program():
    """The depth-first program module (imported late: it builds on this one)."""
    from . import program  # noqa: PLC0415

    return program


_MODE_EPOCH = [0]  # bumped whenever any layer's sparse/dense choice changes (compiled sequences key on it)


class _ModeDict(dict):
    """``{(level, batch): "sparse" | "dense"}`` that tells compiled layer sequences it changed."""

    def __setitem__(self, key, value) -> None:
        if value not in ("sparse", "dense"):
            raise ValueError(f"mode must be 'sparse' or 'dense', got {value!r}")
        super().__setitem__(key, value)
        _MODE_EPOCH[0] += 1  # after the write: a sequence compiled meanwhile sees the new choice or a stale epoch

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        _MODE_EPOCH[0] += 1

    def clear(self) -> None:
        super().clear()
        _MODE_EPOCH[0] += 1

    def update(self, *args, **kwargs) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def pop(self, *args):
        try:
            return super().pop(*args)
        finally:
            _MODE_EPOCH[0] += 1

    def popitem(self):
        try:
            return super().popitem()
        finally:
            _MODE_EPOCH[0] += 1

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other):
        self.update(other)
        return self


class _SparseBase(nn.Module):
    def __init__(self, name: str, pl: PackedLayer, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.name, self.pl, self.csr = name, pl, pl.csr
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.top = pl.csr.num_levels - 1
        self.mode = {}  # (level, batch) -> "sparse" | "dense", set by tune() (a _ModeDict)
        self._dense: dict[int, torch.Tensor] = {}
        self._epi: dict[tuple, tuple] = {}  # (level, bn, bn level, kind) -> epilogue arrays / folded weights
        self._rule: dict[tuple[int, int], str] = {}  # memo of the density rule

    @property
    def mode(self) -> dict:
        """``{(level, batch): "sparse" | "dense"}``: the path per level and batch size (``tune()``
        fills it; unset keys follow the density rule)."""
        return self._mode

    @mode.setter
    def mode(self, value: Mapping) -> None:
        _MODE_EPOCH[0] += 1
        self._mode = _ModeDict()
        self._mode.update(value)

    def dense_weight(self, level: int, keep: bool = True) -> torch.Tensor:
        """The level's weight as a dense tensor (materialised once per level, on first use).
        ``keep=False``: the kept copy if there is one, else a new one that is not kept (for a
        use that keeps something else: a folded weight, an exported layer)."""
        w = self._dense.get(level)
        if w is None:
            # torch's allocator aligns to 64 bytes (numpy's large arrays only to 16): GEMV/GEMM
            # on the copy runs at the speed of a weight torch allocated itself
            w = torch.empty(self.pl.weight_shape)
            w.copy_(torch.from_numpy(to_dense(self.csr, level)).reshape(self.pl.weight_shape))
            if keep:
                self._dense[level] = w
        return w

    def drop_unused_dense(self) -> None:
        """Free the dense weights (plain and BatchNorm-folded) of the levels that no tuned or
        already-used batch size runs dense; another call rebuilds one on first use."""
        keep = {k for (k, b), way in self.mode.items() if way == "dense"}
        keep |= {k for (k, b), way in self._rule.items() if way == "dense" and (k, b) not in self.mode}
        for k in [k for k in self._dense if k not in keep]:
            del self._dense[k]
        for key in [key for key in self._epi if key[-1] == "dense" and key[0] not in keep]:
            del self._epi[key]

    def choice(self, level: int, batch: int) -> str:
        """``"sparse"`` or ``"dense"`` for this level and batch size (``tune()``'s pick, else the
        density rule of ``kernels.choose``)."""
        got = self.mode.get((level, batch))
        if got is None:
            got = self._rule.get((level, batch))
            if got is None:
                got = self._rule[(level, batch)] = kernels.choose(self.csr, level, batch)
        return got

    def forward(self, x: torch.Tensor, force: str | None = None, bn: LevelBatchNorm | None = None,
                relu: bool = False, residual: torch.Tensor | None = None, pool: int = 1) -> torch.Tensor:
        """This layer at the call's level, then (fused) ``bn``, ``+ residual``, ``relu`` and a
        ``pool x pool`` stride-``pool`` max-pool, in that order."""
        k = _level_for(self.name, self.top)
        kb = -1 if bn is None else _level_for(bn.name, bn.top)
        way = force or self.choice(k, x.shape[0])
        if way == "dense" or x.dtype != torch.float32 or not x.is_cpu:
            w, b = self._folded(k, bn, kb)
            if w.dtype != x.dtype or w.device != x.device:  # converted only when the input asks for it
                w = w.to(x.device, x.dtype)
                b = None if b is None else b.to(x.device, x.dtype)
            y = _finish(self._dense_forward(x, w, b), residual, relu)
            return F.max_pool2d(y, pool) if pool > 1 else y
        sc, bb = self._epilogue(k, bn, kb)
        if pool > 1:
            return self._sparse_forward(x, k, sc, bb, relu, residual, pool)
        return self._sparse_forward(x, k, sc, bb, relu, residual)

    def _epilogue(self, k: int, bn: LevelBatchNorm | None, kb: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-output ``(scales, bias)`` of the sparse kernel: int8 row scales, bias, folded BatchNorm."""
        key = (k, id(bn), kb, "sparse")
        got = self._epi.get(key)
        if got is None:
            sc = kernels.plan_for(self.csr, k).scales.astype(np.float32)
            bb = np.zeros(self.csr.shape[0], np.float32) if self.bias is None else self.bias.numpy().astype(np.float32)
            if bn is not None:
                s, t = bn.scale[kb].double().numpy(), bn.shift[kb].double().numpy()
                sc, bb = (sc * s).astype(np.float32), (bb * s + t).astype(np.float32)
            got = self._epi[key] = (np.ascontiguousarray(sc), np.ascontiguousarray(bb))
        return got

    def _folded(self, k: int, bn: LevelBatchNorm | None, kb: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense ``(weight, bias)`` of level ``k`` with the BatchNorm of level ``kb`` folded in."""
        if bn is None:
            return self.dense_weight(k), self.bias
        key = (k, id(bn), kb, "dense")
        got = self._epi.get(key)
        if got is None:
            s, t = bn.scale[kb].double(), bn.shift[kb].double()
            w = self.dense_weight(k, keep=False).double() * s.reshape(-1, *([1] * (len(self.pl.weight_shape) - 1)))
            b = t if self.bias is None else self.bias.double() * s + t
            got = self._epi[key] = (w.float().contiguous(), b.float().contiguous())
        return got

    def extra_repr(self) -> str:
        return f"{self.pl.kind}, shape={self.pl.weight_shape}, levels={self.csr.num_levels}, dtype={self.csr.dtype}"


class SparseLinear(_SparseBase):
    """A nested Linear run from its NestedCSR at the call's level."""

    def _dense_forward(self, x, w, b):
        if (x.dim() == 2 and x.shape[0] == 1 and x.shape[1] == w.shape[1] and x.dtype == w.dtype == torch.float32
                and x.is_cpu
                and not (x.requires_grad or w.requires_grad) and w.is_contiguous() and kernels.have_numba()):
            # batch 1: our GEMV (torch's took 2.2x the time on 1024x1024, two threads)
            y = torch.empty((1, w.shape[0]), dtype=torch.float32)
            kernels.gemv(w.numpy(), x.detach().reshape(-1).contiguous().numpy(),
                         None if b is None else b.detach().numpy(), out=y.numpy().reshape(-1))
            return y
        return F.linear(x, w, b)

    def _sparse_forward(self, x, k, sc, bb, relu, residual=None):
        lead, K = x.shape[:-1], x.shape[-1]
        xa = x.reshape(-1, K).contiguous().numpy()
        y = torch.empty((xa.shape[0], self.csr.shape[0]))
        kernels.linear_into(kernels.plan_for(self.csr, k), xa, y.numpy(), sc, bb, relu and residual is None)
        y = y.reshape(*lead, y.shape[-1])
        return y if residual is None else _finish(y, residual, relu)


class SparseConv(_SparseBase):
    """A nested Conv1d / Conv2d run from its NestedCSR at the call's level."""

    def __init__(self, name: str, pl: PackedLayer, bias: torch.Tensor | None) -> None:
        super().__init__(name, pl, bias)
        if pl.kind == "conv1d":
            o, c, kw = pl.weight_shape
            self.geo = kernels.ConvGeometry((o, c, 1, kw), (1, *pl.stride), (0, *pl.padding), (1, *pl.dilation),
                                            pl.groups)
        else:
            self.geo = kernels.ConvGeometry(pl.weight_shape, tuple(pl.stride), tuple(pl.padding),
                                            tuple(pl.dilation), pl.groups)

    def _dense_forward(self, x, w, b):
        conv = F.conv1d if self.pl.kind == "conv1d" else F.conv2d
        return conv(x, w, b, self.pl.stride, self.pl.padding, self.pl.dilation, self.pl.groups)

    def _sparse_forward(self, x, k, sc, bb, relu, residual=None, pool=1):
        x4 = x.unsqueeze(2) if self.pl.kind == "conv1d" else x
        if x4.dim() != 4 or x4.shape[1] != self.geo.wshape[1] * self.geo.groups:
            raise ValueError(f"layer {self.name!r}: input of shape {tuple(x.shape)} does not fit weight "
                             f"{self.pl.weight_shape} (groups {self.pl.groups})")
        xa = x4.contiguous().numpy()
        oh, ow = self.geo.out_hw(xa.shape[2], xa.shape[3])
        if oh <= 0 or ow <= 0:
            raise ValueError(f"layer {self.name!r}: input {tuple(x.shape)} is smaller than the kernel")
        if pool > 1:  # (the runtime fuses pools into conv2d layers only, never with a residual)
            y = torch.empty((xa.shape[0], self.geo.wshape[0], oh // pool, ow // pool))
            kernels.run_conv(self.csr, kernels.plan_for(self.csr, k), self.geo, xa, y.numpy(), sc, bb, relu,
                             pool=pool)
            return y
        y = torch.empty((xa.shape[0], self.geo.wshape[0], oh, ow))
        res = None
        if isinstance(residual, torch.Tensor):
            r4 = residual.unsqueeze(2) if self.pl.kind == "conv1d" else residual
            if r4.shape == y.shape and r4.dtype == torch.float32 and r4.is_cpu:
                res, residual = r4.contiguous().numpy(), None  # added inside the kernel
        kernels.run_conv(self.csr, kernels.plan_for(self.csr, k), self.geo, xa, y.numpy(), sc, bb,
                         relu and residual is None, residual=res)  # residual None here: all fused
        y = y.squeeze(2) if self.pl.kind == "conv1d" else y
        return y if residual is None else _finish(y, residual, relu)


def _finish(y: torch.Tensor, residual, relu: bool) -> torch.Tensor:
    """``relu(y + residual)`` for what the kernel did not fuse (``y`` is a fresh tensor, so it
    may be updated in place when the sum has exactly its shape and dtype)."""
    if residual is not None:
        same = isinstance(residual, torch.Tensor) and residual.shape == y.shape and residual.dtype == y.dtype
        y = y.add_(residual) if same else y + residual
    return torch.relu_(y) if relu else y


class FusedSparse(nn.Module):
    """A packed layer with the BatchNorm and/or ReLU that followed it in the model fused into
    its epilogue (sparse kernel) or folded into its weight (dense path): one pass, no extra tensors."""

    def __init__(self, layer: _SparseBase, bn: LevelBatchNorm | None, relu: bool, residual: bool = False,
                 pool: int = 1) -> None:
        super().__init__()
        self.layer, self.bn, self.relu, self.residual, self.pool = layer, bn, relu, residual, pool
        self.name = layer.name

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, force: str | None = None) -> torch.Tensor:
        if self.bn is not None and self.layer.pl.kind == "linear" and x.dim() != 2:
            # BatchNorm1d normalises dim 1, the fold the last one: only the same thing on [N, C]
            y = self.bn(self.layer(x, force))
            return _finish(y, residual, self.relu)
        return self.layer(x, force, self.bn, self.relu, residual, self.pool)

    def extra_repr(self) -> str:
        return f"bn={self.bn is not None}, residual={self.residual}, relu={self.relu}, pool={self.pool}"


def _unit_parts(u: nn.Module) -> tuple:
    """``(layer, bn, relu, pool, residual)`` of a packed unit (a :class:`FusedSparse` or a bare layer)."""
    if isinstance(u, FusedSparse):
        return u.layer, u.bn, u.relu, u.pool, u.residual
    return u, None, False, 1, False


#: A packed Conv2d joins a feature-major chain only with at least this many taps per output
#: channel (``in/groups * kh * kw``): the chain's kernel makes one call per output position, which
#: a layer with a handful of taps (LeNet's 1-channel first conv) does not amortise.
FM_MIN_TAPS = 64


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU float32 tensor's data as a C-contiguous numpy array (a copy only if it is not contiguous)."""
    return (x if not x.requires_grad and x.is_contiguous() else x.detach().contiguous()).numpy()


class _FusedLinears:
    """A Linear-only chain's call with every level, buffer and array resolved: ``self(x)`` is one
    compiled call (input transpose, every layer, output transpose) and one output allocation."""

    __slots__ = ("kern", "acts", "arrays", "out_features")

    def __init__(self, kern: Callable, acts: np.ndarray, arrays: tuple, out_features: int) -> None:
        self.kern, self.acts, self.arrays, self.out_features = kern, acts, arrays, out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # numpy in and out: torch.empty and detach().contiguous() cost ~2 us each, a batch-1 call
        # is tens of us
        y = np.empty((x.shape[0], self.out_features), np.float32)
        self.kern(_as_numpy(x), y, self.acts, *self.arrays)
        return torch.from_numpy(y)


class FeatureMajorChain(nn.Module):
    """Consecutive packed Conv2d and Linear layers (each with its fused BatchNorm / ReLU /
    max-pool), each feeding only the next (Flatten between a conv and a Linear, Dropout anywhere),
    run in the feature-major layout: activations are ``[C*H*W, batch]`` (a conv's input with its
    zero padding built in), so a sparse conv is one AXPY over a contiguous batch row per non-zero
    and output position (``kernels.bind_conv_t``) and a sparse Linear the register-tile
    ``spmm_t``; a conv writes straight into the next layer's padded input, and ``Flatten`` is
    free (``[C*H*W, B]`` already is NCHW's flatten order). One transpose in, one out.
    Activation buffers are kept per thread, batch size and input shape, so a steady-state call
    allocates only its output; the call's layer sequence is compiled once per (thread, batch,
    input shape, levels, choice epoch) and replayed. Dense-chosen Linear layers run
    ``torch.addmm`` in the same layout; a dense-chosen conv sends the call down the layer-by-layer
    path (NCHW)."""

    def __init__(self, units: list[nn.Module]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.name = units[0].name
        self.kinds = ["linear" if self._parts(u)[0].pl.kind == "linear" else "conv" for u in units]
        self._linear_bn = any(k == "linear" and self._parts(u)[1] is not None for u, k in zip(units, self.kinds))
        self.flatten_input = False
        self._unit_only: set[tuple] = set()  # (levels, batch, force) where tune() found layer by layer faster
        self._act_bufs: dict[tuple, list[np.ndarray]] = {}
        self._shapes: dict[tuple, list[tuple]] = {}
        self._epi_cache: dict[tuple, tuple] = {}
        self._progs: dict[tuple, list | None] = {}
        self._fused_acts: dict[tuple, np.ndarray] = {}
        # a Linear-only chain of one value dtype runs as one call on its layers' concatenated
        # entries; built here, before any call, so the layers' arrays become slices of it (held
        # once) before a kernel plan or a bound sequence captures them, and no call races to build it
        self._fused_static = self._concatenate() if kernels.have_numba() else None

    def _concatenate(self) -> tuple | None:
        """``(cols_b, vals_b, code, cols, vals, entry0, row0)`` of the one-call chain, or None."""
        parts = [self._parts(u) for u in self.units]
        if any(k != "linear" for k in self.kinds) or len({layer.csr.values.dtype for layer, _, _ in parts}) != 1:
            return None
        cdt = np.result_type(*[layer.csr.col_indices.dtype for layer, _, _ in parts])
        cols = np.ascontiguousarray(np.concatenate([layer.csr.col_indices.astype(cdt) for layer, _, _ in parts]))
        vals = np.ascontiguousarray(np.concatenate([layer.csr.values.reshape(-1) for layer, _, _ in parts]))
        entry0 = np.cumsum([0] + [layer.csr.col_indices.shape[0] for layer, _, _ in parts])
        row0 = np.cumsum([0] + [layer.csr.shape[0] for layer, _, _ in parts])
        for (layer, _, _), e0, e1 in zip(parts, entry0[:-1], entry0[1:]):  # (cols: when the dtypes agree)
            kernels.share_arrays(layer.csr, values=vals[e0:e1], col_indices=cols[e0:e1])
        code = 2 * kernels._COL_CODE[cols.dtype] + kernels._VAL_CODE[vals.dtype]
        return cols.view(np.uint8), vals.view(np.uint8), code, cols, vals, entry0, row0

    @staticmethod
    def _parts(u: nn.Module) -> tuple[_SparseBase, LevelBatchNorm | None, bool]:
        return _unit_parts(u)[:3]

    @staticmethod
    def _pool(u: nn.Module) -> int:
        return _unit_parts(u)[3]

    def _plan_shapes(self, in_shape: tuple) -> list[tuple] | None:
        """Per element ``(in dims, padding, out dims)``; None if the input does not fit the fast path."""
        key = tuple(in_shape)
        if key in self._shapes:
            return self._shapes[key]
        out, dims = [], tuple(in_shape)
        for u, kind in zip(self.units, self.kinds):
            layer = self._parts(u)[0]
            if kind == "linear":
                feats = int(np.prod(dims))
                if feats != layer.csr.shape[1]:
                    out = None
                    break
                out.append(((feats,), (0, 0), (layer.csr.shape[0],)))
                dims = (layer.csr.shape[0],)
            else:
                geo, pool = layer.geo, self._pool(u)
                if len(dims) != 3 or dims[0] != geo.wshape[1] * geo.groups:
                    out = None
                    break
                oh, ow = geo.out_hw(dims[1], dims[2])
                if oh // pool <= 0 or ow // pool <= 0:
                    out = None
                    break
                out.append((dims, geo.padding, (geo.wshape[0], oh // pool, ow // pool)))
                dims = (geo.wshape[0], oh // pool, ow // pool)
        self._shapes[key] = out
        return out

    def _act_buffers(self, batch: int, in_shape: tuple = ()) -> list[np.ndarray]:
        """Zeroed once (padding borders stay zero: producers write interiors only)."""
        if not in_shape:  # linear-only chains: the first layer's features
            in_shape = (self._parts(self.units[0])[0].csr.shape[1],)
        key = (threading.get_ident(), batch, tuple(in_shape))
        got = self._act_bufs.get(key)
        if got is None:
            if len(self._act_bufs) >= 32:  # many threads / batch sizes: drop the old buffers
                self._act_bufs.clear()
                self._progs.clear()
            shapes = self._plan_shapes(in_shape)
            rows = []
            for dims, (ph, pw), _ in shapes:
                rows.append(dims[0] * (dims[1] + 2 * ph) * (dims[2] + 2 * pw) if len(dims) == 3 else dims[0])
            rows.append(int(np.prod(shapes[-1][2])))
            got = []
            for r in rows:
                buf = kernels.aligned_empty((r, batch))
                buf.fill(0.0)
                got.append(buf)
            self._act_bufs[key] = got
        return got

    def _unit_path(self, x: torch.Tensor, force: str | None = None) -> torch.Tensor:
        prev = None
        for u, kind in zip(self.units, self.kinds):
            if kind == "linear" and prev == "conv":  # the absorbed Flatten
                x = x.flatten(1)
            x = u(x, force=force)
            prev = kind
        return x

    def forward(self, x: torch.Tensor, force: str | None = None) -> torch.Tensor:
        if self.flatten_input:  # a Flatten(1) before the first Linear was absorbed
            x = x.flatten(1)
        if self.kinds[0] == "linear" and x.dim() > 2 and not self._linear_bn:
            # a Linear acts on the last dim: [*, K] runs as [prod(*), K] and is reshaped back
            lead = x.shape[:-1]
            y = self.forward(x.reshape(-1, x.shape[-1]), force)
            return y.reshape(*lead, y.shape[-1])
        if (x.dtype != torch.float32 or not x.is_cpu or x.dim() != (4 if self.kinds[0] == "conv" else 2)
                or x.shape[0] == 0):  # an empty batch: the layers give its empty output
            return self._unit_path(x, force)
        arg = _LEVEL.get()
        levels = arg if isinstance(arg, int) else tuple(self._levels())
        key = (threading.get_ident(), tuple(x.shape), force, levels, _MODE_EPOCH[0])
        state = self._progs.get(key, False)
        if state is False:
            if len(self._progs) > 256:  # stale epochs / many level maps: start over
                self._progs.clear()
            state = self._progs[key] = self._state(x.shape[0], tuple(x.shape[1:]), force, levels)
        if state is None:  # the input does not fit, or a conv runs dense at this level: layer by layer
            return self._unit_path(x, force)
        if type(state) is _FusedLinears:
            return state(x)
        prog, bufs, shape0, out_dims = state
        B = x.shape[0]
        self._load_input(x, bufs[0], shape0)
        for fn in prog:
            fn()
        if B == 1:
            y = torch.from_numpy(bufs[-1].reshape(1, -1).copy())
        else:
            y = torch.from_numpy(kernels.transpose(bufs[-1]))
        return y.reshape(B, *out_dims)

    def _state(self, B: int, in_shape: tuple, force: str | None, levels=None):
        """``(compiled layer sequence, buffers, first layer's shape plan, output dims)`` or None
        (the call goes layer by layer). The sequence is bound to exactly the buffers returned
        with it: one lookup, so another thread clearing the buffer cache cannot split them."""
        shapes = self._plan_shapes(in_shape)
        if shapes is None or (levels, B, force) in self._unit_only:
            return None
        fused = self._fused_linears(B, force)
        if fused is not None:
            return fused
        bufs = self._act_buffers(B, in_shape)
        prog = self._compile(B, in_shape, force, bufs)
        if prog is None:
            return None
        return prog, bufs, shapes[0], shapes[-1][2]

    def _fused_linears(self, B: int, force: str | None) -> _FusedLinears | None:
        """Every layer in one compiled call (``kernels._chain_par``) when the chain is Linear
        only, every layer is on the sparse path at the call's levels and all share one value
        dtype; else None (the layer-by-layer sequence)."""
        if self._fused_static is None:
            return None
        parts = [self._parts(u) for u in self.units]
        ks = []
        for layer, bn, _ in parts:
            k = _level_for(layer.name, layer.top)
            if (force or layer.choice(k, B)) != "sparse":
                return None
            ks.append((k, -1 if bn is None else _level_for(bn.name, bn.top)))
        cols_b, vals_b, code, cols, vals, entry0, row0 = self._fused_static
        T = max(1, kernels._threads())
        starts, ends, scales, bias, bounds, los, par, blk = [], [], [], [], [], [], [], []
        for i, ((layer, bn, relu), (k, kb)) in enumerate(zip(parts, ks)):
            plan = kernels.plan_for(layer.csr, k)
            starts.append(plan.starts + entry0[i])
            ends.append(plan.ends + entry0[i])
            blk.append(kernels.row_blocks4(layer.csr, plan) if B > 1 else np.zeros(plan.rows, np.int8))
            sc, bb = layer._epilogue(k, bn, kb)
            scales.append(sc)
            bias.append(bb)
            b = kernels._balanced_bounds(plan.ends - plan.starts, T)  # fewer blocks than T when rows < T
            b = np.concatenate([b, np.full(T + 1 - b.shape[0], b[-1], np.int64)])  # the kernel reads T + 1 each
            bounds.append(b + row0[i])
            los.append(0.0 if relu else -np.inf)
            par.append(int(kernels._use_parallel(None, plan.nnz * B, B)))
        K0 = parts[0][0].csr.shape[1]
        in_rows = [0] + [K0 + int(r) for r in row0[:-2]]  # layer i reads layer i-1's output
        table = np.array([[in_rows[i], K0 + int(row0[i]), int(row0[i]), parts[i][0].csr.shape[0], par[i],
                           kernels.LINEAR_PREFETCH_ROWS] for i in range(len(parts))], dtype=np.int64)
        key = (threading.get_ident(), B)
        acts = self._fused_acts.get(key)
        if acts is None:
            if len(self._fused_acts) >= 32:
                self._fused_acts.clear()
            acts = self._fused_acts[key] = kernels.aligned_empty((K0 + int(row0[-1]), B))
        arrays = (table, np.ascontiguousarray(np.concatenate(bounds), dtype=np.int64),
                  np.ascontiguousarray(np.concatenate(starts), dtype=np.int64),
                  np.ascontiguousarray(np.concatenate(ends), dtype=np.int64), cols_b, vals_b, code, cols, vals,
                  np.ascontiguousarray(np.concatenate(scales), dtype=np.float32),
                  np.ascontiguousarray(np.concatenate(bias), dtype=np.float32), np.array(los, dtype=np.float32),
                  np.ascontiguousarray(np.concatenate(blk), dtype=np.int8), T)
        return _FusedLinears(kernels._kernel("chain_par" if any(par) else "chain_ser"), acts, arrays,
                             parts[-1][0].csr.shape[0])

    @staticmethod
    def _load_input(x: torch.Tensor, buf: np.ndarray, shape: tuple) -> None:
        """``x`` ``[B, ...]`` -> ``buf`` ``[features (padded), B]``."""
        dims, (ph, pw), _ = shape
        B = x.shape[0]
        xa = x.detach().contiguous().numpy().reshape(B, -1)
        if len(dims) == 1 or (ph == 0 and pw == 0):
            if B == 1:
                np.copyto(buf.reshape(-1), xa.reshape(-1))
            else:
                kernels.transpose(xa, out=buf)
            return
        C, H, W = dims
        inner = xa.T if B == 1 else kernels.transpose(xa)
        buf.reshape(C, H + 2 * ph, W + 2 * pw, B)[:, ph:ph + H, pw:pw + W, :] = inner.reshape(C, H, W, B)

    def _levels(self):
        for u in self.units:
            layer, bn, _ = self._parts(u)
            yield _level_for(layer.name, layer.top), (-1 if bn is None else _level_for(bn.name, bn.top))

    def _compile(self, B: int, in_shape: tuple, force: str | None,
                 bufs: list[np.ndarray]) -> list[Callable[[], object]] | None:
        """The call's layer sequence with every choice, level and buffer resolved; None if a conv
        is to run dense (that level goes layer by layer)."""
        shapes = self._plan_shapes(in_shape)
        prog = []
        for i, (u, kind) in enumerate(zip(self.units, self.kinds)):
            if kind == "conv":
                layer, bn, relu = self._parts(u)
                k = _level_for(layer.name, layer.top)
                kb = -1 if bn is None else _level_for(bn.name, bn.top)
                if (force or layer.choice(k, B)) != "sparse":
                    return None
                nxt = (0, 0) if i + 1 == len(self.units) or self.kinds[i + 1] != "conv" else shapes[i + 1][1]
                sc, bb = layer._epilogue(k, bn, kb)
                prog.append(kernels.bind_conv_t(layer.csr, kernels.plan_for(layer.csr, k), layer.geo,
                                                shapes[i][0][1:], bufs[i], bufs[i + 1], nxt, sc, bb, relu,
                                                self._pool(u)))
            else:
                prog.append(self._bind(i, u, bufs[i], bufs[i + 1], force))
        return prog

    def _bind(self, i: int, u: nn.Module, xt: np.ndarray, yt: np.ndarray, force: str | None) -> Callable[[], object]:
        layer, bn, relu = self._parts(u)
        k = _level_for(layer.name, layer.top)
        kb = -1 if bn is None else _level_for(bn.name, bn.top)
        if (force or layer.choice(k, xt.shape[1])) == "sparse":
            sc, bb = layer._epilogue(k, bn, kb)
            return kernels.bind_linear_t(kernels.plan_for(layer.csr, k), xt, yt, sc, bb, relu)
        key = (i, k, kb)
        wb = self._epi_cache.get(key)
        if wb is None:
            w, b = layer._folded(k, bn, kb)
            wb = self._epi_cache[key] = (w, (torch.zeros(w.shape[0]) if b is None else b).reshape(-1, 1).contiguous())
        w, b = wb
        if yt.shape[1] == 1 and kernels.have_numba() and xt.shape[0] == w.shape[1]:  # our GEMV (2.2x addmv's speed)
            return kernels.bind_gemv(w.numpy(), xt.reshape(-1), b.numpy().reshape(-1), relu, yt.reshape(-1))
        X, Y = torch.from_numpy(xt), torch.from_numpy(yt)
        if yt.shape[1] == 1:  # one vector: GEMV, as nn.Linear runs at batch 1
            b1, x1, y1 = b.reshape(-1), X.reshape(-1), Y.reshape(-1)
            if relu:
                return lambda: torch.addmv(b1, w, x1, out=y1).relu_()
            return lambda: torch.addmv(b1, w, x1, out=y1)
        if relu:
            return lambda: torch.addmm(b, w, X, out=Y).relu_()
        return lambda: torch.addmm(b, w, X, out=Y)

    def tune_level(self, args: tuple, level: int, repeats: int, keys: set | None = None) -> dict:
        """Time each layer sparse vs dense at ``level`` on what will run; keep the faster.

        First layer by layer on its own input (the path a dense-chosen conv sends the call
        down); then, if the feature-major path will run, the Linear layers again inside it
        (there a sparse layer is ``spmm_t`` without transposes: a small classifier that loses
        batch-major wins feature-major). The whole-level check of ``PackedRuntime.tune`` follows.
        """
        x = args[0]
        if self.flatten_input:
            x = x.flatten(1)
        if self.kinds[0] == "linear" and x.dim() > 2 and not self._linear_bn:
            x = x.reshape(-1, x.shape[-1])  # as forward runs it
        x0, out, prev, unit_ms = x, {}, None, []
        for u, kind in zip(self.units, self.kinds):
            if kind == "linear" and prev == "conv":
                x = x.flatten(1)
            prev = kind
            layer = self._parts(u)[0]
            t = _median_times({w: (lambda w=w, x=x: u(x, force=w)) for w in ("sparse", "dense")}, repeats)
            k = _level_for(layer.name, layer.top)
            layer.mode[(k, x.shape[0])] = out[(layer.name, k)] = _faster(t)
            unit_ms.append(t[layer.mode[(k, x.shape[0])]])
            if keys is not None:
                keys.add((layer, x.shape[0]))
            x = u(x)
        fits = (x0.dtype == torch.float32 and x0.is_cpu
                and x0.dim() == (4 if self.kinds[0] == "conv" else 2))
        in_shape = tuple(x0.shape[1:])
        if not fits or self._plan_shapes(in_shape) is None:
            return out
        B = x0.shape[0]
        arg = _LEVEL.get()
        levels = arg if isinstance(arg, int) else tuple(self._levels())
        self._unit_only.discard((levels, B, None))
        bufs = self._act_buffers(B, in_shape)
        prog = self._compile(B, in_shape, None, bufs)
        if prog is None:  # a conv runs dense: the call goes layer by layer, as timed above
            return out
        self._load_input(x0, bufs[0], self._plan_shapes(in_shape)[0])
        for i, (u, kind) in enumerate(zip(self.units, self.kinds)):
            if kind == "conv":
                # the chain runs the feature-major kernel, not the one timed above: it must beat
                # the layer-by-layer pick too, or this level and batch go layer by layer (each
                # layer keeping the choice timed above)
                t_fm = _median_times({"fm": prog[i]}, repeats)["fm"]
                if t_fm >= 0.95 * unit_ms[i]:
                    self._unit_only.add((levels, B, None))
                    return out
                prog[i]()
                continue
            layer = self._parts(u)[0]
            t = _median_times({w: self._bind(i, u, bufs[i], bufs[i + 1], w) for w in ("sparse", "dense")}, repeats)
            k = _level_for(layer.name, layer.top)
            layer.mode[(k, B)] = out[(layer.name, k)] = _faster(t)
            if keys is not None:
                keys.add((layer, B))
            self._bind(i, u, bufs[i], bufs[i + 1], None)()  # the next layer's input, by the chosen path
        self._tune_one_call(x0, B, levels, out, repeats)
        return out

    def _tune_one_call(self, x: torch.Tensor, B: int, levels, out: dict, repeats: int) -> None:
        """A Linear-only chain whose layers are all sparse runs as one call (``_fused_linears``),
        which the per-layer timings above do not see: when some layer chose dense, time the whole
        chain both ways and, if the one call is at least 5% faster, make every layer sparse at
        this level and batch."""
        parts = [self._parts(u)[0] for u in self.units]
        ks = [_level_for(layer.name, layer.top) for layer in parts]
        if any(k != "linear" for k in self.kinds) or all(layer.choice(k, B) == "sparse" for layer, k in zip(parts, ks)):
            return
        fused = self._fused_linears(B, "sparse")
        if fused is None:
            return
        self._unit_only.discard((levels, B, None))
        t = _median_times({"one call": lambda: fused(x), "chosen": lambda: self.forward(x)}, repeats)
        if t["one call"] < 0.95 * t["chosen"]:
            for layer, k in zip(parts, ks):
                layer.mode[(k, B)] = out[(layer.name, k)] = "sparse"


LinearChain = FeatureMajorChain  # the name of its first, Linear-only form


class _OpenGate(nn.Module):
    """A gate that always lets its block run (a level's dense copy keeps only the blocks it runs)."""

    def active(self) -> bool:
        return True


class CallLevelGate(nn.Module):
    """Layer scheduling's gate in the runtime: its block runs when the call's level (for this
    block's name) is at least ``min_level``."""

    def __init__(self, name: str, gate: nn.Module) -> None:
        super().__init__()
        self.name, self.min_level, self.top = name, gate.min_level, gate.num_levels - 1

    def active(self) -> bool:
        return _level_for(self.name, self.top) >= self.min_level

    def extra_repr(self) -> str:
        return f"min_level={self.min_level}"


class LevelBatchNorm(nn.Module):
    """Inference BatchNorm with running statistics per level, picked by the call's level."""

    def __init__(self, name: str, bn: NestedBatchNorm) -> None:
        super().__init__()
        self.name, self.top, self.eps = name, bn.num_levels - 1, bn.eps
        n = bn.num_features
        self.register_buffer("weight", (bn.weight.detach() if bn.weight is not None else torch.ones(n)).float().clone())
        self.register_buffer("bias", (bn.bias.detach() if bn.bias is not None else torch.zeros(n)).float().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().float().clone())  # [L, C]
        self.register_buffer("running_var", bn.running_var.detach().float().clone())  # [L, C]

    @property
    def scale(self) -> torch.Tensor:
        """``[L, C]`` per-level multiplier of the folded affine map ``x * scale + shift``."""
        return self.weight / torch.sqrt(self.running_var + self.eps)

    @property
    def shift(self) -> torch.Tensor:
        """``[L, C]`` per-level offset of the folded affine map."""
        return self.bias - self.running_mean * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _level_for(self.name, self.top)
        # one fused eval-mode kernel, as plain nn.BatchNorm runs
        return F.batch_norm(x, self.running_mean[k], self.running_var[k], self.weight, self.bias, False, 0.0, self.eps)


class _OrtSlim:
    """A level's slim dense network run by ONNX Runtime on ``threads`` intra-op threads (a
    candidate of ``PackedRuntime.tune``)."""

    def __init__(self, session, sample_shape: tuple[int, ...], threads: int) -> None:
        self.session, self.sample_shape = session, sample_shape  # the export fixed all but the batch
        self.threads = threads

    @classmethod
    def build(cls, thin: nn.Module, example: torch.Tensor, threads: int) -> tuple[_OrtSlim, ...] | None:
        """Export ``thin`` in memory and open it on ``threads`` intra-op threads and, when that is
        more than one, on one as well (a small call -- batch 1 of a thin network -- runs faster
        on the calling thread alone than with a worker to wake: LeNet-5 at width 0.25, batch 1,
        the route 0.74x the time, ``benchmarks/results/ort_threads.md``). The sessions whose output
        on ``example`` matches PyTorch's; None when onnxruntime is missing, the export fails, or
        no session opens and matches."""
        import importlib.util  # noqa: PLC0415
        import io  # noqa: PLC0415

        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            return None
        from .onnx import _export, ort_session  # noqa: PLC0415

        buf = io.BytesIO()
        try:
            with torch.inference_mode():
                ref = thin(example)
            if not isinstance(ref, torch.Tensor):  # one tensor out (a tuple / dict: PyTorch runs it)
                return None
            _export(thin, example, buf)
        except Exception:  # noqa: BLE001 - a network we cannot export: PyTorch runs the slim network
            return None
        tol = 1e-5 * (1 + float(ref.abs().max()))
        nets = []
        for n in sorted({threads, 1}, reverse=True):
            try:
                net = cls(ort_session(buf.getvalue(), threads=n, spinning=False), tuple(example.shape[1:]), n)
                got = net(example)
            except Exception:  # noqa: BLE001 - a session we cannot use: the others (or PyTorch) run it
                continue
            if got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=tol):
                nets.append(net)
        return tuple(nets) or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": _as_numpy(x)})[0])


class PackedRuntime(nn.Module):
    """A packed model that runs any level per call: ``rt(x, level=k)`` or ``level={prefix: k}``.

    ``model`` is the architecture with its layers swapped for packed ones (what
    :func:`~nestedsparse.pack.onnx.dense_model_for_level` copies); ``graph`` the same modules
    traced by ``torch.fx`` with every packed layer's following BatchNorm / ReLU fused into it
    (``None`` when ``fuse=False`` or the model cannot be traced: then ``model`` runs as is), and
    regions of convs run depth-first per image (:mod:`~nestedsparse.pack.program`; off with
    ``programs=False``).
    """

    def __init__(self, model: nn.Module, spec: LevelSpec, fuse: bool = True, programs: bool = True) -> None:
        super().__init__()
        self.model, self.spec = model.eval(), spec
        self.names = [n for n, m in model.named_modules() if isinstance(m, (_SparseBase, LevelBatchNorm))]
        # a registered submodule even when None, so ``forward`` can read ``_modules["graph"]``
        self.register_module("graph", _fuse(model, programs) if fuse else None)
        # layer scheduling: which blocks run depends on the call's level, so the traced graph does
        # too -- one per set of running blocks (the gates' branch is resolved while tracing);
        # ``graph`` is the densest level's
        gates = [(n, m) for n, m in model.named_modules() if isinstance(m, CallLevelGate)]
        self._gates = [m for _, m in gates]
        self.names += [n for n, _ in gates]  # a per-call level map may name a gate
        self._graphs: dict[tuple, nn.Module | None] = {}
        # channel levels as thin dense networks (``tune``): level -> slim model (None: no gain
        # possible), and the (level, batch) pairs that run it
        self._slim_models: dict[int, nn.Module | None] = {}
        # (level, sample shape, kernel threads): its ONNX Runtime sessions (on that many threads and on one)
        self._slim_ort: dict[tuple, tuple[_OrtSlim, ...] | None] = {}
        self._slim_on: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}
        # graph -> (its code when looked at, _module_sequence(graph)); keyed by the object itself
        # (an id could be reused), checked against the graph's code and modules on every call
        self._seqs: dict[nn.Module, tuple] = {}
        if self._gates:  # traced now, every level: tracing patches nn.Module for the whole process,
            # so it must not happen while other threads run the model
            self._graphs[(True,) * len(self._gates)] = self.graph
            for k in range(spec.num_levels):
                token = _LEVEL.set(k)
                try:
                    key = tuple(g.active() for g in self._gates)
                    if key not in self._graphs:
                        self._graphs[key] = _fuse(model, programs) if fuse else None
                finally:
                    _LEVEL.reset(token)

    def __getstate__(self):
        # its caches hold locks, per-thread arenas and compiled-call state: the file is the way to copy it
        raise TypeError("a PackedRuntime cannot be pickled or deep-copied: save the PackedModel "
                        "(pack(model).save(path)) and load_packed(path) again for another copy")

    def _graph_now(self) -> nn.Module | None:
        """The traced graph for the blocks the current call's level runs; None (run the model's
        own forward) for a per-layer level map whose set of running blocks no level has."""
        if not self._gates:
            return self.graph
        return self._graphs.get(tuple(g.active() for g in self._gates))

    def forward(self, x: torch.Tensor, level: int | Mapping[str, int] | None = None) -> torch.Tensor:
        level = self.spec.num_levels - 1 if level is None else level
        if type(level) is not int or not 0 <= level < self.spec.num_levels:  # the common case costs nothing
            check_level_arg(self.spec, level, self.names, "packed")
        if self._slim_on and type(level) is int:
            thin = self._slim_on.get((level, x.shape[0]))
            if thin is not None and x.dtype == torch.float32 and x.is_cpu and (
                    type(thin) is not _OrtSlim or x.shape[1:] == thin.sample_shape):
                if type(thin) is not _OrtSlim:  # tune() found this level's slim dense network faster here
                    with torch.inference_mode():
                        return thin(x)
                try:
                    return thin(x)
                except Exception:  # noqa: BLE001 - ONNX Runtime failed on this call: drop the route, run packed
                    self._slim_on.pop((level, x.shape[0]), None)
        token = _LEVEL.set(level)
        try:
            with torch.inference_mode():
                # the traced graph's forward directly: GraphModule.__call__ adds a wrapper per call
                # (``_modules`` directly: ``self.graph`` goes through nn.Module.__getattr__, ~2 us a call)
                g = self._modules.get("graph") if not self._gates else self._graph_now()
                if g is None:
                    return self.model(x)
                entry, code = self._seqs.get(g), g.__dict__.get("_code")
                if entry is None or entry[0] is not code:  # new, or recompiled
                    if len(self._seqs) > 64:  # graphs swapped in and out: start over
                        self._seqs.clear()
                    entry = self._seqs[g] = (code, _module_sequence(g))
                seq = entry[1]
                if seq is not None and _plain_calls(g, seq):  # what the graph's code would do, minus
                    for _, m in seq:  # its attribute look-ups and call wrappers (~3-4 us a module)
                        x = m.forward(x)
                    return x
                return g.forward(x)
        finally:
            _LEVEL.reset(token)

    def sparse_layers(self) -> list[_SparseBase]:
        """The packed layers, in model order."""
        return [m for m in self.model.modules() if isinstance(m, _SparseBase)]

    def units(self) -> list[nn.Module]:
        """What runs each packed layer: :class:`FusedSparse` modules of ``graph``, else the layers."""
        if self.graph is None:
            return self.sparse_layers()
        graphs = [self.graph] if not self._gates else [g for g in self._graphs.values() if g is not None]
        out, seen = [], set()
        for g in graphs:
            for node in g.graph.nodes:
                mod = g.get_submodule(node.target) if node.op == "call_module" else None
                if isinstance(mod, (FusedSparse, _SparseBase, FeatureMajorChain, _program().PlaneProgram)) \
                        and id(mod) not in seen:
                    seen.add(id(mod))
                    out.append(mod)
        return out

    def uses_slim(self, level: int, batch: int) -> bool:
        """Whether ``rt(x, level=level)`` with ``batch`` samples runs the level's slim dense network."""
        return (level, batch) in self._slim_on

    def slim_backend(self, level: int, batch: int) -> str | None:
        """What runs the level's slim network at that batch size: ``"torch"``, ``"onnxruntime"``,
        or None (the packed path)."""
        got = self._slim_on.get((level, batch))
        return None if got is None else "onnxruntime" if isinstance(got, _OrtSlim) else "torch"

    def tune(self, example: torch.Tensor, levels=None, repeats: int = 7, slim: bool = True) -> dict:
        """Time sparse vs dense per layer and level on ``example``'s shapes; keep the faster.

        Returns ``{(layer name, level): choice}``. Sparse must be at least 5% faster; near-ties
        go to dense (it is the safe default).

        ``slim``: for a level that leaves whole channels unread (channel scheduling), also time
        its slim dense network (:func:`nestedsparse.structure.slim`: the thin network of that
        level's channels), run by PyTorch and, when ``onnxruntime`` is installed, by ONNX Runtime
        (exported in memory; a session on as many threads as the kernels, idle workers not
        spinning, and one on a single thread; used only if its output matches PyTorch's), against
        the packed path; the fastest runs at that level and batch size from now on if it is at
        least 5% faster than the packed path (``(SLIM, level): "slim"``, ``"slim-onnxruntime"`` or
        ``"slim-onnxruntime-1thread"`` in the result -- with one kernel thread there is only
        ``"slim-onnxruntime"``, on one thread --, :meth:`slim_backend`; float32 CPU inputs only, as
        the packed path). Building it traces the model with ``torch.fx``:
        like building the runtime, tune before other threads run PyTorch modules.
        """
        levels = list(range(self.spec.num_levels) if levels is None else levels)
        for k in levels:  # the packed path is what is tuned (and what the slim network must beat)
            self._slim_on.pop((k, example.shape[0]), None)
        inputs: dict[int, tuple] = {}
        units = self.units()
        hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(id(mod), a)) for m in units]
        out = {}
        try:
            for k in levels:
                inputs.clear()
                self(example, level=k)  # record each layer's input at this level
                token = _LEVEL.set(k)
                keys: set[tuple] = set()  # (layer, batch key) this level's tuning set
                try:
                    for m in units:
                        if id(m) not in inputs:
                            continue
                        args = inputs[id(m)]
                        if isinstance(m, (FeatureMajorChain, _program().PlaneProgram)):
                            out.update(m.tune_level(args, k, repeats, keys))
                            continue
                        layer = m.layer if isinstance(m, FusedSparse) else m
                        t = _median_times({w: (lambda w=w: m(*args, force=w)) for w in ("sparse", "dense")},
                                          repeats)
                        layer.mode[(k, args[0].shape[0])] = out[(layer.name, k)] = _faster(t)
                        keys.add((layer, args[0].shape[0]))
                finally:
                    _LEVEL.reset(token)
                self._guard_level(example, k, out, repeats, keys)
        finally:
            for h in hooks:
                h.remove()
        for k in levels:
            if slim:
                self._tune_slim(example, k, out, repeats)
            else:
                self._drop_unrouted_slim(k)
        for layer in self.sparse_layers():  # timing the dense path made a dense weight at every level
            layer.drop_unused_dense()
        return out

    def _drop_unrouted_slim(self, k: int) -> None:
        """Free level ``k``'s slim network when no batch size routes through it (a later tune
        rebuilds it); a level found to have none (None) stays known."""
        if not any(key[0] == k for key in self._slim_on):
            if self._slim_models.get(k) is not None:
                del self._slim_models[k]
            for key in [key for key, net in self._slim_ort.items() if key[0] == k and net is not None]:
                del self._slim_ort[key]

    def _slim_model(self, level: int, example: torch.Tensor) -> nn.Module | None:
        """Level ``level``'s slim dense network, or None when it drops no channel (or cannot be built)."""
        if level not in self._slim_models:
            from ..structure.slim import slim  # noqa: PLC0415
            from .onnx import dense_model_for_level  # noqa: PLC0415

            thin = None
            try:
                dense = dense_model_for_level(self, level)
                thin, rep = slim(dense, example, report=True)
                if rep.params_after >= rep.params_before:
                    thin = None
            except ValueError:  # not traceable, or an op slim does not follow: the packed path only
                thin = None
            self._slim_models[level] = thin
        return self._slim_models[level]

    def _slim_ort_nets(self, level: int, thin: nn.Module, example: torch.Tensor) -> tuple[_OrtSlim, ...] | None:
        """Level ``level``'s slim network as ONNX Runtime sessions for ``example``'s sample shape
        (rebuilt for another one; :meth:`_OrtSlim.build`), or None (no onnxruntime, the export
        fails, or its output does not match PyTorch's)."""
        threads = kernels._threads()
        key = (level, tuple(example.shape[1:]), threads)  # the export fixes the sample shape
        if key not in self._slim_ort:
            self._slim_ort[key] = _OrtSlim.build(thin, example, threads)
        return self._slim_ort[key]

    def _tune_slim(self, example: torch.Tensor, k: int, out: dict, repeats: int) -> None:
        thin = self._slim_model(k, example)
        if thin is None:
            return
        nets = {"slim": thin}
        threads = kernels._threads()
        for net in self._slim_ort_nets(k, thin, example) or ():  # "slim-onnxruntime": the kernels' threads
            nets["slim-onnxruntime" + ("" if net.threads == threads else f"-{net.threads}thread")] = net
        fns = {"packed": lambda: self(example, level=k)}
        fns.update({name: (lambda net=net: net(example)) for name, net in nets.items()})
        t = _median_times(fns, repeats)
        best = min(nets, key=t.__getitem__)
        if t[best] < 0.95 * t["packed"]:
            self._slim_on[(k, example.shape[0])] = nets[best]
            out[(SLIM, k)] = best
        else:
            self._drop_unrouted_slim(k)


    def _guard_level(self, example: torch.Tensor, k: int, out: dict, repeats: int, keys: set) -> None:
        """Whole-model check of level ``k``'s per-layer picks: if running every layer dense is
        faster (per-layer wins need not add up: caches, thread hand-offs), keep all dense.
        ``keys``: the (layer, batch key) pairs this level's tuning set (a layer fed a reshaped
        ``[N*T, K]`` input is keyed by ``N*T``, not the example's batch)."""
        layers = [(m, b) for m, b in keys if m.mode.get((k, b)) == "sparse"]
        if not layers:
            return

        def set_all(way: str) -> None:
            for m, b in layers:
                m.mode[(k, b)] = way

        times = {}
        for way in ("sparse", "dense"):
            set_all(way)
            times[way] = _median_times({way: lambda: self(example, level=k)}, repeats)[way]
        set_all("sparse" if times["sparse"] <= times["dense"] else "dense")
        if times["sparse"] > times["dense"]:
            out.update({(m.name, k): "dense" for m, _ in layers})


def _pad_shortcut_of(node: torch.fx.Node) -> tuple[torch.fx.Node, int, int, int] | None:
    """``(x, stride, before, after)`` when ``node`` is ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0,
    before, after))`` with zero fill (the option-A ResNet shortcut written inline, as in the
    common CIFAR ResNets' ``LambdaLayer``) and the slice feeds nothing else; else None."""
    if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad) or len(node.args) < 2:
        return None
    g, pads = node.args[0], node.args[1]
    extra = dict(zip(("mode", "value"), node.args[2:]), **node.kwargs)
    if set(extra) - {"mode", "value"} or extra.get("mode", "constant") != "constant" or extra.get("value") not in (
            None, 0, 0.0):
        return None
    if not (isinstance(pads, (tuple, list)) and len(pads) == 6 and all(type(p) is int for p in pads)
            and tuple(pads[:4]) == (0, 0, 0, 0) and min(pads[4:]) >= 0):
        return None
    if not (isinstance(g, torch.fx.Node) and g.op == "call_function" and g.target is operator.getitem
            and len(g.users) == 1 and isinstance(g.args[0], torch.fx.Node) and isinstance(g.args[1], tuple)
            and len(g.args[1]) == 4 and all(isinstance(sl, slice) for sl in g.args[1])):
        return None
    a, b, h, w = g.args[1]
    if any(sl != slice(None) for sl in (a, b)) or h != w or h.start is not None or h.stop is not None:
        return None
    stride = 1 if h.step is None else h.step
    if type(stride) is not int or stride < 1:
        return None
    return g.args[0], stride, pads[4], pads[5]


def _inline_pad_shortcuts(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> bool:
    """Each inline option-A shortcut (:func:`_pad_shortcut_of`) becomes a call of a
    :class:`~nestedsparse.models.resnet.PadShortcut`, so a depth-first program can take it."""
    from ..models.resnet import PadShortcut  # noqa: PLC0415

    made = False
    for i, node in enumerate(list(graph.nodes)):
        got = _pad_shortcut_of(node)
        if got is None:
            continue
        x, stride, before, after = got
        name = f"_padshortcut{i}"
        while name in modules:  # never shadow a module of the model's own
            name = "_" + name
        modules[name] = PadShortcut(0, before + after, stride, before=before)
        with graph.inserting_before(node):
            new = graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        g = node.args[0]
        graph.erase_node(node)
        graph.erase_node(g)
        made = True
    return made


def _drop_pass_through(graph: torch.fx.Graph, modules: Mapping[str, nn.Module]) -> bool:
    """Remove the modules that are the identity at inference (``nn.Identity``, dropout: the runtime
    only infers), so what they separate can fuse -- a classifier behind a dropout joins the conv
    program before it."""
    made = False
    for node in list(graph.nodes):
        if (node.op == "call_module" and type(modules.get(node.target)) in _PASS_THROUGH and len(node.args) == 1
                and not node.kwargs and isinstance(node.args[0], torch.fx.Node)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            made = True
    return made


class _LeafTracer(torch.fx.Tracer):
    """Traces the model's own code; packed layers, per-level BatchNorms and the option-A ResNet
    shortcut (a depth-first program op) stay leaf calls. A block under layer scheduling is traced
    through or left out, as the level being traced runs it or not."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from ..models.resnet import PadShortcut  # noqa: PLC0415

        return isinstance(m, (_SparseBase, LevelBatchNorm, PadShortcut)) or super().is_leaf_module(m, qualname)


def _is_relu(node: torch.fx.Node, src: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """True when ``node`` is exactly ``relu(src)`` (module, function or method form)."""
    if not node.args or node.args[0] is not src or len(node.args) > 1:
        return False
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_, F.relu_) and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs


def _max_pool_size(node: torch.fx.Node, src: torch.fx.Node, modules: Mapping[str, nn.Module]) -> int:
    """``k`` when ``node`` is a plain ``k x k`` / stride ``k`` max-pool of ``src`` (no padding,
    dilation, ceil mode or indices), else 1."""
    if not node.args or node.args[0] is not src:
        return 1
    if node.op == "call_module" and type(modules.get(node.target)) is nn.MaxPool2d and len(node.args) == 1:
        m = modules[node.target]
        ks, st, pad, dil = m.kernel_size, m.stride, m.padding, m.dilation
        ceil, idx = m.ceil_mode, m.return_indices
    elif node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        vals = dict(zip(names, node.args[1:]))
        vals.update(node.kwargs)
        if set(vals) - set(names) or "kernel_size" not in vals:
            return 1
        ks = vals["kernel_size"]
        st = vals.get("stride") or ks
        pad, dil = vals.get("padding", 0), vals.get("dilation", 1)
        ceil, idx = vals.get("ceil_mode", False), vals.get("return_indices", False)
    else:
        return 1
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    try:
        ks, st, pad, dil = pair(ks), pair(st), pair(pad), pair(dil)
    except TypeError:
        return 1
    if not all(isinstance(v, int) for v in ks + st + pad + dil):
        return 1
    if ks[0] != ks[1] or st != ks or pad != (0, 0) or dil != (1, 1) or ceil or idx or ks[0] < 2:
        return 1
    return ks[0]


def _residual_of(node: torch.fx.Node, src: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand when ``node`` is ``src + other`` (a node), else None. In-place forms
    (``src += other``, ``src.add_(other)``) only with ``src`` on the left: ``other += src`` would
    also change ``other`` for its later readers, which the fused call does not."""
    inplace = (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_")
    add = inplace or (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target == "add")
    if not add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is src else (a if b is src and not inplace else None)
    if not isinstance(other, torch.fx.Node) or other is src:
        return None
    return other


def _module_sequence(g: nn.Module) -> tuple[tuple[str, nn.Module], ...] | None:
    """``(name, module)`` of the modules a traced graph calls one after the other, each on the
    previous one's output alone (input -> modules -> output, as a LeNet or ResNet runtime's graph
    of programs and chains is), or None for any other graph."""
    graph = getattr(g, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    prev, mods = nodes[0], []
    for n in nodes[1:-1]:
        if n.op != "call_module" or n.args != (prev,) or n.kwargs or len(prev.users) != 1:
            return None
        if "." in n.target:  # a nested module: _plain_calls checks the graph's direct children only
            return None
        mods.append((n.target, g.get_submodule(n.target)))
        prev = n
    if nodes[-1].args != (prev,) or len(prev.users) != 1:
        return None
    return tuple(mods)


def _plain_calls(g: nn.Module, mods: tuple[tuple[str, nn.Module], ...]) -> bool:
    """Whether calling each of ``g``'s modules ``mods`` by its ``forward`` is all the graph's code
    would do: they are still ``g``'s modules under those names, and ``Module.__call__`` would take
    its own fast path -- no hooks (the modules' or global ones), no ``torch.compile`` wrapper, no
    JIT tracing. (``tune`` records each unit's input through a hook, so it takes the full path.)"""
    if (_nn_module._global_forward_pre_hooks or _nn_module._global_forward_hooks
            or _nn_module._global_backward_pre_hooks or _nn_module._global_backward_hooks
            or torch._C._get_tracing_state()):
        return False
    children = g._modules
    return not any(children.get(name) is not m or m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                   or m._backward_hooks or m._compiled_call_impl is not None for name, m in mods)


def _fuse(model: nn.Module, programs: bool = True) -> nn.Module | None:
    """``model`` traced by ``torch.fx``, each packed layer merged with the BatchNorm and/or ReLU
    that alone consume its output; ``None`` if the model cannot be traced symbolically
    (data-dependent control flow): the runtime then runs the model's own ``forward``.
    ``programs``: conv regions become depth-first :class:`~nestedsparse.pack.program.PlaneProgram`
    modules (before the feature-major chains take what is left)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure just means "run unfused"
        return None
    modules = dict(model.named_modules())
    fused_any = _drop_pass_through(graph, modules)
    fused_any |= _inline_pad_shortcuts(graph, modules)
    for i, node in enumerate(list(graph.nodes)):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, _SparseBase) or node.kwargs or len(node.args) != 1:
            continue
        out, bn, relu = node, None, False
        users = list(out.users)
        if (len(users) == 1 and users[0].op == "call_module" and len(users[0].args) == 1 and not users[0].kwargs
                and isinstance(modules.get(users[0].target), LevelBatchNorm)
                and modules[users[0].target].weight.shape[0] == layer.csr.shape[0]):
            bn = modules[users[0].target]
            out = users[0]
        users = list(out.users)
        other = _residual_of(users[0], out) if len(users) == 1 else None
        if other is not None:
            out = users[0]
            users = list(out.users)
        if len(users) == 1 and _is_relu(users[0], out, modules):
            relu = True
            out = users[0]
            users = list(out.users)
        pool = 1
        if other is None and layer.pl.kind == "conv2d" and len(users) == 1:
            pool = _max_pool_size(users[0], out, modules)
            if pool > 1:
                out = users[0]
                users = list(out.users)
                if not relu and len(users) == 1 and _is_relu(users[0], out, modules):  # relu(pool(y)) == pool(relu(y))
                    relu = True
                    out = users[0]
        if bn is None and not relu and other is None and pool == 1:
            continue
        name = f"_fused{i}_{node.target.replace('.', '_')}"
        with graph.inserting_before(out):  # where the residual (computed after the layer, maybe) exists
            new = graph.call_module(name, node.args + (() if other is None else (other,)))
        modules[name] = FusedSparse(layer, bn, relu, other is not None, pool)
        out.replace_all_uses_with(new)
        _erase_chain(graph, node, out)
        fused_any = True
    if programs:  # conv regions first: measured faster than a feature-major chain on LeNet-5 and ResNets
        fused_any |= _program().plane_programs(graph, modules)
    fused_any |= _chain_linears(graph, modules)
    if not fused_any:
        return None
    for node in graph.nodes:  # parameters / buffers the model's code reads directly
        if node.op == "get_attr" and node.target not in modules:
            modules[node.target] = _get_attr(model, node.target)
    graph.lint()
    # a dict root: the GraphModule takes exactly the modules the graph calls (shared, not copied)
    return torch.fx.GraphModule(modules, graph, class_name="FusedPacked").eval()


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout)  # identity at inference


def _chain_linears(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> bool:
    """Merge runs of >= 2 packed units -- Conv2d (with at least :data:`FM_MIN_TAPS` taps per
    output channel) then Linear -- each the only consumer of the previous one's output, into
    :class:`FeatureMajorChain` modules. Inference-time identities (Dropout, Identity) in between
    are dropped; a Flatten is absorbed between a conv and a Linear. Returns True if any chain
    was made."""

    def unit_kind(node: torch.fx.Node) -> str | None:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        mod = modules.get(node.target)
        if isinstance(mod, FusedSparse):
            if mod.residual:
                return None
            mod = mod.layer
        if isinstance(mod, SparseLinear):
            return "linear"
        if isinstance(mod, SparseConv) and mod.pl.kind == "conv2d":
            _, cg, kh, kw = mod.geo.wshape
            return "conv" if cg * kh * kw >= FM_MIN_TAPS else None
        return None

    def is_flatten(node: torch.fx.Node, src: torch.fx.Node) -> bool:
        return bool(node.args) and node.args[0] is src and _is_flatten1(node, modules)

    def next_unit(node: torch.fx.Node, kind: str) -> tuple[torch.fx.Node | None, list[torch.fx.Node]]:
        skipped, flat = [], False
        while len(node.users) == 1:
            user = next(iter(node.users))
            uk = unit_kind(user) if user.args and user.args[0] is node else None
            if uk == "linear" and (kind == "linear" or flat):
                return user, skipped
            if uk == "conv" and kind == "conv" and not flat:
                return user, skipped
            if user.op == "call_module" and isinstance(modules.get(user.target), _PASS_THROUGH) \
                    and user.args and user.args[0] is node and len(user.args) == 1 and not user.kwargs:
                skipped.append(user)
                node = user
                continue
            if kind == "conv" and not flat and is_flatten(user, node):
                skipped.append(user)
                flat = True
                node = user
                continue
            break
        return None, []

    made = False
    in_chain: set[torch.fx.Node] = set()
    for node in list(graph.nodes):
        if node in in_chain or unit_kind(node) is None:
            continue
        chain, dead = [node], []
        while True:
            nxt, skipped = next_unit(chain[-1], unit_kind(chain[-1]))
            if nxt is None:
                break
            dead += skipped
            chain.append(nxt)
        if len(chain) < 2:
            continue
        in_chain.update(chain)
        name = f"_chain{len(modules)}_{chain[0].target.replace('.', '_')}"
        fm = modules[name] = FeatureMajorChain([modules[n.target] for n in chain])
        args = chain[0].args
        src = args[0]
        if (fm.kinds[0] == "linear" and isinstance(src, torch.fx.Node) and len(src.users) == 1 and src.args
                and isinstance(src.args[0], torch.fx.Node) and is_flatten(src, src.args[0])):
            fm.flatten_input = True  # the chain flattens its input itself: one module call less
            args = (src.args[0],)
            dead.append(src)
        with graph.inserting_before(chain[-1]):
            new = graph.call_module(name, args)
        chain[-1].replace_all_uses_with(new)
        for n in sorted(chain + dead, key=lambda n: -_position(graph, n)):
            graph.erase_node(n)
        made = True
    return made


def _is_flatten1(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """``node`` is a flatten from dim 1 to the end (module, function or method form)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and len(node.args) == 1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        rest = dict(zip(("start_dim", "end_dim"), node.args[1:]), **node.kwargs)
        return rest.get("start_dim", 0) == 1 and rest.get("end_dim", -1) == -1 and set(rest) <= {"start_dim", "end_dim"}
    return False


def _position(graph: torch.fx.Graph, node: torch.fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _erase_chain(graph: torch.fx.Graph, first: torch.fx.Node, last: torch.fx.Node) -> None:
    """Erase the now-unused nodes ``first -> ... -> last`` (each the single user of the previous)."""
    chain = [first]
    while chain[-1] is not last:
        chain.append(next(iter(chain[-1].users)))
    for n in reversed(chain):
        graph.erase_node(n)


def _faster(t: Mapping[str, float]) -> str:
    """The path to keep from ``{"sparse": s, "dense": d}`` timings: sparse must win clearly (by 5%);
    a near-tie on a noisy machine keeps the dense path, the safe default."""
    return "sparse" if t["sparse"] < 0.95 * t["dense"] else "dense"


def _median_times(fns: Mapping[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per function, calls interleaved so machine drift hits each alike."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in ts.items()}


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def runtime_from_packed(packed: PackedModel, model: nn.Module) -> PackedRuntime:
    """Swap ``model``'s layers for packed ones (``model`` must be the architecture the file was made from)."""
    from torch.nn.utils import parametrize

    nestify_(model, packed.spec)
    if packed.depth:  # layer scheduling: gate the blocks, their gates then read the call's level
        from ..structure.depth import gate_blocks_  # noqa: PLC0415

        try:  # the shape check runs when the model names its input shape (the registry's do; the
            # model's own, not the file's: a file's shape must not size a forward at load time)
            gate_blocks_(model, packed.depth, check=hasattr(model, "input_shape"))
        except (ValueError, RuntimeError) as e:
            raise PackedFormatError(f"layer schedule does not fit the model: {e}") from None
    if packed.input_shape is not None:  # the data's sample shape (a ResNet's default is 32x32)
        model.input_shape = tuple(packed.input_shape)
    nested = {name: mod for name, mod, _ in iter_nested(model)}
    if set(nested) != set(packed.layers):
        raise PackedFormatError(f"file layers {sorted(packed.layers)} do not match the model's {sorted(nested)}")
    dense_state = {k: v for k, v in model.state_dict().items() if ".parametrizations.weight." not in k}
    _check_dense(packed.dense, dense_state)
    model.load_state_dict(packed.dense, strict=False)
    built: dict[str, _SparseBase] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        owner = packed.ties.get(name, name)
        if owner not in packed.layers or not parametrize.is_parametrized(mod, "weight"):
            continue
        pl = packed.layers[owner]
        if tuple(mod.parametrizations.weight.original.shape) != pl.weight_shape:
            raise PackedFormatError(f"layer {name!r}: file weight {pl.weight_shape} != model "
                                    f"{tuple(mod.parametrizations.weight.original.shape)}")
        _check_geometry(name, mod, pl)
        cls = SparseLinear if pl.kind == "linear" else SparseConv
        built[name] = cls(name, pl, mod.bias)
        _set_child(model, name, built[name])
    from ..structure.depth import LevelGate  # noqa: PLC0415

    for name, bn in list(model.named_modules()):
        if isinstance(bn, NestedBatchNorm):
            _set_child(model, name, LevelBatchNorm(name, bn))
        elif isinstance(bn, LevelGate):
            _set_child(model, name, CallLevelGate(name, bn))
    return PackedRuntime(model, packed.spec)


def _check_dense(file: dict, model: dict) -> None:
    missing, unexpected = sorted(set(model) - set(file)), sorted(set(file) - set(model))
    if missing or unexpected:
        raise PackedFormatError(f"dense tensors do not fit the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, t in file.items():
        if t.shape != model[k].shape or t.dtype != model[k].dtype:
            raise PackedFormatError(f"dense tensor {k!r} is {t.dtype}{tuple(t.shape)}, the model needs "
                                    f"{model[k].dtype}{tuple(model[k].shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackedFormatError(f"dense tensor {k!r} holds NaN or Inf")


def _check_geometry(name: str, mod: nn.Module, pl: PackedLayer) -> None:
    if pl.kind == "linear":
        return
    own = (tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation), int(mod.groups))
    got = (pl.stride, pl.padding, pl.dilation, pl.groups)
    if own != got:
        raise PackedFormatError(f"layer {name!r}: file geometry (stride, padding, dilation, groups)={got} != model {own}")


def load_packed(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None) -> PackedRuntime:
    """Read and check a packed file, return a :class:`PackedRuntime` that runs any level.

    Args:
        path: a file written by ``PackedModel.save``.
        model_factory: builds the (untrained) architecture; default: the registry model the
            file names (``models.create(name, **kwargs)``, collapsed by the file's layer-sparsity
            recipe if it has one).

    Build runtimes before other threads start running PyTorch modules (or in another process):
    building one traces the model with ``torch.fx``, which patches ``nn.Module`` for the whole
    process while it runs, so a module called from another thread meanwhile fails. Calls on a
    built runtime never trace.

    Example::

        rt = load_packed("lenet5.nsp")
        logits = rt(x, level=0)
    """
    packed = read_packed(path)
    if model_factory is None:
        from ..structure import create_model

        if not packed.model_name:
            raise PackedFormatError(f"{path}: names no registry model; pass model_factory")
        try:
            model = create_model(packed.model_name, packed.model_kwargs, packed.collapse)
        except (TypeError, ValueError) as e:
            raise PackedFormatError(f"{path}: cannot build model {packed.model_name!r} ({e})") from None
    else:
        model = model_factory()
    return runtime_from_packed(packed, model)
