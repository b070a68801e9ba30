import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"


def _two_ranks(worker: Path, out: Path) -> tuple[dict, dict]:
    """Run ``worker`` under torchrun on 2 CPU ranks; each rank's saved state."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_cpu_ranks_train_identical_maps_and_weights(tmp_path):
    a, b = _two_ranks(WORKER, tmp_path)
    assert a.keys() == b.keys()
    maps = [k for k in a if k.endswith("level_map")]
    assert len(maps) == 2
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in maps:  # the maps really were pruned to the spec, not left dense
        assert abs(float((a[k] <= 0).float().mean()) - 0.2) < 0.05


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_ranks_with_layer_scheduling_and_frozen_core(tmp_path):
    """A phase that runs only level 0 leaves the skipped block unused: DDP must not stall on it."""
    a, b = _two_ranks(WORKER.parent / "ddp_gated_worker.py", tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
