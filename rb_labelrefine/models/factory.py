"""``build_model``: registry name (or module) + data statistics -> a [0, 1]-input model."""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from .normalize import NormalizedModel, wrap_module
from .registry import create_model

__all__ = ["build_model", "count_parameters"]


def build_model(arch: Union[str, nn.Module], num_classes: int, in_channels: int, image_size: int,
                mean: Sequence[float], std: Sequence[float], **kwargs) -> NormalizedModel:
    """Create ``arch`` and wrap it in :class:`NormalizedModel` with the data set's ``mean``/``std``.

    ``arch`` is a registered name, ``timm:<name>``, or an ``nn.Module`` the user built (then the
    shape arguments are not used and ``kwargs`` must be empty).
    """
    if isinstance(arch, nn.Module):
        if kwargs:
            raise ValueError(f"model kwargs {sorted(kwargs)} given for an already built module")
        return wrap_module(arch, mean, std)
    if len(mean) not in (1, in_channels) or len(std) not in (1, in_channels):
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {in_channels} input channels")
    net = create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    return NormalizedModel(net, mean, std)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BatchNorm statistics and mean/std excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
