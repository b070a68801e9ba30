"""LeNet-5 (Caffe variant: 20 and 50 filters, 500 hidden units)."""

from __future__ import annotations

import torch
from torch import nn

from . import check_positive_int, register_model

__all__ = ["LeNet5", "lenet5"]


def _lenet_spatial(image_size: int) -> int:
    """Side of the feature map after two (5x5 conv, 2x2 max-pool) stages."""
    side = image_size
    for _ in range(2):
        side = (side - 4) // 2
    if side < 1:
        raise ValueError(f"image_size must be at least 16 for LeNet-5, got {image_size}")
    return side


class LeNet5(nn.Module):
    """conv(20,5x5)-relu-pool-conv(50,5x5)-relu-pool-fc(500)-relu-fc(num_classes).

    Attributes:
        features: ``nn.Sequential`` of the convolutional part, ending in Flatten.
        classifier: ``nn.Sequential`` fc(800 -> 500), ReLU, fc(500 -> num_classes)
            (800 = 50 x 4 x 4 for 28x28 input).
        input_shape: ``(in_channels, image_size, image_size)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the layers for square ``image_size`` inputs with ``in_channels`` channels."""
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size)
        side = _lenet_spatial(image_size)
        kw = {"device": device, "dtype": dtype}
        self.input_shape = (in_channels, image_size, image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5, **kw),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5, **kw),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(50 * side * side, 500, **kw),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes, **kw),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, in_channels, image_size, image_size]."""
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LeNet5:
    """LeNet-5 for 28x28x1 input (other square sizes >= 16 work too)."""
    return LeNet5(num_classes, in_channels, image_size, device=device, dtype=dtype)
