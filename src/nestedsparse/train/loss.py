"""The multi-level loss, in one visible function, and which levels a step trains.

NestedNet's joint objective is ``(1/L) * sum_k loss(y, f(x; W * M_k))``: every level's loss on the
same batch, equal weights by default. A shared weight receives the sum of the gradients of every
level that contains it (``routing="sum"``); the routing policy itself lives on the masks
(:func:`nestedsparse.nest.set_routing_`). Optional in-place distillation: the densest level's
softened predictions (detached) teach the sparser levels.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nest import set_run_levels_, use_level

__all__ = ["nested_loss", "sample_levels", "SAMPLINGS"]

SAMPLINGS = ("all", "sandwich")


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
    for k, wk in zip(levels, w):
        with use_level(model, k):
            logits = fwd(x)
        task = criterion(logits, y)
        parts[k] = task.detach()
        term = task
        if distill > 0:
            if teacher is None:
                teacher = F.softmax(logits.detach() / temperature, dim=-1)
            else:
                kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1), teacher, reduction="batchmean")
                term = (1 - distill) * task + distill * kl * temperature**2
        total = total + wk * term
    return total, parts
