"""Run under torchrun by tests/test_distributed.py: layer scheduling + frozen-core routing under DDP
(a phase that runs only level 0 leaves the skipped blocks' parameters unused)."""
import os
import sys

import torch
from torch import nn

import nestedsparse as ns
from nestedsparse.data import load_dataset
from nestedsparse.structure import gate_blocks_


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))
        self.b1, self.b2 = Block(16), Block(16)
        self.out = nn.Linear(16, 4)
        self.input_shape = (3, 4, 4)

    def forward(self, x):
        return self.out(self.b2(self.b1(self.inp(x))))


out = sys.argv[1]
torch.manual_seed(int(os.environ["RANK"]) + 1)
model = Net()
ns.nestify_(model, ns.LevelSpec((0.3, 1.0)))
gate_blocks_(model, {"b2": 1})
data = load_dataset("synthetic", num_samples=64, num_classes=4, shape=(3, 4, 4), seed=0)
cfg = ns.TrainConfig(epochs=2, batch_size=8, lr=0.05, progress=False, routing="frozen-core",
                     selector_args={"end": 0.25, "update_every": 2})
ns.train(model, data, None, cfg)
ns.save(model, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
torch.distributed.destroy_process_group()
