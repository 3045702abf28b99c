"""Regenerate the example model cards in model_cards/ from real runs.

    python benchmarks/make_model_card_examples.py --fmnist-run RUNS/adr_s0 --quickstart-out quickstart_out

* Fashion-MNIST ADR (benchmarks/robust_overfitting.py, preset fmnist-small): AutoAttack of the
  best and final checkpoints as recorded by the benchmark (n = its ``autoattack_n``), plus a
  gradient-masking sanity report measured here on the best checkpoint.
* digits ADR from ``rb-labelrefine quickstart``: the quickstart's own export.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from rb_labelrefine.data import build_datasets
from rb_labelrefine.evaluation.sanity import sanity_report
from rb_labelrefine.export.robustbench_export import export_run
from rb_labelrefine.runs import load_run_model
from rb_labelrefine.training.stream import stack

ROOT = Path(__file__).resolve().parents[1]


def _aa(rec: dict, eps: float) -> dict:
    return {"clean_acc": rec["autoattack_clean"], "robust_acc": rec["autoattack"], "n": rec["autoattack_n"],
            "norm": "Linf", "eps": eps, "version": rec.get("autoattack_version", "standard"),
            "standard": rec.get("autoattack_version", "standard") == "standard",
            "per_attack": rec.get("autoattack_per_attack"), "flags": rec.get("autoattack_flags", []),
            "backend": "pyautoattack", "backend_version": "0.2.0"}


def fmnist_card(run_dir: Path, out: Path, sanity_n: int) -> None:
    rec = json.loads((run_dir / "benchmark_record.json").read_text())
    model, cfg, _ = load_run_model(run_dir, "best")
    _, _, test_ds, _ = build_datasets(cfg.data.name, root=cfg.data.root, val_fraction=cfg.data.val_fraction,
                                      train_subset=cfg.data.train_subset, seed=cfg.data.seed,
                                      test_subset=cfg.data.test_subset)
    x, y = stack(test_ds, sanity_n)
    torch.set_num_threads(1)
    sanity = sanity_report(model, x, y, eps=cfg.attack.eps, norm="Linf", n_ex=sanity_n)
    eps = cfg.attack.eps
    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_run(run_dir, tmp, which="best", autoattack={"best": _aa(rec["best"], eps), "final": _aa(rec["final"], eps)},
               sanity=sanity, name="RBLabelRefine2026_ADR_small_cnn_fmnist500")
    _keep_card(tmp, out)


def _keep_card(export_dir: Path, out: Path) -> None:
    """Keep the card and its picture (weights stay out of the repository)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("README.md", "curves.png"):
        if (export_dir / name).exists():
            shutil.copy(export_dir / name, out / name)
    for f in export_dir.rglob("*.json"):
        if "model_info" in f.parts:
            shutil.copy(f, out / "model_info.json")
    shutil.rmtree(export_dir, ignore_errors=True) if export_dir.name.endswith(".tmp") else None


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fmnist-run", type=Path)
    ap.add_argument("--quickstart-out", type=Path)
    ap.add_argument("--sanity-n", type=int, default=100)
    a = ap.parse_args()
    if a.fmnist_run:
        fmnist_card(a.fmnist_run, ROOT / "model_cards" / "fmnist-adr", a.sanity_n)
    if a.quickstart_out:
        _keep_card(a.quickstart_out / "export", ROOT / "model_cards" / "digits-adr-quickstart")


if __name__ == "__main__":
    main()
