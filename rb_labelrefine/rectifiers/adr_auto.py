"""ADR's tau and lambda chosen from held-out data (``method.schedule: auto``).

The paper hand-tunes tau_high->tau_low and lambda_low->lambda_high per data set (Sec. 5.1, App. J:
"the optimal parameters for each dataset vary").  Its argument for both is calibration: robust
models are well calibrated (Sec. 3.2), and the rectified label should be as confident as the
robust model can honestly be.  So, once per epoch, on ``points`` fixed validation images:

* attack the EMA teacher with PGD-k (its own white-box adversarial examples, eval mode, random
  starts from a generator seeded by (seed, epoch) -- deterministic, no global RNG drawn);
* **tau** = the temperature scaling of the teacher on those adversarial examples: the minimiser of
  the mean NLL of ``softmax(f_theta_t(x') / tau)`` (Guo et al. 2017).  The NLL is convex in
  beta = 1/tau (a log-sum-exp of functions linear in beta minus a linear term), so a fixed
  golden-section search over beta in [1/TAU_MAX, 1/TAU_MIN] finds the minimum deterministically;
* **lambda** = the teacher's robust accuracy on the same points.  lambda is the weight of the
  teacher's distribution against the one-hot label (Eq. 5); the paper raises it "as a
  reflection of our growing confidence in the precision and robustness of the momentum
  encoder" (Sec. 1) -- measured here, as the fraction of held-out points the teacher still
  classifies correctly under attack.  It starts near chance (targets close to one-hot, as in AT),
  grows as the teacher becomes robust, and is capped at LAMBDA_MAX < 1, which keeps the true
  class strictly the most likely in every rectified label: with lambda < 1, Eq. 4-5 give
  ``P[y] - P[j] >= 1 - lambda > 0`` for every j != y.

The fitted values hold for the next epoch's steps; before the first fit the configured
starting values (tau_high, lambda_low) are used.  The state (current values and every epoch's
fit) is part of the rectifier's ``state_dict``, so a resumed run continues identically.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["fit_temperature", "budget_points", "AutoTauLambda", "TAU_MIN", "TAU_MAX", "LAMBDA_MAX"]

TAU_MIN, TAU_MAX = 0.1, 10.0
LAMBDA_MAX = 0.99
_GOLDEN_ITERS = 80   # shrinks the beta interval by 0.618**80 ~ 2e-17: below float64 resolution


def budget_points(samples_per_epoch: float, train_steps: int, val_steps: int, share: float = 0.02,
                  lo: int = 100, hi: int = 1000) -> int:
    """Validation points whose PGD-``val_steps`` pass costs ``share`` of an epoch.

    Per training sample an ADR step costs about ``train_steps + 1`` forward-backward passes (the
    attack and the update) plus a teacher forward (~1/3 of one); per fitted point, ``val_steps``
    forward-backward passes plus a forward.  At least ``lo`` points (below that the fitted
    accuracy's standard error exceeds 5 points), at most ``hi``."""
    per_sample = train_steps + 1 + 1 / 3
    per_point = val_steps + 1 / 3
    return int(min(max(round(share * samples_per_epoch * per_sample / per_point), lo), hi))


def _nll(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    z = logits * beta
    return float((torch.logsumexp(z, dim=1) - z.gather(1, labels[:, None]).squeeze(1)).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tau_min: float = TAU_MIN,
                    tau_max: float = TAU_MAX) -> float:
    """The temperature minimising the mean NLL of ``softmax(logits / tau)`` in [tau_min, tau_max]."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(f"need logits [N, C] and labels [N] with N >= 1, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not 0 < tau_min < tau_max:
        raise ValueError(f"need 0 < tau_min < tau_max, got {tau_min}, {tau_max}")
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    lo, hi = 1.0 / tau_max, 1.0 / tau_min
    r = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - r * (hi - lo), lo + r * (hi - lo)
    fa, fb = _nll(z, y, a), _nll(z, y, b)
    for _ in range(_GOLDEN_ITERS):
        if fa <= fb:   # the minimum of a convex function lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - r * (hi - lo)
            fa = _nll(z, y, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = _nll(z, y, b)
    return 1.0 / (0.5 * (lo + hi))


class AutoTauLambda:
    """Per-epoch fit of ADR's temperature and interpolation on validation adversarial examples."""

    def __init__(self, *, tau_init: float, lambda_init: float, eps: float, alpha: float, steps: int,
                 norm: str = "Linf", points: int = 512, seed: int = 0):
        if points < 1:
            raise ValueError(f"points must be >= 1, got {points}")
        self.tau, self.lam = float(tau_init), float(lambda_init)
        self.eps, self.alpha, self.steps, self.norm = float(eps), float(alpha), int(steps), norm
        self.points, self.seed = int(points), int(seed)
        self.fits: list = []

    def fit(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int, batch_size: int = 256) -> dict:
        """Attack ``teacher`` on (x, y), refit tau and lambda; returns the record to log."""
        from ..evaluation.pgd import eval_mode, pgd_attack

        t0 = time.time()
        device = next(teacher.parameters()).device
        x, y = x[:self.points], y[:self.points]
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + int(epoch))
        logits = []
        with eval_mode(teacher):
            for i in range(0, len(y), batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                x_adv = pgd_attack(teacher, xb, yb, self.eps, self.alpha, self.steps, self.norm, True, gen)
                with torch.no_grad():
                    logits.append(teacher(x_adv).float().cpu())
        logits = torch.cat(logits)
        yc = y.long().cpu()
        acc = float((logits.argmax(1) == yc).double().mean())
        self.tau = fit_temperature(logits, yc)
        self.lam = min(max(acc, 0.0), LAMBDA_MAX)
        rec = {"epoch": int(epoch) + 1, "adr_tau": self.tau, "adr_lambda": self.lam,
               "adr_teacher_val_pgd": 100.0 * acc, "adr_auto_points": int(len(yc)),
               "adr_auto_s": time.time() - t0}
        self.fits.append({k: v for k, v in rec.items() if k != "adr_auto_s"})
        return rec

    def state_dict(self) -> dict:
        return {"tau": self.tau, "lambda": self.lam, "fits": [dict(f) for f in self.fits]}

    def load_state_dict(self, state: dict) -> None:
        self.tau, self.lam = float(state["tau"]), float(state["lambda"])
        self.fits = [dict(f) for f in state["fits"]]

    def __repr__(self) -> str:
        return (f"AutoTauLambda(points={self.points}, PGD-{self.steps}, tau={self.tau:.4g}, "
                f"lambda={self.lam:.4g})")
