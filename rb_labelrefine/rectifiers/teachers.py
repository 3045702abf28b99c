"""Rectifiers with frozen, pre-trained teachers: LTD and KD self-teachers (KD+SWA).

LTD (Chen et al., "LTD: Low Temperature Distillation", RobustBench ``Chen2021LTD_*``):
    a naturally trained teacher of the student's architecture gives
    ``p_t = softmax(f_teacher(x) / tau)`` on the *clean* image, tau low but > 1 (CIFAR-10: 5);
    TRADES form ``CE(f(x), p_t) + lambda * KL(f(x) || f(x'))``; the attack is TRADES' KL attack
    (no label).  The student temperature stays 1.

KD self-teachers (Chen, Zhang, Liu, Chang, Wang, ICLR 2021, Eq. 1-2): on the adversarial x'
(attacked with the hard label)
    ``(1 - l1 - l2) CE(f(x'), y) + l1 KD_T(f(x'), f_r(x')) + l2 KD_T(f(x'), f_s(x'))``, T = 2,
    paper weights l1 = 0.5 (robust teacher), l2 = 0.25 (standard teacher);
    public-code weights l1 = 0.6, l2 = 0.1 (CE 0.3).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fast import teacher_forward
from .base import KDTerm, Rectifier, Target

__all__ = ["LTD", "KDSelfTeachers", "KD_WEIGHTS", "freeze"]

#: (robust teacher weight l1, standard teacher weight l2)
KD_WEIGHTS = {"paper": (0.5, 0.25), "code": (0.6, 0.1)}


def freeze(model: nn.Module) -> nn.Module:
    """Teachers are frozen and run in eval mode (BatchNorm running statistics)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LTD(Rectifier):
    name = "ltd"

    def __init__(self, teacher: nn.Module, num_classes: int, temperature: float = 5.0):
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

    def to(self, device):
        self.teacher.to(device)
        return self

    def extra_repr(self):
        return f"temperature={self.temperature}"


class KDSelfTeachers(Rectifier):
    name = "kd"

    def __init__(self, num_classes: int, *, robust_teacher: Optional[nn.Module] = None,
                 standard_teacher: Optional[nn.Module] = None, weights: str = "paper",
                 robust_weight: Optional[float] = None, standard_weight: Optional[float] = None,
                 temperature: float = 2.0):
        super().__init__(num_classes)
        if robust_teacher is None and standard_teacher is None:
            raise ValueError("KD needs at least one teacher (robust_teacher / standard_teacher)")
        if weights not in ("paper", "code", "custom"):
            raise ValueError(f"weights must be paper | code | custom, got {weights!r}")
        if weights == "custom":
            if robust_weight is None or standard_weight is None:
                raise ValueError("weights='custom' needs robust_weight and standard_weight")
            l1, l2 = float(robust_weight), float(standard_weight)
        else:
            l1, l2 = KD_WEIGHTS[weights]
        if robust_teacher is None:
            l1 = 0.0
        if standard_teacher is None:
            l2 = 0.0
        if l1 < 0 or l2 < 0 or l1 + l2 > 1:
            raise ValueError(f"teacher weights must be >= 0 and sum to <= 1, got {l1} + {l2}")
        self.robust_weight, self.standard_weight = l1, l2
        self.temperature = float(temperature)
        self.robust_teacher = freeze(robust_teacher) if robust_teacher is not None else None
        self.standard_teacher = freeze(standard_teacher) if standard_teacher is not None else None

    def targets(self, x, y, *, index=None) -> Target:
        self._check_labels(y)
        terms = []
        if self.robust_teacher is not None and self.robust_weight:
            terms.append(KDTerm(self.robust_weight, self.robust_teacher, self.temperature))
        if self.standard_teacher is not None and self.standard_weight:
            terms.append(KDTerm(self.standard_weight, self.standard_teacher, self.temperature))
        ce_weight = 1.0 - self.robust_weight - self.standard_weight
        return Target(y, for_attack=y, ce_weight=ce_weight, kd_terms=terms)

    def to(self, device):
        for t in (self.robust_teacher, self.standard_teacher):
            if t is not None:
                t.to(device)
        return self

    def extra_repr(self):
        return (f"robust_weight={self.robust_weight}, standard_weight={self.standard_weight}, "
                f"T={self.temperature}")
