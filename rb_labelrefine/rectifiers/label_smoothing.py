"""Label smoothing (Szegedy et al. 2016): ``(1 - s) * onehot(y) + s / C`` for attack and loss,
the data-blind baseline of the KD+SWA and ADR papers.

Config: ``method: {name: label_smoothing, smoothing: 0.1}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Rectifier, Target
from .registry import BuildContext, MethodSettings, register_method

__all__ = ["LabelSmoothing", "LabelSmoothingSettings"]


class LabelSmoothing(Rectifier):
    """``attack_with_soft=False`` attacks with the hard label."""
    name = "label_smoothing"

    def __init__(self, num_classes: int, smoothing: float = 0.1, attack_with_soft: bool = True):
        super().__init__(num_classes)
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        self.smoothing = float(smoothing)
        self.attack_with_soft = attack_with_soft

    def targets(self, x, y, *, index=None) -> Target:
        self._check_labels(y)
        dist = torch.full((y.shape[0], self.num_classes), self.smoothing / self.num_classes,
                          device=y.device, dtype=torch.float32)
        dist.scatter_add_(1, y.long()[:, None], dist.new_full((y.shape[0], 1), 1.0 - self.smoothing))
        return Target(y, dist, for_attack=dist if self.attack_with_soft else y)

    def extra_repr(self):
        return f"smoothing={self.smoothing}"


@dataclass
class LabelSmoothingSettings(MethodSettings):
    smoothing: float = 0.1          # s: mass spread uniformly over the C classes

    def validate(self) -> None:
        self._unit("smoothing")


@register_method("label_smoothing", settings=LabelSmoothingSettings, label="LS", title="Label smoothing",
                 summary="Uniform label smoothing of the one-hot target (a data-blind baseline for label "
                         "refinement).")
def build_label_smoothing(s: LabelSmoothingSettings, ctx: BuildContext) -> LabelSmoothing:
    return LabelSmoothing(ctx.num_classes, smoothing=s.smoothing)
