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
import os
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..levels import LevelSpec
from ..nest import NestedBatchNorm, _resolve, check_level_arg, iter_nested, nestify_
from . import kernels
from .csr import NestedCSR, to_dense
from .format import PackedFormatError, PackedLayer, PackedModel, read_packed

__all__ = ["PackedRuntime", "SparseLinear", "SparseConv", "LevelBatchNorm", "load_packed", "runtime_from_packed"]

_LEVEL: contextvars.ContextVar = contextvars.ContextVar("nestedsparse_level", default=None)


def _level_for(name: str, top: int) -> int:
    arg = _LEVEL.get()
    if arg is None:
        return top
    return _resolve(name, arg, top) if isinstance(arg, Mapping) else arg


class _SparseBase(nn.Module):
    def __init__(self, name: str, pl: PackedLayer, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.name, self.pl, self.csr = name, pl, pl.csr
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.top = pl.csr.num_levels - 1
        self.mode: dict[tuple[int, int], str] = {}  # (level, batch) -> "sparse" | "dense", set by tune()
        self._dense: dict[int, torch.Tensor] = {}

    def dense_weight(self, level: int) -> torch.Tensor:
        """The level's weight as a dense tensor (materialised once per level, on first use)."""
        w = self._dense.get(level)
        if w is None:
            w = torch.from_numpy(to_dense(self.csr, level)).reshape(self.pl.weight_shape)
            self._dense[level] = w
        return w

    def _dense_args(self, level: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.dense_weight(level), self.bias
        if w.dtype != x.dtype or w.device != x.device:  # converted only when the input asks for it
            w = w.to(x.device, x.dtype)
            b = None if b is None else b.to(x.device, x.dtype)
        return w, b

    def choice(self, level: int, batch: int) -> str:
        """``"sparse"`` or ``"dense"`` for this level and batch size."""
        got = self.mode.get((level, batch))
        return got if got is not None else kernels.choose(self.csr, level, batch)

    def forward(self, x: torch.Tensor, force: str | None = None) -> torch.Tensor:
        k = _level_for(self.name, self.top)
        way = force or self.choice(k, x.shape[0])
        if way == "dense" or x.dtype != torch.float32 or x.device.type != "cpu":
            return self._dense_forward(x, k)
        return self._sparse_forward(x, k)

    def extra_repr(self) -> str:
        return f"{self.pl.kind}, shape={self.pl.weight_shape}, levels={self.csr.num_levels}, dtype={self.csr.dtype}"


class SparseLinear(_SparseBase):
    """A nested Linear run from its NestedCSR at the call's level."""

    def _dense_forward(self, x, k):
        w, b = self._dense_args(k, x)
        return F.linear(x, w, b)

    def _sparse_forward(self, x, k):
        lead = x.shape[:-1]
        y = kernels.spmm(self.csr, x.reshape(-1, x.shape[-1]), k, bias=self.bias)
        return y.reshape(*lead, y.shape[-1])


class SparseConv(_SparseBase):
    """A nested Conv1d / Conv2d run from its NestedCSR at the call's level."""

    def _geo(self):
        pl = self.pl
        if pl.kind == "conv1d":
            return (1, *pl.stride), (0, *pl.padding), (1, *pl.dilation), (*pl.weight_shape[:2], 1, pl.weight_shape[2])
        return pl.stride, pl.padding, pl.dilation, pl.weight_shape

    def _dense_forward(self, x, k):
        w, b = self._dense_args(k, x)
        conv = F.conv1d if self.pl.kind == "conv1d" else F.conv2d
        return conv(x, w, b, self.pl.stride, self.pl.padding, self.pl.dilation, self.pl.groups)

    def _sparse_forward(self, x, k):
        stride, padding, dilation, wshape = self._geo()
        x4 = x.unsqueeze(2) if self.pl.kind == "conv1d" else x
        y = kernels.sparse_conv2d(self.csr, x4, k, wshape, stride, padding, dilation, self.pl.groups, bias=self.bias)
        return y.squeeze(2) if self.pl.kind == "conv1d" else y


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


class PackedRuntime(nn.Module):
    """A packed model that runs any level per call: ``rt(x, level=k)`` or ``level={prefix: k}``."""

    def __init__(self, model: nn.Module, spec: LevelSpec) -> None:
        super().__init__()
        self.model, self.spec = model.eval(), spec
        self.names = [n for n, m in model.named_modules() if isinstance(m, (_SparseBase, LevelBatchNorm))]

    def forward(self, x: torch.Tensor, level: int | Mapping[str, int] | None = None) -> torch.Tensor:
        level = self.spec.num_levels - 1 if level is None else level
        check_level_arg(self.spec, level, self.names, "packed")
        token = _LEVEL.set(level)
        try:
            with torch.inference_mode():
                return self.model(x)
        finally:
            _LEVEL.reset(token)

    def sparse_layers(self) -> list[_SparseBase]:
        """The packed layers, in model order."""
        return [m for m in self.model.modules() if isinstance(m, _SparseBase)]

    def tune(self, example: torch.Tensor, levels=None, repeats: int = 7) -> dict:
        """Time sparse vs dense per layer and level on ``example``'s shapes; keep the faster.

        Returns ``{(layer name, level): choice}``. Sparse must be at least 5% faster; near-ties
        go to dense (it is the safe default).
        """
        levels = range(self.spec.num_levels) if levels is None else levels
        inputs: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(mod.name, a[0]))
                 for m in self.sparse_layers()]
        out = {}
        try:
            for k in levels:
                inputs.clear()
                self(example, level=k)  # record each layer's input at this level
                token = _LEVEL.set(k)
                try:
                    for m in self.sparse_layers():
                        x = inputs[m.name]
                        t = _median_times({w: (lambda w=w: m(x, force=w)) for w in ("sparse", "dense")}, repeats)
                        # sparse must win clearly: a near-tie on a noisy machine keeps the dense path
                        m.mode[(k, x.shape[0])] = out[(m.name, k)] = "sparse" if t["sparse"] < 0.95 * t["dense"] else "dense"
                finally:
                    _LEVEL.reset(token)
        finally:
            for h in hooks:
                h.remove()
        return out


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
    for name, bn in list(model.named_modules()):
        if isinstance(bn, NestedBatchNorm):
            _set_child(model, name, LevelBatchNorm(name, bn))
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
            file names (``models.create(name, **kwargs)``).

    Example::

        rt = load_packed("lenet5.nsp")
        logits = rt(x, level=0)
    """
    packed = read_packed(path)
    if model_factory is None:
        from .. import models

        if not packed.model_name:
            raise PackedFormatError(f"{path}: names no registry model; pass model_factory")
        try:
            model = models.create(packed.model_name, **packed.model_kwargs)
        except (TypeError, ValueError) as e:
            raise PackedFormatError(f"{path}: cannot build model {packed.model_name!r} ({e})") from None
    else:
        model = model_factory()
    return runtime_from_packed(packed, model)
