"""``rb-labelrefine quickstart``: the main job on an embedded default (no download).

On scikit-learn's 8x8 digits: train a small CNN with PGD-AT and with PGD-AT+ADR (presets
``digits-pgdat`` / ``digits-adr``), evaluate each best (validation-selected) checkpoint with the
official AutoAttack (standard) on the held-out test split, export the ADR model in RobustBench
format with a model card, draw both training curves, and write ``summary.json``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["run_quickstart", "QUICKSTART_PRESETS"]

QUICKSTART_PRESETS = {"pgd_at": "digits-pgdat", "adr": "digits-adr"}


def _train_and_attack(method: str, preset: str, run_dir: str, overrides, progress: bool, autoattack_n, threads,
                      attack_params=None):
    """One method: train, then AutoAttack its best checkpoint. Runs in its own process."""
    import torch

    from .config import load_config
    from .evaluation.checkpoint import evaluate_checkpoint
    from .fileio import atomic_write_json
    from .training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    cfg = load_config(preset, list(overrides or []) + ([f"train.threads={threads}"] if threads else []))
    tag = f"[quickstart:{method}]"
    log = (lambda msg: print(f"{tag} {msg}", file=sys.stderr, flush=True))
    log(f"training {preset} -> {run_dir}")
    res = Trainer(cfg, run_dir, progress=progress, log=log, resume=(run_dir / "checkpoint.pt").exists()).fit()
    points = f"the first {autoattack_n}" if autoattack_n else "all"
    log(f"AutoAttack (standard, official) on the best checkpoint (epoch {res['best_epoch']}), {points} test points")
    # the run's own test points (its data.train_subset / test_subset included)
    aa = evaluate_checkpoint(run_dir, "best", n=autoattack_n, suite="standard", seed=0, attack_params=attack_params)
    res["autoattack"] = {"best": aa}
    atomic_write_json(run_dir / "summary.json", res)
    log(f"clean {aa['clean_acc']:.2f}%  AutoAttack {aa['robust_acc']:.2f}% on {aa['n']} points  ({aa['elapsed_s']:.0f}s)")
    return method, res


def check_out(out: Path) -> None:
    """Refuse a used ``--out`` before any work: a finished quickstart (its ``summary.json`` or
    ``export/``), or a directory holding anything but the two run directories of an interrupted
    quickstart (which a rerun resumes)."""
    from .errors import UsageError

    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out: {out} is a dangling symbolic link")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    names = sorted(p.name for p in out.iterdir())
    finished = [n for n in ("summary.json", "export") if n in names]
    if finished:
        raise UsageError(f"--out: {out} already holds a finished quickstart ({', '.join(finished)}); choose a new "
                         "--out, or remove that directory to run it again (nothing was changed)")
    foreign = [n for n in names if n not in QUICKSTART_PRESETS and n != "curves.png"]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(f"--out: {out} is not empty and not a quickstart's ({shown}); choose a new or empty --out "
                         "(nothing was changed)")


def run_quickstart(out_dir, *, progress: bool = True, autoattack_n: Optional[int] = None,
                   overrides: Optional[list] = None, jobs: Optional[int] = None, log=None,
                   attack_params: Optional[dict] = None) -> dict:
    """Train + AutoAttack both methods (in parallel processes when there are >= 2 cores),
    export the ADR model, plot, and write ``summary.json``.

    ``attack_params`` (tests only) shrinks AutoAttack's sub-attacks, e.g. Square's queries; such
    a run is recorded as non-standard everywhere it is reported."""
    import os

    from .plots import plot_curves
    from .fileio import atomic_write_json

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    check_out(out)       # before any training or AutoAttack, not after them
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = jobs or min(len(QUICKSTART_PRESETS), os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    tasks = [(m, p, str(out / m), overrides, progress, autoattack_n, threads, attack_params)
             for m, p in QUICKSTART_PRESETS.items()]
    if jobs > 1:
        import multiprocessing as mp

        # two one-thread processes use two cores better than one two-thread process
        with mp.get_context("spawn").Pool(jobs) as pool:
            results = dict(pool.starmap(_train_and_attack, tasks))
    else:
        results = dict(_train_and_attack(*t) for t in tasks)

    summary: dict = {"dataset": "digits (scikit-learn, 8x8, 10 classes)", "methods": {}}
    histories = {}
    for method, res in results.items():
        run_dir = out / method
        histories[method] = json.loads((run_dir / "history.json").read_text())
        aa = res["autoattack"]["best"]
        summary["methods"][method] = {
            "preset": QUICKSTART_PRESETS[method],
            "clean_acc": aa["clean_acc"],
            "autoattack_acc": aa["robust_acc"],
            "autoattack_n": aa["n"],
            "best_epoch": res["best_epoch"],
            "best_val_pgd10": res["best"].get("val_pgd"),
            "best_test_pgd20": res["best"].get("test_pgd"),
            "final_test_clean": res["final"].get("test_clean"),
            "final_test_pgd20": res["final"].get("test_pgd"),
            "train_seconds": res["train_seconds"],
            "autoattack_seconds": aa.get("elapsed_s"),
            "paths": {"run_dir": str(run_dir), **res["paths"]},
        }

    curves = plot_curves(histories, out / "curves.png", title="digits: PGD-AT vs PGD-AT+ADR")
    summary["curves"] = str(curves)

    from .export.robustbench_export import export_run

    log("[quickstart] exporting the ADR model in RobustBench format with a model card")
    written = export_run(out / "adr", out / "export", which="best", autoattack={"best": results["adr"]["autoattack"]["best"]})
    summary["methods"]["adr"]["paths"]["export"] = {k: str(v) for k, v in written.items()}
    summary["machine"] = _machine()
    summary["total_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    for m, r in summary["methods"].items():
        log(f"[quickstart] {m:7s} clean {r['clean_acc']:.2f}%  AutoAttack {r['autoattack_acc']:.2f}% "
            f"({r['autoattack_n']} pts)  best epoch {r['best_epoch']}")
    log(f"[quickstart] done in {summary['total_seconds']:.0f}s -> {out / 'summary.json'}")
    return summary


def _machine() -> str:
    import os
    import platform

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()} {os.cpu_count()} cores, {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"
