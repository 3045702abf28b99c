#!/usr/bin/env python
"""Robust overfitting, second table: each method's label knobs tuned on the validation split.

The first table (``robust_overfitting.py``) runs every method with its paper's CIFAR-10 setting.
The papers tuned those knobs per data set, so this table gives every method the same tuning
budget on this data set first, then runs the chosen setting on fresh seeds and compares it with
its base objective exactly as the first table does (paired bootstrap CIs, verdicts):

    python benchmarks/robust_overfitting_tuned.py --preset fmnist-long [--jobs 2] [--out DIR]
           [--methods adr sglr ...] [--seeds 0 1 2 3] [--results-dir DIR] [--data-root DIR]
    python benchmarks/robust_overfitting_tuned.py --preset smoke --methods label_smoothing   # ~1 min
    python benchmarks/robust_overfitting_tuned.py --tune-only ...     # the trials and the choice only
    python benchmarks/robust_overfitting_tuned.py --report-only --preset fmnist-long --out DIR
    python benchmarks/robust_overfitting_tuned.py ... --import-results \
           benchmarks/results/robust_overfitting_tuned_fmnist_long.json \
           benchmarks/results/robust_overfitting_fmnist_long.json   # run folders gone: reuse the files

Protocol (fixed before any run, in ``tuning_grid.json``):

* **Grid.** K = 4 trials per tuned method, the same K for every one (ADR λ/τ, SGLR α/T, KD+SWA
  weights/T, LTD τ, label-smoothing ε).  Trial 0 is the method's preset -- the first table's
  setting -- so tuning can only move away from it when validation prefers another value, and ties
  go to it.  K = 4 is a 2 × 2 design for the two-knob methods over values the papers themselves
  used (ADR's CIFAR-10 / CIFAR-100 / TinyImageNet λ and τ; SGLR's Table 4; KD+SWA's paper and code
  weights) and four points along the one knob of LTD (its Table 6) and label smoothing; K = 8
  would double the ~3-3.7 CPU-hours of tuning below for a selection that 200 validation images (standard
  error ~3.5 points at 50 %) could barely resolve.  The run folder keeps a copy of the grid and
  its sha256; a later invocation with another grid is refused (start a new ``--out``).
* **Bases.** PGD-AT and TRADES have no label knob: one trial each, their preset.  Their other
  settings (ε, steps, lr schedule, epochs, β) are the protocol, shared by every row and tuned for
  none; the table shows each row's number of trials.
* **Selection.** Trials run on the first seed only (``--seeds``' first; the KD / LTD teachers are
  the seed-0 runs, as in the first table).  The chosen trial is the one with the highest
  validation robust accuracy under the preset's validation attack (fmnist-long: PGD-10 on the
  margin loss, ``val_pgd_margin`` in ``history.json``) **at the final epoch** -- the table's
  question is whether a method ends robust (final) and how much it loses from its best epoch;
  selecting on the best epoch's validation score would reward settings that peak and then
  overfit, the behaviour the methods are meant to cure.  Only ``history.json``'s validation
  entries are read: the trials' test numbers never enter the choice (a test checks that
  permuting them cannot change it).  All K trials of a method must be finished before it is
  selected.
* **Table.** The chosen setting, and each base, run on the remaining seeds (``--seeds[1:]``;
  fmnist-long: 1, 2, 3 -- three seeds like the first table); the tuning seed is *not* in the
  table, so the optimism of picking the highest of K validation scores does not reach the test
  numbers.  Best and final are scored and attacked exactly as in the first table
  (``robust_overfitting.run_job``), and each method is compared with its base
  (``robust_overfitting.paired_claims``).  Trials are trained and scored with PGD-20 but not
  attacked with AutoAttack, and their test curve is evaluated only at the last epoch.

Runs execute in a pool of ``--jobs`` one-thread processes; a finished run (trial or table) is
reused when the script is started again with the same ``--out``, an interrupted one resumed from
its checkpoint; the JSON and markdown are rewritten after every finished task.

Compute of the full fmnist-long table, measured (2026-12-02, the 2-core AMD EPYC box, no GPU, one
thread per run, 2 side by side): a trial ~6 min (94 CPU-min for 16 trials; AutoAttack and the test
curve skipped), a table run ~7-8.5 min of training + ~3 min of AutoAttack (APGD-CE + APGD-T on 500
points, best + final + CE-selected best); the two teachers were the first table's seed-0 runs,
copied into ``--out``.  20 trials + 16 table runs (5 base runs imported from the first table's
JSON) took two sessions, ~2.9 h of wall clock in all (23 + ~148 min).  (The estimate made before the run,
~4.2-5.2 h, assumed 1000 AutoAttack points and the slower Intel box.)

Run folders do not outlive a machine; the results file does.  ``--import-results`` takes back
finished trials (their record and validation scores -- all the selection reads; the file must have
been written with this grid and selection key, each trial's overrides must equal the job's) and
finished table runs (``robust_overfitting.import_results``: overrides and AutoAttack coverage
checked) from this script's own JSON, and the base rows' table runs from the first table's JSON
(the same runs: on 2026-12-02 the committed first table gave pgd_at_s1-s3 and trades_s1-s2, 5 of
the 21 table runs).  A teacher is trained again only while a trial or table run still needs its
weights.  So the table can be built over several sessions: commit the JSON, pass it next time.

Copying the first table's finished ``pgd_at_s0``, ``natural_s0``, ``pgd_at_s1``, ``pgd_at_s2``,
``trades_s1``, ``trades_s2`` folders into the new ``--out`` first saves ~75-90 min: they are the
same runs (same preset and overrides), and ``run_job`` reuses them (checked on the smoke preset).

Outputs (``--results-dir``, default ``benchmarks/results``, ``--out`` for ``smoke``):
``robust_overfitting_tuned_<tag>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import robust_overfitting as ro  # noqa: E402  (run_job, aggregation and the paired statistics)

REPO = ro.REPO
GRID_FILE = HERE / "tuning_grid.json"
TUNED_SEEDS = {"fmnist-long": [0, 1, 2, 3]}   # tuning seed + the first table's three seeds' worth
DEFAULT_METHODS = ["pgd_at", "trades", "adr", "sglr", "kd_swa", "ltd", "label_smoothing"]
SELECT_ON = ("final", "best")


class GridError(ValueError):
    pass


# ----------------------------------------------------------------------------- the grid

def canonical(grid: dict) -> str:
    return json.dumps(grid, sort_keys=True, separators=(",", ":"))


def grid_sha(grid: dict) -> str:
    return hashlib.sha256(canonical(grid).encode()).hexdigest()


def load_grid(path: Path) -> dict:
    """Read and check a tuning grid: the same K trials for every tuned method, distinct trials,
    every method known, every base a base; a clear GridError otherwise."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text())
    except OSError as exc:
        raise GridError(f"cannot read the tuning grid {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise GridError(f"{path} is not valid JSON: {exc}") from None
    validate_grid(grid, str(path))
    return grid


def validate_grid(grid: dict, where: str = "grid") -> None:
    if not isinstance(grid, dict) or not isinstance(grid.get("methods"), dict):
        raise GridError(f"{where}: needs a 'methods' object (method name -> list of trials)")
    k = grid.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise GridError(f"{where}: 'k' (trials per method) must be an integer >= 1, got {k!r}")
    if grid.get("select_on", "final") not in SELECT_ON:
        raise GridError(f"{where}: 'select_on' must be one of {list(SELECT_ON)}, got {grid.get('select_on')!r}")
    bases = grid.get("bases", [])
    for b in bases:
        if b not in set(ro.BASES.values()):
            raise GridError(f"{where}: base {b!r} is not a base objective (one of {sorted(set(ro.BASES.values()))})")
    for m, trials in grid["methods"].items():
        if m not in ro.METHODS or m in set(ro.BASES.values()):
            raise GridError(f"{where}: {m!r} is not a method with a base (one of {sorted(ro.BASES)})")
        if ro.BASES[m] not in bases:
            raise GridError(f"{where}: {m}'s base {ro.BASES[m]!r} is missing from 'bases'")
        if not isinstance(trials, list) or len(trials) != k:
            n = len(trials) if isinstance(trials, list) else type(trials).__name__
            raise GridError(f"{where}: {m} has {n} trials; every method must have k = {k} (the same budget)")
        seen = set()
        for i, t in enumerate(trials):
            if not isinstance(t, dict) or not t:
                raise GridError(f"{where}: {m} trial {i} must be a non-empty object of method settings")
            if canonical(t) in seen:
                raise GridError(f"{where}: {m} trial {i} repeats an earlier trial: {t}")
            seen.add(canonical(t))


def trial_overrides(values: dict) -> list[str]:
    """Config overrides of one trial's method settings (``method.<field>=<value>``)."""
    return [f"method.{k}={json.dumps(v)}" for k, v in sorted(values.items())]


def check_grid_loads(grid: dict, preset_overrides: Optional[list[str]] = None) -> None:
    """Every trial is a valid config of its method's preset (catches misspelt fields before a run)."""
    from rb_labelrefine.config import load_config

    for m, trials in grid["methods"].items():
        for i, t in enumerate(trials):
            try:
                load_config(ro.METHODS[m], list(preset_overrides or []) + trial_overrides(t))
            except Exception as exc:
                raise GridError(f"{m} trial {i} {t}: not a valid setting of {ro.METHODS[m]}: {exc}") from None


def lock_grid(out: Path, grid: dict) -> None:
    """Store the grid in the run folder the first time; refuse another grid afterwards."""
    f = out / "tuning_grid.json"
    sha = grid_sha(grid)
    if f.exists():
        old = json.loads(f.read_text())
        if old.get("sha256") != sha:
            raise GridError(f"{out} was started with another tuning grid (sha256 {old.get('sha256')}, this one {sha}); "
                            "the grid is fixed before the runs: use a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": sha, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "grid": grid}, indent=1))
    os.replace(tmp, f)


# ----------------------------------------------------------------------------- selection

def val_key(p: dict) -> str:
    """history.json's entry for the preset's validation attack (what the selection reads)."""
    va = p.get("val_attack", "pgd_ce")
    return "val_pgd" if va == "pgd_ce" else f"val_{va}"


def trial_scores(history: list[dict], key: str) -> dict:
    """A trial's validation scores: at the final epoch, and its highest over the epochs.  Reads
    only ``key`` (a validation entry) of the history rows."""
    if not key.startswith("val_"):
        raise ValueError(f"selection must use a validation entry, got {key!r}")
    vals = [(r["epoch"], r.get(key)) for r in history]
    if not vals or any(v is None for _, v in vals):
        raise ValueError(f"history has no {key!r} at every epoch (is there a validation split and that attack?)")
    ep_best, v_best = max(vals, key=lambda ev: (ev[1], -ev[0]))
    return {"final": vals[-1][1], "final_epoch": vals[-1][0], "best": v_best, "best_epoch": ep_best}


def select(scores: list[dict], select_on: str) -> int:
    """Index of the trial with the highest score (``select_on``: final or best); ties go to the
    earliest trial (trial 0 = the preset)."""
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    if not scores:
        raise ValueError("no trials to select from")
    return max(range(len(scores)), key=lambda i: (scores[i][select_on], -i))


def select_method(trial_dirs: list, key: str, select_on: str) -> dict:
    """Selection from the trials' run folders (their history.json only)."""
    scores = [own_scores({"out_dir": d}, key) for d in trial_dirs]
    return {"chosen": select(scores, select_on), "scores": scores, "key": key, "select_on": select_on}


# ----------------------------------------------------------------------------- jobs

def own_scores(trial: dict, key: str) -> dict:
    """A trial's validation scores from its own folder's history.json."""
    from rb_labelrefine.runs import RUN_FILES

    return trial_scores(json.loads((Path(trial["out_dir"]) / RUN_FILES["history"]).read_text()), key)


def pending_tasks(teachers: dict, trials: dict, table_jobs: dict, trial_recs: dict, table_recs: dict,
                  tune_only: bool = False) -> list:
    """The tasks left: trials and table runs without a record (imported ones are done), and the
    teachers a remaining trial or table run needs (a teacher is trained only for its weights)."""
    todo_trials = [t for ts in trials.values() for t in ts if t["key"] not in trial_recs]
    todo_table = [] if tune_only else [j for js in table_jobs.values() for j in js if j["key"] not in table_recs]
    needed = {d for j in todo_trials + todo_table for d in j["deps"]}
    return [("train", j) for j in teachers.values() if j["key"] in needed] + \
        [("trial", t) for t in todo_trials] + [("train", j) for j in todo_table]


def _repo_rel(path) -> str:
    """A path as the report shows it: relative to the repository when inside it (the committed
    grid is ``benchmarks/tuning_grid.json`` wherever the checkout is)."""
    path = Path(path).resolve()
    return str(path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path)


def attacked(rec: dict, aa_n: int) -> bool:
    """A table run's AutoAttack is done for this table: its best and final checkpoints attacked on
    ``aa_n`` points, or on more with their per-point outcomes (``robust_overfitting.covers``)."""
    return all(ro.covers(rec.get(w) or {}, aa_n) for w in ("best", "final"))


def _trial_key(m: str, i: int, seed: int) -> str:
    return f"{m}_t{i}_s{seed}"


def plan(methods, seeds, p: dict, out: Path, grid: dict, data_root=None):
    """(teacher jobs, trial jobs by method, table jobs by row).  Table jobs of a tuned method get
    their chosen setting's overrides only after selection (``with_setting``)."""
    if len(seeds) < 2:
        raise GridError(f"need at least two seeds (the first tunes, the others make the table), got {list(seeds)}")
    tune, table_seeds = seeds[0], list(seeds[1:])
    if tune in table_seeds:
        raise GridError(f"the tuning seed {tune} must not be a table seed too")
    tuned = [m for m in ro.PRIORITY if m in methods and m in grid["methods"]]   # most important first
    unknown = [m for m in methods if m not in grid["methods"] and m not in grid.get("bases", [])]
    if unknown:
        raise GridError(f"{unknown}: not in the tuning grid (tuned: {sorted(grid['methods'])}, "
                        f"bases: {grid.get('bases', [])})")
    rows = [m for m in ro.METHODS if m in methods or m in {ro.BASES[t] for t in tuned}]
    p = dict(p, multi_seed=list(rows))
    teachers, trials = {}, {}
    for m in tuned:
        for j in ro.build_jobs([m], [tune], p, out, data_root, order="method"):
            if j["method"] != m:
                teachers[j["key"]] = j
                continue
            trials[m] = []
            for i, values in enumerate(grid["methods"][m]):
                t = copy.deepcopy(j)
                t.update(key=_trial_key(m, i, tune), out_dir=str(out / "trials" / _trial_key(m, i, tune)),
                         trial=i, values=values,
                         overrides=j["overrides"] + trial_overrides(values) + [f"eval.test_every={p['epochs']}"])
                trials[m].append(t)
    table = {m: [j for j in ro.build_jobs([m], table_seeds, p, out, data_root, order="method") if j["method"] == m]
             for m in rows}
    for js in table.values():   # a teacher and a table run can be the same run (a table seed 0)
        for j in js:
            teachers.pop(j["key"], None)
    return teachers, trials, table


def with_setting(job: dict, values: Optional[dict]) -> dict:
    j = copy.deepcopy(job)
    if values:
        j["overrides"] = j["overrides"] + trial_overrides(values)
        j["values"] = values
    return j


# ----------------------------------------------------------------------------- report

def _values_s(v: Optional[dict]) -> str:
    return "preset (no label knob)" if not v else ", ".join(f"{k} {x}" for k, x in v.items())


def build_result(args, p, grid, trials, table, selections, trial_recs, table_recs, t_start, missing,
                 trial_scores_of=None, import_notes=()):
    cfg_over = next((j["overrides"] for js in table.values() for j in js), [])
    from rb_labelrefine.config import load_config

    cfg = load_config(ro.METHODS["pgd_at"], cfg_over)
    rows = list(table)
    methods = ro.aggregate(table_recs, args.seeds[1:], p["aa_n"], rows)
    for m, e in methods.items():
        e["trials"] = len(trials.get(m, [])) or 1
        e["setting"] = (grid["methods"][m][selections[m]["chosen"]] if m in selections else None)
    trials_out = {}
    for m, ts in trials.items():
        sel = selections.get(m)
        trials_out[m] = [{"trial": t["trial"], "key": t["key"], "values": t["values"], "run_dir": t["out_dir"],
                          "train_min": ro.train_seconds(trial_recs[t["key"]]) / 60 if t["key"] in trial_recs else None,
                          "val_score": sel["scores"][t["trial"]] if sel else None,
                          "chosen": bool(sel and sel["chosen"] == t["trial"])} for t in ts]
    recs = {**trial_recs, **table_recs}
    setup = {
        "preset": args.preset, "dataset": "fashion_mnist", "arch": cfg.model.arch,
        "train_subset": p["train_subset"], "val_size": p["val_size"], "test_subset": p["test_subset"],
        "curve_n": p["curve_n"], "test_every": p["test_every"], "batch_size": p["batch_size"],
        "aa_suite": p.get("aa_suite", "standard"), "device": "cpu",
        "eps": cfg.attack.eps, "alpha": cfg.attack.alpha,
        "train_attack_steps": cfg.attack.steps, "epochs": p["epochs"], "milestones": p["milestones"],
        "val_selection": p.get("val_attack", "pgd_ce"), "selection_key": val_key(p),
        "val_attack_steps": cfg.eval.val_attack_steps,
        "select_on": grid.get("select_on", "final"), "k": grid["k"],
        "grid_file": _repo_rel(args.grid), "grid_sha256": grid_sha(grid), "grid": grid,
        "tuning_seed": args.seeds[0], "table_seeds": args.seeds[1:],
        "autoattack": ro.AA_SUITES[p.get("aa_suite", "standard")] if not p["aa_params"]
        else f"standard with reduced settings {p['aa_params']} (smoke only, not comparable)",
        "autoattack_n": p["aa_n"], "jobs": args.jobs, "threads_per_job": 1, "out": str(args.out),
        "presets": {m: ro.METHODS[m] for m in rows}, "commit": ro.commit(),
    }
    return {
        "setup": setup, "machine": ro.machine_string(), "selection": selections, "trials": trials_out,
        "methods": methods, "paired": ro.paired_claims(table_recs, p["aa_n"]),
        "per_point": {k: {w: {f: r[w][f] for f in ("clean_points", "pgd20_points", "autoattack_points",
                                                     "autoattack_stage_points")
                              if r[w].get(f) is not None} for w in ro.checkpoints_of(r)}
                      for k, r in sorted(table_recs.items())},
        "n_runs": {"trials": len(trial_recs), "table": len(table_recs)},
        "compute_min": {"trials_train": sum(ro.train_seconds(r) for r in trial_recs.values()) / 60,
                        "table_train": sum(ro.train_seconds(r) for r in table_recs.values()) / 60,
                        "autoattack": sum(r.get("autoattack_seconds") or 0 for r in recs.values()) / 60},
        "wall_clock_min": (time.time() - t_start) / 60 if t_start is not None else None,
        "missing": list(missing),
        # what --import-results takes back when the run folders are gone: each trial's record and
        # its validation scores (the selection), each table run's record (per-point strings above)
        "trial_runs": {k: {"record": {f: v for f, v in r.items() if f not in ro.CHECKPOINTS and f != "reused"},
                           "scores": (trial_scores_of or {}).get(k)} for k, r in sorted(trial_recs.items())},
        "runs": ro.runs_field(table_recs),
        "imported": {k: r["imported"] for k, r in sorted(recs.items()) if r.get("imported")},
        "import_notes": list(import_notes),
    }


def render_markdown(res: dict) -> str:
    s = res["setup"]
    sel_name = f"`{s['selection_key']}`"
    lines = [f"# Robust overfitting with tuned label knobs, Fashion-MNIST ({s['preset']})", "",
             f"Same setting as the first table (small CNN `{s['arch']}`, {s['train_subset']} training images, "
             f"{s['val_size']} validation images, ℓ∞ ε = {s['eps']:.3g}, {s['epochs']} epochs, lr ÷10 at "
             f"{s['milestones']}), but each method's label knobs chosen first from the grid `{s['grid_file']}` "
             f"(sha256 `{s['grid_sha256'][:12]}`, fixed before the runs): **K = {s['k']} trials per tuned method**, "
             f"trial 0 = the first table's preset; the bases (PGD-AT, TRADES) have no label knob and get 1 trial. "
             f"Trials on seed {s['tuning_seed']}; the chosen trial has the highest validation robust accuracy "
             f"({sel_name}, PGD-{s['val_attack_steps']} on the `{s['val_selection']}` loss, validation split only) at the "
             f"**{s['select_on']}** epoch, ties to the earlier trial. The table is the chosen setting (and each base) "
             f"on seeds {s['table_seeds']} -- the tuning seed is not in it. AutoAttack {s['autoattack']} on the "
             f"first n = {s['autoattack_n']} test points; PGD-20 and clean on the first {s['curve_n']}. All in %.", ""]
    lines += ["**Trials** (validation scores; the test set is not read for the choice):", "",
              f"| Method | trial | setting | val {s['select_on']} epoch (selection) | val best epoch (epoch) | chosen |",
              "|---|---|---|---|---|---|"]
    for m, ts in res["trials"].items():
        for t in ts:
            v = t["val_score"]
            lines.append(f"| {ro.LABELS[m]} | {t['trial']} | {_values_s(t['values'])} | "
                         + (f"{v[s['select_on']]:.2f} | {v['best' if s['select_on'] == 'final' else 'final']:.2f} "
                            f"({v['best_epoch' if s['select_on'] == 'final' else 'final_epoch']}) | "
                            if v else "– | – | ") + ("**yes**" if t["chosen"] else "") + " |")
    lines += ["", "| Method | trials | chosen setting | seeds | AA best | AA final | AA diff | PGD-20 best | "
              "PGD-20 final | PGD-20 diff | Clean final | best epochs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, e in res["methods"].items():
        eps_ = ", ".join(f"{r['best']['epoch']:.0f}" for r in ro.runs_of(e))
        lines.append(f"| {e['label']} | {e['trials']} | {_values_s(e['setting'])} | "
                     f"{','.join(map(str, e['seeds_used']))} | {ro.fmt(e['best'], 'autoattack')} | "
                     f"{ro.fmt(e['final'], 'autoattack')} | {ro.diff_str(e, 'autoattack')} | {ro.fmt(e['best'], 'pgd20')} | "
                     f"{ro.fmt(e['final'], 'pgd20')} | {ro.diff_str(e, 'pgd20')} | {ro.fmt(e['final'], 'clean')} | "
                     f"{eps_} |")
    lines += [""] + ro.render_paired(res["paired"], s)
    c = res["compute_min"]
    notes = [f"Compute: {c['trials_train']:.0f} min of trial training, {c['table_train']:.0f} min of table training, "
             f"{c['autoattack']:.0f} min of AutoAttack ({res['n_runs']['trials']} trials, {res['n_runs']['table']} "
             f"table runs, one thread each, {s['jobs']} side by side); {res['machine']}."
             + (f" Package commit {s['commit']}." if s.get("commit") else "")]
    imp = res.get("imported") or {}
    if imp:
        srcs = sorted({(v.get("sha256", "")[:12], v.get("machine") or "?") for v in imp.values()})
        notes.append(f"{len(imp)} runs imported from results files (trained there; their minutes above were "
                     f"measured on that machine): " + "; ".join(f"sha256 {h}, {mch}" for h, mch in srcs)
                     + ". Imported: " + ", ".join(sorted(imp)) + ".")
    if res["missing"]:
        notes.append("Not finished: " + ", ".join(res["missing"]) + ".")
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_report(res: dict, results_dir: Path, tag: str) -> None:
    ro.write_json_md(results_dir / f"robust_overfitting_tuned_{tag}", res, render_markdown(res))


# ----------------------------------------------------------------------------- main

def import_trials(path: Path, trials: dict, grid: dict, p: dict, key: str):
    """Finished trials from a results file this script wrote (``trial_runs``), for the trials that
    have no record in their own folder: ``(records, scores, notes)``.  A trial's choice needs only
    its validation scores, which the file keeps; the file must have been written with this grid
    (sha256) and selection key, and each trial's overrides must equal the job's.  A file without
    ``trial_runs`` (the first table's) has no trials: nothing is taken.  Read with ``json`` only."""
    import hashlib

    raw = Path(path).read_bytes()
    try:
        res = json.loads(raw)
    except ValueError as exc:
        raise SystemExit(f"error: --import-results {path}: not JSON ({exc})")
    if not isinstance(res, dict) or not isinstance(res.get("setup"), dict):
        raise SystemExit(f"error: --import-results {path}: not a results file of these scripts (no 'setup')")
    if "trial_runs" not in res:
        return {}, {}, []
    s = res["setup"]
    want = {"grid_sha256": grid_sha(grid), "selection_key": key, "select_on": grid.get("select_on", "final"),
            "train_subset": p["train_subset"], "val_size": p["val_size"], "epochs": p["epochs"],
            "milestones": p["milestones"], "batch_size": p["batch_size"]}
    bad = [f"{k}: file {s.get(k)!r}, here {v!r}" for k, v in want.items() if s.get(k) != v]
    if bad:
        raise SystemExit(f"error: --import-results {path}: its trials were run with other settings ({'; '.join(bad)})")
    if not isinstance(res["trial_runs"], dict):
        raise SystemExit(f"error: --import-results {path}: 'trial_runs' is not an object")
    prov = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "commit": s.get("commit"),
            "machine": res.get("machine")}
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    recs, scores, notes = {}, {}, []
    for t in (t for ts in trials.values() for t in ts):
        e = res["trial_runs"].get(t["key"])
        if e is None:
            continue
        if _finished(t) is not None:
            notes.append(f"{t['key']}: its own run folder has a record; that one is used")
            continue
        rec, sc = (e.get("record"), e.get("scores")) if isinstance(e, dict) else (None, None)
        if not isinstance(rec, dict) or not isinstance(sc, dict) or not all(
                num(sc.get(f)) for f in ("final", "best", "final_epoch", "best_epoch")):
            notes.append(f"{t['key']}: malformed in {path} (record / validation scores); not imported")
            continue
        ov = rec.get("overrides")
        if not (isinstance(ov, list) and all(isinstance(o, str) for o in ov)) or \
                ro.norm_overrides(ov) != ro.norm_overrides(t["overrides"]) or rec.get("preset") != t["preset"]:
            notes.append(f"{t['key']}: trained with other overrides or preset in {path}; not imported")
            continue
        recs[t["key"]] = {**rec, "imported": rec.get("imported") or prov}
        scores[t["key"]] = {f: sc[f] for f in ("final", "best", "final_epoch", "best_epoch")}
    if recs:
        notes.append(f"imported {len(recs)} finished trials from {path} (sha256 {prov['sha256'][:12]}): "
                     + ", ".join(sorted(recs)))
    return recs, scores, notes


def _finished(job: dict) -> Optional[dict]:
    f = Path(job["out_dir"]) / "benchmark_record.json"
    if f.exists():
        rec = json.loads(f.read_text())
        if rec.get("overrides") == job["overrides"] and rec.get("preset") == job["preset"]:
            return rec
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(ro.PRESETS), default="fmnist-long")
    ap.add_argument("--jobs", type=int, default=None, help="parallel one-thread processes (default: the preset's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the run folders go (default ./runs/robust_overfitting_tuned/<preset>)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", choices=DEFAULT_METHODS, default=DEFAULT_METHODS,
                    help="rows (a tuned method's base is added)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="the first tunes, the others make the table (fmnist-long default: 0 1 2 3)")
    ap.add_argument("--grid", type=Path, default=GRID_FILE, help="the tuning grid (default: the committed one)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--deadline-min", type=float, default=None, help="start no new task after this many minutes")
    ap.add_argument("--train-only", action="store_true", help="no AutoAttack on the table runs")
    ap.add_argument("--tune-only", action="store_true",
                    help="run the trials (and their teachers) and select; no table runs yet")
    ap.add_argument("--import-results", nargs="+", type=Path, default=[], metavar="JSON",
                    help="finished runs from results files, for runs whose folder in --out has none (run folders "
                         "do not outlive a machine): this script's own file (trials with their validation scores, "
                         "table runs), or robust_overfitting.py's for the base rows' table runs")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild the JSON / markdown from the finished runs in --out")
    args = ap.parse_args(argv)
    p = dict(ro.PRESETS[args.preset])
    args.jobs = args.jobs or p["jobs"]
    args.seeds = args.seeds or TUNED_SEEDS.get(args.preset, p["seeds"])
    args.out = (args.out or Path("runs") / "robust_overfitting_tuned" / args.preset).resolve()
    results_dir = args.results_dir or (REPO / "benchmarks" / "results" if args.preset != "smoke" else args.out)
    sys.path.insert(0, str(REPO))
    try:
        grid = load_grid(args.grid)
        teachers, trials, table = plan(args.methods, args.seeds, p, args.out, grid, args.data_root)
        check_grid_loads(grid)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rb_labelrefine.data import load_fashion_mnist
    from rb_labelrefine.data.errors import DatasetNotFoundError
    from rb_labelrefine.data.fashion_mnist import FASHION_MNIST_ROOT

    try:
        load_fashion_mnist(args.data_root or FASHION_MNIST_ROOT)
    except DatasetNotFoundError as exc:
        print(f"error: Fashion-MNIST is needed for this benchmark and was not found.\n{exc}", file=sys.stderr)
        return 2
    try:
        if args.report_only:
            f = args.out / "tuning_grid.json"
            if f.exists() and json.loads(f.read_text()).get("sha256") != grid_sha(grid):
                raise GridError(f"{args.out} was run with another tuning grid than {args.grid}")
        else:
            lock_grid(args.out, grid)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    key = val_key(p)
    select_on = grid.get("select_on", "final")
    trial_recs, table_recs, selections = {}, {}, {}
    table_jobs = {m: [] for m in table}      # the jobs as run (a tuned method's once selected)
    t_start = time.time()
    n_trials = sum(len(v) for v in trials.values())
    print(f"{len(teachers)} teachers, {n_trials} trials (K = {grid['k']}), "
          f"{sum(len(v) for v in table.values())} table runs -> {args.out}; results -> {results_dir}", flush=True)

    trial_scores_of, import_notes = {}, []   # validation scores of the finished trials; what the imports said

    def import_table(js):
        """Table runs of ``js`` from the --import-results files (first file first)."""
        for f in args.import_results:
            todo = [j for j in js if j["key"] not in table_recs]
            if not todo:
                break
            recs, notes = ro.import_results(f, todo, p, args.out, train_only=args.train_only, keep_teachers=True)
            table_recs.update(recs)
            import_notes.extend(notes)

    def try_select(m):
        if m in selections or not all(t["key"] in trial_recs for t in trials[m]):
            return False
        for t in trials[m]:     # trained here: from its own history.json; imported: the file's scores
            if t["key"] not in trial_scores_of:
                trial_scores_of[t["key"]] = own_scores(t, key)
        scores = [trial_scores_of[t["key"]] for t in trials[m]]
        selections[m] = {"chosen": select(scores, select_on), "scores": scores, "key": key, "select_on": select_on}
        selections[m]["values"] = grid["methods"][m][selections[m]["chosen"]]
        table_jobs[m] = [with_setting(j, selections[m]["values"]) for j in table[m]]
        import_table(table_jobs[m])   # the chosen setting's runs, if a file has them (overrides checked)
        return True

    if args.report_only:   # own finished trials first, so a method mixing own and imported trials is selected
        for ts in trials.values():
            for t in ts:
                if (r := _finished(t)) is not None:
                    trial_recs[t["key"]] = r
    for f in args.import_results:
        recs, scores, notes = import_trials(f, trials, grid, p, key)
        for k in recs:
            if k not in trial_recs:
                trial_recs[k], trial_scores_of[k] = recs[k], scores[k]
        import_notes.extend(notes)
    for m in table:
        if m not in trials:
            table_jobs[m] = list(table[m])
            import_table(table_jobs[m])
    for m in trials:
        try_select(m)
    for n in import_notes:
        print(f"import: {n}", flush=True)

    def missing_list(pending=(), running=()):
        done = set(trial_recs) | set(table_recs)
        out = [f"trial:{t['key']}" for ts in trials.values() for t in ts if t["key"] not in done]
        out += [f"select:{m}" for m in trials if m not in selections]
        out += [f"train:{j['key']}" for js in table_jobs.values() for j in js if j["key"] not in table_recs]
        if not args.train_only:
            out += [f"aa:{j['key']}" for js in table_jobs.values() for j in js if j["key"] in table_recs
                    and not attacked(table_recs[j["key"]], p["aa_n"])]
        return out

    def report():
        res = build_result(args, p, grid, trials, table_jobs, selections, trial_recs, table_recs,
                           None if args.report_only else t_start, missing_list(), trial_scores_of, import_notes)
        write_report(res, results_dir, p["tag"])
        return res

    if args.report_only:
        for js in table_jobs.values():
            for j in js:
                if j["key"] not in table_recs and (r := _finished(j)) is not None:
                    table_recs[j["key"]] = r
        print(render_markdown(report()))
        return 0

    done_teachers, failed, running = {}, {}, {}
    # tasks: teachers, then trials (method order), base table runs; a tuned method's table runs
    # join once its K trials are done; AutoAttack after a table run's training
    pending = pending_tasks(teachers, trials, table_jobs, trial_recs, table_recs, args.tune_only)

    def elapsed():
        return (time.time() - t_start) / 60

    def ready(phase, j):
        if phase == "aa":
            return j["key"] in table_recs
        have = set(done_teachers) | set(table_recs)
        return all(d in have for d in j["deps"])

    def on_done(phase, j, rec):
        reused = " (reused)" if rec.get("reused") else ""
        if phase == "trial":
            trial_recs[j["key"]] = rec
            m = j["method"]
            trial_scores_of[j["key"]] = own_scores(j, key)
            print(f"[{elapsed():5.1f} min] trial {j['key']} {_values_s(j['values'])}: final val "
                  f"{key} {trial_scores_of[j['key']]['final']:.1f}{reused}", flush=True)
            if try_select(m):
                sel = selections[m]
                print(f"[{elapsed():5.1f} min] selected {m}: trial {sel['chosen']} "
                      f"({_values_s(sel['values'])}), {select_on}-epoch {key} "
                      f"{sel['scores'][sel['chosen']][select_on]:.1f}", flush=True)
                if not args.tune_only:
                    pending.extend(("train", jj) for jj in table_jobs[m] if jj["key"] not in table_recs)
        elif j["key"] in teachers and phase == "train":
            done_teachers[j["key"]] = rec
            print(f"[{elapsed():5.1f} min] teacher {j['key']} done{reused}", flush=True)
        else:
            table_recs[j["key"]] = rec
            if phase == "train" and not args.train_only:
                pending.append(("aa", j))
            print(f"[{elapsed():5.1f} min] {phase} {j['key']}: final pgd20 {rec['final']['pgd20']:.1f}"
                  + (f" AA {rec['final']['autoattack']:.1f}" if rec["final"].get("autoattack") is not None
                     else "") + reused, flush=True)
        report()

    # training-like tasks (teachers, trials, table runs) before AutoAttack ones; a trial trains
    ro.schedule(pending, jobs=args.jobs, ready=ready, on_done=on_done, elapsed=elapsed, failed=failed,
                running=running, deadline_min=args.deadline_min,
                order=lambda pending: ([t for t in pending if t[0] != "aa"] + [t for t in pending if t[0] == "aa"],
                                       None),
                run_phase=lambda phase: "aa" if phase == "aa" else "train")
    res = report()
    print(render_markdown(res))
    return ro.exit_status(failed)


if __name__ == "__main__":
    sys.exit(main())
