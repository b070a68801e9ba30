"""Layer sparsity (Hebiri & Lederer, arXiv 2006.15604): make whole layers collapsible, merge, refit.

If a layer's input is non-negative (it follows a ReLU, a pool of one, ...) and the layer's weight
and bias are all >= 0, its own ReLU is the identity, so the layer merges with the next linear map::

    W2 relu(W1 h + b1) + b2 = (W2 W1) h + (W2 b1 + b2)        when h >= 0, W1 >= 0, b1 >= 0

Whole layers disappear. The regulariser that drives layers there is a group norm of each
candidate layer's negative part, ``lam * sum_j ||min(theta_j, 0)||_2`` (``theta_j`` = the layer's
weight and bias together); it is applied as a proximal step after each optimizer step
(:func:`prox_layer_sparsity_`, ``TrainConfig(layer_sparsity=lam)``), which sets a layer's
negative part *exactly* to zero once it is small enough -- a subgradient step would only make it
small. Then :func:`collapse` merges every candidate whose parameters are all >= 0 into the layer
after it, and the smaller network is refit (trained again without the penalty).

What merges (a "link" ``first -> act -> second``; ``first``'s output feeds only ``act``, whose
output feeds only ``second``):

* ``nn.Linear -> ReLU -> nn.Linear``: the merged layer is one ``nn.Linear``.
* ``nn.Conv2d -> ReLU -> 1x1 nn.Conv2d`` (the second one stride 1, no padding, one group): the
  merged layer is the first conv with ``W2 W1`` mixed into its output channels.

The graph is found with ``torch.fx`` (:func:`find_links`), so any module that traces works.
Non-negative inputs are proved from the graph: outputs of ReLU / ReLU6 / sigmoid / softmax,
and shape ops, dropout and max / average pools of non-negative values (``input_nonneg`` declares
the model's input non-negative, e.g. images in [0, 1]).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Link", "CollapseResult", "find_links", "negative_part_norm", "prox_layer_sparsity_", "collapse",
           "is_collapsible", "rebuild", "create_model"]

_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_KEEP_SIGN_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                      nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                      nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax,
                     F.hardsigmoid}
_KEEP_SIGN_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d,
                        F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
                        F.adaptive_max_pool2d, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                        operator.getitem}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "softmax"}
_KEEP_SIGN_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute", "transpose",
                      "clone", "detach"}
_RELU_FUNCTIONS = {F.relu, torch.relu}


@dataclass(frozen=True)
class Link:
    """``first -> act -> second``: ``first`` collapses into ``second`` once its weight and bias are
    all >= 0 (its input is proved non-negative). Names are qualified module names."""

    first: str
    act: str
    second: str


@dataclass
class CollapseResult:
    """What :func:`collapse` did.

    Attributes:
        model: the collapsed model (a ``torch.fx.GraphModule``; the input model is not changed).
        merged: the links merged, in order; pass them back as ``collapse(fresh, links=merged)``
            to rebuild the same architecture before loading a saved state dict into it.
        remaining: candidate links left (their first layer still has a negative parameter).
        layers_before / layers_after: Linear + Conv2d layers in the model before / after.
        input_nonneg: the ``input_nonneg`` the links were found with.
    """

    model: fx.GraphModule
    merged: list[Link] = field(default_factory=list)
    remaining: list[Link] = field(default_factory=list)
    layers_before: int = 0
    layers_after: int = 0
    input_nonneg: bool = False

    def recipe(self) -> dict:
        """JSON-ready description of the merges (:func:`rebuild` replays it on a fresh model)."""
        return {"input_nonneg": bool(self.input_nonneg), "links": [[lk.first, lk.act, lk.second] for lk in self.merged]}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with a nested model's per-level BatchNorm kept whole (a leaf)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from ..nest import NestedBatchNorm  # noqa: PLC0415 - structure builds on nest

        return isinstance(m, NestedBatchNorm) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(f"this needs a model torch.fx can trace ({type(model).__name__}: "
                         f"{type(e).__name__}: {e}); wrap data-dependent control flow in a leaf module") from e


_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor}


def _mutates(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` may change ``value`` in place (in-place tensor methods and operators, modules
    or functions called with ``inplace=True``), other than an in-place ReLU (which keeps a
    non-negative value non-negative). A value changed in place has no provable sign."""
    if not user.args or user.args[0] is not value:
        return bool(user.kwargs.get("out") is value)
    if _is_relu(gm, user):
        return False
    if user.op == "call_method":
        return user.target.endswith("_") or user.target in ("copy_", "__setitem__")
    if user.op == "call_function":
        return (user.target in _INPLACE_FUNCTIONS or bool(user.kwargs.get("inplace"))
                or getattr(user.target, "__name__", "").endswith("_"))  # torch.neg_, torch.add_, ...
    if user.op == "call_module":
        return bool(getattr(gm.get_submodule(user.target), "inplace", False))
    return False


_VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute",
                 "t", "narrow", "expand", "expand_as", "as_strided", "detach", "unfold", "movedim", "swapaxes",
                 "diagonal", "split", "chunk", "unbind", "select", "contiguous", "__getitem__"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
                   torch.permute, torch.narrow, torch.detach, torch.movedim, torch.swapaxes, torch.diagonal,
                   torch.split, torch.chunk, torch.unbind, torch.select}


def _mutated(gm: fx.GraphModule, value: fx.Node, depth: int = 0) -> bool:
    """Whether ``value``, or a view of it (a chain of view ops), is changed in place anywhere."""
    for u in value.users:
        if _mutates(gm, u, value):
            return True
        is_view = ((u.op == "call_method" and u.target in _VIEW_METHODS)
                   or (u.op == "call_function" and u.target in _VIEW_FUNCTIONS)
                   or (u.op == "call_module" and isinstance(gm.get_submodule(u.target), (nn.Flatten, nn.Unflatten,
                                                                                         nn.Identity))))
        if is_view and u.args and u.args[0] is value and (depth > 50 or _mutated(gm, u, depth + 1)):
            return True
    return False


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), nn.ReLU)
    if n.op == "call_function":
        return n.target in _RELU_FUNCTIONS
    return n.op == "call_method" and n.target in ("relu", "relu_")


def _params(mod: nn.Module) -> list[torch.Tensor]:
    """A layer's weight (the dense Parameter of a nested layer) and bias."""
    par = getattr(mod, "parametrizations", None)
    w = par.weight.original if par is not None and "weight" in par else mod.weight
    return [w] if mod.bias is None else [w, mod.bias]


def is_collapsible(mod: nn.Module) -> bool:
    """True when the layer's weight and bias are all >= 0 (its ReLU is then the identity on a
    non-negative input)."""
    with torch.no_grad():
        return all(bool((p >= 0).all()) for p in _params(mod))


class _Signs:
    """Which graph values are provably >= 0."""

    def __init__(self, gm: fx.GraphModule, input_nonneg: bool) -> None:
        self.gm, self.input_nonneg, self.memo = gm, input_nonneg, {}

    def __call__(self, n: object) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n not in self.memo:
            self.memo[n] = False  # cycles cannot happen in an fx graph; this only guards recursion
            self.memo[n] = self._nonneg(n) and not _mutated(self.gm, n)
        return self.memo[n]

    def _nonneg(self, n: fx.Node) -> bool:
        src = n.args[0] if n.args else None
        if n.op == "placeholder":
            return self.input_nonneg
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            if isinstance(mod, _NONNEG_MODULES):
                return True
            if isinstance(mod, _KEEP_SIGN_MODULES):
                return self(src)
            if isinstance(mod, (nn.Linear, nn.Conv2d)):  # a collapsible layer keeps a non-negative input so
                return self(src) and is_collapsible(mod)
            return False
        if n.op == "call_function":
            if n.target in _NONNEG_FUNCTIONS:
                return True
            return n.target in _KEEP_SIGN_FUNCTIONS and self(src)
        if n.op == "call_method":
            if n.target in _NONNEG_METHODS:
                return True
            return n.target in _KEEP_SIGN_METHODS and self(src)
        return False


def _mergeable(a: nn.Module, b: nn.Module) -> bool:
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        return a.out_features == b.in_features
    if isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d):
        return (b.kernel_size == (1, 1) and b.stride == (1, 1) and b.padding in ((0, 0), "valid")
                and b.groups == 1 and a.groups == 1 and a.out_channels == b.in_channels
                and a.padding_mode == "zeros")
    return False


def _layer_type(mod: nn.Module) -> type | None:
    for t in (nn.Linear, nn.Conv2d):
        if isinstance(mod, t):
            return t
    return None


def _links(gm: fx.GraphModule, input_nonneg: bool, prove: bool = True) -> list[tuple[Link, fx.Node, fx.Node, fx.Node]]:
    signs = _Signs(gm, input_nonneg)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or _layer_type(gm.get_submodule(n.target)) is None:
            continue
        users = list(n.users)
        if len(users) != 1 or not _is_relu(gm, users[0]) or users[0].args[0] is not n:
            continue
        act = users[0]
        nxt = list(act.users)
        if len(nxt) != 1 or nxt[0].op != "call_module" or tuple(nxt[0].args) != (act,) or nxt[0].kwargs:
            continue
        second = nxt[0]
        if not _mergeable(gm.get_submodule(n.target), gm.get_submodule(second.target)):
            continue
        if calls[second.target] != 1:  # merging would change its other calls too
            continue
        if not n.args or (prove and not signs(n.args[0])):  # a replayed recipe was proved when it was made
            continue
        act_name = act.target if act.op == "call_module" else str(act.name)
        out.append((Link(str(n.target), str(act_name), str(second.target)), n, act, second))
    return out


def find_links(model: nn.Module, *, input_nonneg: bool = False) -> list[Link]:
    """The model's layer-sparsity candidates: ``first -> ReLU -> second`` links whose ``first``
    has a provably non-negative input and would merge into ``second`` (see the module docstring).
    A model torch.fx cannot trace raises ``ValueError``."""
    return [lk for lk, *_ in _links(_trace(model), input_nonneg)]


def _modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    return [model.get_submodule(name) for name in names]


def negative_part_norm(model: nn.Module, links: Sequence[Link]) -> torch.Tensor:
    """``sum_j ||min(theta_j, 0)||_2`` over the ``first`` layers of ``links`` (weight and bias of a
    layer together): the layer-sparsity penalty, differentiable (add ``lam *`` it to a loss for a
    subgradient method; :func:`prox_layer_sparsity_` is the exact proximal step)."""
    mods = _modules(model, dict.fromkeys(lk.first for lk in links))
    if not mods:
        return torch.zeros(())
    # vector_norm's gradient at a zero vector is 0 (a sqrt of a sum of squares would give NaN)
    return sum(torch.linalg.vector_norm(torch.cat([p.clamp(max=0).reshape(-1) for p in _params(m)])) for m in mods)


@torch.no_grad()
def prox_layer_sparsity_(model: nn.Module, links: Sequence[Link], step: float) -> int:
    """One proximal step of ``step * ||min(theta_j, 0)||_2`` on each link's ``first`` layer, in place
    (``step`` = learning rate x lambda): a layer whose negative part has norm <= ``step`` loses it
    exactly (its negative entries become 0); otherwise the negative part shrinks by the factor
    ``1 - step / norm``. Positive entries are never changed. Returns how many layers are now
    all >= 0."""
    step = float(step)
    if step < 0:
        raise ValueError(f"prox step must be >= 0, got {step}")
    done = 0
    for m in _modules(model, dict.fromkeys(lk.first for lk in links)):
        ps = _params(m)
        norm = float(torch.sqrt(sum((p.clamp(max=0).double() ** 2).sum() for p in ps)))
        if norm <= step:
            for p in ps:
                p.clamp_(min=0)
            done += 1
        else:
            f = 1.0 - step / norm
            for p in ps:
                p.copy_(torch.where(p < 0, p * f, p))
    return done


def _merged(a: nn.Module, b: nn.Module) -> nn.Module:
    """The layer ``b o a`` (float64 products, stored in ``b``'s dtype)."""
    wa, wb = _params(a)[0].detach().double(), _params(b)[0].detach().double()
    ba = a.bias.detach().double() if a.bias is not None else torch.zeros(wa.shape[0], dtype=torch.float64,
                                                                         device=wa.device)
    bb = b.bias.detach().double() if b.bias is not None else torch.zeros(wb.shape[0], dtype=torch.float64,
                                                                         device=wb.device)
    dt = _params(b)[0].dtype
    if isinstance(a, nn.Linear):
        new = nn.Linear(a.in_features, b.out_features, bias=True, device=wa.device, dtype=dt)
        w = wb @ wa
    else:
        new = nn.Conv2d(a.in_channels, b.out_channels, a.kernel_size, a.stride, a.padding, a.dilation, 1, True,
                        device=wa.device, dtype=dt)
        w = torch.einsum("om,mikl->oikl", wb[:, :, 0, 0], wa)
        wb = wb[:, :, 0, 0]
    with torch.no_grad():
        new.weight.copy_(w.to(dt))
        new.bias.copy_((wb @ ba + bb).to(dt))
    new.train(b.training)
    return new


def _count_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


def collapse(model: nn.Module, *, input_nonneg: bool = False, links: Sequence[Link] | None = None) -> CollapseResult:
    """Merge every collapsible layer into the layer after it; the input model is left unchanged.

    Args:
        model: a plain (not nested) model torch.fx can trace. Nest the collapsed model afterwards
            (``nestify_``) to give it sparsity levels.
        input_nonneg: the model's input is >= 0 (a first layer can then collapse too).
        links: merge exactly these links, in order, whatever the signs of their parameters and
            inputs -- they were proved when the recipe was made -- to rebuild a collapsed
            architecture and load its saved weights into it; each must still be a
            ``first -> ReLU -> second`` pattern of the graph. Default: repeatedly merge every
            candidate whose ``first`` layer is all >= 0 until none is left.

    Returns:
        A :class:`CollapseResult`. The collapsed model computes the same function as ``model``
        (up to float rounding) when the default merges were taken. It is traced code: Python
        values the forward reads (``self.training`` passed to ``F.dropout``, for one) are fixed
        as they were when ``collapse`` ran -- use ``nn.Dropout`` modules in a model to refit.
    """
    from ..nest import is_nested  # noqa: PLC0415 - structure builds on nest

    if is_nested(model) or any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ValueError("collapse works on a plain model: nested (parametrized) weights would lose their levels "
                         "in a product; collapse first, then nestify_ the collapsed model")
    before = _count_layers(model)
    gm = _trace(copy.deepcopy(model))
    merged: list[Link] = []
    wanted = list(links) if links is not None else None
    while True:
        found = _links(gm, input_nonneg, prove=wanted is None)
        if wanted is not None:
            if not wanted:
                break
            pick = next((c for c in found if c[0] == wanted[0]), None)
            if pick is None:
                raise ValueError(f"link {wanted[0]} is not a mergeable link of this model; links now: "
                                 f"{[c[0] for c in found] or 'none'}")
            wanted.pop(0)
        else:
            pick = next((c for c in found if is_collapsible(gm.get_submodule(c[1].target))), None)
            if pick is None:
                break
        lk, first, act, second = pick
        a, b = gm.get_submodule(first.target), gm.get_submodule(second.target)
        new = _merged(a, b)
        owner, _, attr = second.target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, attr, new)
        second.args = (first.args[0],)
        gm.graph.erase_node(act)
        gm.graph.erase_node(first)
        gm.graph.lint()
        gm.recompile()
        merged.append(lk)
    gm.delete_all_unused_submodules()
    gm.recompile()
    if hasattr(model, "input_shape"):  # what bench / export / layer scheduling read
        gm.input_shape = model.input_shape
    remaining = [c[0] for c in _links(gm, input_nonneg)]
    return CollapseResult(model=gm, merged=merged, remaining=remaining, layers_before=before,
                          layers_after=_count_layers(gm), input_nonneg=input_nonneg)


def rebuild(model: nn.Module, recipe: dict) -> nn.Module:
    """The collapsed architecture ``recipe`` (:meth:`CollapseResult.recipe`) describes, built from
    ``model`` (fresh weights: load the collapsed model's saved state into the result). A recipe
    that is malformed or does not fit the model raises ``ValueError`` saying what is wrong."""
    ok = (isinstance(recipe, dict) and isinstance(recipe.get("input_nonneg"), bool)
          and isinstance(recipe.get("links"), list)
          and all(isinstance(lk, list) and len(lk) == 3 and all(isinstance(v, str) for v in lk)
                  for lk in recipe["links"]))
    if not ok:
        raise ValueError("a collapse recipe is {'input_nonneg': bool, 'links': [[first, act, second], ...]} "
                         f"(module names); got {recipe!r:.200}")
    return collapse(model, input_nonneg=recipe["input_nonneg"], links=[Link(*lk) for lk in recipe["links"]]).model


def create_model(name: str, kwargs: dict | None = None, collapse_recipe: dict | None = None) -> nn.Module:
    """A registry model (``nestedsparse.models.create``), collapsed by ``collapse_recipe`` if given:
    how run folders, checkpoints and packed files name their architecture."""
    from .. import models  # noqa: PLC0415

    model = models.create(name, **(kwargs or {}))
    if not collapse_recipe or not collapse_recipe.get("links"):
        return model
    return rebuild(model, collapse_recipe)
