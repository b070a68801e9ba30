"""Run under torchrun by tests/test_distributed.py: train a tiny nested model, dump this rank's state."""
import os
import sys

import torch
from torch import nn

import nestedsparse as ns
from nestedsparse.data import load_dataset

out = sys.argv[1]
torch.manual_seed(int(os.environ["RANK"]) + 1)  # different init per rank: DDP must make them agree
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
ns.nestify_(model, ns.LevelSpec((0.2, 0.5, 1.0)))
data = load_dataset("synthetic", num_samples=96, num_classes=4, shape=(3, 4, 4), seed=0)
cfg = ns.TrainConfig(epochs=2, batch_size=8, lr=0.05, progress=False, selector_args={"end": 0.5, "update_every": 2})
ns.train(model, data, None, cfg)
ns.save(model, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
torch.distributed.destroy_process_group()
