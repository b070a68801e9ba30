"""Where one image's time goes in a depth-first conv program (``pack/program.py``).

Builds the ``benchmarks/kernels.py`` ResNet-20 (random init, uniform levels 5 / 10 / 100%),
packs and loads it, and times its program serially on one image (``kernels._kernel("prog_ser")``,
the code each core runs per image at batch 64): the whole program, then each step alone. A step
alone is timed as a one-step program, minus the median of an empty program (the compiled call's
own cost), so the per-step numbers are what the step adds. Medians of ``--repeats`` calls.

    python benchmarks/program_steps.py            # writes benchmarks/results/program_steps.{json,md}
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import nestify_
from nestedsparse.pack import kernels, load_packed, pack
from nestedsparse.pack.program import PlaneProgram
from nestedsparse.report import format_table

RESULTS = Path(__file__).parent / "results"
KINDS = {kernels.PROG_COPY_IN: "copy in", kernels.PROG_SPLIT: "stride split", kernels.PROG_CONV_DIRECT: "conv direct",
         kernels.PROG_CONV_WIDE: "conv wide", kernels.PROG_GAP: "global pool", kernels.PROG_COPY_OUT: "copy out",
         kernels.PROG_SUBPAD: "pad shortcut"}


def median_us(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--level", type=int, default=0, help="level index (0 = 5%%)")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--out", default=str(RESULTS / "program_steps"))
    args = p.parse_args()
    torch.manual_seed(0)
    kw = {"in_channels": 3}
    m = models.create("resnet20", **kw).eval()
    nestify_(m, LevelSpec((0.05, 0.1, 1.0)))
    with tempfile.TemporaryDirectory() as tmp:
        pack(m, model_name="resnet20", model_kwargs=kw).save(Path(tmp) / "r.nsp")
        rt = load_packed(Path(tmp) / "r.nsp")
    (prog,) = [u for u in rt.units() if isinstance(u, PlaneProgram)]
    shape = (3, 32, 32)
    x = torch.randn(1, *shape)
    rt(x, level=args.level)
    geo = prog._geometry(shape, prog._tail)  # with the classifier (in the program at 5%: sparse at batch 1)
    lv = prog._arrays(args.level)
    arena = prog._arena(geo, 1, (shape, prog._tail))
    out = np.empty(geo.out_size, np.float32)
    xa = x.numpy().reshape(-1)
    kern = kernels._kernel("prog_ser")

    def run(steps):
        return lambda: kern(xa, out, arena, geo.arena, 1, 1, steps, geo.offs_b, prog._vals.view(np.uint8), prog._code,
                            *lv)

    empty = median_us(run(geo.steps[:0]), args.repeats)
    full = median_us(run(geo.steps), args.repeats) - empty
    rows = []
    starts, ends = lv[0], lv[1]
    for si in range(geo.steps.shape[0]):
        st = geo.steps[si]
        t = median_us(run(geo.steps[si:si + 1]), args.repeats) - empty
        kind = KINDS[int(st[0])]
        if st[0] == kernels.PROG_CONV_DIRECT and st[19]:  # valid columns only: strips / whole rows (+ phases)
            kind += (" strips", " rows", " rows->phases")[int(st[19]) - 1 + int(st[20])]
        row = {"step": si, "kind": kind, "us": round(t, 2), "nnz": None, "positions": None}
        if st[0] in (kernels.PROG_CONV_DIRECT, kernels.PROG_CONV_WIDE):
            r0, O, L = int(st[3]), int(st[4]), int(st[7])
            nnz = int((ends[r0:r0 + O] - starts[r0:r0 + O]).sum())
            row.update(nnz=nnz, positions=int(st[9] * st[10]) if st[19] else L)  # per channel
        rows.append(row)
    meta = {"model": "resnet20 3x32x32", "level": args.level, "density": rt.spec.densities[args.level],
            "image_us": round(full, 1), "call_us": round(empty, 2), "repeats": args.repeats,
            "torch": torch.__version__, "method": "serial program on one image; medians; one-step programs minus an "
            "empty program"}
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["us"]
    summary = [{"kind": k, "us": round(v, 1), "share": round(v / max(sum(by_kind.values()), 1e-9), 3)}
               for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    text = (f"# One image through the ResNet-20 program\n\n{json.dumps(meta)}\n\n```\n{format_table(summary)}\n```\n\n"
            f"```\n{format_table(rows)}\n```\n")
    outp.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
