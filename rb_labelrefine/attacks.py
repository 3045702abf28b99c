"""The inner maximisation, done by torchattacks.

``build_attack`` returns a torchattacks ``Attack``: ``atk(images, labels)`` where labels may be
class indices or a [B, C] distribution (torchattacks' PGD uses ``nn.CrossEntropyLoss``, which
accepts class probabilities -- so a rectified label drives the attack, ADR Eq. 2).

BatchNorm during the attack (``bn_mode``): the official ADR and KD+SWA code craft x' with the
model in train mode (batch statistics, running statistics updated); TRADES' and most
evaluation code use eval mode.  Presets default to what each paper's code does.

Random start (``start``): ``default`` is the attack's own -- PGD: x + U(-eps, eps) clamped to
[0, 1]; TPGD: x + 0.001 N(0, 1) clamped.  ``uniform`` (x + s U[0, 1), not clamped: the ADR code's
``util/trades_attack.py``) and ``normal`` (x + s N(0, 1), not clamped: the TRADES code's
``trades_loss``) use :class:`StartPGD` / :class:`StartTPGD`, which run the same iterations as
torchattacks' PGD / TPGD from that start (``s = start_std``, 0.001 in both codes).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

__all__ = ["build_attack", "default_attack_name", "StartPGD", "StartTPGD", "START_KINDS"]

START_KINDS = ("default", "uniform", "normal")


def _small_start(images: torch.Tensor, kind: str, std: float) -> torch.Tensor:
    noise = torch.rand_like(images) if kind == "uniform" else torch.randn_like(images)
    return (images + std * noise).detach()  # no clamp, as both public codes


class StartPGD(torchattacks.PGD):
    """torchattacks' Linf PGD (cross entropy, sign step, projection) from a small random start."""

    def __init__(self, model, eps, alpha, steps, start: str, start_std: float):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        self.start, self.start_std = start, float(start_std)

    def forward(self, images, labels):
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        loss = nn.CrossEntropyLoss()
        adv_images = _small_start(images, self.start, self.start_std)
        for _ in range(self.steps):
            adv_images.requires_grad = True
            cost = loss(self.get_logits(adv_images), labels)
            grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
            adv_images = adv_images.detach() + self.alpha * grad.sign()
            delta = torch.clamp(adv_images - images, min=-self.eps, max=self.eps)
            adv_images = torch.clamp(images + delta, min=0, max=1).detach()
        return adv_images


class StartTPGD(torchattacks.TPGD):
    """torchattacks' TPGD (the TRADES KL attack; labels ignored) from a small random start.
    The clean logits are computed once, before the iterations (train-mode BatchNorm updates its
    running statistics with them, as in the ADR code's attack)."""

    def __init__(self, model, eps, alpha, steps, start: str, start_std: float):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps)
        self.start, self.start_std = start, float(start_std)

    def forward(self, images, labels=None):
        images = images.clone().detach().to(self.device)
        adv_images = _small_start(images, self.start, self.start_std)
        logit_ori = self.get_logits(images).detach()
        loss = nn.KLDivLoss(reduction="sum")
        for _ in range(self.steps):
            adv_images.requires_grad = True
            cost = loss(F.log_softmax(self.get_logits(adv_images), dim=1), F.softmax(logit_ori, dim=1))
            grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
            adv_images = adv_images.detach() + self.alpha * grad.sign()
            delta = torch.clamp(adv_images - images, min=-self.eps, max=self.eps)
            adv_images = torch.clamp(images + delta, min=0, max=1).detach()
        return adv_images


def default_attack_name(objective: str) -> str:
    """PGD for PGD-AT; TPGD (the TRADES KL attack) for TRADES."""
    return "tpgd" if objective == "trades" else "pgd"


def build_attack(name: str, model: nn.Module, *, eps: float, alpha: float, steps: int, norm: str = "Linf",
                 random_start: bool = True, bn_mode: str = "train", start: str = "default",
                 start_std: float = 0.001) -> torchattacks.Attack:
    name = name.lower()
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if start not in START_KINDS:
        raise ValueError(f"start must be one of {list(START_KINDS)}, got {start!r}")
    if start != "default":
        if name not in ("pgd", "tpgd") or norm != "Linf" or not random_start:
            raise ValueError(f"start={start!r} is implemented for Linf PGD and TPGD with a random start, "
                             f"not {name} {norm} (random_start={random_start})")
        cls = StartPGD if name == "pgd" else StartTPGD
        atk = cls(model, eps=eps, alpha=alpha, steps=steps, start=start, start_std=start_std)
    elif name == "pgd":
        atk = (torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
               if norm == "Linf" else
               torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start))
    elif name == "tpgd":
        if norm != "Linf":
            raise ValueError("TPGD (the TRADES attack) is Linf only in torchattacks")
        atk = torchattacks.TPGD(model, eps=eps, alpha=alpha, steps=steps)
    elif name == "apgd":
        atk = torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, loss="ce")
    elif name == "fgsm":
        if norm != "Linf":
            raise ValueError("FGSM is Linf only")
        atk = torchattacks.FGSM(model, eps=eps)
    elif name == "mifgsm":
        if norm != "Linf":
            raise ValueError("MI-FGSM is Linf only")
        atk = torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=steps)
    else:
        raise ValueError(f"unknown attack {name!r}; choose pgd, tpgd, apgd, fgsm or mifgsm")
    if bn_mode not in ("train", "eval"):
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    train = bn_mode == "train"
    # dropout stays off while attacking, as in the reference implementations
    atk.set_model_training_mode(model_training=train, batchnorm_training=train, dropout_training=False)
    return atk
