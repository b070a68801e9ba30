"""INT8 vs float32 packed files: test accuracy per level on the real Fashion-MNIST test set.

Takes a trained run folder (e.g. the demo's ``runs/demo``), packs it both ways, runs every level
of both runtimes on the 10k test images and writes one row per level, float32 and int8 side by
side, to ``benchmarks/results/int8_accuracy.json`` (+ ``.md``).

    python benchmarks/int8_accuracy.py runs/demo
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from nestedsparse.commands import load_run_model
from nestedsparse.data import load_dataset
from nestedsparse.pack import load_packed, pack
from nestedsparse.report import format_table

RESULTS = Path(__file__).parent / "results"


def accuracy(rt, x: torch.Tensor, y: torch.Tensor, level: int, batch: int = 1000) -> float:
    correct = sum(int((rt(x[i : i + batch], level=level).argmax(-1) == y[i : i + batch]).sum())
                  for i in range(0, len(y), batch))
    return correct / len(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="trained run folder (model.safetensors + run.json)")
    p.add_argument("--out", default=str(RESULTS / "int8_accuracy"))
    args = p.parse_args()
    model, info = load_run_model(Path(args.run))
    test = load_dataset(info["dataset"], info.get("data_dir"), split="test")
    x, y = test.tensors
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        rts = {}
        for dtype in ("float32", "int8"):
            path = Path(tmp) / f"{dtype}.nsp"
            pack(model, dtype=dtype, model_name=info["model"], model_kwargs=info["model_kwargs"]).save(path)
            sizes[dtype] = path.stat().st_size
            rts[dtype] = load_packed(path)
        for k in range(rts["float32"].spec.num_levels):
            a32, a8 = accuracy(rts["float32"], x, y, k), accuracy(rts["int8"], x, y, k)
            rows.append({"level": k, "density": rts["float32"].spec.densities[k], "float32_acc": a32, "int8_acc": a8,
                         "delta_points": round(100 * (a8 - a32), 3)})
    meta = {"run": str(args.run), "model": info["model"], "file_bytes": sizes, "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = format_table(rows)
    out.with_suffix(".md").write_text(f"```\n{json.dumps(meta)}\n{table}\n```\n")
    print(table)
    print(meta)


if __name__ == "__main__":
    main()
