"""``rb-labelrefine`` command line (also ``python -m rb_labelrefine``).

Exit codes, by cause (the README's command-line section lists them too):

0  success
1  training failed: a non-finite loss (the last good state is checkpointed)
2  bad input: config, argument, data, checkpoint or run directory (the message names the field or path)
3  stopped by SIGTERM/SIGINT with a resumable checkpoint (the message prints the --resume command)
4  an I/O failure: disk full, read-only or unwritable path (the message names the path and, for a
   full disk, the bytes needed)
5  ``eval --sanity``: a gradient-masking check failed (the table says which)
70 an internal error (a bug: please report it with the output of --debug)
130 a second signal stopped the run at once

No traceback is printed unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import errno
import re
import sys
import traceback
import warnings
from pathlib import Path

from .errors import (EXIT_CHECK_FAILED, EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_IO,  # noqa: F401
                     EXIT_OK, EXIT_SECOND_SIGNAL, EXIT_USAGE, PackageError, UsageError, exit_code_of)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
        # whole '-'-separated words: "cifar10" does not match "cifar100-...", "wrn34-10" matches
        parts = [re.compile(rf"(^|-){re.escape(part.strip())}(-|$)") for part in args.filter.split(",") if part.strip()]
        names = [n for n in names if all(p.search(n) for p in parts)]
    for name in names:
        desc = load_raw(name).get("description", "")
        print(f"{name:48s} {desc}" if args.verbose else name)
    print(f"{len(names)} presets", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    import os

    from .config import load_config
    from .training.trainer import Trainer

    cfg = load_config(args.config, _flat(args.set))

    summary = Trainer(cfg, args.out, resume=args.resume, progress=not args.quiet).fit()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, not one per rank
        print(_summary_line(summary))
    return EXIT_OK


def _flat(groups) -> list:
    """``--set A=1 B=2 --set C=3`` -> ``["A=1", "B=2", "C=3"]`` (each flag takes one or more pairs)."""
    return [item for group in groups or [] for item in (group if isinstance(group, list) else [group])]


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
    """``(model, cfg, info, run_dir, which)`` of a run directory, or of a weights file inside one."""
    from .runs import RUN_FILES, load_run_model

    p = Path(path)
    try:
        exists = p.exists()
    except OSError as exc:  # a symlink loop, a name too long
        raise UsageError(f"--checkpoint: {p}: {exc.strerror or exc}") from None
    if not exists:
        raise FileNotFoundError(f"--checkpoint: {p} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UsageError(f"--checkpoint: expected a run directory, an export directory or a .safetensors "
                             f"weights file, got {p}")
        which = {RUN_FILES["best"]: "best", RUN_FILES["final"]: "final"}.get(p.name)
        if which is None:        # an export's <Name>.safetensors (downloaded or not): it describes itself
            return _load_export_for_eval(p)
        p = p.parent
    elif (p / "export.json").is_file() and not (p / RUN_FILES["config"]).exists():
        return _load_export_for_eval(p)
    return (*load_run_model(p, which, log=_note), p, which)


def _load_export_for_eval(p: Path):
    """An export (directory or .safetensors) as ``_load_for_eval`` returns a run: its test split and
    threat model come from the export's own description (``--eps``/``--norm``/``--data-root`` apply)."""
    from .config import Config
    from .export.robustbench_export import load_export_for_eval

    model, info, tm, eps, which = load_export_for_eval(p)
    cfg = Config()                  # only data.name (the test split) and the threat model are read
    cfg.data.name, cfg.attack.norm, cfg.attack.eps = info.name, tm, eps
    cfg.data.val_fraction = 0.0
    return model, cfg, info, p, which


def cmd_eval(args) -> int:
    import torch

    from .evaluation.checkpoint import evaluate_checkpoint, run_test_split, stack_test_points

    if args.n is not None and args.n < 1:
        raise UsageError(f"--n: must be >= 1 (the number of test points), got {args.n}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.eps is not None and not args.eps > 0:
        raise UsageError(f"--eps: must be > 0, got {args.eps}")
    if args.json:
        _check_output_file(args.json, "--json")  # before AutoAttack, not after it
    model, cfg, info, run_dir, which = _load_for_eval(args.checkpoint, args.which)
    test_ds = run_test_split(cfg, args.data_root)   # the run's own test points (its subsets, its seed)
    eps = args.eps if args.eps is not None else cfg.attack.eps
    norm = args.norm or cfg.attack.norm
    attacks = args.attacks.split(",") if args.attacks else None
    version = "custom" if attacks else args.version
    res = evaluate_checkpoint(which=which, model=model, cfg=cfg, test_data=test_ds, n=args.n, suite=args.version,
                              attacks=attacks, norm=norm, eps=eps, seed=args.seed, batch_size=args.batch_size)
    x, y = stack_test_points(test_ds, args.n)   # (the sanity checks' points: the same ones)
    out = {"checkpoint": str(run_dir), "which": which, "dataset": info.name, "norm": norm, "eps": eps,
           "autoattack": res}
    print(f"{info.name} {norm} eps={eps:.4f}: clean {res['clean_acc']:.2f}%  AutoAttack ({version}) "
          f"{res['robust_acc']:.2f}% on {res['n']} points")
    for flag in res.get("flags") or []:
        print(f"  AutoAttack flag: {flag}")
    code = EXIT_OK
    if args.sanity:
        from .evaluation.sanity import format_sanity_markdown, sanity_report

        # this AutoAttack run's own flags (zero gradients among them) are one of the checks
        report = sanity_report(model, x, y, eps=eps, norm=norm, autoattack=res,
                               device="cuda" if torch.cuda.is_available() else "cpu")
        out["sanity"] = report
        print()
        print(format_sanity_markdown(report), end="")
        if not report["passed"]:
            _err(f"gradient-masking sanity check(s) failed: {', '.join(report['failed'])} -- the AutoAttack number "
                 "above may overstate the robustness")
            code = EXIT_CHECK_FAILED
    if args.json:
        from .fileio import atomic_write_json

        atomic_write_json(args.json, out)
    return code


def _check_output_file(path: str, what: str) -> None:
    """``path`` can be written: its directory exists and takes files, and it is not a directory."""
    import os
    import tempfile

    from .errors import StorageError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what}: {p} is a directory, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what}: the directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=str(parent))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(p, exc) from None


# ----------------------------------------------------------------------------- export
def _read_results(path: str, run_dir: Path, which: str) -> tuple[dict, dict]:
    """``(autoattack, sanity)`` of an ``eval --json`` file, checked to be about this checkpoint."""
    from .results_schema import check_eval_json

    p = Path(path)
    # every field the export reads, typed and ranged (eps required, sanity's shape), exit 2 naming it
    data = check_eval_json(_read_json_arg(path, "--results"), f"--results: {p}")
    if data.get("which", which) != which:
        raise UsageError(f"--results: {p} holds the {data['which']!r} checkpoint's evaluation, the export is of "
                         f"{which!r}; pass --which {data['which']} or evaluate --which {which}")
    src = data.get("checkpoint")
    if src is not None:
        src_dir = Path(src)
        src_dir = src_dir.parent if src_dir.suffix == ".safetensors" else src_dir
        if src_dir.exists() and src_dir.resolve() != run_dir.resolve():
            raise UsageError(f"--results: {p} evaluated {src_dir}, not {run_dir}")
    return data["autoattack"], data.get("sanity")   # the outer norm/eps filled in (check_eval_json)


def cmd_export(args) -> int:
    from .export.robustbench_export import export_run

    p = Path(args.checkpoint)
    if p.is_file():
        p = p.parent
    autoattack = sanity = None
    if args.results:
        autoattack, sanity = _read_results(args.results, p, args.which)
        autoattack = {args.which: autoattack}
    hub = None
    if args.push_to_hub:
        from .export.hub import check_repo_id, hub_client

        check_repo_id(args.push_to_hub)
        hub = hub_client()          # before the export: a missing extra is said before any work
    written = export_run(p, args.out, name=args.name, which=args.which, threat_model=args.threat_model,
                         autoattack=autoattack, sanity=sanity, additional_data=args.extra_data,
                         dataset=args.dataset, overwrite=args.overwrite, log=_note, model_name=args.model_name,
                         authors=args.authors, link=args.link, venue=args.venue,
                         checkpoint_url=f"https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else None)
    for k, v in written.items():
        print(f"{k:15s} {v}")
    if hub is not None:
        from .export.hub import push_export

        url = push_export(args.out, args.push_to_hub, private=args.private, api=hub, log=_note)
        print(f"{'hub':15s} {url}")
    return EXIT_OK


# ----------------------------------------------------------------------------- leaderboard
def cmd_leaderboard(args) -> int:
    from .leaderboard import format_rank, format_table, load_snapshot, rank

    if args.n is not None and not 1 <= args.n <= 10 ** 9:
        raise UsageError(f"--n: the number of test points must be in [1, 1,000,000,000], got {args.n}")
    if args.top is not None and args.top < 0:
        raise UsageError(f"--top: must be >= 0 (0: all entries), got {args.top}")
    if args.model_info or args.results:
        what, path = ("--model-info", args.model_info) if args.model_info else ("--results", args.results)
        result = _read_json_arg(path, what)
        if not isinstance(result, dict):
            raise UsageError(f"{what}: {path} holds a JSON {type(result).__name__}, not an object "
                             "(an exported model_info file or an `eval --json` file)")
        if args.n is not None:
            result["n"] = args.n
    elif args.autoattack is not None:
        result = {"autoattack_acc": args.autoattack, "clean_acc": args.clean, "name": args.name or "your model",
                  "additional_data": args.extra_data, "n": args.n}
    else:
        print(format_table(load_snapshot(), args.dataset, args.threat_model, top=args.top))
        return EXIT_OK
    source = f"{what}: {path}" if (args.model_info or args.results) else "the arguments"
    print(format_rank(rank(result, args.dataset, args.threat_model, extra_data=True if args.extra_data else None,
                           source=source)))
    return EXIT_OK


def _read_json_arg(path: str, what: str):
    """A JSON input: a regular file (never a FIFO or device) of at most 16 MiB, nested at most 32
    levels, NaN/Infinity refused; every problem is exit 2 naming ``what`` and the path."""
    from .safe_files import read_json

    return read_json(path, what, max_bytes=16 << 20, max_depth=32)


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


# ----------------------------------------------------------------------------- doctor
def cmd_doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main()


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="rb-labelrefine", description=(
        "Label-refinement adversarial training (ADR, KD+SWA, LTD, SGLR) on PGD-AT / TRADES, with "
        "official AutoAttack evaluation and RobustBench export."))
    p.add_argument("--version", action="version", version=f"rb-labelrefine {__version__}")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(*a, **k):  # --debug also after the subcommand (SUPPRESS: never resets the top-level flag)
        sp = _add_parser(*a, **k)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback of an error")
        return sp
    sub.add_parser = add_parser

    q = sub.add_parser("quickstart", help="train PGD-AT and PGD-AT+ADR on the embedded digits set, "
                                          "AutoAttack both, export the ADR model (a few minutes on CPU)")
    q.add_argument("--out", default="quickstart_out", help="output directory (default: %(default)s)")
    q.add_argument("--n", type=int, default=None, help="AutoAttack on the first N test points (default: all 397)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train a preset or a YAML config")
    t.add_argument("--config", required=True, help="preset name (see `configs`) or path to a YAML file")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set train.epochs=2 data.batch_size=64 (one or more "
                        "pairs per flag; the flag is repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars / per-epoch lines")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="AutoAttack (official) on a trained run's test split")
    e.add_argument("--checkpoint", required=True, help="run directory or its best/final .safetensors; or an export "
                                                       "directory or its <Name>.safetensors")
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
    x.add_argument("--checkpoint", required=True, help="run directory (or its best/final .safetensors)")
    x.add_argument("--out", required=True)
    x.add_argument("--name", default=None, help="RobustBench-style model name")
    x.add_argument("--which", choices=("best", "final"), default="best")
    x.add_argument("--threat-model", default="Linf", choices=("Linf", "L2"))
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (as a whole); without it a non-empty --out is refused")
    x.add_argument("--results", default=None, metavar="FILE",
                   help="an `eval --json` file (AutoAttack and sanity) for this checkpoint: its numbers go "
                        "into the card and model_info")
    x.add_argument("--extra-data", action="store_true", help="the model was trained with extra data")
    x.add_argument("--model-name", default=None, metavar="TEXT",
                   help="model_info's name, shown on RobustBench's leaderboard (RobustBench's own entries use the "
                        "paper's title; default: '<method title> (rb_labelrefine)')")
    x.add_argument("--authors", default=None, metavar="TEXT", help="model_info's authors, e.g. 'A. Author, B. Author'")
    x.add_argument("--link", default=None, metavar="URL", help="model_info's link (the paper or the model page)")
    x.add_argument("--venue", default=None, metavar="TEXT", help="model_info's venue, e.g. 'ICLR 2024'")
    x.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the export to this Hugging Face Hub model repository (user/name) with "
                        "huggingface_hub (extra [hub]; the token from `hf auth login` or HF_TOKEN)")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    x.add_argument("--dataset", default=None, choices=("cifar10", "cifar100", "imagenet"),
                   help="the RobustBench slot (default: the run's data set; the model's input shape and "
                        "classes must fit it)")
    x.set_defaults(func=cmd_export)

    lb = sub.add_parser("leaderboard", help="where a result ranks on RobustBench's leaderboard (a shipped, dated "
                                            "snapshot of its model_info)")
    lb.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "imagenet"))
    lb.add_argument("--threat-model", default="Linf", choices=("Linf", "L2"))
    lb.add_argument("--autoattack", type=float, default=None, help="your AutoAttack accuracy (%%)")
    lb.add_argument("--clean", type=float, default=None, help="your clean accuracy (%%)")
    lb.add_argument("--extra-data", action="store_true", help="your model used extra data")
    lb.add_argument("--name", default=None)
    lb.add_argument("--model-info", default=None, help="an exported model_info JSON")
    lb.add_argument("--results", default=None, metavar="FILE", help="an `eval --json` file")
    lb.add_argument("--n", type=int, default=None,
                    help="points the result was measured on (fewer than the benchmark's 10,000 -- ImageNet: "
                         "5,000 -- is not comparable)")
    lb.add_argument("--top", type=int, default=20)
    lb.set_defaults(func=cmd_leaderboard)

    d = sub.add_parser("doctor", help="check the environment (torch and devices, the AutoAttack backend, "
                                      "RobustBench's files against its RECORD, requests/urllib3, the extras): one "
                                      "line per item with the repair command; exit 0 healthy, 1 not")
    d.set_defaults(func=cmd_doctor)

    c = sub.add_parser("configs", help="list the presets")
    c.add_argument("--show", default=None, metavar="NAME", help="print a preset, resolved")
    c.add_argument("--filter", default=None,
                   help="comma-separated name parts that must all appear as whole words, e.g. cifar10,adr")
    c.add_argument("-v", "--verbose", action="store_true", help="with descriptions")
    c.set_defaults(func=cmd_configs)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")
    restore = _stop_on_sigterm(args.command) if args.command in ("export", "eval") else None
    try:
        code = args.func(args)
    except BaseException as exc:  # noqa: BLE001 - every error becomes a message and an exit code
        code, message = _classify(exc)
        if code is None:
            raise
        if args.debug:
            traceback.print_exc()
        if message is not None:
            if code == EXIT_INTERRUPTED:
                print(message, file=sys.stderr, flush=True)
            else:
                _err(message)
    finally:
        if restore is not None:
            restore()
    return code


class CommandStopped(PackageError):
    """SIGTERM during ``export``/``eval``: stopped where it was; nothing half-written is left."""
    exit_code = EXIT_INTERRUPTED


def _stop_on_sigterm(command: str):
    """Make SIGTERM during ``export``/``eval`` an exception (exit 3 with a message) rather than a
    silent death (143): the export's staging directory is removed on the way out, and ``eval
    --json`` writes its file only at the end, atomically.  Returns the function restoring the
    previous handler (None where no handler can be set, e.g. outside the main thread)."""
    import signal

    done = {"export": "nothing was exported (the staging directory was removed; an earlier export in --out is "
                      "unchanged)",
            "eval": "no result was written"}[command]

    def handler(signum, frame):
        raise CommandStopped(f"{command} stopped by {signal.Signals(signum).name}: {done}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _classify(exc: BaseException):
    """``(exit code, message)`` of an error by its cause; ``(None, None)`` for what must propagate.

    The package's own errors carry their exit code (rb_labelrefine/errors.py, a leaf: classifying
    imports nothing else); OS errors are I/O (4) or a bad path (2); anything else is a bug (70) --
    a plain ``ValueError`` included."""
    if isinstance(exc, SystemExit):
        return None, None
    code = exit_code_of(exc)
    if code is not None:
        return code, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        # a second signal during training (or Ctrl-C outside it): stop now; files written so
        # far are complete (atomic writes), the last checkpoint is resumable
        return EXIT_SECOND_SIGNAL, "interrupted"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, _os_message(exc)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            return EXIT_USAGE, _os_message(exc)
        return EXIT_IO, _os_message(exc)
    if isinstance(exc, MemoryError):
        return EXIT_IO, "out of memory"
    return EXIT_INTERNAL, (f"internal error: {type(exc).__name__}: {str(exc).strip()[:500]} (rerun with --debug for "
                           "the traceback, and please report it)")


def _os_message(exc: OSError) -> str:
    text = str(exc)
    if exc.filename is not None and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
