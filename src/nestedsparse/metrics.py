"""Counting per level: non-zero parameters, MACs over active weights only, bytes.

MACs are measured, not estimated: one forward at the level with hooks on every Linear / Conv
records each layer's output size; a layer's MACs are its active weights times the output
positions each weight is used at (spatial positions for convs, tokens for Linear), per sample.
Nested layers count only the weights active at that level; other Linear/Conv layers count dense.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nest import NestedMask, get_spec, iter_nested, use_level

__all__ = ["count_params", "count_macs", "level_density", "level_summary"]

_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _mask_of(mod: nn.Module) -> NestedMask | None:
    if parametrize.is_parametrized(mod, "weight"):
        for p in mod.parametrizations.weight:
            if isinstance(p, NestedMask):
                return p
    return None


def level_density(model: nn.Module, level: int) -> float:
    """Fraction of the nested (prunable) weights active at ``level``."""
    active = total = 0
    for _, _, m in iter_nested(model):
        active += int((m.level_map <= level).sum())
        total += m.level_map.numel()
    return active / max(total, 1)


def count_params(model: nn.Module, level: int) -> int:
    """Parameters a level needs: its active nested weights plus every other parameter once."""
    get_spec(model).check_level(level)
    nested_ids, n = set(), 0
    for _, mod, m in iter_nested(model):
        nested_ids.add(id(mod.parametrizations.weight.original))
        n += int((m.level_map <= level).sum())
    seen = set()
    for p in model.parameters():
        if id(p) not in nested_ids and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


@torch.no_grad()
def count_macs(model: nn.Module, level: int, example: torch.Tensor) -> int:
    """Multiply-accumulates per sample at ``level`` for input like ``example`` (batch dim first)."""
    get_spec(model).check_level(level)
    total = [0]

    def hook(mod, inp, out):
        m = _mask_of(mod)
        w = mod.parametrizations.weight.original if m is not None else mod.weight
        active = int((m.level_map <= m.level).sum()) if m is not None else w.numel()
        if isinstance(mod, nn.Linear):
            uses = out.numel() // (out.shape[0] * mod.out_features)  # tokens per sample
        else:
            uses = out[0, 0].numel()  # output positions per channel
        total[0] += active * uses

    handles = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, _COUNTED)]
    was_training = model.training
    model.eval()
    try:
        with use_level(model, level):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def level_summary(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """Per level: ``{"level", "density", "params", "macs"}``."""
    spec = get_spec(model)
    return [
        {"level": k, "density": level_density(model, k), "params": count_params(model, k),
         "macs": count_macs(model, k, example)}
        for k in range(spec.num_levels)
    ]
