"""``rb-labelrefine`` command line (also ``python -m rb_labelrefine``).

Exit codes: 0 success; 1 training failed (e.g. non-finite loss); 2 bad config, argument or input
(the message names the field); 3 interrupted by SIGTERM/SIGINT with a resumable checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3


class UsageError(ValueError):
    """A bad command-line argument (exit code 2)."""


def _err(msg: str) -> None:
    print(f"rb-labelrefine: error: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configs
def cmd_configs(args) -> int:
    from .config import dump_config, list_presets, load_config, load_raw

    if args.show:
        print(dump_config(load_config(args.show)), end="")
        return EXIT_OK
    names = list_presets()
    if args.filter:
        names = [n for n in names if all(part in n for part in args.filter.split(","))]
    for name in names:
        desc = load_raw(name).get("description", "")
        print(f"{name:48s} {desc}" if args.verbose else name)
    print(f"{len(names)} presets", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .config import load_config
    from .training.trainer import Trainer

    cfg = load_config(args.config, args.set)
    import os

    summary = Trainer(cfg, args.out, resume=args.resume, progress=not args.quiet).fit()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, not one per rank
        print(_summary_line(summary))
    return EXIT_OK


def _summary_line(s: dict) -> str:
    b, f = s.get("best", {}), s.get("final", {})

    def pct(v):
        return "n/a" if v is None else f"{v:.1f}%"

    line = (f"{s['name']}: {s['epochs']} epochs in {s['train_seconds']:.0f}s | best epoch {s['best_epoch']} "
            f"(val PGD {pct(b.get('val_pgd'))}, test clean {pct(b.get('test_clean'))}, test PGD {pct(b.get('test_pgd'))}) "
            f"| final test clean {pct(f.get('test_clean'))}, test PGD {pct(f.get('test_pgd'))} | {s['paths']['final']}")
    aa = s.get("autoattack")
    if aa:
        line += " | AutoAttack best {:.1f}% final {:.1f}%".format(aa["best"]["robust_acc"], aa["final"]["robust_acc"])
    return line


# ----------------------------------------------------------------------------- eval
def _load_for_eval(path: str, which: str):
    """A run directory, or a weights file inside one."""
    from .runs import RUN_FILES, load_run_model

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint: {p} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UsageError(f"--checkpoint: expected a run directory or a .safetensors weights file, got {p}")
        which = {RUN_FILES["best"]: "best", RUN_FILES["final"]: "final"}.get(p.name)
        if which is None:
            raise UsageError(f"--checkpoint: {p.name} is not best.safetensors/final.safetensors of a run directory")
        p = p.parent
    return load_run_model(p, which)


def cmd_eval(args) -> int:
    import torch

    from .data import build_datasets
    from .evaluation.autoattack import run_autoattack
    from .training.trainer import _stack

    model, cfg, info = _load_for_eval(args.checkpoint, args.which)
    root = args.data_root or cfg.data.root
    _, _, test_ds, _ = build_datasets(cfg.data.name, root=root, val_fraction=cfg.data.val_fraction,
                                      train_subset=cfg.data.train_subset, seed=cfg.data.seed,
                                      test_subset=cfg.data.test_subset)
    x, y = _stack(test_ds, args.n)
    eps = args.eps if args.eps is not None else cfg.attack.eps
    norm = args.norm or cfg.attack.norm
    attacks = args.attacks.split(",") if args.attacks else None
    version = "custom" if attacks else args.version
    res = run_autoattack(model, x, y, norm=norm, eps=eps, version=version, attacks=attacks,
                         device="cuda" if torch.cuda.is_available() else "cpu", batch_size=args.batch_size,
                         seed=args.seed)
    out = {"checkpoint": str(args.checkpoint), "which": args.which, "dataset": info.name, "norm": norm, "eps": eps,
           "autoattack": res}
    if args.sanity:
        from .evaluation.sanity import sanity_report

        out["sanity"] = sanity_report(model, x, y, eps=eps, norm=norm)
    print(f"{info.name} {norm} eps={eps:.4f}: clean {res['clean_acc']:.2f}%  AutoAttack ({version}) "
          f"{res['robust_acc']:.2f}% on {res['n']} points")
    if args.json:
        from .training.io import atomic_write_json

        atomic_write_json(args.json, out)
    return EXIT_OK


# ----------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from .export.robustbench_export import export_run

    p = Path(args.checkpoint)
    if p.is_file():
        p = p.parent
    written = export_run(p, args.out, name=args.name, which=args.which, threat_model=args.threat_model,
                         overwrite=args.overwrite)
    for k, v in written.items():
        print(f"{k:14s} {v}")
    return EXIT_OK


# ----------------------------------------------------------------------------- leaderboard
def cmd_leaderboard(args) -> int:
    from .leaderboard import format_rank, load_snapshot, rank

    if args.model_info:
        result = json.loads(Path(args.model_info).read_text())
    elif args.autoattack is not None:
        result = {"autoattack_acc": args.autoattack, "clean_acc": args.clean, "name": args.name or "your model",
                  "additional_data": args.extra_data}
    else:
        snap = load_snapshot()
        from .leaderboard import format_table

        print(format_table(snap, args.dataset, args.threat_model, top=args.top))
        return EXIT_OK
    print(format_rank(rank(result, args.dataset, args.threat_model)))
    return EXIT_OK


# ----------------------------------------------------------------------------- quickstart
def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    summary = run_quickstart(args.out, progress=not args.quiet, autoattack_n=args.n)
    print(f"{'method':8s} {'clean':>8s} {'AutoAttack':>11s} {'points':>7s} {'best epoch':>11s}")
    for m, r in summary["methods"].items():
        print(f"{m:8s} {r['clean_acc']:7.2f}% {r['autoattack_acc']:10.2f}% {r['autoattack_n']:7d} {r['best_epoch']:11d}")
    export = summary["methods"]["adr"]["paths"]["export"]
    print(f"summary      {Path(args.out) / 'summary.json'}")
    print(f"curves       {summary['curves']}")
    print(f"export       {Path(export['model_card']).parent}  (model card: {export['model_card']})")
    print(f"took {summary['total_seconds']:.0f}s on {summary['machine']}")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="rb-labelrefine", description=(
        "Label-refinement adversarial training (ADR, KD+SWA, LTD, SGLR) on PGD-AT / TRADES, with "
        "official AutoAttack evaluation and RobustBench export."))
    p.add_argument("--version", action="version", version=f"rb-labelrefine {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="train PGD-AT and PGD-AT+ADR on the embedded digits set, "
                                          "AutoAttack both, export the ADR model (a few minutes on CPU)")
    q.add_argument("--out", default="quickstart_out", help="output directory (default: %(default)s)")
    q.add_argument("--n", type=int, default=None, help="AutoAttack on the first N test points (default: all 397)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train a preset or a YAML config")
    t.add_argument("--config", required=True, help="preset name (see `configs`) or path to a YAML file")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=2 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars / per-epoch lines")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="AutoAttack (official) on a trained run's test split")
    e.add_argument("--checkpoint", required=True, help="run directory or its best/final .safetensors")
    e.add_argument("--which", choices=("best", "final"), default="best")
    e.add_argument("--n", type=int, default=None, help="first N test points (n_ex)")
    e.add_argument("--version", default="standard", choices=("standard", "plus", "rand"))
    e.add_argument("--attacks", default=None, help="custom attack list, e.g. apgd-ce,apgd-t")
    e.add_argument("--norm", choices=("Linf", "L2"), default=None)
    e.add_argument("--eps", type=float, default=None)
    e.add_argument("--batch-size", type=int, default=250)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data-root", default=None)
    e.add_argument("--sanity", action="store_true", help="also run the gradient-masking sanity checks")
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a run in RobustBench format with a model card")
    x.add_argument("--checkpoint", required=True, help="run directory")
    x.add_argument("--out", required=True)
    x.add_argument("--name", default=None, help="RobustBench-style model name")
    x.add_argument("--which", choices=("best", "final"), default="best")
    x.add_argument("--threat-model", default="Linf", choices=("Linf", "L2"))
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (as a whole); without it a non-empty --out is refused")
    x.set_defaults(func=cmd_export)

    lb = sub.add_parser("leaderboard", help="where a result ranks on the (shipped, dated) RobustBench leaderboard")
    lb.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    lb.add_argument("--threat-model", default="Linf")
    lb.add_argument("--autoattack", type=float, default=None, help="your AutoAttack accuracy (%%)")
    lb.add_argument("--clean", type=float, default=None, help="your clean accuracy (%%)")
    lb.add_argument("--extra-data", action="store_true", help="your model used extra data")
    lb.add_argument("--name", default=None)
    lb.add_argument("--model-info", default=None, help="an exported model_info JSON")
    lb.add_argument("--top", type=int, default=20)
    lb.set_defaults(func=cmd_leaderboard)

    c = sub.add_parser("configs", help="list the presets")
    c.add_argument("--show", default=None, metavar="NAME", help="print a preset, resolved")
    c.add_argument("--filter", default=None, help="comma-separated substrings, e.g. cifar10,adr")
    c.add_argument("-v", "--verbose", action="store_true", help="with descriptions")
    c.set_defaults(func=cmd_configs)
    return p


def main(argv=None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")
    try:
        from .data import CorruptDatasetError, DatasetNotFoundError
        from .training.io import UnsafeCheckpointError
        from .training.trainer import NonFiniteLossError, ResumeError, TrainingInterrupted
    except ImportError as exc:  # pragma: no cover - broken install
        _err(f"import failed: {exc}")
        return EXIT_FAILED
    try:
        return args.func(args)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (UsageError, ResumeError, DatasetNotFoundError, CorruptDatasetError, UnsafeCheckpointError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except FileNotFoundError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # a second signal during training (or Ctrl-C outside it): stop now; files written so
        # far are complete (atomic writes), the last checkpoint is resumable
        _err("interrupted")
        return 130
    except NonFiniteLossError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
