"""Layer sparsity: candidate links, the proximal step, merging, refit, and plain_model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import nestedsparse as ns
from nestedsparse.structure import Link, collapse, find_links, is_collapsible, negative_part_norm, prox_layer_sparsity_


def _mlp(seed=0, widths=(7, 9, 8, 6, 4)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _make_nonneg_(*mods):
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p.abs_()


class Functional(nn.Module):
    """Links through functional ReLUs and shape ops, a pool on the input, a 1x1 conv after a conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, 1)
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.max_pool2d(x, 2)
        h = torch.relu(self.c2(F.relu(self.c1(h))))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc2(self.fc1(h).relu())


def test_find_links_needs_a_provably_nonnegative_input():
    m = _mlp()
    assert find_links(m) == [Link("2", "3", "4"), Link("4", "5", "6")]
    assert find_links(m, input_nonneg=True)[0] == Link("0", "1", "2")
    f = Functional()
    got = find_links(f, input_nonneg=True)
    assert [(lk.first, lk.second) for lk in got] == [("c1", "c2"), ("fc1", "fc2")]
    # the input's sign is unknown: c1 is no candidate; fc1's input is a pool of a ReLU: still one
    assert [lk.first for lk in find_links(f)] == ["fc1"]


def test_find_links_skips_what_cannot_merge():
    torch.manual_seed(0)
    bn_between = nn.Sequential(nn.ReLU(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    assert find_links(bn_between) == []
    wide_conv = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    assert find_links(wide_conv) == []  # the second conv is not 1x1

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = F.relu(self.a(F.relu(x)))
            return self.b(h) + h  # the activation feeds two places: no merge

    assert find_links(TwoUsers()) == []


def test_prox_is_the_group_proximal_operator():
    torch.manual_seed(0)
    m = _mlp()
    links = find_links(m)
    first = m[2]
    w0, b0 = first.weight.detach().clone(), first.bias.detach().clone()
    neg = torch.cat([w0.clamp(max=0).flatten(), b0.clamp(max=0)])
    norm = float(neg.norm())
    step = 0.25 * norm
    done = prox_layer_sparsity_(m, links[:1], step)
    assert done == 0
    f = 1 - step / norm
    torch.testing.assert_close(first.weight, torch.where(w0 < 0, w0 * f, w0))
    torch.testing.assert_close(first.bias, torch.where(b0 < 0, b0 * f, b0))
    # optimality: no nearby point has a smaller prox objective
    theta = torch.cat([w0.flatten(), b0])
    z = torch.cat([first.weight.detach().flatten(), first.bias.detach()])

    def obj(v):
        return 0.5 * float(((v - theta) ** 2).sum()) + step * float(v.clamp(max=0).norm())

    for _ in range(200):
        assert obj(z) <= obj(z + 1e-3 * torch.randn_like(z)) + 1e-9
    # a step at least the norm of what is left zeroes the negative part exactly; positives stay
    pos_before = first.weight.detach().clamp(min=0).clone()
    left = float(negative_part_norm(m, links[:1]).detach())
    assert prox_layer_sparsity_(m, links[:1], left) == 1
    assert is_collapsible(first) and float(negative_part_norm(m, links[:1]).detach()) == 0.0
    torch.testing.assert_close(first.weight.detach(), pos_before)
    with pytest.raises(ValueError, match=">= 0"):
        prox_layer_sparsity_(m, links, -1.0)


def test_negative_part_norm_value_and_finite_gradient_at_zero():
    m = _mlp()
    links = find_links(m)
    def neg_norm(lin):
        return float(torch.cat([lin.weight.detach().clamp(max=0).flatten(), lin.bias.detach().clamp(max=0)]).norm())

    want = neg_norm(m[2]) + neg_norm(m[4])
    assert float(negative_part_norm(m, links).detach()) == pytest.approx(want, rel=1e-5)
    _make_nonneg_(m[2])
    pen = negative_part_norm(m, links[:1])
    pen.backward()
    assert float(pen.detach()) == 0.0 and torch.isfinite(m[2].weight.grad).all() and float(m[2].weight.grad.abs().sum()) == 0


@pytest.mark.parametrize("nonneg", [False, True])
def test_collapse_keeps_the_function_and_drops_layers(nonneg):
    m = _mlp().eval()
    _make_nonneg_(m[0], m[2], m[4])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = collapse(m, input_nonneg=nonneg)
    x = torch.rand(11, 7) if nonneg else torch.randn(11, 7)
    torch.testing.assert_close(res.model(x), m(x), rtol=1e-5, atol=1e-5)
    # all three ReLU links chain into one layer with a non-negative input; else the first stays
    assert res.layers_before == 4 and res.layers_after == (1 if nonneg else 2)
    assert len(res.merged) == (3 if nonneg else 2) and res.remaining == []
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # input model untouched
    if not nonneg:
        # merging past what the graph proves would be wrong: on a signed input the first ReLU clips
        too_far = collapse(m, input_nonneg=True).model
        assert not torch.allclose(too_far(-x.abs()), m(-x.abs()), atol=1e-3)


def test_collapse_leaves_a_layer_with_a_negative_weight():
    m = _mlp().eval()
    _make_nonneg_(m[2], m[4])
    with torch.no_grad():
        m[4].weight[0] *= -1  # so the merged 2 -> 4 layer has a negative row too
    res = collapse(m)
    assert [lk.first for lk in res.merged] == ["2"] and [lk.first for lk in res.remaining] == ["4"]
    x = torch.randn(5, 7)
    torch.testing.assert_close(res.model(x), m(x), rtol=1e-5, atol=1e-5)


def test_collapse_convs_and_functional_graphs():
    f = Functional().eval()
    _make_nonneg_(f.c1, f.fc1)
    res = collapse(f, input_nonneg=True)
    assert [(lk.first, lk.second) for lk in res.merged] == [("c1", "c2"), ("fc1", "fc2")]
    assert res.layers_after == 2
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(res.model(x), f(x), rtol=1e-5, atol=1e-5)


def test_links_rebuild_the_architecture_for_a_saved_state():
    m = _mlp().eval()
    _make_nonneg_(m[2], m[4])
    res = collapse(m)
    fresh = collapse(_mlp(seed=5), links=res.merged).model  # other weights, signs ignored
    fresh.load_state_dict(res.model.state_dict())
    x = torch.randn(4, 7)
    torch.testing.assert_close(fresh(x), res.model(x))
    with pytest.raises(ValueError, match="not a mergeable link"):
        collapse(_mlp(), links=[Link("0", "2", "4")])  # no such Linear -> ReLU -> Linear in the graph


def test_collapse_refuses_nested_and_untraceable_models(untraceable):
    m = _mlp()
    ns.nestify_(m, ns.LevelSpec((0.5, 1.0)))
    with pytest.raises(ValueError, match="plain model"):
        collapse(m)

    with pytest.raises(ValueError, match="torch.fx can trace"):
        find_links(untraceable)


def test_plain_model_is_one_level_of_the_nested_model(tiny_conv):
    spec = ns.LevelSpec((0.2, 0.6, 1.0))
    ns.nestify_(tiny_conv, spec)
    tiny_conv.train()
    for _ in range(3):
        tiny_conv(torch.randn(4, 3, 9, 9))
    tiny_conv.eval()
    x = torch.randn(2, 3, 9, 9)
    for k in range(3):
        p = ns.plain_model(tiny_conv, k)
        with ns.use_level(tiny_conv, k):
            torch.testing.assert_close(p(x), tiny_conv(x))
        assert not ns.nest.is_nested(p) and not any(hasattr(mm, "parametrizations") for mm in p.modules())
        assert isinstance(p.features[1], nn.BatchNorm2d) and not p.features[1].training
        dens = float((p.features[0].weight != 0).float().mean())
        assert dens == pytest.approx(spec.densities[k], abs=0.05)
    # the nested model still works after copies were taken out of it
    with ns.use_level(tiny_conv, 0):
        tiny_conv(x)
    with pytest.raises(ValueError):
        ns.plain_model(tiny_conv, 3)


def _blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 7, generator=g)
    y = (x[:, 0] + x[:, 1] > x[:, 2] + 0.5).long()
    return TensorDataset(x, y)


def test_train_with_layer_sparsity_then_collapse_and_refit(tmp_path):
    m = _mlp(widths=(7, 16, 16, 2))
    ns.nestify_(m, ns.LevelSpec((1.0,)))
    cfg = ns.TrainConfig(epochs=2, batch_size=32, lr=0.05, layer_sparsity=5.0, input_nonneg=True, progress=False,
                         weight_decay=0.0)
    res = ns.train(m, _blobs(), _blobs(seed=1), cfg, run_dir=tmp_path / "a")
    row = res.history[-1]
    assert row["candidates"] == 2 and row["collapsible"] == 2
    plain = ns.plain_model(m).eval()
    out = collapse(plain, input_nonneg=True)
    assert out.layers_after == 1 and len(out.merged) == 2
    x = _blobs(seed=2).tensors[0]
    torch.testing.assert_close(out.model(x), plain(x), rtol=1e-4, atol=1e-5)
    # refit: the collapsed model nests and trains like any model
    ns.nestify_(out.model, ns.LevelSpec((0.5, 1.0)))
    res2 = ns.train(out.model, _blobs(), _blobs(seed=1), ns.TrainConfig(epochs=1, batch_size=32, progress=False))
    assert len(res2.final) == 2
    # without the regulariser nothing is pushed to collapse, and a model without candidates is refused
    with pytest.raises(ValueError, match="no collapsible candidate"):
        bad = nn.Sequential(nn.Linear(7, 2))
        ns.nestify_(bad, ns.LevelSpec((1.0,)))
        ns.train(bad, _blobs(), None, cfg)
    with pytest.raises(ValueError, match="layer_sparsity"):
        ns.TrainConfig(layer_sparsity=-1.0)


class _InPlace(nn.Module):
    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        _make_nonneg_(self.fc1)
        self.op = op

    def forward(self, x):
        h = F.relu(self.fc0(x))
        if self.op == "sub_":
            h.sub_(5.0)
        elif self.op == "masked_fill_":
            h.masked_fill_(h > 0.1, -1.0)
        return self.fc2(F.relu(self.fc1(h)))


@pytest.mark.parametrize("op", ["sub_", "masked_fill_"])
def test_a_value_changed_in_place_has_no_sign(op):
    m = _InPlace(op).eval()
    assert find_links(m) == []
    res = collapse(m)
    assert res.merged == []
    x = torch.randn(5, 4)
    torch.testing.assert_close(res.model(x), m(x))


def test_a_second_layer_called_twice_is_not_merged_into():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
            _make_nonneg_(self.fc1)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x))) + self.fc2(x)

    m = Twice().eval()
    res = collapse(m, input_nonneg=True)
    assert res.merged == []
    x = torch.rand(3, 4)
    torch.testing.assert_close(res.model(x), m(x))


def test_a_recipe_replays_on_fresh_weights_whatever_proved_it():
    class Chain(nn.Module):  # fc1's input is non-negative only because fc0 (no activation) is >= 0
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(self.fc0(F.relu(x)))))

    torch.manual_seed(0)
    m = Chain().eval()
    _make_nonneg_(m.fc0, m.fc1)
    res = collapse(m)
    assert [lk.first for lk in res.merged] == ["fc1"]
    torch.manual_seed(1)
    fresh = collapse(Chain(), links=res.merged).model  # fc0 has negative weights now
    fresh.load_state_dict(res.model.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), res.model(x))


@pytest.mark.parametrize("op", ["view_sub_", "slice_mul_", "torch_neg_"])
def test_a_view_changed_in_place_has_no_sign(op):
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc0, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            _make_nonneg_(self.fc1)

        def forward(self, x):
            h = F.relu(self.fc0(x))
            if op == "view_sub_":
                h.view(-1).sub_(5.0)
            elif op == "slice_mul_":
                h[:, :].mul_(-1.0)
            else:
                torch.neg_(h)
            return self.fc2(F.relu(self.fc1(h)))

    m = Alias().eval()
    res = collapse(m)
    assert res.merged == []
    x = torch.randn(5, 4)
    torch.testing.assert_close(res.model(x), m(x))
