"""Depth-first conv programs (pack/program.py): the region a program takes, and that it computes
exactly what the unit-by-unit runtime and the nested model compute."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.pack import kernels as K
from nestedsparse.pack import load_packed, pack, program
from nestedsparse.pack.program import PlaneProgram
from nestedsparse.pack.runtime import FeatureMajorChain, PackedRuntime
from nestedsparse.pack.runtime import _unit_parts as _parts

SPEC = ns.LevelSpec((0.1, 0.4, 1.0))


def _calibrated(m, shape, block=(1, 1)):
    ns.nestify_(m, SPEC, block=block)
    m.train()
    for k in range(SPEC.num_levels):  # per-level BatchNorm statistics that differ
        with ns.use_level(m, k), torch.no_grad():
            m(torch.randn(4, *shape) * (1 + k))
    return m.eval()


def _registry(tmp_path, name, kwargs, shape, dtype="float32", block=(1, 1)):
    torch.manual_seed(0)
    m = _calibrated(models.create(name, **kwargs), shape, block)
    pack(m, dtype=dtype, model_name=name, model_kwargs=kwargs).save(tmp_path / "m.nsp")
    return m, load_packed(tmp_path / "m.nsp")


def _custom(cls, tmp_path, calibrate_shape=None):
    """A nestified ``cls()`` (BatchNorm statistics per level if ``calibrate_shape``) and its runtime."""
    torch.manual_seed(0)
    m = cls()
    if calibrate_shape is None:
        ns.nestify_(m, SPEC)
        m.eval()
    else:
        m = _calibrated(m, calibrate_shape)
    pack(m).save(tmp_path / f"{cls.__name__}.nsp")
    return m, load_packed(tmp_path / f"{cls.__name__}.nsp", cls)


def _programs(rt):
    return [u for u in rt.units() if isinstance(u, PlaneProgram)]


def _all_sparse(rt, batch):
    for layer in rt.sparse_layers():
        layer.mode.update({(k, batch): "sparse" for k in range(SPEC.num_levels)})


def _assert_levels(rt, m, x, route=None, **tol):
    """``rt`` equals the nested model ``m`` at every level (or at the level map ``route``)."""
    tol = {"rtol": 1e-4, "atol": 1e-5, **tol}
    for k in ([route] if route is not None else range(SPEC.num_levels)):
        with ns.use_level(m, k), torch.no_grad():
            ref = m(x)
        torch.testing.assert_close(rt(x, level=k), ref, **tol)


def _assert_program_levels(rt, units, m, x, dtype, route):
    """``rt`` equals the unit-path runtime ``units`` at every level and, for float32 packs, the
    nested model ``m`` at every level and under the level map ``route``."""
    for k in range(SPEC.num_levels):
        torch.testing.assert_close(rt(x, level=k), units(x, level=k), rtol=1e-4, atol=1e-5)
    if dtype == "float32":
        _assert_levels(rt, m, x, rtol=1e-3, atol=1e-4)
        _assert_levels(rt, m, x, route, rtol=1e-3, atol=1e-4)


def _ran(prog):
    """True when the program's compiled path served a call (not the unit-by-unit fallback)."""
    return any(v is not None for v in prog._states.values())


@pytest.mark.parametrize("name, kwargs, shape, convs", [
    ("resnet20", {"shortcut": "B"}, (3, 16, 16), 21),
    ("resnet20", {"shortcut": "A"}, (3, 16, 16), 19),
    ("wrn", {"depth": 10, "width": 1}, (3, 16, 16), None),
    ("mobilenet_v1", {"width_mult": 0.25}, (3, 32, 32), None),
    ("lenet5", {}, (1, 28, 28), 2),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_program_equals_nested_model_every_level(tmp_path, name, kwargs, shape, convs, batch):
    m, rt = _registry(tmp_path, name, kwargs, shape)
    progs = _programs(rt)
    assert progs, "no conv region became a program"
    if convs is not None:
        assert sum(op[0] == "conv" for p in progs for op in p.ops) - sum(p._tail for p in progs) == convs
    _all_sparse(rt, batch)
    x = torch.randn(batch, *shape)
    _assert_levels(rt, m, x, rtol=1e-3, atol=1e-4)
    assert all(_ran(p) for p in progs)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_region_ends_with_the_classifier(tmp_path, shortcut):
    """ResNet: one program from the stem to the classifier on the pooled, flattened features
    (option A's pad shortcuts inside it): the whole network is one call."""
    _, rt = _registry(tmp_path, "resnet20", {"shortcut": shortcut}, (3, 16, 16))
    (prog,) = _programs(rt)
    assert len(prog.shortcuts) == (2 if shortcut == "A" else 0)
    assert [op[0] for op in prog.ops[-3:]] == ["gap", "flatten", "conv"] and prog._tail
    calls = [n.target for n in rt.graph.graph.nodes if n.op == "call_module"]
    assert len(calls) == 1
    # the program's concatenated weights are the units' own (held once, not copied)
    from nestedsparse.pack.runtime import _unit_parts
    layers = [_unit_parts(u)[0] for u in prog.units]
    assert all(np.shares_memory(layer.csr.values, prog._vals) for layer in layers)
    assert sum(layer.csr.values.nbytes for layer in layers) == prog._vals.nbytes


def test_classifier_runs_in_the_program_when_sparse_at_batch_one(tmp_path, monkeypatch):
    """The Linear tail runs per image inside the program (a 1x1 conv on the pooled [C, 1, 1]
    plane: GAP into the arena, then COPY_OUT) when the batch-1 density rule calls its level
    sparse, else after the program on its own path (dense here); both equal the nested model
    and the unit path at every level and under a level map, batch 1 and 3, float32 and int8."""
    for dtype in ("float32", "int8"):
        m, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16), dtype=dtype)
        (prog,) = _programs(rt)
        units = PackedRuntime(rt.model, rt.spec, programs=False)
        tail = _parts(prog.units[-1])[0]
        for batch in (1, 3):
            _all_sparse(rt, batch)
            x = torch.randn(batch, 3, 16, 16)
            for way in ("sparse", "dense"):
                monkeypatch.setattr(K, "choose", lambda csr, level, batch, way=way, choose=K.choose: (
                    way if csr is tail.csr and batch == 1 else choose(csr, level, batch)))
                _assert_program_levels(rt, units, m, x, dtype, {"": 0, "classifier": 2})
                states = [st for st in prog._states.values() if st is not None]
                assert states and all(st[2] == (way == "sparse") for st in states[-3:])
                prog._states.clear()
        with_tail = prog._geometry((3, 16, 16), True).steps
        gap = with_tail[with_tail[:, 0] == 4][0]
        assert gap[7] >= 0 and with_tail[-1, 0] == 5 and with_tail[-2, 0] == 2  # GAP -> plane, 1x1 conv, out
        assert prog._geometry((3, 16, 16)).steps[-1, 0] == 4  # without: GAP straight into the output
        # the conv taps' offsets (as large as the weights) are held once for both geometries
        offs = [prog._geometry((3, 16, 16), t).offs_b for t in (False, True)]
        assert offs[0].nbytes < offs[1].nbytes and np.shares_memory(offs[0], offs[1])


def test_option_a_shortcut_on_odd_sizes(tmp_path):
    """The pad shortcut's ceil(H / 2) on odd inputs, inside one program."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "A"}, (3, 16, 16))
    _all_sparse(rt, 2)
    for size in (11, 13):
        _assert_levels(rt, m, torch.randn(2, 3, size, size), rtol=1e-3, atol=1e-4)
    assert _ran(_programs(rt)[0])


def test_int8_program_equals_unit_path(tmp_path):
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16), dtype="int8")
    units = PackedRuntime(rt.model, rt.spec, programs=False)
    _all_sparse(rt, 2)
    x = torch.randn(2, 3, 16, 16)
    for k in range(SPEC.num_levels):
        torch.testing.assert_close(rt(x, level=k), units(x, level=k), rtol=1e-4, atol=1e-5)
    assert _ran(_programs(rt)[0])


def test_program_per_layer_levels_and_input_sizes(tmp_path):
    """A level map reroutes part-way through the program (convs and BatchNorms on different
    levels); a new input size compiles a new geometry."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16))
    _all_sparse(rt, 2)
    route = {"": 0, "layer2": 1, "layer3.0.conv1": 2, "layer3.0.bn1": 0, "classifier": 1}
    for size in (16, 12, 9, 32):  # odd widths (deinterleave tails), 32: the vector paths
        x = torch.randn(2, 3, size, size)
        _assert_levels(rt, m, x, route, rtol=1e-3, atol=1e-4)
    prog = _programs(rt)[0]
    assert len(prog._geos) == 4 and all(g is not None for g in prog._geos.values())


def test_program_threads_run_different_levels(tmp_path, mismatches_under_threads):
    _, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16))
    _all_sparse(rt, 4)
    assert mismatches_under_threads(rt, torch.randn(4, 3, 16, 16), calls=8) == []


@pytest.mark.parametrize("name, shape", [("resnet20", (3, 16, 16)), ("lenet5", (1, 28, 28))])
def test_program_nan_and_inf_propagate_like_torch(tmp_path, name, shape):
    """Through residual adds, ReLU, the global pool (ResNet) and the fused 2x2 max-pools (LeNet)."""
    m, rt = _registry(tmp_path, name, {}, shape)
    _all_sparse(rt, 2)
    x = torch.randn(2, *shape)
    x[0, 0, 5, 7] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    _assert_levels(rt, m, x, rtol=1e-3, atol=1e-4, equal_nan=True)


def test_program_falls_back_and_keeps_the_errors(tmp_path):
    """Dense-chosen convs, float64 input and a wrong input all take the unit path, with its
    results and its errors."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16))
    units = PackedRuntime(rt.model, rt.spec, programs=False)
    prog = _programs(rt)[0]
    x = torch.randn(2, 3, 16, 16)
    for layer in rt.sparse_layers():  # one dense conv: the level runs unit by unit
        layer.mode.update({(k, 2): "sparse" for k in range(SPEC.num_levels)})
    rt.sparse_layers()[3].mode[(0, 2)] = "dense"
    torch.testing.assert_close(rt(x, level=0), units(x, level=0), rtol=1e-4, atol=1e-5)
    assert not _ran(prog)
    torch.testing.assert_close(rt(x.double(), level=1).float(), units(x, level=1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit weight"):
        rt(torch.randn(2, 4, 16, 16), level=1)


class Branchy(nn.Module):
    """A conv region whose middle value is also read outside it (by a sigmoid gate)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.c4 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        gate = torch.sigmoid(b)  # not a program op: the region must end at b
        c = self.c4(F.relu(self.c3(b * gate)))
        return c.mean((2, 3))


def test_region_trimmed_where_a_value_escapes(tmp_path):
    m, rt = _custom(Branchy, tmp_path)
    progs = _programs(rt)
    assert [len(p.units) for p in progs] == [2, 2]  # (c1, c2) | gate | (c3, c4)
    _all_sparse(rt, 3)
    x = torch.randn(3, 3, 11, 11)
    _assert_levels(rt, m, x, rtol=1e-4, atol=1e-5)
    assert all(_ran(p) for p in progs)


def test_tuned_program_runtime_equals_nested_model(tmp_path):
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "A"}, (3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    rt.tune(x, repeats=2)
    _assert_levels(rt, m, x, rtol=1e-3, atol=1e-4)


def test_programs_off_keeps_the_feature_major_chain(tmp_path):
    _, rt = _registry(tmp_path, "lenet5", {}, (1, 28, 28))
    off = PackedRuntime(rt.model, rt.spec, programs=False)
    assert not _programs(off) and any(isinstance(u, FeatureMajorChain) for u in off.units())
    x = torch.randn(2, 1, 28, 28)
    for k in range(SPEC.num_levels):
        torch.testing.assert_close(rt(x, level=k), off(x, level=k), rtol=1e-4, atol=1e-5)


class StridedResidual(nn.Module):
    """A strided conv with a residual (the program's copy-out path adds it), a 3x3 max-pool."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.short = nn.Conv2d(6, 6, 1, stride=2)
        self.c3 = nn.Conv2d(6, 4, 2, dilation=2)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.bn(self.c2(a)) + self.short(a))
        return F.max_pool2d(self.c3(b), 3)


def test_strided_residual_and_pool_in_a_program(tmp_path):
    m, rt = _custom(StridedResidual, tmp_path, (3, 13, 13))
    (prog,) = _programs(rt)
    assert len(prog.units) == 4
    _all_sparse(rt, 2)
    x = torch.randn(2, 3, 13, 13)
    _assert_levels(rt, m, x, rtol=1e-4, atol=1e-5)
    assert _ran(prog)
    kinds = set(prog._geometry((3, 13, 13)).steps[:, 0].tolist())
    assert {1, 2, 3, 5} <= kinds  # split, direct conv, copy-out conv, copy out


class WideRows(nn.Module):
    """Padding only along the width (no top/bottom border), wider than 16: a direct conv's junk
    columns run past its plane."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, (1, 35), padding=(0, 17))
        self.c2 = nn.Conv2d(4, 4, (1, 35), padding=(0, 17))
        self.c3 = nn.Conv2d(4, 3, (3, 1), dilation=(2, 1))

    def forward(self, x):
        a = F.relu(self.c1(x))
        return self.c3(F.relu(self.c2(a) + a))


def test_width_only_padding(tmp_path):
    m, rt = _custom(WideRows, tmp_path)
    (prog,) = _programs(rt)
    _all_sparse(rt, 2)
    x = torch.randn(2, 3, 5, 40)
    _assert_levels(rt, m, x, rtol=1e-4, atol=1e-5)
    assert _ran(prog)


def test_program_rejects_units_out_of_order(tmp_path):
    _, rt = _registry(tmp_path, "lenet5", {}, (1, 28, 28))
    prog = _programs(rt)[0]
    with pytest.raises(ValueError, match="in order"):
        PlaneProgram([("conv", 1, 0, -1), ("conv", 0, 1, -1)], list(prog.units))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_block_pruned_rows_run_four_at_a_time(tmp_path, dtype):
    """4x1 block pruning (``nestify_(..., block=(4, 1))``): four output rows share their columns at
    every level, and the program runs them together (``_rows4``: 24-position tiles, the remainder
    row by row, with and without a residual); every level still equals the unit path and the
    nested model. Sizes 16 (288 positions: no remainder), 11 and 32 (remainders)."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16), dtype=dtype, block=(4, 1))
    (prog,) = _programs(rt)
    units = PackedRuntime(rt.model, rt.spec, programs=False)
    for batch in (1, 3):
        _all_sparse(rt, batch)
        for size in (16, 11, 32):
            x = torch.randn(batch, 3, size, size)
            for k in range(SPEC.num_levels):
                torch.testing.assert_close(rt(x, level=k), units(x, level=k), rtol=1e-4, atol=1e-5)
            if dtype == "float32":
                _assert_levels(rt, m, x, rtol=1e-3, atol=1e-4)
    blk = [prog._arrays(k)[4] for k in range(SPEC.num_levels)]
    assert all(b.sum() >= 30 for b in blk)  # most 3x3 convs' rows are in blocks at every level
    assert _ran(prog)


def test_unstructured_rows_are_not_blocked(tmp_path):
    _, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16))
    (prog,) = _programs(rt)
    assert all(prog._arrays(k)[4].sum() == 0 for k in range(SPEC.num_levels - 1))


def _strip_convs(prog, shape, tiling=1):
    """Direct convs of the program at input ``shape`` run as strips (1) or whole-row tiles (2)."""
    geo = prog._geometry(shape)
    return int(((geo.steps[:, 0] == 2) & (geo.steps[:, 19] == tiling)).sum())


@pytest.mark.parametrize("dtype, shortcut", [("float32", "A"), ("float32", "B"), ("int8", "B")])
def test_eight_wide_stage_runs_on_strip_planes(tmp_path, dtype, shortcut):
    """8-wide planes (ResNet stage 3 at 32 px) are strip planes: pitch 16, one cache line per row;
    their convs compute the 8 valid columns only, in tiles of 8 / 4 / 2 / 1 rows (heights 8,
    5 = 4 + 1, 3 = 2 + 1, 16 = 8 + 8), with and without a residual, the stride-2 convs into the
    stage on strip phases; every level equals the unit path and the nested model, also under a
    level map and at batch 1."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": shortcut}, (3, 16, 16), dtype=dtype)
    (prog,) = _programs(rt)
    units = PackedRuntime(rt.model, rt.spec, programs=False)
    for batch in (1, 3):
        _all_sparse(rt, batch)
        for hw in ((32, 32), (20, 32), (12, 32), (64, 32)):
            x = torch.randn(batch, 3, *hw)
            _assert_program_levels(rt, units, m, x, dtype, {"": 0, "layer3.1": 2, "layer3.2.bn2": 1})
            # the stage's five stride-1 convs, its stride-2 conv (and option B's 1x1 projection)
            assert _strip_convs(prog, (3, *hw)) == (6 if shortcut == "A" else 7)
            steps = prog._geometry((3, *hw)).steps  # the stage's phases are strip rows: (pitch, column)
            phases = [(r[10], r[11]) for r in steps[steps[:, 0] == 1]] + [(r[23], r[26]) for r in steps if r[20]]
            assert phases[-1] == (16, 4)  # in a SPLIT step, or written by the producer (fused)
    assert _strip_convs(prog, (3, 16, 64)) == 0  # stages 64 / 32 / 16 wide: plain planes
    assert _ran(prog)


@pytest.mark.parametrize("dtype, shortcut, block", [("float32", "A", (1, 1)), ("float32", "B", (1, 1)),
                                                    ("int8", "B", (1, 1)), ("float32", "B", (4, 1))])
def test_sixteen_thirty_two_and_sixty_four_wide_rows_run_whole_row_tiles(tmp_path, dtype, shortcut, block):
    """Direct convs whose rows are 16, 32 or 64 wide compute their valid columns only, as tiles of
    whole rows (4 x 16, 2 x 32, 1 x 64), the last rows of a channel as narrower tiles: heights 27
    (odd at 32 wide), 13 / 25 (7 = 4 + 2 + 1 / 13 = 4 + 4 + 4 + 1 at 16 wide) and 9 (64 / 32 / 16
    wide stages: 9, 5 = 2 + 2 + 1, 3 = 2 + 1). Nothing writes a plane's border, so the next conv's
    padding stays zero; 4x1-blocked rows run their own tiles and clear their junk columns. Every
    level equals the unit path and the nested model, also under a level map and at batch 1."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": shortcut}, (3, 16, 16), dtype=dtype, block=block)
    (prog,) = _programs(rt)
    units = PackedRuntime(rt.model, rt.spec, programs=False)
    if block != (1, 1):
        assert any(prog._arrays(k)[4].sum() > 0 for k in range(SPEC.num_levels - 1))
    for batch in (1, 3):
        _all_sparse(rt, batch)
        for hw in ((27, 32), (13, 32), (25, 32), (9, 64)):
            x = torch.randn(batch, 3, *hw)
            _assert_program_levels(rt, units, m, x, dtype, {"": 0, "layer2.1": 2, "layer1.2.bn2": 1})
            # stages 1 and 2 (32 / 16 wide; 64 / 32 wide at 9x64): every direct conv but the strips
            steps = prog._geometry((3, *hw)).steps
            direct = int((steps[:, 0] == 2).sum())
            assert _strip_convs(prog, (3, *hw), 2) == direct - _strip_convs(prog, (3, *hw)) >= 12
            # each stage's last conv writes the phases of the next stage's stride-2 readers
            assert int((steps[:, 0] == 1).sum()) == 0 and int(steps[:, 20].sum()) == 2
    steps = prog._geometry((3, 24, 24)).steps
    assert _strip_convs(prog, (3, 24, 24), 2) == 0  # 24 / 12 / 6 wide: flat spans ...
    assert int((steps[:, 0] == 1).sum()) == 2 and int(steps[:, 20].sum()) == 0  # ... and SPLIT steps
    assert _ran(prog)


class PhaseReaders(nn.Module):
    """A conv (with a residual) read only by stride-2 convs of other kernels and paddings, a 5x5
    with padding 2 and a 1x1 with none, through one phase split (border 2: an even one). With
    ``MIXED`` a stride-1 1x1 conv reads the first too, so it splits in a SPLIT step, and the
    stride-2 1x1 reads the end of a chain of two 1x1s instead, whose last conv (border 0, no
    padding among its readers) writes its phases."""

    MIXED = False

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 5, stride=2, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1, stride=2)
        self.d = nn.Conv2d(8, 8, 1)
        self.e = nn.Conv2d(8, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c0(x))
        p = F.relu(self.c1(h) + h)
        q = F.relu(self.e(F.relu(self.d(p)))) if self.MIXED else p
        return self.c2(F.relu(self.bn(self.a(p)) + self.b(q)))


class PhaseReadersMixed(PhaseReaders):
    MIXED = True


@pytest.mark.parametrize("cls", [PhaseReaders, PhaseReadersMixed])
def test_a_conv_read_only_by_stride_two_convs_writes_their_phases(tmp_path, cls):
    """The producer splits its whole-row tiles into the readers' 2x2 phases in registers (rows
    stored and split after where tiles do not cover them: an odd last row at 32 wide, the last
    two at 16, every row at 64); where a stride-1 conv also reads it, a SPLIT step runs. Equal
    to the unit path and the nested model at every level, batch 1 and 3."""
    m, rt = _custom(cls, tmp_path, (3, 16, 16))
    (prog,) = _programs(rt)
    units = PackedRuntime(rt.model, rt.spec, programs=False)
    for batch in (1, 3):
        _all_sparse(rt, batch)
        for hw in ((32, 32), (31, 32), (30, 16), (13, 64), (20, 20)):
            x = torch.randn(batch, 3, *hw)
            for k in range(SPEC.num_levels):
                torch.testing.assert_close(rt(x, level=k), units(x, level=k), rtol=1e-4, atol=1e-5)
            _assert_levels(rt, m, x, rtol=1e-4, atol=1e-5)
            steps = prog._geometry((3, *hw)).steps
            splits, fused = int((steps[:, 0] == 1).sum()), int(steps[:, 20].sum())
            if hw == (20, 20):  # 20 wide: flat spans, so SPLIT steps
                assert (splits, fused) == ((2, 0) if cls.MIXED else (1, 0))
            else:
                assert (splits, fused) == ((1, 1) if cls.MIXED else (0, 1))
    assert _ran(prog)


class EightWide(nn.Module):
    """Stride-1 convs on 8-wide planes with other kernel widths, paddings and a dilation: strip
    planes where every tap stays in a row's line (padding <= 4), plain planes where one does not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 5, padding=2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c3 = nn.Conv2d(8, 8, (1, 9), padding=(0, 4))
        self.c4 = nn.Conv2d(8, 4, (3, 11), padding=(1, 5))

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a) + a)
        return self.c4(self.c3(b))


def test_strip_planes_with_other_kernels(tmp_path):
    m, rt = _custom(EightWide, tmp_path)
    (prog,) = _programs(rt)
    _all_sparse(rt, 2)
    for h in (8, 7, 11):
        x = torch.randn(2, 3, h, 8)
        _assert_levels(rt, m, x, rtol=1e-4, atol=1e-5)
        # c1, c2 on strips; c3 reads b, whose pitch c4's padding 5 forces past 16; c4: plain
        assert _strip_convs(prog, (3, h, 8)) == 2
    assert _ran(prog)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_stride_two_convs_write_straight_into_their_output(tmp_path, shortcut):
    """A stride-2 conv's phases are split at its output plane's pitch (when a phase row fits), so
    it runs direct like a stride-1 conv: no ResNet conv goes through the wide scratch at even or
    odd sizes, and every level equals the nested model; at 16 px the second one reads an 8-wide
    strip plane, whose wider border the split skips (it takes the columns the conv reads)."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": shortcut}, (3, 16, 16))
    (prog,) = _programs(rt)
    _all_sparse(rt, 2)
    for size in (11, 13, 16, 24, 32):
        _assert_levels(rt, m, torch.randn(2, 3, size, size), rtol=1e-3, atol=1e-4)
        steps = prog._geometry((3, size, size)).steps
        assert 3 not in steps[:, 0].tolist()  # no wide conv
        # SPLIT steps, or the phases written by their producer; phase pitch > phase width
        splits, fused = steps[steps[:, 0] == 1], steps[steps[:, 20] == 1]
        assert len(splits) + len(fused) == 2 and all(r[10] > r[9] for r in splits)
        # a fused split's readers run direct: their input pitch is its phase pitch (field 23)
        for r in fused:
            readers = steps[(steps[:, 0] == 2) & (steps[:, 1] == r[21] + r[26])]
            assert len(readers) >= 1 and all(q[8] == r[23] for q in readers)
    assert _ran(prog)


class MLPHead(nn.Module):
    """Convs, a global pool, then a two-layer Linear head with a Dropout between."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 1).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(h))))


def test_a_linear_head_stays_a_chain_and_large_tails_leave_batched_calls(tmp_path, monkeypatch):
    """A Linear that feeds another packed layer starts a feature-major chain rather than closing
    the program; a tail with more than TAIL_MAX_NNZ non-zeros runs after the program at batch
    > 1 (one batched call) and inside it at batch 1. Results equal the nested model."""
    m, rt = _custom(MLPHead, tmp_path)
    (prog,) = _programs(rt)
    assert not prog._tail and any(isinstance(u, FeatureMajorChain) for u in rt.units())
    for batch in (1, 3):
        _all_sparse(rt, batch)
        _assert_levels(rt, m, torch.randn(batch, 3, 8, 8))
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "A"}, (3, 16, 16))
    (prog,) = _programs(rt)
    monkeypatch.setattr(K, "choose", lambda csr, level, batch: "sparse")
    monkeypatch.setattr(program, "TAIL_MAX_NNZ", 0)
    for batch in (1, 3):
        _all_sparse(rt, batch)
        _assert_levels(rt, m, torch.randn(batch, 3, 16, 16), rtol=1e-3, atol=1e-4)
        states = [st for st in prog._states.values() if st is not None]
        assert states and all(st[2] == (batch == 1) for st in states)
        prog._states.clear()


@pytest.mark.parametrize("model", ["resnet_a", "strided_residual"])
def test_all_dense_region_runs_channels_last(tmp_path, model):
    """When every conv of a region runs dense, the unit path keeps its activations channels-last
    (oneDNN's faster layout), returns NCHW-contiguous results (a 4-D output too) equal to the
    nested model; batch 1 and a region with a sparse conv stay NCHW."""
    if model == "resnet_a":
        m, rt = _registry(tmp_path, "resnet20", {"shortcut": "A"}, (3, 16, 16))
        shape = (3, 16, 16)
    else:
        m, rt = _custom(StridedResidual, tmp_path, (3, 13, 13))
        shape = (3, 13, 13)
    (prog,) = _programs(rt)
    seen = []
    hooks = [u.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and args[0].shape[0] > 1
                                      and args[0].shape[2] * args[0].shape[3] > 1))
        for u in prog._convs]  # the convs (not a Linear tail)
    try:
        for batch in (3, 1):
            for layer in rt.sparse_layers():
                layer.mode.update({(k, batch): "dense" for k in range(SPEC.num_levels)})
            x = torch.randn(batch, *shape)
            seen.clear()
            for k in range(SPEC.num_levels):
                with ns.use_level(m, k), torch.no_grad():
                    ref = m(x)
                got = rt(x, level=k)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
                assert got.is_contiguous()
            assert seen and all(seen) == (batch > 1) and (any(seen) or batch == 1)
        for layer in rt.sparse_layers():
            layer.mode[(0, 3)] = "dense"
        rt.sparse_layers()[1].mode[(0, 3)] = "sparse"
        seen.clear()
        rt(torch.randn(3, *shape), level=0)
        assert seen and not any(seen)
    finally:
        for h in hooks:
            h.remove()


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class InlineShortcutNet(nn.Module):
    """The common CIFAR ResNet's option-A shortcut written inline (``LambdaLayer(lambda x:
    F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0))``), once symmetric and once
    not, and one zero-padding with a non-zero fill (not a shortcut)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.short = _Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4), "constant", 0))
        self.c3 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.c4 = nn.Conv2d(24, 24, 3, padding=1, bias=False)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))) + self.short(x))
        z = F.relu(self.c4(F.relu(self.c3(y))) + F.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 3, 5)))
        z = F.adaptive_avg_pool2d(z, 1).flatten(1)
        return self.fc(z) + F.pad(z[:, :3], (0, 7), value=1.0)[:, :10]


def test_inline_option_a_shortcuts_join_the_program(tmp_path):
    m, rt = _custom(InlineShortcutNet, tmp_path, (3, 16, 16))
    (prog,) = _programs(rt)
    assert [sc.before for sc in prog.shortcuts] == [4, 3] and [sc.extra for sc in prog.shortcuts] == [8, 8]
    assert sum(op[0] == "conv" for op in prog.ops) == 5
    for batch in (1, 3):
        _all_sparse(rt, batch)
        for size in (16, 11):
            _assert_levels(rt, m, torch.randn(batch, 3, size, size), rtol=1e-4, atol=1e-5)
    assert _ran(prog)


def test_global_pool_over_wide_rows(tmp_path):
    """The program's global pool with rows of 16 and 32 floats (one vector accumulator across
    rows) and of 4 (row by row) equals the nested model's, NaN included."""
    m, rt = _registry(tmp_path, "resnet20", {"shortcut": "B"}, (3, 16, 16))
    (prog,) = _programs(rt)
    _all_sparse(rt, 2)
    for size in (64, 128, 16):
        x = torch.randn(2, 3, size, size)
        _assert_levels(rt, m, x, rtol=1e-3, atol=1e-4)
        gap = prog._geometry((3, size, size)).steps
        assert gap[gap[:, 0] == 4][0, 4] == size // 4  # the pooled plane's width
    x[0, :, 3, 3] = float("nan")
    assert torch.isnan(rt(x, level=0)[0]).all() and not torch.isnan(rt(x, level=0)[1]).any()
    assert _ran(prog)


class DropoutHead(nn.Module):
    """Convs, a global pool, a Dropout, then the classifier (Dropout is the identity at inference)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Identity())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.c2(F.relu(self.c1(x))))))


def test_a_classifier_behind_a_dropout_joins_the_program(tmp_path):
    m, rt = _custom(DropoutHead, tmp_path)
    (prog,) = _programs(rt)
    assert prog._tail and len([n for n in rt.graph.graph.nodes if n.op == "call_module"]) == 1
    for batch in (1, 3):
        _all_sparse(rt, batch)
        _assert_levels(rt, m, torch.randn(batch, 3, 8, 8))
