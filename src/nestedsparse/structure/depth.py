"""Layer scheduling (NestedNet): lower levels skip whole blocks.

One ResNet-32 holds ResNet-14, -20 and -32: with ``counts = (2, 3, 5)`` level 0 runs the first 2
blocks of each stage, level 1 the first 3, level 2 all 5; a skipped block passes its input
through unchanged (it must keep the shape of its input: the first block of a stage, which
downsamples, always runs). Weight nesting and layer scheduling combine freely: a block that runs
at level k uses its layers' level-k weights.

A gated block keeps its class (a subclass of it is swapped in, as ``torch.nn.utils.parametrize``
does) and its parameter names; its gate is a parameter-free child ``level_gate`` whose level is
set like every other level (``set_level_``, ``use_level``, per-module-prefix level maps). Saved
files record the schedule (``depth_schedule``), so ``load``, ``pack`` and ``load_packed`` rebuild
it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["LevelGate", "gate_blocks_", "depth_schedule_", "depth_schedule", "is_gated", "clamp_gated_maps_"]

_GATED: dict[type, type] = {}


class LevelGate(nn.Module):
    """The gate of one block: the block runs at levels ``>= min_level`` and is skipped below."""

    def __init__(self, min_level: int, num_levels: int) -> None:
        super().__init__()
        self.min_level, self.num_levels = int(min_level), int(num_levels)
        self.level = self.num_levels - 1

    def active(self) -> bool:
        return self.level >= self.min_level

    def extra_repr(self) -> str:
        return f"min_level={self.min_level}, level={self.level}"


def _gated_class(cls: type) -> type:
    if cls not in _GATED:
        def forward(self, x, *args, **kwargs):
            if not self.level_gate.active():
                return x
            return cls.forward(self, x, *args, **kwargs)

        _GATED[cls] = type(f"LevelGated{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
    return _GATED[cls]


def is_gated(module: nn.Module) -> bool:
    """True when ``module`` is a block under layer scheduling (in training or in a packed runtime,
    whose gates read the call's level)."""
    return type(module) in _GATED.values()


def depth_schedule(model: nn.Module) -> dict[str, int]:
    """``{block name: min_level}`` of every gated block (empty without layer scheduling)."""
    return {name: mod.level_gate.min_level for name, mod in model.named_modules() if is_gated(mod)}


def layer_min_levels(model: nn.Module) -> dict[str, int]:
    """``{nested layer name: the lowest level that runs it}`` for the layers inside gated blocks
    (a layer whose weight is tied to one outside its block runs wherever that one does: not listed).
    Empty without layer scheduling."""
    from ..nest import NestedMask, iter_nested  # noqa: PLC0415

    gated = [(name, block.level_gate.min_level) for name, block in model.named_modules() if is_gated(block)]
    if not gated:
        return {}
    users: dict[int, list[str]] = {}  # mask -> every module path that reaches it
    for path, sub in model.named_modules(remove_duplicate=False):
        if isinstance(sub, NestedMask):
            users.setdefault(id(sub), []).append(path)
    out = {}
    for name, _, mask in iter_nested(model):
        paths = users.get(id(mask), [])
        mins = [max([m for b, m in gated if p.startswith(b + ".")], default=0) for p in paths]
        if mins and min(mins) > 0:
            out[name] = min(mins)
    return out


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("layer scheduling checks that skipped blocks keep their input's shape: pass example_input "
                         "(the model has no input_shape)")
    p = next(model.parameters())
    return torch.zeros(2, *shape, dtype=p.dtype, device=p.device)


def gate_blocks_(model: nn.Module, schedule: Mapping[str, int], example_input: torch.Tensor | None = None,
                 check: bool = True) -> dict[str, int]:
    """Gate the named blocks of a nested model: ``{block name: min_level}`` (1..L-1), in place.

    With ``check`` (default) one forward on ``example_input`` (default zeros of the model's
    ``input_shape``) verifies every gated block returns the shape it is given. Returns the
    model's whole schedule."""
    from ..nest import NestedBatchNorm, NestedMask, get_spec  # noqa: PLC0415 - structure builds on nest

    spec = get_spec(model)
    mods = dict(model.named_modules())
    for name, lv in schedule.items():
        mod = mods.get(name) if isinstance(name, str) else None
        if mod is None or name == "":
            raise ValueError(f"no block named {name!r} to gate; blocks are named as in model.named_modules()")
        if (".parametrizations" in f".{name}" or hasattr(mod, "parametrizations")
                or isinstance(mod, (NestedMask, NestedBatchNorm, LevelGate, nn.Sequential, nn.ModuleList, nn.ModuleDict))
                or not any(True for _ in mod.children())):
            raise ValueError(f"{name!r} ({type(mod).__name__}) cannot be gated: layer scheduling skips blocks -- "
                             "modules with their own forward that hold layers (not a single layer, BatchNorm or "
                             "mask, and not an nn.Sequential, whose forward would call the gate)")
        if not isinstance(lv, int) or not 1 <= lv <= spec.num_levels - 1:
            raise ValueError(f"block {name!r}: min level must be an int in 1..{spec.num_levels - 1}, got {lv!r}")
        if is_gated(mod):
            raise ValueError(f"block {name!r} is gated already")
    if check and schedule:
        seen: dict[str, tuple] = {}
        hooks = [mods[n].register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, (tuple(a[0].shape) if a and torch.is_tensor(a[0]) else None,
                                                      tuple(o.shape) if torch.is_tensor(o) else None)))
                 for n in schedule]
        was = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(_example(model, example_input))
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        for n in schedule:
            if n not in seen:
                raise ValueError(f"block {n!r} did not run in a forward pass: it cannot be gated")
            if seen[n][0] is None or seen[n][0] != seen[n][1]:
                raise ValueError(f"block {n!r} maps {seen[n][0]} to {seen[n][1]}: only a block that keeps its "
                                 "input's shape can be skipped")
    for name, lv in schedule.items():
        mod = mods[name]
        mod.__class__ = _gated_class(type(mod))
        mod.level_gate = LevelGate(lv, spec.num_levels)
    clamp_gated_maps_(model)
    return depth_schedule(model)


@torch.no_grad()
def clamp_gated_maps_(model: nn.Module) -> None:
    """No weight inside a gated block is active below the block's ``min_level`` (the levels that
    skip it): raise such level-map entries to ``min_level``. Otherwise ``own`` / ``frozen-core``
    routing would leave them untrained (only the levels that skip the block could train them) and
    the per-level counts would include weights those levels never use. A weight tied to a layer
    outside the block is left as it is. Selectors' maps (``set_level_maps_``) and loaded files
    pass through here. The per-level counts that selectors compute (``layer_counts``) already
    give a level's whole budget to the layers it runs (:func:`layer_min_levels`)."""
    from ..nest import NestedMask  # noqa: PLC0415

    gated = [(name, block) for name, block in model.named_modules() if is_gated(block)]
    if not gated:
        return
    users: dict[int, list[str]] = {}  # mask -> every module path that reaches it (tied weights: several)
    for path, sub in model.named_modules(remove_duplicate=False):
        if isinstance(sub, NestedMask):
            users.setdefault(id(sub), []).append(path)
    for name, block in gated:
        m = block.level_gate.min_level
        for sub in block.modules():
            # a weight also used outside the block (tied) stays active where that use needs it
            if isinstance(sub, NestedMask) and all(u.startswith(name + ".") for u in users.get(id(sub), [])):
                sub.level_map.clamp_(min=m)


def depth_schedule_(model: nn.Module, counts: Sequence[int], stages: Sequence[str] | None = None,
                    example_input: torch.Tensor | None = None) -> dict[str, int]:
    """NestedNet's layer scheduling: level k runs the first ``counts[k]`` blocks of every stage.

    Args:
        model: a nested model.
        counts: blocks per stage at each level, non-decreasing, at least 1; the last level runs
            every block (``counts[-1]`` = the stage length).
        stages: names of the ``nn.Sequential`` stages (default: the model's children named
            ``layer1``, ``layer2``, ... as in the registry's ResNets and WRNs).
        example_input: a batch for the shape check (default zeros of ``model.input_shape``).

    Returns:
        The schedule, ``{block name: min_level}``.

    The level maps the model holds are clamped (nothing inside a skipped block is active), so
    until a selector recomputes them (every selector does when training begins; or
    ``set_level_maps_(model, compute_level_maps(model, magnitude_scores(model)))``) a level that
    skips blocks keeps less than its density; recomputed counts give it its whole budget.
    """
    from ..nest import get_spec  # noqa: PLC0415

    spec = get_spec(model)
    counts = [int(c) for c in counts]
    if len(counts) != spec.num_levels or min(counts) < 1 or any(a > b for a, b in zip(counts, counts[1:])):
        raise ValueError(f"counts must be {spec.num_levels} non-decreasing block counts >= 1 (one per level), "
                         f"got {counts}")
    if stages is None:
        stages = [n for n, m in model.named_children() if n.startswith("layer") and n[5:].isdigit()
                  and isinstance(m, nn.Sequential)]
        if not stages:
            raise ValueError("no stages named layer1, layer2, ... found: pass stages=[names of nn.Sequential stages]")
    schedule = {}
    for st in stages:
        seq = model.get_submodule(st)
        if not isinstance(seq, nn.Sequential):
            raise ValueError(f"stage {st!r} is a {type(seq).__name__}, not an nn.Sequential of blocks")
        if counts[-1] != len(seq):
            raise ValueError(f"stage {st!r} has {len(seq)} blocks but the densest level runs {counts[-1]}; "
                             "the last count must be the stage length")
        for i in range(len(seq)):
            lv = next(k for k, c in enumerate(counts) if i < c)
            if lv > 0:
                schedule[f"{st}.{i}"] = lv
    return gate_blocks_(model, schedule, example_input)
