"""The inner maximisation, done by torchattacks.

``build_attack`` returns a torchattacks ``Attack``: ``atk(images, labels)`` where labels may be
class indices or a [B, C] distribution (torchattacks' PGD uses ``nn.CrossEntropyLoss``, which
accepts class probabilities -- so a rectified label drives the attack, ADR Eq. 2).

BatchNorm during the attack (``bn_mode``): the official ADR and KD+SWA code craft x' with the
model in train mode (batch statistics, running statistics updated); TRADES' and most
evaluation code use eval mode.  Presets default to what each paper's code does.
"""
from __future__ import annotations

import torch.nn as nn
import torchattacks

__all__ = ["build_attack", "default_attack_name"]


def default_attack_name(objective: str) -> str:
    """PGD for PGD-AT; TPGD (the TRADES KL attack) for TRADES."""
    return "tpgd" if objective == "trades" else "pgd"


def build_attack(name: str, model: nn.Module, *, eps: float, alpha: float, steps: int, norm: str = "Linf",
                 random_start: bool = True, bn_mode: str = "train") -> torchattacks.Attack:
    name = name.lower()
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if name == "pgd":
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
