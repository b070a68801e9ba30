"""A/B timings of two runtime paths inside one process: each pair runs the same model, level and
input, interleaved round by round, so a loaded host slows both alike.

* ``chain``: MLP 1024x3 (``benchmarks/kernels.py``'s, random init, uniform levels) at 2%: the
  one-call Linear chain (``kernels._chain_par``, what ``rt(x)`` runs) against the layer-by-layer
  sequence it replaced (input transpose, one bound kernel call per layer, output transpose; the
  chain's own code path with the fusion turned off), batch 64 and batch 1.
* ``entry_prefetch``: the same chain at 2% and 5%, batch 64, with each Linear row prefetching the
  entries of the row ``kernels.LINEAR_PREFETCH_ROWS`` on (what runs) against no prefetch.
* ``blocks_conv``: ResNet-20 with 4x1 block pruning at 5%, one image through its depth-first
  program on one core: four rows per tile (``_rows4``) against the same rows one by one (the
  program's block flags zeroed).
* ``blocks_linear``: MLP 1024x3 with 4x1 block pruning at 2%, batch 64: the one-call chain with
  and without its block flags.
* ``strips``: ResNet-20 at 5% (unstructured), its depth-first program with the 8x8 stage on
  strip planes (``program.STRIP_PLANES``: pitch 16, one cache line per row) against the same
  program compiled with plain planes (pitch 10); one image on one core, and batch 64 on every
  core (``kernels._prog_par``, what ``rt(x)`` runs).
* ``strided``: the same, with the 16x16 stage's stride-2 convs reading phases split at their
  output's pitch and writing straight into their output plane
  (``program.PHASE_AT_OUTPUT_PITCH``) against a wide scratch row and a copy per output row.
* ``row_tiles``: the same, with the 32- and 16-wide stages' direct convs as tiles of whole rows
  (``program.ROW_TILES``: valid columns only) against 64-wide tiles over each channel's flat span,
  two junk columns per row computed and then cleared; both sides with SPLIT steps (no
  ``fused_split``, which needs the row tiles).
* ``fused_split``: the same, with the last conv of the 32- and 16-wide stages writing the 2x2
  phase split their stride-2 readers take (``program.FUSE_SPLITS``: rows split in registers)
  against storing their plane and splitting it in a SPLIT step.
* ``ort_threads``: LeNet-5 nested at 6.25 / 25 / 100% with channel scheduling (widths 0.25 / 0.5 /
  1.0), its width-0.25 level routed through its slim network under ONNX Runtime (the sessions
  ``rt.tune`` times): ``rt(x)`` on the session with the kernels' thread count (workers not
  spinning) against the one-thread session; batch 1 and 64.
* ``direct_calls``: LeNet-5, ResNet-20 and MLP 1024x3 at 5% (uniform levels, ``rt.tune``d), batch 1:
  ``rt(x)`` running the traced graph's code against calling its modules' forwards directly (what
  runs when the graph is modules in a row and no hook is set, ``runtime._plain_calls``).

Rows: median and 10th percentile of each side (microseconds), and ``b_over_a`` = median B /
median A.

    python benchmarks/runtime_ab.py      # writes benchmarks/results/runtime_ab.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import nestify_
from nestedsparse.pack import kernels, load_packed, pack, program
from nestedsparse.pack.program import PlaneProgram
from nestedsparse.pack.runtime import _LEVEL, FeatureMajorChain, _FusedLinears
from nestedsparse.report import cpu_name, format_table

sys.path.insert(0, str(Path(__file__).parent))
from kernels import gauge  # noqa: E402 - the benchmarks' one load gauge

RESULTS = Path(__file__).parent / "results"
MLP_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def ab(a: Callable, b: Callable, rounds: int, calls: int) -> dict:
    """Interleaved rounds of ``calls`` calls each; per-call medians and 10th percentiles (us)."""
    for _ in range(max(3, rounds // 10)):
        a()
        b()
    ta, tb = [], []
    for _ in range(rounds):
        for f, t in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            t.append((time.perf_counter() - t0) / calls * 1e6)
    ma, mb = float(np.median(ta)), float(np.median(tb))
    return {"a_us": round(ma, 1), "a_p10_us": round(float(np.percentile(ta, 10)), 1), "b_us": round(mb, 1),
            "b_p10_us": round(float(np.percentile(tb, 10)), 1), "b_over_a": round(mb / ma, 3)}


def _packed(name: str, kwargs: dict, levels: tuple, tmp: Path, block=(1, 1)):
    torch.manual_seed(0)
    m = models.create(name, **kwargs).eval()
    nestify_(m, LevelSpec(levels), block=block)
    path = tmp / f"{name}_{block[0]}x{block[1]}.nsp"
    pack(m, model_name=name, model_kwargs=kwargs).save(path)
    return load_packed(path)


def _chain(rt) -> FeatureMajorChain:
    (chain,) = [u for u in rt.units() if isinstance(u, FeatureMajorChain)]
    return chain


def _sparse(rt, level: int, batch: int) -> None:
    for layer in rt.sparse_layers():
        layer.mode[(level, batch)] = "sparse"


def chain_rows(tmp: Path, rounds: int) -> list[dict]:
    """A: the layer-by-layer sequence; B: the one-call chain."""
    rt = _packed("mlp_1024", {"image_size": 32}, MLP_LEVELS, tmp)
    chain = _chain(rt)
    rows = []
    for batch in (64, 1):
        _sparse(rt, 0, batch)
        x = torch.randn(batch, 1024)
        token = _LEVEL.set(0)
        try:
            fused = chain._fused_linears(batch, None)
            assert isinstance(fused, _FusedLinears)
            shapes = chain._plan_shapes((1024,))
            bufs = chain._act_buffers(batch, (1024,))
            prog = chain._compile(batch, (1024,), None, bufs)
        finally:
            _LEVEL.reset(token)

        def sequence(x=x, bufs=bufs, prog=prog, batch=batch):  # FeatureMajorChain.forward's replay
            chain._load_input(x, bufs[0], shapes[0])
            for fn in prog:
                fn()
            out = bufs[-1].reshape(1, -1).copy() if batch == 1 else kernels.transpose(bufs[-1])
            return torch.from_numpy(out).reshape(batch, -1)

        torch.testing.assert_close(fused(x), sequence(), rtol=1e-5, atol=1e-5)
        got = ab(sequence, lambda x=x, fused=fused: fused(x), rounds, 10 if batch > 1 else 50)
        rows.append({"pair": "chain", "model": "mlp1024 2%", "batch": batch, "a": "layer-by-layer sequence",
                     "b": "one call", **got})
    return rows


def prefetch_rows(tmp: Path, rounds: int) -> list[dict]:
    """MLP 1024x3 one-call chain at batch 64: each Linear row prefetching the entries of the row
    ``kernels.LINEAR_PREFETCH_ROWS`` on (B, what runs) against no prefetch (A: table column 5 = 0)."""
    rt = _packed("mlp_1024", {"image_size": 32}, MLP_LEVELS, tmp)
    chain = _chain(rt)
    rows = []
    for level, density in ((0, "2%"), (1, "5%")):
        _sparse(rt, level, 64)
        token = _LEVEL.set(level)
        try:
            fused = chain._fused_linears(64, None)
        finally:
            _LEVEL.reset(token)
        table = fused.arrays[0].copy()
        table[:, 5] = 0
        plain = _FusedLinears(fused.kern, fused.acts, (table,) + fused.arrays[1:], fused.out_features)
        x = torch.randn(64, 1024)
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
        got = ab(lambda: plain(x), lambda: fused(x), rounds, 10)
        rows.append({"pair": "entry_prefetch", "model": f"mlp1024 {density}", "batch": 64, "a": "no prefetch",
                     "b": f"entries {kernels.LINEAR_PREFETCH_ROWS} rows ahead", **got})
    return rows


def blocks_conv_rows(tmp: Path, rounds: int) -> list[dict]:
    rt = _packed("resnet20", {"in_channels": 3}, (0.05, 0.1, 1.0), tmp, block=(4, 1))
    (prog,) = [u for u in rt.units() if isinstance(u, PlaneProgram)]
    shape = (3, 32, 32)
    x = torch.randn(1, *shape)
    _sparse(rt, 0, 1)
    rt(x, level=0)
    geo = prog._geometry(shape, prog._tail)  # with the classifier (in the program at 5%: sparse at batch 1)
    lv = prog._arrays(0)
    arena = prog._arena(geo, 1, (shape, prog._tail))
    xa = x.numpy().reshape(-1)
    kern = kernels._kernel("prog_ser")
    outs = [np.empty(geo.out_size, np.float32) for _ in range(2)]

    def run(arrays, out):
        return lambda: kern(xa, out, arena, geo.arena, 1, 1, geo.steps, geo.offs_b, prog._vals.view(np.uint8),
                            prog._code, *arrays)

    one_by_one = run(lv[:4] + (np.zeros_like(lv[4]),), outs[0])
    blocks = run(lv, outs[1])
    one_by_one()
    blocks()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    got = ab(one_by_one, blocks, rounds, 20)
    return [{"pair": "blocks_conv", "model": f"resnet20 4x1 5% ({int(lv[4].sum())} blocks)", "batch": 1,
             "a": "rows one by one", "b": "4-row tiles", **got}]


def blocks_linear_rows(tmp: Path, rounds: int) -> list[dict]:
    rt = _packed("mlp_1024", {"image_size": 32}, MLP_LEVELS, tmp, block=(4, 1))
    chain = _chain(rt)
    _sparse(rt, 0, 64)
    x = torch.randn(64, 1024)
    token = _LEVEL.set(0)
    try:
        fused = chain._fused_linears(64, None)
    finally:
        _LEVEL.reset(token)
    plain = _FusedLinears(fused.kern, fused.acts, fused.arrays[:-2] + (np.zeros_like(fused.arrays[-2]),
                                                                       fused.arrays[-1]), fused.out_features)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    got = ab(lambda: plain(x), lambda: fused(x), rounds, 10)
    return [{"pair": "blocks_linear", "model": f"mlp1024 4x1 2% ({int(fused.arrays[-2].sum())} blocks)",
             "batch": 64, "a": "rows one by one", "b": "4-row tiles", **got}]


def _program_ab(tmp: Path, rounds: int, switch: str, pair: str, a: str, b: str, off: tuple = ()) -> list[dict]:
    """ResNet-20 5%: its program compiled with the layout switch ``program.<switch>`` off (A) and
    on (B), two geometries of one program (the switches in ``off`` off on both sides); one image
    on one core and batch 64 on every core."""
    rt = _packed("resnet20", {"in_channels": 3}, (0.05, 0.1, 1.0), tmp)
    (prog,) = [u for u in rt.units() if isinstance(u, PlaneProgram)]
    shape = (3, 32, 32)
    geos = {}
    for flag in (False, True):
        for name in (switch, *off):
            setattr(program, name, flag if name == switch else False)
        try:
            geos[flag] = prog._compile(shape, True)  # with the classifier (in the program at 5%)
        finally:
            for name in (switch, *off):
                setattr(program, name, True)
    assert not np.array_equal(geos[False].steps, geos[True].steps)
    lv = prog._arrays(0)
    rows = []
    for batch in (1, 64):
        T = max(1, min(kernels._threads(), batch))
        kern = kernels._kernel("prog_par" if T > 1 else "prog_ser")
        xa = torch.randn(batch, *shape).numpy().reshape(-1)
        calls, outs = {}, {}
        for flag, geo in geos.items():
            arena = kernels.aligned_empty((T * geo.arena,))
            arena.fill(0.0)
            out = outs[flag] = np.empty(batch * geo.out_size, np.float32)
            calls[flag] = (lambda geo=geo, arena=arena, out=out: kern(
                xa, out, arena, geo.arena, T, batch, geo.steps, geo.offs_b, prog._vals.view(np.uint8), prog._code,
                *lv))
            calls[flag]()
        np.testing.assert_allclose(outs[True], outs[False], rtol=1e-5, atol=1e-5)
        got = ab(calls[False], calls[True], rounds, 20 if batch == 1 else 2)
        rows.append({"pair": pair, "model": "resnet20 5%", "batch": batch, "a": a, "b": b, **got})
    return rows


def strips_rows(tmp: Path, rounds: int) -> list[dict]:
    return _program_ab(tmp, rounds, "STRIP_PLANES", "strips", "plain planes", "8x8 stage on strip planes")


def strided_rows(tmp: Path, rounds: int) -> list[dict]:
    return _program_ab(tmp, rounds, "PHASE_AT_OUTPUT_PITCH", "strided", "stride-2 conv via wide scratch",
                       "phases at the output pitch (direct)")


def row_tiles_rows(tmp: Path, rounds: int) -> list[dict]:
    return _program_ab(tmp, rounds, "ROW_TILES", "row_tiles", "flat spans, junk columns cleared",
                       "whole-row tiles (32 / 16 wide stages)", off=("FUSE_SPLITS",))


def fused_split_rows(tmp: Path, rounds: int) -> list[dict]:
    return _program_ab(tmp, rounds, "FUSE_SPLITS", "fused_split", "SPLIT step after the producer",
                       "producer writes the phases (no SPLIT)")


def ort_threads_rows(tmp: Path, rounds: int) -> list[dict]:
    from nestedsparse.structure import ChannelSelector  # noqa: PLC0415

    torch.manual_seed(0)
    m = models.create("lenet5").eval()
    nestify_(m, LevelSpec((0.0625, 0.25, 1.0)))
    ChannelSelector((0.25, 0.5, 1.0)).apply_(m)
    pack(m, model_name="lenet5", model_kwargs={}).save(tmp / "lenet5_ch.nsp")
    rt = load_packed(tmp / "lenet5_ch.nsp")
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, *m.input_shape)
        nets = {n.threads: n for n in rt._slim_ort_nets(0, rt._slim_model(0, x), x) or ()}
        if len(nets) != 2:  # the other pairs still run
            print(f"ort_threads skipped: needs onnxruntime and two kernel threads (sessions: {sorted(nets)})",
                  file=sys.stderr)
            return rows
        many = max(nets)

        def routed(net, x=x, batch=batch):
            def call():
                rt._slim_on[(0, batch)] = net
                return rt(x, level=0)
            return call
        got = ab(routed(nets[many]), routed(nets[1]), rounds, 20 if batch == 1 else 2)
        rows.append({"pair": "ort_threads", "model": "lenet5 width 0.25 (slim, ONNX Runtime)", "batch": batch,
                     "a": f"{many}-thread session", "b": "1-thread session", **got})
    return rows


def direct_calls_rows(tmp: Path, rounds: int) -> list[dict]:
    from nestedsparse.pack import runtime  # noqa: PLC0415

    rows = []
    real = runtime._plain_calls
    for name, kw in (("lenet5", {}), ("resnet20", {"in_channels": 3}), ("mlp_1024", {"image_size": 32})):
        rt = _packed(name, kw, (0.05, 0.1, 1.0), tmp)
        x = torch.randn(1, *rt.model.input_shape)
        rt.tune(x, slim=False)

        def run(direct, rt=rt, x=x):
            runtime._plain_calls = real if direct else (lambda g, mods: False)
            try:
                return rt(x, level=0)
            finally:
                runtime._plain_calls = real
        torch.testing.assert_close(run(True), run(False))
        got = ab(lambda: run(False), lambda: run(True), rounds, 20)
        rows.append({"pair": "direct_calls", "model": f"{name} 5%", "batch": 1, "a": "traced graph's code",
                     "b": "modules' forwards directly", **got})
    return rows


PAIRS = {"chain": chain_rows, "entry_prefetch": prefetch_rows, "blocks_conv": blocks_conv_rows,
         "blocks_linear": blocks_linear_rows, "strips": strips_rows, "strided": strided_rows,
         "row_tiles": row_tiles_rows, "fused_split": fused_split_rows, "ort_threads": ort_threads_rows,
         "direct_calls": direct_calls_rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", default=str(RESULTS / "runtime_ab"))
    p.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated subset of: " + ", ".join(PAIRS))
    args = p.parse_args()
    pairs = args.pairs.split(",")
    if not set(pairs) <= set(PAIRS):
        p.error(f"--pairs: unknown {sorted(set(pairs) - set(PAIRS))}; choose from {', '.join(PAIRS)}")
    torch.set_num_threads(2)
    rows = []
    gauges = [gauge()]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in pairs:
            rows += PAIRS[name](Path(tmp), args.rounds)
    gauges.append(gauge())
    meta = {"rounds": args.rounds, "threads": kernels._threads(), "cpu": cpu_name(), "torch": torch.__version__,
            "load_gauge_ms_before_after": gauges, "load_gauge": gauge.__doc__.split(":")[0].strip(),
            "method": "one process, A and B interleaved per round; per-call median and p10, us"}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = format_table(rows)
    Path(args.out + ".md").write_text(f"# Runtime paths, A/B in one process\n\n{json.dumps(meta)}\n\n```\n{table}\n```\n")
    print(table)


if __name__ == "__main__":
    main()
