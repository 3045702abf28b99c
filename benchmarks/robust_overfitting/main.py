"""The command line: ``python3 benchmarks/robust_overfitting.py [options]``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from .plan import CHECKPOINTS, METHODS, MULTI_SEED, PRESETS, REPO, build_jobs, check_device
from .records import covers, import_results
from .report import render_markdown, write_results
from .run import exit_status, schedule


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    ap = argparse.ArgumentParser(description=sys.modules[__package__].__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fmnist-small")
    ap.add_argument("--jobs", type=int, default=None, help="parallel one-thread processes (default: the preset's)")
    ap.add_argument("--out", type=Path, default=None, help="where the run directories go "
                    "(default ./runs/robust_overfitting/<preset>)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help=f"seeds of the multi-seed methods {list(MULTI_SEED)}; the others use the first")
    ap.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files "
                    "(default /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="start no new task after this many minutes (a partial table is written)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild the JSON / markdown / plot from the finished runs in --out")
    ap.add_argument("--train-deadline-min", type=float, default=None,
                    help="after this many minutes, AutoAttack of finished runs goes before new training")
    ap.add_argument("--aa-n", type=int, default=None,
                    help="AutoAttack on the first N images of the test subset (default: the preset's); "
                         "runs attacked with another N are attacked again")
    ap.add_argument("--aa-offset", type=int, default=0, metavar="K",
                    help="AutoAttack on the test subset's images K .. K+N-1 instead of the first N (e.g. further "
                         "seeds on fresh points, so the test-point part of the paired CIs shrinks with the seeds; "
                         "each record keeps its offset and the table pairs every seed on its own points)")
    ap.add_argument("--aa-checkpoints", nargs="+", choices=CHECKPOINTS, default=list(CHECKPOINTS),
                    help="which checkpoints AutoAttack scores (default all; best_pgd_ce costs one more "
                         "AutoAttack where CE validation picked another epoch)")
    ap.add_argument("--order", choices=("seed", "method", "round"), default="seed",
                    help="seed: the first seed of every method first (default); method: all seeds of a "
                         "method before the next one, in the order of --methods; round: seed by seed, every "
                         "method's k-th seed before any (k+1)-th (adding seeds: a cut-off leaves whole rounds)")
    ap.add_argument("--train-only", action="store_true", help="train and score with PGD-20; no AutoAttack")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: training, PGD and AutoAttack "
                    "run there; off the CPU the results are tagged _gpu (robust_overfitting_<tag>_gpu.*) and the "
                    "runs go to <preset>-gpu, beside the CPU ones")
    ap.add_argument("--import-results", type=Path, nargs="+", default=[], metavar="JSON",
                    help="finished runs from results files this script wrote (e.g. the committed table), "
                         "for the runs whose directories are gone; each is imported only when complete and "
                         "trained with the same settings (see import_results)")
    ap.add_argument("--seeds-of", nargs="+", default=[], metavar="METHOD=SEEDS",
                    help="other seeds for some methods, e.g. trades=0,1,2 ltd=0,1,2 (more seeds for the claim "
                         "rows than for the rest)")
    ap.add_argument("--prefer-imported", nargs="+", default=[], metavar="RUN",
                    help="with --report-only: for these runs (e.g. pgd_at_s0) the table uses the imported record "
                         "even where a run directory here has one (a teacher trained again for its weights); "
                         "both are compared in a note")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    p = _settings(ap, args)
    if p is None:
        return 2
    results_dir = args.results_dir or (REPO / "benchmarks" / "results" if args.preset != "smoke" else args.out)
    if not _data_found(args):
        return 2
    jobs = build_jobs(args.methods, args.seeds, p, args.out, args.data_root, args.aa_checkpoints, args.order,
                      args.device, args.seeds_of)
    imported = _import_all(args, jobs, p)
    if imported is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"{len(jobs)} runs -> {args.out}; results -> {results_dir}", flush=True)
    for j in jobs:
        print(f"  {j['key']:<22} {j['preset']}" + (f"  (needs {', '.join(j['deps'])})" if j["deps"] else ""))

    if args.report_only:
        return _report_only(args, jobs, p, imported, results_dir)
    return _run_all(args, jobs, p, imported, results_dir, t_start)


def _settings(ap, args) -> Optional[dict]:
    """The preset with the command line's changes (``args`` completed in place); ``None`` after
    naming a device that cannot run the benchmark; a bad combination of options exits 2."""
    p = dict(PRESETS[args.preset])
    err = check_device(args.device)
    if err:
        print(f"error: --device {args.device}: {err}", file=sys.stderr)
        return None
    if args.device != "cpu":
        p["tag"] += "_gpu"
    if args.aa_n is not None:
        if not 1 <= args.aa_n <= p["test_subset"]:
            ap.error(f"--aa-n must be between 1 and the preset's test subset ({p['test_subset']}), got {args.aa_n}")
        p["aa_n"] = args.aa_n
    if not 0 <= args.aa_offset <= p["test_subset"] - p["aa_n"]:
        ap.error(f"--aa-offset must be between 0 and the preset's test subset minus N "
                 f"({p['test_subset']} - {p['aa_n']}), got {args.aa_offset}")
    if args.aa_offset and args.report_only:
        ap.error("--aa-offset goes with training / attacking runs; --report-only takes every record with its own "
                 "offset")
    p["aa_offset"] = args.aa_offset
    args.jobs = args.jobs or p["jobs"]
    if args.prefer_imported and not (args.report_only and args.import_results):
        ap.error("--prefer-imported goes with --report-only and --import-results (while training, a run's own "
                 "record is the one its students and AutoAttack see)")
    args.seeds = args.seeds or p["seeds"]
    seeds_of = {}
    for spec in args.seeds_of:
        m, _, ss = spec.partition("=")
        try:
            seeds_of[m] = [int(x) for x in ss.split(",") if x.strip()]
        except ValueError:
            seeds_of[m] = []
        if m not in METHODS or not seeds_of[m] or "=" not in spec:
            ap.error(f"--seeds-of {spec!r}: expected METHOD=SEED,SEED,... with METHOD one of {', '.join(METHODS)}")
    args.seeds_of = seeds_of
    args.out = (args.out or Path("runs") / "robust_overfitting" /
                (args.preset + ("-gpu" if args.device != "cpu" else ""))).resolve()
    return p


def _data_found(args) -> bool:
    """Fashion-MNIST is there (else: an error naming where it was looked for)."""
    sys.path.insert(0, str(REPO))
    from rb_labelrefine.data import load_fashion_mnist
    from rb_labelrefine.data.errors import DatasetNotFoundError
    from rb_labelrefine.data.fashion_mnist import FASHION_MNIST_ROOT

    try:
        load_fashion_mnist(args.data_root or FASHION_MNIST_ROOT)
    except DatasetNotFoundError as exc:
        print(f"error: Fashion-MNIST is needed for this benchmark and was not found.\n{exc}", file=sys.stderr)
        return False

    return True


def _import_all(args, jobs: list, p: dict) -> Optional[dict]:
    """The runs of ``--import-results`` (the first file that has a run wins); ``None`` after naming a
    file that is not there."""
    for f in args.import_results:
        if not f.is_file():
            print(f"error: --import-results {f}: no such file", file=sys.stderr)
            return None
    imported = {}
    for f in args.import_results:   # the first file that has a run wins
        recs, notes = import_results(f, jobs, p, args.out, train_only=args.train_only,
                                     keep_teachers=args.report_only, prefer=args.prefer_imported)
        for n in notes:
            print(f"import: {n}")
        for k, r in recs.items():
            imported.setdefault(k, r)
    return imported


def _report_only(args, jobs: list, p: dict, imported: dict, results_dir: Path) -> int:
    """``--report-only``: the table from the records in ``--out`` and the imported ones; nothing runs."""
    records = {}
    for j in jobs:
        f = Path(j["out_dir"]) / "benchmark_record.json"
        if f.exists():
            rec = json.loads(f.read_text())
            if rec.get("overrides") == j["overrides"]:
                records[j["key"]] = rec
    shadowed = {}
    for k, r in imported.items():
        if k in records and k in args.prefer_imported:
            shadowed[k] = records[k]
            records[k] = r
        records.setdefault(k, r)
    missing = [f"train:{j['key']}" for j in jobs if j["key"] not in records] + \
        [f"aa:{j['key']}" for j in jobs if j["key"] in records and j["method"] != "natural"
         and (records[j["key"]]["final"].get("autoattack") is None
              or not covers(records[j["key"]]["final"], p["aa_n"]))]
    # no wall clock: the runs may come from several invocations (the compute sums stay correct)
    result = write_results(records, jobs, args, p, None, results_dir, missing, shadowed)
    print(render_markdown(result))
    return 0


def _run_all(args, jobs: list, p: dict, imported: dict, results_dir: Path, t_start: float) -> int:
    """Train and AutoAttack what is not done yet, rewriting the results after every finished task."""
    records, failed, running = dict(imported), {}, {}
    # tasks: (phase, job).  Training first, by priority; AutoAttack (not for the natural teacher) after
    # the training of the same run, and -- when --train-deadline-min is given -- the AA tasks take
    # precedence once that time has passed, so the most important rows get AutoAttack in time.
    pending = [("train", j) for j in jobs if j["key"] not in imported] + \
        ([] if args.train_only else [("aa", j) for j in jobs if j["method"] != "natural" and j["key"] not in imported])

    def elapsed():
        return (time.time() - t_start) / 60

    def ready(phase, j):
        if phase == "aa":
            return j["key"] in records
        return all(d in records for d in j["deps"])

    def report(phase, j, rec):
        b, f = rec["best"], rec["final"]
        if phase == "train":
            print(f"[{elapsed():5.1f} min] trained {j['key']}: best ep {b['epoch']} clean {b['clean']:.1f} pgd20 "
                  f"{b['pgd20']:.1f} | final clean {f['clean']:.1f} pgd20 {f['pgd20']:.1f} | "
                  f"{rec['wall_train_seconds']:.0f}s" + (" (reused)" if rec.get("reused") else ""), flush=True)
        else:
            aa = lambda d: "–" if d.get("autoattack") is None else f"{d['autoattack']:.1f}"  # noqa: E731
            print(f"[{elapsed():5.1f} min] AutoAttack {j['key']}: best {aa(b)} final {aa(f)} "
                  f"(n={b.get('autoattack_n') or f.get('autoattack_n')}, {rec.get('autoattack_seconds') or 0:.0f}s)"
                  + (" (reused)" if rec.get("reused") else ""), flush=True)

    def order(pending):
        # past --train-deadline-min: AutoAttack tasks first, and no training starts while one is ready
        if args.train_deadline_min is not None and elapsed() > args.train_deadline_min:
            return ([t for t in pending if t[0] == "aa"] + [t for t in pending if t[0] == "train"],
                    lambda phase, j: phase == "train" and any(p == "aa" and ready(p, jj) for p, jj in pending))
        return [t for t in pending if t[0] == "train"] + [t for t in pending if t[0] == "aa"], None

    def on_done(phase, j, rec):
        records[j["key"]] = rec
        report(phase, j, rec)
        missing = [f"{p}:{x['key']}" for p, x in pending] + list(failed) + \
            [f"{p}:{x['key']}" for p, x in running.values()]
        write_results(records, jobs, args, p, t_start, results_dir, missing)

    schedule(pending, jobs=args.jobs, ready=ready, on_done=on_done, elapsed=elapsed, failed=failed, running=running,
             order=order, deadline_min=args.deadline_min, dep_failed="a teacher run failed")
    missing = [f"{ph}:{x['key']}" for ph, x in pending] + list(failed)
    result = write_results(records, jobs, args, p, t_start, results_dir, missing)
    print(render_markdown(result))
    return exit_status(failed)
