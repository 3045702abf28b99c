"""The inner maximisation: PGD (Madry et al. 2018), TRADES' KL attack, FGSM, MI-FGSM.

``build_attack`` returns an attack object with the torchattacks interface the trainer and a
user's loop rely on: ``atk(images, labels)`` where labels may be class indices or a [B, C]
distribution (cross entropy accepts class probabilities -- so a rectified label drives the
attack, ADR Eq. 2), ``atk.set_model(m)`` and ``atk.set_model_training_mode(...)``.

Why not torchattacks itself: its metadata requires ``torchvision`` (a wheel tied to one torch
build, so installing it can replace the user's torch) and pins ``requests~=2.25.1``, which
downgrades ``requests``/``urllib3`` in the user's environment -- while the attacks the trainer
needs are a few lines of torch.  These follow torchattacks 3.5.1's update rules and random-number
draws operation for operation (same random start, same projection, same clamping), so a run gives
the same x' with either; ``tests/test_objectives.py`` checks that against torchattacks whenever it
is installed.  ``apgd`` is the one attack taken from torchattacks (the ``attacks`` extra; install
it as the README's "torchattacks" section says, without its dependencies).

BatchNorm during the attack (``bn_mode``): the official ADR and KD+SWA code craft x' with the
model in train mode (batch statistics, running statistics updated); TRADES' and most
evaluation code use eval mode.  Presets default to what each paper's code does.

Random start (``start``): ``default`` is the attack's own -- PGD: x + U(-eps, eps) clamped to
[0, 1]; TPGD: x + 0.001 N(0, 1) clamped.  ``uniform`` (x + s U[0, 1), not clamped: the ADR code's
``util/trades_attack.py``) and ``normal`` (x + s N(0, 1), not clamped: the TRADES code's
``trades_loss``) run the same iterations from that start (``s = start_std``, 0.001 in both codes).
``uniform_eps`` is x + U(-eps, eps) clamped for TPGD too (PGD's own start; the DM-Improves-AT
code's ``gowal21uncovering/utils/trades.py``).  ``bn_mode="train_frozen"``: BatchNorm in train
mode without updating its running statistics (that code's ``track_bn_stats(model, False)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._optional import require

__all__ = ["build_attack", "default_attack_name", "Attack", "PGD", "PGDL2", "TPGD", "FGSM", "MIFGSM",
           "START_KINDS"]

START_KINDS = ("default", "uniform", "normal", "uniform_eps")


def default_attack_name(objective: str) -> str:
    """PGD for PGD-AT; TPGD (the TRADES KL attack) for TRADES."""
    return "tpgd" if objective == "trades" else "pgd"


class Attack:
    """Model handling shared by the attacks: the mode the model is in while x' is crafted.

    By default the whole model is in eval mode during the attack (torchattacks' default);
    ``set_model_training_mode(model_training=True, batchnorm_training=..., dropout_training=...)``
    keeps it in train mode with BatchNorm / dropout layers individually switched to eval.  The
    caller's mode is restored afterwards.
    """

    def __init__(self, model: nn.Module):
        self.set_model(model)
        self._model_training = self._batchnorm_training = self._dropout_training = False

    def set_model(self, model: nn.Module) -> None:
        self.model = model

    def set_model_training_mode(self, model_training: bool = False, batchnorm_training: bool = False,
                                dropout_training: bool = False) -> None:
        self._model_training = model_training
        self._batchnorm_training = batchnorm_training
        self._dropout_training = dropout_training

    def _enter_mode(self) -> None:
        if not self._model_training:
            self.model.eval()
            return
        self.model.train()
        for m in self.model.modules():
            if not self._batchnorm_training and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
            if not self._dropout_training and isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
        was_training = self.model.training
        self._enter_mode()
        frozen = []
        if getattr(self, "_freeze_bn_stats", False):  # bn_mode train_frozen: batch statistics, no update
            frozen = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.track_running_stats]
            for m in frozen:
                m.track_running_stats = False
        try:
            return self.forward(images.clone().detach(), None if labels is None else labels.clone().detach())
        finally:
            for m in frozen:
                m.track_running_stats = True
            self.model.train(was_training)

    def forward(self, images, labels):  # pragma: no cover - abstract
        raise NotImplementedError

    def _grad(self, x: torch.Tensor, loss_fn) -> torch.Tensor:
        x.requires_grad_(True)
        loss = loss_fn(self.model(x))
        return torch.autograd.grad(loss, x)[0]

    def __repr__(self):
        keys = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "model" and not k.startswith("_"))
        return f"{type(self).__name__}({keys})"


def _project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.clamp(x + torch.clamp(x_adv - x, min=-eps, max=eps), min=0, max=1).detach()


def _small_start(images: torch.Tensor, kind: str, std: float, eps: float = 0.0) -> torch.Tensor:
    if kind == "uniform_eps":
        return torch.clamp(images + torch.empty_like(images).uniform_(-eps, eps), min=0, max=1).detach()
    noise = torch.rand_like(images) if kind == "uniform" else torch.randn_like(images)
    return (images + std * noise).detach()  # no clamp, as both public codes


def _check_start(start: str) -> None:
    if start not in START_KINDS:
        raise ValueError(f"start must be one of {list(START_KINDS)}, got {start!r}")


class PGD(Attack):
    """ℓ∞ PGD on the cross entropy: x' ← Π_{B∞(x,ε)∩[0,1]}(x' + α·sign ∇ CE), uniform random start
    (or the small ``start`` of the module docstring)."""

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, start: str = "default", start_std: float = 0.001):
        super().__init__(model)
        _check_start(start)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.start, self.start_std = start, float(start_std)

    def forward(self, images, labels):
        x_adv = images.clone().detach()
        if self.start != "default":
            x_adv = _small_start(images, self.start, self.start_std, self.eps)
        elif self.random_start:
            x_adv = torch.clamp(x_adv + torch.empty_like(x_adv).uniform_(-self.eps, self.eps), min=0, max=1).detach()
        for _ in range(self.steps):
            grad = self._grad(x_adv, lambda out: F.cross_entropy(out, labels))
            x_adv = _project_linf(x_adv.detach() + self.alpha * grad.sign(), images, self.eps)
        return x_adv


class PGDL2(Attack):
    """ℓ2 PGD: normalised-gradient steps, projection onto the ε-ball, random start in the ball."""

    def __init__(self, model, eps: float = 1.0, alpha: float = 0.2, steps: int = 10, random_start: bool = True,
                 eps_for_division: float = 1e-10):
        super().__init__(model)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.eps_for_division = eps_for_division

    def forward(self, images, labels):
        b = images.shape[0]
        x_adv = images.clone().detach()
        if self.random_start:
            delta = torch.empty_like(x_adv).normal_()
            norm = delta.view(b, -1).norm(p=2, dim=1).view(b, 1, 1, 1)
            radius = torch.zeros_like(norm).uniform_(0, 1)
            delta *= radius / norm * self.eps
            x_adv = torch.clamp(x_adv + delta, min=0, max=1).detach()
        for _ in range(self.steps):
            grad = self._grad(x_adv, lambda out: F.cross_entropy(out, labels))
            grad = grad / (grad.view(b, -1).norm(p=2, dim=1) + self.eps_for_division).view(b, 1, 1, 1)
            delta = x_adv.detach() + self.alpha * grad - images
            scale = torch.min(self.eps / delta.view(b, -1).norm(p=2, dim=1), torch.ones(b, device=delta.device,
                                                                                         dtype=delta.dtype))
            x_adv = torch.clamp(images + delta * scale.view(-1, 1, 1, 1), min=0, max=1).detach()
        return x_adv


class TPGD(Attack):
    """TRADES' inner maximisation (Zhang et al. 2019, Eq. 5): ℓ∞ sign steps on
    KL(f(x) ‖ f(x')) (summed over the batch), started at x + 0.001·N(0, I).  Labels are ignored."""

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 start: str = "default", start_std: float = 0.001):
        super().__init__(model)
        _check_start(start)
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.start, self.start_std = start, float(start_std)

    def forward(self, images, labels=None):
        # The clean logits are computed once, before the iterations (train-mode BatchNorm updates
        # its running statistics with them, as in the ADR code's attack); no random draw happens
        # in between, so the order relative to the start's noise does not change x'.
        p_clean = F.softmax(self.model(images).detach(), dim=1)
        if self.start != "default":
            x_adv = _small_start(images, self.start, self.start_std, self.eps)
        else:
            x_adv = torch.clamp(images + 0.001 * torch.randn_like(images), min=0, max=1).detach()
        for _ in range(self.steps):
            grad = self._grad(x_adv, lambda out: F.kl_div(F.log_softmax(out, dim=1), p_clean, reduction="sum"))
            x_adv = _project_linf(x_adv.detach() + self.alpha * grad.sign(), images, self.eps)
        return x_adv


class FGSM(Attack):
    """One ℓ∞ step of size ε on the cross entropy (Goodfellow et al. 2015)."""

    def __init__(self, model, eps: float = 8 / 255):
        super().__init__(model)
        self.eps = eps

    def forward(self, images, labels):
        grad = self._grad(images, lambda out: F.cross_entropy(out, labels))
        return torch.clamp(images.detach() + self.eps * grad.sign(), min=0, max=1).detach()


class MIFGSM(Attack):
    """Momentum iterative FGSM (Dong et al. 2018, Eq. 6-7): g ← μ·g + ∇/‖∇‖₁ (mean-abs normalised)."""

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, decay: float = 1.0):
        super().__init__(model)
        self.eps, self.alpha, self.steps, self.decay = eps, alpha, steps, decay

    def forward(self, images, labels):
        momentum = torch.zeros_like(images)
        x_adv = images.clone().detach()
        for _ in range(self.steps):
            grad = self._grad(x_adv, lambda out: F.cross_entropy(out, labels))
            grad = grad / torch.mean(torch.abs(grad), dim=tuple(range(1, grad.dim())), keepdim=True)
            momentum = grad + momentum * self.decay
            x_adv = _project_linf(x_adv.detach() + self.alpha * momentum.sign(), images, self.eps)
        return x_adv


def build_attack(name: str, model: nn.Module, *, eps: float, alpha: float, steps: int, norm: str = "Linf",
                 random_start: bool = True, bn_mode: str = "train", start: str = "default",
                 start_std: float = 0.001):
    name = name.lower()
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if bn_mode not in ("train", "eval", "train_frozen"):
        raise ValueError(f"bn_mode must be 'train', 'eval' or 'train_frozen', got {bn_mode!r}")
    _check_start(start)
    if start != "default" and (name not in ("pgd", "tpgd") or norm != "Linf" or not random_start):
        raise ValueError(f"start={start!r} is implemented for Linf PGD and TPGD with a random start, "
                         f"not {name} {norm} (random_start={random_start})")
    if name == "pgd":
        atk = (PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, start=start,
                   start_std=start_std) if norm == "Linf" else
               PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start))
    elif name == "tpgd":
        if norm != "Linf":
            raise ValueError("TPGD (the TRADES attack) is Linf only")
        atk = TPGD(model, eps=eps, alpha=alpha, steps=steps, start=start, start_std=start_std)
    elif name == "apgd":
        torchattacks = require("torchattacks", "attacks", "attack.name=apgd")
        atk = torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, loss="ce")
    elif name == "fgsm":
        if norm != "Linf":
            raise ValueError("FGSM is Linf only")
        atk = FGSM(model, eps=eps)
    elif name == "mifgsm":
        if norm != "Linf":
            raise ValueError("MI-FGSM is Linf only")
        atk = MIFGSM(model, eps=eps, alpha=alpha, steps=steps)
    else:
        raise ValueError(f"unknown attack {name!r}; choose pgd, tpgd, apgd, fgsm or mifgsm")
    train = bn_mode in ("train", "train_frozen")
    atk._freeze_bn_stats = bn_mode == "train_frozen"
    # dropout stays off while attacking, as in the reference implementations
    atk.set_model_training_mode(model_training=train, batchnorm_training=train, dropout_training=False)
    return atk
