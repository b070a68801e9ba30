"""Packed runtime graph fusion: BatchNorm / residual / ReLU / max-pool epilogues and Linear chains
give exactly the nested model's outputs at every level, sparse or dense, fused or not."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestedsparse as ns
from nestedsparse.pack import kernels as K
from nestedsparse.pack import load_packed, pack
from nestedsparse.pack.csr import from_dense
from nestedsparse.pack.runtime import SLIM, FeatureMajorChain, FusedSparse, PackedRuntime

SPEC = ns.LevelSpec((0.1, 0.4, 1.0))


def _assert_every_level(rt, m, x, rtol=1e-4, atol=1e-5, calls=1):
    """``rt(x, level=k)`` equals the nested model at every level (``calls`` times each)."""
    for k in range(SPEC.num_levels):
        with ns.use_level(m, k), torch.no_grad():
            ref = m(x)
        for _ in range(calls):
            torch.testing.assert_close(rt(x, level=k), ref, rtol=rtol, atol=atol)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return torch.add(x, self.bn2(self.conv2(h))).relu()  # residual on the left, method relu


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.block = Block(8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 3 * 3, 24)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.stem(x)))      # conv -> relu -> pool (2x2)
        h = self.block(h)
        h = F.max_pool2d(self.down(h), 2)            # conv -> pool (functional) without relu
        h = h.flatten(1)
        h = self.drop(F.relu(self.fc1(h)))
        return self.fc3(F.relu(self.fc2(h)))


def _nested(cls, seed=0, calibrate=None):
    """``cls()`` nestified with ``SPEC``, in eval mode; ``calibrate(m)`` first runs in train mode
    (to give the BatchNorms statistics)."""
    torch.manual_seed(seed)
    m = cls()
    ns.nestify_(m, SPEC)
    if calibrate is not None:
        m.train()
        calibrate(m)
    m.eval()
    return m


def _packed(m, cls, tmp_path):
    """``m`` packed to a file under ``tmp_path`` and loaded back as a runtime built from ``cls``."""
    path = tmp_path / f"{cls.__name__}.nsp"
    pack(m).save(path)
    return load_packed(path, cls)


def _per_level_bn_stats(m):
    for k in range(SPEC.num_levels):  # distinct BN statistics per level
        with ns.use_level(m, k):
            m(torch.randn(6, 3, 24, 24) * (k + 1))


def _model(seed=0):
    return _nested(Net, seed, _per_level_bn_stats)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    m = _model()
    path = tmp_path_factory.mktemp("rt") / "net.nsp"
    pack(m).save(path)
    return m, path


def test_fusion_finds_every_pattern(packed):
    _, path = packed
    rt = PackedRuntime(load_packed(path, Net).model, SPEC, programs=False)  # chains only: see test_pack_program
    assert rt.graph is not None
    fused = {u.name: u for u in rt.units() if isinstance(u, FusedSparse)}
    assert fused["stem"].relu and fused["stem"].pool == 2
    assert fused["block.conv1"].bn is not None and fused["block.conv1"].relu
    f2 = fused["block.conv2"]
    assert f2.bn is not None and f2.residual and f2.relu and f2.pool == 1
    chains = [u for u in rt.units() if isinstance(u, FeatureMajorChain)]
    # down (8*3*3 = 72 taps) -> max_pool2d -> flatten -> fc1 -> dropout -> fc2 -> fc3: one feature-major chain
    assert len(chains) == 1 and [c.name for c in chains[0].units] == ["down", "fc1", "fc2", "fc3"]
    down = chains[0].units[0]
    assert down.pool == 2 and not down.relu and chains[0].kinds == ["conv", "linear", "linear", "linear"]
    assert "stem" not in [c.name for c in chains[0].units]  # 3*3*3 = 27 taps: below FM_MIN_TAPS


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("way", ["sparse", "dense"])
def test_fused_equals_nested_model_every_level(packed, batch, way):
    m, path = packed
    rt = load_packed(path, Net)
    x = torch.randn(batch, 3, 24, 24)
    for layer in rt.sparse_layers():
        for k in range(SPEC.num_levels):
            layer.mode[(k, batch)] = way
    _assert_every_level(rt, m, x)
    graph, rt.graph = rt.graph, None  # the unfused module tree gives the same
    _assert_every_level(rt, m, x)
    rt.graph = graph


def test_dense_path_keeps_one_weight_copy_per_level(packed):
    """A conv with a fused BatchNorm on the dense path keeps only its folded weight, not also the
    unfolded one it was made from."""
    m, path = packed
    rt = load_packed(path, Net)
    x = torch.randn(2, 3, 24, 24)
    for layer in rt.sparse_layers():
        for k in range(SPEC.num_levels):
            layer.mode[(k, 2)] = "dense"
    _assert_every_level(rt, m, x)
    conv1 = next(u for u in rt.modules() if isinstance(u, FusedSparse) and u.name == "block.conv1")
    layer = conv1.layer
    folded = [key for key in layer._epi if key[-1] == "dense"]
    assert len(folded) == SPEC.num_levels and layer._dense == {}


def test_per_layer_levels_reach_fused_batchnorm(packed):
    """A BatchNorm routed to another level than its conv uses that level's statistics."""
    m, path = packed
    rt = load_packed(path, Net)
    x = torch.randn(2, 3, 24, 24)
    route = {"": 2, "block.conv1": 0, "block.bn1": 1, "fc2": 0}
    with ns.use_level(m, route), torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(rt(x, level=route), ref, rtol=1e-4, atol=1e-5)


def test_untraceable_model_runs_unfused(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if h.sum() > 0:  # data-dependent: torch.fx cannot trace it
                h = h * 2
            return self.b(h)

    m = _nested(Branchy, seed=0)
    rt = _packed(m, Branchy, tmp_path)
    assert rt.graph is None
    x = torch.randn(4, 6)
    _assert_every_level(rt, m, x)


def test_chain_reuses_its_buffers_and_threads_do_not_share_them(packed, mismatches_under_threads):
    _, path = packed
    rt = load_packed(path, Net)
    chain = next(u for u in rt.units() if isinstance(u, FeatureMajorChain))
    for layer in rt.sparse_layers():  # the feature-major path at every level
        layer.mode.update({(k, 5): "sparse" for k in range(SPEC.num_levels)})
    x = torch.randn(5, 3, 24, 24)

    def buffers():  # the layer-by-layer sequence's, or (Linear-only chain) the one-call kernel's
        return sorted(b.ctypes.data for bs in chain._act_bufs.values() for b in bs) + sorted(
            a.ctypes.data for a in chain._fused_acts.values())

    rt(x, level=0)
    bufs = buffers()
    assert bufs
    rt(x, level=1)
    assert buffers() == bufs  # no new activation buffers
    assert not mismatches_under_threads(rt, x, calls=20)


def test_tune_covers_chained_and_fused_layers(packed):
    _, path = packed
    rt = load_packed(path, Net)
    got = rt.tune(torch.randn(4, 3, 24, 24), repeats=2)
    got = {k for k in got if k[0] != SLIM}  # a level may also run as its slim network where faster
    assert got == {(layer.name, k) for layer in rt.sparse_layers() for k in range(SPEC.num_levels)}


# ------------------------------------------------------------------ kernel epilogues
def _conv_csr(O, C, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((O, C, k, k)).astype(np.float32)
    lm = rng.integers(0, 3, size=w.shape).astype(np.uint8)
    return w, lm, from_dense(w, lm, 3)


@pytest.mark.parametrize("shape", [(2, 4, 9, 10, 6, 3, 1, 1), (3, 4, 8, 8, 5, 3, 2, 1), (1, 2, 7, 7, 3, 1, 1, 0)])
def test_run_conv_fuses_residual(shape):
    N, C, H, W, O, k, s, p = shape
    w, lm, csr = _conv_csr(O, C, k)
    geo = K.ConvGeometry((O, C, k, k), (s, s), (p, p), (1, 1), 1)
    x = np.random.default_rng(1).standard_normal((N, C, H, W)).astype(np.float32)
    OH, OW = geo.out_hw(H, W)
    res = np.random.default_rng(2).standard_normal((N, O, OH, OW)).astype(np.float32)
    sc = np.random.default_rng(3).uniform(0.5, 2, O).astype(np.float32)
    bb = np.random.default_rng(4).standard_normal(O).astype(np.float32)
    for lvl in range(3):
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w * (lm <= lvl)), None, s, p)
        ref = torch.relu(ref * torch.from_numpy(sc)[:, None, None] + torch.from_numpy(bb)[:, None, None]
                         + torch.from_numpy(res))
        for par in (False, True):
            out = np.empty((N, O, OH, OW), np.float32)
            K.run_conv(csr, K.plan_for(csr, lvl), geo, x, out, sc, bb, True, par, residual=res)
            np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", [2, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_run_conv_fuses_max_pool_nan_propagates(pool, batch):
    O, C, k = 4, 3, 3
    w, lm, csr = _conv_csr(O, C, k, seed=pool)
    geo = K.ConvGeometry((O, C, k, k), (1, 1), (1, 1), (1, 1), 1)
    x = np.random.default_rng(5).standard_normal((batch, C, 11, 13)).astype(np.float32)
    x[0, 0, 4, 4] = np.nan
    OH, OW = geo.out_hw(11, 13)
    for relu in (False, True):
        out = np.empty((batch, O, OH // pool, OW // pool), np.float32)
        K.run_conv(csr, K.plan_for(csr, 2), geo, x, out, np.ones(O, np.float32), np.zeros(O, np.float32), relu,
                   pool=pool)
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w * (lm <= 2)), None, 1, 1)
        ref = F.max_pool2d(torch.relu(ref) if relu else ref, pool).numpy()
        assert np.isnan(ref).any()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_run_conv_checks_out_shape_and_exclusive_epilogues():
    w, lm, csr = _conv_csr(3, 2, 3)
    geo = K.ConvGeometry((3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    x = np.zeros((1, 2, 6, 6), np.float32)
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="expected"):
        K.run_conv(csr, K.plan_for(csr, 0), geo, x, np.empty((1, 3, 5, 5), np.float32), one, zero, False)
    with pytest.raises(ValueError, match="not both"):
        K.run_conv(csr, K.plan_for(csr, 0), geo, x, np.empty((1, 3, 3, 3), np.float32), one, zero, False,
                   residual=np.zeros((1, 3, 6, 6), np.float32), pool=2)


def test_changing_a_choice_reaches_compiled_chain(packed):
    """The chain replays compiled layer sequences; a new sparse/dense choice must not be ignored."""
    _, path = packed
    rt = PackedRuntime(load_packed(path, Net).model, SPEC, programs=False)
    chain = next(u for u in rt.units() if isinstance(u, FeatureMajorChain))
    fc2 = chain.units[2].layer
    x = torch.randn(2, 3, 24, 24)
    fc2.mode[(0, 2)] = "sparse"
    y_sparse = rt(x, level=0)
    assert 0 not in fc2._dense  # the sparse path made no dense weight
    fc2.mode[(0, 2)] = "dense"
    y_dense = rt(x, level=0)
    assert 0 in fc2._dense  # the new choice ran
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        fc2.mode[(0, 2)] = "fast"


@pytest.mark.parametrize("case", [(5, 4, 9, 8, 6, 3, 1, 1, 1, 1, 1, 0), (3, 4, 10, 9, 6, 3, 2, 1, 1, 2, 1, 1),
                                  (2, 4, 12, 12, 8, 3, 1, 2, 2, 4, 2, 1), (1, 3, 11, 11, 5, 5, 1, 0, 1, 1, 3, 2)])
def test_feature_major_conv_kernel(case):
    """bind_conv_t: [C*Hp*Wp, B] in, pooled output into the interior of the next padded buffer,
    border rows untouched, every level, groups / stride / dilation / pool."""
    B, C, H, W, O, k, s, p, d, g, pool, q = case
    rng = np.random.default_rng(sum(case))
    w = rng.standard_normal((O, C // g, k, k)).astype(np.float32)
    lm = rng.integers(0, 3, size=w.shape).astype(np.uint8)
    csr = from_dense(w, lm, 3)
    geo = K.ConvGeometry((O, C // g, k, k), (s, s), (p, p), (d, d), g)
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    xt = np.zeros((C, H + 2 * p, W + 2 * p, B), np.float32)
    xt[:, p:p + H, p:p + W, :] = x.transpose(1, 2, 3, 0)
    xt = xt.reshape(-1, B)
    OH, OW = geo.out_hw(H, W)
    PH, PW = OH // pool, OW // pool
    sc = rng.uniform(0.5, 2, O).astype(np.float32)
    bb = rng.standard_normal(O).astype(np.float32)
    for lvl in range(3):
        yt = np.full((O * (PH + 2 * q) * (PW + 2 * q), B), 7.0, np.float32)
        K.bind_conv_t(csr, K.plan_for(csr, lvl), geo, (H, W), xt, yt, (q, q), sc, bb, True, pool)()
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w * (lm <= lvl)), None, s, p, d, g)
        ref = torch.relu(ref * torch.from_numpy(sc)[:, None, None] + torch.from_numpy(bb)[:, None, None])
        ref = F.max_pool2d(ref, pool) if pool > 1 else ref
        y4 = yt.reshape(O, PH + 2 * q, PW + 2 * q, B)
        np.testing.assert_allclose(y4[:, q:q + PH, q:q + PW, :].transpose(3, 0, 1, 2), ref.numpy(), rtol=1e-4, atol=1e-4)
        border = np.ones(y4.shape, bool)
        border[:, q:q + PH, q:q + PW, :] = False
        assert (y4[border] == 7.0).all()
    with pytest.raises(ValueError, match="do not fit"):
        K.bind_conv_t(csr, K.plan_for(csr, 0), geo, (H, W), xt[:-1], yt, (q, q), sc, bb, True, pool)


def test_feature_major_conv_int8_matches_reference():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    lm = rng.integers(0, 2, size=w.shape).astype(np.uint8)
    csr = from_dense(w, lm, 2, dtype="int8")
    geo = K.ConvGeometry((6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    x = rng.standard_normal((3, 4, 7, 7)).astype(np.float32)
    xt = np.zeros((4, 9, 9, 3), np.float32)
    xt[:, 1:8, 1:8, :] = x.transpose(1, 2, 3, 0)
    for lvl in range(2):
        plan = K.plan_for(csr, lvl)
        yt = np.zeros((6 * 7 * 7, 3), np.float32)
        K.bind_conv_t(csr, plan, geo, (7, 7), xt.reshape(-1, 3), yt, (0, 0), plan.scales.copy(),
                      np.zeros(6, np.float32), False)()
        ref = K.conv2d_reference(csr, x, lvl, (6, 4, 3, 3), 1, 1)
        np.testing.assert_allclose(yt.reshape(6, 7, 7, 3).transpose(3, 0, 1, 2), ref, rtol=1e-4, atol=1e-4)


class TokenMLP(nn.Module):
    """Linears on [N, L, C] (a transformer MLP) and a BatchNorm1d over dim 1 after a Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)  # normalises dim 1 (L = 8 tokens), not the features

    def forward(self, x):
        h = self.fc2(F.relu(self.fc1(x)))
        return self.bn(self.fc3(h))


@pytest.mark.parametrize("way", ["sparse", "dense"])
def test_linears_on_3d_inputs_and_batchnorm_over_dim1(tmp_path, way):
    m = _nested(TokenMLP, calibrate=lambda m: m(torch.randn(6, 8, 8)))
    rt = _packed(m, TokenMLP, tmp_path)
    assert any(isinstance(u, FeatureMajorChain) for u in rt.units())
    for batch in (1, 4):
        x = torch.randn(batch, 8, 8)  # L == C == 8: a wrong-axis BatchNorm fold would go unnoticed by shapes
        for layer in rt.sparse_layers():
            layer.mode.update({(k, b): way for k in range(SPEC.num_levels) for b in (batch, batch * 8)})
        _assert_every_level(rt, m, x)


def test_inplace_add_into_another_tensor_is_not_fused(tmp_path):
    class AddInto(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            s = x * 2.0
            s.add_(self.a(x))  # in place, the packed output on the right: s itself changes
            return s + self.b(s)  # (fx records ``+=`` as a plain add; ``add_`` stays in place)

    m = _nested(AddInto, seed=1)
    rt = _packed(m, AddInto, tmp_path)
    assert not any(isinstance(u, FusedSparse) and u.name == "a" for u in rt.units())
    x = torch.randn(3, 6)
    _assert_every_level(rt, m, x)


def test_low_level_entries_refuse_wrong_buffers():
    w, lm, csr = _conv_csr(3, 2, 3)
    geo = K.ConvGeometry((3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    big = np.zeros((1, 2, 6, 12), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.run_conv(csr, K.plan_for(csr, 0), geo, big[..., ::2], np.empty((1, 3, 6, 6), np.float32), one, zero, False)
    with pytest.raises(ValueError, match="scales"):
        K.run_conv(csr, K.plan_for(csr, 0), geo, big[..., :6].copy(), np.empty((1, 3, 6, 6), np.float32),
                   one[:2], zero, False)
    buf = np.zeros((2 * 8 * 8, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.bind_conv_t(csr, K.plan_for(csr, 0), geo, (6, 6), buf[:, :2], np.zeros((3 * 36, 2), np.float32),
                      (0, 0), one, zero, False)
    lin = from_dense(np.ones((4, 5), np.float32), np.zeros((4, 5), np.uint8), 1)
    p = K.plan_for(lin, 0)
    with pytest.raises(ValueError, match="yt"):
        K.bind_linear_t(p, np.zeros((5, 1), np.float32), np.zeros((4, 2), np.float32)[:, :1], np.ones(4, np.float32),
                        np.zeros(4, np.float32), False)


def test_minus_infinity_stays_minus_infinity_without_relu():
    lin = from_dense(np.array([[-1.0, 2.0]], np.float32), np.zeros((1, 2), np.uint8), 1)
    x = np.array([[np.inf, 1.0]] * 3, np.float32)
    y = K.spmm(lin, x, 0)
    assert np.isneginf(y).all()
    assert np.isneginf(K.spmm(lin, x[:1], 0)).all()


def test_leading_flatten_is_absorbed_into_a_linear_chain(tmp_path):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))

        def forward(self, x):
            return self.body(x)

    m = _nested(Flat, seed=2)
    rt = _packed(m, Flat, tmp_path)
    chain = next(u for u in rt.units() if isinstance(u, FeatureMajorChain))
    assert chain.flatten_input
    assert not any(n.op == "call_module" and n.target == "body.0" for n in rt.graph.graph.nodes)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 2, 2)
        _assert_every_level(rt, m, x)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("resnet20", {"shortcut": "B"}, (3, 16, 16)),
    ("resnet20", {"shortcut": "A"}, (3, 16, 16)),
    ("mobilenet_v1", {"width_mult": 0.25}, (3, 32, 32)),
    ("wrn", {"depth": 10, "width": 1}, (3, 16, 16)),
    ("lenet5", {}, (1, 28, 28)),
])
def test_registry_models_packed_equal_nested(tmp_path, name, kwargs, shape):
    """The fused / chained runtime on the library's own architectures: every level, both paths."""
    from nestedsparse import models

    torch.manual_seed(0)
    m = models.create(name, **kwargs)
    ns.nestify_(m, SPEC)
    m.train()
    for k in range(SPEC.num_levels):  # per-level BatchNorm statistics that differ
        with ns.use_level(m, k), torch.no_grad():
            m(torch.randn(4, *shape) * (1 + k))
    m.eval()
    pack(m, model_name=name, model_kwargs=kwargs).save(tmp_path / "m.nsp")
    rt = load_packed(tmp_path / "m.nsp")
    assert rt.graph is not None
    x = torch.randn(3, *shape)
    for way in ("sparse", "dense"):
        for layer in rt.sparse_layers():
            layer.mode.update({(k, 3): way for k in range(SPEC.num_levels)})
        _assert_every_level(rt, m, x, rtol=1e-3, atol=1e-4)


def test_chain_state_keeps_the_buffers_its_program_is_bound_to(packed):
    """Another thread clearing the buffer cache between compiling and caching a call's state
    must not pair a program with other buffers (the output would stay zero)."""
    m, path = packed
    rt = load_packed(path, Net)
    chain = next(u for u in rt.units() if isinstance(u, FeatureMajorChain))
    for layer in rt.sparse_layers():
        layer.mode.update({(k, 2): "sparse" for k in range(SPEC.num_levels)})
    compile_ = chain._compile

    def compile_then_clear(*a, **kw):
        prog = compile_(*a, **kw)
        chain._act_bufs.clear()  # what a concurrent call over the buffer cap does
        return prog

    chain._compile = compile_then_clear
    x = torch.randn(2, 3, 24, 24)
    _assert_every_level(rt, m, x, calls=2)  # the first call builds the state, the second replays it


def test_tuned_runtime_still_equals_nested_model(packed):
    m, path = packed
    rt = load_packed(path, Net)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 24, 24)
        rt.tune(x, repeats=2)
        _assert_every_level(rt, m, x)


def test_flatten_over_other_dims_is_not_absorbed(tmp_path):
    class Flat2(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.Flatten(2)
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(self.flat(x))))  # Linear over [N, C, H*W]

    m = _nested(Flat2, seed=3)
    rt = _packed(m, Flat2, tmp_path)
    chain = next(u for u in rt.units() if isinstance(u, FeatureMajorChain))
    assert not chain.flatten_input
    x = torch.randn(2, 5, 2, 2)
    _assert_every_level(rt, m, x)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1000), (9, 8), (300, 517), (517, 3), (64, 2880)])
def test_parallel_transpose_kernel_any_split(shape):
    K.transpose(np.zeros((2, 2), np.float32))  # build the kernels
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for parts in (1, 2, 3, 7, 1000):
        o = np.full(shape[::-1], np.nan, np.float32)
        K._kernel("transpose_par")(a, o, parts)
        np.testing.assert_array_equal(o, a.T)


# ------------------------------------------------------------------ Linear-only chains in one call
class WideMLP(nn.Module):
    """Linear-only: uint8 then uint16 column indices (20 and 300 inputs), a BatchNorm1d after the
    second Linear, no ReLU at the end."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(20, 300), nn.ReLU(), nn.Linear(300, 40),
                                  nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 7))

    def forward(self, x):
        return self.body(x)


def _linear_chain_rt(tmp_path, dtype="float32"):
    m = _nested(WideMLP, seed=3, calibrate=lambda m: [m(torch.randn(16, 4, 5) * (k + 1)) for k in range(3)])
    path = tmp_path / f"wide_{dtype}.nsp"
    pack(m, dtype=dtype).save(path)
    rt = load_packed(path, WideMLP)
    (chain,) = [u for u in rt.units() if isinstance(u, FeatureMajorChain)]
    return m, rt, chain


def _fused_states(chain):
    from nestedsparse.pack.runtime import _FusedLinears

    return [s for s in chain._progs.values() if isinstance(s, _FusedLinears)]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_linear_only_chain_runs_as_one_call_equal_at_every_level(tmp_path, dtype):
    m, rt, chain = _linear_chain_rt(tmp_path, dtype)
    for batch in (1, 2, 5, 67):  # 1: the typed SpMV rows; 67: parallel layers and a serial small one
        for layer in rt.sparse_layers():
            layer.mode.update({(k, batch): "sparse" for k in range(SPEC.num_levels)})
        x = torch.randn(batch, 4, 5)
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == "int8" else {}
        if dtype == "int8":  # int8 vs the float model: compare with the same runtime layer by layer instead
            for k in range(SPEC.num_levels):
                want = PackedRuntime(rt.model, SPEC, fuse=False)(x, level=k)
                torch.testing.assert_close(rt(x, level=k), want, rtol=1e-4, atol=1e-4)
        else:
            _assert_every_level(rt, m, x, calls=2, **tol)
        assert len(_fused_states(chain)) == SPEC.num_levels * (1 + [1, 2, 5, 67].index(batch))
    # the one-call chain's concatenated entries are the layers' own arrays (held once)
    _, _, _, cols, vals, entry0, _ = chain._fused_static
    for layer, e0, e1 in zip(rt.sparse_layers(), entry0[:-1], entry0[1:]):
        assert np.shares_memory(layer.csr.values, vals) and layer.csr.values.shape[0] == e1 - e0
        assert np.shares_memory(layer.csr.col_indices, cols) == (layer.csr.col_indices.dtype == cols.dtype)
        assert all(np.shares_memory(p.vals, vals) for p in layer.csr._cache.values() if isinstance(p, K._Plan))
    par = {tuple(s.arrays[0][:, 4]) for s in _fused_states(chain)}
    assert (0, 0, 0) in par  # the serial layer loop ran (batch 1: small layers)
    if K._threads() > 1:
        assert any(any(p) for p in par)  # and the parallel one


def test_chain_shares_its_layers_arrays_before_any_call(tmp_path):
    """The one-call chain's concatenation exists from the start, so a layer-by-layer sequence
    bound before the first one-call run cannot keep the layers' old arrays alive."""
    m, rt, chain = _linear_chain_rt(tmp_path)
    _, _, _, cols, vals, _, _ = chain._fused_static
    assert all(np.shares_memory(layer.csr.values, vals) for layer in rt.sparse_layers())
    x = torch.randn(4, 4, 5)
    rt.sparse_layers()[1].mode[(0, 4)] = "dense"  # level 0 goes layer by layer and binds its kernels
    _assert_every_level(rt, m, x)
    for layer in rt.sparse_layers():
        assert all(np.shares_memory(p.vals, vals) for p in layer.csr._cache.values() if isinstance(p, K._Plan))


def test_linear_chain_goes_layer_by_layer_when_a_layer_runs_dense(tmp_path):
    m, rt, chain = _linear_chain_rt(tmp_path)
    x = torch.randn(4, 4, 5)
    for layer in rt.sparse_layers():
        layer.mode.update({(k, 4): "sparse" for k in range(SPEC.num_levels)})
    rt.sparse_layers()[1].mode[(0, 4)] = "dense"
    _assert_every_level(rt, m, x)
    levels_fused = {k[3] for k, s in chain._progs.items() if s in _fused_states(chain)}
    assert levels_fused == {1, 2}  # level 0 has a dense layer: the layer-by-layer sequence ran


def test_linear_chain_one_call_threads_and_single_thread(tmp_path, mismatches_under_threads):
    import numba

    m, rt, chain = _linear_chain_rt(tmp_path)
    x = torch.randn(9, 4, 5)
    for layer in rt.sparse_layers():
        layer.mode.update({(k, 9): "sparse" for k in range(SPEC.num_levels)})
    assert not mismatches_under_threads(rt, x, calls=20)
    assert _fused_states(chain)
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _, rt1, chain1 = _linear_chain_rt(tmp_path)
        _assert_every_level(rt1, m, x)  # one thread: the serial twin of the chain kernel
        assert all(s.arrays[-1] == 1 for s in _fused_states(chain1))
    finally:
        numba.set_num_threads(n)


class OneOutput(nn.Module):
    """A chain whose last layer has fewer rows than there are threads (a regression head)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 1))

    def forward(self, x):
        return self.body(x)


def test_linear_chain_with_fewer_rows_than_threads(tmp_path):
    """Each layer's row blocks are padded to the thread count (a 1-row layer has one block):
    the kernel reads T + 1 bounds per layer, never past the array, never another layer's."""
    import numba

    m = _nested(OneOutput, seed=4)
    n = numba.get_num_threads()
    try:
        for threads in sorted({2, n}):
            numba.set_num_threads(threads)
            rt = _packed(m, OneOutput, tmp_path)
            (chain,) = [u for u in rt.units() if isinstance(u, FeatureMajorChain)]
            for batch in (1, 3, 67):
                for layer in rt.sparse_layers():
                    layer.mode.update({(k, batch): "sparse" for k in range(SPEC.num_levels)})
                _assert_every_level(rt, m, torch.randn(batch, 300))
            states = _fused_states(chain)
            assert states and all(s.arrays[1].shape[0] == 2 * (s.arrays[-1] + 1) for s in states)
    finally:
        numba.set_num_threads(n)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_block_pruned_linear_chain_runs_four_rows_per_tile(tmp_path, dtype):
    """4x1 block pruning on Linear layers: the one-call chain runs each block's four rows together
    over 24-column batch tiles (the rest of the batch, and rows not in blocks, row by row; a
    7-row layer ends with 3 single rows); equal to the layer-by-layer runtime at every level,
    on one thread and on two (blocks split across the threads' row ranges)."""
    import numba

    torch.manual_seed(5)
    m = WideMLP()
    ns.nestify_(m, SPEC, block=(4, 1))
    m.train()
    for k in range(SPEC.num_levels):
        with ns.use_level(m, k), torch.no_grad():
            m(torch.randn(16, 4, 5) * (k + 1))
    m.eval()
    path = tmp_path / "b.nsp"
    pack(m, dtype=dtype).save(path)
    n = numba.get_num_threads()
    try:
        for threads in sorted({1, 2, n}):
            numba.set_num_threads(threads)
            rt = load_packed(path, WideMLP)
            (chain,) = [u for u in rt.units() if isinstance(u, FeatureMajorChain)]
            units = PackedRuntime(rt.model, SPEC, fuse=False)
            for batch in (2, 24, 67):
                for layer in rt.sparse_layers():
                    layer.mode.update({(k, batch): "sparse" for k in range(SPEC.num_levels)})
                x = torch.randn(batch, 4, 5)
                for k in range(SPEC.num_levels):
                    torch.testing.assert_close(rt(x, level=k), units(x, level=k), rtol=1e-5, atol=1e-5)
            blk = [s.arrays[-2] for s in _fused_states(chain) if s.acts.shape[1] >= 24]
            assert len(blk) == SPEC.num_levels * 2 and all(b.sum() >= 20 for b in blk)
            assert max(b.sum() for b in blk) == 75 + 10 + 1  # full level: every block of 4 rows
    finally:
        numba.set_num_threads(n)


@pytest.mark.parametrize("one_call_faster", [True, False])
def test_tune_times_the_one_call_chain(tmp_path, monkeypatch, one_call_faster):
    """Per-layer timings cannot see the one-call chain (it runs only when every layer is sparse):
    when a layer chose dense, tune times the whole chain as one call against the chosen path and
    makes every layer sparse if the one call is faster. Timings faked: every layer alone is
    faster dense; the one call is faster or slower."""
    from nestedsparse.pack import runtime as R

    m, rt, chain = _linear_chain_rt(tmp_path)

    def fake(fns, repeats):
        if set(fns) == {"one call", "chosen"}:
            return {"one call": 1.0, "chosen": 2.0} if one_call_faster else {"one call": 2.0, "chosen": 1.0}
        if set(fns) == {"sparse", "dense"}:
            return {"sparse": 2.0, "dense": 1.0}
        return {k: 1.0 for k in fns}  # the whole-level guard: a tie keeps the choices

    monkeypatch.setattr(R, "_median_times", fake)
    x = torch.randn(6, 4, 5)
    rt.tune(x, levels=[0])
    ways = {layer.mode[(0, 6)] for layer in rt.sparse_layers()}
    assert ways == ({"sparse"} if one_call_faster else {"dense"})
    monkeypatch.undo()
    _assert_every_level(rt, m, x)
    level0 = [s for k, s in chain._progs.items() if k[3] == 0 and k[1] == (6, 20) and k[4] == R._MODE_EPOCH[0]]
    assert len(level0) == 1 and (level0[0] in _fused_states(chain)) == one_call_faster


def test_dense_linear_at_batch_1_runs_our_gemv(packed, monkeypatch):
    """A dense-chosen Linear at batch 1 runs ``kernels.gemv`` / ``bind_gemv`` (torch's GEMV took
    2.2x the time), in the feature-major chain and in the plain module tree, and equals the
    nested model at every level."""
    m, path = packed
    rt = load_packed(path, Net)
    calls = []
    real_bind, real_gemv = K.bind_gemv, K.gemv
    monkeypatch.setattr(K, "bind_gemv", lambda *a, **kw: calls.append("bind") or real_bind(*a, **kw))
    monkeypatch.setattr(K, "gemv", lambda *a, **kw: calls.append("gemv") or real_gemv(*a, **kw))
    for layer in rt.sparse_layers():
        layer.mode.update({(k, 1): "dense" for k in range(SPEC.num_levels)})
    x = torch.randn(1, 3, 24, 24)
    _assert_every_level(rt, m, x)
    assert "bind" in calls
    graph, rt.graph = rt.graph, None
    try:
        _assert_every_level(rt, m, x)
    finally:
        rt.graph = graph
    assert "gemv" in calls


def test_dense_batch_1_wrong_width_keeps_torchs_error(tmp_path):
    """A batch-1 input of the wrong width on a dense-chosen Linear gets torch's shape error (the
    GEMV path only takes inputs that fit), in the chain and in the plain module tree."""
    _, rt, _ = _linear_chain_rt(tmp_path)
    for layer in rt.sparse_layers():
        layer.mode.update({(k, 1): "dense" for k in range(SPEC.num_levels)})
    x = torch.randn(1, 4, 6)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        rt(x, level=0)
    graph, rt.graph = rt.graph, None
    try:
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            rt(x, level=0)
    finally:
        rt.graph = graph


class _OddMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(300, 257), nn.ReLU(), nn.Linear(257, 130), nn.ReLU(), nn.Linear(130, 10))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("batch", [3, 23, 24, 30])
def test_block_pruned_chain_rows_split_between_threads(tmp_path, batch):
    """4x1 blocks whose rows the threads' row ranges cut through (257 and 130 rows): below a
    24-column batch tile every row runs alone and each task runs exactly its rows; from 24 on a
    block cut by a range end runs whole in the first task (found by a helper review: batch 3
    lost the rows after the cut)."""
    torch.manual_seed(0)
    m = _OddMLP()
    ns.nestify_(m, SPEC, block=(4, 1))
    m.eval()
    pack(m).save(tmp_path / "odd.nsp")
    rt = load_packed(tmp_path / "odd.nsp", _OddMLP)
    for layer in rt.sparse_layers():
        layer.mode.update({(k, batch): "sparse" for k in range(SPEC.num_levels)})
    x = torch.randn(batch, 300)
    _assert_every_level(rt, m, x)


def _lenet_runtime(tmp_path):
    from nestedsparse import models

    torch.manual_seed(0)
    m = models.create("lenet5").eval()
    ns.nestify_(m, SPEC)
    pack(m, model_name="lenet5").save(tmp_path / "l.nsp")
    return m, load_packed(tmp_path / "l.nsp")


def test_a_graph_of_modules_in_a_row_is_called_module_by_module(tmp_path):
    """A graph that is input -> program -> chain -> output runs its modules' forwards directly;
    a branching graph, or one with a function node, keeps its traced code."""
    from torch import fx

    from nestedsparse.pack import runtime as rt_mod

    m, rt = _lenet_runtime(tmp_path)
    seq = [u for _, u in rt_mod._module_sequence(rt.graph)]
    assert [type(u).__name__ for u in seq] == ["PlaneProgram", "FeatureMajorChain"]
    x = torch.randn(2, *m.input_shape)
    calls = []
    for u in seq:
        u.forward = (lambda f, name: lambda *a, **k: (calls.append(name), f(*a, **k))[1])(u.forward, type(u).__name__)
    g_forward = rt.graph.forward
    rt.graph.forward = lambda *a: pytest.fail("the traced code ran")
    _assert_every_level(rt, m, x)
    assert calls[:2] == ["PlaneProgram", "FeatureMajorChain"]
    rt.graph.forward = g_forward

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) + h  # h feeds two nodes

    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class Row(Fn):
        def forward(self, x):
            return self.b(self.a(x))

    assert rt_mod._module_sequence(fx.symbolic_trace(Branchy())) is None
    assert rt_mod._module_sequence(fx.symbolic_trace(Fn())) is None
    assert len(rt_mod._module_sequence(fx.symbolic_trace(Row()))) == 2


def test_hooks_still_fire_on_the_direct_path(tmp_path):
    """A unit's own or a global forward hook sends the call through Module.__call__ (tune records
    each unit's input that way), with the same answer."""
    m, rt = _lenet_runtime(tmp_path)
    x = torch.randn(1, *m.input_shape)
    ref = rt(x, level=0)
    seen = []
    (prog, chain) = rt.units()[:2]
    h = chain.register_forward_pre_hook(lambda mod, a: seen.append("unit"))
    torch.testing.assert_close(rt(x, level=0), ref)
    h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: seen.append(type(mod).__name__))
    try:
        torch.testing.assert_close(rt(x, level=0), ref)
    finally:
        h.remove()
    assert seen[0] == "unit" and "PlaneProgram" in seen[1:] and "FeatureMajorChain" in seen[1:]
    picks = rt.tune(x, levels=[0], repeats=1)  # tune sees every unit's input (its hook)
    assert {name for name, _ in picks if name != SLIM} == {layer.name for layer in rt.sparse_layers()}


def test_the_direct_path_follows_an_edited_graph(tmp_path):
    """A child swapped in, or a graph edited and recompiled, after the first call: the next call
    runs what the graph now says."""
    m, rt = _lenet_runtime(tmp_path)
    x = torch.randn(1, *m.input_shape)
    ref = rt(x, level=1)
    g = rt.graph
    name = [n for n, _ in g.named_children()][-1]

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)

    old = getattr(g, name)
    setattr(g, name, Zero())
    assert rt(x, level=1).abs().sum() == 0
    setattr(g, name, old)
    torch.testing.assert_close(rt(x, level=1), ref)
    out = [n for n in g.graph.nodes if n.op == "output"][0]
    with g.graph.inserting_before(out):
        neg = g.graph.call_function(torch.neg, (out.args[0],))
    out.args = (neg,)
    g.recompile()
    torch.testing.assert_close(rt(x, level=1), -ref)


@pytest.mark.parametrize("name,kw", [("lenet5", {}), ("mlp_1024", {"image_size": 16}), ("resnet20", {"in_channels": 1})])
def test_an_empty_batch_gives_an_empty_output_at_every_level(tmp_path, name, kw):
    from nestedsparse import models

    torch.manual_seed(0)
    m = models.create(name, **kw).eval()
    ns.nestify_(m, SPEC)
    pack(m, model_name=name, model_kwargs=kw).save(tmp_path / "e.nsp")
    rt = load_packed(tmp_path / "e.nsp")
    x = torch.randn(0, *m.input_shape)
    for k in range(SPEC.num_levels):
        for way in ("sparse", "dense"):
            for layer in rt.sparse_layers():
                layer.mode[(k, 0)] = way
            assert rt(x, level=k).shape == (0, 10)


def test_copying_a_runtime_says_how_to(tmp_path):
    import copy
    import io
    import pickle

    _, rt = _lenet_runtime(tmp_path)
    for attempt in (lambda: pickle.dumps(rt), lambda: copy.deepcopy(rt), lambda: torch.save(rt, io.BytesIO())):
        with pytest.raises(TypeError, match="load_packed"):
            attempt()
