"""What the alignment of a plane conv's input taps costs its 64-wide register tile.

The depth-first programs (``pack/program.py``) run every stride-1 conv as 64-wide tiles: per
non-zero, 8 unaligned 8-float loads at the tap's offset and 8 FMAs.  A 3x3 tap's offset is
``dy*pitch + dx`` plus the tile's start, so most loads are not 32-byte aligned and about 7 in 16
of them cross a 64-byte cache line.  This benchmark times the same tile kernel
(``kernels._tile_span_np``, one serial call per output row, ``--nnz`` non-zeros per row, ``--tiles``
64-wide tiles per row, all data in L1/L2) with every tap's address

* ``aligned``: a multiple of 8 floats (32 bytes),
* ``+1 float`` / ``+4 floats``: 4 / 16 bytes past such a multiple,
* ``mixed``: any float offset (what a real plane conv sees),

rounds interleaved, and reports the median time per non-zero per 64 positions and the ratio to
``aligned``.  It measures the headroom a layout with aligned taps would have; no such layout is
built (see docs/design.md).

    python benchmarks/tile_alignment.py      # writes benchmarks/results/tile_alignment.{json,md}
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nestedsparse.pack import kernels as K
from nestedsparse.report import cpu_name, format_table

RESULTS = Path(__file__).parent / "results"
CASES = (("aligned", 8, 0), ("+1 float", 8, 1), ("+4 floats", 8, 4), ("mixed", 1, 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nnz", type=int, default=28, help="non-zeros per output row (ResNet-20 stage 3 at 5%%: 28.8)")
    p.add_argument("--tiles", type=int, default=4, help="64-wide tiles per row")
    p.add_argument("--rows", type=int, default=200, help="rows per timed call")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--out", default=str(RESULTS / "tile_alignment"))
    args = p.parse_args()
    import numba  # noqa: PLC0415 - the kernels need it anyway

    tile = K._kernel("tile_span_np")

    @numba.njit(nogil=True)
    def rows(cols_b, vals_b, code, nnz, arena, arena2, xoff, yb, L, R):  # type: ignore[no-untyped-def]
        for _ in range(R):
            tile(cols_b, vals_b, code, 0, nnz, arena2, xoff, yb, L, arena, np.float32(1.0), np.float32(0.0),
                 np.float32(-np.inf))

    rng = np.random.default_rng(0)
    arena = K.aligned_empty((160_000,))  # 64-byte aligned
    arena[:] = rng.standard_normal(arena.shape[0]).astype(np.float32)
    arena2 = arena.reshape(-1, 1)
    yb = 150_000  # the output row: a multiple of 16 floats, so the tile's stores are aligned
    L = 64 * args.tiles
    calls = {}
    for name, mult, add in CASES:
        cols = (rng.integers(0, 30_000 // mult, args.nnz) * mult + add).astype(np.int32)
        vals = rng.standard_normal(args.nnz).astype(np.float32)
        a = (cols.view(np.uint8), vals.view(np.uint8), 2 * 2, args.nnz, arena, arena2, -yb, yb, L, args.rows)
        rows(*a)
        calls[name] = a
    times: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(args.rounds):
        for name, a in calls.items():
            t0 = time.perf_counter()
            rows(*a)
            times[name].append(time.perf_counter() - t0)
    per = {n: float(np.median(t)) / (args.rows * args.nnz * args.tiles) * 1e9 for n, t in times.items()}
    out = [{"taps": n, "ns_per_nnz_per_64": round(per[n], 3), "vs_aligned": round(per[n] / per["aligned"], 3)}
           for n in calls]
    meta = {"nnz_per_row": args.nnz, "tiles_per_row": args.tiles, "rows_per_call": args.rows, "rounds": args.rounds,
            "method": "median of interleaved rounds; one serial call = rows x tiles x nnz tile steps",
            "cpu": cpu_name(), "numba": numba.__version__}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": out}, indent=1) + "\n")
    table = format_table(out)
    Path(args.out + ".md").write_text(f"# Tap alignment and the 64-wide plane tile\n\n{json.dumps(meta)}\n\n"
                                      f"```\n{table}\n```\n")
    print(table)


if __name__ == "__main__":
    main()
