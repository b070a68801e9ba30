"""Latency of every level of a packed file vs dense PyTorch and dense ONNX Runtime, same run.

``bench_packed(path)`` loads the file, tunes the runtime (sparse vs dense per layer and level)
for each batch size, then times, on one random input per batch size:

- ``ours``: ``rt(x, level=k)`` for every level ``k``;
- ``torch_dense``: the plain dense PyTorch model (``dense_model_for_level`` of the densest level:
  ``nn.Linear`` / ``nn.Conv2d`` / BatchNorm), one baseline per batch size;
- ``ort_dense``: the same dense model exported to ONNX and run by ONNX Runtime (``None`` when
  onnxruntime is not installed).

Method (``BENCHMARKS.md``): warm-up calls, then the median of ``repeats`` timed calls
(``time.perf_counter``, garbage collector off). ONNX Runtime is timed twice and its faster
median is the baseline: alone in its own block with spinning workers (its fastest setting at
batch 1), and interleaved with the other candidates with non-spinning workers (spinning ones
kept a core busy and slowed whatever ran next by up to 1.8x; at batch 64 they are no faster).
PyTorch, that ORT session and the runtime's levels are timed in interleaved rounds
(every candidate runs a burst of about 10 calls each round, the order rotating, the first calls
of a burst untimed) so that the machine's drift hits them alike; within a burst calls run back
to back (warm caches, as in any serving loop).
Threads are fixed: ``torch.set_num_threads``, numba's thread count and ONNX Runtime's
``intra_op_num_threads`` all get ``threads`` (default: torch's current setting).
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .format import read_packed
from .onnx import _export, dense_model_for_level, example_input, ort_session
from .runtime import load_packed

__all__ = ["bench_packed", "time_interleaved", "ROW_KEYS"]

#: Keys of every row :func:`bench_packed` returns.
ROW_KEYS = ("batch", "level", "density", "kept", "ours_ms", "torch_dense_ms", "ort_dense_ms", "speedup_vs_torch",
            "speedup_vs_ort", "bytes", "dense_model_bytes", "sparse_layers", "layers", "slim", "threads", "repeats")


def time_interleaved(fns: Mapping[Hashable, Callable[[], object]], repeats: int = 50, warmup: int = 3,
                     rounds: int | None = None, burst_warmup: int = 2, settle: float = 0.0) -> dict[Hashable, float]:
    """Median wall time in milliseconds of each function, timed in interleaved rounds.

    Every function first runs ``warmup`` times; then, for each of ``rounds`` rounds (order
    rotating; default ``ceil(repeats / 10)``, at most 10), the process sleeps ``settle`` seconds
    (default 0: on the shared dev VM an idle gap made every candidate's first parallel regions
    pay vCPU wake-ups, e.g. MLP 2% 0.33 -> 0.51 ms), each function runs ``burst_warmup`` times
    untimed and ``ceil(repeats / rounds)`` times timed, back to back. At least ``repeats``
    timings per function are taken.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    keys = list(fns)
    if rounds is None:
        rounds = min(10, math.ceil(repeats / 10))
    rounds = max(1, min(repeats, rounds))
    per = math.ceil(repeats / rounds)
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for k in keys:
            for _ in range(warmup):
                fns[k]()
        clock = time.perf_counter
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                fn, out = fns[k], samples[k]
                if settle > 0:
                    time.sleep(settle)
                for _ in range(burst_warmup):
                    fn()
                for _ in range(per):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return {k: float(np.median(v)) * 1e3 for k, v in samples.items()}


def _set_threads(n: int) -> tuple[int, int | None]:
    """Set torch's and numba's thread counts; return the old ones."""
    old_torch = torch.get_num_threads()
    torch.set_num_threads(n)
    old_numba = None
    try:
        import numba

        old_numba = numba.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except Exception:  # numba missing: the kernels fall back to torch
        old_numba = None
    return old_torch, old_numba


def _restore_threads(old: tuple[int, int | None]) -> None:
    torch.set_num_threads(old[0])
    if old[1] is not None:
        import numba

        numba.set_num_threads(old[1])


def _ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def bench_packed(path: str | os.PathLike, batches: Sequence[int] = (1, 64), threads: int | None = None,
                 repeats: int = 50, *, model_factory: Callable[[], nn.Module] | None = None,
                 input_shape: Sequence[int] | None = None, warmup: int = 3, ort: bool = True,
                 levels: Sequence[int] | None = None) -> list[dict]:
    """Median latency per (batch, level) of the packed runtime vs dense PyTorch and ONNX Runtime.

    Args:
        path: a packed file (``PackedModel.save``).
        batches: batch sizes; the runtime is tuned (``rt.tune``) on each.
        threads: threads for torch, numba and ONNX Runtime (default: ``torch.get_num_threads()``).
        repeats: timed calls per candidate (median reported).
        model_factory: builds the architecture (default: the registry model the file names).
        input_shape: one sample's shape (default: the model's ``input_shape``).
        warmup: untimed calls per candidate before timing.
        ort: also time ONNX Runtime (skipped, ``None`` in the rows, if onnxruntime is missing).
        levels: the levels to time (default: all).

    Returns:
        One JSON-ready dict per (batch, level), keys :data:`ROW_KEYS`: ``batch``, ``level``,
        ``density`` (the spec's), ``kept`` (the share of the packed layers' weights the level
        really keeps), ``ours_ms``, ``torch_dense_ms``, ``ort_dense_ms`` (or None),
        ``speedup_vs_torch`` (= torch_dense_ms / ours_ms), ``speedup_vs_ort`` (or None),
        ``bytes`` (what a file of levels ``0..k`` stores, ``PackedModel.level_bytes``),
        ``dense_model_bytes`` (the float32 dense model), ``sparse_layers`` / ``layers`` (layers
        that tune() left on the sparse kernel at this level and batch / all packed layers),
        ``slim`` (what runs the level as its slim dense network, ``rt.tune``: "torch",
        "onnxruntime", or "" for the packed path), ``threads``, ``repeats``.

    Example::

        rows = bench_packed("lenet5.nsp", batches=(1, 64), threads=2)
    """
    batches = [int(b) for b in batches]
    if not batches or min(batches) < 1:
        raise ValueError(f"batches must be positive ints, got {batches}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    n_threads = int(threads) if threads is not None else torch.get_num_threads()
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old = _set_threads(n_threads)
    try:
        packed = read_packed(path)
        rt = load_packed(path, model_factory)
        top = rt.spec.num_levels - 1
        levels = list(range(rt.spec.num_levels)) if levels is None else [int(k) for k in levels]
        for k in levels:
            rt.spec.check_level(k)
        dense = dense_model_for_level(rt, top)
        layers = rt.sparse_layers()
        kept = [round(packed.kept(k), 4) for k in range(rt.spec.num_levels)]
        sess = sess_quiet = sess_one = None
        with tempfile.TemporaryDirectory(prefix="nestedsparse-bench-") as tmp:
            if ort and _ort_available():
                onnx_path = os.path.join(tmp, "dense.onnx")
                try:
                    _export(dense, example_input(rt, 2, input_shape), onnx_path)
                    sess = ort_session(onnx_path, n_threads)
                    sess_quiet = ort_session(onnx_path, n_threads, spinning=False)
                    # and on one thread: a small call runs faster without workers to wake
                    sess_one = ort_session(onnx_path, 1) if n_threads > 1 else None
                except Exception as e:  # noqa: BLE001 - report, keep the other baselines
                    warnings.warn(f"ONNX Runtime baseline skipped: {type(e).__name__}: {e}", stacklevel=2)
                    sess = None
            rows = []
            for b in batches:
                x = example_input(rt, b, input_shape, seed=b)
                xn = x.numpy()
                rt.tune(x, levels=levels)

                def run_dense(x=x):
                    with torch.inference_mode():
                        return dense(x)

                t: dict[Hashable, float] = {}
                if sess is not None:
                    # ONNX Runtime in up to three settings, its best counts: (1) its own block, spinning
                    # workers; (2) interleaved with the others with non-spinning workers (spinning ones
                    # slowed whatever ran next by up to 1.8x), so machine drift hits it alike; (3) one
                    # thread, interleaved (no workers: LeNet-5's slim export at batch 1 ran in 0.65x the
                    # time of two non-spinning threads).
                    t["ort_block"] = time_interleaved({"o": lambda xn=xn: sess.run(None, {"input": xn})},
                                                      repeats, warmup)["o"]
                    time.sleep(0.5)  # let its threads park
                fns: dict[Hashable, Callable[[], object]] = {"torch": run_dense}
                if sess is not None:
                    fns["ort_quiet"] = lambda xn=xn: sess_quiet.run(None, {"input": xn})
                if sess_one is not None:
                    fns["ort_one"] = lambda xn=xn: sess_one.run(None, {"input": xn})
                for k in levels:
                    fns[("ours", k)] = lambda k=k, x=x: rt(x, level=k)
                t.update(time_interleaved(fns, repeats, warmup))
                if sess is not None:
                    t["ort"] = min(t.pop("ort_block"), t.pop("ort_quiet"), t.pop("ort_one", float("inf")))
                for k in levels:
                    ours = t[("ours", k)]
                    ort_ms = t.get("ort")
                    rows.append({
                        "batch": b, "level": k, "density": float(rt.spec.densities[k]), "kept": kept[k],
                        "ours_ms": round(ours, 5), "torch_dense_ms": round(t["torch"], 5),
                        "ort_dense_ms": None if ort_ms is None else round(ort_ms, 5),
                        "speedup_vs_torch": round(t["torch"] / ours, 4),
                        "speedup_vs_ort": None if ort_ms is None else round(ort_ms / ours, 4),
                        "bytes": int(packed.level_bytes(k)), "dense_model_bytes": _param_bytes(dense),
                        "sparse_layers": sum(m.choice(k, b) == "sparse" for m in layers), "layers": len(layers),
                        "slim": rt.slim_backend(k, b) or "",
                        "threads": n_threads, "repeats": int(repeats),
                    })
            sess = sess_quiet = sess_one = None  # noqa: F841 - release the sessions before the temp dir goes
        return rows
    finally:
        _restore_threads(old)
