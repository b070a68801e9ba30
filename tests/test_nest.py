import pytest
import torch
from torch import nn

import nestedsparse as ns
from nestedsparse.nest import NestedBatchNorm, dense_weight


SPEC = ns.LevelSpec((0.1, 0.3, 0.6, 1.0))


def test_nestify_any_module_reports_and_nests(tiny_conv):
    model = nn.Sequential(tiny_conv, nn.Embedding(3, 4))
    report = ns.nestify_(model, SPEC)
    assert len(report.nested) == 5
    assert ("1", "Embedding is not supported") in report.skipped
    assert len(report.batchnorms) == 1 and isinstance(tiny_conv.features[1], NestedBatchNorm)
    for name, mod, m in ns.iter_nested(model):
        assert m.level_map.dtype == torch.uint8
        n = m.level_map.numel()
        for k, d in enumerate(SPEC.densities):
            assert abs(int((m.level_map <= k).sum()) - d * n) <= 1, name  # within one weight
            if k:
                assert bool(((m.level_map <= k - 1) <= (m.level_map <= k)).all())


def test_level_forward_uses_exactly_masked_weights(tiny_mlp):
    x = torch.randn(3, 7)
    ref = [l for l in tiny_mlp if isinstance(l, nn.Linear)]
    ws = [l.weight.detach().clone() for l in ref]
    ns.nestify_(tiny_mlp, SPEC)
    for k in range(SPEC.num_levels):
        with ns.use_level(tiny_mlp, k):
            out = tiny_mlp(x)
        h = x
        for i, (l, w) in enumerate(zip(ref, ws)):
            m = l.parametrizations.weight[0].level_map <= k
            h = torch.nn.functional.linear(h, w * m, l.bias)
            if i < 2:
                h = torch.relu(h)
        torch.testing.assert_close(out, h)


def test_inactive_weights_get_no_gradient(tiny_conv):
    ns.nestify_(tiny_conv, SPEC)
    x = torch.randn(2, 3, 6, 6)
    for k in range(SPEC.num_levels):
        tiny_conv.zero_grad()
        with ns.use_level(tiny_conv, k):
            tiny_conv(x).square().sum().backward()
        for _, mod, m in ns.iter_nested(tiny_conv):
            g = dense_weight(mod).grad
            assert bool((g[m.level_map > k] == 0).all())


def test_own_routing_updates_only_weights_first_active_at_level(tiny_mlp):
    ns.nestify_(tiny_mlp, SPEC)
    ns.set_routing_(tiny_mlp, "own")
    x = torch.randn(4, 7)
    with ns.use_level(tiny_mlp, 2):
        tiny_mlp(x).square().sum().backward()
    for _, mod, m in ns.iter_nested(tiny_mlp):
        g = dense_weight(mod).grad
        assert bool((g[m.level_map != 2] == 0).all())
        assert bool((g[m.level_map == 2] != 0).any())
    with pytest.raises(ValueError, match="allowed: sum, mean, own, frozen-core"):
        ns.set_routing_(tiny_mlp, "mine")


def test_tied_weights_share_one_level_map():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    report = ns.nestify_(model, ns.LevelSpec((0.25, 1.0)))
    assert report.tied == [("2", "0")]
    assert a.parametrizations.weight[0] is b.parametrizations.weight[0]
    assert a.parametrizations.weight.original is b.parametrizations.weight.original
    assert len(list(ns.iter_nested(model))) == 1


def test_empty_layer_stays_dense_and_the_model_packs(tmp_path):
    from nestedsparse.pack import load_packed, pack

    class Net(nn.Module):  # an optional head configured away to zero outputs
        def __init__(self):
            super().__init__()
            self.a, self.e = nn.Linear(4, 3), nn.Linear(4, 0)

        def forward(self, x):
            return torch.cat([self.a(x), self.e(x)], 1)

    build = Net
    model = build()
    report = ns.nestify_(model, ns.LevelSpec((0.5, 1.0)))
    assert report.nested == ["a"] and report.skipped == [("e", "empty weight (0, 4): nothing to prune")]
    pack(model).save(tmp_path / "e.nsp")
    x = torch.randn(2, 4)
    torch.testing.assert_close(load_packed(tmp_path / "e.nsp", build)(x, level=0), ns.plain_model(model, 0)(x))


def test_filter_fn_and_no_supported_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    report = ns.nestify_(model, ns.LevelSpec((0.5, 1.0)), filter_fn=lambda m, name: name != "1")
    assert report.nested == ["0"] and report.skipped == [("1", "excluded by filter_fn")]
    with pytest.raises(ValueError, match="no Linear/Conv1d/Conv2d"):
        ns.nestify_(nn.Sequential(nn.ReLU()), ns.LevelSpec((0.5, 1.0)))
    with pytest.raises(ValueError, match="already nested"):
        ns.nestify_(model, ns.LevelSpec((0.5, 1.0)))


def test_set_level_errors_and_per_layer_levels(tiny_conv):
    ns.nestify_(tiny_conv, SPEC)
    with pytest.raises(ValueError, match="out of range: this model has levels 0..3"):
        ns.set_level_(tiny_conv, 4)
    with pytest.raises(KeyError, match="matches no nested layer"):
        ns.set_level_(tiny_conv, {"nope": 1})
    ns.set_level_(tiny_conv, {"features": 3, "classifier": 0})
    levels = ns.get_levels(tiny_conv)
    assert levels["features.0"] == 3 and levels["features.1"] == 3 and levels["classifier.1"] == 0
    with ns.use_level(tiny_conv, 1):
        assert set(ns.get_levels(tiny_conv).values()) == {1}
    assert ns.get_levels(tiny_conv) == levels  # restored


def test_rerouting_partway_equals_manual_composition(tiny_conv):
    ns.nestify_(tiny_conv, SPEC)
    tiny_conv.eval()
    x = torch.randn(2, 3, 6, 6)
    with ns.use_level(tiny_conv, {"features": 3, "classifier": 0}):
        mixed = tiny_conv(x)
    with ns.use_level(tiny_conv, 3):
        h = tiny_conv.pool(tiny_conv.features(x))
    with ns.use_level(tiny_conv, 0):
        manual = tiny_conv.classifier(h)
        sparse = tiny_conv(x)
    torch.testing.assert_close(mixed, manual)
    assert not torch.allclose(mixed, sparse)


def test_batchnorm_statistics_kept_per_level(tiny_conv):
    ns.nestify_(tiny_conv, SPEC)
    bn = tiny_conv.features[1]
    x = torch.randn(4, 3, 6, 6)
    with ns.use_level(tiny_conv, 0):
        tiny_conv(x)
    assert int(bn.num_batches_tracked[0]) == 1 and int(bn.num_batches_tracked[3]) == 0
    assert not torch.equal(bn.running_mean[0], bn.running_mean[3])
    tiny_conv.eval()
    with ns.use_level(tiny_conv, 0):
        y0 = tiny_conv.features[:2](x)
        conv0 = tiny_conv.features[0](x)
    ref = torch.nn.functional.batch_norm(conv0, bn.running_mean[0], bn.running_var[0], bn.weight, bn.bias, False, 0.0,
                                         bn.eps)
    torch.testing.assert_close(y0, ref)


@pytest.mark.parametrize("block", [(1, 2), (1, 4), (2, 2)])
def test_block_selection_keeps_whole_blocks(block):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    ns.nestify_(model, ns.LevelSpec((0.25, 0.5, 1.0)), block=block)
    br, bc = block
    for _, _, m in ns.iter_nested(model):
        lm = m.level_map
        rows, cols = lm.shape
        for r in range(0, rows - rows % br, br):
            for c in range(0, cols - cols % bc, bc):
                tile = lm[r : r + br, c : c + bc]
                assert bool((tile == tile[0, 0]).all())


def test_models_from_registry_nest_and_run():
    from nestedsparse import models

    for name in ["mlp", "lenet5", "resnet20", "mobilenet_v1"]:
        in_ch = 1 if name in ("mlp", "lenet5") else 3
        model = models.create(name, num_classes=10)
        ns.nestify_(model, ns.LevelSpec((0.1, 1.0)))
        size = 28 if in_ch == 1 else 32
        with ns.use_level(model, 0):
            assert model(torch.randn(2, in_ch, size, size)).shape == (2, 10)


def test_nested_batchnorm_checks_input_rank(tiny_conv):
    ns.nestify_(tiny_conv, SPEC)
    with pytest.raises(ValueError, match="expected a 4D input, got 3D"):
        tiny_conv.features[1](torch.randn(2, 6, 5))


def test_nestify_keeps_train_eval_mode():
    """Nestifying an eval-mode model must not switch its BatchNorms to batch statistics."""
    for training in (False, True):
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        m.train(training)
        with torch.no_grad():
            m[1].running_mean.uniform_(-1, 1)
        x = torch.randn(5, 3, 8, 8)
        ref = m(x).detach() if not training else None
        ns.nestify_(m, ns.LevelSpec((0.5, 1.0)))
        assert all(mod.training == training for mod in m.modules())
        if not training:
            with ns.use_level(m, 1):
                torch.testing.assert_close(m(x), ref)
