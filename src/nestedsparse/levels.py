"""Levels: the `LevelSpec` config and the level-map math every other module builds on.

A model nested with L levels holds, for every prunable weight tensor ``W``, a *level map*: a
``uint8`` tensor of ``W``'s shape whose entry is the lowest level at which that weight is active
(``L`` = never active). Level 0 is the sparsest ("core"), level L-1 the densest.

Invariants kept here:
- ``mask(k) = level_map <= k``, so ``mask(k) ⊆ mask(k+1)``: nesting holds by construction.
- A layer's count of active weights (or blocks) at level ``k`` is exactly the count it was given;
  counts come from ``round(density * n)``, so each layer hits its density to within one weight
  (one block when selecting blocks).
- Ranking is deterministic: ties are broken by flat index (lower index wins).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "ALLOCATIONS",
    "LevelSpec",
    "allocate_counts",
    "level_map_from_scores",
    "mask",
    "check_nested",
    "erk_densities",
]

ALLOCATIONS = ("uniform", "global", "erk")
MAX_LEVELS = 254  # level maps are uint8 and the value L means "never active"


def _check_density_tuple(values: Sequence[float], what: str, strict: bool) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of numbers in (0, 1], got {values!r}") from None
    if not out:
        raise ValueError(f"{what} must hold at least one density, got an empty sequence")
    for d in out:
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ValueError(f"{what}: density {d!r} is outside (0, 1]; every density must be in (0, 1]")
    for a, b in zip(out, out[1:]):
        if (b <= a) if strict else (b < a):
            order = "strictly increasing" if strict else "non-decreasing"
            raise ValueError(f"{what} must be {order} (sparsest level first), got {out}")
    return out


@dataclass(frozen=True)
class LevelSpec:
    """How many levels a model holds and how dense each is.

    Args:
        densities: model-wide fraction of prunable weights kept at each level, strictly
            increasing, sparsest first, each in (0, 1]. ``(0.05, 0.1, 0.25, 1.0)`` gives 4 levels.
        allocation: how a model-wide density is split across layers: ``"uniform"`` (every layer
            the same density), ``"global"`` (one magnitude ranking over all layers) or ``"erk"``
            (Erdős–Rényi-Kernel: small layers kept denser).
        overrides: module name -> per-level densities for that layer (non-decreasing, one per
            level). Overridden layers are fixed; the others share what is left of the budget.
        first_last_density: if set, the first and last prunable layers keep at least this
            density at every level (pruning practice: the stem and the classifier are fragile).

    Example:
        >>> spec = LevelSpec(densities=(0.05, 0.1, 0.25, 1.0), first_last_density=0.2)
        >>> spec.num_levels
        4
    """

    densities: tuple[float, ...]
    allocation: str = "uniform"
    overrides: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    first_last_density: float | None = None
    version: int = 1

    def __post_init__(self) -> None:
        dens = _check_density_tuple(self.densities, "LevelSpec.densities", strict=True)
        object.__setattr__(self, "densities", dens)
        if len(dens) > MAX_LEVELS:
            raise ValueError(f"LevelSpec supports at most {MAX_LEVELS} levels, got {len(dens)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"LevelSpec.allocation={self.allocation!r} is unknown; allowed: {', '.join(ALLOCATIONS)}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"LevelSpec.overrides must map module names to densities, got {type(self.overrides).__name__}")
        fixed = {}
        for name, vals in self.overrides.items():
            vals = _check_density_tuple(vals, f"LevelSpec.overrides[{name!r}]", strict=False)
            if len(vals) != len(dens):
                raise ValueError(
                    f"LevelSpec.overrides[{name!r}] has {len(vals)} densities; it needs one per level ({len(dens)})"
                )
            fixed[str(name)] = vals
        object.__setattr__(self, "overrides", dict(sorted(fixed.items())))
        fl = self.first_last_density
        if fl is not None and (not isinstance(fl, (int, float)) or not 0.0 < float(fl) <= 1.0):
            raise ValueError(f"LevelSpec.first_last_density must be None or in (0, 1], got {fl!r}")
        if self.version != 1:
            raise ValueError(f"LevelSpec.version {self.version!r} is not supported; this library reads version 1")

    @property
    def num_levels(self) -> int:
        """Number of levels L."""
        return len(self.densities)

    def check_level(self, level: int) -> int:
        """Return ``level`` if it is a valid level index, else raise a clear error."""
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level {level!r} is out of range: this model has levels 0..{self.num_levels - 1}")
        return level

    def to_dict(self) -> dict:
        """JSON-ready form (round-trips through :meth:`from_dict`)."""
        return {
            "densities": list(self.densities),
            "allocation": self.allocation,
            "overrides": {k: list(v) for k, v in self.overrides.items()},
            "first_last_density": self.first_last_density,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LevelSpec":
        """Rebuild a spec written by :meth:`to_dict`; unknown keys are an error."""
        allowed = {"densities", "allocation", "overrides", "first_last_density", "version"}
        extra = set(d) - allowed
        if extra:
            raise ValueError(f"unknown LevelSpec fields {sorted(extra)}; allowed: {sorted(allowed)}")
        d = dict(d)
        d["densities"] = tuple(d["densities"])
        d["overrides"] = {k: tuple(v) for k, v in d.get("overrides", {}).items()}
        return cls(**d)


def mask(level_map: torch.Tensor, level: int) -> torch.Tensor:
    """Boolean mask of the weights active at ``level``: ``level_map <= level``."""
    return level_map <= level


def count_for(density: float, n: int) -> int:
    """Active count for ``density`` of ``n`` units: nearest integer, at least 1, at most n."""
    return min(n, max(1, int(math.floor(density * n + 0.5))))


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Flat int64 rank of every entry by descending score (0 = highest); NaN ranks last, ties go
    to the lower flat index, so the ranking is deterministic."""
    flat = torch.nan_to_num(scores.detach().reshape(-1).to(torch.float64), nan=-math.inf)
    order = torch.sort(-flat, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), device=order.device)
    return ranks


def level_map_from_scores(scores: torch.Tensor, counts: Sequence[int], num_levels: int) -> torch.Tensor:
    """Level map from importance ``scores`` and per-level active ``counts`` (non-decreasing).

    The ``counts[k]`` highest-scoring entries are active at level k; ties go to the lower flat
    index, so the result is deterministic. Returns uint8 of ``scores``' shape.
    """
    n = scores.numel()
    if len(counts) != num_levels:
        raise ValueError(f"need one count per level ({num_levels}), got {len(counts)}")
    if any(b < a for a, b in zip(counts, counts[1:])) or counts[0] < 0 or counts[-1] > n:
        raise ValueError(f"counts must be non-decreasing within 0..{n}, got {list(counts)}")
    ranks = descending_ranks(scores)
    bounds = torch.tensor(list(counts), device=ranks.device)
    # level of an entry = number of levels whose count it does not reach = first k with rank < counts[k]
    lm = torch.searchsorted(bounds, ranks, right=True)
    return lm.to(torch.uint8).reshape(scores.shape)


def check_nested(level_map: torch.Tensor, num_levels: int) -> None:
    """Raise ValueError if ``level_map`` is not a valid uint8 map with values in 0..L."""
    if level_map.dtype != torch.uint8:
        raise ValueError(f"level maps are uint8, got {level_map.dtype}")
    if level_map.numel() and int(level_map.max()) > num_levels:
        raise ValueError(f"level map holds {int(level_map.max())} > L={num_levels} (allowed: 0..L)")


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel split of a model-wide ``density`` across layers (RigL), capped at 1.

    A layer's density is ``eps * sum(shape) / prod(shape)``; ``eps`` is chosen so the total active
    count equals ``density * total``; layers that would exceed 1 are fixed at 1 and eps re-solved.
    """
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / numel[k] for k, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[k] for k in dense)
        denom = sum(raw[k] * numel[k] for k in numel if k not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = {k for k in numel if k not in dense and eps * raw[k] > 1.0}
        if not over:
            break
        dense |= over
    return {k: 1.0 if k in dense else max(eps * raw[k], 0.0) for k in numel}


def allocate_counts(
    spec: LevelSpec,
    numels: Mapping[str, int],
    shapes: Mapping[str, Sequence[int]],
    scores: Mapping[str, torch.Tensor] | None = None,
    order: Sequence[str] | None = None,
    min_levels: Mapping[str, int] | None = None,
) -> dict[str, list[int]]:
    """Per-layer active counts at every level, for layers of ``numels`` units (weights or blocks).

    ``shapes`` are the weight shapes (used by ERK); ``scores`` (same keys) are needed by the
    ``"global"`` allocation; ``order`` is the forward order of the layers (first/last rule).
    Fixed layers (overrides, first/last floor) are served first; the rest share the remaining
    model-wide budget ``density * total`` by the spec's allocation. ``min_levels``: layers that
    only run from that level on (layer scheduling) get nothing below it, and the levels that skip
    them give their share to the layers they run, so a level still keeps ``density * total``.
    """
    names = list(order) if order is not None else list(numels)
    fixed: dict[str, tuple[float, ...]] = {n: spec.overrides[n] for n in names if n in spec.overrides}
    unknown = set(spec.overrides) - set(names)
    if unknown:
        raise ValueError(f"LevelSpec.overrides names {sorted(unknown)} that are not nested layers; nested: {names}")
    if spec.first_last_density is not None and len(names) >= 2:
        for n in (names[0], names[-1]):
            if n not in fixed:
                fixed[n] = tuple(max(d, spec.first_last_density) for d in spec.densities)
    free = [n for n in names if n not in fixed]
    total = sum(numels.values())
    low = {n: int(min_levels.get(n, 0)) for n in names} if min_levels else dict.fromkeys(names, 0)
    counts: dict[str, list[int]] = {n: [count_for(d, numels[n]) if i >= low[n] else 0 for i, d in enumerate(fixed[n])]
                                    for n in fixed}
    per_level: dict[str, list[int]] = {n: [] for n in free}
    for i, d in enumerate(spec.densities):
        running = [n for n in free if low[n] <= i]
        for n in free:
            if low[n] > i:
                per_level[n].append(0)
        free_total = sum(numels[n] for n in running)
        budget = d * total - sum(counts[n][i] for n in fixed)
        if budget < 0 and free:
            raise ValueError(
                f"level {i} (density {d}) cannot be met: the fixed layers (overrides, first_last_density) alone keep "
                f"{sum(counts[n][i] for n in fixed)} of {total} weights; lower their densities or raise this level's"
            )
        share = min(1.0, max(budget, 0.0) / free_total) if free_total else 0.0
        if d >= 1.0:
            share = 1.0
        split = _split(spec.allocation, share, running, numels, shapes, scores)
        if any(low.values()) and i > 0 and d < 1.0:
            # layer scheduling: the layers that ran below keep what they had there (nesting), so the
            # share for this level's new layers and growth is what makes the level's total meet its
            # budget (a bisection over the share: counts grow with it)
            floor = {n: max(per_level[n][:i]) for n in running}

            split_at = _global_splitter(running, scores) if spec.allocation == "global" else (
                lambda sh: _split(spec.allocation, sh, running, numels, shapes, scores))

            def kept(sh: float) -> tuple[int, dict[str, int]]:
                got = {n: max(c, floor[n]) for n, c in split_at(sh).items()}
                return sum(got.values()), got

            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if kept(mid)[0] > budget:
                    hi = mid
                else:
                    lo = mid
            split = kept(lo)[1]
        for n, c in split.items():
            per_level[n].append(c)
    for n in free:  # keep nesting even if rounding wobbles between levels
        cs = per_level[n]
        counts[n] = [max(cs[: i + 1]) for i in range(len(cs))]
    return {n: counts[n] for n in names}


def _global_splitter(free, scores):
    """``share -> {layer: count}`` of the ``"global"`` allocation: the ``share`` of all the layers'
    weights with the highest scores (NaN last, ties in layer order), at least one per layer. The
    scores are sorted once, for the many shares a bisection tries (``_split`` takes one)."""
    if scores is None:
        raise ValueError("the 'global' allocation needs importance scores for every layer")
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in free])
    owner = torch.cat([torch.full((scores[n].numel(),), i, dtype=torch.int64) for i, n in enumerate(free)])
    ranked = owner[torch.sort(-torch.nan_to_num(flat, nan=-math.inf), stable=True).indices]

    def split(share: float) -> dict[str, int]:
        if share >= 1.0:
            return {n: int(scores[n].numel()) for n in free}
        got = torch.bincount(ranked[: count_for(share, flat.numel())], minlength=len(free))
        return {n: max(1, int(got[i])) for i, n in enumerate(free)}

    return split


def _split(allocation, share, free, numels, shapes, scores) -> dict[str, int]:
    if not free:
        return {}
    if allocation == "uniform" or share >= 1.0:
        return {n: count_for(share, numels[n]) for n in free}
    if allocation == "erk":
        dens = erk_densities({n: shapes[n] for n in free}, share)
        return {n: count_for(dens[n], numels[n]) for n in free}
    return _global_splitter(free, scores)(share)
