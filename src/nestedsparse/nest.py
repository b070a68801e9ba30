"""Nest any ``nn.Module``: attach level maps to its prunable weights and per-level BatchNorm.

``nestify_`` registers a :class:`NestedMask` parametrization (``torch.nn.utils.parametrize``) on
the ``weight`` of every Linear / Conv1d / Conv2d (grouped and depthwise included) and swaps every
BatchNorm for a :class:`NestedBatchNorm` holding running statistics per level. The dense weight
stays where parametrize keeps it (``<module>.parametrizations.weight.original``); the level map is
a persistent uint8 buffer beside it. Reading ``module.weight`` gives ``W * mask(level)``.

Invariants:
- The level-k forward sees exactly ``W * (level_map <= k)``: inactive weights are exactly zero.
- Level k's loss gives no gradient to a weight inactive at level k (the mask multiplies), and
  with ``routing="own"`` only to the weights first active at level k.
- Tied weights (one Parameter in several modules) share one ``NestedMask`` and so one level map.
- The level lives on the mask / BatchNorm modules: ``set_level_`` and ``use_level`` set it for the
  whole model or per layer (rerouting part-way through a forward pass).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .levels import LevelSpec, allocate_counts, level_map_from_scores

__all__ = [
    "NestedMask",
    "NestedBatchNorm",
    "NestReport",
    "ROUTINGS",
    "nestify_",
    "set_level_",
    "use_level",
    "evaluating",
    "get_spec",
    "iter_nested",
    "iter_nested_bn",
    "is_nested",
    "set_routing_",
    "set_level_maps_",
    "plain_model",
]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
ROUTINGS = ("sum", "mean", "own", "frozen-core")
_SPEC_ATTR = "_nestedsparse_spec"

LevelArg = int | Mapping[str, int]


class NestedMask(nn.Module):
    """Parametrization ``W -> W * (level_map <= level)`` with gradient routing.

    Args:
        level_map: uint8 tensor of the weight's shape (values 0..L).
        num_levels: L.
    """

    def __init__(self, level_map: torch.Tensor, num_levels: int) -> None:
        super().__init__()
        self.register_buffer("level_map", level_map.to(torch.uint8).clone())
        self.num_levels = int(num_levels)
        self.level = self.num_levels - 1
        self.routing = "sum"
        self.run_levels: tuple[int, ...] = ()  # levels the current training step runs ("mean" routing)
        # NestedNet weight-connection learning: (level, tau, gamma) while a level is being learned.
        self.soft: tuple[int, torch.Tensor, float] | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        k = self.level
        if self.soft is not None and self.soft[0] == k:
            _, tau, gamma = self.soft
            parent = (self.level_map <= k + 1).to(w.dtype)
            return w * parent * torch.tanh(gamma * F.relu(w.abs() - tau))
        m = self.level_map <= k
        if self.routing != "sum" and torch.is_grad_enabled() and w.requires_grad:
            if self.routing == "mean" and self.run_levels:
                # scale each weight's gradient by n / (levels run this step that contain it): with the
                # loss a mean over n levels, every weight then gets the mean of its levels' gradients
                run = torch.tensor(self.run_levels, device=w.device)
                table = len(run) / (run[None, :] >= torch.arange(self.num_levels + 1, device=w.device)[:, None]).sum(1).clamp(min=1)
                scale = table.to(w.dtype)[self.level_map.long()]
                ws = w * scale
                w = ws + (w - ws).detach()
            elif self.routing != "mean":
                # own / frozen-core: level k's loss updates only the weights first active at level k.
                w = torch.where(self.level_map == k, w, w.detach())
        return w * m.to(w.dtype)

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, level={self.level}, routing={self.routing!r}"


class NestedBatchNorm(nn.Module):
    """BatchNorm with running statistics per level and one shared affine transform.

    Activation statistics differ per level (fewer weights, other activations), so each level
    normalises with its own running mean / variance. Works on 2D-5D inputs like nn.BatchNorm*d.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, num_levels: int) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.num_levels, self.level = int(num_levels), int(num_levels) - 1
        self.input_dims = _bn_input_dims(bn)
        self.weight = bn.weight
        self.bias = bn.bias
        if bn.track_running_stats:
            L, dev = self.num_levels, bn.running_mean.device
            self.register_buffer("running_mean", bn.running_mean.detach().repeat(L, 1).to(dev))
            self.register_buffer("running_var", bn.running_var.detach().repeat(L, 1).to(dev))
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().repeat(L).to(dev))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self.input_dims:
            raise ValueError(f"NestedBatchNorm expected a {' or '.join(map(str, self.input_dims))}D input, got {x.dim()}D")
        k = self.level
        eaf = 0.0 if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        if self.training and self.track_running_stats:
            self.num_batches_tracked[k] += 1
            if self.momentum is None:
                eaf = 1.0 / float(self.num_batches_tracked[k])
        rm = self.running_mean[k] if self.running_mean is not None else None
        rv = self.running_var[k] if self.running_var is not None else None
        return F.batch_norm(x, rm, rv, self.weight, self.bias, use_batch, eaf, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_levels={self.num_levels}, level={self.level}, eps={self.eps}"


def _bn_input_dims(bn: nn.Module) -> tuple[int, ...]:
    """Input ranks the original BatchNorm accepts (batch dim included)."""
    if isinstance(bn, nn.BatchNorm2d):
        return (4,)
    if isinstance(bn, nn.BatchNorm3d):
        return (5,)
    return (2, 3)


@dataclass
class NestReport:
    """What ``nestify_`` did: nested layers, and weighted layers it left dense (with why)."""

    nested: list[str] = field(default_factory=list)
    tied: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    batchnorms: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"nested {len(self.nested)} layers, {len(self.batchnorms)} BatchNorms made per-level"]
        lines += [f"  tied: {a} shares the level map of {b}" for a, b in self.tied]
        lines += [f"  left dense: {n} ({why})" for n, why in self.skipped]
        return "\n".join(lines)


def _default_filter(module: nn.Module, name: str) -> bool:
    return True


def nestify_(
    model: nn.Module,
    spec: LevelSpec,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    block: tuple[int, int] = (1, 1),
) -> NestReport:
    """Nest ``model`` in place with ``spec``'s levels; initial level maps by weight magnitude.

    Args:
        model: any nn.Module. Linear / Conv1d / Conv2d weights are nested; other weighted layers
            are left dense and listed in the report.
        spec: the levels.
        filter_fn: ``(module, qualified_name) -> bool``; False leaves that layer dense.
        block: prune in blocks of (rows, cols) of the 2-D weight view (e.g. (1, 2)).

    Returns:
        A :class:`NestReport`. Example::

            report = nestify_(model, LevelSpec((0.1, 0.5, 1.0)))
    """
    if not isinstance(spec, LevelSpec):
        raise TypeError(f"nestify_ needs a LevelSpec, got {type(spec).__name__}")
    if is_nested(model):
        raise ValueError("model is already nested; nestify_ attaches level maps once")
    filter_fn = filter_fn or _default_filter
    report = NestReport()
    owners: dict[int, tuple[str, NestedMask | None]] = {}
    targets: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2:
            continue
        if not isinstance(mod, SUPPORTED):
            report.skipped.append((name, f"{type(mod).__name__} is not supported"))
        elif w.numel() == 0:
            report.skipped.append((name, f"empty weight {tuple(w.shape)}: nothing to prune"))
        elif not filter_fn(mod, name):
            report.skipped.append((name, "excluded by filter_fn"))
        elif id(w) in owners:
            report.tied.append((name, owners[id(w)][0]))
            targets.append((name, mod))
        else:
            owners[id(w)] = (name, None)
            targets.append((name, mod))
    if not owners:
        raise ValueError("nestify_ found no Linear/Conv1d/Conv2d weight to nest in this model")
    masks: dict[int, NestedMask] = {}
    for name, mod in targets:
        w = mod.weight
        if id(w) not in masks:
            lm = torch.full(w.shape, spec.num_levels - 1, dtype=torch.uint8, device=w.device)
            masks[id(w)] = NestedMask(lm, spec.num_levels)
            report.nested.append(name)
        parametrize.register_parametrization(mod, "weight", masks[id(w)], unsafe=True)
        mod.parametrizations.train(mod.training)  # new containers follow the module's mode
    report.batchnorms = _swap_batchnorms(model, spec.num_levels)
    setattr(model, _SPEC_ATTR, spec)
    from .select.magnitude import MagnitudeSelector  # local: select builds on nest

    MagnitudeSelector(block=block).apply_(model)
    return report


def _swap_batchnorms(model: nn.Module, num_levels: int) -> list[str]:
    names = []
    for pname, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                # keep the replaced BatchNorm's mode: an eval-mode model must not start
                # normalising with batch statistics because it was nestified
                setattr(parent, cname, NestedBatchNorm(child, num_levels).train(child.training))
                names.append(f"{pname}.{cname}" if pname else cname)
    return names


def is_nested(model: nn.Module) -> bool:
    """True if ``nestify_`` has been applied to ``model``."""
    return getattr(model, _SPEC_ATTR, None) is not None


def plain_model(model: nn.Module, level: int | None = None) -> nn.Module:
    """An ordinary copy of a nested model at one level (default: the densest); ``model`` is unchanged.

    Every nested weight becomes a plain ``Parameter`` holding ``W * mask(level)`` (tied weights stay
    tied), every :class:`NestedBatchNorm` a ``nn.BatchNorm{1,2,3}d`` with that level's running
    statistics and the shared affine, a block the level skips (layer scheduling) an
    ``nn.Identity``, and the copy is no longer nested. For tools that work on
    plain models (``nestedsparse.structure.collapse``, export), and to start a new nested run.
    """
    spec = get_spec(model)
    k = spec.num_levels - 1 if level is None else level
    spec.check_level(k)
    out = copy.deepcopy(model)
    if hasattr(model, "input_shape"):  # a GraphModule's deep copy drops plain attributes
        out.input_shape = model.input_shape
    done: set[int] = set()
    for _, mod in list(out.named_modules()):
        if not parametrize.is_parametrized(mod, "weight"):
            continue
        masks = [p for p in mod.parametrizations.weight if isinstance(p, NestedMask)]
        orig = mod.parametrizations.weight.original
        # undo parametrize by hand: parametrize.remove_parametrizations deletes the property from
        # the generated Parametrized* class, which the deep copy shares with ``model``
        del mod._modules["parametrizations"]
        mod.__class__ = mod.__class__.__bases__[0]
        mod._parameters["weight"] = orig
        if masks and id(orig) not in done:
            done.add(id(orig))
            with torch.no_grad():
                orig.mul_((masks[0].level_map <= k).to(orig.dtype))
    for _, parent in list(out.named_modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, NestedBatchNorm):
                cls = {(4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d}.get(child.input_dims, nn.BatchNorm1d)
                src = child.weight if child.affine else child.running_mean
                dev = None if src is None else src.device
                bn = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                         device=dev)
                if child.affine:
                    bn.weight, bn.bias = child.weight, child.bias
                if child.track_running_stats:
                    with torch.no_grad():
                        bn.running_mean.copy_(child.running_mean[k])
                        bn.running_var.copy_(child.running_var[k])
                        bn.num_batches_tracked.copy_(child.num_batches_tracked[k])
                setattr(parent, cname, bn.train(child.training))
    from .structure.depth import is_gated  # noqa: PLC0415

    for _, parent in list(out.named_modules()):  # layer scheduling: a skipped block goes, a kept one is plain
        for cname, child in list(parent.named_children()):
            if is_gated(child):
                if child.level_gate.min_level > k:
                    setattr(parent, cname, nn.Identity())
                else:
                    del child._modules["level_gate"]
                    child.__class__ = child.__class__.__bases__[0]
    if hasattr(out, _SPEC_ATTR):
        delattr(out, _SPEC_ATTR)
    return out


def get_spec(model: nn.Module) -> LevelSpec:
    """The LevelSpec a nested model was built with (error if the model is not nested)."""
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        raise ValueError("model is not nested: call nestedsparse.nestify_(model, spec) first")
    return spec


def iter_nested(model: nn.Module) -> Iterator[tuple[str, nn.Module, NestedMask]]:
    """Yield ``(name, module, mask)`` once per distinct nested weight, in forward-definition order."""
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            for p in mod.parametrizations.weight:
                if isinstance(p, NestedMask) and id(p) not in seen:
                    seen.add(id(p))
                    yield name, mod, p


def iter_nested_bn(model: nn.Module) -> Iterator[tuple[str, NestedBatchNorm]]:
    """Yield ``(name, module)`` for every per-level BatchNorm."""
    for name, mod in model.named_modules():
        if isinstance(mod, NestedBatchNorm):
            yield name, mod


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The shared dense weight of a nested layer (the Parameter the optimizer updates)."""
    return module.parametrizations.weight.original


def set_level_maps_(model: nn.Module, maps: Mapping[str, torch.Tensor]) -> None:
    """Replace level maps by layer name (``iter_nested`` names); shapes and values are checked."""
    spec = get_spec(model)
    layers = {n: m for n, _, m in iter_nested(model)}
    unknown = set(maps) - set(layers)
    if unknown:
        raise KeyError(f"no nested layer named {sorted(unknown)}; nested layers: {sorted(layers)}")
    for n, lm in maps.items():
        old = layers[n].level_map
        if lm.shape != old.shape:
            raise ValueError(f"level map for {n!r} has shape {tuple(lm.shape)}, the weight has {tuple(old.shape)}")
        if lm.numel() and int(lm.max()) > spec.num_levels:
            raise ValueError(f"level map for {n!r} holds {int(lm.max())}; allowed values are 0..{spec.num_levels}")
        old.copy_(lm.to(torch.uint8))
    from .structure.depth import clamp_gated_maps_  # noqa: PLC0415 - layer scheduling's blocks

    clamp_gated_maps_(model)


def _resolve(name: str, level: LevelArg, current: int) -> int:
    if isinstance(level, Mapping):
        best = None
        for prefix, lv in level.items():
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, lv)
        return current if best is None else best[1]
    return level


def _level_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Everything that holds a level, in one pass: each distinct mask (under the first module
    that uses it), each per-level BatchNorm and each layer-scheduling gate."""
    from .structure.depth import LevelGate  # noqa: PLC0415 - layer scheduling's gates hold a level too

    seen: set[int] = set()
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            for p in mod.parametrizations.weight:
                if isinstance(p, NestedMask) and id(p) not in seen:
                    seen.add(id(p))
                    yield name, p
        elif isinstance(mod, (NestedBatchNorm, LevelGate)):
            yield name, mod


def set_run_levels_(model: nn.Module, levels) -> None:
    """Tell the masks which levels the current training step runs (used by ``mean`` routing)."""
    levels = tuple(int(k) for k in levels)
    for _, _, m in iter_nested(model):
        m.run_levels = levels


def check_level_arg(spec: LevelSpec, level: LevelArg, names: list[str], kind: str) -> None:
    """Raise a clear error unless ``level`` (an int or ``{prefix: level}``) fits ``spec`` and ``names``."""
    if not isinstance(level, Mapping):
        spec.check_level(level)
        return
    for prefix, lv in level.items():
        spec.check_level(lv)
        if prefix and not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise KeyError(f"level prefix {prefix!r} matches no {kind} layer; {kind} layers: {names}")


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """``|W|`` of every nested layer's dense weight, by layer name (the magnitude importance)."""
    return {n: dense_weight(mod).detach().abs() for n, mod, _ in iter_nested(model)}


def set_level_(model: nn.Module, level: LevelArg) -> None:
    """Set the active level: an int for the whole model, or ``{module_name_prefix: level}``.

    With a mapping the longest matching prefix wins (``""`` matches everything); layers no key
    matches keep their current level. This is how a forward pass switches level part-way
    (rerouting): ``set_level_(model, {"features": 3, "classifier": 0})``.
    """
    check_level_arg(get_spec(model), level, [n for n, _ in _level_owners(model)], "nested")
    for name, owner in _level_owners(model):
        owner.level = _resolve(name, level, owner.level)


def get_levels(model: nn.Module) -> dict[str, int]:
    """Current level of every nested layer and BatchNorm, by name."""
    return {n: o.level for n, o in _level_owners(model)}


@contextlib.contextmanager
def use_level(model: nn.Module, level: LevelArg):
    """Context manager: run ``model`` at ``level`` inside the block, restore the levels after."""
    saved = [(o, o.level) for _, o in _level_owners(model)]
    set_level_(model, level)
    try:
        yield model
    finally:
        for o, lv in saved:
            o.level = lv


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Context manager: ``model`` in eval mode inside the block; after it every module gets back its
    own mode (``model.train(was)`` would overwrite a frozen BatchNorm's or an MC dropout's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.training = t


def set_routing_(model: nn.Module, routing: str) -> None:
    """Choose how level losses reach shared weights: ``sum`` / ``mean`` / ``own`` / ``frozen-core``.

    ``sum`` (NestedNet): a shared weight gets the sum of its levels' gradients (scaled by the loss
    weights). ``mean``: it gets their mean, so weights that only the dense levels use learn as fast
    as core weights. ``own``: only the level where it first appears. ``frozen-core``: as ``own``,
    levels trained one after another, sparsest first, finished ones frozen (see the trainer).
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing {routing!r} is unknown; allowed: {', '.join(ROUTINGS)}")
    for _, _, m in iter_nested(model):
        m.routing = routing


def layer_counts(
    model: nn.Module, scores: Mapping[str, torch.Tensor], block: tuple[int, int] = (1, 1), fraction: float = 1.0
) -> dict[str, list[int]]:
    """Active counts (in blocks) per nested layer and level, under the model's spec.

    ``fraction`` in [0, 1] scales the pruning (gradual schedules): a layer of n blocks whose
    final count is c gets ``n - round((n - c) * fraction)``; 0 keeps everything, 1 is final.
    """
    pooled = {n: pool_blocks(scores[n], block) for n, _, _ in iter_nested(model)}
    return _counts_from_pooled(model, pooled, fraction)


def _counts_from_pooled(model: nn.Module, pooled: Mapping[str, torch.Tensor], fraction: float) -> dict[str, list[int]]:
    spec = get_spec(model)
    layers = [(n, m) for n, _, m in iter_nested(model)]
    numels = {n: pooled[n].numel() for n, _ in layers}
    shapes = {n: tuple(m.level_map.shape) for n, m in layers}
    from .structure.depth import layer_min_levels  # noqa: PLC0415 - structure builds on nest

    counts = allocate_counts(spec, numels, shapes, pooled, order=[n for n, _ in layers],
                             min_levels=layer_min_levels(model))
    fraction = min(max(float(fraction), 0.0), 1.0)
    return {n: [numels[n] - round((numels[n] - c) * fraction) for c in cs] for n, cs in counts.items()}


def compute_level_maps(
    model: nn.Module, scores: Mapping[str, torch.Tensor], block: tuple[int, int] = (1, 1), fraction: float = 1.0
) -> dict[str, torch.Tensor]:
    """Level maps for every nested layer from per-weight ``scores`` under the model's spec.

    Scores are pooled over ``block``-sized tiles of each layer's 2-D view (out, in*k...) so whole
    blocks switch on together; counts come from :func:`layer_counts` (uniform / global / ERK,
    first and last layers, overrides) and each map from :func:`level_map_from_scores`.
    """
    spec = get_spec(model)
    pooled = {n: pool_blocks(scores[n], block) for n, _, _ in iter_nested(model)}  # once per layer
    counts = _counts_from_pooled(model, pooled, fraction)
    out = {}
    for n, _, m in iter_nested(model):
        lm_blocks = level_map_from_scores(pooled[n], counts[n], spec.num_levels)
        out[n] = unpool_blocks(lm_blocks, block, m.level_map.shape)
    return out


def pool_blocks(score: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean of ``score`` over (rows, cols) tiles of its 2-D view; partial edge tiles average what they hold."""
    br, bc = block
    if br < 1 or bc < 1:
        raise ValueError(f"block must be two positive ints, got {block}")
    s2 = score.detach().reshape(score.shape[0], -1).float()
    if (br, bc) == (1, 1):
        return s2
    rows, cols = s2.shape
    pr, pc = (-rows) % br, (-cols) % bc
    padded = F.pad(s2, (0, pc, 0, pr))
    ones = F.pad(torch.ones_like(s2), (0, pc, 0, pr))
    tiles = lambda t: t.reshape((rows + pr) // br, br, (cols + pc) // bc, bc).sum(dim=(1, 3))  # noqa: E731
    return tiles(padded) / tiles(ones)  # mean over the real entries of each block


def unpool_blocks(lm: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Expand a per-block level map back to the weight's ``shape``."""
    br, bc = block
    rows = shape[0]
    cols = int(torch.Size(shape).numel() // rows)
    full = lm.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return full.contiguous().reshape(shape)
