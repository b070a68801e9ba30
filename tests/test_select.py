import pytest
import torch
from torch import nn

import nestedsparse as ns
from nestedsparse.nest import dense_weight
from nestedsparse.select import create_selector, list_selectors
from nestedsparse.select.magnitude import cubic

SPEC = ns.LevelSpec((0.1, 0.4, 1.0))


def _counts(model):
    return {n: [int((m.level_map <= k).sum()) for k in range(SPEC.num_levels)] for n, _, m in ns.iter_nested(model)}


def test_registry_lists_and_rejects():
    assert {"magnitude", "nestednet", "channels"} <= set(list_selectors())
    with pytest.raises(ValueError, match="unknown selector 'x'; known: channels, magnitude, nestednet"):
        create_selector("x")
    with pytest.raises(ValueError, match="start <= end"):
        create_selector("magnitude", start=0.6, end=0.2)


def test_magnitude_keeps_largest_weights(tiny_mlp):
    ns.nestify_(tiny_mlp, SPEC)
    for _, mod, m in ns.iter_nested(tiny_mlp):
        w = dense_weight(mod).detach().abs()
        assert float(w[m.level_map == 0].min()) >= float(w[m.level_map > 0].max())


@pytest.mark.parametrize("total", [7, 10, 40])
def test_gradual_schedule_is_monotone_and_exact_at_end(tiny_mlp, total):
    ns.nestify_(tiny_mlp, SPEC)
    sel = create_selector("magnitude", start=0.0, end=0.5, update_every=1)
    sel.begin(tiny_mlp, total)
    first = _counts(tiny_mlp)
    assert all(c[0] == c[-1] for c in first.values())  # nothing pruned at step 0
    prev = first
    for _ in range(total):
        sel.step(tiny_mlp)
        now = _counts(tiny_mlp)
        assert all(now[n][0] <= prev[n][0] for n in now)
        prev = now
    assert sel.done
    for n, _, m in ns.iter_nested(tiny_mlp):
        assert abs(now[n][0] - 0.1 * m.level_map.numel()) <= 1
    assert cubic(0) == 0 and cubic(1) == 1 and cubic(0.5) == pytest.approx(0.875)


def test_nestednet_learns_levels_densest_first_and_ends_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 11), nn.ReLU(), nn.Linear(11, 3))
    ns.nestify_(model, SPEC)
    sel = create_selector("nestednet", start=0.0, end=0.8, update_every=1)
    total = 20
    sel.begin(model, total)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen_phases = []
    for _ in range(total):
        seen_phases.append(sel.trainable_levels(3)[0])
        lv = sel.trainable_levels(3)[0]
        with ns.use_level(model, lv):
            loss = model(torch.randn(4, 9)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sel.step(model)
    assert seen_phases[0] == 1 and 0 in seen_phases and seen_phases[-1] == 0
    assert sel.done and all(m.soft is None for _, _, m in ns.iter_nested(model))
    for n, _, m in ns.iter_nested(model):
        for k, d in enumerate(SPEC.densities):
            assert abs(int((m.level_map <= k).sum()) - d * m.level_map.numel()) <= 1
            if k:
                assert bool(((m.level_map <= k - 1) <= (m.level_map <= k)).all())


def test_nestednet_soft_mask_zeroes_and_freezes_small_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    ns.nestify_(model, ns.LevelSpec((0.5, 1.0)))
    sel = create_selector("nestednet", start=0.0, end=1.0, ramp=0.01)
    sel.begin(model, 10)
    sel.step(model)  # tau at its target now
    mask = model[0].parametrizations.weight[0]
    w = dense_weight(model[0])
    with ns.use_level(model, 0):
        eff = model[0].weight
        eff.sum().backward()
    tau = mask.soft[1]
    small = w.detach().abs() <= tau
    assert bool((eff.detach()[small] == 0).all())
    assert bool((w.grad[small] == 0).all())
