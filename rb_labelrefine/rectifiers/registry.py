"""Build a rectifier from a config's ``method`` section (a registry, so the trainer never
branches on a method's name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch.nn as nn

from .adr import ADR
from .base import Rectifier
from .onehot import LabelSmoothing, OneHot
from .sglr import SGLR
from .teachers import LTD, KDSelfTeachers

__all__ = ["BuildContext", "register_rectifier", "build_rectifier", "RECTIFIERS"]


@dataclass
class BuildContext:
    model: nn.Module
    num_classes: int
    num_samples: int            # size of the training split (per-sample memories)
    total_steps: int            # optimizer steps of the whole run (annealing schedules)
    steps_per_epoch: int
    decay_scale: Callable[[float], float]   # per-step decay -> decay at this data set's steps/epoch
    load_teacher: Callable[[str, str], nn.Module]  # (path, field name) -> frozen model
    shared_ema: Optional[object] = None     # the WA EMA, offered for reuse as ADR's teacher


RECTIFIERS: Dict[str, Callable] = {}


def register_rectifier(name: str):
    def deco(fn):
        RECTIFIERS[name] = fn
        return fn
    return deco


@register_rectifier("onehot")
def _onehot(m, ctx: BuildContext) -> Rectifier:
    return OneHot(ctx.num_classes)


@register_rectifier("label_smoothing")
def _ls(m, ctx: BuildContext) -> Rectifier:
    return LabelSmoothing(ctx.num_classes, smoothing=m.smoothing)


@register_rectifier("adr")
def _adr(m, ctx: BuildContext) -> Rectifier:
    decay = ctx.decay_scale(m.ema_decay)
    teacher = None
    if ctx.shared_ema is not None and abs(ctx.shared_ema.decay - decay) < 1e-12:
        teacher = ctx.shared_ema  # WA with the same decay *is* ADR's teacher (one EMA, not two)
    return ADR(ctx.model, ctx.num_classes, ctx.total_steps, ema_decay=decay, tau_high=m.tau_high,
               tau_low=m.tau_low, lambda_low=m.lambda_low, lambda_high=m.lambda_high, teacher=teacher)


@register_rectifier("sglr")
def _sglr(m, ctx: BuildContext) -> Rectifier:
    return SGLR(ctx.model, ctx.num_classes, ctx.num_samples, variant=m.variant, alpha=m.alpha,
                temperature=m.temperature, momentum=m.momentum, clean_weight=m.clean_weight,
                start_epoch=m.start_epoch)


@register_rectifier("ltd")
def _ltd(m, ctx: BuildContext) -> Rectifier:
    return LTD(ctx.load_teacher(m.teacher, "method.teacher"), ctx.num_classes, temperature=m.temperature)


@register_rectifier("kd")
def _kd(m, ctx: BuildContext) -> Rectifier:
    robust = ctx.load_teacher(m.robust_teacher, "method.robust_teacher") if m.robust_teacher else None
    standard = ctx.load_teacher(m.standard_teacher, "method.standard_teacher") if m.standard_teacher else None
    return KDSelfTeachers(ctx.num_classes, robust_teacher=robust, standard_teacher=standard, weights=m.kd_weights,
                          robust_weight=m.robust_weight, standard_weight=m.standard_weight,
                          temperature=m.temperature)


def build_rectifier(method_cfg, ctx: BuildContext) -> Rectifier:
    try:
        factory = RECTIFIERS[method_cfg.name]
    except KeyError:
        raise ValueError(f"unknown method {method_cfg.name!r}; known: {sorted(RECTIFIERS)}") from None
    return factory(method_cfg, ctx)
