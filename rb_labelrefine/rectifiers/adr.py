"""ADR -- Annealing Self-Distillation Rectification (Wu, Wang, Chen, ICLR 2024).

Per step e of E (paper Alg. 1):

* the teacher theta_t is an EMA of the student (Sec. 4.2): ``theta_t <- gamma theta_t + (1-gamma) theta_s``
* the temperature tau_e follows a cosine schedule from tau_high down to tau_low, the
  interpolation lambda_e a cosine schedule from lambda_low up to lambda_high;
* ``P_t = softmax(f_theta_t(x) / tau_e)`` on the clean batch                       (Eq. 3)
* ``lambda_i = clip_[0,1](lambda_e - (P_t[psi_i] - P_t[y_i]))``, psi_i = argmax P_t  (Eq. 4)
* ``P = lambda_i P_t + (1 - lambda_i) onehot(y)``                                   (Eq. 5)

P replaces the hard label in the attack and in the loss (PGD-AT, Eq. 1-2) or in the natural
term (TRADES).  The official code indexes the schedules by global step and its EMA teacher is
timm's ModelEmaV2 (eval mode, parameters and buffers averaged) -- both followed here.

Config: ``method: {name: adr, ema_decay: 0.995, tau_high: 2.5, tau_low: 2.0, lambda_low: 0.7,
lambda_high: 0.95}`` (the defaults: the paper's CIFAR-10 values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..averaging import EMA
from ..errors import ConfigError
from ..fast import teacher_forward
from .adr_auto import AutoTauLambda, budget_points, fit_every
from .base import Rectifier, Target
from .registry import BuildContext, MethodSettings, register_method

__all__ = ["ADR", "ADRSettings", "rectify", "cosine_schedule", "ADR_PRESETS"]

#: the paper's hyper-parameters (Sec. 5.1): (lambda_low, lambda_high, tau_high, tau_low)
ADR_PRESETS = {
    "cifar10": dict(lambda_low=0.7, lambda_high=0.95, tau_high=2.5, tau_low=2.0),
    "cifar100": dict(lambda_low=0.7, lambda_high=0.95, tau_high=1.5, tau_low=1.0),
    "tiny_imagenet": dict(lambda_low=0.5, lambda_high=0.9, tau_high=2.0, tau_low=1.5),
}
_C10 = ADR_PRESETS["cifar10"]
EMA_DECAY = 0.995  # Sec. 5.1


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` (step 0) to ``end`` (step ``total_steps``)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rectify(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
            interpolation: float) -> torch.Tensor:
    """ADR's rectified distribution (Eq. 3-5) from teacher logits [B, C] and labels [B]."""
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be [B, C], got shape {tuple(teacher_logits.shape)}")
    if labels.shape != teacher_logits.shape[:1]:
        raise ValueError(f"labels must be [B] = [{teacher_logits.shape[0]}], got shape {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.long()
    pt = F.softmax(teacher_logits.detach().float() / temperature, dim=1)             # Eq. 3
    p_pred = pt.max(dim=1).values                                                      # P_t[psi_i]
    p_true = pt.gather(1, labels[:, None]).squeeze(1)                                  # P_t[y_i]
    lam = (interpolation - (p_pred - p_true)).clamp(0.0, 1.0)[:, None]               # Eq. 4
    onehot = F.one_hot(labels, pt.shape[1]).to(pt.dtype)
    return lam * pt + (1.0 - lam) * onehot                                             # Eq. 5


class ADR(Rectifier):
    """ADR rectifier.  ``total_steps`` = optimizer steps of the whole run (the schedules' length).

    ``teacher``: an existing :class:`~rb_labelrefine.averaging.EMA` to use as the teacher (e.g.
    the WA model when its decay is the same); by default ADR keeps its own EMA of ``model``.
    ``auto``: fit tau and lambda on validation adversarial examples every ``auto.every`` epochs
    instead of the cosine schedules (``method.schedule: auto``, :mod:`~rb_labelrefine.rectifiers.adr_auto`).
    """
    name = "adr"

    def __init__(self, model: nn.Module, num_classes: int, total_steps: int, *, ema_decay: float = EMA_DECAY,
                 tau_high: float = _C10["tau_high"], tau_low: float = _C10["tau_low"],
                 lambda_low: float = _C10["lambda_low"], lambda_high: float = _C10["lambda_high"],
                 teacher: Optional[EMA] = None, auto: Optional[AutoTauLambda] = None):
        super().__init__(num_classes)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        for name, v in (("lambda_low", lambda_low), ("lambda_high", lambda_high)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if tau_high <= 0 or tau_low <= 0:
            raise ValueError("temperatures must be > 0")
        self.total_steps = int(total_steps)
        self.tau_high, self.tau_low = float(tau_high), float(tau_low)
        self.lambda_low, self.lambda_high = float(lambda_low), float(lambda_high)
        self.owns_teacher = teacher is None
        self.teacher = teacher if teacher is not None else EMA(model, decay=ema_decay)
        self.auto = auto

    @classmethod
    def for_dataset(cls, dataset: str, model: nn.Module, num_classes: int, total_steps: int, **kw) -> "ADR":
        """The paper's (lambda, tau) for ``cifar10`` / ``cifar100`` / ``tiny_imagenet``."""
        if dataset not in ADR_PRESETS:
            raise ValueError(f"no ADR preset for {dataset!r}; known: {sorted(ADR_PRESETS)}")
        return cls(model, num_classes, total_steps, **{**ADR_PRESETS[dataset], **kw})

    @classmethod
    def cifar10(cls, model, total_steps, **kw):
        return cls.for_dataset("cifar10", model, 10, total_steps, **kw)

    @classmethod
    def cifar100(cls, model, total_steps, **kw):
        return cls.for_dataset("cifar100", model, 100, total_steps, **kw)

    # schedules indexed by the global step, as in the official code
    @property
    def temperature(self) -> float:
        if self.auto is not None:
            return self.auto.tau
        return cosine_schedule(self.step, self.total_steps, self.tau_high, self.tau_low)

    @property
    def interpolation(self) -> float:
        if self.auto is not None:
            return self.auto.lam
        return cosine_schedule(self.step, self.total_steps, self.lambda_low, self.lambda_high)

    @property
    def validation_points(self) -> int:
        return self.auto.points if self.auto is not None else 0

    def fit_validation(self, x, y, epoch: int) -> dict:
        """End of epoch: refit tau/lambda (auto, on fit epochs) and report the values the next steps use."""
        rec = {}
        if self.auto is not None:
            rec = self.auto.end_of_epoch(self.teacher.module, x, y, epoch)
            rec.pop("epoch")
        rec.update(adr_tau=self.temperature, adr_lambda=self.interpolation)
        return rec

    def targets(self, x, y, *, index=None) -> Target:
        self._check_labels(y)
        t_logits = teacher_forward(self.teacher, x)  # eval mode (ModelEmaV2 semantics), inference mode
        dist = rectify(t_logits, y, self.temperature, self.interpolation)
        return Target(y, dist)  # P is used by the attack and by the loss

    def after_step(self, model: nn.Module) -> None:
        if self.owns_teacher:
            self.teacher.update(model)
        super().after_step(model)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self.owns_teacher:
            sd["teacher"] = self.teacher.state_dict()
        if self.auto is not None:
            sd["auto"] = self.auto.state_dict()
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.owns_teacher:
            self.teacher.load_state_dict(state["teacher"])
        if self.auto is not None:
            self.auto.load_state_dict(state["auto"])

    def modules(self) -> list:
        return [self.teacher]  # the EMA teacher (the WA EMA itself when shared)

    def effective_decays(self) -> dict:
        return {"adr_teacher": self.teacher.decay}   # gamma (Sec. 4.2), rescaled to this run's steps per epoch

    def to(self, device):
        self.teacher.to(device)
        return self

    def extra_repr(self):
        if self.auto is not None:
            return f"{self.auto!r}, ema_decay={self.teacher.decay}"
        return (f"tau={self.tau_high}->{self.tau_low}, lambda={self.lambda_low}->{self.lambda_high}, "
                f"ema_decay={self.teacher.decay}, total_steps={self.total_steps}")


@dataclass
class ADRSettings(MethodSettings):
    ema_decay: float = EMA_DECAY                # gamma of the EMA teacher, per step (Sec. 4.2)
    tau_high: float = _C10["tau_high"]          # temperature at the first step (Eq. 3)
    tau_low: float = _C10["tau_low"]            # ... at the last step
    lambda_low: float = _C10["lambda_low"]      # interpolation at the first step (Eq. 4)
    lambda_high: float = _C10["lambda_high"]    # ... at the last step
    # cosine: the schedules above (the paper); auto: tau and lambda fitted every auto_every epochs on
    # validation adversarial examples of the teacher (adr_auto.py), starting from tau_high, lambda_low
    schedule: str = "cosine"
    auto_points: Optional[int] = None   # validation images of the auto fit; None: ~auto_share of an epoch (100..1000)
    auto_share: float = 0.02            # the fits' budget, a share of the training compute (auto_points, auto_every)
    auto_every: Optional[int] = None    # epochs between fits (held in between); None: the fewest within auto_share

    def validate(self) -> None:
        self._unit("lambda_low", "lambda_high")
        self._positive("tau_high", "tau_low")
        self._check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        self._choice("schedule", ("cosine", "auto"))
        self._check(self.auto_points is None or self.auto_points >= 1, "auto_points",
                    f"must be >= 1, got {self.auto_points}")
        self._check(0.0 < self.auto_share <= 1.0, "auto_share", f"must be in (0, 1], got {self.auto_share}")
        self._check(self.auto_every is None or self.auto_every >= 1, "auto_every",
                    f"must be >= 1 (epochs between fits), got {self.auto_every}")

    def check_config(self, cfg) -> None:
        if self.schedule == "auto" and cfg.data.val_fraction == 0:
            raise ConfigError("data.val_fraction", "method.schedule=auto fits ADR's tau/lambda on the validation "
                              "split: set data.val_fraction > 0")


_BIBTEX = """@inproceedings{wu2024annealing,
  title     = {Annealing Self-Distillation Rectification Improves Adversarial Training},
  author    = {Wu, Yu-Yu and Wang, Hung-Jui and Chen, Shang-Tse},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""


@register_method(
    "adr", settings=ADRSettings, label="ADR", bibtex=_BIBTEX,
    title="Annealing Self-Distillation Rectification Improves Adversarial Training",
    summary=("Annealing Self-Distillation Rectification: the hard label is replaced by an interpolation of the "
             "one-hot label with the temperature-scaled prediction of an EMA teacher on the clean image, with the "
             "temperature annealed down and the interpolation factor annealed up (Wu et al. 2024, Eq. 3-5). The "
             "rectified label is used by both the attack and the training loss."))
def build_adr(s: ADRSettings, ctx: BuildContext) -> ADR:
    decay = ctx.decay_scale(s.ema_decay)
    teacher = None
    if ctx.shared_ema is not None and abs(ctx.shared_ema.decay - decay) < 1e-12 \
            and not getattr(ctx.shared_ema, "dynamic", False):   # (wa.form gowal is not ADR's teacher)
        teacher = ctx.shared_ema  # WA with the same decay *is* ADR's teacher (one EMA, not two)
    return ADR(ctx.model, ctx.num_classes, ctx.total_steps, ema_decay=decay, tau_high=s.tau_high,
               tau_low=s.tau_low, lambda_low=s.lambda_low, lambda_high=s.lambda_high, teacher=teacher,
               auto=_auto_fit(s, ctx))


def _auto_fit(s: ADRSettings, ctx: BuildContext) -> Optional[AutoTauLambda]:
    if s.schedule != "auto":
        return None
    cfg = ctx.config
    if cfg is None:
        raise ValueError("ADR schedule 'auto' needs the run config in BuildContext.config (attack, validation steps)")
    a = cfg.attack
    per_epoch = auto_samples_per_epoch(ctx)
    points = s.auto_points
    if points is None:  # ~auto_share of an epoch, at least the 100 points a useful fit needs
        points = budget_points(per_epoch, a.steps, cfg.eval.val_attack_steps, share=s.auto_share)
    every = s.auto_every
    if every is None:   # the fewest epochs between fits that keep them within auto_share (adr_auto.py)
        every = fit_every(per_epoch, a.steps, cfg.eval.val_attack_steps, points, share=s.auto_share)
    return AutoTauLambda(tau_init=s.tau_high, lambda_init=s.lambda_low, eps=a.eps, alpha=a.alpha,
                         steps=cfg.eval.val_attack_steps, norm=a.norm, points=points, seed=cfg.train.seed,
                         every=every)


def auto_samples_per_epoch(ctx: BuildContext) -> float:
    """Samples an epoch trains on: steps x batch, auxiliary images included (each real batch carries
    aux_fraction generated ones); without them, at most the training split (a partial last batch)."""
    cfg = ctx.config
    f = cfg.data.aux_fraction
    per_epoch = ctx.steps_per_epoch * cfg.data.batch_size / (1.0 - f)
    if f == 0 and not cfg.data.drop_last and ctx.num_samples:
        per_epoch = min(per_epoch, float(ctx.num_samples))
    return per_epoch
