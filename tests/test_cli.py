import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestedsparse.cli import main

FM = Path("/usr/share/datasets/fashion-mnist")


def test_bad_arguments_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--densities", "a,b", "--out", str(tmp_path)])
    assert "comma-separated numbers" in capsys.readouterr().err
    code = main(["train", "--dataset", "synthetic", "--densities", "0.5,0.2", "--out", str(tmp_path)])
    assert code == 2 and "strictly increasing" in capsys.readouterr().err
    code = main(["eval", str(tmp_path / "nothing")])
    assert code == 2 and "not a run folder" in capsys.readouterr().err
    for name, cmd in (("run.json", "eval"), ("eval.json", "plot")):  # a file that is not JSON: one line
        broken = tmp_path / f"broken_{cmd}"
        broken.mkdir()
        (broken / name).write_text("{not json")
        assert main([cmd, str(broken)]) == 2
        err = capsys.readouterr().err
        assert "is not valid JSON" in err and name in err and "Traceback" not in err


def test_train_eval_plot_on_synthetic(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.1,0.5,1.0", "--epochs", "2",
            "--batch-size", "32", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert main(["eval", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["model"] == "mlp" and ev["dataset"] == "synthetic"
    lv = ev["levels"]
    assert [r["level"] for r in lv] == [0, 1, 2]
    assert set(lv[0]) == {"level", "density", "params", "macs", "accuracy"}
    assert lv[0]["macs"] < lv[1]["macs"] < lv[2]["macs"] and lv[0]["params"] < lv[2]["params"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in lv)
    assert main(["plot", str(run)]) == 0
    assert (run / "pareto.png").stat().st_size > 1000
    # resume of a finished run trains nothing more and keeps the history
    assert main(args + ["--resume"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        main(args[:-1] + ["--epochs", "x"])


@pytest.mark.slow
@pytest.mark.skipif(not (FM / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_end_to_end_fashion_mnist_console_script(tmp_path):
    """The demo's path on real data at a small size: 4-level LeNet-5, one short epoch."""
    run = tmp_path / "fm"
    exe = [sys.executable, "-m", "nestedsparse.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = exe + ["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--densities", "0.05,0.1,0.25,1.0",
                   "--epochs", "1", "--max-steps-per-epoch", "60", "--out", str(run), "--no-progress"]
    subprocess.run(train, check=True, env=env, timeout=600)
    subprocess.run(exe + ["eval", str(run)], check=True, env=env, timeout=600)
    ev = json.loads((run / "eval.json").read_text())
    acc = [r["accuracy"] for r in ev["levels"]]
    assert acc[-1] > 0.6  # 60 steps of LeNet-5 already beat chance (0.1) by far
    dens = [r["density"] for r in ev["levels"]]
    assert dens == sorted(dens) and abs(dens[0] - 0.05) < 0.01


def test_pack_bench_export_commands(tmp_path, capsys):
    pytest.importorskip("numba")
    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.1,0.5,1.0", "--epochs", "1",
                 "--batch-size", "64", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    nsp = tmp_path / "m.nsp"
    assert main(["pack", str(run), "-o", str(nsp)]) == 0
    out = capsys.readouterr().out
    assert "bytes" in out and "all" in out and nsp.stat().st_size > 0
    bench_json = tmp_path / "bench.json"
    assert main(["bench", str(nsp), "--batch", "1,4", "--repeats", "3", "--json", str(bench_json)]) == 0
    rows = json.loads(bench_json.read_text())
    assert {(r["batch"], r["level"]) for r in rows} == {(b, k) for b in (1, 4) for k in range(3)}
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m0.onnx"
    assert main(["export", str(nsp), "--level", "0", "-o", str(onnx_path)]) == 0
    assert onnx_path.stat().st_size > 0
    assert main(["export", str(nsp), "--level", "0", "--slim", "-o", str(tmp_path / "m0s.onnx")]) == 0
    assert "slim" in capsys.readouterr().out and (tmp_path / "m0s.onnx").stat().st_size > 0
    assert main(["export", str(nsp), "--level", "9", "-o", str(onnx_path)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_export_slim_drops_a_channel_levels_unread_units(tmp_path, capsys):
    pytest.importorskip("numba")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.0625,0.25,1.0",
                 "--selector", "channels", "--widths", "0.25,0.5,1.0", "--epochs", "1", "--batch-size", "64",
                 "--max-steps-per-epoch", "2", "--out", str(run), "--no-progress"]) == 0
    nsp = tmp_path / "w.nsp"
    assert main(["pack", str(run), "-o", str(nsp)]) == 0
    capsys.readouterr()
    full, thin = tmp_path / "w0.onnx", tmp_path / "w0s.onnx"
    assert main(["export", str(nsp), "--level", "0", "-o", str(full)]) == 0
    assert main(["export", str(nsp), "--level", "0", "--slim", "-o", str(thin)]) == 0
    assert "slim" in capsys.readouterr().out
    assert thin.stat().st_size < 0.5 * full.stat().st_size  # a quarter of the hidden units


def test_layer_sparsity_train_collapse_refit_pack(tmp_path, capsys):
    """train --layer-sparsity -> collapse (merge + refit as a new run) -> eval -> pack -> load_packed."""
    import torch

    from nestedsparse.commands import load_run_model
    from nestedsparse.pack import load_packed
    from nestedsparse.structure import find_links

    run, small = tmp_path / "ls", tmp_path / "ls_collapsed"
    args = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.5,1.0", "--epochs", "2",
            "--batch-size", "32", "--layer-sparsity", "20", "--weight-decay", "0", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["candidates"] == 1 and hist[-1]["collapsible"] == 1  # mlp: 784-300-100-10, one candidate
    capsys.readouterr()
    assert main(["collapse", str(run), "--out", str(small), "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "layers 3 -> 2" in out
    info = json.loads((small / "run.json").read_text())
    assert info["collapse"]["links"] == [["features.3", "features.4", "classifier"]]
    model, _ = load_run_model(small)  # rebuilt from the recipe, then the saved weights
    assert find_links(model) == [] and sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 2
    assert main(["eval", str(small)]) == 0
    packed = tmp_path / "small.nsp"
    assert main(["pack", str(small), "-o", str(packed)]) == 0
    rt = load_packed(packed)  # the file's recipe rebuilds the architecture
    x = torch.randn(3, *info_input(small))
    model.eval()
    for k in range(2):
        import nestedsparse as ns

        with ns.use_level(model, k):
            torch.testing.assert_close(rt(x, level=k), model(x), rtol=1e-4, atol=1e-4)
    assert main(["collapse", str(run), "--out", str(run)]) == 2
    assert "new run folder" in capsys.readouterr().err
    # merge only (no refit): the densest level computes what the trained model's densest level did
    import nestedsparse as ns

    merged_only = tmp_path / "merged"
    assert main(["collapse", str(run), "--out", str(merged_only), "--epochs", "0", "--no-progress"]) == 0
    before, _ = load_run_model(run)
    after, _ = load_run_model(merged_only)
    before.eval()
    after.eval()
    with ns.use_level(before, 1), ns.use_level(after, 1):
        torch.testing.assert_close(after(x), before(x), rtol=1e-4, atol=1e-4)


def info_input(run):
    from nestedsparse.data import load_dataset

    info = json.loads((run / "run.json").read_text())
    return tuple(load_dataset(info["dataset"], None, split="test").tensors[0].shape[1:])


def test_collapse_refuses_what_it_cannot_do_and_old_runs_resume(tmp_path, capsys):
    run = tmp_path / "plain"
    args = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.5,1.0", "--epochs", "1",
            "--batch-size", "64", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["collapse", str(run), "--out", str(tmp_path / "c")]) == 2  # trained without the penalty
    assert "no layer of" in capsys.readouterr().err
    # a run folder written before the newer settings existed resumes with their defaults
    info = json.loads((run / "run.json").read_text())
    for key in ("layer_sparsity", "input_nonneg", "hierarchy", "coarse_levels"):
        info["config"].pop(key)
    (run / "run.json").write_text(json.dumps(info))
    assert main(args + ["--resume"]) == 0
    deep = tmp_path / "deep"
    assert main(["train", "--model", "resnet20", "--dataset", "synthetic", "--densities", "0.5,1.0", "--depth", "1,3",
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--out", str(deep),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["collapse", str(deep), "--out", str(tmp_path / "dc")]) == 2
    assert "layer scheduling" in capsys.readouterr().err


def test_resume_without_the_depth_schedule_is_refused(tmp_path, capsys):
    run = tmp_path / "d"
    args = ["train", "--model", "resnet20", "--dataset", "synthetic", "--densities", "0.5,1.0", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--batch-size", "8", "--out", str(run), "--no-progress"]
    assert main(args + ["--depth", "1,3"]) == 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert "depth" in capsys.readouterr().err


def test_collapsing_a_collapsed_run_replays_both_merges(tmp_path):
    """Three ReLU links: the first collapse merges what is non-negative, a second run of the
    penalty and collapse merges more; the second run's recipe rebuilds from the registry model."""
    import torch

    from nestedsparse.commands import load_run_model

    run, once, twice = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    base = ["--dataset", "synthetic", "--densities", "1.0", "--batch-size", "32", "--weight-decay", "0",
            "--no-progress"]
    assert main(["train", "--model", "mlp", "--epochs", "1", "--layer-sparsity", "20", "--out", str(run), *base[:-1],
                 "--no-progress"]) == 0
    assert main(["collapse", str(run), "--out", str(once), "--epochs", "0", "--no-progress"]) == 0
    info = json.loads((once / "run.json").read_text())
    assert len(info["collapse"]["links"]) == 1
    m, _ = load_run_model(once)  # rebuilt from the recipe
    assert sum(isinstance(x, torch.nn.Linear) for x in m.modules()) == 2
    # the collapsed run has no candidate left (its remaining link starts at the raw input) ...
    assert main(["collapse", str(once), "--out", str(twice), "--epochs", "0"]) == 2
    # ... until its input is declared non-negative and its first layer is made non-negative
    import nestedsparse as ns

    info["config"]["input_nonneg"] = True
    (once / "run.json").write_text(json.dumps(info))
    with torch.no_grad():
        for p in m.get_submodule("features.1").parameters():
            p.abs_()
    ns.save(m, once / "model.safetensors", extra={"model": "mlp", "model_kwargs": info["model_kwargs"],
                                                   "collapse": info["collapse"]})
    assert main(["collapse", str(once), "--out", str(twice), "--epochs", "0", "--no-progress"]) == 0
    links = json.loads((twice / "run.json").read_text())["collapse"]["links"]
    assert [lk[0] for lk in links] == ["features.3", "features.1"]  # both merges, in order
    m2, _ = load_run_model(twice)  # the registry MLP with both merges replayed, then the weights
    assert sum(isinstance(x, torch.nn.Linear) for x in m2.modules()) == 1
    x = torch.rand(4, 1, 28, 28)
    m.eval()
    m2.eval()
    torch.testing.assert_close(m2(x), m(x), rtol=1e-4, atol=1e-4)


def test_a_run_folder_is_not_reused_silently(tmp_path, capsys):
    """A fresh train into a folder holding a run would leave its checkpoint for a later --resume."""
    run = tmp_path / "run"
    base = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.25,1.0", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--out", str(run), "--no-progress"]
    assert main(base) == 0
    first = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(base + ["--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "model.safetensors").read_bytes() == first  # nothing lost
    assert main(base + ["--resume", "--lr", "0.01"]) == 2  # the recorded run had another lr: named
    err = capsys.readouterr().err
    assert "config.lr: recorded 0.05, given 0.01" in err and "config: recorded" not in err
    assert main(base + ["--lr", "0.01", "--overwrite", "--level-weights", "1,2,3"]) == 2  # bad flags: refused ...
    assert (run / "model.safetensors").read_bytes() == first  # ... before anything was deleted
    assert main(base + ["--resume", "--overwrite"]) == 2
    assert main(base + ["--lr", "0.01", "--overwrite"]) == 0
    assert json.loads((run / "run.json").read_text())["config"]["lr"] == 0.01
    assert (run / "model.safetensors").read_bytes() != first


def test_models_take_the_datas_sample_shape(tmp_path, capsys):
    """LeNet-5 / MLP on 32x32 CIFAR get image_size=32; a ResNet trained on 28x28 data packs,
    benches and exports at 28x28."""
    pytest.importorskip("numba")
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from test_data_cifar import make_cifar10

    make_cifar10(tmp_path / "c", n=40)
    for model in ("lenet5", "mlp"):
        run = tmp_path / model
        assert main(["train", "--model", model, "--dataset", "cifar10", "--data-dir", str(tmp_path / "c"),
                     "--densities", "0.25,1.0", "--epochs", "1", "--batch-size", "32", "--out", str(run),
                     "--no-progress"]) == 0
        info = json.loads((run / "run.json").read_text())
        assert info["model_kwargs"]["image_size"] == 32 and info["input_shape"] == [3, 32, 32]
    run = tmp_path / "r"
    assert main(["train", "--model", "resnet20", "--dataset", "synthetic", "--densities", "0.25,1.0", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--batch-size", "16", "--out", str(run), "--no-progress"]) == 0
    nsp = tmp_path / "r.nsp"
    assert main(["pack", str(run), "-o", str(nsp)]) == 0
    from nestedsparse.pack import load_packed, read_packed

    shape = tuple(json.loads((run / "run.json").read_text())["input_shape"])
    assert shape == (1, 28, 28) and read_packed(nsp).input_shape == shape
    assert load_packed(nsp).model.input_shape == shape
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "r0.onnx"
    assert main(["export", str(nsp), "--level", "0", "-o", str(onnx_path)]) == 0
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    import numpy as np

    assert sess.run(None, {"input": np.zeros((2, *shape), np.float32)})[0].shape == (2, 10)


def test_collapse_without_refit_keeps_the_channel_levels(tmp_path, capsys):
    import torch

    from nestedsparse.commands import load_run_model
    from nestedsparse.nest import iter_nested
    from nestedsparse.structure import channel_level_maps

    run, out = tmp_path / "run", tmp_path / "small"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.25,1.0", "--selector",
                 "channels", "--widths", "0.5,1.0", "--layer-sparsity", "20", "--weight-decay", "0", "--epochs", "2",
                 "--batch-size", "32", "--out", str(run), "--no-progress"]) == 0
    assert main(["collapse", str(run), "--out", str(out), "--epochs", "0"]) == 0
    model, _ = load_run_model(out)
    want = channel_level_maps(model, (0.5, 1.0))
    for name, _, mask in iter_nested(model):
        assert torch.equal(mask.level_map, want[name]), name


def test_user_mistakes_get_one_line_errors(tmp_path, capsys, monkeypatch):
    base = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.25,1.0", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--no-progress"]
    cases = [
        (["--out", str(tmp_path / "a"), "--device", "foo"], "not a device"),
        (["--out", str(tmp_path / "b"), "--level-weights", "1"], "1 weights for the 2 levels"),
        (["--out", str(tmp_path / "c"), "--model-arg", "num_classes=5"], "num_classes=10"),
        (["--out", str(tmp_path / "d"), "--hierarchy", "0,0,1"], "maps 3 fine classes, the model has 10"),
        (["--out", str(tmp_path / "e"), "--subset", "0"], "--subset"),
        (["--out", str(tmp_path / "f"), "--data-dir", str(tmp_path / "nope")], "not a folder"),
        (["--out", str(tmp_path / "f2"), "--data-dir", ""], "not a folder"),
        (["--out", str(tmp_path / "g"), "--coarse-levels", "2"], "needs --hierarchy"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["--out", str(tmp_path / "h"), "--device", "cuda"], "no CUDA device"))
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
    run = tmp_path / "ok"
    assert main(base + ["--out", str(run)]) == 0
    assert main(["pack", str(run), "-o", str(tmp_path)]) == 2  # a folder as the output file
    assert "error" in capsys.readouterr().err
    nsp = tmp_path / "ok.nsp"
    assert main(["pack", str(run), "-o", str(nsp)]) == 0
    capsys.readouterr()
    for bad in (tmp_path / "ok.nsp" / "b.json", tmp_path / "ok"):  # under a file; a folder
        assert main(["bench", str(nsp), "--batch", "1", "--repeats", "1", "--json", str(bad)]) == 2
        assert "--json" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.nsp"), "--json", str(tmp_path / "new" / "b.json")]) == 2
    assert not (tmp_path / "new").exists()  # a failed bench leaves no folder behind
    assert main(["eval", str(run)]) == 0
    assert main(["plot", str(run), "-o", str(tmp_path / "noext")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["plot", str(run), "-o", str(tmp_path / "p.pdf")]) == 0 and (tmp_path / "p.pdf").stat().st_size
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert f"nestedsparse eval {tmp_path / 'missing'}" in capsys.readouterr().err
    if hasattr(os, "umask"):  # written files follow the umask, as open() would (not mkstemp's 0600)
        assert (run / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    from nestedsparse import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_train", interrupted)
    assert main(base + ["--out", str(tmp_path / "i")]) == 130
    assert "interrupted" in capsys.readouterr().err

    def broken(args):  # a broken pipe that is not stdout's: an error like any other
        raise BrokenPipeError("a socket")

    monkeypatch.setattr(commands, "cmd_eval", broken)
    assert main(["eval", str(run)]) == 2
    assert "a socket" in capsys.readouterr().err
    monkeypatch.undo()
    # stdout's reader gone (`... | head`): a quiet exit, no traceback
    cmd = f"{sys.executable} -m nestedsparse.cli eval {run} | head -c 1"
    got = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert "Traceback" not in got.stderr and "BrokenPipe" not in got.stderr


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_consensus_is_refused_before_the_evaluation(tmp_path, capsys):
    run = tmp_path / "h"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.1,0.25,1.0", "--hierarchy",
                 "0,0,1,1,2,2,3,3,4,4", "--coarse-levels", "2", "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--consensus"]) == 2
    captured = capsys.readouterr()
    assert "two or more (fine) levels" in captured.err and "accuracy" not in captured.out
    assert not (run / "eval.json").exists()
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.25,1.0", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "p"), "--consensus", "--consensus-epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--consensus-epochs must be >= 1" in err and "0.01" not in err


def test_pareto_plot_scores_a_coarse_level_on_superclasses(tmp_path, monkeypatch):
    import matplotlib.figure

    from nestedsparse.report import plot_pareto

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: seen.append(fig))
    ev = {"model": "m", "dataset": "d", "levels": [
        {"level": 0, "density": 0.1, "macs": 10, "accuracy": 0.11, "coarse": True, "coarse_accuracy": 0.3},
        {"level": 1, "density": 1.0, "macs": 100, "accuracy": 0.8, "coarse": False, "coarse_accuracy": None}]}
    plot_pareto([ev], tmp_path / "p.png")
    ys = sorted(float(y) for line in seen[0].axes[0].get_lines() for y in line.get_ydata())
    assert ys == [30.0, 80.0]  # the coarse level at its superclass accuracy, not its 11% on fine classes


def test_a_run_folder_from_before_sample_shapes_still_resumes(tmp_path, capsys):
    run = tmp_path / "old"
    base = ["train", "--model", "lenet5", "--dataset", "synthetic", "--densities", "0.25,1.0", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--out", str(run), "--no-progress"]
    assert main(base) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["model_kwargs"]["image_size"] == 28 and info["input_shape"] == [1, 28, 28]
    del info["input_shape"], info["model_kwargs"]["image_size"]  # as an older version wrote it
    (run / "run.json").write_text(json.dumps(info))
    assert main(base + ["--resume"]) == 0, capsys.readouterr().err
    assert "input_shape" not in json.loads((run / "run.json").read_text())


def test_a_run_that_failed_before_saving_can_be_retried(tmp_path, capsys, monkeypatch):
    from nestedsparse.train import trainer

    run = tmp_path / "r"
    base = ["train", "--model", "mlp", "--dataset", "synthetic", "--densities", "0.25,1.0", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--out", str(run), "--no-progress"]

    def fails(*a, **k):
        raise ValueError("stopped before the first checkpoint")

    monkeypatch.setattr(trainer, "train", fails)
    assert main(base) == 2 and (run / "run.json").is_file()  # only its run.json was written
    monkeypatch.undo()
    assert main(base) == 0  # nothing to lose: the retry starts over
