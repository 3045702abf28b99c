"""Paired bootstrap confidence intervals for differences measured on the same test points.

(The statistics behind the benchmarks' paired tables: ``benchmarks/robust_overfitting.py`` and
``robust_overfitting_tuned.py``; moved here from ``benchmarks/paired_stats.py``, which re-exports it.)

Two methods evaluated on the same fixed test points, with the same training seeds, are compared
point by point: for seed ``s`` and point ``i`` the per-point score is 1 (correct after the attack)
or 0, and a difference of accuracies is the mean over seeds and points of ``a[s, i] - b[s, i]``.
Pairing removes the variance both methods share (points that every model gets right or wrong),
which an unpaired binomial standard error counts twice.

The bootstrap resamples both sources of noise: each replicate draws the seeds with replacement
(training randomness) and the test points with replacement (the test set is a sample).  The
points are drawn once per replicate and used for every seed and both methods, since they *are*
the same points: a point that is hard for one seed is hard for the others, and resampling it per
seed independently would hide that covariance and give too narrow an interval.  With one seed
only the points are resampled (the seed-to-seed spread is then not in the interval; the report
says so).

Seeds need not share one set of points: a seed attacked on other test points (e.g. later seeds on a
fresh block, so the point-to-point part of the interval shrinks with the seeds too) has ``nan``
where it was not attacked.  The points are then drawn within strata -- the points attacked by the
same set of seeds -- so a point shared by several seeds is still one draw for all of them, each
stratum keeps its size, and each seed's accuracy is the mean over the points it was attacked on
(every seed weighs the same).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "verdict_above_zero", "verdict_halves", "gap_scores", "as_points", "points_str"]


def points_str(correct) -> str:
    """Per-point outcomes as a compact string of ``0``/``1`` (JSON-friendly, in data order)."""
    return "".join("1" if bool(c) else "0" for c in correct)


def as_points(s: str) -> np.ndarray:
    """Inverse of :func:`points_str`: a float array of 0/1."""
    if not isinstance(s, str) or set(s) - {"0", "1"}:
        raise ValueError("per-point outcomes must be a string of 0 and 1")
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


def _stack(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be [seeds, points] (or [points]) with at least one point, got shape "
                         f"{arr.shape}")
    return arr


def paired_bootstrap(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0, scale: float = 100.0) -> dict:
    """Mean of ``a - b`` (times ``scale``, default percent points) with a percentile bootstrap CI.

    ``a`` and ``b``: arrays ``[seeds, points]`` of per-point scores (row ``s`` of both = the same
    training seed, column ``i`` = the same test point); a 1-d array is one seed.  Scores need not
    be 0/1: a gap's per-point score is ``best - final`` (in {-1, 0, 1}).  ``nan`` (in both, in the
    same places): the seed was not attacked on that point (see the module's note on strata).

    Returns ``{"diff", "lo", "hi", "half_width", "half_width_points", "half_width_seeds", "se",
    "n_seeds", "n_points", "n_points_per_seed", "n_boot", "level"}`` (``se``: the bootstrap standard deviation;
    ``half_width_points`` / ``half_width_seeds``: the half-width with only the test points / only
    the seeds resampled).
    """
    a, b = _stack(a, "a"), _stack(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired data must have the same shape: {a.shape} vs {b.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
    d = a - b
    k, n = d.shape
    seen = ~np.isnan(d)
    if not np.array_equal(seen, ~np.isnan(a)) or not np.array_equal(seen, ~np.isnan(b)):
        raise ValueError("a and b must be attacked on the same points of each seed (nan in the same places)")
    if not seen.any(1).all():
        raise ValueError("every seed needs at least one attacked point (a row is all nan)")
    rng = np.random.default_rng(seed)
    point_w = np.zeros((n_boot, n))
    rows = np.arange(n_boot)[:, None]
    if seen.all():   # one set of points for every seed
        np.add.at(point_w, (rows, rng.integers(0, n, (n_boot, n))), 1.0)
    else:            # within each stratum: the points attacked by the same seeds
        _, stratum = np.unique(seen.T, axis=0, return_inverse=True)
        for g in np.unique(stratum):
            cols = np.flatnonzero(stratum == g)
            np.add.at(point_w, (rows, cols[rng.integers(0, len(cols), (n_boot, len(cols)))]), 1.0)
    d0, m = np.where(seen, d, 0.0), seen.astype(np.float64)
    # [n_boot, k]: each seed on the resampled points (the mean over the points it was attacked on;
    # every stratum keeps its size, so the denominator is the seed's number of points)
    per_seed = (point_w @ d0.T) / (point_w @ m.T)
    seed_w = np.zeros((n_boot, k))
    np.add.at(seed_w, (np.arange(n_boot)[:, None], rng.integers(0, k, (n_boot, k))), 1.0)
    stats = scale * (seed_w * per_seed).sum(1) / k
    # The two sources apart, from the same draws: the test points resampled with the seeds held
    # fixed, and the seeds resampled on the fixed points.  They say which lever narrows the
    # interval -- more attacked points (the first shrinks as 1/sqrt(points)) or more seeds (the
    # second, as 1/sqrt(seeds)).  Their squares need not add up to the total's exactly.
    stats_points = scale * per_seed.mean(1)
    seed_means = d0.sum(1) / m.sum(1)
    stats_seeds = scale * (seed_w @ seed_means) / k
    alpha = (1 - level) / 2
    q = (alpha, 1 - alpha)
    lo, hi = np.quantile(stats, q)
    hw = lambda x: float(np.diff(np.quantile(x, q))[0]) / 2  # noqa: E731
    diff = scale * float(seed_means.mean())
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "half_width": float(hi - lo) / 2,
            "half_width_points": hw(stats_points), "half_width_seeds": hw(stats_seeds),
            "se": float(stats.std(ddof=1)) if n_boot > 1 else 0.0, "n_seeds": k, "n_points": n,
            "n_points_per_seed": sorted({int(c) for c in seen.sum(1)}),
            "n_boot": n_boot, "level": level}


def verdict_above_zero(ci: Optional[dict]) -> str:
    """``yes`` when the whole interval is above 0, ``no`` when it is below, else ``cannot tell``."""
    if ci is None:
        return "not measured"
    if ci["lo"] > 0:
        return "yes"
    if ci["hi"] < 0:
        return "no"
    return "cannot tell"


def verdict_halves(excess: Optional[dict], base_gap: Optional[dict]) -> str:
    """Does a method cut its base's gap by at least half?

    ``excess``: the CI of ``gap_method - gap_base / 2`` (per point, paired); ``base_gap``: the CI
    of the base's own gap.  ``yes`` when the excess is below 0 with confidence, ``no`` when above;
    ``cannot tell`` when 0 is inside its interval -- and when the base's gap is not above 0 with
    confidence (no measurable overfitting to cure).
    """
    if excess is None or base_gap is None:
        return "not measured"
    if base_gap["lo"] <= 0:
        return "cannot tell"
    if excess["hi"] < 0:
        return "yes"
    if excess["lo"] > 0:
        return "no"
    return "cannot tell"


def gap_scores(best: Sequence, final: Sequence) -> np.ndarray:
    """Per-point gap scores ``best - final`` of a [seeds, points] pair of outcome arrays."""
    return _stack(best, "best") - _stack(final, "final")
