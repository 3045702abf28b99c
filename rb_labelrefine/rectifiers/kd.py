"""KD self-teachers (Chen, Zhang, Liu, Chang, Wang, "Robust Overfitting may be mitigated by
properly learned smoothening", ICLR 2021, Eq. 1-2), the KD half of KD+SWA.

On the adversarial x' (attacked with the hard label)
    ``(1 - l1 - l2) CE(f(x'), y) + l1 KD_T(f(x'), f_r(x')) + l2 KD_T(f(x'), f_s(x'))``, T = 2,
paper weights l1 = 0.5 (robust teacher), l2 = 0.25 (standard teacher);
public-code weights l1 = 0.6, l2 = 0.1 (CE 0.3).  SWA is the ``swa:`` section of the config.

Config: ``method: {name: kd, robust_teacher: RUN, standard_teacher: RUN, kd_weights: paper,
temperature: 2.0}``; ``kd_weights: custom`` uses ``robust_weight`` / ``standard_weight``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .base import KDTerm, Rectifier, Target
from .frozen import check_teacher_path, freeze
from .registry import BuildContext, MethodSettings, register_method

__all__ = ["KDSelfTeachers", "KDSettings", "KD_WEIGHTS"]

#: (robust teacher weight l1, standard teacher weight l2)
KD_WEIGHTS = {"paper": (0.5, 0.25), "code": (0.6, 0.1)}
TEMPERATURE = 2.0  # T of Eq. 1-2


class KDSelfTeachers(Rectifier):
    name = "kd"

    def __init__(self, num_classes: int, *, robust_teacher: Optional[nn.Module] = None,
                 standard_teacher: Optional[nn.Module] = None, weights: str = "paper",
                 robust_weight: Optional[float] = None, standard_weight: Optional[float] = None,
                 temperature: float = TEMPERATURE):
        super().__init__(num_classes)
        if robust_teacher is None and standard_teacher is None:
            raise ValueError("KD needs at least one teacher (robust_teacher / standard_teacher)")
        l1, l2 = resolve_weights(weights, robust_weight, standard_weight)
        if robust_teacher is None:
            l1 = 0.0
        if standard_teacher is None:
            l2 = 0.0
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

    def modules(self) -> list:
        return [t for t in (self.robust_teacher, self.standard_teacher) if t is not None]

    def to(self, device):
        for t in (self.robust_teacher, self.standard_teacher):
            if t is not None:
                t.to(device)
        return self

    def extra_repr(self):
        return (f"robust_weight={self.robust_weight}, standard_weight={self.standard_weight}, "
                f"T={self.temperature}")


def resolve_weights(weights: str, robust_weight: Optional[float], standard_weight: Optional[float]):
    """``(l1, l2)`` for ``paper`` / ``code`` / ``custom`` (the custom pair as given)."""
    if weights not in ("paper", "code", "custom"):
        raise ValueError(f"weights must be paper | code | custom, got {weights!r}")
    if weights == "custom":
        if robust_weight is None or standard_weight is None:
            raise ValueError("weights='custom' needs robust_weight and standard_weight")
        l1, l2 = float(robust_weight), float(standard_weight)
    else:
        l1, l2 = KD_WEIGHTS[weights]
    if l1 < 0 or l2 < 0 or l1 + l2 > 1:
        raise ValueError(f"teacher weights must be >= 0 and sum to <= 1, got {l1} + {l2}")
    return l1, l2


@dataclass
class KDSettings(MethodSettings):
    standard_teacher: Optional[str] = None  # naturally trained run directory or weights file (f_s)
    robust_teacher: Optional[str] = None    # PGD-AT run directory or weights file (f_r)
    kd_weights: str = "paper"               # paper (0.5 / 0.25) | code (0.6 / 0.1) | custom
    robust_weight: float = KD_WEIGHTS["paper"][0]    # l1, used with kd_weights: custom
    standard_weight: float = KD_WEIGHTS["paper"][1]  # l2, used with kd_weights: custom
    temperature: float = TEMPERATURE

    def validate(self) -> None:
        self._choice("kd_weights", ("paper", "code", "custom"))
        self._unit("robust_weight", "standard_weight")
        self._check(self.robust_weight + self.standard_weight <= 1.0, "robust_weight",
                    "robust_weight + standard_weight must be <= 1 (the CE term takes the rest)")
        self._positive("temperature")
        check_teacher_path(self.robust_teacher, "method.robust_teacher")
        check_teacher_path(self.standard_teacher, "method.standard_teacher")

    def check_runnable(self) -> None:
        self._check(self.standard_teacher is not None or self.robust_teacher is not None, "robust_teacher",
                    "KD needs at least one teacher: --set method.robust_teacher=... / method.standard_teacher=... "
                    "(train them with the '*-pgdat' and '*-natural' presets)")

    def card_params(self) -> dict:
        l1, l2 = resolve_weights(self.kd_weights, self.robust_weight, self.standard_weight)
        return {"kd_weights": self.kd_weights, "robust_weight": l1, "standard_weight": l2,
                "temperature": self.temperature, "robust_teacher": self.robust_teacher,
                "standard_teacher": self.standard_teacher}


_BIBTEX = """@inproceedings{chen2021robust,
  title     = {Robust Overfitting may be mitigated by properly learned smoothening},
  author    = {Chen, Tianlong and Zhang, Zhenyu and Liu, Sijia and Chang, Shiyu and Wang, Zhangyang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}"""


@register_method(
    "kd", settings=KDSettings, label="KD-SWA", bibtex=_BIBTEX,
    title="Robust Overfitting may be mitigated by properly learned smoothening",
    summary=("Learned logit smoothening by self-distillation from a robust and a standard self-teacher of the "
             "same architecture (tempered KD terms next to the cross-entropy), combined with stochastic weight "
             "averaging (Chen et al. 2021, Eq. 1-2)."))
def build_kd(s: KDSettings, ctx: BuildContext) -> KDSelfTeachers:
    robust = ctx.load_teacher(s.robust_teacher, "method.robust_teacher") if s.robust_teacher else None
    standard = ctx.load_teacher(s.standard_teacher, "method.standard_teacher") if s.standard_teacher else None
    return KDSelfTeachers(ctx.num_classes, robust_teacher=robust, standard_teacher=standard, weights=s.kd_weights,
                          robust_weight=s.robust_weight, standard_weight=s.standard_weight,
                          temperature=s.temperature)
