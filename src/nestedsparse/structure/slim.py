"""Slim a level into a smaller dense network: drop every channel that only zero weights read.

A channel-scheduled level (NestedNet, :mod:`.width`) is a thinner network, but as a level of
the nested model it still runs at full width with zeros in the dropped channels' weights.
:func:`slim` rebuilds such a model with the dropped channels really gone -- fewer output
channels in the layers that produce them, fewer input channels in the layers that read them,
and the BatchNorms and depthwise convs between them sliced alike -- so the level is a smaller
*dense* network that any engine (PyTorch, ONNX Runtime, a phone's NN runtime) runs faster, with
no sparse kernel. It is not tied to channel scheduling: any plain model whose weights leave whole
channels unread (group-lasso, width x sparsity, hand pruning) is slimmed the same way.

How (``torch.fx`` with shapes from one example input): values are followed from layer to
layer through ops that keep channels where they are (activations, pools, dropout, BatchNorm,
depthwise convs, flatten, spatial means, elementwise sums and products -- a residual sum joins
its two operands' channels into one *channel space*). A channel of a space goes when every
Linear / Conv reading it reads it only with zero weights. A space stays whole when it reaches
the model's output or comes from its input, or when any op on it is not one of those (``cat``,
``permute``, softmax over channels, a hard-coded reshape, a parameter added to it, a module
called twice or with tied weights, a grouped non-depthwise conv ...) -- never wrong, only less
slim. The result is checked against the model on the example input before it is returned.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .width import _is_shape_value

__all__ = ["slim", "slim_model", "SlimReport"]

#: relative tolerance of the check of the slim model against the original
TOLERANCE = 1e-4

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                        nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
                        nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                        nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
                        nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu,
                          torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh,
                          F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d,
                          F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.clamp, torch.clip}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
                        "clip_", "contiguous", "float", "clone", "detach"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
           torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPES = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_REDUCE = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}


@dataclass
class SlimReport:
    """What :func:`slim` kept: per layer, output channels / input channels before and after."""

    layers: dict[str, dict] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def rows(self) -> list[dict]:
        return [{"layer": k, **v} for k, v in self.layers.items()]


@dataclass
class _Info:
    """A traced value's channels: channel space ``space``; a 2-D value's feature ``f`` is channel
    ``f // stride`` (a flattened ``[C, H, W]`` map has ``stride = H*W``)."""

    space: int
    stride: int = 1


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)) or super().is_leaf_module(m, qualname)


class _Spaces:
    """Union-find over channel spaces, with their sizes and the ones that must stay whole."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: set[int] = set()

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:  # cannot be one channel space: keep both whole
            self.fix(ra)
            self.fix(rb)
            return ra
        self.parent[rb] = ra
        if rb in self.fixed:
            self.fixed.add(ra)
        return ra

    def fix(self, s: int) -> None:
        self.fixed.add(self.find(s))

    def is_fixed(self, s: int) -> bool:
        return self.find(s) in self.fixed


def _shape(n: fx.Node) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _reduce_dims(n: fx.Node, ndim: int) -> tuple[int, ...] | None:
    dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    if dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % ndim for d in dims)


class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.sp = _Spaces()
        self.info: dict[fx.Node, _Info | None] = {}
        self.producers: dict[int, list[str]] = {}  # space id at creation -> layers writing its channels
        self.aligned: list[tuple[str, int]] = []  # (module, space): sliced with its channels (BN, depthwise)
        self.consumers: list[tuple[str, int, int]] = []  # (layer, space, stride)
        self.calls: dict[str, int] = {}

    # -- helpers
    def _tensor_args(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if not _is_shape_value(a)]

    def _fix_inputs(self, n: fx.Node) -> None:
        for a in self._tensor_args(n):
            i = self.info.get(a)
            if i is not None:
                self.sp.fix(i.space)

    def _same(self, n: fx.Node, src: fx.Node) -> _Info | None:
        """``n`` keeps ``src``'s channels where they are (checked on the shapes); another tensor
        operand anywhere in the call (``torch.clamp(y, min=z)``) keeps its channels whole."""
        i, si, so = self.info.get(src), _shape(src), _shape(n)
        other = any(a is not src for a in self._tensor_args(n))
        if other or i is None or si is None or so is None or len(so) < 2 or len(si) < 2 or si[1] != so[1]:
            self._fix_inputs(n)
            return None
        return i

    # -- the walk
    def run(self) -> None:
        for n in self.gm.graph.nodes:
            self.info[n] = self._visit(n)

    def _visit(self, n: fx.Node) -> _Info | None:
        shape = _shape(n)
        if n.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            s = self.sp.new(shape[1])
            self.sp.fix(s)
            return _Info(s)
        if n.op == "output":
            self._fix_inputs(n)
            return None
        if n.op == "get_attr" or _is_shape_value(n):
            return None
        if n.op == "call_module":
            return self._module(n, self.gm.get_submodule(n.target), shape)
        if n.op == "call_function":
            return self._function(n, n.target, shape)
        if n.op == "call_method":
            return self._method(n, n.target, shape)
        self._fix_inputs(n)
        return None

    def _module(self, n: fx.Node, mod: nn.Module, shape) -> _Info | None:
        name = str(n.target)
        self.calls[name] = self.calls.get(name, 0) + 1
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
        if isinstance(mod, (nn.Linear, _ConvNd)) and src is not None and not transposed:
            if isinstance(mod, _ConvNd) and mod.groups > 1:
                if mod.groups == mod.in_channels == mod.out_channels and mod.weight.shape[1] == 1:
                    i = self._same(n, src)  # depthwise: output channel c reads input channel c only
                    if i is not None:
                        self.aligned.append((name, i.space))
                    return i
                self._fix_inputs(n)
                return None
            i = self.info.get(src)
            if i is not None:
                n_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                flat = isinstance(mod, _ConvNd) or len(_shape(src) or ()) == 2  # a Linear's features on dim 1
                if flat and n_in == self.sp.size[self.sp.find(i.space)] * i.stride:
                    self.consumers.append((name, i.space, i.stride))
                else:  # reads its input some other way: keep those channels whole
                    self.sp.fix(i.space)
            if shape is None or len(shape) < 2:
                return None
            s = self.sp.new(shape[1] if isinstance(mod, _ConvNd) else shape[-1])
            self.producers.setdefault(s, []).append(name)
            if isinstance(mod, nn.Linear) and len(shape) != 2:  # features not on dim 1: keep whole
                self.sp.fix(s)
            return _Info(s)
        if isinstance(mod, _BatchNorm) and src is not None:
            i = self._same(n, src)
            if i is not None:
                if i.stride != 1:
                    self.sp.fix(i.space)
                self.aligned.append((name, i.space))
            return i
        if isinstance(mod, _ELEMENTWISE_MODULES) and src is not None:
            return self._same(n, src)
        if isinstance(mod, nn.Flatten) and src is not None:
            return self._flatten(n, src, mod.start_dim == 1 and mod.end_dim == -1)
        self._fix_inputs(n)
        return None

    def _flatten(self, n: fx.Node, src: fx.Node, plain: bool) -> _Info | None:
        """``[N, C, *spatial] -> [N, C * prod(spatial)]``: feature f is channel f // prod(spatial)."""
        i, si, so = self.info.get(src), _shape(src), _shape(n)
        if i is None or si is None or so is None:
            self._fix_inputs(n)
            return None
        if si == so:
            return i
        if not plain or len(so) != 2 or len(si) < 3 or i.stride != 1 or so[0] != si[0]:
            self._fix_inputs(n)
            return None
        spatial = 1
        for d in si[2:]:
            spatial *= d
        return _Info(i.space, spatial)

    def _binary(self, n: fx.Node) -> _Info | None:
        args = self._tensor_args(n)  # positional or keyword (torch.add(y, other=z))
        infos = [self.info.get(a) for a in args]
        shape = _shape(n)
        if not args or any(i is None for i in infos) or shape is None or len(shape) < 2:
            self._fix_inputs(n)  # a parameter or an untracked value joins these channels: keep them whole
            return None
        if any(_shape(a) != shape for a in args) or len({i.stride for i in infos}) != 1:  # broadcasting
            self._fix_inputs(n)
            return None
        s = infos[0].space
        for i in infos[1:]:
            s = self.sp.union(s, i.space)
        return _Info(s, infos[0].stride)

    def _reshape_ok(self, n: fx.Node) -> bool:
        """A flatten whose sizes come from the value itself (``x.view(x.size(0), -1)``), not literals."""
        sizes = [a for a in n.args[1:]]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        return all(isinstance(a, fx.Node) or a == -1 for a in sizes)

    def _function(self, n: fx.Node, fn, shape) -> _Info | None:
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if fn in _ELEMENTWISE_FUNCTIONS and src is not None:
            return self._same(n, src)
        if fn in _BINARY:
            return self._binary(n)
        if fn is torch.flatten and src is not None:
            start = n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)
            end = n.kwargs.get("end_dim", n.args[2] if len(n.args) > 2 else -1)
            return self._flatten(n, src, start == 1 and end == -1)
        if fn is torch.reshape and src is not None:
            return self._flatten(n, src, self._reshape_ok(n))
        if fn in _REDUCE and src is not None:
            return self._reduce(n, src)
        self._fix_inputs(n)
        return None

    def _method(self, n: fx.Node, name: str, shape) -> _Info | None:
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if src is None:
            self._fix_inputs(n)
            return None
        if name in _ELEMENTWISE_METHODS:
            return self._same(n, src)
        if name in _BINARY_METHODS:
            return self._binary(n)
        if name == "flatten":
            start = n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)
            end = n.kwargs.get("end_dim", n.args[2] if len(n.args) > 2 else -1)
            return self._flatten(n, src, start == 1 and end == -1)
        if name in ("view", "reshape"):
            return self._flatten(n, src, self._reshape_ok(n))
        if name in _REDUCE_METHODS:
            return self._reduce(n, src)
        self._fix_inputs(n)
        return None

    def _reduce(self, n: fx.Node, src: fx.Node) -> _Info | None:
        """A mean / sum / max over spatial dims only keeps the channels on dim 1."""
        i, si, so = self.info.get(src), _shape(src), _shape(n)
        dims = None if si is None else _reduce_dims(n, len(si))
        if i is None or so is None or dims is None or i.stride != 1 or 0 in dims or 1 in dims or len(so) < 2 \
                or so[1] != si[1]:
            self._fix_inputs(n)
            return None
        return i


def _alive(weight: torch.Tensor, stride: int, size: int, is_linear: bool) -> torch.Tensor:
    """Which of ``size`` input channels a layer reads with a non-zero weight."""
    w = weight.detach()
    if is_linear:
        nz = (w != 0).any(0)
        if nz.numel() != size * stride:
            return torch.ones(size, dtype=torch.bool)
        return nz.reshape(size, stride).any(1)
    nz = (w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(1)
    if nz.numel() != size:
        return torch.ones(size, dtype=torch.bool)
    return nz


def _widths(mod: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a Linear or conv: features or channels."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    return mod.out_channels, mod.in_channels


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _keep_out(mod: nn.Module, idx: torch.Tensor) -> None:
    mod.weight = _param(mod.weight.index_select(0, idx), mod.weight)
    if mod.bias is not None:
        mod.bias = _param(mod.bias.index_select(0, idx), mod.bias)
    if isinstance(mod, nn.Linear):
        mod.out_features = len(idx)
    else:
        mod.out_channels = len(idx)


def _keep_in(mod: nn.Module, idx: torch.Tensor, stride: int) -> None:
    if isinstance(mod, nn.Linear):
        cols = (idx[:, None] * stride + torch.arange(stride)[None, :]).reshape(-1)
        mod.weight = _param(mod.weight.index_select(1, cols), mod.weight)
        mod.in_features = len(cols)
    else:
        mod.weight = _param(mod.weight.index_select(1, idx), mod.weight)
        mod.in_channels = len(idx)


def _keep_aligned(mod: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(mod, _ConvNd):  # depthwise
        _keep_out(mod, idx)
        mod.in_channels = mod.groups = len(idx)
        return
    if mod.affine:
        mod.weight = _param(mod.weight.index_select(0, idx), mod.weight)
        mod.bias = _param(mod.bias.index_select(0, idx), mod.bias)
    if mod.track_running_stats and mod.running_mean is not None:
        mod.running_mean = mod.running_mean.index_select(0, idx).clone()
        mod.running_var = mod.running_var.index_select(0, idx).clone()
    mod.num_features = len(idx)


def _example(model: nn.Module, example: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    if isinstance(example, torch.Tensor):
        return example
    shape = example if example is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("slim needs an example input: pass example=tensor or a sample shape (C, H, W), or give "
                         "the model an `input_shape` attribute")
    p = next(iter(model.parameters()), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *[int(v) for v in shape]), generator=g)
    return x if p is None else x.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def slim(model: nn.Module, example: torch.Tensor | Sequence[int] | None = None, *,
         report: bool = False) -> nn.Module | tuple[nn.Module, SlimReport]:
    """A copy of plain model ``model`` without the channels that only zero weights read.

    Args:
        model: a plain (not nested) model, e.g. ``plain_model(nested, k)`` or a packed level's
            ``dense_model_for_level``; it must be traceable by ``torch.fx``. Left unchanged.
        example: an input batch, or one sample's shape (default: ``model.input_shape``); the
            shapes are read from it, and the slim model is checked against ``model`` on it.
        report: also return a :class:`SlimReport`.

    Returns:
        The slim copy (same classes and forward code, smaller layers), for inference: it is
        traced, checked and returned in eval mode (a forward that branches on ``self.training``
        is only followed on its eval branch). ``model`` is left as it was, modes included.

    Raises:
        ValueError: no example input, a model ``torch.fx`` cannot trace, or -- should an op
            outside the ones followed depend on a channel count -- a slim model that differs
            from ``model`` on the example (then use ``model`` as is).
    """
    from ..nest import NestedBatchNorm, evaluating, iter_nested  # noqa: PLC0415

    if next(iter_nested(model), None) is not None or any(isinstance(m, NestedBatchNorm) for m in model.modules()):
        raise ValueError("slim takes a plain model; for a nested model use slim_model(model, level)")
    x = _example(model, example)
    try:
        out = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - e.g. torch.nn.utils.prune's forward hooks
        raise ValueError(f"slim copies the model first, and it cannot be copied ({type(e).__name__}: {e}); "
                         "make its pruning permanent first (torch.nn.utils.prune.remove)") from e
    if hasattr(model, "input_shape"):
        out.input_shape = model.input_shape
    out.eval()  # the copy is for inference: traced, checked and returned in eval mode
    try:
        graph = _Tracer().trace(out)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(f"slim needs a model torch.fx can trace ({type(model).__name__}: {type(e).__name__}: "
                         f"{e})") from e
    gm = fx.GraphModule(out, graph, type(out).__name__)
    try:
        ShapeProp(gm).propagate(x.clone())  # a model may change its input in place
    except Exception as e:  # noqa: BLE001 - re-raised with what was wrong
        raise ValueError(f"the model fails on the example input of shape {tuple(x.shape)} "
                         f"({type(e).__name__}: {e})") from e
    an = _Analysis(gm)
    an.run()
    sp = an.sp
    mods = dict(out.named_modules())
    # a module called twice, or sharing its weight with another, keeps every space it touches
    owners: dict[int, list[str]] = {}
    for name, m in mods.items():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    shared |= {n for n, c in an.calls.items() if c > 1}
    # a re-parametrized weight (weight_norm, spectral_norm, ...) is computed, not stored: keep it whole
    shared |= {n for n, m in mods.items() if parametrize.is_parametrized(m)}
    for s, names in an.producers.items():
        if any(n in shared for n in names):
            sp.fix(s)
    for name, s, _ in an.consumers:
        if name in shared:
            sp.fix(s)
    for name, s in an.aligned:
        if name in shared:
            sp.fix(s)
    # which channels of each free space some layer reads with a non-zero weight
    alive: dict[int, torch.Tensor] = {}
    for name, s, stride in an.consumers:
        r = sp.find(s)
        if r in sp.fixed:
            continue
        m = mods[name]
        a = _alive(m.weight, stride, sp.size[r], isinstance(m, nn.Linear)).cpu()
        alive[r] = alive[r] | a if r in alive else a
    keep: dict[int, torch.Tensor] = {}
    for r, a in alive.items():
        if bool(a.all()):
            continue
        if not bool(a.any()):
            a = a.clone()
            a[0] = True  # nothing reads this space: keep one channel so every shape stays valid
        keep[r] = torch.nonzero(a).reshape(-1)
    rep = SlimReport(params_before=sum(p.numel() for p in model.parameters()))
    before = {n: _widths(m) for n, m in mods.items() if isinstance(m, (nn.Linear, _ConvNd))}
    for s, names in an.producers.items():
        idx = keep.get(sp.find(s))
        if idx is not None:
            for name in names:
                _keep_out(mods[name], idx.to(mods[name].weight.device))
    for name, s, stride in an.consumers:
        idx = keep.get(sp.find(s))
        if idx is not None:
            _keep_in(mods[name], idx.to(mods[name].weight.device), stride)
    for name, s in an.aligned:
        idx = keep.get(sp.find(s))
        if idx is not None:
            t = next(iter(list(mods[name].parameters()) + list(mods[name].buffers())), None)
            _keep_aligned(mods[name], idx if t is None else idx.to(t.device))
    for n, (o, i) in before.items():
        o2, i2 = _widths(mods[n])
        rep.layers[n] = {"out_before": o, "out_after": o2, "in_before": i, "in_after": i2}
    rep.params_after = sum(p.numel() for p in out.parameters())
    # the check: the slim copy computes what the model computes (in eval mode; the model's own
    # modes, module by module, are restored after)
    with evaluating(model):
        ref = model(x.clone())
        try:
            got = out(x.clone())
        except Exception as e:  # noqa: BLE001 - an op that hard-codes a channel count
            raise ValueError(f"the slim model fails on the example input ({type(e).__name__}: {e}); an op slim "
                             "does not follow depends on a channel count: use the model as is") from e
    _check_same(ref, got)
    return (out, rep) if report else out


def _check_same(ref, got) -> None:
    if isinstance(ref, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError("the slim model's output has another shape or dtype than the model's: use the model "
                             "as is")
        if not (ref.is_floating_point() or ref.is_complex()):
            if not torch.equal(ref, got):
                raise ValueError("the slim model's output differs from the model's: use the model as is")
            return
        scale = max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)
        err = float((got - ref).abs().max()) if ref.numel() else 0.0
        if not err <= TOLERANCE * scale:
            raise ValueError(f"the slim model differs from the model by {err:.3g} on the example input (allowed "
                             f"{TOLERANCE:g} x {scale:.3g}): an op slim does not follow depends on the dropped "
                             "channels; use the model as is")
        return
    if isinstance(ref, (tuple, list)) and isinstance(got, (tuple, list)) and len(ref) == len(got):
        for a, b in zip(ref, got):
            _check_same(a, b)
        return
    if isinstance(ref, dict) and isinstance(got, dict) and ref.keys() == got.keys():
        for k in ref:
            _check_same(ref[k], got[k])
        return
    if ref != got:
        raise ValueError("the slim model's output differs from the model's: use the model as is")


def slim_model(model: nn.Module, level: int, example: torch.Tensor | Sequence[int] | None = None, *,
               report: bool = False) -> nn.Module | tuple[nn.Module, SlimReport]:
    """Level ``level`` of nested ``model`` as a slim plain network: ``slim(plain_model(model, level))``.

    For a channel-scheduled model (``ChannelSelector``) this is the thin network of that level's
    widths; for other selectors, whatever whole channels the level leaves unread go."""
    from ..nest import plain_model  # noqa: PLC0415

    return slim(plain_model(model, level), example, report=report)
