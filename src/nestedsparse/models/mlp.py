"""Fully connected networks: LeNet-300-100 and the 1024-1024-1024 MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import check_positive_int, register_model

__all__ = ["MLP", "mlp", "mlp_1024"]


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden width, then a linear classifier.

    Attributes:
        features: ``nn.Sequential`` of Flatten and the hidden Linear/ReLU pairs.
        classifier: the final ``nn.Linear``.
        input_shape: the shape of one input sample.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (300, 100),
        num_classes: int = 10,
        *,
        input_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the layers; ``input_shape`` (default ``(in_features,)``) must have
        ``in_features`` elements."""
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("num_classes", num_classes)
        for width in hidden:
            check_positive_int("every hidden width", width)
        shape = tuple(input_shape) if input_shape is not None else (in_features,)
        if torch.Size(shape).numel() != in_features:
            raise ValueError(
                f"input_shape {shape} has {torch.Size(shape).numel()} "
                f"elements, expected in_features={in_features}"
            )
        self.input_shape = shape
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for width in hidden:
            layers += [
                nn.Linear(previous, width, device=device, dtype=dtype),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for inputs [B, *input_shape]."""
        return self.classifier(self.features(x))


def _image_mlp(
    hidden: Sequence[int],
    num_classes: int,
    in_channels: int,
    image_size: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> MLP:
    """An MLP over square ``in_channels x image_size x image_size`` images."""
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    shape = (in_channels, image_size, image_size)
    return MLP(
        in_channels * image_size**2,
        hidden,
        num_classes,
        input_shape=shape,
        device=device,
        dtype=dtype,
    )


@register_model("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MLP:
    """LeNet-300-100: 784-300-100-``num_classes`` for 28x28x1 input."""
    return _image_mlp((300, 100), num_classes, in_channels, image_size, device, dtype)


@register_model("mlp_1024")
def mlp_1024(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MLP:
    """Three hidden layers of 1024 units: 784-1024-1024-1024-``num_classes`` for 28x28x1."""
    return _image_mlp((1024, 1024, 1024), num_classes, in_channels, image_size, device, dtype)
