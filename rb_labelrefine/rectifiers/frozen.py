"""What the rectifiers with pre-trained teachers (LTD, KD) share."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..errors import ConfigError

__all__ = ["freeze", "check_teacher_path"]


def freeze(model: nn.Module) -> nn.Module:
    """Teachers are frozen and run in eval mode (BatchNorm running statistics)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_teacher_path(path: Optional[str], field: str) -> None:
    """A teacher path given in the config must exist (a run directory or a weights file)."""
    from pathlib import Path

    if path is not None and not Path(path).exists():
        raise ConfigError(field, f"file not found: {path}")
