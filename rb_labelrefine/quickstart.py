"""``rb-labelrefine quickstart``: the main job on an embedded default (no download).

On scikit-learn's 8x8 digits: train a small CNN with PGD-AT and with PGD-AT+ADR (presets
``digits-pgdat`` / ``digits-adr``), evaluate each best (validation-selected) checkpoint with the
official AutoAttack (standard) on the held-out test split, export the ADR model in RobustBench
format with a model card, draw both training curves, and write ``summary.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

__all__ = ["run_quickstart", "QUICKSTART_PRESETS"]

QUICKSTART_PRESETS = {"pgd_at": "digits-pgdat", "adr": "digits-adr"}


def run_quickstart(out_dir, *, progress: bool = True, autoattack_n: Optional[int] = None,
                   overrides: Optional[list] = None, log=print) -> dict:
    import torch

    from .config import load_config
    from .evaluation.autoattack import run_autoattack
    from .plots import plot_curves
    from .runs import load_run_model
    from .training.io import atomic_write_json
    from .training.trainer import Trainer, _stack

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {"dataset": "digits (scikit-learn, 8x8, 10 classes)", "methods": {}}
    histories = {}
    aa_results = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for method, preset in QUICKSTART_PRESETS.items():
        cfg = load_config(preset, overrides or [])
        run_dir = out / method
        log(f"[quickstart] training {method} ({preset}) -> {run_dir}")
        res = Trainer(cfg, run_dir, progress=progress, resume=(run_dir / "checkpoint.pt").exists()).fit()
        histories[method] = json.loads((run_dir / "history.json").read_text())
        model, _, info = load_run_model(run_dir, "best", device=device)
        from .data import build_datasets

        _, _, test_ds, _ = build_datasets(cfg.data.name, root=cfg.data.root, val_fraction=cfg.data.val_fraction,
                                          seed=cfg.data.seed)
        x, y = _stack(test_ds, autoattack_n)
        log(f"[quickstart] AutoAttack (standard) on {method}'s best checkpoint, {len(y)} test points")
        aa = run_autoattack(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps, version="standard",
                            device=device, seed=0)
        res["autoattack"] = {"best": aa}
        aa_results[method] = aa
        atomic_write_json(run_dir / "summary.json", res)
        summary["methods"][method] = {
            "preset": preset,
            "clean_acc": aa["clean_acc"],
            "autoattack_acc": aa["robust_acc"],
            "autoattack_n": aa["n"],
            "best_epoch": res["best_epoch"],
            "best_val_pgd10": res["best"].get("val_pgd"),
            "final_test_pgd20": res["final"].get("test_pgd"),
            "final_test_clean": res["final"].get("test_clean"),
            "train_seconds": res["train_seconds"],
            "autoattack_seconds": aa.get("elapsed_s"),
            "paths": {"run_dir": str(run_dir), **res["paths"]},
        }
        log(f"[quickstart] {method}: clean {aa['clean_acc']:.2f}%  AutoAttack {aa['robust_acc']:.2f}%  "
            f"(best epoch {res['best_epoch']})")

    curves = plot_curves(histories, out / "curves.png", title="digits: PGD-AT vs PGD-AT+ADR")
    summary["curves"] = str(curves)

    from .export.robustbench_export import export_run

    log("[quickstart] exporting the ADR model in RobustBench format")
    written = export_run(out / "adr", out / "export", which="best", autoattack={"best": aa_results["adr"]})
    summary["methods"]["adr"]["paths"]["export"] = {k: str(v) for k, v in written.items()}
    summary["machine"] = _machine()
    summary["total_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    log(f"[quickstart] done in {summary['total_seconds']:.0f}s -> {out / 'summary.json'}")
    return summary


def _machine() -> str:
    import os
    import platform

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()} {os.cpu_count()} cores, {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"
