"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/56.

A 3x3 stem with ``base_width`` filters, then three stages (``layer1..layer3``)
of ``n = (depth - 2) / 6`` BasicBlocks with widths ``w, 2w, 4w`` and strides
1, 2, 2, then global average pooling and a linear classifier. Global pooling
makes any input size work, e.g. 1-channel 28x28 images with ``in_channels=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import check_positive_int, register_model

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "init_weights",
    "resnet20",
    "resnet32",
    "resnet56",
]

Device = torch.device | str | None
SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int, before: int | None = None) -> None:
        """Map ``in_planes`` channels to ``planes`` (>= in_planes) with stride ``stride``; ``before``
        of the new zero channels go first (default half of them, rounded down)."""
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"option-A shortcut cannot shrink channels: {in_planes} -> {planes}")
        if stride < 1:
            raise ValueError(f"option-A shortcut stride must be >= 1, got {stride}")
        self.stride = stride
        self.extra = planes - in_planes
        self.before = self.extra // 2 if before is None else before
        if not 0 <= self.before <= self.extra:
            raise ValueError(f"option-A shortcut: {self.before} leading zero channels of {self.extra} new ones")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strided identity with zero channels on both sides."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.extra - self.before))


def _projection(
    in_planes: int, planes: int, stride: int, device: Device, dtype: torch.dtype | None
) -> nn.Sequential:
    """Option-B shortcut: 1x1 convolution + BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False, device=device, dtype=dtype),
        nn.BatchNorm2d(planes, device=device, dtype=dtype),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    ``shortcut`` is ``nn.Identity`` when shapes match, else option "A"
    (:class:`PadShortcut`) or "B" (1x1 conv + BN projection).
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "B",
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the block mapping ``in_planes`` to ``planes`` channels."""
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(planes, **kw)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(planes, **kw)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = _projection(in_planes, planes, stride, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual output, same batch size, ``planes`` channels."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _check_resnet_args(
    depth: int, shortcut: str, num_classes: int, in_channels: int, base_width: int
) -> None:
    """Validate the arguments of :class:`CifarResNet`."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth!r}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {list(SHORTCUTS)}, got {shortcut!r}")
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("base_width", base_width)


def _stage(
    in_planes: int, planes: int, stride: int, blocks: int, shortcut: str, kw: dict[str, Any]
) -> nn.Sequential:
    """One stage: a (possibly strided) first block, then ``blocks - 1`` plain blocks."""
    first = BasicBlock(in_planes, planes, stride, shortcut, **kw)
    rest = (BasicBlock(planes, planes, 1, shortcut, **kw) for _ in range(blocks - 1))
    return nn.Sequential(first, *rest)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images with ``(depth - 2) / 6`` BasicBlocks per stage.

    Attributes:
        stem: conv3x3-BN-ReLU.
        layer1, layer2, layer3: ``nn.Sequential`` of :class:`BasicBlock`.
        blocks_per_stage: number of blocks in each stage.
        pool: global average pooling and Flatten.
        classifier: the final ``nn.Linear``.
        input_shape: ``(in_channels, 32, 32)``.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        shortcut: str = "B",
        base_width: int = 16,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build a ResNet-``depth``; ``depth`` must be 6n + 2 (20, 32, 44, 56, 110, ...)."""
        super().__init__()
        _check_resnet_args(depth, shortcut, num_classes, in_channels, base_width)
        kw = {"device": device, "dtype": dtype}
        self.input_shape = (in_channels, 32, 32)
        self.blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base_width, 3, padding=1, bias=False, **kw),
            nn.BatchNorm2d(base_width, **kw),
            nn.ReLU(inplace=True),
        )
        widths = (base_width, 2 * base_width, 4 * base_width)
        self.layer1 = _stage(base_width, widths[0], 1, self.blocks_per_stage, shortcut, kw)
        self.layer2 = _stage(widths[0], widths[1], 2, self.blocks_per_stage, shortcut, kw)
        self.layer3 = _stage(widths[1], widths[2], 2, self.blocks_per_stage, shortcut, kw)
        in_planes = widths[2]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_planes, num_classes, **kw)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, in_channels, H, W]."""
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.pool(x))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out), unit BatchNorm scales, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@register_model("resnet20")
def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: str = "B",
    device: Device = None,
    dtype: torch.dtype | None = None,
) -> CifarResNet:
    """CIFAR ResNet-20: 3 BasicBlocks per stage, about 0.27 M parameters."""
    return CifarResNet(20, num_classes, in_channels, shortcut=shortcut, device=device, dtype=dtype)


@register_model("resnet32")
def resnet32(
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: str = "B",
    device: Device = None,
    dtype: torch.dtype | None = None,
) -> CifarResNet:
    """CIFAR ResNet-32: 5 BasicBlocks per stage, about 0.46 M parameters."""
    return CifarResNet(32, num_classes, in_channels, shortcut=shortcut, device=device, dtype=dtype)


@register_model("resnet56")
def resnet56(
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: str = "B",
    device: Device = None,
    dtype: torch.dtype | None = None,
) -> CifarResNet:
    """CIFAR ResNet-56: 9 BasicBlocks per stage, about 0.85 M parameters."""
    return CifarResNet(56, num_classes, in_channels, shortcut=shortcut, device=device, dtype=dtype)
