"""Robust overfitting on real data: every label-refinement method on small Fashion-MNIST.

Trains each method of the package on a small Fashion-MNIST training subset where plain PGD-AT
overfits robustly, then scores the best (validation PGD-10) and the final checkpoint with clean
accuracy, PGD-20 and AutoAttack standard (official implementation), in the style of ADR's
Table 1 (Wu et al. 2024): best / final / difference.

    python benchmarks/robust_overfitting.py --preset fmnist-small [--jobs 2] [--out DIR]
           [--methods pgd_at adr ...] [--seeds 0 1] [--results-dir DIR] [--data-root DIR]
    python benchmarks/robust_overfitting.py --preset fmnist-long    # issue 13: 200 epochs, 3 seeds, paired CIs
    python benchmarks/robust_overfitting.py --preset smoke      # everything, 2 epochs, ~1 minute
    python benchmarks/robust_overfitting.py --report-only --out DIR   # rebuild the table from finished runs
    python benchmarks/robust_overfitting.py --preset fmnist-long --device cuda --jobs 16   # one GPU (results
           tagged _gpu, beside the CPU ones); robust_overfitting_gpu.py wraps this for a 10-minute slot

The committed table (``fmnist-small``: 15 runs, AutoAttack on 300 points) costs ~110 min of
training and ~115 min of AutoAttack, one thread each: about two hours on two cores.

Runs execute in a pool of ``--jobs`` one-thread processes (two one-thread processes use two CPU
cores better than one two-thread process), most important first; the JSON / markdown / plot are
rewritten after every finished run, so a partial table survives an interruption.  A finished run
(``benchmark_record.json`` in its directory) is reused when the script is started again with the
same ``--out``; an interrupted one is resumed from its checkpoint.  Run directories do not outlive
a machine; the results JSON does, with every run's whole record (``runs``) and per-point outcomes:
``--import-results benchmarks/results/robust_overfitting_fmnist_long.json`` takes those finished
runs back (checked against the preset and each run's overrides), so more seeds can be added on a
new machine without training the old ones again -- ``--order round --seeds 0 1 ... k`` adds them
seed by seed, every method's k-th seed before any (k+1)-th, so a cut-off leaves whole rounds.

Every checkpoint's per-point outcomes (clean, PGD-20, AutoAttack, and AutoAttack after each of
its stages: 0/1 strings under ``per_point`` in the JSON) are kept, and each method is compared
with its base objective (PGD-AT, or TRADES for LTD) *paired* -- same test points, same seeds --
with 95 % bootstrap CIs over test points and seeds (``rb_labelrefine.evaluation.paired``) and a verdict per claim
(yes / no / cannot tell).  With a preset's ``val_attack`` other than ``pgd_ce`` (fmnist-long:
margin PGD-10), *best* is selected by that attack and the checkpoint CE-PGD validation would pick
is scored beside it.

Outputs (``--results-dir``, default ``benchmarks/results`` for ``fmnist-small``, ``--out`` for
``smoke``): ``robust_overfitting_<tag>.json``, ``.md`` and ``.png``.

The code is this package, one module per step: ``plan`` (presets, methods, the runs to do),
``run`` (train / score / AutoAttack one run -- AutoAttack through the package's
``evaluate_checkpoint`` -- and the process pool), ``records`` (a run's record, the test points
it covers, ``--import-results``), ``aggregate`` (mean +- std over seeds, curves, claims, paired
comparisons), ``report`` (markdown, figure, results JSON) and ``main`` (the command line);
``benchmarks/robust_overfitting.py`` runs ``main``.
"""
from __future__ import annotations

from .plan import (  # noqa: F401
    REPO, METHODS, LABELS, MULTI_SEED, BASES, EXTRA_PAIRS, CHECKPOINTS, AA_SUITES, PRIORITY, ROUND_PRIORITY,
    CLAIM_METHODS, NATURAL_PRESET, TEACHER_SEED, FMNIST_N_TRAIN, TRAIN_LONG, PRESETS, run_key, build_jobs,
    check_device,
)
from .records import (  # noqa: F401
    checkpoints_of, covers, aa_offset, aa_offsets, first_points, aa_at_n, no_points, TEACHER_OVERRIDES,
    runs_field, norm_overrides, restore_all_points, malformed, import_results,
)
from .run import (  # noqa: F401
    write_record, write_json_md, run_job, schedule, exit_status, score_points, run_task, attack_run, train_run,
    commit, machine_string,
)
from .aggregate import (  # noqa: F401
    mean_std, mean_curve, aggregate, se_diff, claims, PAIRED_METRICS, paired_claims, train_seconds,
    add_history_seconds,
)
from .report import (  # noqa: F401
    fmt, diff_str, runs_of, points_label, ci_str, half_width_parts, seed_ranges, render_paired, render_markdown,
    plot, results_setup, write_results,
)
from .main import build_parser, main  # noqa: F401

__all__ = [
    "REPO", "METHODS", "LABELS", "MULTI_SEED", "BASES", "EXTRA_PAIRS", "CHECKPOINTS", "AA_SUITES", "PRIORITY",
    "ROUND_PRIORITY", "CLAIM_METHODS", "NATURAL_PRESET", "TEACHER_SEED", "FMNIST_N_TRAIN", "TRAIN_LONG",
    "PRESETS", "run_key", "build_jobs", "check_device", "checkpoints_of", "covers", "aa_offset", "aa_offsets",
    "first_points", "aa_at_n", "no_points", "TEACHER_OVERRIDES", "runs_field", "norm_overrides",
    "restore_all_points", "malformed", "import_results", "write_record", "write_json_md", "run_job", "schedule",
    "exit_status", "score_points", "run_task", "attack_run", "train_run", "commit", "machine_string",
    "mean_std", "mean_curve", "aggregate", "se_diff", "claims", "PAIRED_METRICS", "paired_claims", "train_seconds",
    "add_history_seconds", "fmt", "diff_str", "runs_of", "points_label", "ci_str", "half_width_parts",
    "seed_ranges", "render_paired", "render_markdown", "plot", "results_setup", "write_results", "build_parser",
    "main",
]
