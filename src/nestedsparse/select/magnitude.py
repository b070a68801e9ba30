"""Nested magnitude pruning: one ranking by |W| (or block mean |W|) gives every level's map.

Layer-wise or global is the spec's ``allocation``; blocks (1x2, 1x4, ...) tile each layer's 2-D
view. During training the pruning follows Zhu & Gupta's cubic schedule: between ``start`` and
``end`` (fractions of training) the pruned share grows as ``1 - (1 - p)^3``, maps are recomputed
every ``update_every`` steps from the current weights, and after ``end`` they are fixed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nest import compute_level_maps, magnitude_scores, set_level_maps_
from . import Selector, register_selector


def cubic(p: float) -> float:
    """Zhu & Gupta's gradual-pruning curve: fraction of the final pruning done at progress p."""
    p = min(max(p, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3


@register_selector("magnitude")
class MagnitudeSelector(Selector):
    """Nested magnitude pruning, unstructured or in blocks, on a gradual cubic schedule.

    Args:
        block: (rows, cols) tile of the 2-D weight view pruned as a unit; (1, 1) = unstructured.
        start: fraction of training at which pruning starts (maps dense until then).
        end: fraction of training at which the final maps are fixed; ``start == end`` prunes
            one-shot at ``start``.
        update_every: optimizer steps between map updates while the schedule runs.
    """

    def __init__(self, block=(1, 1), start: float = 0.0, end: float = 0.5, update_every: int = 50) -> None:
        super().__init__()
        block = tuple(int(b) for b in block)
        if len(block) != 2 or min(block) < 1:
            raise ValueError(f"block must be two positive ints such as (1, 2), got {block}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1 (fractions of training), got start={start}, end={end}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.block, self.start, self.end, self.update_every = block, start, end, int(update_every)

    @torch.no_grad()
    def apply_(self, model: nn.Module, fraction: float = 1.0) -> None:
        """Recompute every level map now from the current weights (``fraction`` of final pruning)."""
        set_level_maps_(model, compute_level_maps(model, magnitude_scores(model), self.block, fraction))

    def progress(self, step: int) -> float:
        """Fraction of the final pruning applied after ``step`` optimizer steps."""
        if self.total_steps <= 0:
            return 1.0
        t = step / self.total_steps
        if t >= self.end:
            return 1.0
        if self.end == self.start:
            return 1.0 if t >= self.start else 0.0
        return cubic((t - self.start) / (self.end - self.start))

    def begin(self, model: nn.Module, total_steps: int) -> None:
        super().begin(model, total_steps)
        if self.step_count == 0:
            self.apply_(model, self.progress(0))

    def step(self, model: nn.Module) -> None:
        super().step(model)
        t = self.step_count / max(self.total_steps, 1)
        end_step = int(self.end * self.total_steps)
        if self.step_count == end_step:  # final maps exactly at the end step, whatever the rounding
            self.apply_(model, 1.0)
        elif t < self.end and self.step_count % self.update_every == 0:
            self.apply_(model, self.progress(self.step_count))

    @property
    def done(self) -> bool:
        return self.step_count >= int(self.end * self.total_steps)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "block": list(self.block), "start": self.start, "end": self.end}
