"""Consensus of levels (NestedNet A and L) on nested models and packed runtimes."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import nestedsparse as ns
from nestedsparse.cli import main
from nestedsparse.train import LevelConsensus, consensus_accuracy, fit_consensus


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + x[:, 2] > 0).long() * 2
    return TensorDataset(x, y)


def _trained(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 4))
    ns.nestify_(m, ns.LevelSpec((0.15, 0.4, 1.0)))
    ns.train(m, _data(), None, ns.TrainConfig(epochs=2, batch_size=64, lr=0.1, progress=False))
    return m.eval()


def test_average_is_the_mean_probability_and_linear_starts_as_mean_logits():
    m = _trained()
    x = torch.randn(9, 6)
    outs = []
    for k in range(3):
        with ns.use_level(m, k):
            outs.append(m(x))
    a = LevelConsensus(m, mode="average")
    torch.testing.assert_close(a(x).exp(), torch.stack([o.softmax(-1) for o in outs]).mean(0))
    lin = LevelConsensus(m, [0, 2], mode="linear", num_classes=4)
    torch.testing.assert_close(lin(x), (outs[0] + outs[2]) / 2)
    assert m[0].parametrizations.weight[0].level == 2  # levels restored after the votes


def test_fit_trains_only_the_head_and_lowers_its_loss():
    m = _trained()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cons = LevelConsensus(m, mode="linear", num_classes=4)
    x, y = _data(seed=3).tensors
    with torch.no_grad():
        start = float(F.cross_entropy(cons(x), y))
    hist = fit_consensus(cons, _data(seed=3), epochs=4, lr=0.05)
    assert len(hist) == 4
    with torch.no_grad():
        assert float(F.cross_entropy(cons(x), y)) < start
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    got = consensus_accuracy(cons, _data(seed=4))
    assert set(got["levels"]) == {0, 1, 2} and 0.0 <= got["accuracy"] <= 1.0
    # the ensemble of the levels is at least as good as its worst member here
    assert got["accuracy"] >= min(got["levels"].values())


def test_consensus_over_a_packed_runtime_matches_the_nested_model(tmp_path):
    m = _trained()
    path = tmp_path / "m.nsp"
    from nestedsparse.pack import load_packed, pack

    pack(m).save(path)
    rt = load_packed(path, lambda: nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 4)))
    x = torch.randn(5, 6)
    torch.testing.assert_close(LevelConsensus(rt, mode="average")(x), LevelConsensus(m, mode="average")(x),
                               rtol=1e-4, atol=1e-5)


def test_bad_consensus_arguments():
    m = _trained()
    with pytest.raises(ValueError, match="unknown"):
        LevelConsensus(m, mode="vote")
    with pytest.raises(ValueError, match="two distinct"):
        LevelConsensus(m, [1, 1])
    with pytest.raises(ValueError, match="num_classes"):
        LevelConsensus(m, mode="linear")
    with pytest.raises(ValueError):
        LevelConsensus(m, [0, 3])
    with pytest.raises(ValueError, match="nested model"):
        LevelConsensus(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="only a mode='linear'"):
        fit_consensus(LevelConsensus(m), _data())


def test_cli_eval_consensus(tmp_path, capsys):
    run = tmp_path / "c"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.2,1.0", "--epochs", "1",
                 "--batch-size", "64", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--consensus"]) == 0
    assert "consensus" in capsys.readouterr().out
    got = json.loads((run / "eval.json").read_text())["consensus"]
    assert [r["consensus"] for r in got] == ["A", "L"] and all(0 <= r["accuracy"] <= 1 for r in got)
    lv = json.loads((run / "eval.json").read_text())["levels"]
    assert got[0]["macs"] == sum(r["macs"] for r in lv)
