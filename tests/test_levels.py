import math

import pytest
import torch

from nestedsparse.levels import LevelSpec, allocate_counts, erk_densities, level_map_from_scores


@pytest.mark.parametrize("bad, fragment", [
    ((), "at least one"),
    ((0.5, 0.2), "strictly increasing"),
    ((0.1, 0.1, 1.0), "strictly increasing"),
    ((0.0, 1.0), "outside (0, 1]"),
    ((0.5, 1.2), "outside (0, 1]"),
    ((float("nan"), 1.0), "outside (0, 1]"),
    (("a",), "sequence of numbers"),
])
def test_levelspec_rejects_bad_densities_with_clear_message(bad, fragment):
    with pytest.raises(ValueError, match="densit") as e:
        LevelSpec(densities=bad)
    assert fragment in str(e.value)


def test_levelspec_other_fields_validated():
    with pytest.raises(ValueError, match="allocation='bogus' is unknown; allowed: uniform, global, erk"):
        LevelSpec((0.1, 1.0), allocation="bogus")
    with pytest.raises(ValueError, match="one per level"):
        LevelSpec((0.1, 1.0), overrides={"fc": (0.5,)})
    with pytest.raises(ValueError, match="first_last_density"):
        LevelSpec((0.1, 1.0), first_last_density=0.0)
    spec = LevelSpec((0.1, 0.5, 1.0), first_last_density=0.3, overrides={"fc": (0.2, 0.2, 1.0)})
    assert LevelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="out of range: this model has levels 0..2"):
        spec.check_level(3)


def test_level_map_nests_and_hits_counts_exactly():
    torch.manual_seed(0)
    scores = torch.randn(13, 29)
    counts = [5, 40, 200, 377]
    lm = level_map_from_scores(scores, counts, 4)
    assert lm.dtype == torch.uint8
    for k, c in enumerate(counts):
        assert int((lm <= k).sum()) == c
        if k:
            assert bool(((lm <= k - 1) <= (lm <= k)).all())  # nesting
    top5 = torch.topk(scores.flatten(), 5).indices
    assert bool((lm.flatten()[top5] == 0).all())


def test_ties_broken_by_index_deterministically():
    lm = level_map_from_scores(torch.ones(10), [3, 10], 2)
    assert lm.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]


def test_erk_hits_budget_and_caps_at_one():
    shapes = {"a": (20, 1, 5, 5), "b": (500, 800), "c": (10, 500)}
    dens = erk_densities(shapes, 0.1)
    total = sum(math.prod(s) for s in shapes.values())
    active = sum(dens[k] * math.prod(s) for k, s in shapes.items())
    assert abs(active - 0.1 * total) < 1e-6 * total
    assert all(0 < d <= 1 for d in dens.values())
    assert dens["a"] > dens["b"]  # small layers kept denser


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_allocation_keeps_model_density_and_nesting(allocation):
    torch.manual_seed(1)
    shapes = {"first": (8, 3, 3, 3), "mid": (64, 72), "last": (10, 64)}
    numels = {k: math.prod(s) for k, s in shapes.items()}
    scores = {k: torch.randn(s) for k, s in shapes.items()}
    spec = LevelSpec((0.05, 0.2, 1.0), allocation=allocation, first_last_density=0.2)
    counts = allocate_counts(spec, numels, shapes, scores, order=list(shapes))
    total = sum(numels.values())
    for k, d in enumerate(spec.densities):
        got = sum(c[k] for c in counts.values())
        assert abs(got - d * total) <= len(shapes) + 1
    for n, cs in counts.items():
        assert cs == sorted(cs) and cs[-1] == numels[n]
    assert counts["first"][0] == round(0.2 * numels["first"])  # floor honoured
    with pytest.raises(ValueError, match="level 0 .density 0.05. cannot be met"):
        allocate_counts(LevelSpec((0.05, 1.0), allocation=allocation, first_last_density=0.5), numels, shapes, scores,
                        order=list(shapes))


@pytest.mark.parametrize("allocation", ["uniform", "erk", "global"])
def test_layers_a_level_skips_give_it_their_budget(allocation):
    """Layer scheduling: a layer that only runs from level m gets nothing below m, and the levels
    that skip it still keep density * total, spread over the layers they run."""
    shapes = {"a": (8, 4), "b": (8, 8), "c": (8, 8), "d": (2, 8)}
    numels = {n: s[0] * s[1] for n, s in shapes.items()}
    scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, (n, s) in enumerate(shapes.items())}
    spec = LevelSpec((0.2, 0.5, 1.0), allocation=allocation)
    counts = allocate_counts(spec, numels, shapes, scores, order=list(shapes), min_levels={"b": 1, "c": 2})
    total = sum(numels.values())
    assert counts["b"][0] == 0 and counts["c"][:2] == [0, 0]
    for k, d in enumerate(spec.densities):
        kept = sum(counts[n][k] for n in shapes)
        assert abs(kept - d * total) <= len(shapes), (k, kept, d * total)
    for n in shapes:
        assert counts[n] == sorted(counts[n]) and counts[n][-1] == numels[n]
    plain = allocate_counts(spec, numels, shapes, scores, order=list(shapes))
    assert counts["a"][0] > plain["a"][0]  # the skipped layers' share went to the running ones


def test_a_level_adding_blocks_with_little_more_density_stays_on_budget():
    """The layers that ran below keep their counts (nesting); the next level's new blocks and
    growth share only what is left of its budget (not a fresh share on top of the boosted counts)."""
    numels = {"a": 1000, "b": 1000}
    shapes = {"a": (10, 100), "b": (10, 100)}
    for allocation in ("uniform", "erk"):
        c = allocate_counts(LevelSpec((0.2, 0.25, 1.0), allocation=allocation), numels, shapes, None,
                            order=["a", "b"], min_levels={"b": 1})
        assert c["a"] == [400, 400, 1000] and c["b"] == [0, 100, 1000], (allocation, c)


def _global_reference(share, scores):
    """The global allocation by its definition: mark the top ``share`` of all scores (NaN last,
    ties in layer order), count the marks per layer, at least one each."""
    import math

    from nestedsparse.levels import count_for

    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    order = torch.sort(-torch.nan_to_num(flat, nan=-math.inf), stable=True).indices[:count_for(share, flat.numel())]
    hit = torch.zeros(flat.numel(), dtype=torch.bool)
    hit[order] = True
    out, start = {}, 0
    for n, t in scores.items():
        out[n] = max(1, int(hit[start:start + t.numel()].sum()))
        start += t.numel()
    return out


def test_global_splitter_equals_the_global_split():
    """The bisection's sort-once global allocation (also every one-off global split) picks what the
    definition picks, at any share."""
    from nestedsparse.levels import _global_splitter, _split

    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(s, generator=g) for n, s in (("a", (7, 9)), ("b", (5, 3)), ("c", (11, 2)))}
    scores["b"][0, 0] = float("nan")
    numels = {n: t.numel() for n, t in scores.items()}
    split = _global_splitter(list(scores), scores)
    for share in (0.0, 0.01, 0.2, 0.5, 0.77, 0.99, 1.0):
        assert split(share) == _split("global", share, list(scores), numels, None, scores) == \
            _global_reference(share, scores), share
