"""Packed file and runtime: every level equals the masked dense model; bad files are refused."""
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nestedsparse as ns
from nestedsparse.pack import PackedFormatError, load_packed, pack, read_packed
from nestedsparse.pack.csr import column_coding
from nestedsparse.pack.runtime import SLIM

SPEC = ns.LevelSpec((0.1, 0.3, 0.6, 1.0))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), nn.ReLU(),
            nn.Conv2d(8, 6, 1, groups=2), nn.ReLU())
        self.seq = nn.Conv1d(6, 5, 3, padding=1)
        self.classifier = nn.Sequential(nn.Linear(5 * 16, 13), nn.ReLU(), nn.Linear(13, 13), nn.ReLU(), nn.Linear(13, 7))

    def forward(self, x):
        h = self.features(x)                          # [B, 6, 4, 4]
        h = self.seq(h.flatten(2))                    # Conv1d over the 16 positions
        return self.classifier(h.flatten(1))


def _trained(seed=0):
    torch.manual_seed(seed)
    m = Net()
    ns.nestify_(m, SPEC)
    m.train()
    with ns.use_level(m, 0):
        m(torch.randn(4, 3, 8, 8))  # give level 0 its own BN statistics
    m.eval()
    return m


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    m = _trained()
    path = tmp_path_factory.mktemp("p") / "net.nsp"
    pack(m).save(path)
    return m, path


@pytest.mark.parametrize("batch", [1, 5])
def test_every_level_equals_masked_dense(packed_file, batch):
    m, path = packed_file
    rt = load_packed(path, Net)
    x = torch.randn(batch, 3, 8, 8)
    for k in range(SPEC.num_levels):
        with ns.use_level(m, k), torch.no_grad():
            ref = m(x)
        for force in ("sparse", "dense"):
            for layer in rt.sparse_layers():
                for b in (batch,):
                    layer.mode[(k, b)] = force
            torch.testing.assert_close(rt(x, level=k), ref, rtol=1e-4, atol=1e-5)


def test_int8_close_and_smaller(packed_file, tmp_path):
    m, path = packed_file
    p8 = tmp_path / "net8.nsp"
    pack(m, dtype="int8").save(p8)
    rt = load_packed(p8, Net)
    x = torch.randn(4, 3, 8, 8)
    for k in range(SPEC.num_levels):
        with ns.use_level(m, k), torch.no_grad():
            ref = m(x)
        assert (rt(x, level=k) - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3
    assert p8.stat().st_size < path.stat().st_size


def test_size_within_110_percent_of_plain_csr(packed_file):
    m, _ = packed_file
    p = pack(m)
    top = SPEC.num_levels - 1
    # the nested layout's overhead in memory (every column index), and the file, which is smaller
    in_memory = p.dense_bytes() + sum(layer.csr.nbytes() for layer in p.layers.values())
    assert p.total_bytes() < in_memory <= 1.10 * p.plain_csr_bytes(top)
    sizes = [p.level_bytes(k) for k in range(SPEC.num_levels)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    total = sum(layer.csr.shape[0] * layer.csr.shape[1] for layer in p.layers.values())
    for row in p.size_table()[:-1]:  # the density a level really keeps, beside the one it was given
        assert row["density"] == round(row["nnz"] / total, 4) and row["spec_density"] == SPEC.densities[row["level"]]


def _file(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["nestedsparse"]), {k: f.get_tensor(k) for k in f.keys()}


def test_file_stores_dense_levels_as_bitmaps_or_not_at_all(packed_file):
    m, path = packed_file
    meta, tensors = _file(path)
    p = pack(m)
    assert meta["version"] == 3
    for name, pl in p.layers.items():  # SPEC ends at 1.0: every layer's densest level is complete
        levels, implied = column_coding(pl.csr)
        assert implied == SPEC.num_levels - 1 and meta["layers"][name]["bitmap_levels"] == list(levels)
        assert meta["layers"][name]["implied_level"] == implied
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(f"csr/{name}/"))
        assert stored == pl.csr.stored_nbytes() < pl.csr.nbytes()
    assert p.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    back = read_packed(path)  # and the kernels' arrays come back exactly
    for name, pl in p.layers.items():
        assert (back.layers[name].csr.col_indices == pl.csr.col_indices).all()


def test_file_without_dense_levels_stays_version_1(tmp_path):
    m = nn.Sequential(nn.Linear(300, 20))  # 2 / 5%: uint16 columns beat a bitmap
    ns.nestify_(m, ns.LevelSpec((0.02, 0.05)))
    pack(m).save(tmp_path / "s.nsp")
    meta, tensors = _file(tmp_path / "s.nsp")
    assert meta["version"] == 1 and "bitmap_levels" not in meta["layers"]["0"]
    assert not any(k.endswith("col_bitmap") for k in tensors)
    torch.testing.assert_close(load_packed(tmp_path / "s.nsp", lambda: nn.Sequential(nn.Linear(300, 20)))(
        torch.ones(2, 300), level=1), ns.plain_model(m, 1)(torch.ones(2, 300)))


def test_per_layer_levels_reroute(packed_file):
    m, path = packed_file
    rt = load_packed(path, Net)
    x = torch.randn(2, 3, 8, 8)
    route = {"features": 3, "seq": 3, "classifier": 0}
    with ns.use_level(m, route), torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(rt(x, level=route), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="matches no packed layer"):
        rt(x, level={"nope": 0})
    with pytest.raises(ValueError, match="out of range"):
        rt(x, level=4)


def test_threads_run_different_levels_at_once(packed_file, mismatches_under_threads):
    m, path = packed_file
    rt = load_packed(path, Net)
    assert not mismatches_under_threads(rt, torch.randn(3, 3, 8, 8), calls=30)


def test_switching_level_on_sparse_path_copies_no_weights(packed_file):
    m, path = packed_file
    rt = load_packed(path, Net)
    for layer in rt.sparse_layers():
        for k in range(3):
            layer.mode[(k, 2)] = "sparse"
    x = torch.randn(2, 3, 8, 8)
    rt(x, level=2)  # the first call builds what the fused calls share (the layers' arrays join it once)
    ptrs = [(l.csr.values.ctypes.data, l.csr.col_indices.ctypes.data) for l in rt.sparse_layers()]
    for k in (0, 2, 1, 0):
        rt(x, level=k)
    assert all(not l._dense for l in rt.sparse_layers())  # no per-level dense weight made
    assert ptrs == [(l.csr.values.ctypes.data, l.csr.col_indices.ctypes.data) for l in rt.sparse_layers()]


def test_tune_never_slower_choice_is_recorded(packed_file):
    _, path = packed_file
    rt = load_packed(path, Net)
    choices = rt.tune(torch.randn(4, 3, 8, 8), repeats=3)
    slim = {k for k in choices if k[0] == SLIM}  # a level may also run as its slim network where faster
    assert all(choices[k] in ("slim", "slim-onnxruntime", "slim-onnxruntime-1thread") for k in slim)
    choices = {k: v for k, v in choices.items() if k not in slim}
    assert len(choices) == len(rt.sparse_layers()) * SPEC.num_levels
    assert set(choices.values()) <= {"sparse", "dense"}


def _resave(path, mutate_meta=None, mutate_tensors=None, fix_sums=True):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["nestedsparse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    if fix_sums:
        from nestedsparse.pack.format import _digest

        meta["sha256"] = {k: _digest(v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"nestedsparse": json.dumps(meta)})


def _first_layer(meta):
    return next(iter(meta["layers"]))


@pytest.mark.parametrize("fault, mutate, match", [
    ("column out of range", lambda t: t["csr/classifier.0/col_indices"].__setitem__(0, 200), "col"),
    ("offsets", lambda t: t["csr/classifier.0/row_offsets"].__setitem__(3, 10**6), "offset"),
    ("nan value", lambda t: t["csr/classifier.0/values"].__setitem__(0, float("nan")), "nan"),
    ("level counts", lambda t: t["csr/classifier.0/level_counts"].__setitem__((0, 0), 99), "level_counts"),
    ("missing array", lambda t: t.pop("csr/classifier.0/values"), "missing"),
    ("wrong dtype", lambda t: t.__setitem__("csr/classifier.0/values", t["csr/classifier.0/values"].double()), "values"),
    ("bitmap bit", lambda t: t["csr/classifier.0/col_bitmap"].__setitem__((0, 0, 0), t["csr/classifier.0/col_bitmap"][0, 0, 0] ^ 1),
     "column_bitmap"),
    ("missing bitmap", lambda t: t.pop("csr/classifier.0/col_bitmap"), "col_bitmap"),
])
def test_hostile_arrays_raise_named_error(packed_file, tmp_path, fault, mutate, match):
    _, path = packed_file
    bad = tmp_path / "bad.nsp"
    bad.write_bytes(path.read_bytes())
    _resave(bad, mutate_tensors=mutate)
    with pytest.raises(PackedFormatError, match="classifier.0") as e:
        load_packed(bad, Net)
    assert match in str(e.value).lower() or match in str(e.value)


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.__setitem__("version", 7), "version 7 is not supported"),
    (lambda m: m["layers"]["features.0"].__setitem__("stride", [1, 1]), "geometry"),
    (lambda m: m["layers"]["features.0"].__setitem__("groups", 0), "groups"),
    (lambda m: m["layers"]["features.0"].__setitem__("weight_shape", [8, 3, 3]), "weight_shape"),
    (lambda m: m["layers"]["features.0"].__setitem__("kind", "lstm"), "kind"),
    (lambda m: m["spec"].__setitem__("densities", [0.5, 0.1]), "spec"),
    (lambda m: m["ties"].__setitem__("x", "nope"), "tie table"),
    (lambda m: m.__setitem__("input_shape", [3, -1]), "input_shape"),
    (lambda m: m.__setitem__("input_shape", [65536] * 4), "input_shape"),
    (lambda m: m.__setitem__("input_shape", "3x32x32"), "input_shape"),
    (lambda m: m.__setitem__("version", 2), "need format version 3"),
    (lambda m: m["layers"]["classifier.0"].__setitem__("implied_level", None), "column indices stored"),
    (lambda m: m["layers"]["classifier.0"].__setitem__("implied_level", "3"), "implied level must be"),
    (lambda m: m["layers"]["classifier.0"].__setitem__("implied_level", 2), "bitmap levels must be"),
    (lambda m: m["layers"]["classifier.0"].__setitem__("bitmap_levels", [0, 2]), "bitmap does not hold"),
    (lambda m: m["layers"]["classifier.0"].__setitem__("bitmap_levels", {"1": 1}), "bitmap levels must be"),
])
def test_hostile_metadata_raises_named_error(packed_file, tmp_path, mutate, match):
    _, path = packed_file
    bad = tmp_path / "bad.nsp"
    bad.write_bytes(path.read_bytes())
    _resave(bad, mutate_meta=mutate)
    with pytest.raises(PackedFormatError, match=match):
        load_packed(bad, Net)


def test_checksum_catches_silent_value_change(packed_file, tmp_path):
    _, path = packed_file
    bad = tmp_path / "bad.nsp"
    bad.write_bytes(path.read_bytes())
    _resave(bad, mutate_tensors=lambda t: t["dense/classifier.0.bias"].__setitem__(0, 1.5), fix_sums=False)
    with pytest.raises(PackedFormatError, match="SHA-256"):
        read_packed(bad)


def test_wrong_model_is_refused(packed_file):
    _, path = packed_file
    with pytest.raises(PackedFormatError, match="do not match the model"):
        load_packed(path, lambda: nn.Sequential(nn.Linear(3, 4)))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_files_load_correctly_or_raise(packed_file, tmp_path_factory, data):
    m, path = packed_file
    raw = bytearray(path.read_bytes())
    n_mut = data.draw(st.integers(1, 4))
    for _ in range(n_mut):
        kind = data.draw(st.sampled_from(["flip", "byte", "truncate", "header"]))
        if kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        elif not raw:
            break
        elif kind == "header":  # aim at the JSON header, where structure lives
            hlen = min(struct.unpack("<Q", bytes(raw[:8]).ljust(8, b"\0"))[0] + 8, len(raw))
            i = data.draw(st.integers(0, max(0, hlen - 1)))
            raw[i] = data.draw(st.integers(0, 255))
        else:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = raw[i] ^ (1 << data.draw(st.integers(0, 7))) if kind == "flip" else data.draw(st.integers(0, 255))
    bad = tmp_path_factory.mktemp("fz") / "f.nsp"
    bad.write_bytes(bytes(raw))
    try:
        rt = load_packed(bad, Net)
    except PackedFormatError:
        return
    x = torch.ones(2, 3, 8, 8)
    for k in range(SPEC.num_levels):  # a file that loads must be the original content
        with ns.use_level(m, k), torch.no_grad():
            torch.testing.assert_close(rt(x, level=k), m(x), rtol=1e-4, atol=1e-5)


def test_tied_weights_packed_once_and_run(tmp_path):
    def make():
        torch.manual_seed(0)
        a, b = nn.Linear(9, 9), nn.Linear(9, 9)
        b.weight = a.weight
        return nn.Sequential(a, nn.ReLU(), b)

    m = make()
    ns.nestify_(m, ns.LevelSpec((0.3, 1.0)))
    p = pack(m)
    assert list(p.layers) == ["0"] and p.ties == {"2": "0"}
    p.save(tmp_path / "t.nsp")
    rt = load_packed(tmp_path / "t.nsp", make)
    x = torch.randn(3, 9)
    for k in range(2):
        with ns.use_level(m, k), torch.no_grad():
            torch.testing.assert_close(rt(x, level=k), m(x), rtol=1e-4, atol=1e-5)
