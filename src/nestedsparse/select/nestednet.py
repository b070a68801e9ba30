"""NestedNet's weight connection learning (Kim et al., CVPR 2018), level by level.

Mask ``M = tanh(gamma * max(|W| - tau, 0))``: near-binary (gamma = 1e5), differentiable in W, and
a weight whose mask reaches 0 gets no gradient from that level again. Levels are learned from the
densest down to the core: during level k's phase its forward uses ``W * M_{k+1} * tanh(...)``
where ``M_{k+1}`` is the (already fixed) parent level's mask, and tau is raised from 0 to the
threshold that leaves level k at its target density. At the end of the phase the mask is made
binary (a final threshold), by ranking |W| inside the parent so the count is exact; sparser
levels are then learned from the masked weights. Only levels whose maps are fixed, plus the one
being learned, are trained in a phase (the trainer asks :meth:`trainable_levels`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..levels import level_map_from_scores
from ..nest import dense_weight, get_spec, iter_nested, layer_counts, magnitude_scores, set_level_maps_
from . import Selector, register_selector


@register_selector("nestednet")
class NestedNetSelector(Selector):
    """Learned nested thresholds: tau raised level by level, densest sparse level first.

    Args:
        start, end: fractions of training spanned by the phases (one phase per level whose
            density is below 1); after ``end`` the maps are fixed and all levels train jointly.
        gamma: steepness of the tanh mask (the paper uses 1e5).
        ramp: fraction of each phase over which tau rises from 0 to its target (the rest of the
            phase trains with the full threshold before it is made binary).
        update_every: steps between recomputing tau's target from the current weights.
    """

    def __init__(self, start: float = 0.0, end: float = 0.6, gamma: float = 1e5, ramp: float = 0.5,
                 update_every: int = 10) -> None:
        super().__init__()
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1 (fractions of training), got start={start}, end={end}")
        if gamma <= 0 or not 0.0 < ramp <= 1.0:
            raise ValueError(f"need gamma > 0 and 0 < ramp <= 1, got gamma={gamma}, ramp={ramp}")
        self.start, self.end, self.gamma, self.ramp, self.update_every = start, end, gamma, ramp, update_every
        self._targets: dict[str, torch.Tensor] = {}
        self._current: int | None = None

    # phases -----------------------------------------------------------------------------
    def _sparse_levels(self, model: nn.Module) -> list[int]:
        spec = get_spec(model)
        return [k for k in reversed(range(spec.num_levels)) if spec.densities[k] < 1.0]

    def _phase(self, model: nn.Module, step: int) -> tuple[int | None, float]:
        """(level being learned or None, progress within its phase) at ``step``."""
        levels = self._sparse_levels(model)
        t = step / max(self.total_steps, 1)
        if not levels or t >= self.end:
            return None, 1.0
        span = (self.end - self.start) / len(levels)
        i = max(0, int((t - self.start) // span)) if t >= self.start else 0
        if t < self.start:
            return levels[0], 0.0
        i = min(i, len(levels) - 1)
        return levels[i], (t - self.start - i * span) / span

    def trainable_levels(self, num_levels: int) -> list[int]:
        if self.done or self._current is None:
            return list(range(num_levels))
        return list(range(self._current, num_levels))

    @property
    def done(self) -> bool:
        return self.step_count >= int(self.end * self.total_steps)

    # hooks ------------------------------------------------------------------------------
    def begin(self, model: nn.Module, total_steps: int) -> None:
        super().begin(model, total_steps)
        self._current = None
        if self.step_count == 0:  # fresh run: every weight active at every level until learned
            set_level_maps_(model, {n: torch.zeros_like(m.level_map) for n, _, m in iter_nested(model)})
        self._enter(model, *self._phase(model, self.step_count))

    def step(self, model: nn.Module) -> None:
        before = self._current
        super().step(model)
        level, prog = self._phase(model, self.step_count)
        if level != before:
            if before is not None:
                self._harden(model, before)
            self._enter(model, level, prog)
        elif level is not None:
            self._set_tau(model, level, prog, refresh=self.step_count % self.update_every == 0)

    def _enter(self, model: nn.Module, level: int | None, prog: float) -> None:
        self._current = level
        for _, _, m in iter_nested(model):
            m.soft = None
        if level is not None:
            self._set_tau(model, level, prog, refresh=True)

    @torch.no_grad()
    def _set_tau(self, model: nn.Module, level: int, prog: float, refresh: bool) -> None:
        counts = layer_counts(model, magnitude_scores(model))
        for n, mod, m in iter_nested(model):
            if refresh or n not in self._targets:
                w = dense_weight(mod).detach().abs()
                inside = w[m.level_map <= level + 1]  # parent level's active weights
                c = counts[n][level]
                # threshold leaving c weights above it: the (c+1)-th largest magnitude in the parent
                self._targets[n] = inside.sort(descending=True).values[c] if c < inside.numel() else w.new_zeros(())
            tau = self._targets[n] * min(prog / self.ramp, 1.0)
            m.soft = (level, tau, self.gamma)

    @torch.no_grad()
    def _harden(self, model: nn.Module, level: int) -> None:
        """Make level ``level``'s mask binary with the exact count, inside the parent level."""
        spec = get_spec(model)
        counts = layer_counts(model, magnitude_scores(model))
        maps = {}
        for n, mod, m in iter_nested(model):
            parent = m.level_map <= level + 1
            w = dense_weight(mod).detach()
            score = torch.where(parent, w.abs(), torch.full_like(w, -1.0))
            size = int(parent.sum())
            sub = [min(c, size) for c in counts[n][: level + 1]] + [size]
            sub += [sub[-1]] * (spec.num_levels - len(sub))
            new = level_map_from_scores(score, sub, spec.num_levels)
            maps[n] = torch.where(parent, new, m.level_map)
            m.soft = None
        set_level_maps_(model, maps)  # checked, and clamped inside gated blocks (layer scheduling)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "start": self.start, "end": self.end, "gamma": self.gamma}
