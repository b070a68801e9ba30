"""Slimming: a level becomes a smaller dense network without the channels only zero weights read."""
import importlib

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401 - torch.nn.utils.prune below
from torch import nn

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.nest import iter_nested_bn, plain_model
from nestedsparse.structure import ChannelSelector, channel_counts, slim, slim_model

slim_mod = importlib.import_module("nestedsparse.structure.slim")  # the module (the package's `slim` is the function)

WIDTHS = (0.25, 0.5, 1.0)


def _channel_model(name, **kw):
    torch.manual_seed(0)
    m = models.create(name, **kw)
    ns.nestify_(m, ns.LevelSpec((0.0625, 0.25, 1.0)))
    ChannelSelector(WIDTHS).apply_(m)
    g = torch.Generator().manual_seed(1)
    for _, bn in iter_nested_bn(m):  # other statistics per level, so a wrong level's BatchNorm shows
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return m.eval()


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("name,kw", [("resnet20", {"in_channels": 3}), ("mobilenet_v1", {"width_mult": 0.5}),
                                     ("lenet5", {})])
def test_channel_levels_become_their_thin_networks(name, kw):
    m = _channel_model(name, **kw)
    x = torch.randn(3, *m.input_shape)
    full = {n: (getattr(c, "out_channels", getattr(c, "out_features", 0))) for n, c in _convs(plain_model(m)).items()}
    last = list(full)[-1]
    for k in range(3):
        s, rep = slim_model(m, k, report=True)
        ref = plain_model(m, k).eval()
        with torch.no_grad():
            torch.testing.assert_close(s(x), ref(x), rtol=1e-4, atol=1e-5)
        for n, layer in _convs(s).items():
            out = getattr(layer, "out_channels", getattr(layer, "out_features", 0))
            want = full[n] if n == last else channel_counts(full[n], WIDTHS)[k]  # classes are never divided
            assert out == want, (n, k, out, want)
            assert rep.layers[n]["out_after"] == out and rep.layers[n]["out_before"] == full[n]
        assert rep.params_after == sum(p.numel() for p in s.parameters())
        if k == 0:  # a quarter of the channels: about 1/16 of the weights
            assert rep.params_after < 0.08 * rep.params_before
        if k == 2:
            assert rep.params_after == rep.params_before
    assert all(not hasattr(mod, "parametrizations") for mod in s.modules())  # plain: no masks left


def test_any_plain_model_loses_unread_channels():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[2].weight[:, [2, 5]] = 0  # hidden units 2 and 5 of the first layer are never read
        m[4].weight[:, 7] = 0
    x = torch.randn(5, 6)
    s, rep = slim(m, x, report=True)
    assert (s[0].out_features, s[2].in_features, s[2].out_features, s[4].in_features) == (6, 6, 7, 7)
    assert (s[0].in_features, s[4].out_features) == (6, 3)  # the model's input and output stay whole
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))
        kept = [0, 1, 3, 4, 6, 7]
        assert torch.equal(s[0].weight, m[0].weight[kept]) and torch.equal(s[2].weight[:, :], m[2].weight[:7, kept])
    assert rep.params_after < rep.params_before
    assert m[0].out_features == 8  # the model itself is untouched


class _Residual(nn.Module):
    """A residual sum joins two layers' channels: a channel goes only if no reader of either needs it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.bn(self.b(y)) + y)
        z = self.d(torch.relu(self.c(y))) + y
        return self.fc(torch.flatten(z, 1))


def test_residual_spaces_keep_what_any_reader_needs():
    torch.manual_seed(0)
    m = _Residual().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.b.weight[:, 1] = 0  # channel 1 of the residual space: b and c do not read it ...
        m.c.weight[:, 1] = 0
        m.fc.weight.view(2, 4, 16)[:, 1] = 0  # ... nor the classifier: it goes
        m.c.weight[:, 3] = 0  # channel 3: c does not read it, but b does: it stays
        m.d.weight[:, 2] = 0  # c's output channel 2 is read by nobody else: it goes from c and d
    x = torch.randn(2, 3, 4, 4)
    s = slim(m, x)
    assert (s.a.out_channels, s.b.in_channels, s.b.out_channels, s.bn.num_features) == (3, 3, 3, 3)
    assert (s.c.in_channels, s.c.out_channels, s.d.in_channels, s.d.out_channels) == (3, 3, 3, 3)
    assert s.fc.in_features == 3 * 16
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], 1))


class _HardReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.a(x)).view(-1, 64))  # a literal feature count


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class _ParamAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.a(x) + self.shift)


@pytest.mark.parametrize("cls,first", [(_Cat, "a"), (_HardReshape, "a"), (_Twice, "a"), (_ParamAdd, "a")])
def test_channels_slim_cannot_follow_stay(cls, first):
    torch.manual_seed(0)
    m = cls().eval()
    with torch.no_grad():
        for mod in m.modules():  # every reader leaves input channel 0 unread
            if isinstance(mod, nn.Conv2d) and mod is not getattr(m, first):
                mod.weight[:, 0] = 0
            if isinstance(mod, nn.Linear):
                mod.weight[:, :16] = 0
    shape = (2, 4, 4, 4) if cls is _Twice else (2, 3, 4, 4)
    x = torch.randn(shape)
    s = slim(m, x)
    assert getattr(s, first).out_channels == getattr(m, first).out_channels  # kept whole: never wrong
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))


def test_the_check_catches_a_wrong_slim(monkeypatch):
    m = _channel_model("lenet5")
    alive = slim_mod._alive

    def wrong(weight, stride, size, is_linear):  # drop a channel that is read
        a = alive(weight, stride, size, is_linear).clone()
        a[0] = False
        return a

    monkeypatch.setattr(slim_mod, "_alive", wrong)
    with pytest.raises(ValueError, match="differs from the model"):
        slim_model(m, 0)
    monkeypatch.setattr(slim_mod, "_alive", alive)
    monkeypatch.setattr(slim_mod, "_keep_aligned", lambda mod, idx: None)  # BatchNorms left at full width
    with pytest.raises(ValueError, match="fails on the example input"):
        slim_model(_channel_model("resnet20", in_channels=3), 0)


def test_bad_calls_say_what_to_do(untraceable):
    m = _channel_model("lenet5")
    with pytest.raises(ValueError, match="slim_model"):
        slim(m)
    with pytest.raises(ValueError, match="example input"):
        slim(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="level"):
        slim_model(m, 3)
    with pytest.raises(ValueError, match="fails on the example input of shape"):
        slim_model(m, 0, example=(3, 28, 28))  # LeNet-5 takes one channel

    with pytest.raises(ValueError, match="torch.fx"):
        slim(untraceable, torch.randn(2, 3))


def test_model_modes_and_example_are_left_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                      nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[4].weight[:, 2] = 0
    m.train()
    m[1].eval()  # a frozen BatchNorm while fine-tuning
    modes = [mod.training for mod in m.modules()]
    x = torch.randn(2, 3, 4, 4)
    x0 = x.clone()
    s = slim(m, x)
    assert [mod.training for mod in m.modules()] == modes and torch.equal(x, x0)
    assert not any(mod.training for mod in s.modules())  # for inference
    assert s[0].out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(s(x), m.eval()(x))


class _InplaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        x.sub_(0.5)
        return self.b(torch.relu(self.a(x)))


def test_a_model_that_edits_its_input_in_place():
    torch.manual_seed(0)
    m = _InplaceInput()
    with torch.no_grad():
        m.b.weight[:, 1] = 0
    x = torch.ones(2, 3)
    s = slim(m, x)
    assert torch.equal(x, torch.ones(2, 3)) and s.a.out_features == 3


class _KwargOperand(nn.Module):
    """The second operand given by keyword: ``torch.clamp(y, min=z)``, ``torch.add(y, other=z)``."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        w = torch.clamp(y, min=z) if self.op == "clamp" else torch.add(y, other=z)
        return self.c(w) + self.d(z)


@pytest.mark.parametrize("op", ["clamp", "add"])
def test_tensor_operands_given_by_keyword_are_followed(op):
    torch.manual_seed(0)
    m = _KwargOperand(op).eval()
    with torch.no_grad():
        m.c.weight[:, 1] = 0  # c does not read channel 1, d does not read channel 2: as one space, none goes
        m.d.weight[:, 2] = 0
    s = slim(m, torch.randn(2, 3, 2, 2))
    x = torch.randn(4, 3, 8, 8)  # another input than the check's
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))


def test_reparametrized_pruned_and_boolean_models():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        m[2].weight[:, 1] = 0
    wn = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        wn[2].weight[:, 1] = 0
    s = slim(wn, torch.randn(2, 3))  # a computed weight is kept whole, not an error
    assert s[0].out_features == 4
    pruned = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.nn.utils.prune.ln_structured(pruned[2], "weight", amount=0.5, n=1, dim=1)
    with pytest.raises(ValueError, match="prune.remove"):
        slim(pruned, torch.randn(2, 3))
    torch.nn.utils.prune.remove(pruned[2], "weight")
    assert slim(pruned, torch.randn(2, 3))[0].out_features == 2  # made permanent: two hidden units go

    class Bool(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = m

        def forward(self, x):
            return self.net(x) > 0

    b = slim(Bool(), torch.randn(5, 3))
    assert b.net[0].out_features == 3
