"""Hierarchical classification (NestedNet): coarse levels inside a fine network."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import nestedsparse as ns
from nestedsparse.cli import main
from nestedsparse.data import resolve_hierarchy
from nestedsparse.train import Hierarchy, coarse_logits, nested_loss

MAP = torch.tensor([0, 0, 1, 1, 1, 2])  # 6 fine classes in 3 coarse groups


def test_coarse_logits_sum_the_fine_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=g) * 30  # large logits: a naive exp-sum would overflow float32
    got = coarse_logits(logits, MAP).softmax(-1)
    p = logits.double().softmax(-1)
    want = torch.stack([p[:, MAP == c].sum(-1) for c in range(3)], -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(coarse_logits(logits * 100, MAP)).all()
    with pytest.raises(ValueError, match="maps 6 fine classes"):
        coarse_logits(torch.randn(2, 5), MAP)


def _model(levels=(0.3, 1.0)):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
    ns.nestify_(m, ns.LevelSpec(levels))
    return m.eval()


def test_nested_loss_gives_coarse_levels_the_coarse_task():
    m = _model()
    x, y = torch.randn(8, 4), torch.arange(8) % 6
    h = Hierarchy(MAP, coarse_levels=1)
    loss, parts = nested_loss(m, x, y, [1, 0], hierarchy=h)
    with ns.use_level(m, 0):
        l0 = m(x)
    with ns.use_level(m, 1):
        l1 = m(x)
    c0 = F.cross_entropy(coarse_logits(l0, MAP), MAP[y])
    torch.testing.assert_close(parts[0], c0.detach())
    torch.testing.assert_close(parts[1], F.cross_entropy(l1, y).detach())
    torch.testing.assert_close(loss, (c0 + F.cross_entropy(l1, y)) / 2)
    # distillation of a coarse level: the teacher's summed probability per coarse class
    T, d = 2.0, 0.5
    dl, _ = nested_loss(m, x, y, [1, 0], hierarchy=h, distill=d, temperature=T)
    def group_probs(z):  # summed softened class probabilities per superclass, written out
        p = (z / T).softmax(-1)
        return torch.stack([p[:, MAP == c].sum(-1) for c in range(3)], -1)

    pt, ps = group_probs(l1.detach()), group_probs(l0)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    torch.testing.assert_close(dl, (F.cross_entropy(l1, y) + (1 - d) * c0 + d * kl * T**2) / 2)
    # a student equal to its teacher has nothing to learn, whatever the temperature
    same, _ = nested_loss(m, x, y, [0, 0], hierarchy=h, distill=1.0, temperature=4.0)
    torch.testing.assert_close(same, c0 / 2)  # the coarse KL of a level against itself is 0


def _coarse_task(n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    coarse = (x[:, 0] > 0.4).long() + (x[:, 0] > -0.4).long()  # 3 groups, easy
    within = (x[:, 1] > 0).long()                             # the fine split is a second feature
    fine = torch.tensor([0, 2, 5])[coarse] + torch.where(coarse == 1, within + (x[:, 2] > 0).long(),
                                                          torch.where(coarse == 0, within, torch.zeros_like(within)))
    return TensorDataset(x, fine)


def test_training_with_a_hierarchy_reports_coarse_accuracy():
    m = _model()
    cfg = ns.TrainConfig(epochs=6, batch_size=32, lr=0.1, hierarchy=tuple(MAP.tolist()), coarse_levels=1,
                         progress=False)
    res = ns.train(m, _coarse_task(), _coarse_task(seed=1), cfg)
    rows = {r["level"]: r for r in res.final}
    assert rows[0]["coarse"] and not rows[1]["coarse"]
    assert rows[0]["coarse_accuracy"] > 0.85  # three well-separated groups, 6 epochs
    assert rows[1]["coarse_accuracy"] > 0.85 and rows[1]["accuracy"] > 0.6
    with pytest.raises(ValueError, match="leaves no fine level"):
        ns.train(_model(), _coarse_task(), None, ns.TrainConfig(epochs=1, hierarchy="fashion-mnist", coarse_levels=2))


def test_hierarchy_maps_are_checked():
    assert resolve_hierarchy("fashion-mnist").tolist() == [0, 1, 0, 2, 3, 5, 0, 5, 4, 5]
    assert resolve_hierarchy([1, 0, 1]).tolist() == [1, 0, 1]
    for bad, msg in (("nope", "unknown"), ([0, 2], "0..C-1"), ([-1, 0], ">= 0"), (["a"], "list of coarse")):
        with pytest.raises(ValueError, match=msg):
            resolve_hierarchy(bad)
    with pytest.raises(ValueError, match="model has 6 classes"):
        resolve_hierarchy("fashion-mnist", num_fine=6)
    with pytest.raises(ValueError, match="unknown"):
        ns.TrainConfig(hierarchy="nope")
    with pytest.raises(ValueError, match="coarse_levels"):
        ns.TrainConfig(coarse_levels=0)


def test_cli_train_and_eval_with_a_hierarchy(tmp_path, capsys):
    run = tmp_path / "h"
    args = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.2,1.0", "--epochs", "1",
            "--batch-size", "64", "--hierarchy", "0,0,1,1,2,2,3,3,4,4", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert json.loads((run / "run.json").read_text())["config"]["hierarchy"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "coarse_accuracy" in capsys.readouterr().out
    levels = json.loads((run / "eval.json").read_text())["levels"]
    assert [r["coarse"] for r in levels] == [True, False]
    assert all(0.0 <= r["coarse_accuracy"] <= 1.0 for r in levels)
    with pytest.raises(SystemExit):
        main(args[:-3] + ["--hierarchy", "x,y", "--out", str(run)])


def test_the_map_can_come_from_the_datasets_own_coarse_labels(tmp_path, capsys):
    from nestedsparse.data import mapping_from_dataset
    from nestedsparse.data._common import ImageDataset

    fine = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    ds = ImageDataset(torch.zeros(8, 1, 2, 2), fine, name="toy", classes=list("abcdef"),
                      coarse_targets=MAP[fine], coarse_classes=["x", "y", "z"])
    assert mapping_from_dataset(ds) == tuple(MAP.tolist())
    bad = ImageDataset(torch.zeros(8, 1, 2, 2), fine, name="toy", classes=list("abcdef"),
                       coarse_targets=torch.tensor([0, 0, 1, 1, 1, 2, 1, 1]), coarse_classes=["x", "y", "z"])
    with pytest.raises(ValueError, match="not a function"):
        mapping_from_dataset(bad)
    with pytest.raises(ValueError, match="no coarse labels"):
        mapping_from_dataset(TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1])))
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.5,1.0", "--epochs", "1",
                 "--hierarchy", "data", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "no coarse labels" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed")
def test_fashion_mnist_coarse_labels_give_the_named_map():
    from nestedsparse.data import load_dataset, mapping_from_dataset

    got = mapping_from_dataset(load_dataset("fashion-mnist", split="test"))
    assert got == tuple(resolve_hierarchy("fashion-mnist").tolist())
