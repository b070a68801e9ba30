"""Channel-scheduled levels as thin dense networks (``slim``) vs the full-width level, per engine.

For each model (random init: the channel structure, not the values, sets size and speed), nested
at densities 0.0625 / 0.25 / 1.0 with channel scheduling at widths 0.25 / 0.5 / 1.0, and each level:

- ``params`` / ``onnx_bytes``: the level exported as is (full width, zeros in the dropped
  channels) and slim (``export_level(..., slim=True)``);
- median latency, in one interleaved run per batch size (``time_interleaved``), of: dense PyTorch
  at full width (``torch_full``; the level's zeros cost what non-zeros cost), dense PyTorch slim
  (``torch_slim``), ONNX Runtime on the full-width and on the slim export (``ort_full`` /
  ``ort_slim``), and our packed runtime at that level (``ours``, after ``rt.tune``: the packed
  sparse / dense layers, or the slim network, run by PyTorch or ONNX Runtime, where tune found
  that faster -- ``ours_path``).

Threads: 2 for torch, numba and ONNX Runtime. Run it as ``GOMP_SPINCOUNT=300 python benchmarks/slim.py``.
Rows go to ``benchmarks/results/slim.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import nestify_
from nestedsparse.pack import load_packed, pack
from nestedsparse.pack.bench import _set_threads, time_interleaved
from nestedsparse.pack.onnx import dense_model_for_level, export_level, ort_session
from nestedsparse.report import cpu_name
from nestedsparse.structure import ChannelSelector, slim

sys.path.insert(0, str(Path(__file__).parent))
from kernels import code_version, gauge, results_md  # noqa: E402 - the benchmarks' stamp, load gauge, tables

RESULTS = Path(__file__).parent / "results"
DENSITIES = (0.0625, 0.25, 1.0)
WIDTHS = (0.25, 0.5, 1.0)
CONFIGS = {
    "resnet20": ("resnet20", {"in_channels": 3}),
    "mobilenet_v1": ("mobilenet_v1", {}),
    "lenet5": ("lenet5", {}),
}


def run_config(name: str, batches, repeats: dict, tmp: Path) -> list[dict]:
    model_name, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = models.create(model_name, **kw).eval()
    nestify_(model, LevelSpec(DENSITIES))
    ChannelSelector(WIDTHS).apply_(model)
    path = tmp / f"{name}.nsp"
    pack(model, model_name=model_name, model_kwargs=kw).save(path)
    rt = load_packed(path)
    levels = range(len(DENSITIES))
    full, thin, sess_full, sess_thin, sizes = {}, {}, {}, {}, {}
    for k in levels:
        full[k] = dense_model_for_level(rt, k)
        x0 = torch.randn(2, *model.input_shape)
        thin[k] = slim(full[k], x0)
        for tag, slim_it in (("full", False), ("slim", True)):
            onnx_path = tmp / f"{name}_{k}_{tag}.onnx"
            export_level(path, k, onnx_path, slim=slim_it)
            sizes[k, tag] = onnx_path.stat().st_size
            (sess_thin if slim_it else sess_full)[k] = ort_session(onnx_path, 2, spinning=False)
    rows = []
    for b in batches:
        x = torch.randn(b, *model.input_shape)
        xn = x.numpy()
        rt.tune(x)
        fns = {}
        for k in levels:
            fns["torch_full", k] = lambda k=k, x=x: full[k](x)
            fns["torch_slim", k] = lambda k=k, x=x: thin[k](x)
            fns["ort_full", k] = lambda k=k, xn=xn: sess_full[k].run(None, {"input": xn})
            fns["ort_slim", k] = lambda k=k, xn=xn: sess_thin[k].run(None, {"input": xn})
            fns["ours", k] = lambda k=k, x=x: rt(x, level=k)
        with torch.inference_mode():
            t = time_interleaved(fns, repeats[b])
        for k in levels:
            p_full = sum(p.numel() for p in full[k].parameters())
            p_thin = sum(p.numel() for p in thin[k].parameters())
            r = {"config": name, "batch": b, "level": k, "density": DENSITIES[k], "width": WIDTHS[k],
                 "params_full": p_full, "params_slim": p_thin, "onnx_bytes_full": sizes[k, "full"],
                 "onnx_bytes_slim": sizes[k, "slim"]}
            r.update({f"{e}_ms": round(t[e, k], 4)
                      for e in ("torch_full", "torch_slim", "ort_full", "ort_slim", "ours")})
            r["ours_path"] = f"slim ({rt.slim_backend(k, b)})" if rt.uses_slim(k, b) else "packed"
            r["slim_speedup_torch"] = round(t["torch_full", k] / t["torch_slim", k], 3)
            r["slim_speedup_ort"] = round(t["ort_full", k] / t["ort_slim", k], 3)
            r["ours_vs_torch_slim"] = round(t["torch_slim", k] / t["ours", k], 3)
            r["ours_vs_ort_slim"] = round(t["ort_slim", k] / t["ours", k], 3)
            rows.append(r)
    return rows


TABLE_KEYS = ("config", "batch", "width", "params_full", "params_slim", "onnx_bytes_slim", "torch_full_ms",
              "torch_slim_ms", "ort_full_ms", "ort_slim_ms", "ours_ms", "ours_path", "slim_speedup_torch", "slim_speedup_ort",
              "ours_vs_torch_slim", "ours_vs_ort_slim")


def write_md(rows: list[dict], meta: dict, path: Path) -> str:
    return results_md(path, "Channel-scheduled levels, slim vs full width", rows, TABLE_KEYS, meta)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), len(configs), figsize=(4.5 * len(configs), 3.6 * len(batches)),
                             squeeze=False)
    for i, b in enumerate(batches):
        for j, cfg in enumerate(configs):
            ax = axes[i][j]
            rs = sorted((r for r in rows if r["config"] == cfg and r["batch"] == b), key=lambda r: r["width"])
            w = [r["width"] for r in rs]
            for key, style, label in (("torch_full_ms", "o--", "PyTorch, full width"),
                                      ("torch_slim_ms", "o-", "PyTorch, slim"),
                                      ("ort_full_ms", "s--", "ONNX Runtime, full width"),
                                      ("ort_slim_ms", "s-", "ONNX Runtime, slim"),
                                      ("ours_ms", "^-", "packed runtime (sparse)")):
                ax.plot(w, [r[key] for r in rs], style, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(w)
            ax.set_xticklabels([f"{v:g}" for v in w])
            ax.set_title(f"{cfg}, batch {b}")
            ax.set_xlabel("level width")
            ax.set_ylabel("median ms")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats-1", type=int, default=100)
    p.add_argument("--repeats-64", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "slim"))
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.plot_only:
        data = json.loads(out.with_suffix(".json").read_text())
        write_md(data["rows"], data["meta"], out.with_suffix(".md"))
        plot(data["rows"], out.with_suffix(".png"))
        return
    _set_threads(2)
    batches = [int(v) for v in args.batches.split(",")]
    repeats = {b: (args.repeats_1 if b == 1 else args.repeats_64) for b in batches}
    t0 = time.perf_counter()
    g0 = gauge()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            print(f"{name} ...", file=sys.stderr)
            rows += run_config(name, batches, repeats, Path(tmp))
    import onnxruntime

    meta = {"code": code_version(), "threads": 2, "repeats": repeats, "seconds": round(time.perf_counter() - t0, 1),
            "gauge_ms_before_after": [g0, gauge()], "gauge": "dense ResNet-20, batch 64, 2 threads (~40 ms idle)",
            "method": "median of interleaved rounds (time_interleaved); random-init weights; every engine in the "
                      "same run", "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu": cpu_name()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(write_md(rows, meta, out.with_suffix(".md")))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
