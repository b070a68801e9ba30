import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import nestedsparse as ns
from nestedsparse.nest import dense_weight
from nestedsparse.train import nested_loss, sample_levels
from nestedsparse.train.trainer import TrainConfig

SPEC = ns.LevelSpec((0.2, 0.5, 1.0))


def _data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    return TensorDataset(x, y)


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 3))
    ns.nestify_(m, SPEC)
    return m


def test_nested_loss_is_mean_of_level_losses():
    m = _model()
    ds = _data()
    x, y = ds.tensors[0][:16], ds.tensors[1][:16]
    m.eval()
    loss, parts = nested_loss(m, x, y, [2, 1, 0])
    manual = []
    for k in range(3):
        with ns.use_level(m, k):
            manual.append(nn.functional.cross_entropy(m(x), y))
    torch.testing.assert_close(loss, sum(manual) / 3)
    assert set(parts) == {0, 1, 2}
    w_loss, _ = nested_loss(m, x, y, [2, 0], weights=[3.0, 1.0])
    torch.testing.assert_close(w_loss, 0.75 * manual[2] + 0.25 * manual[0])
    with pytest.raises(ValueError, match="non-negative"):
        nested_loss(m, x, y, [2, 0], weights=[1.0])


def test_sum_routing_gradient_is_sum_of_containing_levels():
    m = _model()
    m.eval()
    x, y = _data().tensors[0][:8], _data().tensors[1][:8]
    w = dense_weight(m[0])
    loss, _ = nested_loss(m, x, y, [2, 1, 0])
    (g_joint,) = torch.autograd.grad(loss, w)
    grads = []
    for k in range(3):
        with ns.use_level(m, k):
            grads.append(torch.autograd.grad(nn.functional.cross_entropy(m(x), y), w)[0])
    torch.testing.assert_close(g_joint, sum(grads) / 3)


def test_distillation_changes_sparse_levels_only():
    m = _model()
    m.eval()
    x, y = _data().tensors[0][:8], _data().tensors[1][:8]
    plain, _ = nested_loss(m, x, y, [2])
    dist, _ = nested_loss(m, x, y, [2], distill=0.5)
    torch.testing.assert_close(plain, dist)  # the teacher alone is untouched
    a, _ = nested_loss(m, x, y, [2, 0])
    b, _ = nested_loss(m, x, y, [2, 0], distill=0.5)
    assert not torch.allclose(a, b)


def test_sandwich_sampling():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        lv = sample_levels(range(5), "sandwich", g)
        assert lv[0] == 4 and lv[-1] == 0 and len(lv) == 3 and 0 < lv[1] < 4
    assert sample_levels(range(3), "all") == [2, 1, 0]
    with pytest.raises(ValueError, match="allowed: all, sandwich"):
        sample_levels(range(3), "some")


def test_train_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.routing='x' is unknown; allowed: sum, mean, own, frozen-core"):
        TrainConfig(routing="x")
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)


@pytest.mark.parametrize("routing", ["sum", "own"])
@pytest.mark.parametrize("selector", ["magnitude", "nestednet"])
def test_training_learns_and_keeps_invariants(tmp_path, routing, selector):
    m = _model()
    ds = _data()
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.1, routing=routing, selector=selector, progress=False)
    res = ns.train(m, ds, ds, cfg, run_dir=tmp_path)
    assert res.final[-1]["accuracy"] > 0.6
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(6)) and len(lines[-1]["levels"]) == 3
    for _, _, mk in ns.iter_nested(m):
        for k, d in enumerate(SPEC.densities):
            assert abs(int((mk.level_map <= k).sum()) - d * mk.level_map.numel()) <= 1


def test_frozen_core_never_changes_inner_levels():
    m = _model()
    ds = _data()
    outs = {}

    def snapshot(info):
        step = info["step"]
        m.eval()
        with torch.no_grad(), ns.use_level(m, 0):
            outs[step] = m(ds.tensors[0][:32]).clone()
        m.train()

    cfg = TrainConfig(epochs=6, batch_size=32, routing="frozen-core", progress=False,
                      selector_args={"end": 0.25})
    ns.train(m, ds, None, cfg, callback=snapshot)
    steps = sorted(outs)
    total = len(steps)
    sel_end, span = int(0.25 * total), -(-(total - int(0.25 * total)) // 3)
    core_done = sel_end + span  # from here on level 0 is frozen
    after = [outs[s] for s in steps if s >= core_done]
    assert len(after) > 3
    for o in after[1:]:
        torch.testing.assert_close(o, after[0], rtol=0, atol=0)


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    ds = _data(256)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, progress=False, seed=3)
    full = ns.train(_model(), ds, ds, cfg, run_dir=tmp_path / "full")

    class Kill(Exception):
        pass

    def die(info):
        if info["epoch"] == 1 and info["step"] == 8 + 3:  # mid-way through epoch 2
            raise Kill

    with pytest.raises(Kill):
        ns.train(_model(), ds, ds, cfg, run_dir=tmp_path / "cut", callback=die)
    resumed = ns.train(_model(seed=99), ds, ds, cfg, run_dir=tmp_path / "cut", resume=True)
    for a, b in zip(full.final, resumed.final):
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.003
    assert len(resumed.history) == 3


def test_mean_routing_gives_each_weight_the_mean_of_its_levels_gradients():
    m = _model()
    m.eval()
    ns.set_routing_(m, "mean")
    x, y = _data().tensors[0][:8], _data().tensors[1][:8]
    w = dense_weight(m[0])
    lm = m[0].parametrizations.weight[0].level_map
    loss, _ = nested_loss(m, x, y, [2, 1, 0])
    (g_mean,) = torch.autograd.grad(loss, w)
    ns.set_routing_(m, "sum")
    grads = []
    for k in range(3):
        with ns.use_level(m, k):
            grads.append(torch.autograd.grad(nn.functional.cross_entropy(m(x), y), w)[0])
    containing = torch.stack([(lm <= k).float() for k in range(3)]).sum(0)  # levels holding each weight
    torch.testing.assert_close(g_mean, sum(grads) / containing)
