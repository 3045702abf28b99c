"""ADR's tau and lambda chosen from held-out data (``method.schedule: auto``).

The paper hand-tunes tau_high->tau_low and lambda_low->lambda_high per data set (Sec. 5.1, App. J:
"the optimal parameters for each dataset vary").  Its argument for both is calibration: robust
models are well calibrated (Sec. 3.2), and the rectified label should be as confident as the
robust model can honestly be.  So, after every ``every``-th epoch (below: the cost budget), on
``points`` fixed validation images:

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

**How often: a fit every ``every`` epochs, held in between (the cost budget).**  The issue's
budget is ``share`` (``method.auto_share``, default 2 %) of training compute.  A fit on fewer
than ~100 points is statistically useless (the robust accuracy's standard error
``sqrt(p(1-p)/n)`` reaches 5 points at n = 100, p = 0.5), and on small data sets 100 points cost
far more than 2 % of an epoch (Fashion-MNIST, 500 training images, PGD-10 in training and
validation: 100 x 10.3 passes against 500 x 11.3, 18 %; measured on the CPU box 16-19 %,
benchmarks/adr_auto_cost.py).  Of the ways to pay less:

* **refit every m epochs** (chosen) -- ``every`` = ceil(cost of one fit / (share x cost of one
  epoch)) (:func:`fit_every`), from the same pass counts as :func:`budget_points` with the fit
  counted 25 % dearer (FIT_COST_MARGIN: the pass counts underestimate it, and timings vary), so
  it is a function of the config alone (deterministic, the same on resume).  Fits happen after the epochs
  e (1-based) with e % every == 0: after any E epochs, floor(E / every) <= E / every fits have
  run, so the fits cost at most ``share`` of the training so far *by construction*, for every
  prefix of the run, not only on average.  ADR's own schedules are cosines over the whole run
  (tau 2.5 -> 2.0, lambda 0.7 -> 0.95 on CIFAR-10, Sec. 5.1): they move by at most ~5 % per
  tenth of training, so a value held for ``every`` epochs (12 on fmnist-adr-auto, a tenth of its
  120 epochs) is faithful to the paper's slowly annealed targets.  Every fit keeps its full ``points``
  and PGD-k, so each fitted value has the statistical quality of a per-epoch fit.
* warm-started adversarial examples kept across epochs (fewer PGD steps per fit) -- rejected:
  the teacher moves between epochs, so a warm start from its previous adversarial examples is
  a different, history-dependent attack whose strength drifts over the run; lambda would then
  measure the attack's age as much as the teacher's robustness.
* reusing the trainer's validation PGD -- only possible when the evaluated model is the teacher
  (``eval.model: ema`` with WA sharing ADR's decay); on fmnist-adr-auto it is the raw student,
  so it would not remove the cost where the issue measures it.

Measured (benchmarks/results/adr_auto_cost_cpu.json, 24 epochs of fmnist-adr-auto, CPU box): the
fits cost 18.7 % of the training steps' CPU time when run every epoch, 1.48 % every 12.  The
trajectories differ most before the first fit (epochs 1-11 keep tau 2.5, lambda 0.7, where a fit
every epoch gives tau ~1, lambda 0-0.6); the teacher trained on those softer targets is then
under-confident, so the fit after epoch 12 sharpens (tau 0.30 against 1.14); after epoch 24 the
two agree again (tau 1.19 / 1.18, lambda 0.58 / 0.65).

Between fits, and before the first one, the held values are used (before the first fit: the
configured starting values tau_high, lambda_low -- the paper's first-step values); the history
logs the held values every epoch and marks fitted epochs with ``adr_auto_fit``.  The state
(current values, the interval and every fit) is part of the rectifier's ``state_dict``, so a
resumed run continues identically across a fit interval.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["fit_temperature", "budget_points", "fit_every", "AutoTauLambda", "TAU_MIN", "TAU_MAX", "LAMBDA_MAX",
           "FIT_COST_MARGIN"]

TAU_MIN, TAU_MAX = 0.1, 10.0
LAMBDA_MAX = 0.99
_GOLDEN_ITERS = 80   # shrinks the beta interval by 0.618**80 ~ 2e-17: below float64 resolution
#: a fitted point is counted as this much more than its pass count: measured on the CPU box
#: (benchmarks/adr_auto_cost.py, fmnist-adr-auto, CPU time) one 100-point fit cost 18.6-18.7 % of
#: an epoch's training steps, once 23 % (beside other jobs), against 18.2 % from the pass counts
FIT_COST_MARGIN = 1.25


def _point_cost(val_steps: int) -> float:
    return (val_steps + 1 / 3) * FIT_COST_MARGIN


def _sample_cost(train_steps: int) -> float:
    return train_steps + 1 + 1 / 3


def budget_points(samples_per_epoch: float, train_steps: int, val_steps: int, share: float = 0.02,
                  lo: int = 100, hi: int = 1000) -> int:
    """Validation points whose PGD-``val_steps`` pass costs ``share`` of an epoch.

    Per training sample an ADR step costs about ``train_steps + 1`` forward-backward passes (the
    attack and the update) plus a teacher forward (~1/3 of one); per fitted point, ``val_steps``
    forward-backward passes plus a forward, times FIT_COST_MARGIN.  At least ``lo`` points (below that the fitted
    accuracy's standard error exceeds 5 points), at most ``hi``."""
    # floor, not round: a budget-sized fit must not exceed the share (fit_every is then 1)
    n = math.floor(share * samples_per_epoch * _sample_cost(train_steps) / _point_cost(val_steps))
    return int(min(max(n, lo), hi))


def fit_every(samples_per_epoch: float, train_steps: int, val_steps: int, points: int,
              share: float = 0.02) -> int:
    """Epochs between fits so that fitting ``points`` validation points with PGD-``val_steps`` costs
    at most ``share`` of training: ceil(fit cost / (share x epoch cost)), with the pass counts of
    :func:`budget_points`.  With fits after the epochs that are multiples of it, any prefix of E
    epochs holds floor(E / every) fits, whose cost is <= share x E epochs."""
    if samples_per_epoch <= 0 or points < 1 or not 0 < share:
        raise ValueError(f"need samples_per_epoch > 0, points >= 1, share > 0; got {samples_per_epoch}, "
                         f"{points}, {share}")
    epoch_cost = samples_per_epoch * _sample_cost(train_steps)
    fit_cost = points * _point_cost(val_steps)
    # the 1e-9 keeps an exact ratio (e.g. 9.0 computed as 9.000000000000002) from rounding up
    return max(1, math.ceil(fit_cost / (share * epoch_cost) - 1e-9))


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
    """Fit of ADR's temperature and interpolation on validation adversarial examples, after every
    ``every``-th epoch (:meth:`end_of_epoch`), the values held in between."""

    def __init__(self, *, tau_init: float, lambda_init: float, eps: float, alpha: float, steps: int,
                 norm: str = "Linf", points: int = 512, seed: int = 0, every: int = 1):
        if points < 1:
            raise ValueError(f"points must be >= 1, got {points}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.tau, self.lam = float(tau_init), float(lambda_init)
        self.eps, self.alpha, self.steps, self.norm = float(eps), float(alpha), int(steps), norm
        self.points, self.seed, self.every = int(points), int(seed), int(every)
        self.fits: list = []

    def due(self, epoch: int) -> bool:
        """Whether the fit runs after (0-based) ``epoch``: the 1-based epoch is a multiple of ``every``."""
        return (int(epoch) + 1) % self.every == 0

    def end_of_epoch(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int,
                     batch_size: int = 256) -> dict:
        """Fit if :meth:`due`, else hold; the record to log (``adr_auto_fit`` says which)."""
        if self.due(epoch):
            rec = self.fit(teacher, x, y, epoch, batch_size)
        else:
            rec = {"epoch": int(epoch) + 1, "adr_tau": self.tau, "adr_lambda": self.lam,
                   "adr_auto_points": self.points, "adr_auto_s": 0.0}
            if self.fits:   # what the held values came from
                rec["adr_teacher_val_pgd"] = self.fits[-1]["adr_teacher_val_pgd"]
        rec["adr_auto_fit"] = self.due(epoch)
        rec["adr_auto_every"] = self.every
        return rec

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
        return {"tau": self.tau, "lambda": self.lam, "every": self.every, "fits": [dict(f) for f in self.fits]}

    def load_state_dict(self, state: dict) -> None:
        every = int(state.get("every", 1))   # checkpoints from before the interval fitted every epoch
        if every != self.every:
            raise ValueError(f"the checkpoint fits ADR's tau/lambda every {every} epoch(s), this run every "
                             f"{self.every} (method.auto_every / method.auto_share changed): resume with the "
                             "run's own config")
        self.tau, self.lam = float(state["tau"]), float(state["lambda"])
        self.fits = [dict(f) for f in state["fits"]]

    def __repr__(self) -> str:
        return (f"AutoTauLambda(points={self.points}, PGD-{self.steps}, every={self.every}, tau={self.tau:.4g}, "
                f"lambda={self.lam:.4g})")
