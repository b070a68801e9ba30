"""Nested LeNet-5 on real Fashion-MNIST vs the dense model and independently pruned models.

One run trains, with the same epochs, seed and optimizer each:
- a nested model with levels ``--densities`` for every routing policy (sum, own, frozen-core),
- the dense model alone (one level at density 1),
- one independently pruned single-level model per sparse density (same selector and schedule).
Then it writes one row per (configuration, level) with the matching independent baseline in the
same row, to ``benchmarks/results/fashion_mnist.json`` (+ ``.md`` table, ``.png`` plot).

    python benchmarks/fashion_mnist.py --epochs 4
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.data import load_dataset
from nestedsparse.report import format_table

RESULTS = Path(__file__).parent / "results"


def run_one(densities, routing, args, train_set, test_set) -> dict:
    torch.manual_seed(args.seed)
    model = models.create("lenet5", num_classes=10)
    spec = ns.LevelSpec(densities, allocation=args.allocation)
    ns.nestify_(model, spec)
    config = ns.TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, routing=routing, seed=args.seed,
                            selector="magnitude", selector_args={"end": 0.5}, progress=False,
                            max_steps_per_epoch=args.max_steps)
    t0 = time.perf_counter()
    result = ns.train(model, train_set, test_set, config)
    seconds = time.perf_counter() - t0
    summary = ns.level_summary(model, test_set.tensors[0][:1])
    levels = [{**s, "accuracy": r["accuracy"]} for s, r in zip(summary, result.final)]
    return {"densities": list(densities), "routing": routing, "seconds": seconds, "levels": levels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--densities", default="0.05,0.1,0.25,1.0")
    p.add_argument("--allocation", default="erk")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    p.add_argument("--routings", default="mean,sum,own,frozen-core")
    p.add_argument("--out", default=str(RESULTS / "fashion_mnist"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dens = tuple(float(d) for d in args.densities.split(","))
    train_set = load_dataset("fashion-mnist", split="train")
    test_set = load_dataset("fashion-mnist", split="test")
    runs = {"dense": run_one((1.0,), "sum", args, train_set, test_set)}
    for d in dens:
        if d < 1.0:
            runs[f"independent-{d}"] = run_one((d,), "sum", args, train_set, test_set)
            print(f"independent {d}: {runs[f'independent-{d}']['levels'][0]['accuracy']:.4f}", flush=True)
    for routing in args.routings.split(","):
        runs[f"nested-{routing}"] = run_one(dens, routing, args, train_set, test_set)
        print(routing, [round(lv["accuracy"], 4) for lv in runs[f"nested-{routing}"]["levels"]], flush=True)
    dense_acc = runs["dense"]["levels"][0]["accuracy"]
    rows = []
    for routing in args.routings.split(","):
        for lv in runs[f"nested-{routing}"]["levels"]:
            d = dens[lv["level"]]
            base = runs["dense"] if d >= 1.0 else runs[f"independent-{d}"]
            base_acc = base["levels"][0]["accuracy"]
            rows.append({"routing": routing, "level": lv["level"], "density": lv["density"], "macs": lv["macs"],
                         "nested_acc": lv["accuracy"], "independent_acc": base_acc,
                         "delta_vs_independent": lv["accuracy"] - base_acc, "delta_vs_dense": lv["accuracy"] - dense_acc,
                         "nested_seconds": runs[f"nested-{routing}"]["seconds"]})
    meta = {"epochs": args.epochs, "allocation": args.allocation, "seed": args.seed, "lr": args.lr,
            "max_steps_per_epoch": args.max_steps, "torch": torch.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "dense_acc": dense_acc}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2))
    table = format_table(rows, ["routing", "level", "density", "macs", "nested_acc", "independent_acc",
                                "delta_vs_independent", "delta_vs_dense"])
    mean_delta = {r: sum(x["delta_vs_independent"] for x in rows if x["routing"] == r) / len(dens)
                  for r in args.routings.split(",")}
    best = max(mean_delta, key=mean_delta.get)
    verdict = (f"Winner: {best} (mean accuracy delta vs the independent models over the levels: "
               + ", ".join(f"{r} {100 * d:+.2f} points" for r, d in mean_delta.items()) + ")")
    meta["winner"] = best
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2))
    out.with_suffix(".md").write_text(f"{verdict}\n\n```\n{json.dumps(meta)}\n{table}\n```\n")
    print(verdict)
    print(table)
    _plot(runs, args.routings.split(","), out.with_suffix(".png"))


def _plot(runs, routings, path) -> None:
    from nestedsparse.report import plot_pareto

    evals = [{"levels": runs[f"nested-{r}"]["levels"]} for r in routings]
    singles = [runs[k]["levels"][0] | {"level": 0} for k in runs if k.startswith("independent") or k == "dense"]
    evals.append({"levels": singles})
    plot_pareto(evals, path, labels=[f"nested ({r})" for r in routings] + ["independent / dense"],
                title="LeNet-5 on Fashion-MNIST: nested levels vs independent models")


if __name__ == "__main__":
    main()
