"""Small networks for the offline data sets, CPU-only CI and unit tests."""
from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["small_cnn", "tiny_cnn", "mlp"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _halved(size: int) -> int:
    return (size - 1) // 2 + 1  # output of a 3x3, stride-2, padding-1 conv


@register_model
def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 256) -> nn.Module:
    """Two stride-2 3x3 convs (32, 64 channels) with BatchNorm, then FC 64*(s/4)^2 -> 256 -> classes.

    The 2-layer CNN of the Fashion-MNIST / digits experiments: 3136 -> 256 -> 10 on 28x28
    (824,554 parameters), 256 -> 256 -> 10 on 8x8 digits.
    """
    s = _halved(_halved(image_size))
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32), *_conv_bn_relu(32, 64), nn.Flatten(),
        nn.Linear(64 * s * s, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


@register_model
def tiny_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 16) -> nn.Module:
    """A few-thousand-parameter conv net with BatchNorm (global pooling: any image size)."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


@register_model
def mlp(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, hidden: int = 64,
        batch_norm: bool = False) -> nn.Module:
    """Flatten -> Linear -> [BatchNorm1d] -> ReLU -> Linear: the fastest model for tests."""
    layers = [nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)
