"""The report: the markdown table and its notes, the figure, and the results JSON."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from .aggregate import add_history_seconds, aggregate, claims, paired_claims, train_seconds
from .plan import AA_SUITES, CLAIM_METHODS, LABELS, METHODS, MULTI_SEED, NATURAL_PRESET, TEACHER_SEED, run_key
from .records import aa_at_n, aa_offsets, checkpoints_of, runs_field
from .run import commit, machine_string, write_json_md


def fmt(d: dict, f: str) -> str:
    v = d.get(f)
    if v is None:
        return "–"
    sd = d.get(f + "_std")
    if sd is None and d.get(f + "_one_seed"):
        return f"{v:.2f} (1 seed)"
    return f"{v:.2f}" if sd is None else f"{v:.2f} ± {sd:.2f}"


def diff_str(e: dict, f: str) -> str:
    b, fi = e["best"].get(f), e["final"].get(f)
    if b is None or fi is None:
        return "–"
    return f"{fi - b:+.2f}"


def runs_of(entry: dict) -> list[dict]:
    """A method entry's per-run results (``seed``, ``best``, ``final``): its seeds, or the one run."""
    return entry["seeds"] if "seeds" in entry else [{"seed": entry.get("seed"), "best": entry["best"],
                                                     "final": entry["final"]}]


def points_label(r: dict) -> str:
    """The n column: points per seed, and the points in all where seeds were on different ones."""
    n, n_all = r["n_points"], r.get("n_points_all") or r["n_points"]
    return f"{n}" if n_all == n else f"{n} per seed ({n_all} in all)"


def ci_str(c: dict) -> str:
    return f"{c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def half_width_parts(c: dict, fmt: str, none: str) -> str:
    """The half-width's two sources (paired_stats: points resampled alone / seeds alone), or
    ``none`` for a CI computed before they were kept."""
    if c.get("half_width_points") is None:
        return none
    return fmt.format(p=c["half_width_points"], s=c["half_width_seeds"])


def seed_ranges(keys) -> str:
    """``['adr_s13', 'adr_s14', 'pgd_at_s13']`` -> ``adr seeds 13-14, pgd_at seed 13``."""
    by = {}
    for k in keys:
        m, _, sd = k.rpartition("_s")
        by.setdefault(m, []).append(int(sd))
    parts = []
    for m, ss in by.items():
        ss = sorted(ss)
        runs, start = [], ss[0]
        for a, b in zip(ss, ss[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{m} seed{'s' if len(ss) > 1 else ''} {', '.join(runs)}")
    return ", ".join(parts)


def render_paired(rows: list[dict], s: dict) -> list[str]:
    if not rows:
        return []
    sel_name = {"best": f"val {s.get('val_selection', 'pgd_ce')}", "best_pgd_ce": "val pgd_ce"}
    lines = ["**Paired differences to the base objective** (PGD-AT for the PGD-AT-based methods, TRADES for "
             "TRADES + LTD, and ADR (auto τ/λ) also against hand-set ADR; the same test points and the same seeds; 95 % bootstrap CI over test points and "
             "seeds in brackets; gap = best − final; *selection* = the validation attack that picked *best*). "
             "*Cuts the gap by half*: yes when gap − ½ × base gap is below 0 with 95 % confidence, no when "
             "above, cannot tell when 0 is inside its CI or the base's own gap is not above 0 with confidence; "
             "*higher final* likewise for the final difference. ± half-width ≤ 2 resolves a 3-point difference; "
             "*points / seeds*: the final difference's half-width with only the test points resampled / only the "
             "seeds -- the first narrows with more attacked points (~1/√n), the second with more seeds.",
             "",
             "| Method | base | metric | selection | seeds | n | final − base final | best − base best | gap | "
             "base gap | gap − base gap | cuts the gap by half? | higher final? | final CI ± | points / seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS[r['method']]} | {LABELS[r['base']]} | "
                     f"{'AutoAttack' if r['metric'] == 'autoattack' else 'PGD-20'} | {sel_name[r['selection']]} | "
                     f"{','.join(map(str, r['seeds']))} | {points_label(r)} | {ci_str(r['final_diff'])} | "
                     f"{ci_str(r['best_diff'])} | {ci_str(r['gap'])} | {ci_str(r['base_gap'])} | "
                     f"{ci_str(r['gap_diff'])} | {r['halves_gap']} | {r['higher_final']} | "
                     f"{r['final_diff']['half_width']:.2f} | {half_width_parts(r['final_diff'], '{p:.2f} / {s:.2f}', '–')} |")
    one = sorted({LABELS[r["method"]] for r in rows if len(r["seeds"]) == 1})
    lines += ["", "With one seed the interval covers the test points only, not the seed-to-seed spread"
              + (f" ({', '.join(one)})." if one else "."), ""]
    return lines


def render_markdown(result: dict) -> str:
    """The report: the setup, the table, PGD-AT's overfitting, the verdicts, the paired table, the notes."""
    s, methods = result["setup"], result["methods"]
    lines = _setup_lines(s, methods, paired=bool(result.get("paired"))) + _table_lines(methods) \
        + _pgd_at_lines(s, methods)
    lines += _verdict_lines(result)
    lines += render_paired(result.get("paired", []), s)
    lines += ["Notes:", ""] + [f"- {n}" for n in _notes(result)] + [""]
    return "\n".join(lines)


def _setup_lines(s: dict, methods: dict, paired: bool = True) -> list[str]:
    """The title and the paragraph on the setup (``paired``: whether the report has a paired table,
    which a results file written before it existed has not)."""
    lines = [f"# Robust overfitting on Fashion-MNIST ({s['preset']})", ""]
    lines.append(f"Small CNN (`{s['arch']}`), {s['train_subset']} training images, {s['val_size']} validation images, "
                 f"ℓ∞ ε = {s['eps']:.3g}, PGD-{s['train_attack_steps']} (step {s['alpha']:.4g}) in training, "
                 f"{s['epochs']} epochs, lr {s['lr']} ÷10 at {s['milestones']}, batch {s['batch_size']} "
                 f"({s['steps_per_epoch']} steps/epoch), attack BatchNorm mode `{s['attack_bn_mode']}`. "
                 f"*Best* = the epoch with the highest PGD-10 accuracy on the validation split"
                 + ("" if s.get("val_selection", "pgd_ce") == "pgd_ce" else
                    f" (PGD on the `{s['val_selection']}` loss, `eval.val_attack`; the checkpoint cross-entropy "
                    "PGD-10 would pick is scored too, in the paired table)") + "; *final* = the last "
                 f"epoch. Clean and PGD-20 on the first {s['curve_n']} images of a fixed stratified test subset; "
                 f"AA columns: {s['autoattack']}, on the first **n = {s['autoattack_n']}** of them "
                 + "".join(f"(runs {seed_ranges(ks)}: on images {o}–{int(o) + s['autoattack_n'] - 1} instead, "
                           "fresh points for further seeds; paired per seed) "
                           for o, ks in (s.get("autoattack_offsets") or {}).items()) +
                 f"(standard error ≈ ±{100 * math.sqrt(0.25 / s['autoattack_n']):.1f} points at 50 %). "
                 f"Methods marked (k seeds) show mean ± std over seeds {s['seeds']}"
                 + "".join(f", {LABELS[m]} over {v}" for m, v in (s.get("seeds_of") or {}).items() if m in methods)
                 + (" (those finished: the paired table lists them)" if paired else "")
                 + f"; the others are seed {s['seeds'][0]} only. Diff = final − best (negative: robust overfitting). All numbers in %.")
    lines.append("")
    return lines


def _table_lines(methods: dict) -> list[str]:
    """The main table: AutoAttack, clean and PGD-20 of best and final."""
    lines = []
    lines.append("| Method | AA best | AA final | AA diff | Clean best | Clean final | Clean diff | "
                 "PGD-20 best | PGD-20 final | PGD-20 diff | best epoch |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, e in methods.items():
        lab = e["label"] + (f" ({e['n_seeds']} seeds)" if e["n_seeds"] > 1 else "")
        ep = e["best"]["epoch"]
        ep_s = f"{ep:.0f}" if e["n_seeds"] == 1 else ", ".join(str(r["best"]["epoch"]) for r in e["seeds"])
        lines.append(f"| {lab} | {fmt(e['best'], 'autoattack')} | {fmt(e['final'], 'autoattack')} | "
                     f"{diff_str(e, 'autoattack')} | {fmt(e['best'], 'clean')} | {fmt(e['final'], 'clean')} | "
                     f"{diff_str(e, 'clean')} | {fmt(e['best'], 'pgd20')} | {fmt(e['final'], 'pgd20')} | "
                     f"{diff_str(e, 'pgd20')} | {ep_s} |")
    lines.append("")
    return lines


def _pgd_at_lines(s: dict, methods: dict) -> list[str]:
    """PGD-AT's robust overfitting on the test curve."""
    lines = []
    if "pgd_at" in methods:
        b = methods["pgd_at"]
        pk = b.get("curve_peak", {})
        per_seed = ""
        if b.get("seeds"):
            per_seed = " Per seed: " + "; ".join(
                f"seed {r['seed']}: curve peak {r['curve_peak']['test_pgd']:.1f} % at epoch {r['curve_peak']['epoch']}, "
                f"val-best epoch {r['best']['epoch']}, final PGD-20 {r['final']['pgd20']:.1f} %" for r in b["seeds"]) + "."
        lines.append(f"**PGD-AT robust overfitting.** On the test curve (PGD-20, every {s['test_every']} epochs, "
                     f"mean over seeds) PGD-AT peaks at {pk.get('test_pgd', float('nan')):.1f} % at epoch "
                     f"{pk.get('epoch')} and ends at {pk.get('final_test_pgd', float('nan')):.1f} %, while its training "
                     f"robust accuracy goes from {b['train_robust_acc']['at_best']:.1f} % at the best epoch to "
                     f"{b['train_robust_acc']['last5_mean']:.1f} % (mean of the last 5 epochs).{per_seed}")
        lines.append("")
    return lines


def _verdict_lines(result: dict) -> list[str]:
    """The paired verdicts (AA, best by the preset's validation attack); without paired rows, the unpaired claims."""
    lines = []
    cl = result.get("claims", [])
    prs = [r for r in result.get("paired", []) if r["metric"] == "autoattack" and r["selection"] == "best"]
    if prs:
        # the verdicts come from the paired comparison (same points, same seeds); the unpaired
        # mean-vs-mean "claims" (in the JSON) are not rendered then: their seeds may differ
        widest = max(prs, key=lambda r: r.get("n_points_all") or r["n_points"])   # some seeds on fresh points
        lines.append(f"**Verdicts** (paired: the same {points_label(widest)} test points and the same seeds; AA "
                     "columns; *best* selected by the preset's validation attack; 95 % bootstrap CIs over test "
                     "points and seeds; a difference whose CI contains 0 is 'cannot tell'):")
        lines.append("")
        for r in prs:
            fd, g, bg = r["final_diff"], r["gap"], r["base_gap"]
            lines.append(
                f"- {LABELS[r['method']]} vs {LABELS[r['base']]} (seeds {','.join(map(str, r['seeds']))}): final "
                f"{ci_str(fd)} (CI ± {fd['half_width']:.2f}{half_width_parts(fd, '; ± {p:.2f} from the test points, ± {s:.2f} from the seeds', '')}) → *ends higher*: **{r['higher_final']}**; gap "
                f"{ci_str(g)} vs the base's {ci_str(bg)}, difference {ci_str(r['gap_diff'])} → *cuts the gap by "
                f"half*: **{r['halves_gap']}**.")
        lines.append("")
        cl = []
    if cl:
        lines += _claims_lines(cl)
    return lines


def _claims_lines(cl: list[dict]) -> list[str]:
    """The unpaired claims (mean vs mean, binomial SE): rendered only where no paired row is there."""
    lines = []
    lines.append("**Claims** (gap = best − final; \"halves\" = gap ≤ ½ × PGD-AT's gap; means over seeds where "
                 "there are several):")
    lines.append("")
    lines.append("| Method | metric | gap | PGD-AT gap | cuts gap by ≥ half? | final | PGD-AT final | higher final? "
                 "| final − PGD-AT final (± SE) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for c in cl:
        se = c.get("final_diff_se")
        d = c["final"] - c["pgd_at_final"]
        noise = "" if se is None else (f"{d:+.2f} ± {se:.2f}" + ("" if c["final_diff_beyond_2se"] else " (within 2 SE)"))
        lines.append(f"| {LABELS[c['method']]} | {'AutoAttack' if c['metric'] == 'autoattack' else 'PGD-20'} | "
                     f"{c['gap']:.2f} | {c['pgd_at_gap']:.2f} | {'yes' if c['halves_gap'] else '**no**'} | "
                     f"{c['final']:.2f} | {c['pgd_at_final']:.2f} | {'yes' if c['higher_final'] else '**no**'} | "
                     f"{noise} |")
    lines.append("")
    lines.append("SE: binomial standard error of the difference of the two final accuracies (n points, averaged "
                 "over the seeds measured), treated as unpaired -- conservative, since both are measured on the "
                 "same points. A \"higher\" within 2 SE is not evidence either way.")
    lines.append("")
    for m in CLAIM_METHODS:
        aa = [c for c in cl if c["method"] == m and c["metric"] == "autoattack"]
        if aa:
            c = aa[0]
            verdict = ("holds" if c["halves_gap"] and c["higher_final"] else
                       "does not hold" if not c["halves_gap"] and not c["higher_final"] else "holds only in part")
            within = "" if c.get("final_diff_beyond_2se", True) else \
                f"; the difference is within 2 standard errors, SE {c['final_diff_se']:.2f}"
            lines.append(f"- {LABELS[m]}: {'cuts' if c['halves_gap'] else 'does **not** cut'} PGD-AT's AutoAttack "
                         f"gap by at least half ({c['gap']:.2f} vs {c['pgd_at_gap']:.2f}) and "
                         f"{'ends higher' if c['higher_final'] else 'does **not** end higher'} than PGD-AT in final "
                         f"AutoAttack accuracy ({c['final']:.2f} vs {c['pgd_at_final']:.2f}{within}): the claim "
                         f"{verdict} here.")
    lines.append("")
    return lines


def _notes(result: dict) -> list[str]:
    """The notes under the tables, in order."""
    s, methods = result["setup"], result["methods"]
    dec = {n: e["effective_decays"] for n, e in methods.items() if e.get("effective_decays")}
    notes = [f"Effective per-step EMA decays (paper decay ** ({s['reference_steps_per_epoch']} / "
             f"{s['steps_per_epoch']})): " + ", ".join(f"{n}: " + ", ".join(f"{k} {v:.4f}" for k, v in d.items())
                                                      for n, d in dec.items()) + "."]
    swa = {n: e["swa_start_epoch"] for n, e in methods.items() if e.get("swa_start_epoch") is not None}
    if swa:
        notes.append("SWA starts at epoch " + ", ".join(f"{v} ({n})" for n, v in swa.items()) +
                     " (the first lr decay); SGLR's memory is per epoch already.")
    notes.append(f"Teachers: KD+SWA uses the seed-{TEACHER_SEED} PGD-AT run (its best checkpoint) as robust teacher "
                 f"and a naturally trained `{NATURAL_PRESET}` run (seed {TEACHER_SEED}) as standard teacher, for every "
                 "student seed; LTD uses the same natural teacher.")
    notes += _sanity_notes(s, methods) + _beyond_ce_notes(s, methods) + _more_points_notes(s, methods)
    if s.get("preset") == "fmnist-long":
        notes.append("Every regime tried before this one, with its PGD-AT gap: "
                     "[robust_overfitting_regimes.md](robust_overfitting_regimes.md).")
    if s.get("device", "cpu") != "cpu":
        notes.append(f"Device: {s['device']} -- {result['machine']}. The same table on the CPU is in the file "
                     "without `_gpu`; GPU and CPU runs do not reproduce each other bit for bit.")
    notes += _imported_notes(result, methods)
    for k, pr in (result.get("repeat_runs") or {}).items():
        h, i = pr["here"], pr["imported"]
        f = lambda d, x: "–" if d.get(x) is None else f"{d[x]:.1f}"  # noqa: E731
        notes.append(f"Repeatability: {k} was trained twice with the same settings and seed -- the table uses the "
                     f"imported run ({i['machine']}); trained again here ({h['machine']}) as a teacher: AA best "
                     f"{f(h['best'], 'autoattack')} (epoch {h['best'].get('epoch')}) → final "
                     f"{f(h['final'], 'autoattack')}, PGD-20 {f(h['best'], 'pgd20')} → {f(h['final'], 'pgd20')}, vs "
                     f"imported AA {f(i['best'], 'autoattack')} (epoch {i['best'].get('epoch')}) → "
                     f"{f(i['final'], 'autoattack')}, PGD-20 {f(i['best'], 'pgd20')} → {f(i['final'], 'pgd20')}.")
    if result.get("missing"):
        notes.append("Not finished in this run: " + ", ".join(result["missing"]) + ".")
    notes.append(_compute_note(result, s))
    return notes


def _sanity_notes(s: dict, methods: dict) -> list[str]:
    """AutoAttack <= PGD-20 on the same points, checkpoint by checkpoint."""
    notes = []
    # (aggregate() already dropped AutoAttack results at another n)
    checks = [(n, w, r["seed"], r[w]["autoattack"], r[w]["pgd20_aa_points"]) for n, e in methods.items()
              for r in runs_of(e) for w in ("best", "final")
              if r[w].get("autoattack") is not None and r[w].get("pgd20_aa_points") is not None]
    if checks:
        bad = [c for c in checks if c[3] > c[4] + 1e-9]
        notes.append(f"Sanity: on the same {s['autoattack_n']} points, AutoAttack accuracy ≤ PGD-20 accuracy for "
                     f"{len(checks) - len(bad)} of {len(checks)} checkpoints; mean PGD-20 − AutoAttack "
                     f"{sum(c[4] - c[3] for c in checks) / len(checks):.2f} points" +
                     ("." if not bad else "; **above PGD-20**: " + ", ".join(
                         f"{n} seed {sd} {w} ({aa:.2f} > {pg:.2f})" for n, w, sd, aa, pg in bad) + ".") +
                     " PGD-20 − AutoAttack on those points (best / final; how much PGD-20 overstates robustness): " +
                     ", ".join(f"{e['label']} {e['best']['pgd20_aa_points'] - e['best']['autoattack']:.1f} / "
                               f"{e['final']['pgd20_aa_points'] - e['final']['autoattack']:.1f}"
                               for e in methods.values()
                               if all(e[w].get("pgd20_aa_points") is not None and e[w].get("autoattack") is not None
                                      for w in ("best", "final"))) + "." +
                     f" The PGD-20 columns use the first {s['curve_n']} images, AutoAttack the first "
                     f"{s['autoattack_n']}, which are easier here: compare AutoAttack with PGD-20 only through "
                     "`pgd20_aa_points` in the JSON.")
    return notes


def _beyond_ce_notes(s: dict, methods: dict) -> list[str]:
    """What AutoAttack's stages after APGD-CE remove."""
    notes = []
    beyond_ce = {}
    for n, e in methods.items():
        vals = {w: [r[w]["autoattack_per_attack"]["apgd-ce"] - r[w]["autoattack"] for r in runs_of(e)
                    if (r[w].get("autoattack_per_attack") or {}).get("apgd-ce") is not None
                    and r[w].get("autoattack") is not None] for w in ("best", "final")}
        if vals["best"] and vals["final"]:
            beyond_ce[e["label"]] = tuple(sum(v) / len(v) for v in (vals["best"], vals["final"]))
    if beyond_ce:
        notes.append("What the cross-entropy attacks miss: accuracy after APGD-CE minus the final AutoAttack "
                     "accuracy (points removed by the later stages -- APGD-T" +
                     ("" if s.get("aa_suite") == "apgd" else "/FAB-T/Square") +
                     ", i.e. mostly by the DLR-loss targeted attack; best / "
                     "final): " + ", ".join(f"{k} {b:.1f} / {f:.1f}" for k, (b, f) in beyond_ce.items()) +
                     ". Where this is large, PGD-20 (cross-entropy) and the PGD-10 validation that picks *best* "
                     "overstate robustness, so trust the AutoAttack columns.")
    return notes


def _more_points_notes(s: dict, methods: dict) -> list[str]:
    """Checkpoints attacked on more points than the table uses."""
    notes = []
    more = [(e["label"], r["seed"], r["best"]["autoattack_first_of"], r["best"]["autoattack_all"],
             r["final"]["autoattack_all"]) for e in methods.values() for r in runs_of(e)
            if r["best"].get("autoattack_first_of") and r["final"].get("autoattack_first_of") == 
            r["best"]["autoattack_first_of"] and r["best"].get("autoattack_all") is not None
            and r["final"].get("autoattack_all") is not None]
    if more:
        notes.append("Attacked on more points than the table uses (the table takes the first "
                     f"{s['autoattack_n']}, paired with the other rows): " + "; ".join(
                         f"{lab} seed {sd}: best {b:.1f} → final {f:.1f} (gap {b - f:.1f}) on {n}"
                         for lab, sd, n, b, f in more) + ".")
    return notes


def _imported_notes(result: dict, methods: dict) -> list[str]:
    """Where imported runs came from, and their teachers and curves."""
    s, notes = result["setup"], []
    imp = result.get("imported") or {}
    if imp:
        by_file = {}
        for k, v in imp.items():
            by_file.setdefault((v["file"], v["sha256"][:12], v.get("commit"), v.get("machine")), []).append(k)
        for (f, sha, com, mach), keys in by_file.items():
            notes.append(f"Imported from an earlier results file (`--import-results`; the runs' weights were not "
                         f"kept, their records and per-point outcomes were): {', '.join(sorted(keys))} -- from "
                         f"`{Path(f).name}` (sha256 {sha}…), package commit {com}, {mach}.")
        students = sorted(k for k in imp if k.rsplit("_s", 1)[0] in ("kd_swa", "ltd"))
        retrained = s.get("teachers_trained_here") or []
        if students and retrained:
            notes.append(f"Teachers: the imported students ({', '.join(students)}) learned from the teachers of "
                         f"the file they came from; {', '.join(retrained)} were trained again here (their weights "
                         "were needed) and teach the students trained here -- same settings and seed, but CPU "
                         "training does not repeat bit for bit across machines and torch versions.")
        no_curve = [f"{e['label']} (seeds {', '.join(map(str, e['curve_seeds']))})" for e in methods.values()
                    if "curve_seeds" in e]
        if no_curve:
            notes.append("Mean curves over the runs that kept a per-seed curve (older results files kept only "
                         "the mean): " + ", ".join(no_curve) + ".")
    return notes


def _compute_note(result: dict, s: dict) -> str:
    """The compute the runs took, and the machine."""
    notes = []
    c = result["compute_min"]
    notes.append(f"Compute: {c['train']:.0f} min of training and {c['autoattack']:.0f} min of AutoAttack, summed over "
                 f"the {result['n_runs']} runs" + (
                     " (of which {train:.0f} / {autoattack:.0f} min for the {runs} imported runs, measured on their "
                     "machine, named above)".format(**result["compute_min_imported"])
                     if result.get("compute_min_imported") else "") +
                 f" (one thread each, {s['jobs']} side by side" +
                 (f"; wall clock of the invocation that wrote this report: {result['wall_clock_min']:.0f} min, "
                  "runs reused from earlier invocations not included" if result.get("wall_clock_min") is not None
                  else "") + f"); {result['machine']}." +
                 (" Per run (train / AutoAttack, min): " + ", ".join(
                     f"{k} {v['train']:.0f} / {v['autoattack']:.0f}" for k, v in result["compute_per_run_min"].items())
                  + "." if result.get("compute_per_run_min") else "") +
                 (f" Package commit {s['commit']}." if s.get("commit") else "") +
                 " Training minutes of a run resumed after an interruption are at least the sum of its epochs' "
                 "step times (the validation attacks of those epochs not counted).")
    return notes[0]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, e in result["methods"].items():
        c = e.get("curve") or []
        if not c:
            continue
        ep = [r["epoch"] for r in c]
        lab = e["label"] + (f" ({e['n_seeds']} seeds)" if e["n_seeds"] > 1 else "")
        lw = 2.6 if name == "pgd_at" else 1.3
        ax1.plot(ep, [r["test_pgd"] for r in c], label=lab, lw=lw, color="black" if name == "pgd_at" else None)
        ax2.plot(ep, [r["test_clean"] for r in c], label=lab, lw=lw, color="black" if name == "pgd_at" else None)
    s = result["setup"]
    for ax, t in ((ax1, f"test PGD-20 accuracy (first {s['curve_n']} test images)"),
                  (ax2, "test clean accuracy")):
        for m in s["milestones"]:
            ax.axvline(m, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"Robust overfitting, Fashion-MNIST {s['train_subset']} images, small CNN, eps {s['eps']:.3g}")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def results_setup(records: dict, jobs: list, args, p: dict, cfg, methods: dict) -> dict:
    """The results file's ``setup``: the preset's settings, the seeds, the suite, where things ran."""
    multi = p.get("multi_seed", MULTI_SEED)
    device = getattr(args, "device", "cpu")
    spe = next((r["steps_per_epoch"] for r in records.values()), None)
    setup = {
        "preset": args.preset, "dataset": "fashion_mnist", "arch": cfg.model.arch,
        "train_subset": p["train_subset"], "val_size": p["val_size"], "test_subset": p["test_subset"],
        "curve_n": p["curve_n"], "test_every": p["test_every"],
        "eps": cfg.attack.eps, "alpha": cfg.attack.alpha, "train_attack_steps": cfg.attack.steps,
        "attack_bn_mode": cfg.attack.bn_mode, "val_attack": "PGD-10", "test_attack": "PGD-20",
        "val_selection": p.get("val_attack", "pgd_ce"),
        "epochs": p["epochs"], "milestones": p["milestones"], "lr": cfg.optim.lr, "batch_size": p["batch_size"],
        "steps_per_epoch": spe, "reference_steps_per_epoch": cfg.train.reference_steps_per_epoch,
        "aa_suite": p.get("aa_suite", "standard"),
        "autoattack": AA_SUITES[p.get("aa_suite", "standard")] if not p["aa_params"]
        else f"standard with reduced settings {p['aa_params']} (smoke only, not comparable)",
        "autoattack_n": p["aa_n"], "seeds": args.seeds, "multi_seed_methods": list(multi),
        "seeds_of": getattr(args, "seeds_of", None) or {},
        # runs attacked on other test points than the first aa_n (--aa-offset): offset -> runs
        "autoattack_offsets": aa_offsets(records),
        # teachers whose run directory is here (trained on this machine), for the students imported
        "teachers_trained_here": [j["key"] for j in jobs if j["key"] in (
            run_key("pgd_at", TEACHER_SEED), run_key("natural", TEACHER_SEED))
            and (Path(j["out_dir"]) / "benchmark_record.json").exists()],
        "jobs": args.jobs, "threads_per_job": 1, "out": str(args.out), "device": device,
        "presets": {n: METHODS[n] for n in methods}, "teacher_preset": NATURAL_PRESET,
        "overrides": [o for o in (jobs[0]["overrides"] if jobs else []) if not o.startswith("train.seed")],
        "commit": commit(),
    }
    return setup


def _repeat_runs(records: dict, shadowed, p: dict, device: str) -> dict:
    """The same run (settings, seed) trained twice: here and on the machine of the imported record."""
    out = {}
    for k, here in sorted((shadowed or {}).items()):
        if k in records:
            pair = {}
            for tag, r in (("here", aa_at_n(here, p["aa_n"])), ("imported", aa_at_n(records[k], p["aa_n"]))):
                pair[tag] = {w: {f: r[w].get(f) for f in ("epoch", "clean", "pgd20", "autoattack")}
                             for w in ("best", "final") if w in r}
                pair[tag]["machine"] = (r.get("imported") or {}).get("machine") or machine_string(device)
            out[k] = pair
    return out


def write_results(records, jobs, args, p, t_start, results_dir: Path, missing=(), shadowed=None):
    """The JSON / markdown / plot.  ``shadowed``: runs trained here whose imported record the table
    uses instead (``--prefer-imported``): both are compared in a note (repeatability)."""
    from rb_labelrefine.config import load_config

    cfg = load_config(METHODS["pgd_at"], jobs[0]["overrides"] if jobs else [])
    device = getattr(args, "device", "cpu")
    multi = p.get("multi_seed", MULTI_SEED)
    add_history_seconds(records)
    methods = aggregate(records, args.seeds, p["aa_n"], multi)
    setup = results_setup(records, jobs, args, p, cfg, methods)
    result = {"setup": setup, "machine": machine_string(device), "methods": methods,
              "natural_teacher": records.get(run_key("natural", TEACHER_SEED), {}).get("final"),
              "wall_clock_min": (time.time() - t_start) / 60 if t_start is not None else None,
              "n_runs": len(records),
              # per-run compute (one thread each), summed: correct even when the runs were spread
              # over several invocations (the wall clock above covers only this invocation)
              "compute_min": {"train": sum(train_seconds(r) for r in records.values()) / 60,
                              "autoattack": sum(r.get("autoattack_seconds") or 0 for r in records.values()) / 60},
              "compute_per_run_min": {k: {"train": train_seconds(r) / 60,
                                          "autoattack": (r.get("autoattack_seconds") or 0) / 60}
                                      for k, r in sorted(records.items())},
              "missing": list(missing)}
    imp_recs = [r for r in records.values() if r.get("imported")]
    if imp_recs:   # measured on the machine of the file they came from
        result["compute_min_imported"] = {"runs": len(imp_recs), "train": sum(train_seconds(r) for r in imp_recs) / 60,
                                          "autoattack": sum(r.get("autoattack_seconds") or 0 for r in imp_recs) / 60}
    result["claims"] = claims(methods, {"autoattack": p["aa_n"], "pgd20": p["curve_n"]})
    result["paired"] = paired_claims(records, p["aa_n"])
    # every checkpoint's per-point outcomes (0/1 strings over the first curve_n / aa_n test points)
    result["per_point"] = {k: {w: {f: r[w][f] for f in ("clean_points", "pgd20_points", "autoattack_points",
                                                          "autoattack_stage_points")
                                   if r[w].get(f) is not None} for w in checkpoints_of(r)}
                           for k, r in sorted(records.items())}
    # every run's whole record (its per-point outcomes are under per_point): what --import-results
    # takes back when the run directories are gone
    result["runs"] = runs_field(records)
    result["imported"] = {k: r["imported"] for k, r in sorted(records.items()) if r.get("imported")}
    # the same run (settings, seed) trained twice: here and on the machine of the imported record
    result["repeat_runs"] = _repeat_runs(records, shadowed, p, device)
    base = results_dir / f"robust_overfitting_{p['tag']}"
    write_json_md(base, result, render_markdown(result))
    try:
        plot(result, base.with_suffix(".png"))
    except Exception as exc:  # the table matters more than the figure
        print(f"warning: plot failed: {exc}", file=sys.stderr)
    return result
