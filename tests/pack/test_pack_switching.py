"""Switching level on the sparse path allocates nothing: no level's weight is materialised, and
calls that switch level on every call allocate no more than calls that keep one level."""
import tracemalloc

import pytest
import torch

import nestedsparse as ns
from nestedsparse import models
from nestedsparse.pack import kernels as K
from nestedsparse.pack import load_packed, pack
from nestedsparse.pack import runtime as R

SPEC = ns.LevelSpec((0.05, 0.3, 1.0))


def _traced(fn) -> tuple[int, int]:
    """(peak, net) bytes numpy and Python allocated while ``fn`` ran (tracemalloc)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    cur, peak = tracemalloc.get_traced_memory()
    return peak - base, cur - base


@pytest.mark.parametrize("name, kwargs, shape, batch", [
    ("mlp_1024", {"image_size": 16}, (1, 16, 16), 8),     # one-call Linear chain (feature-major)
    ("mlp_1024", {"image_size": 16}, (1, 16, 16), 1),     # batch-1 SpMV chain
    ("resnet20", {"in_channels": 3}, (3, 16, 16), 2),     # depth-first conv program + classifier
    ("lenet5", {}, (1, 28, 28), 3),                       # convs with pools, then Linear layers
])
def test_switching_level_on_the_sparse_path_allocates_nothing(tmp_path, monkeypatch, name, kwargs, shape, batch):
    torch.manual_seed(0)
    m = models.create(name, **kwargs).eval()
    ns.nestify_(m, SPEC)
    pack(m, model_name=name, model_kwargs=kwargs).save(tmp_path / "m.nsp")
    rt = load_packed(tmp_path / "m.nsp")
    for layer in rt.sparse_layers():
        layer.mode.update({(k, batch): "sparse" for k in range(SPEC.num_levels)})
    x = torch.randn(batch, *shape)
    routes = [0, 1, 2, {"": 0, next(iter(rt.sparse_layers())).name: 2}]
    with torch.inference_mode():
        for route in routes:  # first use of a level builds its per-row plan arrays, once
            rt(x, level=route)

        def no_weights(*a, **k):
            raise AssertionError("a level's weight was materialised on the sparse path")

        monkeypatch.setattr(R._SparseBase, "dense_weight", no_weights)
        monkeypatch.setattr(K, "to_dense", no_weights)
        monkeypatch.setattr(K, "_torch_level_weight", no_weights)
        tracemalloc.start()
        try:
            same = _traced(lambda: [rt(x, level=0) for _ in range(8)])
            switching = _traced(lambda: [rt(x, level=routes[i % len(routes)]) for i in range(8)])
        finally:
            tracemalloc.stop()
    dense = sum(layer.csr.shape[0] * layer.csr.shape[1] * 4 for layer in rt.sparse_layers())
    # switching costs nothing over keeping one level (measured: peaks of 4-5 KiB either way,
    # Python's own objects; 8 KiB of slack), far below one level's dense weights (244 KiB to
    # 9 MiB here); and nothing stays allocated
    assert switching[0] <= same[0] + 8192 < dense // 8, (same, switching)
    assert switching[1] <= 8192, (same, switching)
