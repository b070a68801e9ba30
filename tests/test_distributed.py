import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_cpu_ranks_train_identical_maps_and_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = WORKER.parent / "ddp_gated_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
