"""Wide ResNets (Zagoruyko & Komodakis 2016) with pre-activation blocks, e.g. WRN-16-4.

A 3x3 stem with 16 filters, then three stages (``layer1..layer3``) of
``(depth - 4) / 6`` blocks with widths ``16k, 32k, 64k`` and strides 1, 2, 2,
then BN-ReLU, global average pooling and a linear classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import check_positive_int, register_model
from .resnet import init_weights

__all__ = ["PreActBlock", "WideResNet", "wrn"]

Device = torch.device | str | None


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    The shortcut is the identity when shapes match, else a 1x1 convolution
    applied to the pre-activated input.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        dropout: float = 0.0,
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the block mapping ``in_planes`` to ``planes`` channels."""
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.bn1 = nn.BatchNorm2d(in_planes, **kw)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(planes, **kw)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False, **kw)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual output with ``planes`` channels."""
        activated = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


def _check_wrn_args(
    depth: int, width: int, num_classes: int, in_channels: int, dropout: float
) -> None:
    """Validate the arguments of :class:`WideResNet`."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth!r}")
    check_positive_int("width", width)
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _stage(
    in_planes: int, planes: int, stride: int, blocks: int, dropout: float, kw: dict[str, Any]
) -> nn.Sequential:
    """One stage: a (possibly strided) first block, then ``blocks - 1`` plain blocks."""
    first = PreActBlock(in_planes, planes, stride, dropout, **kw)
    rest = (PreActBlock(planes, planes, 1, dropout, **kw) for _ in range(blocks - 1))
    return nn.Sequential(first, *rest)


class WideResNet(nn.Module):
    """WRN-``depth``-``width``; ``depth`` must be 6n + 4 (10, 16, 22, 28, 40, ...).

    Attributes:
        stem: the first 3x3 convolution.
        layer1, layer2, layer3: ``nn.Sequential`` of :class:`PreActBlock`.
        blocks_per_stage: number of blocks in each stage.
        head: final BN-ReLU, global average pooling and Flatten.
        classifier: the final ``nn.Linear``.
        input_shape: ``(in_channels, 32, 32)``.
    """

    def __init__(
        self,
        depth: int = 16,
        width: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        dropout: float = 0.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the network; ``width`` multiplies the stage widths 16, 32, 64."""
        super().__init__()
        _check_wrn_args(depth, width, num_classes, in_channels, dropout)
        kw = {"device": device, "dtype": dtype}
        self.input_shape = (in_channels, 32, 32)
        self.blocks_per_stage = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False, **kw)
        widths = (16 * width, 32 * width, 64 * width)
        self.layer1 = _stage(16, widths[0], 1, self.blocks_per_stage, dropout, kw)
        self.layer2 = _stage(widths[0], widths[1], 2, self.blocks_per_stage, dropout, kw)
        self.layer3 = _stage(widths[1], widths[2], 2, self.blocks_per_stage, dropout, kw)
        in_planes = widths[2]
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_planes, **kw),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(in_planes, num_classes, **kw)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, in_channels, H, W]."""
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.head(x))


@register_model("wrn")
def wrn(
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 16,
    width: int = 4,
    dropout: float = 0.0,
    device: Device = None,
    dtype: torch.dtype | None = None,
) -> WideResNet:
    """Wide ResNet WRN-``depth``-``width`` (default WRN-16-4, about 2.7 M parameters)."""
    return WideResNet(
        depth, width, num_classes, in_channels, dropout=dropout, device=device, dtype=dtype
    )
