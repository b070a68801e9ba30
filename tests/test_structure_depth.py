"""Layer scheduling (NestedNet): lower levels skip whole residual blocks."""
import copy

import pytest
import torch
from torch import nn

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.io import CheckpointError
from nestedsparse.structure import depth_schedule, depth_schedule_, gate_blocks_, is_gated

SPEC = ns.LevelSpec((0.2, 0.5, 1.0))


def _resnet(counts=(1, 2, 3), seed=0):
    torch.manual_seed(seed)
    m = models.create("resnet20", in_channels=3)
    ns.nestify_(m, SPEC)
    if counts is not None:
        depth_schedule_(m, counts)
    m.train()
    for _ in range(2):  # per-level BatchNorm statistics
        for k in range(3):
            with ns.use_level(m, k):
                m(torch.randn(4, 3, 16, 16))
    return m.eval()


def test_schedule_names_the_blocks_each_level_skips():
    m = _resnet()
    want = {f"layer{s}.{i}": i for s in (1, 2, 3) for i in (1, 2)}
    assert depth_schedule(m) == want
    assert all(is_gated(m.get_submodule(n)) for n in want) and not is_gated(m.layer1[0])
    assert "layer1.1.level_gate" in ns.get_levels(m)
    # parameter names do not change: a gated model loads an ungated model's state
    assert set(m.state_dict()) == set(_resnet(counts=None).state_dict())


def test_level_k_runs_only_its_blocks():
    m = _resnet()
    x = torch.randn(2, 3, 16, 16)
    for k, n in enumerate((1, 2, 3)):
        ref = copy.deepcopy(m)
        for s in (1, 2, 3):
            stage = ref.get_submodule(f"layer{s}")
            for i in range(n, 3):
                stage[i] = nn.Identity()
        with ns.use_level(m, k), ns.use_level(ref, k):
            torch.testing.assert_close(m(x), ref(x))
    macs = [r["macs"] for r in ns.level_summary(m, x[:1])]
    assert macs[0] < macs[1] < macs[2]
    # rerouting: the first stage at level 0 (one block), the rest at level 2 (all blocks)
    ref = copy.deepcopy(m)
    for i in (1, 2):
        ref.layer1[i] = nn.Identity()
    with ns.use_level(m, {"": 2, "layer1": 0}), ns.use_level(ref, {"": 2, "layer1": 0}):
        torch.testing.assert_close(m(x), ref(x))


def test_skipped_blocks_get_no_gradient_from_their_level():
    m = _resnet()
    m.train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss, _ = ns.nested_loss(m, x, y, [0])
    loss.backward()
    w_skip = m.layer2[1].conv1.parametrizations.weight.original
    w_run = m.layer2[0].conv1.parametrizations.weight.original
    assert w_skip.grad is None and w_run.grad is not None and float(w_run.grad.abs().sum()) > 0


def test_save_load_pack_and_runtime_keep_the_schedule(tmp_path):
    from nestedsparse.pack import load_packed, pack
    from nestedsparse.pack.onnx import dense_model_for_level

    m = _resnet()
    path = tmp_path / "m.safetensors"
    ns.save(m, path)
    fresh = models.create("resnet20", in_channels=3)
    ns.load_into_(fresh, path)
    assert depth_schedule(fresh) == depth_schedule(m)
    fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    for k in range(3):
        with ns.use_level(m, k), ns.use_level(fresh, k):
            torch.testing.assert_close(fresh(x), m(x))
    other = models.create("resnet20", in_channels=3)
    ns.nestify_(other, SPEC)
    gate_blocks_(other, {"layer3.2": 2})
    with pytest.raises(CheckpointError, match="layer schedule"):
        ns.load_into_(other, path)

    packed = tmp_path / "m.nsp"
    pack(m, model_name="resnet20", model_kwargs={"in_channels": 3}).save(packed)
    rt = load_packed(packed)
    for k in range(3):
        with ns.use_level(m, k):
            want = m(x)
        torch.testing.assert_close(rt(x, level=k), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dense_model_for_level(rt, k)(x), want, rtol=1e-4, atol=1e-4)
    from nestedsparse.pack.runtime import PackedRuntime

    unfused = PackedRuntime(rt.model, rt.spec, fuse=False)
    for lv in ({"": 2, "layer1": 0}, {"": 0, "layer3.2": 2}, {"": 2, "layer2.1.level_gate": 0}):
        with ns.use_level(m, lv):
            want = m(x)
        torch.testing.assert_close(rt(x, level=lv), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(unfused(x, level=lv), want, rtol=1e-4, atol=1e-4)
    for k in range(3):
        with ns.use_level(m, k):
            torch.testing.assert_close(unfused(x, level=k), m(x), rtol=1e-4, atol=1e-4)


def test_bad_schedules_are_refused():
    m = models.create("resnet20", in_channels=3)
    ns.nestify_(m, SPEC)
    for counts, msg in (((1, 2), "one per level"), ((2, 1, 3), "non-decreasing"), ((0, 1, 3), ">= 1"),
                        ((1, 2, 2), "stage length")):
        with pytest.raises(ValueError, match=msg):
            depth_schedule_(m, counts)
    with pytest.raises(ValueError, match="keeps its input's shape"):
        gate_blocks_(m, {"layer2.0": 1})  # the downsampling block
    with pytest.raises(ValueError, match="no block named"):
        gate_blocks_(m, {"layer9.0": 1})
    with pytest.raises(ValueError, match="1..2"):
        gate_blocks_(m, {"layer1.1": 3})
    seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    ns.nestify_(seq, SPEC)
    with pytest.raises(ValueError, match="no stages named"):
        depth_schedule_(seq, (1, 1, 1))
    gate_blocks_(m, {"layer1.1": 1})
    with pytest.raises(ValueError, match="gated already"):
        gate_blocks_(m, {"layer1.1": 2})


def test_cli_train_with_depth(tmp_path):
    import json

    from nestedsparse.cli import main
    from nestedsparse.pack import load_packed

    run = tmp_path / "d"
    args = ["train", "--model", "resnet20", "--dataset", "synthetic", "--densities", "0.3,1.0", "--depth", "1,3",
            "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert main(["eval", str(run)]) == 0
    lv = json.loads((run / "eval.json").read_text())["levels"]
    assert lv[0]["macs"] < 0.5 * lv[1]["macs"]
    assert main(["pack", str(run), "-o", str(tmp_path / "d.nsp")]) == 0
    assert load_packed(tmp_path / "d.nsp").model.layer3[2].level_gate.min_level == 1
    assert main(args + ["--resume"]) == 0  # same schedule: resumes


def test_plain_model_of_a_level_drops_the_blocks_it_skips():
    m = _resnet()
    x = torch.randn(2, 3, 16, 16)
    for k in range(3):
        p = ns.plain_model(m, k)
        assert not any(is_gated(mm) for mm in p.modules())
        for stage in (p.layer1, p.layer2, p.layer3):  # counts (1, 2, 3): level k keeps k + 1 blocks
            assert [isinstance(b, nn.Identity) for b in stage] == [i > k for i in range(3)]
        with ns.use_level(m, k):
            torch.testing.assert_close(p(x), m(x))


def test_only_blocks_can_be_gated_and_files_are_checked(tmp_path):
    from nestedsparse.pack import PackedFormatError, load_packed, pack

    m = models.create("resnet20", in_channels=3)
    ns.nestify_(m, SPEC)
    for name in ("layer1.1.conv1", "layer1.1.bn1", "layer1", "layer1.1.conv1.parametrizations.weight.0", "stem.2"):
        with pytest.raises(ValueError, match="cannot be gated"):
            gate_blocks_(m, {name: 1})
    # a hostile schedule in a file: refused at load, not at the first call
    p = pack(m, model_name="resnet20", model_kwargs={"in_channels": 3})
    for bad in ({"layer2.0": 1}, {"layer1.1.conv1": 1}, {"nope": 1}):
        p.depth = bad
        p.save(tmp_path / "bad.nsp")
        with pytest.raises(PackedFormatError, match="layer schedule"):
            load_packed(tmp_path / "bad.nsp")
    p.depth = {"layer1.1": 7}
    p.save(tmp_path / "bad.nsp")
    with pytest.raises(PackedFormatError, match="layer schedule"):
        load_packed(tmp_path / "bad.nsp")
    good = _resnet()
    ns.save(good, tmp_path / "g.safetensors")
    from nestedsparse.io import read_tensors, write_tensors

    tensors, meta = read_tensors(tmp_path / "g.safetensors", "nestedsparse.model", (1, 2))
    meta["depth"] = {"layer2.0": 1}  # shape-changing block
    write_tensors(tmp_path / "b.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="layer schedule"):
        ns.load_into_(models.create("resnet20", in_channels=3), tmp_path / "b.safetensors")


def test_gated_weights_are_inactive_below_their_block():
    m = _resnet()
    for name, lv in depth_schedule(m).items():
        for _, _, mask in ns.iter_nested(m.get_submodule(name)):
            assert int(mask.level_map.min()) >= lv
    # selectors' later maps are clamped too
    from nestedsparse.select import create_selector

    create_selector("magnitude").apply_(m)
    assert int(m.layer3[2].conv1.parametrizations.weight[0].level_map.min()) == 2


def test_threads_running_other_levels_while_tracing_is_not_needed(tmp_path):
    """Every level's graph exists after load: no call traces, so threads never see fx patching."""
    import threading

    from nestedsparse.pack import load_packed, pack

    m = _resnet()
    pack(m, model_name="resnet20", model_kwargs={"in_channels": 3}).save(tmp_path / "m.nsp")
    rt = load_packed(tmp_path / "m.nsp")
    x = torch.randn(1, 3, 16, 16)
    want = {k: rt(x, level=k) for k in range(3)}
    n_graphs = len(rt._graphs)
    errors = []

    def work(k):
        try:
            for _ in range(30):
                if not torch.equal(rt(x, level=k), want[k]):
                    errors.append(k)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(k,)) for k in (0, 1, 2, 0)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and len(rt._graphs) == n_graphs == 3


def test_tied_weights_outside_a_gated_block_stay_active():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1, self.b2, self.head = Block(), Block(), nn.Linear(8, 8)
            self.head.weight = self.b2.fc.weight  # tied
            self.input_shape = (8,)

        def forward(self, x):
            return self.head(self.b2(self.b1(x)))

    torch.manual_seed(0)
    m = Net()
    ns.nestify_(m, ns.LevelSpec((0.5, 1.0)))
    before = int((m.head.parametrizations.weight[0].level_map == 0).sum())
    gate_blocks_(m, {"b2": 1, "b1": 1})
    assert int((m.head.parametrizations.weight[0].level_map == 0).sum()) == before > 0
    assert int(m.b1.fc.parametrizations.weight[0].level_map.min()) == 1  # not tied: clamped


def test_loading_a_file_from_before_the_clamp_clamps_it(tmp_path):
    from nestedsparse.io import read_tensors, write_tensors

    m = _resnet()
    ns.save(m, tmp_path / "m.safetensors")
    tensors, meta = read_tensors(tmp_path / "m.safetensors", "nestedsparse.model", (1, 2))
    key = "layer3.2.conv1.parametrizations.weight.0.level_map"
    tensors[key] = torch.zeros_like(tensors[key])  # what an older version saved: active from level 0
    write_tensors(tmp_path / "old.safetensors", tensors, meta)
    fresh = models.create("resnet20", in_channels=3)
    ns.load_into_(fresh, tmp_path / "old.safetensors")
    assert int(fresh.layer3[2].conv1.parametrizations.weight[0].level_map.min()) == 2


def test_a_level_keeps_its_density_when_it_skips_blocks():
    """The weights of the blocks a level skips go to the layers it runs: the level still keeps
    the spec's density of the whole model, and nothing inside a skipped block."""
    from nestedsparse.nest import compute_level_maps, iter_nested, magnitude_scores, set_level_maps_
    from nestedsparse.structure.depth import layer_min_levels

    torch.manual_seed(0)
    m = models.create("resnet20", in_channels=3)
    ns.nestify_(m, SPEC)
    depth_schedule_(m, (1, 2, 3))
    set_level_maps_(m, compute_level_maps(m, magnitude_scores(m)))
    lows = layer_min_levels(m)
    assert lows and set(lows.values()) == {1, 2} and all(n.startswith("layer") for n in lows)
    total = sum(mask.level_map.numel() for _, _, mask in iter_nested(m))
    for k, d in enumerate(SPEC.densities):
        kept = sum(int((mask.level_map <= k).sum()) for _, _, mask in iter_nested(m))
        assert abs(kept / total - d) < 1e-3, (k, kept / total, d)
    for name, mod, mask in iter_nested(m):
        assert int(mask.level_map.min()) >= lows.get(name, 0)
