"""The papers' structural tools on real Fashion-MNIST, each against its baseline in the same run.

- ``hierarchy`` (NestedNet): LeNet-5, levels 6.25 / 25 / 100 %, level 0 trained on the 6
  superclasses; baseline: the same nested model trained on the 10 classes only (its level 0's
  superclass accuracy is the argmax of its summed class probabilities).
- ``consensus`` (NestedNet A / L): over the baseline's levels, against its best single level.
- ``channels`` (NestedNet channel scheduling): LeNet-5 with widths 0.25 / 0.5 / 1.0 (the same
  densities for the interior layers) against the magnitude-pruned baseline: accuracy and MACs.
- ``depth`` (NestedNet layer scheduling): ResNet-20 (on a subset), levels running 1 / 2 / 3 blocks
  per stage, against the same nested ResNet-20 without the schedule: accuracy, MACs, and packed
  batch-1 latency per level (interleaved in one process).
- ``layer_sparsity`` (Hebiri & Lederer): an MLP 784-300-100-10 trained with the proximal penalty
  (several lambdas) and collapsed, against the same MLP trained without it for the same epochs;
  the accuracy after a refit (more epochs, no penalty) is reported beside it.

    python benchmarks/structure.py
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.data import load_dataset
from nestedsparse.report import format_table
from nestedsparse.train import Hierarchy, LevelConsensus, consensus_accuracy, fit_consensus

RESULTS = Path(__file__).parent / "results"
DENS = (0.0625, 0.25, 1.0)
FM_HIER = Hierarchy(ns.data.resolve_hierarchy("fashion-mnist"), 1)


def _subset(ds, n):
    return ds if not n else torch.utils.data.TensorDataset(*(t[:n] for t in ds.tensors))


def _train(model, train_set, test_set, args, epochs=None, **cfg):
    config = ns.TrainConfig(epochs=epochs or args.epochs, batch_size=128, lr=0.05, seed=args.seed, progress=False,
                            max_steps_per_epoch=args.max_steps, **cfg)
    t0 = time.perf_counter()
    ns.train(model, train_set, None, config)
    return time.perf_counter() - t0


def _levels(model, test_set, hierarchy=None):
    summary = ns.level_summary(model, test_set.tensors[0][:1])
    ev = ns.evaluate(model, test_set, hierarchy=hierarchy or FM_HIER)
    return [{"level": s["level"], "density": s["density"], "macs": s["macs"], "accuracy": r["accuracy"],
             "coarse_accuracy": r["coarse_accuracy"]} for s, r in zip(summary, ev)]


def lenet(args, train_set, test_set) -> list[dict]:
    rows = []
    torch.manual_seed(args.seed)
    base = models.create("lenet5", num_classes=10)
    ns.nestify_(base, ns.LevelSpec(DENS))
    _train(base, train_set, test_set, args)
    base_lv = _levels(base, test_set)
    torch.manual_seed(args.seed)
    hier = models.create("lenet5", num_classes=10)
    ns.nestify_(hier, ns.LevelSpec(DENS))
    _train(hier, train_set, test_set, args, hierarchy="fashion-mnist", coarse_levels=1)
    for h, b in zip(_levels(hier, test_set), base_lv):
        rows.append({"tool": "hierarchy", "level": h["level"], "density": h["density"],
                     "metric": "superclass acc" if h["level"] == 0 else "class acc",
                     "ours": h["coarse_accuracy"] if h["level"] == 0 else h["accuracy"],
                     "baseline": b["coarse_accuracy"] if h["level"] == 0 else b["accuracy"],
                     "baseline_is": "same nested model trained on the 10 classes"})
    best = max(r["accuracy"] for r in base_lv)
    for mode in ("average", "linear"):
        cons = LevelConsensus(base, mode=mode, num_classes=10)
        if mode == "linear":
            fit_consensus(cons, train_set, epochs=1)
        got = consensus_accuracy(cons, test_set)
        rows.append({"tool": "consensus", "level": "A" if mode == "average" else "L", "density": "all",
                     "metric": "class acc", "ours": got["accuracy"], "baseline": best,
                     "baseline_is": "best single level", "macs": sum(r["macs"] for r in base_lv)})
    torch.manual_seed(args.seed)
    wide = models.create("lenet5", num_classes=10)
    ns.nestify_(wide, ns.LevelSpec(DENS))
    _train(wide, train_set, test_set, args, selector="channels", selector_args={"widths": [0.25, 0.5, 1.0]})
    for c, b in zip(_levels(wide, test_set), base_lv):
        rows.append({"tool": "channels", "level": c["level"], "density": c["density"], "metric": "class acc",
                     "ours": c["accuracy"], "baseline": b["accuracy"], "macs": c["macs"], "baseline_macs": b["macs"],
                     "baseline_is": "magnitude-pruned levels, same densities"})
    return rows


def depth(args, train_set, test_set) -> list[dict]:
    from nestedsparse.pack import load_packed, pack
    from nestedsparse.pack.bench import _restore_threads, _set_threads, time_interleaved

    nets = {}
    for gated in (False, True):
        torch.manual_seed(args.seed)
        m = models.create("resnet20", num_classes=10, in_channels=1)
        ns.nestify_(m, ns.LevelSpec((0.1, 0.3, 1.0)))
        if gated:
            ns.structure.depth_schedule_(m, (1, 2, 3))
        _train(m, _subset(train_set, args.resnet_subset), test_set, args, epochs=args.resnet_epochs)
        nets[gated] = m.eval()
    old = _set_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rts = {}
            for gated, m in nets.items():
                path = Path(tmp) / f"r{int(gated)}.nsp"
                pack(m, model_name="resnet20", model_kwargs={"num_classes": 10, "in_channels": 1}).save(path)
                rts[gated] = load_packed(path)
            x = test_set.tensors[0][:1]
            for rt in rts.values():
                rt.tune(x)
            fns = {(g, k): (lambda g=g, k=k: rts[g](x, level=k)) for g in rts for k in range(3)}
            ms = time_interleaved(fns, args.repeats, 5)
    finally:
        _restore_threads(old)
    rows = []
    for g, b in zip(_levels(nets[True], test_set), _levels(nets[False], test_set)):
        k = g["level"]
        rows.append({"tool": "depth", "level": k, "density": g["density"], "metric": "class acc",
                     "ours": g["accuracy"], "baseline": b["accuracy"], "macs": g["macs"], "baseline_macs": b["macs"],
                     "ms_b1": round(ms[(True, k)], 4), "baseline_ms_b1": round(ms[(False, k)], 4),
                     "baseline_is": "same nested ResNet-20, every block at every level"})
    return rows


def layer_sparsity(args, train_set, test_set) -> list[dict]:
    def fit(lam):
        torch.manual_seed(args.seed)
        m = models.create("mlp", num_classes=10)
        ns.nestify_(m, ns.LevelSpec((1.0,)))
        _train(m, train_set, test_set, args, layer_sparsity=lam)
        return m, ns.evaluate(m, test_set)[0]["accuracy"]

    def n(mod):
        return sum(p.numel() for p in mod.parameters())

    base_acc = fit(0.0)[1]
    rows = []
    for lam in args.lams:
        m, acc = fit(lam)
        plain = ns.plain_model(m).eval()
        res = ns.collapse(plain)
        collapsed = res.model
        ns.nestify_(collapsed, ns.LevelSpec((1.0,)))
        acc_collapsed = ns.evaluate(collapsed, test_set)[0]["accuracy"]
        _train(collapsed, train_set, test_set, args)  # refit, no penalty
        acc_refit = ns.evaluate(collapsed, test_set)[0]["accuracy"]
        rows.append({"tool": "layer_sparsity", "level": f"lambda={lam:g}", "density": 1.0, "metric": "class acc",
                     "ours": acc_collapsed, "baseline": base_acc,
                     "baseline_is": "same MLP, same epochs, trained without the penalty",
                     "acc_before_collapse": acc, "acc_after_refit": acc_refit, "refit_epochs": args.epochs,
                     "layers": f"{res.layers_before}->{res.layers_after}", "params": f"{n(plain)}->{n(res.model)}",
                     "lambda": lam})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    p.add_argument("--resnet-subset", type=int, default=6000, help="training images for the ResNet-20 runs")
    p.add_argument("--resnet-epochs", type=int, default=2)
    p.add_argument("--lams", type=lambda t: [float(v) for v in t.split(",")], default=[0.02, 0.1, 0.5],
                   help="layer-sparsity lambdas, one row each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--tools", default="lenet,depth,layer_sparsity")
    p.add_argument("--out", default=str(RESULTS / "structure"))
    p.add_argument("--keep-others", action="store_true", help="keep the saved rows of the tools not run now")
    args = p.parse_args()
    train_set = load_dataset("fashion-mnist", split="train")
    test_set = load_dataset("fashion-mnist", split="test")
    t0 = time.perf_counter()
    rows = []
    for tool in args.tools.split(","):
        rows += {"lenet": lenet, "depth": depth, "layer_sparsity": layer_sparsity}[tool](args, train_set, test_set)
        print(f"{tool} done at {time.perf_counter() - t0:.0f} s", flush=True)
    meta = {"epochs": args.epochs, "seed": args.seed, "resnet_subset": args.resnet_subset,
            "resnet_epochs": args.resnet_epochs,
            "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "python": platform.python_version(),
            "method": "one run; every baseline trained in the same run with the same seed, epochs and optimizer; "
                      "latencies: medians of interleaved calls"}
    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = round(v, 4)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ran = {r["tool"] for r in rows}
    if args.keep_others and out.with_suffix(".json").is_file():  # rerun some tools, keep the others' rows
        old = json.loads(out.with_suffix(".json").read_text())
        rows = [r for r in old["rows"] if r["tool"] not in ran] + rows
        first = {k: v for k, v in old["meta"].items() if k != "runs"}
        meta = {**meta, "runs": old["meta"].get("runs", [first]) + [{**meta, "tools": sorted(ran)}]}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ["tool", "level", "density", "metric", "ours", "baseline", "macs", "baseline_macs", "ms_b1",
            "baseline_ms_b1"]
    table = format_table([{c: r.get(c, "") for c in cols} for r in rows], cols)
    extra = [r for r in rows if r["tool"] == "layer_sparsity"]
    notes = "\n".join(f"layer sparsity {r['level']}: layers {r['layers']}, params {r['params']}, accuracy before / after "
                      f"collapse {r['acc_before_collapse']} / {r['ours']}, after {r['refit_epochs']} more epochs "
                      f"(refit) {r['acc_after_refit']}"
                      for r in extra)
    out.with_suffix(".md").write_text(f"# Structural tools on Fashion-MNIST\n\n```\n{json.dumps(meta)}\n{table}\n{notes}\n```\n")
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
