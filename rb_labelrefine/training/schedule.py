"""The learning-rate schedule and the run's step counts: functions of the config and the
position (epoch, step in epoch) only, so a resumed run sets exactly the rates of an uninterrupted one."""
from __future__ import annotations

import math

from ..config import Config

__all__ = ["lr_at", "onecycle_at", "peak_cosine_at", "set_lr", "count_steps_per_epoch", "first_decay_epoch"]


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Learning rate of a step.  Milestones < 1 are fractions of training (ADR: 0.5, 0.75),
    larger ones are epochs (KD+SWA: 100, 150); they apply from the first step of that epoch.

    ``optim.lr_lag_steps`` evaluates the schedule ``lag`` steps earlier (clamped at step 0), and
    ``optim.warmup_epochs`` replaces its first ``W = int(warmup_epochs * steps_per_epoch)`` steps
    by ``warmup_start_lr + s * (lr - warmup_start_lr) / W`` -- timm's warm-up, not a shift of the
    schedule (what the ADR code's cosine runs use, with lag 1)."""
    o, E = cfg.optim, cfg.train.epochs
    if o.schedule == "onecycle":
        return onecycle_at(cfg, epoch)[0]
    if o.schedule == "peak_cosine":
        spe = max(steps_per_epoch, 1)
        a, b = peak_cosine_at(cfg, epoch), peak_cosine_at(cfg, epoch + 1)
        return a + (b - a) * step_in_epoch / spe   # np.interp(arange(iters), [0, iters], [a, b])
    spe = max(steps_per_epoch, 1)
    s = max(epoch * spe + step_in_epoch - o.lr_lag_steps, 0)
    warm = int(o.warmup_epochs * spe)
    if s < warm:
        return o.warmup_start_lr + s * (o.lr - o.warmup_start_lr) / warm
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        t = (s // spe + (s % spe) / spe) / E
        return 0.5 * o.lr * (1 + math.cos(math.pi * min(t, 1.0)))
    n = sum(1 for m in o.milestones if s // spe >= (m * E if m < 1 else m))
    return o.lr * (o.gamma ** n)


def peak_cosine_at(cfg: Config, epoch: float) -> float:
    """Singh et al. 2023's ``get_cosine_lr(epoch)`` (nmndeep/revisiting-at ``main.py``): linear from
    ``warmup_start_lr`` (the code: 1e-4 x lr) to ``lr`` up to ``P = warmup_epochs``, then a cosine
    from ``lr`` to ``lr_min`` (the code: 5e-6) at epoch ``train.epochs``."""
    o, E, P = cfg.optim, cfg.train.epochs, cfg.optim.warmup_epochs
    if P > 0 and epoch <= P:
        return o.warmup_start_lr + (o.lr - o.warmup_start_lr) * epoch / P
    return o.lr_min + 0.5 * (o.lr - o.lr_min) * (1 + math.cos(math.pi * (epoch - P) / (E - P)))


def onecycle_at(cfg: Config, epoch: int) -> tuple:
    """``(lr, momentum)`` of epoch ``epoch`` (0-based) under torch's ``OneCycleLR(optimizer,
    max_lr=lr, pct_start, total_steps=epochs)`` with its defaults (anneal "cos", div_factor 25,
    final_div_factor 1e4, momentum 0.85 / 0.95 cycled), stepped once per epoch after training it:
    the DM-Improves-AT code's ``--scheduler cosinew`` (``core/utils/train.py``).  momentum is None
    without ``optim.cycle_momentum``."""
    o, total = cfg.optim, cfg.train.epochs
    top, start = o.lr, o.lr / 25.0
    low = start / 1e4
    up_end = float(o.onecycle_pct_start * total) - 1
    t = min(epoch, total - 1)

    def cos(a, b, pct):
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    if t <= up_end:
        pct = t / up_end if up_end > 0 else 1.0   # (torch divides by zero here: pct_start * epochs must exceed 1)
        lr, mom = cos(start, top, pct), cos(0.95, 0.85, pct)
    else:
        pct = (t - up_end) / (total - 1 - up_end)
        lr, mom = cos(top, low, pct), cos(0.85, 0.95, pct)
    return lr, (mom if o.cycle_momentum else None)


def set_lr(optimizer, lr: float, momentum=None) -> None:
    """Every parameter group's learning rate (and momentum, where the schedule cycles it)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if momentum is not None:
            g["momentum"] = momentum


def count_steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of ``n`` samples (``data.drop_last``: full batches only)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def first_decay_epoch(cfg: Config) -> int:
    """The epoch of the first learning-rate decay (SWA's default start)."""
    ms = sorted(int(round(m * cfg.train.epochs)) if m < 1 else int(m) for m in cfg.optim.milestones)
    return ms[0] if ms else cfg.train.epochs // 2
