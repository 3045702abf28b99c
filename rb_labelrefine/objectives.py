"""PGD-AT and TRADES, written once and soft-target aware.

PGD-AT (Madry et al. 2018):  min_theta E max_{||d|| <= eps} CE(f(x + d), t)
TRADES (Zhang et al. 2019):  CE(f(x), t) + beta * KL(softmax f(x) || softmax f(x'))

``t`` is whatever the rectifier gives (one-hot for the baselines).  Each objective has two
calls: ``adversarial(model, x, target)`` crafts x' with its attack acting on ``model`` (the model
passed in, whatever model the attack was built with) and ``loss(model, x, x_adv, target)`` returns
the pair ``(loss, logits_adv)`` -- ``loss, logits = obj.loss(...)``; ``loss.backward()`` on the
first -- separate so AWP can evaluate the same loss at perturbed weights for the same x'.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .losses import trades_kl
from .rectifiers.base import Target

__all__ = ["PGDAT", "TRADES", "Natural", "build_objective"]


def _attack_on(attack, model: nn.Module, x: torch.Tensor, labels) -> torch.Tensor:
    """``attack(x, labels)`` with the attack acting on ``model``.

    An attack with a ``model`` attribute (this package's, torchattacks') is pointed at ``model``
    for this call and back at its own model afterwards, so the caller's model is the one attacked
    and the attack object is left as it was; a plain callable is called as it is.
    """
    own = getattr(attack, "model", None)
    if own is None or own is model:
        return attack(x, labels)
    set_model = getattr(attack, "set_model", None)
    if set_model is None:
        def set_model(m):
            attack.model = m
    set_model(model)
    try:
        return attack(x, labels)
    finally:
        set_model(own)


class PGDAT:
    name = "pgd_at"

    def __init__(self, attack):
        self.attack = attack

    def adversarial(self, model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
        return _attack_on(self.attack, model, x, target.for_attack)  # rectified label in the attack too (ADR Eq. 2)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, target: Target):
        logits_adv = model(x_adv)
        return target.loss(logits_adv, x_adv, logits_adv=logits_adv), logits_adv


class TRADES:
    """TRADES.  BatchNorm sees natural then adversarial data in the same step, which LTD
    requires (LTD Sec. 4: one-kind-only runs failed to converge).

    ``forward`` chooses the training-loss passes; the loss is the same function of the logits,
    the BatchNorm batches (and so the logits and running statistics) differ:

    * ``separate``: f(x), then f(x') -- two batches of B;
    * ``concat``: f(cat[x, x']) split in two -- one batch of 2B (the ADR code, ``advTrainer.py``);
    * ``three_pass``: f(x) for the CE term, f(x') and f(x) again for the KL term (the TRADES
      code's ``trades_loss``: ``criterion_kl(log_softmax(model(x_adv)), softmax(model(x_natural)))``
      after ``logits = model(x_natural)``) -- the running statistics are updated three times;
    * ``three_pass_adv_first``: f(x') and f(x) for the KL term, then f(x) for the CE term (the
      TRADES-AWP code's ``train_trades_cifar.py``).

    Forward passes per training step (after the attack): the default ``separate`` makes **two**;
    the TRADES code (yaodongyu/TRADES ``trades.py``: ``logits = model(x_natural)``, then
    ``criterion_kl(F.log_softmax(model(x_adv)), F.softmax(model(x_natural)))``) makes **three** --
    ``TRADES(attack, beta=6, forward="three_pass")``, which the ``*-trades`` presets use.  The
    loss values are equal in eval mode; in train mode they differ only through BatchNorm.

    ``loss(model, x, x_adv, target)`` returns ``(loss, logits_adv)``:
    ``loss, logits = obj.loss(model, x, x_adv, target)``.
    """
    name = "trades"
    FORWARDS = ("separate", "concat", "three_pass", "three_pass_adv_first")

    def __init__(self, attack, beta: float = 6.0, forward: str = "separate"):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if forward not in self.FORWARDS:
            raise ValueError(f"forward must be one of {list(self.FORWARDS)}, got {forward!r}")
        self.attack = attack
        self.beta = float(beta)
        self.forward = forward

    def adversarial(self, model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
        # TPGD maximises KL(f(x) || f(x')) and ignores labels; other attacks get the labels
        return _attack_on(self.attack, model, x, target.for_attack)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, target: Target):
        # three_pass*: the KL's natural side is a pass of its own (equal logits in train mode, as
        # BatchNorm uses batch statistics; its running statistics see x a second time)
        if self.forward == "concat":
            logits = model(torch.cat([x, x_adv]))
            logits_nat, logits_adv = logits[:x.shape[0]], logits[x.shape[0]:]
            kl_nat = logits_nat
        elif self.forward == "three_pass_adv_first":
            logits_adv = model(x_adv)
            kl_nat = model(x)
            logits_nat = model(x)
        else:
            logits_nat = model(x)
            logits_adv = model(x_adv)
            kl_nat = model(x) if self.forward == "three_pass" else logits_nat
        natural = target.loss(logits_nat, x, logits_nat=logits_nat, logits_adv=logits_adv)
        return natural + self.beta * trades_kl(kl_nat, logits_adv), logits_adv


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


def build_objective(name: str, attack, beta: float = 6.0, forward: str = "separate"):
    if forward != "separate" and name != "trades":
        raise ValueError(f"forward={forward!r} is a form of the TRADES loss, not of {name!r}")
    if name == "natural":
        return Natural(attack)
    if name == "pgd_at":
        return PGDAT(attack)
    if name == "trades":
        return TRADES(attack, beta=beta, forward=forward)
    raise ValueError(f"unknown objective {name!r}; choose pgd_at, trades or natural")
