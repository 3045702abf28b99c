"""Normalisation inside the model, so every network takes [0, 1] pixels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["NormalizedModel", "wrap_module"]


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` with ``mean``/``std`` as buffers.

    RobustBench and AutoAttack feed raw [0, 1] images and measure ``eps`` in that space, so the
    per-channel normalisation must be part of the model rather than of the data pipeline.
    The buffers travel with ``.to(device)`` and are saved, so the ``state_dict`` keys are always
    ``mean``, ``std`` and ``model.*`` -- a checkpoint restores the normalisation it was trained with.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean.numel() != std.numel():
            raise ValueError(f"mean has {mean.numel()} channels but std has {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std.flatten().tolist()}")
        # Buffers are registered before the child so state_dict lists mean, std, then model.*.
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def wrap_module(module: nn.Module, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> NormalizedModel:
    """Bring any user ``nn.Module`` into the package's model contract.

    Without ``mean``/``std`` the wrapper is the identity (for networks that already take [0, 1]
    inputs, e.g. RobustBench model-zoo entries); an already wrapped model is returned as is.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    if isinstance(module, NormalizedModel) and mean is None and std is None:
        return module
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    return NormalizedModel(module, (0.0,) if mean is None else mean, (1.0,) if std is None else std)
