"""Cost of ADR's ``method.schedule: auto`` fit on the fmnist-adr-auto protocol, and how much holding
the fitted tau/lambda between fits changes their trajectory.

Runs the preset (small_cnn, 500 Fashion-MNIST training images, batch 128 = 4 steps/epoch, PGD-10,
200-image validation split) on the CPU with one thread, twice per setting:

* ``--epochs`` (24: two intervals of the default 12) epochs each: the fit's share of training = time of the fits / time of the training
  steps, for ``method.auto_every=1`` (a fit after every epoch: the behaviour before the interval
  existed) and for the default (``auto_every`` derived from ``method.auto_share``).  Two clocks:
  the CPU time of this (single-threaded) process's main thread spent in ``AutoTauLambda.fit`` and
  in ``Trainer.train_step`` (``share_cpu``: unaffected by other jobs on the machine) and the wall
  times the history logs, sum(adr_auto_s) / sum(train_time_s) (``share_wall``; train_time_s also
  counts data loading);
* from the same two runs: the per-epoch tau/lambda of both, and their differences.

    OMP_NUM_THREADS=1 python benchmarks/adr_auto_cost.py [--epochs 24]

Writes benchmarks/results/adr_auto_cost_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rb_labelrefine.config import load_config  # noqa: E402
from rb_labelrefine.rectifiers.adr_auto import AutoTauLambda  # noqa: E402
from rb_labelrefine.training.trainer import Trainer  # noqa: E402

CPU = {"fit": 0.0, "step": 0.0}


def _timed(cls, name, key):
    orig = getattr(cls, name)

    def wrapper(*a, **k):
        t0 = time.thread_time()
        try:
            return orig(*a, **k)
        finally:
            CPU[key] += time.thread_time() - t0

    setattr(cls, name, wrapper)


_timed(AutoTauLambda, "fit", "fit")
_timed(Trainer, "train_step", "step")

PRESET = "fmnist-adr-auto"


def run(epochs: int, extra: list) -> list:
    CPU.update(fit=0.0, step=0.0)
    cfg = load_config(PRESET, [f"train.epochs={epochs}", "train.device=cpu", "train.threads=1",
                               "eval.test_every=1000", *extra])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Path(d) / "run", progress=False)
        tr.fit()
        hist = tr.history
    hist[-1]["_cpu"] = dict(CPU)
    return hist


def share(hist: list) -> dict:
    fit_s = sum(r.get("adr_auto_s", 0.0) for r in hist)
    train_s = sum(r["train_time_s"] for r in hist)
    fits = [r["epoch"] for r in hist if r.get("adr_auto_fit", True)]
    cpu = hist[-1]["_cpu"]
    return {"fit_cpu_s": cpu["fit"], "train_step_cpu_s": cpu["step"], "share_cpu": cpu["fit"] / cpu["step"],
            "fit_wall_s": fit_s, "train_wall_s": train_s, "share_wall": fit_s / train_s, "fit_epochs": fits,
            "points": hist[-1].get("adr_auto_points"), "every": hist[-1].get("adr_auto_every", 1),
            "per_fit_cpu_s": cpu["fit"] / max(len(fits), 1), "per_epoch_step_cpu_s": cpu["step"] / len(hist)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adr_auto_cost_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    res = {"preset": PRESET, "machine": f"CPU box, 2 cores, no GPU, torch.set_num_threads(1), {platform.processor()}",
           "torch": torch.__version__}
    settings = {"every_epoch": ["method.auto_every=1"], "default": []}
    traj = {name: run(args.epochs, extra) for name, extra in settings.items()}   # the same runs for both
    res["cost"] = {}
    for name, hist in traj.items():
        s = share(hist)
        res["cost"][name] = s
        print(f"{name:12s} every={s['every']} points={s['points']} fits after epochs {s['fit_epochs']}: CPU "
              f"{s['fit_cpu_s']:.2f} s of fits / {s['train_step_cpu_s']:.2f} s of training steps = "
              f"{100 * s['share_cpu']:.2f} % (wall {s['fit_wall_s']:.2f} / {s['train_wall_s']:.2f} s = "
              f"{100 * s['share_wall']:.2f} %)")
    first = res["cost"]["default"]["fit_epochs"][0] if res["cost"]["default"]["fit_epochs"] else args.epochs
    comp = {"epochs": args.epochs, "first_fit_epoch_default": first}
    for k in ("adr_tau", "adr_lambda"):
        a = [r[k] for r in traj["every_epoch"]]
        b = [r[k] for r in traj["default"]]
        diff = [abs(x - y) for x, y in zip(a, b)]
        after = diff[first - 1:]   # from the default's first fit on (before it: the starting values)
        comp[k] = {"every_epoch": a, "default": b, "max_abs_diff": max(diff), "mean_abs_diff": sum(diff) / len(diff),
                   "mean_abs_diff_from_first_fit": sum(after) / len(after), "max_abs_diff_from_first_fit": max(after)}
        print(f"{k}: every epoch {[round(v, 3) for v in a]}")
        print(f"{' ' * len(k)}  default     {[round(v, 3) for v in b]}")
        print(f"{' ' * len(k)}  |diff| all epochs: max {max(diff):.3f} mean {sum(diff) / len(diff):.3f}; from epoch "
              f"{first} on: max {max(after):.3f} mean {sum(after) / len(after):.3f}")
    comp["fit_epochs_default"] = res["cost"]["default"]["fit_epochs"]
    comp["val_pgd_final"] = {n: h[-1].get("val_pgd") for n, h in traj.items()}
    res["trajectory"] = comp
    res["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
