"""MobileNetV1 (Howard et al. 2017) for CIFAR-sized 32x32 input.

The first convolution has stride 1 (not 2 as on ImageNet) so that 32x32 input
ends in a 2x2 map before global pooling. Channel counts are multiplied by
``width_mult`` and rounded to a multiple of 8, with a minimum of 8.
"""

from __future__ import annotations

import torch
from torch import nn

from . import check_positive_int, register_model
from .resnet import init_weights

__all__ = ["DepthwiseSeparable", "MobileNetV1", "make_divisible", "mobilenet_v1"]

Device = torch.device | str | None

#: (output channels, stride) of the 13 depthwise-separable blocks at width 1.0.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip
_STEM_CHANNELS = 32


def make_divisible(value: float, divisor: int = 8, min_value: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, at least ``min_value``.

    Rounding never goes more than 10% below ``value`` (it steps up one
    ``divisor`` instead), as in the reference MobileNet implementations.
    """
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (groups=channels)-BN-ReLU, then pointwise 1x1 conv-BN-ReLU."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the block mapping ``in_planes`` to ``planes`` channels."""
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.depthwise = nn.Conv2d(
            in_planes, in_planes, 3, stride=stride, padding=1, groups=in_planes, bias=False, **kw
        )
        self.bn1 = nn.BatchNorm2d(in_planes, **kw)
        self.relu1 = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_planes, planes, 1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(planes, **kw)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output with ``planes`` channels, spatially downsampled by ``stride``."""
        x = self.relu1(self.bn1(self.depthwise(x)))
        return self.relu2(self.bn2(self.pointwise(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 with a stride-1 stem for 32x32 images.

    Attributes:
        features: ``nn.Sequential``: stem conv3x3-BN-ReLU, then 13 :class:`DepthwiseSeparable`.
        pool: global average pooling and Flatten.
        classifier: the final ``nn.Linear``.
        input_shape: ``(in_channels, 32, 32)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the network; ``width_mult`` (> 0) scales every channel count."""
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        kw = {"device": device, "dtype": dtype}
        self.input_shape = (in_channels, 32, 32)
        self.width_mult = float(width_mult)
        stem = make_divisible(_STEM_CHANNELS * width_mult)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False, **kw),
            nn.BatchNorm2d(stem, **kw),
            nn.ReLU(inplace=True),
        ]
        in_planes = stem
        for channels, stride in MOBILENET_V1_BLOCKS:
            planes = make_divisible(channels * width_mult)
            layers.append(DepthwiseSeparable(in_planes, planes, stride, **kw))
            in_planes = planes
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_planes, num_classes, **kw)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, in_channels, H, W]."""
        return self.classifier(self.pool(self.features(x)))


@register_model("mobilenet_v1")
def mobilenet_v1(
    num_classes: int = 10,
    in_channels: int = 3,
    width_mult: float = 1.0,
    device: Device = None,
    dtype: torch.dtype | None = None,
) -> MobileNetV1:
    """MobileNetV1 for 32x32 input; ``width_mult`` e.g. 0.25, 0.5, 0.75, 1.0."""
    return MobileNetV1(num_classes, in_channels, width_mult, device=device, dtype=dtype)
