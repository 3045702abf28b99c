"""One-hot targets: the plain PGD-AT (Madry et al. 2018) / TRADES (Zhang et al. 2019) baseline.

Config: ``method: {name: onehot}`` (no settings).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Rectifier
from .registry import BuildContext, MethodSettings, register_method

__all__ = ["OneHot", "OneHotSettings"]


class OneHot(Rectifier):
    """The hard label for attack and loss."""
    name = "onehot"


@dataclass
class OneHotSettings(MethodSettings):
    """No settings: the label is the data set's label."""


@register_method("onehot", settings=OneHotSettings, label=None,
                 summary="One-hot labels (the plain adversarial-training baseline).")
def build_onehot(s: OneHotSettings, ctx: BuildContext) -> OneHot:
    return OneHot(ctx.num_classes)
