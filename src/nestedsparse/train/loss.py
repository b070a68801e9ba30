"""The multi-level loss, in one visible function, and which levels a step trains.

NestedNet's joint objective is ``(1/L) * sum_k loss(y, f(x; W * M_k))``: every level's loss on the
same batch, equal weights by default. A shared weight receives the sum of the gradients of every
level that contains it (``routing="sum"``); the routing policy itself lives on the masks
(:func:`nestedsparse.nest.set_routing_`). Optional in-place distillation: the densest level's
softened predictions (detached) teach the sparser levels.

Hierarchical classification (NestedNet): the sparsest ``coarse_levels`` levels learn coarse
classes (superclasses), the others the fine ones, from one fine-class head: a level's coarse
logits are the log of the summed probabilities of each group's fine classes
(:func:`coarse_logits`), so one network holds a small coarse classifier inside a larger fine one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nest import set_run_levels_, use_level

__all__ = ["nested_loss", "sample_levels", "SAMPLINGS", "Hierarchy", "coarse_logits"]

SAMPLINGS = ("all", "sandwich")


@dataclass(frozen=True)
class Hierarchy:
    """Levels ``0 .. coarse_levels - 1`` learn the coarse classes ``mapping[y]`` of the fine labels."""

    mapping: torch.Tensor
    coarse_levels: int = 1

    def __post_init__(self) -> None:
        m = torch.as_tensor(self.mapping, dtype=torch.int64)
        if m.ndim != 1 or m.numel() == 0 or int(m.min()) < 0:
            raise ValueError("Hierarchy.mapping must be a non-empty 1-D map of coarse labels >= 0")
        if self.coarse_levels < 1:
            raise ValueError(f"Hierarchy.coarse_levels must be >= 1, got {self.coarse_levels}")
        object.__setattr__(self, "mapping", m)

    def is_coarse(self, level: int) -> bool:
        return level < self.coarse_levels


def coarse_logits(logits: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` coarse logits from ``[..., F]`` fine ones: ``logsumexp`` of each coarse class's fine
    logits (the log of its summed probability; softmax of the result = summed fine softmax)."""
    m = torch.as_tensor(mapping, dtype=torch.int64, device=logits.device)
    if m.numel() != logits.shape[-1]:
        raise ValueError(f"the hierarchy maps {m.numel()} fine classes, the logits have {logits.shape[-1]}")
    C = int(m.max()) + 1
    return torch.stack([torch.logsumexp(logits[..., m == c], dim=-1) for c in range(C)], dim=-1)


def sample_levels(levels: Sequence[int], sampling: str, generator: torch.Generator | None = None) -> list[int]:
    """Levels one training step runs, densest first (so the teacher comes first).

    ``all``: every level. ``sandwich``: the sparsest, the densest and one random level between.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"level sampling {sampling!r} is unknown; allowed: {', '.join(SAMPLINGS)}")
    levels = sorted(levels)
    if sampling == "all" or len(levels) <= 3:
        chosen = levels
    else:  # sandwich
        mid = levels[1:-1]
        pick = int(torch.randint(len(mid), (1,), generator=generator))
        chosen = [levels[0], mid[pick], levels[-1]]
    return sorted(chosen, reverse=True)


def nested_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    levels: Sequence[int],
    *,
    weights: Sequence[float] | None = None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    distill: float = 0.0,
    temperature: float = 1.0,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hierarchy: Hierarchy | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Weighted mean over ``levels`` of the task loss at each level (+ in-place distillation).

    Args:
        model: a nested model (its levels are set around each forward and restored after).
        x, y: one batch.
        levels: the levels to run; the first is the teacher when ``distill > 0``.
        weights: one weight per entry of ``levels`` (default equal); normalised to sum 1.
        distill: weight of the KL term that pulls each other level toward the first level's
            detached, temperature-softened predictions (0 = off).
        forward: what to call instead of ``model`` (e.g. its DDP wrapper).
        hierarchy: coarse levels learn ``hierarchy.mapping[y]`` from :func:`coarse_logits`; their
            distillation target is the teacher's summed probability per coarse class.

    Returns:
        ``(loss, {level: per-level task loss (detached)})``.
    """
    if not levels:
        raise ValueError("nested_loss needs at least one level")
    w = torch.tensor(weights if weights is not None else [1.0] * len(levels), dtype=torch.float32)
    if w.numel() != len(levels) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(levels)} non-negative numbers with a positive sum, got {weights}")
    w = (w / w.sum()).tolist()
    fwd = forward or model
    set_run_levels_(model, levels)
    total, parts, teacher = x.new_zeros(()), {}, None
    yc = None
    for k, wk in zip(levels, w):
        with use_level(model, k):
            logits = fwd(x)
        coarse = hierarchy is not None and hierarchy.is_coarse(k)
        if coarse:
            if yc is None:
                yc = hierarchy.mapping.to(y.device)[y]
            out, target = coarse_logits(logits, hierarchy.mapping), yc
        else:
            out, target = logits, y
        task = criterion(out, target)
        parts[k] = task.detach()
        term = task
        if distill > 0:
            if teacher is None:
                teacher = logits.detach() / temperature
            else:
                # the temperature softens the fine logits, then classes are summed into superclasses
                # (student and teacher alike)
                soft = logits / temperature
                t, st = ((coarse_logits(teacher, hierarchy.mapping), coarse_logits(soft, hierarchy.mapping))
                         if coarse else (teacher, soft))
                kl = F.kl_div(F.log_softmax(st, dim=-1), F.softmax(t, dim=-1), reduction="batchmean")
                term = (1 - distill) * task + distill * kl * temperature**2
        total = total + wk * term
    return total, parts
