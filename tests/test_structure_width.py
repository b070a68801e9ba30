"""Channel scheduling (NestedNet): level k is the thin network of the leading channels."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import nestedsparse as ns
from nestedsparse.levels import check_nested
from nestedsparse.structure import ChannelSelector, channel_counts, channel_level_maps


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def _nested_convnet(widths=(0.5, 1.0)):
    m = _convnet()
    ns.nestify_(m, ns.LevelSpec((0.25, 1.0)))
    ChannelSelector(widths).apply_(m)
    m.train()
    for _ in range(3):  # per-level BatchNorm statistics
        for k in range(2):
            with ns.use_level(m, k):
                m(torch.randn(8, 3, 6, 6))
    return m.eval()


def test_counts_and_mlp_maps():
    assert channel_counts(10, (0.25, 0.5, 1.0)) == [3, 5, 10] and channel_counts(3, (0.1, 1.0)) == [1, 3]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    ns.nestify_(m, ns.LevelSpec((0.25, 1.0)))
    maps = channel_level_maps(m, (0.5, 1.0))
    want0 = torch.zeros(8, 6, dtype=torch.uint8)
    want0[4:] = 1  # first layer: every input (the model's input is not divided), leading 4 outputs
    assert torch.equal(maps["0"], want0)
    mid = torch.ones(8, 8, dtype=torch.uint8)
    mid[:4, :4] = 0
    assert torch.equal(maps["2"], mid)
    last = torch.zeros(3, 8, dtype=torch.uint8)
    last[:, 4:] = 1  # the classes are never divided; only the leading inputs at level 0
    assert torch.equal(maps["4"], last)


def test_level0_is_the_thin_network():
    m = _nested_convnet()
    thin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),  # group 0 of the grouped conv, whole
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        w = [mod.parametrizations.weight.original for mod in (m[0], m[3], m[7])]
        thin[0].weight.copy_(w[0][:4])
        thin[0].bias.copy_(m[0].bias[:4])
        bn = m[1]
        thin[1].weight.copy_(bn.weight[:4])
        thin[1].bias.copy_(bn.bias[:4])
        thin[1].running_mean.copy_(bn.running_mean[0, :4])
        thin[1].running_var.copy_(bn.running_var[0, :4])
        thin[3].weight.copy_(w[1][:4])
        thin[3].bias.copy_(m[3].bias[:4])
        thin[7].weight.copy_(w[2][:, :16])
        thin[7].bias.copy_(m[7].bias)
    x = torch.randn(4, 3, 6, 6)
    with ns.use_level(m, 0):
        torch.testing.assert_close(m(x), thin(x), rtol=1e-5, atol=1e-5)


def test_resnet_maps_nest_and_pack_and_run(tmp_path):
    from nestedsparse import models
    from nestedsparse.pack import load_packed, pack

    torch.manual_seed(0)
    m = models.create("resnet20", in_channels=3)
    spec = ns.LevelSpec((0.0625, 0.25, 1.0))
    ns.nestify_(m, spec)
    maps = channel_level_maps(m, (0.25, 0.5, 1.0))
    for name, lm in maps.items():
        check_nested(lm, spec.num_levels)
        if name not in ("stem.0", "classifier"):
            assert [round(float((lm <= k).float().mean()), 4) for k in range(3)] == [0.0625, 0.25, 1.0]
    ChannelSelector((0.25, 0.5, 1.0)).apply_(m)
    m.eval()
    path = tmp_path / "r.nsp"
    pack(m, model_name="resnet20", model_kwargs={"in_channels": 3}).save(path)
    rt = load_packed(path)
    x = torch.randn(2, 3, 32, 32)
    for k in range(3):
        with ns.use_level(m, k):
            torch.testing.assert_close(rt(x, level=k), m(x), rtol=1e-4, atol=1e-4)


def test_trains_with_the_channels_selector():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ns.nestify_(m, ns.LevelSpec((0.25, 1.0)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    res = ns.train(m, data, data, ns.TrainConfig(epochs=2, batch_size=32, selector="channels", progress=False))
    lm = m[0].parametrizations.weight[0].level_map
    assert int((lm == 0).sum()) == 8 * 6  # sqrt(0.25) = half the hidden units at level 0
    assert len(res.final) == 2


def test_bad_widths():
    m = _convnet()
    ns.nestify_(m, ns.LevelSpec((0.25, 1.0)))
    for bad in ((0.5,), (0.5, 0.9), (1.0, 1.0), (0.0, 1.0)):
        with pytest.raises(ValueError, match="widths"):
            channel_level_maps(m, bad)


def test_cli_channels(tmp_path, capsys):
    import json

    from nestedsparse.cli import main

    run = tmp_path / "w"
    args = ["train", "--model", "lenet5", "--dataset", "synthetic", "--densities", "0.25,1.0", "--selector", "channels",
            "--widths", "0.5,1.0", "--epochs", "1", "--max-steps-per-epoch", "3", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert main(["eval", str(run)]) == 0
    lv = json.loads((run / "eval.json").read_text())["levels"]
    assert lv[0]["macs"] < 0.45 * lv[1]["macs"]  # half the channels: about a quarter of the interior MACs
    assert main(args[:-3] + ["--widths", "0.5,1.0", "--selector", "magnitude", "--out", str(tmp_path / "x")]) == 2
    assert "need --selector channels" in capsys.readouterr().err
    sparse_run = tmp_path / "ws"
    assert main(args[:-3] + ["--sparse-channels", "--densities", "0.1,1.0", "--out", str(sparse_run),
                             "--no-progress"]) == 0
    assert main(["eval", str(sparse_run)]) == 0
    lv_ws = json.loads((sparse_run / "eval.json").read_text())["levels"]
    assert lv_ws[0]["density"] < lv[0]["density"] and lv_ws[0]["macs"] < lv[0]["macs"]


def _dropped_channels_leak(m, x, widths):
    """How much level 0's output moves when only BatchNorm shifts of channels level 0 drops move:
    0 for a true thin network."""
    import copy

    from nestedsparse.nest import NestedBatchNorm

    ns.nestify_(m, ns.LevelSpec((0.5, 1.0)))
    ChannelSelector(widths).apply_(m)
    m.eval()
    p = copy.deepcopy(m)
    with torch.no_grad():
        for mod in p.modules():
            if isinstance(mod, NestedBatchNorm):
                mod.bias[channel_counts(mod.num_features, widths)[0]:] += 5.0
    with ns.use_level(m, 0), ns.use_level(p, 0), torch.no_grad():
        return float((m(x) - p(x)).abs().max())


@pytest.mark.parametrize("name,kw,shape", [("resnet20", {"in_channels": 3}, (3, 32, 32)),
                                           ("wrn", {"in_channels": 3}, (3, 32, 32)),
                                           ("mobilenet_v1", {"in_channels": 3}, (3, 32, 32)),
                                           ("lenet5", {}, (1, 28, 28))])
def test_registry_models_level0_ignores_dropped_channels(name, kw, shape):
    from nestedsparse import models

    torch.manual_seed(0)
    assert _dropped_channels_leak(models.create(name, **kw), torch.randn(2, *shape), (0.5, 1.0)) == 0.0


def test_channel_moving_ops_are_refused():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x).relu(), self.b(x).relu()], 1))

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 4)

        def forward(self, x):
            return self.fc(self.a(x).relu().permute(0, 2, 3, 1).flatten(1))

    for m in (Cat(), ChannelsLast()):
        ns.nestify_(m, ns.LevelSpec((0.25, 1.0)))
        with pytest.raises(ValueError, match="cannot follow channels"):
            channel_level_maps(m, (0.5, 1.0))
    half = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    ns.nestify_(half, ns.LevelSpec((0.25, 1.0)), filter_fn=lambda mod, name: name != "2")
    with pytest.raises(ValueError, match="not nested"):
        channel_level_maps(half, (0.5, 1.0))


def test_flatten_by_view_of_the_batch_size_is_followed():
    class ViewFlat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 4 * 4, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.a(x)))
            return self.fc(h.view(h.shape[0], -1))

    torch.manual_seed(0)
    assert _dropped_channels_leak(ViewFlat(), torch.randn(2, 3, 4, 4), (0.5, 1.0)) == 0.0


def test_width_times_sparsity_is_nested_inside_the_channels():
    from nestedsparse import models
    from nestedsparse.structure import width_sparsity_maps

    torch.manual_seed(0)
    m = models.create("resnet20", in_channels=3)
    spec = ns.LevelSpec((0.05, 0.2, 1.0), allocation="erk")  # ERK: small layers' counts outgrow their channels
    ns.nestify_(m, spec)
    widths = (0.5, 0.75, 1.0)
    ws, cm = width_sparsity_maps(m, widths), channel_level_maps(m, widths)
    kept, budget, room = [0] * 3, [0] * 3, [0] * 3
    for name, _, mask in ns.iter_nested(m):
        lm = ws[name]
        check_nested(lm, 3)
        for k in range(3):
            active, thin = lm <= k, cm[name] <= k
            assert bool((active <= thin).all())  # only inside level k's channels
            # at least the allocation capped by the channels (more where another layer's cap freed some)
            assert int(active.sum()) >= min(int((mask.level_map <= k).sum()), int(thin.sum()))
            kept[k] += int(active.sum())
            budget[k] += int((mask.level_map <= k).sum())
            room[k] += int(thin.sum())
    for k in range(3):  # each level keeps its budget where its channels can hold it
        assert kept[k] == min(budget[k], room[k]), (k, kept, budget, room)
    wt = m.layer2[1].conv1.parametrizations.weight.original.detach().abs()
    lm, thin = ws["layer2.1.conv1"], cm["layer2.1.conv1"] <= 0
    assert float(wt[lm <= 0].min()) >= float(wt[thin & (lm > 0)].max())
    with pytest.raises(ValueError, match="explicit widths"):
        ChannelSelector(sparse=True)
    ChannelSelector(widths, sparse=True).apply_(m)
    assert torch.equal(m.layer2[1].conv1.parametrizations.weight[0].level_map, ws["layer2.1.conv1"])


def test_a_resumed_run_keeps_its_width_sparsity_maps():
    m = _convnet()
    ns.nestify_(m, ns.LevelSpec((0.25, 1.0)))
    sel = ChannelSelector((0.5, 1.0), sparse=True)
    sel.begin(m, 10)
    before = {n: mk.level_map.clone() for n, _, mk in ns.iter_nested(m)}
    with torch.no_grad():  # training moved the weights; a resumed selector must not re-rank them
        for p in m.parameters():
            p.mul_(torch.rand_like(p))
    resumed = ChannelSelector((0.5, 1.0), sparse=True)
    resumed.load_state_dict({**sel.state_dict(), "step_count": 4})
    resumed.begin(m, 10)
    assert all(torch.equal(mk.level_map, before[n]) for n, _, mk in ns.iter_nested(m))


def test_width_sparsity_keeps_its_channels_with_a_nan_weight():
    from nestedsparse.structure import width_sparsity_maps

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[2].weight[7, 7, 0, 0] = float("nan")
    ns.nestify_(m, ns.LevelSpec((0.1, 1.0)))
    ws, cm = width_sparsity_maps(m, (0.5, 1.0)), channel_level_maps(m, (0.5, 1.0))
    assert int(((ws["2"] <= 0) & ~(cm["2"] <= 0)).sum()) == 0 and int((ws["2"] <= 0).sum()) > 0
