"""LTD -- Low Temperature Distillation (Chen & Lee, arXiv 2111.02331; RobustBench ``Chen2021LTD_*``).

A naturally trained teacher of the student's architecture gives
``p_t = softmax(f_teacher(x) / tau)`` on the *clean* image, tau low but > 1 (the paper's best on
CIFAR-10: tau = 5); TRADES form ``CE(f(x), p_t) + lambda * KL(f(x) || f(x'))``; the attack is
TRADES' KL attack (no label).  The student temperature stays 1.

Config: ``method: {name: ltd, teacher: RUN_DIR_OR_WEIGHTS, temperature: 5.0}`` with
``objective.name: trades``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..fast import teacher_forward
from .base import Rectifier, Target
from .frozen import check_teacher_path, freeze
from .registry import BuildContext, MethodSettings, register_method

__all__ = ["LTD", "LTDSettings"]

TEMPERATURE = 5.0  # the paper's best teacher temperature


class LTD(Rectifier):
    name = "ltd"

    def __init__(self, teacher: nn.Module, num_classes: int, temperature: float = TEMPERATURE):
        super().__init__(num_classes)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = freeze(teacher)
        self.temperature = float(temperature)

    def targets(self, x, y, *, index=None) -> Target:
        self._check_labels(y)
        t_logits = teacher_forward(self.teacher, x)  # inference mode
        if t_logits.shape[1] != self.num_classes:
            raise ValueError(f"the LTD teacher predicts {t_logits.shape[1]} classes, the task has {self.num_classes}")
        dist = F.softmax(t_logits.float() / self.temperature, dim=1)
        return Target(y, dist, for_attack=y)  # the attack uses the original label / TRADES KL

    def modules(self) -> list:
        return [self.teacher]

    def to(self, device):
        self.teacher.to(device)
        return self

    def extra_repr(self):
        return f"temperature={self.temperature}"


@dataclass
class LTDSettings(MethodSettings):
    teacher: Optional[str] = None       # a naturally trained run directory or weights file
    temperature: float = TEMPERATURE    # tau of the teacher's softmax

    def validate(self) -> None:
        self._positive("temperature")
        check_teacher_path(self.teacher, "method.teacher")

    def check_config(self, cfg) -> None:
        if cfg.objective.name != "trades":
            raise ConfigError("objective.name", "LTD is defined in TRADES form; set objective.name=trades")

    def check_runnable(self) -> None:
        self._check(self.teacher is not None, "teacher",
                    "LTD needs a naturally trained teacher: --set method.teacher=RUN_DIR_OR_WEIGHTS "
                    "(train one with a '*-natural' preset)")


_BIBTEX = """@article{chen2021ltd,
  title   = {{LTD}: Low Temperature Distillation for Robust Adversarial Training},
  author  = {Chen, Erh-Chung and Lee, Che-Rung},
  journal = {CoRR},
  volume  = {abs/2111.02331},
  year    = {2021}
}"""


@register_method(
    "ltd", settings=LTDSettings, label="LTD", bibtex=_BIBTEX,
    title="LTD: Low Temperature Distillation for Robust Adversarial Training",
    summary=("Low Temperature Distillation: the natural term of TRADES is trained towards a naturally trained "
             "teacher's softmax at a low temperature (> 1) on the clean image; the attack uses the original "
             "label (RobustBench entries Chen2021LTD_*)."))
def build_ltd(s: LTDSettings, ctx: BuildContext) -> LTD:
    return LTD(ctx.load_teacher(s.teacher, "method.teacher"), ctx.num_classes, temperature=s.temperature)
