"""Channel scheduling (NestedNet): level k keeps the leading channels of every layer.

Level ``k`` of a channel-scheduled network is a thinner network: each layer keeps its first
``ceil(w_k * C)`` output channels and reads only the first ``ceil(w_k * C_in)`` channels of its
input, with ``w_0 < w_1 < ... < w_{L-1} = 1`` the level widths. The model's input channels (image
channels) and its outputs (classes) are never divided. In this library that is one more way to
choose level maps -- a weight is active from the first level whose width holds both its output
channel and its input channel -- so nesting, per-level BatchNorm, training, packing and the
runtime all work unchanged. ``ChannelSelector(widths, sparse=True)`` also prunes inside the kept
channels by magnitude (Grimaldi et al.'s width x sparsity: thinner *and* sparser levels).

Which channel a weight reads is found from the graph (``torch.fx``): a Linear after a flatten
of ``C`` feature maps of ``H x W`` reads channel ``f // (H*W)`` at feature ``f``; a grouped conv's
``j``-th input of output channel ``o`` is input channel ``(o // (O/g)) * (I/g) + j``. Ops that
move, join, split or pad channels (``torch.cat``, ``permute``, ``F.pad``, indexing -- so also
the option-A ResNet shortcut) on the way between two layers are refused with a ``ValueError``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import fx, nn

from ..levels import descending_ranks, level_map_from_scores
from ..nest import dense_weight, get_spec, iter_nested, set_level_maps_
from ..select import Selector, register_selector
from .collapse import _trace

__all__ = ["channel_counts", "channel_level_maps", "width_sparsity_maps", "ChannelSelector", "default_widths"]


def default_widths(densities: Sequence[float]) -> tuple[float, ...]:
    """Widths whose interior layers keep about ``densities`` of their weights: ``sqrt(d)``."""
    return tuple(math.sqrt(d) for d in densities)


def channel_counts(channels: int, widths: Sequence[float]) -> list[int]:
    """Channels kept per level: ``ceil(w * channels)`` (at least one)."""
    return [max(1, min(channels, math.ceil(w * channels - 1e-9))) for w in widths]


def _levels_of(index: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Lowest level whose count holds each channel index."""
    c = torch.tensor(counts, dtype=torch.int64)
    return (index.unsqueeze(-1) >= c).sum(-1)


_REORDER_FUNCTIONS = {torch.cat, torch.concat, torch.stack, torch.permute, torch.transpose, torch.movedim,
                      torch.swapaxes, torch.roll, torch.flip, torch.split, torch.chunk, torch.gather,
                      torch.index_select, torch.narrow, nn.functional.pad, nn.functional.pixel_shuffle,
                      nn.functional.pixel_unshuffle, nn.functional.channel_shuffle, operator.getitem}
_REORDER_METHODS = {"permute", "transpose", "movedim", "swapaxes", "roll", "flip", "split", "chunk", "gather",
                    "index_select", "narrow", "unfold", "t", "T", "mT", "__getitem__", "repeat", "expand"}
_REORDER_MODULES = (nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.ZeroPad2d, nn.ConstantPad2d,
                    nn.ReflectionPad2d, nn.ReplicationPad2d)


def _moves_channels(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` may move, join, split or pad channels (then channel indices cannot be followed)."""
    if n.op == "call_function":
        return n.target in _REORDER_FUNCTIONS
    if n.op == "call_method":
        return n.target in _REORDER_METHODS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _REORDER_MODULES)
    return False


def _is_shape_value(n: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``, ``x.device``, ``x.dtype`` and items of them: facts
    about a tensor, not its values (channel scheduling and ``slim`` follow values only)."""
    if n.op == "call_method":
        return n.target in ("size", "dim", "numel")
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in ("shape", "ndim", "device", "dtype")
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        return _is_shape_value(n.args[0])
    return False


def _producers(gm: fx.GraphModule, node: fx.Node, nested: set[str], seen: set | None = None) -> tuple[set, bool]:
    """Nested layers whose outputs reach ``node``'s value without passing another nested layer,
    and whether the model input reaches it that way. Raises ``ValueError`` when the path holds an
    op that moves channels or a Linear / Conv layer that is not nested."""
    seen = set() if seen is None else seen
    layers, from_input = set(), False
    for a in node.all_input_nodes:
        if a in seen or _is_shape_value(a):
            continue
        seen.add(a)
        if a.op == "placeholder":
            from_input = True
        elif a.op == "call_module" and a.target in nested:
            layers.add(a.target)
        else:
            if _moves_channels(gm, a):
                raise ValueError(f"channel scheduling cannot follow channels through {a.name}: it may "
                                 "move, join, split or pad channels; nest such a model with another selector")
            if a.op == "call_module" and isinstance(gm.get_submodule(a.target), (nn.Linear, nn.Conv1d, nn.Conv2d)):
                raise ValueError(f"layer {a.target!r} is not nested: channel scheduling needs every Linear / Conv "
                                 "layer nested")
            sub, inp = _producers(gm, a, nested, seen)
            layers |= sub
            from_input |= inp
    return layers, from_input


def _feeds_output(gm: fx.GraphModule, node: fx.Node, nested: set[str], seen: set | None = None) -> bool:
    seen = set() if seen is None else seen
    for u in node.users:
        if u in seen:
            continue
        seen.add(u)
        if u.op == "output":
            return True
        if u.op == "call_module" and u.target in nested:
            continue
        if _feeds_output(gm, u, nested, seen):
            return True
    return False


def channel_level_maps(model: nn.Module, widths: Sequence[float]) -> dict[str, torch.Tensor]:
    """Level maps of channel scheduling with per-level ``widths`` (increasing, last 1.0), by layer name.

    Raises ``ValueError`` when the widths are malformed, or when a Linear reads a flattened
    input whose channel layout cannot be told from the graph.
    """
    spec = get_spec(model)
    widths = [float(w) for w in widths]
    if (len(widths) != spec.num_levels or any(not 0 < w <= 1 for w in widths)
            or any(a >= b for a, b in zip(widths, widths[1:])) or widths[-1] != 1.0):
        raise ValueError(f"channel widths must be {spec.num_levels} increasing fractions in (0, 1] ending at 1.0 "
                         f"(one per level), got {widths}")
    layers = {name: mod for name, mod, _ in iter_nested(model)}
    gm = _trace(model)
    nested = set(layers)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in nested}
    maps = {}
    for name, mod in layers.items():
        w = dense_weight(mod)
        O = w.shape[0]
        node = nodes.get(name)
        if node is None:  # not reached by the traced forward (e.g. tied and called under another name)
            raise ValueError(f"layer {name!r} is not called by the traced forward; channel scheduling needs it")
        producers, from_input = _producers(gm, node, nested)
        divide_in = bool(producers) and not from_input
        divide_out = not _feeds_output(gm, node, nested)
        lv_out = (_levels_of(torch.arange(O), channel_counts(O, widths)) if divide_out
                  else torch.zeros(O, dtype=torch.int64))
        if isinstance(mod, nn.Linear):
            I = w.shape[1]
            if divide_in:
                chans = {dense_weight(layers[p]).shape[0] for p in producers}
                if len(chans) != 1 or I % next(iter(chans)):
                    raise ValueError(f"Linear {name!r} reads {I} features from layers {sorted(producers)} with "
                                     f"{sorted(chans)} channels: cannot tell its input channels")
                C = next(iter(chans))
                gin = torch.arange(I) // (I // C)
                lv_in = _levels_of(gin, channel_counts(C, widths))
            else:
                lv_in = torch.zeros(I, dtype=torch.int64)
            lm = torch.maximum(lv_out[:, None], lv_in[None, :])
        else:
            ipg, g = w.shape[1], mod.groups
            if divide_in:
                opg = O // g
                gin = (torch.arange(O)[:, None] // opg) * ipg + torch.arange(ipg)[None, :]
                lv_in = _levels_of(gin, channel_counts(ipg * g, widths))
            else:
                lv_in = torch.zeros(O, ipg, dtype=torch.int64)
            lm = torch.maximum(lv_out[:, None], lv_in)
            lm = lm.reshape(O, ipg, *([1] * (w.dim() - 2))).expand(w.shape)
        maps[name] = lm.to(torch.uint8).contiguous()
    return maps


@torch.no_grad()
def width_sparsity_maps(model: nn.Module, widths: Sequence[float]) -> dict[str, torch.Tensor]:
    """Width x sparsity (Grimaldi et al.): level k keeps the leading channels of ``widths[k]`` *and*,
    inside them, only the largest-magnitude weights -- as many as the model's LevelSpec gives the
    layer at level k (its allocation), at most all of that level's channels; what that cap cuts
    goes to layers with room in their channels, so the level keeps its budget where it fits.

    One ranking makes the levels nested: weights of thinner levels' channels first, then by
    ``|W|``; level k takes the first of its capped count (:func:`_capped_counts`), all inside its
    channels."""
    from ..nest import layer_counts, magnitude_scores  # noqa: PLC0415

    spec = get_spec(model)
    cmaps = channel_level_maps(model, widths)
    counts = layer_counts(model, magnitude_scores(model))
    thins = {name: [int((cmaps[name] <= k).sum()) for k in range(spec.num_levels)] for name, _, _ in iter_nested(model)}
    capped = _capped_counts(counts, thins, spec.num_levels)
    out = {}
    for name, mod, _ in iter_nested(model):
        cm = cmaps[name].long()
        w = dense_weight(mod).detach().abs()
        c = capped[name]
        # the rank by |W|, then the channel level in front: integers, so no magnitude can blur the bands
        score = -(cm.double() * w.numel() + descending_ranks(w).reshape(w.shape).double())
        out[name] = level_map_from_scores(score, c, spec.num_levels)
    return out


def _capped_counts(counts: dict[str, list[int]], thins: dict[str, list[int]], levels: int) -> dict[str, list[int]]:
    """Each layer's count capped by what its level's channels hold; what the caps cut from a level
    goes to the layers with room left inside their channels (in proportion to that room), so the
    level keeps its budget while the channels can hold it. Counts stay non-decreasing per layer."""
    out = {n: [0] * levels for n in counts}
    for k in range(levels):
        c = {n: max(min(counts[n][k], thins[n][k]), out[n][k - 1] if k else 0) for n in counts}
        short = sum(counts[n][k] for n in counts) - sum(c.values())
        while short > 0:
            room = {n: thins[n][k] - c[n] for n in counts if thins[n][k] > c[n]}
            total = sum(room.values())
            if not total:
                break
            for n, r in room.items():
                add = min(r, short, max(1, (short * r) // total))
                c[n] += add
                short -= add
                if short <= 0:
                    break
        for n in counts:
            out[n][k] = c[n]
    return out


@register_selector("channels")
class ChannelSelector(Selector):
    """NestedNet's channel scheduling as a selector: the maps are set once, before training.

    Args:
        widths: width fraction per level (increasing, last 1.0); default ``sqrt(density)`` of
            the model's LevelSpec, so interior layers keep about each level's density.
        sparse: also prune inside the kept channels to the LevelSpec's per-layer counts by
            magnitude (width x sparsity, :func:`width_sparsity_maps`); needs explicit ``widths``.
            The magnitudes are the weights' when training starts: the maps stay fixed after.
    """

    def __init__(self, widths: Sequence[float] | None = None, sparse: bool = False) -> None:
        super().__init__()
        self.widths = None if widths is None else tuple(float(w) for w in widths)
        if sparse and self.widths is None:
            raise ValueError("width x sparsity needs explicit widths: the spec's densities set the sparsity")
        self.sparse = bool(sparse)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "widths": self.widths, "sparse": self.sparse}

    def apply_(self, model: nn.Module) -> None:
        widths = self.widths or default_widths(get_spec(model).densities)
        maps = width_sparsity_maps(model, widths) if self.sparse else channel_level_maps(model, widths)
        set_level_maps_(model, maps)

    def begin(self, model: nn.Module, total_steps: int) -> None:
        super().begin(model, total_steps)
        if self.step_count == 0:  # a resumed run keeps the maps its checkpoint holds
            self.apply_(model)

    @property
    def done(self) -> bool:
        return True
