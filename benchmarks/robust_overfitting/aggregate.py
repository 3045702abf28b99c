"""From the records to the table's numbers: per method mean +- std over seeds, the mean curves,
the unpaired claims, and the paired comparisons with their bootstrap CIs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from rb_labelrefine.evaluation.paired import (as_points, gap_scores, paired_bootstrap, verdict_above_zero,
                                              verdict_halves)

from .plan import BASES, CHECKPOINTS, CLAIM_METHODS, EXTRA_PAIRS, LABELS, METHODS, MULTI_SEED
from .records import aa_at_n, aa_offset, checkpoints_of, no_points


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def mean_curve(recs: list[dict]) -> tuple[list[dict], list[int]]:
    """The test curve of a method: per epoch the mean (and std) over its runs, and the seeds in it."""
    # the curve: per-epoch mean over seeds
    # Over the runs that have a curve.  Runs imported from an older results file kept only their
    # method's mean +- std curve over k seeds (``curve_group``): when all k are here, that mean
    # and std enter the pooled mean and std exactly (k * mean, (k - 1) * std^2 + k * mean^2).
    with_curve = [r for r in recs if r.get("curve")]
    groups = {}
    for r in recs:
        g = r.get("curve_group") if not r.get("curve") else None
        if g:
            groups.setdefault(g["id"], (g, []))[1].append(r)
    groups = {i: (g, rs) for i, (g, rs) in groups.items() if len(rs) == g["n"]}
    parts = {}   # epoch -> [(n, means, stds)]
    for r in with_curve:
        for c in r["curve"]:
            parts.setdefault(c["epoch"], []).append((1, c, {}))
    for g, _ in groups.values():
        for c in g["curve"]:
            parts.setdefault(c["epoch"], []).append((g["n"], c, c))
    n_all = len(with_curve) + sum(g["n"] for g, _ in groups.values())
    curve = []
    for ep in sorted(parts):
        ps = parts[ep]
        if sum(n for n, _, _ in ps) != n_all:
            continue
        row = {"epoch": ep}
        for f in ("test_clean", "test_pgd", "val_pgd", "train_robust_acc"):
            ok = [(n, c[f], (sd.get(f + "_std") or 0.0)) for n, c, sd in ps if c.get(f) is not None]
            if not ok:
                row[f] = None
                if n_all > 1:
                    row[f + "_std"] = None
                continue
            N = sum(n for n, _, _ in ok)
            M = sum(n * m for n, m, _ in ok) / N
            row[f] = M
            if n_all > 1:
                ss = sum((n - 1) * s ** 2 + n * m ** 2 for n, m, s in ok) - N * M ** 2
                row[f + "_std"] = math.sqrt(max(ss, 0.0) / (N - 1)) if N > 1 else 0.0
        curve.append(row)
    seeds = sorted([r["seed"] for r in with_curve] + [r["seed"] for _, rs in groups.values() for r in rs])
    return curve, seeds


def aggregate(records: dict, seeds, aa_n=None, multi=MULTI_SEED) -> dict:
    records = {k: aa_at_n(r, aa_n) for k, r in records.items()}
    methods = {}
    for name in METHODS:
        recs = [records[k] for k in sorted(records) if records[k]["method"] == name]
        if name not in multi:
            recs = recs[:1] if recs else []
            recs = [r for r in recs]
        if not recs:
            continue
        entry = {"preset": METHODS[name], "label": LABELS[name], "n_seeds": len(recs),
                 "seeds_used": [r["seed"] for r in recs]}
        for which in [w for w in CHECKPOINTS if all(w in r for r in recs)]:
            d = {}
            for f in ("epoch", "clean", "pgd20", "autoattack", "pgd20_aa_points", "val_pgd10"):
                vals = [r[which].get(f) for r in recs]
                m, sd = mean_std(vals)
                d[f] = m
                count = sum(v is not None for v in vals)
                if count > 1:          # a std only over more than one measured seed
                    d[f + "_std"] = sd
                elif len(recs) > 1 and count == 1:
                    d[f + "_one_seed"] = True
            d["autoattack_n"] = next((r[which]["autoattack_n"] for r in recs if r[which].get("autoattack_n")), None)
            d["autoattack_seeds"] = sum(1 for r in recs if r[which].get("autoattack") is not None)
            if len(recs) == 1:  # per-attack accuracies of the one run (several seeds: under "seeds")
                d["autoattack_per_attack"] = recs[0][which].get("autoattack_per_attack")
            entry[which] = d
        curve, curve_seeds = mean_curve(recs)
        entry["curve"] = curve
        if len(curve_seeds) != len(recs):
            entry["curve_seeds"] = curve_seeds
        if curve:
            pk = max(curve, key=lambda c: c["test_pgd"])
            entry["curve_peak"] = {"epoch": pk["epoch"], "test_pgd": pk["test_pgd"],
                                   "final_test_pgd": curve[-1]["test_pgd"]}
        entry["effective_decays"] = recs[0]["effective_decays"]
        entry["swa_start_epoch"] = recs[0]["swa_start_epoch"]
        entry["eval_model"] = recs[0]["eval_model"]
        entry["train_robust_acc"] = {k: mean_std([r["train_robust_acc"][k] for r in recs])[0]
                                     for k in ("at_best", "last5_mean")}
        entry["train_seconds"] = [r["train_seconds"] for r in recs]
        entry["autoattack_seconds"] = [r["autoattack_seconds"] for r in recs]
        if len(recs) > 1:
            entry["seeds"] = [{"seed": r["seed"], "run_dir": r["run_dir"], "curve_peak": r["curve_peak"],
                               "train_robust_acc": r["train_robust_acc"],
                               **{w: no_points(r[w]) for w in checkpoints_of(r)}} for r in recs]
        else:
            entry["run_dir"] = recs[0]["run_dir"]
            entry["seed"] = recs[0]["seed"]
        methods[name] = entry
    return methods


def se_diff(a: float, b: float, n: int, k_a: int, k_b: int) -> float:
    """Standard error (percent points) of the difference of two accuracies measured on n points
    (binomial, each averaged over k seeds, treated as unpaired: conservative, since both are
    measured on the same points)."""
    var = lambda p, k: (p / 100) * (1 - p / 100) / (n * max(k, 1))  # noqa: E731
    return 100 * math.sqrt(var(a, k_a) + var(b, k_b))


def claims(methods: dict, n_points: Optional[dict] = None) -> list[dict]:
    """Per claim method and metric: the gap, whether it halves PGD-AT's, whether the final accuracy
    is higher, and (with ``n_points={"autoattack": n, "pgd20": n}``) the standard error of the
    final-accuracy difference, so a "higher" within noise can be told apart."""
    out = []
    base = methods.get("pgd_at")
    if base is None:
        return out
    for metric in ("autoattack", "pgd20"):
        if base["best"].get(metric) is None or base["final"].get(metric) is None:
            continue
        g0 = base["best"][metric] - base["final"][metric]
        for m in CLAIM_METHODS:
            if m not in methods:
                continue
            e = methods[m]
            if e["best"].get(metric) is None or e["final"].get(metric) is None:
                continue
            g = e["best"][metric] - e["final"][metric]
            c = {"method": m, "metric": metric, "pgd_at_gap": g0, "gap": g,
                 "halves_gap": bool(g0 > 0 and g <= 0.5 * g0),
                 "pgd_at_final": base["final"][metric], "final": e["final"][metric],
                 "higher_final": bool(e["final"][metric] > base["final"][metric])}
            n = (n_points or {}).get(metric)
            if n:
                k = "autoattack_seeds" if metric == "autoattack" else None
                k_m = e["final"].get(k, e["n_seeds"]) if k else e["n_seeds"]
                k_b = base["final"].get(k, base["n_seeds"]) if k else base["n_seeds"]
                c["final_diff_se"] = se_diff(c["final"], c["pgd_at_final"], n, k_m, k_b)
                c["final_diff_beyond_2se"] = bool(abs(c["final"] - c["pgd_at_final"]) > 2 * c["final_diff_se"])
            out.append(c)
    return out


PAIRED_METRICS = {"autoattack": "autoattack_points", "pgd20": "pgd20_points"}


def paired_claims(records: dict, aa_n=None, n_boot: int = 2000) -> list[dict]:
    """Every method against its base objective (BASES), paired: the same test points and the same
    training seeds (the seeds both have).  Per metric (AutoAttack, PGD-20) and per selection of
    *best* (the preset's validation attack; and CE-PGD validation where a run kept that checkpoint):
    95 % bootstrap CIs (paired_stats) of the final and the best difference, of both gaps
    (best - final) and of their difference, and the verdicts "higher final" and "cuts the gap by
    half"."""

    records = {k: aa_at_n(r, aa_n) for k, r in records.items()}
    by = {}
    for r in records.values():
        by.setdefault(r["method"], {})[r["seed"]] = r
    out = []
    pairs = [(m, BASES.get(m)) for m in METHODS] + list(EXTRA_PAIRS)
    for m, base in pairs:
        if m not in by or base not in by:
            continue
        for metric, field in PAIRED_METRICS.items():
            for sel in ("best", "best_pgd_ce"):
                need = (sel, "final")
                seeds = sorted(s for s in by[m] if s in by[base]
                               and all(by[x][s].get(w, {}).get(field) for x in (m, base) for w in need))
                if not seeds:
                    continue
                # per seed: where its points start in the test subset (AutoAttack: --aa-offset; PGD-20:
                # the curve's first images) -- a seed is paired only if all four were scored on the
                # same points; seeds on other points go in the same bootstrap (paired_stats: strata)
                span = {s: {(aa_offset(by[x][s][w]) if metric == "autoattack" else 0, len(by[x][s][w][field]))
                            for x in (m, base) for w in need} for s in seeds}
                seeds = [s for s in seeds if len(span[s]) == 1]
                if not seeds:
                    continue
                spans = {s: next(iter(span[s])) for s in seeds}
                if len({n for _, n in spans.values()}) != 1:
                    continue   # different numbers of points per seed: not one table
                cols = sorted({i for o, n in spans.values() for i in range(o, o + n)})
                pos = {i: j for j, i in enumerate(cols)}

                def on_cols(x, w):
                    out = np.full((len(seeds), len(cols)), np.nan)
                    for r, s in enumerate(seeds):
                        o, n = spans[s]
                        out[r, pos[o]:pos[o] + n] = as_points(by[x][s][w][field])
                    return out
                A_b, A_f, B_b, B_f = (on_cols(m, sel), on_cols(m, "final"), on_cols(base, sel), on_cols(base, "final"))
                ci = lambda a, b: paired_bootstrap(a, b, n_boot=n_boot)  # noqa: E731
                g_m, g_b = gap_scores(A_b, A_f), gap_scores(B_b, B_f)
                zero = 0 * g_m
                row = {"method": m, "base": base, "metric": metric, "selection": sel, "seeds": seeds,
                       "n_points": next(iter(spans.values()))[1], "n_points_all": len(cols),
                       "points_from": {str(o): [s for s in seeds if spans[s][0] == o]
                                       for o in sorted({o for o, _ in spans.values()})},
                       "final_diff": ci(A_f, B_f), "best_diff": ci(A_b, B_b),
                       "gap": ci(g_m, zero), "base_gap": ci(g_b, zero), "gap_diff": ci(g_m, g_b),
                       "gap_excess_over_half": ci(g_m, 0.5 * g_b)}
                row["higher_final"] = verdict_above_zero(row["final_diff"])
                row["halves_gap"] = verdict_halves(row["gap_excess_over_half"], row["base_gap"])
                out.append(row)
    return out


def train_seconds(r: dict) -> float:
    """Training seconds of a run: the trainer's own clock when the run was trained elsewhere and
    only scored here (then the wall time of this script's train task is just the scoring); for a
    run resumed in another process both count only the last process, so the sum of the history's
    per-epoch step times (every process, without the per-epoch validation) is a floor."""
    return max(r.get("wall_train_seconds") or 0, r.get("train_seconds") or 0, r.get("history_train_seconds") or 0)


def add_history_seconds(records: dict) -> None:
    """``history_train_seconds`` (sum of the epochs' ``train_time_s``) for the runs whose history is here."""
    for r in records.values():
        if r.get("history_train_seconds") is None and r.get("run_dir") and not r.get("imported"):
            h = Path(r["run_dir"]) / "history.json"
            try:
                r["history_train_seconds"] = round(sum(float(e.get("train_time_s") or 0)
                                                       for e in json.loads(h.read_text())), 1)
            except (OSError, ValueError, TypeError, AttributeError):
                pass
