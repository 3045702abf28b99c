"""PGD-AT and TRADES, written once and soft-target aware.

PGD-AT (Madry et al. 2018):  min_theta E max_{||d|| <= eps} CE(f(x + d), t)
TRADES (Zhang et al. 2019):  CE(f(x), t) + beta * KL(softmax f(x) || softmax f(x'))

``t`` is whatever the rectifier gives (one-hot for the baselines).  Each objective has two
calls: ``adversarial(model, x, target)`` crafts x' (torchattacks) and
``loss(model, x, x_adv, target)`` returns ``(loss, logits_adv)`` -- separate so AWP can evaluate
the same loss at perturbed weights for the same x'.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .losses import trades_kl
from .rectifiers.base import Target

__all__ = ["PGDAT", "TRADES", "Natural", "build_objective"]


class PGDAT:
    name = "pgd_at"

    def __init__(self, attack):
        self.attack = attack

    def adversarial(self, model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
        return self.attack(x, target.for_attack)  # rectified label in the attack too (ADR Eq. 2)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, target: Target):
        logits_adv = model(x_adv)
        return target.loss(logits_adv, x_adv, logits_adv=logits_adv), logits_adv


class TRADES:
    """TRADES.  BatchNorm sees natural then adversarial data in the same step, which LTD
    requires (LTD Sec. 4: one-kind-only runs failed to converge)."""
    name = "trades"

    def __init__(self, attack, beta: float = 6.0):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.attack = attack
        self.beta = float(beta)

    def adversarial(self, model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
        # TPGD maximises KL(f(x) || f(x')) and ignores labels; other attacks get the labels
        return self.attack(x, target.for_attack)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, target: Target):
        logits_nat = model(x)
        logits_adv = model(x_adv)
        natural = target.loss(logits_nat, x, logits_nat=logits_nat, logits_adv=logits_adv)
        return natural + self.beta * trades_kl(logits_nat, logits_adv), logits_adv


class Natural:
    """Standard (non-adversarial) training: the standard self-teacher of KD+SWA and the natural
    teacher of LTD are trained with this."""
    name = "natural"

    def __init__(self, attack=None):
        self.attack = attack

    def adversarial(self, model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
        return x

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, target: Target):
        logits = model(x)
        return target.loss(logits, x, logits_nat=logits, logits_adv=logits), logits


def build_objective(name: str, attack, beta: float = 6.0):
    if name == "natural":
        return Natural(attack)
    if name == "pgd_at":
        return PGDAT(attack)
    if name == "trades":
        return TRADES(attack, beta=beta)
    raise ValueError(f"unknown objective {name!r}; choose pgd_at, trades or natural")
