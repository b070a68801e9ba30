"""What a packed runtime holds in memory, against the dense model and the packed file.

For each model (random init; nested at 5 / 10 / 100%, float32), packs and loads it, then counts
the bytes of every numpy array and tensor reachable from the runtime (each buffer once; through
modules, containers, objects and the closures of bound kernel calls): right
after ``load_packed``, and after running every level at batch 1 and batch 64 (when the runtime
has built its per-level dense weights, kernel plans, tap offsets and activation arenas). The
bytes after running are also split by the runtime attribute that holds them. Byte counts, no
timing: one run is exact for this code and these shapes.

    python benchmarks/runtime_memory.py   # writes benchmarks/results/runtime_memory.{json,md}
"""
from __future__ import annotations

import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import nestify_
from nestedsparse.pack import load_packed, pack

sys.path.insert(0, str(Path(__file__).parent))
from kernels import code_version, config_args, write_results  # noqa: E402 - shared benchmark helpers

RESULTS = Path(__file__).parent / "results"
DENSITIES = (0.05, 0.1, 1.0)
CONFIGS = {  # name: (registry name, kwargs, one sample's shape)
    "mlp1024": ("mlp_1024", {"image_size": 32}, (1, 32, 32)),
    "lenet5": ("lenet5", {}, (1, 28, 28)),
    "resnet20": ("resnet20", {"in_channels": 3}, (3, 32, 32)),
    "mobilenet_v1": ("mobilenet_v1", {"in_channels": 3}, (3, 32, 32)),
}
TABLE_KEYS = ("config", "dense_model_bytes", "file_bytes", "after_load_bytes", "after_running_bytes",
              "after_running_vs_dense", "largest_holders")


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


class _Counter:
    """Bytes of the buffers reachable from objects, each buffer counted once."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def buffer(self, a) -> int:
        if isinstance(a, torch.Tensor):
            key, n = a.untyped_storage().data_ptr(), a.untyped_storage().nbytes()
        else:
            while isinstance(a.base, np.ndarray):
                a = a.base
            key, n = a.__array_interface__["data"][0], a.nbytes
        if key in self.seen or n == 0:
            return 0
        self.seen.add(key)
        return n

    def walk(self, obj, visited: set[int]) -> int:
        if id(obj) in visited:
            return 0
        visited.add(id(obj))
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            return self.buffer(obj)
        if isinstance(obj, (str, bytes, int, float, bool, type(None), type)) or type(obj).__module__.startswith(
                ("numba", "onnxruntime", "builtins")) and not isinstance(obj, (dict, list, tuple, set, frozenset)):
            return 0  # compiled kernels / sessions hold no arrays of ours; functions below
        if isinstance(obj, types.FunctionType):  # a bound kernel call keeps its arrays in its closure
            return sum(self.walk(c.cell_contents, visited) for c in obj.__closure__ or () if _filled(c))
        if isinstance(obj, types.MethodType):
            return self.walk(obj.__self__, visited) + self.walk(obj.__func__, visited)
        if isinstance(obj, dict):
            return sum(self.walk(v, visited) for v in list(obj.keys()) + list(obj.values()))
        if isinstance(obj, (list, tuple, set, frozenset)):
            return sum(self.walk(v, visited) for v in obj)
        total = 0
        for name in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, name):
                total += self.walk(getattr(obj, name), visited)
        if hasattr(obj, "__dict__"):
            total += sum(self.walk(v, visited) for v in vars(obj).values())
        return total


def held(rt) -> tuple[int, Counter]:
    """All bytes reachable from ``rt``, and the same split by (module class . attribute)."""
    counter, by = _Counter(), Counter()
    visited: set[int] = set()
    for mod in rt.modules():
        visited.add(id(mod))
    for mod in rt.modules():  # each module's own attributes (its submodules are walked as modules)
        for name, value in vars(mod).items():
            if name == "_modules":
                continue
            n = counter.walk(value, visited)
            if n:
                by[f"{type(mod).__name__}.{name}"] += n
    return sum(by.values()), by


def measure(config: str, tmp: Path) -> dict:
    name, kw, shape = CONFIGS[config]
    torch.manual_seed(0)
    m = models.create(name, **kw).eval()
    dense = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    nestify_(m, LevelSpec(DENSITIES))
    path = tmp / f"{config}.nsp"
    pack(m, model_name=name, model_kwargs=kw).save(path)
    del m
    rt = load_packed(path)
    after_load, _ = held(rt)
    x = torch.randn(1, *shape)
    with torch.inference_mode():
        for k in range(len(DENSITIES)):
            rt(x, level=k)
            rt(x.expand(64, *shape).contiguous(), level=k)
    after, by = held(rt)
    top = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in by.most_common(4))
    return {"config": config, "densities": DENSITIES, "dense_model_bytes": dense, "file_bytes": path.stat().st_size,
            "after_load_bytes": after_load, "after_running_bytes": after,
            "after_running_vs_dense": round(after / dense, 2), "largest_holders": top, "holders": dict(by)}


def main() -> None:
    configs, out = config_args(__doc__.split("\n")[0], CONFIGS, RESULTS / "runtime_memory")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(c, Path(tmp)) for c in configs]
    meta = {"code": code_version(), "torch": torch.__version__, "threads": 2,
            "method": "bytes of the arrays / tensors reachable from the runtime, each buffer once; after load, "
                      "and after every level at batch 1 and 64"}
    print(write_results(out, "What a packed runtime holds", rows, TABLE_KEYS, meta))


if __name__ == "__main__":
    main()
