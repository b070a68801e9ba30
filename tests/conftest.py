"""Shared tiny models (odd sizes catch transposes) and seeds."""
import pytest
import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Conv (grouped + depthwise) -> BN -> Linear with odd sizes."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.ReLU(),   # depthwise
            nn.Conv2d(6, 4, 1, groups=2), nn.ReLU(),               # grouped
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@pytest.fixture
def tiny_conv():
    torch.manual_seed(0)
    return TinyConvNet()


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))


class BranchOnData(nn.Module):
    """A forward whose control flow depends on the data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


@pytest.fixture
def untraceable():
    return BranchOnData()
