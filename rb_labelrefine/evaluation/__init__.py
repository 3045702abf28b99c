"""Evaluation: fast PGD-k for validation, official AutoAttack (and a run's checkpoint attacked on
its own test points), RobustBench's benchmark, a gradient-masking sanity report, and paired
statistics of per-point outcomes.

Importing this package does not import RobustBench (slow, and it needs the autoattack shim);
the RobustBench functions import it on first use through ``rb_labelrefine.compat``.
"""
from .autoattack import ATTACKS, STANDARD_ATTACKS, VERSIONS, describe_autoattack, machine_info, run_autoattack
from .checkpoint import AUTOATTACK_SUITES, evaluate_checkpoint, run_test_split, stack_test_points
from .pgd import (
    VAL_ATTACKS, attack_loss, clean_accuracy, describe_pgd, format_eps, iter_batches, pgd_accuracy, pgd_attack,
    pgd_correct,
)
from .robustbench_eval import (
    DATASETS, DEFAULT_EPS, THREAT_MODELS, benchmark, check_rb_data, default_eps, load_rb_data, resolve_benchmark,
)
from .sanity import CHECKS, format_sanity_markdown, sanity_report

__all__ = [
    "pgd_attack", "pgd_accuracy", "pgd_correct", "attack_loss", "VAL_ATTACKS", "clean_accuracy", "iter_batches", "describe_pgd", "format_eps",
    "run_autoattack", "describe_autoattack", "machine_info", "ATTACKS", "STANDARD_ATTACKS", "VERSIONS",
    "evaluate_checkpoint", "stack_test_points", "run_test_split", "AUTOATTACK_SUITES",
    "sanity_report", "format_sanity_markdown", "CHECKS",
    "load_rb_data", "benchmark", "check_rb_data", "resolve_benchmark", "default_eps",
    "DATASETS", "THREAT_MODELS", "DEFAULT_EPS",
]
