"""The runtime runs a channel level as its slim dense network where tune() finds that faster."""
import pytest
import torch

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import iter_nested_bn, nestify_
from nestedsparse.pack import load_packed, pack
from nestedsparse.pack import runtime as rt_mod
from nestedsparse.pack.runtime import SLIM
from nestedsparse.structure import ChannelSelector

pytest.importorskip("numba")


def _packed(tmp_path):
    torch.manual_seed(0)
    m = models.create("lenet5", image_size=16)
    nestify_(m, LevelSpec((0.0625, 0.25, 1.0)))
    ChannelSelector((0.25, 0.5, 1.0)).apply_(m)
    g = torch.Generator().manual_seed(1)
    for _, bn in iter_nested_bn(m):
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
    path = tmp_path / "m.nsp"
    pack(m, model_name="lenet5", model_kwargs={"image_size": 16}).save(path)
    return path


def _timings(slim_wins):
    def fake(fns, repeats):  # deterministic: the slim network wins or loses, everything else ties
        return {k: (0.0 if slim_wins else 2.0) if k == "slim" else 1.0 for k in fns}
    return fake


def test_tune_picks_the_slim_network_where_faster(tmp_path, monkeypatch):
    path = _packed(tmp_path)
    rt, ref = load_packed(path), load_packed(path)
    x, x3 = torch.randn(4, 1, 16, 16), torch.randn(3, 1, 16, 16)
    monkeypatch.setattr(rt_mod, "_median_times", _timings(True))
    picks = rt.tune(x)
    ref.tune(x, slim=False)
    assert {k for (name, k), v in picks.items() if name == SLIM and v == "slim"} == {0, 1}  # level 2 is full width
    assert [rt.uses_slim(k, 4) for k in range(3)] == [True, True, False]
    assert not rt.uses_slim(0, 3)  # tuned per batch size
    calls = []
    for k in (0, 1):
        rt._slim_on[(k, 4)].register_forward_hook(lambda mod, a, out, k=k: calls.append(k))
    for k in range(3):
        torch.testing.assert_close(rt(x, level=k), ref(x, level=k), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rt(x3, level=k), ref(x3, level=k), rtol=1e-4, atol=1e-5)
    assert calls == [0, 1]  # batch 4 at levels 0 and 1 only
    per_layer = {name: 0 for name in rt.names}
    torch.testing.assert_close(rt(x, level=per_layer), ref(x, level=0), rtol=1e-4, atol=1e-5)
    assert calls == [0, 1]  # a per-layer level map runs the packed path
    monkeypatch.setattr(rt_mod, "_median_times", _timings(False))
    picks = rt.tune(x)  # slower now: back to the packed path
    assert not any(name == SLIM for name, _ in picks) and not rt.uses_slim(0, 4)


def test_no_slim_network_without_unread_channels(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = models.create("lenet5", image_size=16)
    nestify_(m, LevelSpec((0.6, 1.0)))  # unstructured 60%: every channel is still read
    path = tmp_path / "u.nsp"
    pack(m, model_name="lenet5", model_kwargs={"image_size": 16}).save(path)
    rt = load_packed(path)
    monkeypatch.setattr(rt_mod, "_median_times", _timings(True))
    picks = rt.tune(torch.randn(2, 1, 16, 16))
    assert not any(name == SLIM for name, _ in picks)
    assert not any(rt.uses_slim(k, 2) for k in range(2)) and rt._slim_models == {0: None, 1: None}


def test_slim_route_serves_only_what_it_was_tuned_for(tmp_path, monkeypatch):
    rt = load_packed(_packed(tmp_path))
    x = torch.randn(4, 1, 16, 16)
    monkeypatch.setattr(rt_mod, "_median_times", _timings(True))
    picks = rt.tune(x, levels=iter([0, 1]))  # any iterable of levels
    assert {k for (name, k) in picks if name == SLIM} == {0, 1}
    y64 = rt(x.double(), level=0)  # another dtype: the packed path, as before tuning
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), rt(x, level=0), rtol=1e-4, atol=1e-5)
    rt.tune(x, slim=False)  # off: the slim networks are dropped
    assert not any(rt.uses_slim(k, 4) for k in range(3)) and not any(v is not None for v in rt._slim_models.values())
    assert not any(v is not None for v in rt._slim_ort.values())


def test_bench_rows_say_which_levels_run_slim(tmp_path, monkeypatch):
    from nestedsparse.pack.bench import bench_packed

    monkeypatch.setattr(rt_mod, "_median_times", _timings(True))
    rows = bench_packed(_packed(tmp_path), batches=(2,), repeats=2, ort=False)
    assert [r["slim"] for r in rows] == ["torch", "torch", ""]


def _fastest(name):
    def fake(fns, repeats):  # deterministic: ``name`` is fastest, the packed path slowest
        return {k: 0.0 if k == name else 2.0 if k == "packed" else 1.0 for k in fns}
    return fake


def _packed_resnet(tmp_path):
    torch.manual_seed(0)
    m = models.create("resnet20", in_channels=1)
    nestify_(m, LevelSpec((0.0625, 1.0)))
    ChannelSelector((0.25, 1.0)).apply_(m)
    path = tmp_path / "r.nsp"
    pack(m, model_name="resnet20", model_kwargs={"in_channels": 1}).save(path)
    return path


def test_tune_can_route_a_slim_level_through_onnxruntime(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = _packed_resnet(tmp_path)
    rt, ref = load_packed(path), load_packed(path)
    x = torch.randn(3, 1, 12, 12)
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim-onnxruntime"))
    picks = rt.tune(x)
    assert picks[(SLIM, 0)] == "slim-onnxruntime" and rt.slim_backend(0, 3) == "onnxruntime"
    assert rt.slim_backend(1, 3) is None  # full width: nothing to slim
    torch.testing.assert_close(rt(x, level=0), ref(x, level=0), rtol=1e-4, atol=1e-4)
    calls = []
    net = rt._slim_on[(0, 3)]
    monkeypatch.setattr(net, "session", _Counting(net.session, calls))
    rt(x, level=0)
    x16 = torch.randn(3, 1, 16, 16)  # the same batch at another size: the export cannot take it
    torch.testing.assert_close(rt(x16, level=0), ref(x16, level=0), rtol=1e-4, atol=1e-4)
    assert len(calls) == 1
    rt.tune(x16)  # tuned again at another size: a new export for it
    assert rt._slim_on[(0, 3)].sample_shape == (1, 16, 16)
    torch.testing.assert_close(rt(x16, level=0), ref(x16, level=0), rtol=1e-4, atol=1e-4)
    net = rt._slim_on[(0, 3)]
    monkeypatch.setattr(net, "session", None)  # ONNX Runtime failing on a call: that call runs packed
    torch.testing.assert_close(rt(x16, level=0), ref(x16, level=0), rtol=1e-4, atol=1e-4)
    assert rt.slim_backend(0, 3) is None  # and the route is dropped
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim"))
    rt.tune(x)
    assert rt.slim_backend(0, 3) == "torch"


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_route_can_run_on_one_thread(tmp_path, monkeypatch, threads):
    """A batch-1 call of a thin network runs faster on the calling thread than with a worker to
    wake, so tune also times a one-thread session; with one kernel thread there is only that one."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = _packed_resnet(tmp_path)
    rt, ref = load_packed(path), load_packed(path)
    x = torch.randn(1, 1, 12, 12)
    monkeypatch.setattr(rt_mod.kernels, "_threads", lambda: threads)
    seen = []

    def fake(fns, repeats):
        seen.append(set(fns))
        return _fastest("slim-onnxruntime-1thread" if threads > 1 else "slim-onnxruntime")(fns, repeats)

    monkeypatch.setattr(rt_mod, "_median_times", fake)
    picks = rt.tune(x)
    ort_names = {n for names in seen for n in names if n.startswith("slim-onnxruntime")}
    if threads > 1:
        assert ort_names == {"slim-onnxruntime", "slim-onnxruntime-1thread"}
        assert picks[(SLIM, 0)] == "slim-onnxruntime-1thread"
    else:
        assert ort_names == {"slim-onnxruntime"} and picks[(SLIM, 0)] == "slim-onnxruntime"
    net = rt._slim_on[(0, 1)]
    assert net.threads == 1 and net.session.get_session_options().intra_op_num_threads == 1
    assert rt.slim_backend(0, 1) == "onnxruntime"
    torch.testing.assert_close(rt(x, level=0), ref(x, level=0), rtol=1e-4, atol=1e-4)


def test_each_onnxruntime_session_must_match_pytorch(tmp_path, monkeypatch):
    """A session whose answer differs is dropped on its own; the one that matches stays a candidate."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = _packed_resnet(tmp_path)
    x = torch.randn(1, 1, 12, 12)
    monkeypatch.setattr(rt_mod.kernels, "_threads", lambda: 2)
    real_call = rt_mod._OrtSlim.__call__
    monkeypatch.setattr(rt_mod._OrtSlim, "__call__",
                        lambda self, x: real_call(self, x) + (1.0 if self.threads == 1 else 0.0))
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim-onnxruntime-1thread"))
    rt = load_packed(path)
    picks = rt.tune(x)
    (nets,) = rt._slim_ort.values()
    assert [n.threads for n in nets] == [2]  # the one-thread session gave another answer
    assert picks[(SLIM, 0)] == "slim"  # the wrong session was never timed; the fake then ranks PyTorch's next


def test_onnxruntime_sessions_follow_the_kernel_thread_count(tmp_path, monkeypatch):
    """Sessions are cached per kernel thread count: tuning after the count changed opens new ones."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rt = load_packed(_packed_resnet(tmp_path))
    x = torch.randn(1, 1, 12, 12)
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim-onnxruntime"))
    for threads in (2, 1, 3):
        monkeypatch.setattr(rt_mod.kernels, "_threads", lambda threads=threads: threads)
        assert rt.tune(x)[(SLIM, 0)] == "slim-onnxruntime"
        assert rt._slim_on[(0, 1)].threads == threads


class _Counting:
    def __init__(self, session, calls):
        self.session, self.calls = session, calls

    def run(self, *a):
        self.calls.append(1)
        return self.session.run(*a)


def test_onnxruntime_candidate_only_when_usable_and_equal(tmp_path, monkeypatch):
    import importlib.util

    path = _packed_resnet(tmp_path)
    x = torch.randn(2, 1, 12, 12)
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim-onnxruntime"))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find(name, *a))
    rt = load_packed(path)
    assert rt.tune(x)[(SLIM, 0)] == "slim" and rt._slim_ort == {(0, (1, 12, 12), rt_mod.kernels._threads()): None}  # not installed
    monkeypatch.undo()
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim-onnxruntime"))
    monkeypatch.setattr(rt_mod._OrtSlim, "__call__", lambda self, x: torch.zeros(x.shape[0], 10))
    rt = load_packed(path)
    assert rt.tune(x)[(SLIM, 0)] == "slim" and rt._slim_ort == {(0, (1, 12, 12), rt_mod.kernels._threads()): None}  # another answer


def test_a_slim_network_with_several_outputs_stays_on_pytorch(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from torch import nn

    class Two(nn.Module):  # two heads on one trunk: a tuple out
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), self.c(h)

    torch.manual_seed(0)
    m = Two()
    nestify_(m, LevelSpec((0.25, 1.0)))
    ChannelSelector((0.25, 1.0)).apply_(m)
    pack(m).save(tmp_path / "t.nsp")
    rt = load_packed(tmp_path / "t.nsp", Two)
    x = torch.randn(2, 1, 6, 6)
    monkeypatch.setattr(rt_mod, "_median_times", _fastest("slim-onnxruntime"))
    assert rt.tune(x)[(SLIM, 0)] == "slim"  # no ORT candidate: tune used to crash here
    got, want = rt(x, level=0), ns.plain_model(m, 0)(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_tune_keeps_dense_weights_only_for_levels_that_run_dense(tmp_path, monkeypatch):
    rt = load_packed(_packed(tmp_path))
    x = torch.randn(4, 1, 16, 16)
    rt.tune(x, slim=True)
    for layer in rt.sparse_layers():
        dense_levels = {k for (k, b), way in layer.mode.items() if way == "dense"}
        dense_levels |= {k for (k, b), way in layer._rule.items() if way == "dense" and (k, b) not in layer.mode}
        assert set(layer._dense) <= dense_levels
        assert {key[0] for key in layer._epi if key[-1] == "dense"} <= dense_levels
