"""The paired bootstrap behind the robust-overfitting table's confidence intervals
(rb_labelrefine.evaluation.paired; benchmarks/paired_stats.py re-exports it)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rb_labelrefine.evaluation import paired as ps


def test_the_benchmarks_old_module_name_is_the_packages_statistics():
    spec = importlib.util.spec_from_file_location(
        "paired_stats", Path(__file__).resolve().parents[1] / "benchmarks" / "paired_stats.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    assert all(getattr(old, n) is getattr(ps, n) for n in ps.__all__)


def test_identical_inputs_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 200)) < 0.6).astype(float)
    ci = ps.paired_bootstrap(a, a.copy(), n_boot=300)
    assert ci["diff"] == 0.0 and ci["lo"] == 0.0 and ci["hi"] == 0.0 and ci["half_width"] == 0.0
    assert ps.verdict_above_zero(ci) == "cannot tell"


def test_a_constant_shift_is_recovered_exactly():
    # every point: method right, base wrong on 10 % of the points, identical elsewhere
    b = np.zeros((2, 100))
    a = b.copy()
    a[:, :10] = 1.0
    ci = ps.paired_bootstrap(a, b, n_boot=500, seed=1)
    assert ci["diff"] == pytest.approx(10.0)
    assert ci["lo"] < 10.0 < ci["hi"] and ci["lo"] > 0          # the points are resampled
    assert ps.verdict_above_zero(ci) == "yes"
    assert ps.verdict_above_zero(ps.paired_bootstrap(b, a, n_boot=500)) == "no"


def test_the_interval_covers_the_true_difference_on_synthetic_paired_data():
    """Population of paired per-point outcomes with a known mean difference; each trial draws a
    test set of points and 3 seeds (a seed shifts both methods' per-point probabilities the same
    way plus a small method-specific effect); the 95 % interval must cover the truth in about 95 %
    of the trials."""
    rng = np.random.default_rng(42)
    n_pop, n, k, trials = 20000, 300, 3, 150
    p_base = rng.beta(2, 2, n_pop)
    p_meth = np.clip(p_base + rng.normal(0.03, 0.1, n_pop), 0, 1)
    truth = 100 * float((p_meth - p_base).mean())
    covered, widths = 0, []
    for t in range(trials):
        idx = rng.choice(n_pop, n, replace=False)
        u = rng.random((k, n))                    # shared per-seed noise: the pair is correlated
        a = (u < p_meth[idx]).astype(float)
        b = (u < p_base[idx]).astype(float)
        ci = ps.paired_bootstrap(a, b, n_boot=400, seed=t)
        covered += ci["lo"] <= truth <= ci["hi"]
        widths.append(ci["half_width"])
    assert 0.88 <= covered / trials <= 1.0
    # pairing pays: the unpaired binomial half-width of the same difference is far wider
    unpaired = 1.96 * 100 * np.sqrt(2 * 0.25 / (n * k))
    assert np.mean(widths) < 0.8 * unpaired


def test_seed_spread_widens_the_interval():
    b = np.zeros((3, 400))
    same = b.copy()
    same[:, :20] = 1.0                                        # +5 points in every seed
    spread = b.copy()
    spread[0, :60] = 1.0                                      # +15 points in one seed: the same mean
    ci_same, ci_spread = ps.paired_bootstrap(same, b, n_boot=1000), ps.paired_bootstrap(spread, b, n_boot=1000)
    assert ci_same["diff"] == pytest.approx(ci_spread["diff"]) == pytest.approx(5.0)
    assert ci_spread["half_width"] > 1.5 * ci_same["half_width"]


def test_the_interval_is_split_into_its_point_and_seed_parts():
    """half_width_points resamples only the test points, half_width_seeds only the seeds: a
    difference that is the same in every seed has no seed part; one that is the same on every
    point of a seed (but differs between seeds) has no point part."""
    rng = np.random.default_rng(3)
    b = np.zeros((4, 300))
    same_seeds = np.tile((rng.random(300) < 0.2).astype(float), (4, 1))   # identical rows
    ci = ps.paired_bootstrap(same_seeds, b, n_boot=800)
    assert ci["half_width_seeds"] == 0.0
    assert ci["half_width_points"] == pytest.approx(ci["half_width"], rel=0.25) and ci["half_width_points"] > 0
    per_seed_const = np.repeat(np.array([[0.0], [1.0], [0.0], [1.0]]), 300, axis=1)  # 0 or +100 points
    ci = ps.paired_bootstrap(per_seed_const, b, n_boot=800)
    assert ci["half_width_points"] == 0.0 and ci["half_width_seeds"] > 10
    # more points narrow the point part (about 1/sqrt(n)), not the seed part
    small = ps.paired_bootstrap(same_seeds[:, :75], b[:, :75], n_boot=800)
    assert small["half_width_points"] > 1.5 * ps.paired_bootstrap(same_seeds, b, n_boot=800)["half_width_points"]


def test_halving_verdict():
    ci = lambda lo, hi: {"lo": lo, "hi": hi}  # noqa: E731
    assert ps.verdict_halves(ci(-3, -1), ci(4, 8)) == "yes"
    assert ps.verdict_halves(ci(1, 3), ci(4, 8)) == "no"
    assert ps.verdict_halves(ci(-1, 2), ci(4, 8)) == "cannot tell"
    # no measurable overfitting in the base: nothing to halve
    assert ps.verdict_halves(ci(-3, -1), ci(-0.5, 3)) == "cannot tell"
    assert ps.verdict_halves(None, ci(4, 8)) == "not measured"


def test_gap_scores_and_point_strings():
    s = ps.points_str([True, False, True])
    assert s == "101" and ps.as_points(s).tolist() == [1.0, 0.0, 1.0]
    assert ps.gap_scores([[1, 1, 0]], [[0, 1, 1]]).tolist() == [[1, 0, -1]]
    with pytest.raises(ValueError, match="string of 0 and 1"):
        ps.as_points("10x")
    with pytest.raises(ValueError, match="same shape"):
        ps.paired_bootstrap(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least one point"):
        ps.paired_bootstrap(np.zeros((1, 0)), np.zeros((1, 0)))


def test_seeds_on_other_points_are_drawn_within_strata():
    rng = np.random.default_rng(3)
    a = (rng.random((4, 30)) < .6).astype(float)
    b = (rng.random((4, 30)) < .5).astype(float)
    full = ps.paired_bootstrap(a, b, n_boot=300)
    # the same data with nan-padding columns nobody attacked is refused; one block per seed group is not
    A, B = np.full((6, 60), np.nan), np.full((6, 60), np.nan)
    A[:4, :30], B[:4, :30] = a, b
    A[4:, 30:], B[4:, 30:] = 1.0, 0.0          # two further seeds on fresh points, +100 each
    r = ps.paired_bootstrap(A, B, n_boot=300)
    # every seed weighs the same: the mean of the per-seed means
    assert r["diff"] == pytest.approx((4 * full["diff"] + 2 * 100) / 6)
    assert r["n_points"] == 60 and r["n_points_per_seed"] == [30]
    assert r["lo"] <= r["diff"] <= r["hi"]
    # all seeds on the same points: the original path, same draws, same interval
    same = ps.paired_bootstrap(np.where(np.isnan(A), 0, A)[:4, :30], np.where(np.isnan(B), 0, B)[:4, :30], n_boot=300)
    assert same["lo"] == full["lo"] and same["hi"] == full["hi"]


def test_nan_must_be_in_the_same_places():
    a = np.array([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(ValueError, match="same points"):
        ps.paired_bootstrap(a, np.array([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="all nan"):
        ps.paired_bootstrap(np.array([[np.nan, np.nan], [0.0, 1.0]]), np.array([[np.nan, np.nan], [1.0, 1.0]]))
