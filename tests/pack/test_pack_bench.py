"""bench_packed: one row per (batch, level), positive times, the documented keys."""
import json

import pytest
import torch

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import nestify_
from nestedsparse.pack import pack
from nestedsparse.pack.bench import ROW_KEYS, bench_packed, time_interleaved

SPEC = LevelSpec((0.1, 0.5, 1.0))


@pytest.fixture
def packed_file(tmp_path):
    torch.manual_seed(0)
    model = models.create("lenet5", image_size=16)
    nestify_(model, SPEC)
    path = tmp_path / "lenet.nsp"
    p = pack(model, model_name="lenet5", model_kwargs={"image_size": 16})
    p.save(path)
    return path, p


def test_bench_rows(packed_file):
    path, p = packed_file
    threads = torch.get_num_threads()
    rows = bench_packed(path, batches=(1, 4), threads=1, repeats=3)
    assert torch.get_num_threads() == threads  # restored
    assert [(r["batch"], r["level"]) for r in rows] == [(b, k) for b in (1, 4) for k in range(SPEC.num_levels)]
    have_ort = _has_ort()
    for r in rows:
        assert set(r) == set(ROW_KEYS)
        assert r["ours_ms"] > 0 and r["torch_dense_ms"] > 0
        assert r["speedup_vs_torch"] == pytest.approx(r["torch_dense_ms"] / r["ours_ms"], rel=1e-2)
        if have_ort:
            assert r["ort_dense_ms"] > 0 and r["speedup_vs_ort"] > 0
        else:
            assert r["ort_dense_ms"] is None and r["speedup_vs_ort"] is None
        assert r["density"] == SPEC.densities[r["level"]]
        assert r["bytes"] == p.level_bytes(r["level"])
        assert 0 <= r["sparse_layers"] <= r["layers"] == 4
        assert r["threads"] == 1 and r["repeats"] == 3
    # one dense baseline per batch
    for b in (1, 4):
        assert len({r["torch_dense_ms"] for r in rows if r["batch"] == b}) == 1
    assert [r["bytes"] for r in rows[:3]] == sorted(r["bytes"] for r in rows[:3])
    json.dumps(rows)  # JSON-ready


def test_bench_without_ort(packed_file):
    path, _ = packed_file
    rows = bench_packed(path, batches=(2,), repeats=3, ort=False, levels=[0])
    assert len(rows) == 1 and rows[0]["ort_dense_ms"] is None and rows[0]["speedup_vs_ort"] is None


def test_bench_rejects_bad_arguments(packed_file):
    path, _ = packed_file
    with pytest.raises(ValueError):
        bench_packed(path, batches=(0,), repeats=3)
    with pytest.raises(ValueError):
        bench_packed(path, batches=(1,), repeats=0, ort=False)


def test_time_interleaved_counts_calls():
    calls = {"a": 0, "b": 0}

    def make(k):
        def f():
            calls[k] += 1
        return f

    t = time_interleaved({"a": make("a"), "b": make("b")}, repeats=7, warmup=2, rounds=3, burst_warmup=1)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    assert calls["a"] == calls["b"] == 2 + 3 * (1 + 3)  # warm-up + per round (1 untimed + ceil(7/3))
    calls.update(a=0, b=0)
    time_interleaved({"a": make("a"), "b": make("b")}, repeats=40, warmup=0)  # 4 rounds of 10, 2 untimed each
    assert calls["a"] == 4 * (2 + 10)
    with pytest.raises(ValueError):
        time_interleaved({"a": make("a")}, repeats=0)


def _has_ort():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_rows_give_the_density_each_level_keeps(tmp_path):
    """``density`` is the spec's; ``kept`` what the file's level really holds (a channel level keeps more)."""
    pytest.importorskip("numba")
    from nestedsparse import models
    from nestedsparse.levels import LevelSpec
    from nestedsparse.nest import nestify_
    from nestedsparse.pack import pack, read_packed
    from nestedsparse.structure import ChannelSelector

    torch.manual_seed(0)
    m = models.create("mlp", num_classes=10)
    nestify_(m, LevelSpec((0.25, 1.0)))
    ChannelSelector((0.5, 1.0)).apply_(m)
    path = tmp_path / "w.nsp"
    pack(m, model_name="mlp", model_kwargs={"num_classes": 10}).save(path)
    rows = bench_packed(path, batches=(2,), repeats=2, ort=False)
    packed = read_packed(path)
    total = sum(pl.csr.shape[0] * pl.csr.shape[1] for pl in packed.layers.values())
    for r in rows:
        assert r["kept"] == round(sum(pl.csr.nnz(r["level"]) for pl in packed.layers.values()) / total, 4)
    assert rows[0]["density"] == 0.25 and rows[0]["kept"] > 0.4  # half the channels: about half the weights


def test_ort_baseline_is_its_best_setting_one_thread_included(packed_file, monkeypatch):
    """With several threads the ONNX Runtime baseline also runs on one thread (a small call is
    faster without workers to wake), and the baseline is the fastest of its settings."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from nestedsparse.pack import bench

    path, _ = packed_file
    opened = []
    real_session = bench.ort_session

    def recording(p, threads=None, spinning=True):
        opened.append((threads, spinning))
        return real_session(p, threads, spinning)

    def fake_times(fns, repeats, warmup=3):
        return {k: {"o": 3.0, "ort_quiet": 2.0, "ort_one": 0.5, "torch": 4.0}.get(k, 1.0) for k in fns}

    monkeypatch.setattr(bench, "ort_session", recording)
    monkeypatch.setattr(bench, "time_interleaved", fake_times)
    rows = bench_packed(path, batches=(1,), threads=2, repeats=2, levels=[0])
    assert sorted(opened) == [(1, True), (2, False), (2, True)]
    assert rows[0]["ort_dense_ms"] == 0.5 and rows[0]["speedup_vs_ort"] == 0.5
    opened.clear()
    rows = bench_packed(path, batches=(1,), threads=1, repeats=2, levels=[0])
    assert sorted(opened) == [(1, False), (1, True)]  # one thread asked: no separate one-thread session
    assert rows[0]["ort_dense_ms"] == 2.0
