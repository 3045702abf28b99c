#!/usr/bin/env python
"""Issue 13 on one GPU: the whole robust-overfitting table as parallel processes, in a 10-minute slot.

Runs ``robust_overfitting.py --preset fmnist-long --device cuda`` (every method x seed: 26 runs,
then AutoAttack on each) as ``--jobs`` one-thread processes sharing the one GPU, with a wall-clock
guard, and writes ``benchmarks/results/robust_overfitting_fmnist_long_gpu.{json,md,png}`` beside
the CPU table (``..._fmnist_long.*``, never overwritten).  Nothing else depends on this script.

    # once, on a machine with the data and the package's test dependencies (here):
    python benchmarks/robust_overfitting_gpu.py --prepare            # -> gpu_carry/ (ignored, ~31 MB)
    # on the GPU machine (the device tool: carry ["gpu_carry"]; results come back through $OUT):
    PYTHONUNBUFFERED=1 python3 benchmarks/robust_overfitting_gpu.py --export $OUT
    # check the script path on a CPU (no GPU needed):
    python benchmarks/robust_overfitting_gpu.py --device cpu --preset smoke --out /tmp/ro_smoke

``--prepare`` copies the four Fashion-MNIST ``.gz`` IDX files (the device machine gets the
repository's working tree only, not /usr/share/datasets) and the installed pure-Python
``pyautoattack`` package without its 42 MB of example weights (the GPU image lacks it; nothing can
be installed there) into ``gpu_carry/``; a run finds them there by itself (``--carried``).

Wall-clock guard: no new task after ``--deadline-min`` (default 6), every process stopped at
``--hard-deadline-min`` (default 8.5; the interrupted runs keep their checkpoints and resume when
the script is started again with the same ``--out``), then the table is rebuilt from the finished
runs (``--report-only``): a partial table, its missing runs listed.  Exit status: 0 complete,
3 partial (deadline), 1 a run failed, 2 no GPU / no data / no AutoAttack / bad arguments.

Determinism: off the CPU every run sets ``train.deterministic=true``
(``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic, benchmark off,
``CUBLAS_WORKSPACE_CONFIG=:4096:8``): a rerun on the same GPU and software repeats itself; GPU and
CPU runs differ in the last bits (another arithmetic), so the GPU table is its own, named by device.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RO = HERE / "robust_overfitting.py"
CARRY = REPO / "gpu_carry"           # ignored (.gitignore); the device tool carries it
DATA_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz")

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


# On the GPU the AutoAttack points are cheap and they are what keeps the CPU table's intervals
# wide: in the committed fmnist-long table the test points, not the seeds, give most of the final
# difference's half-width (KD+SWA vs PGD-AT: +-1.90 of +-2.33; robust_overfitting_regimes.md).
GPU_AA_N = {"fmnist-long": 1000}


def gpu_extra(preset: str, device: str, extra: list) -> list:
    """robust_overfitting.py options for this run: ``extra`` plus, off the CPU, the GPU's AutoAttack
    sample size (``GPU_AA_N``) unless ``extra`` sets ``--aa-n`` itself."""
    extra = list(extra)
    has_n = any(a == "--aa-n" or a.startswith("--aa-n=") for a in extra)
    if device != "cpu" and preset in GPU_AA_N and not has_n:
        extra += ["--aa-n", str(GPU_AA_N[preset])]
    return extra


def prepare(dest: Path, data_root) -> int:
    """Copy the Fashion-MNIST IDX files and pyautoattack (code only) into ``dest``."""
    from rb_labelrefine.data.fashion_mnist import FASHION_MNIST_ROOT

    src = Path(data_root or FASHION_MNIST_ROOT)
    missing = [f for f in DATA_FILES if not (src / f).is_file()]
    if missing:
        print(f"error: --prepare needs the four .gz IDX files in {src}; missing: {', '.join(missing)} "
              "(apt-get install dataset-fashion-mnist, or --data-root DIR)", file=sys.stderr)
        return 2
    try:
        import pyautoattack
    except ImportError:
        print("error: --prepare copies the installed pyautoattack; pip install pyautoattack first", file=sys.stderr)
        return 2
    (dest / "fashion-mnist").mkdir(parents=True, exist_ok=True)
    for f in DATA_FILES:
        shutil.copy2(src / f, dest / "fashion-mnist" / f)
    pkg = Path(pyautoattack.__file__).parent
    site = dest / "site"
    shutil.rmtree(site / "pyautoattack", ignore_errors=True)
    shutil.copytree(pkg, site / "pyautoattack", ignore=shutil.ignore_patterns("examples", "__pycache__"))
    for info in pkg.parent.glob("pyautoattack-*.dist-info"):   # its version, for the report
        shutil.rmtree(site / info.name, ignore_errors=True)
        shutil.copytree(info, site / info.name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 2 ** 20
    print(f"prepared {dest} ({size:.1f} MiB): fashion-mnist/ (4 IDX files) and site/pyautoattack "
          f"{getattr(pyautoattack, '__version__', '?')} (code only).\nOn the GPU machine (device tool: carry "
          f"[\"{dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}\"], timeout_s 600):\n"
          "  PYTHONUNBUFFERED=1 python3 benchmarks/robust_overfitting_gpu.py --export $OUT")
    return 0


def results_base(preset: str, device: str, out: Path, results_dir) -> Path:
    """Where robust_overfitting.py writes the table (the same rule as its main())."""
    from robust_overfitting import PRESETS

    tag = PRESETS[preset]["tag"] + ("_gpu" if device != "cpu" else "")
    rd = Path(results_dir) if results_dir else (REPO / "benchmarks" / "results" if preset != "smoke" else out)
    return rd / f"robust_overfitting_{tag}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the benchmark's process group (its pool workers too), SIGKILL after 20 s."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def export(base: Path, out: Path, dest: Path) -> list:
    """The table's three files and a tarball of every run's records and logs (no weights) to ``dest``."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for suffix in (".json", ".md", ".png"):
        f = base.with_suffix(suffix)
        if f.exists():
            shutil.copy2(f, dest / f.name)
            copied.append(dest / f.name)
    tar = dest / f"{base.name}_runs.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for f in sorted(out.glob("*/*")):
            if f.is_file() and (f.suffix in (".json", ".log") or f.name.endswith(".jsonl")):
                t.add(f, arcname=f"{out.name}/{f.relative_to(out)}")
    copied.append(tar)
    return copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true",
                    help="copy the data and pyautoattack into --carried (default gpu_carry/) and stop")
    ap.add_argument("--preset", default="fmnist-long", help="robust_overfitting.py preset (default fmnist-long)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check this script "
                    "with --preset smoke")
    ap.add_argument("--jobs", type=int, default=None,
                    help="parallel processes on the GPU (default: the CPU cores, at most 24)")
    ap.add_argument("--deadline-min", type=float, default=6.0, help="start no new task after this (default 6)")
    ap.add_argument("--hard-deadline-min", type=float, default=8.5,
                    help="stop every process after this and write the partial table (default 8.5)")
    ap.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files (default: "
                    "<carried>/fashion-mnist if present, else /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--carried", type=Path, default=CARRY, help=f"folder made by --prepare (default {CARRY})")
    ap.add_argument("--out", type=Path, default=None, help="run directories (default "
                    "runs/robust_overfitting/<preset>-gpu; the same --out resumes)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--export", type=Path, default=None,
                    help="also copy the table and the runs' records/logs here (on the device machine: $OUT)")
    ap.add_argument("extra", nargs="*", help="after --: more robust_overfitting.py options")
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare(args.carried, args.data_root)
    from robust_overfitting import PRESETS, check_device

    if args.preset not in PRESETS:
        ap.error(f"--preset must be one of {sorted(PRESETS)}")
    if args.device == "cpu" and args.preset != "smoke":
        print("error: --device cpu only checks this script (--preset smoke); the CPU table is "
              "robust_overfitting.py's own", file=sys.stderr)
        return 2
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"error: no GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda}). This script runs the table on one GPU; on a CPU use "
                  "benchmarks/robust_overfitting.py, or --device cpu --preset smoke to check this script.",
                  file=sys.stderr)
            return 2
    err = check_device(args.device)
    if err:
        print(f"error: --device {args.device}: {err}", file=sys.stderr)
        return 2

    site = args.carried / "site"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    paths = [str(REPO)] + ([str(site)] if site.is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    sys.path[:0] = [p for p in paths if p not in sys.path]
    if "--train-only" not in args.extra:
        try:
            import pyautoattack  # noqa: F401
        except ImportError:
            print(f"error: AutoAttack (pyautoattack) is not importable and {site} is missing: run "
                  "`python benchmarks/robust_overfitting_gpu.py --prepare` where it is installed and carry "
                  f"{args.carried.name}/ (or add -- --train-only)", file=sys.stderr)
            return 2
    data_root = args.data_root or (str(args.carried / "fashion-mnist") if (args.carried / "fashion-mnist").is_dir()
                                   else None)
    from rb_labelrefine.data import load_fashion_mnist
    from rb_labelrefine.data.errors import DatasetNotFoundError
    from rb_labelrefine.data.fashion_mnist import FASHION_MNIST_ROOT

    try:
        load_fashion_mnist(data_root or FASHION_MNIST_ROOT)
    except DatasetNotFoundError as exc:
        print(f"error: Fashion-MNIST not found. The GPU machine gets the working tree only: run "
              f"`python benchmarks/robust_overfitting_gpu.py --prepare` here and carry {args.carried.name}/.\n{exc}",
              file=sys.stderr)
        return 2

    jobs = args.jobs or max(1, min(os.cpu_count() or 1, 24))
    out = (args.out or REPO / "runs" / "robust_overfitting" /
           (args.preset + ("-gpu" if args.device != "cpu" else "-cpu-check"))).resolve()
    base = results_base(args.preset, args.device, out, args.results_dir)
    common = ["--preset", args.preset, "--device", args.device, "--out", str(out)] + \
        (["--data-root", data_root] if data_root else []) + \
        (["--results-dir", str(args.results_dir)] if args.results_dir else []) + \
        gpu_extra(args.preset, args.device, args.extra)
    cmd = [sys.executable, str(RO)] + common + ["--jobs", str(jobs), "--deadline-min", str(args.deadline_min)]
    if args.device != "cpu":
        import torch

        d = torch.device(args.device)
        print(f"GPU: {torch.cuda.get_device_name(d)}, "
              f"{torch.cuda.get_device_properties(d).total_memory / 2 ** 30:.0f} GiB; {jobs} processes; "
              f"{os.cpu_count()} CPU cores; torch {torch.__version__}", flush=True)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), start_new_session=True)
    stopped = False
    try:
        rc = proc.wait(timeout=max(1.0, args.hard_deadline_min * 60 - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        print(f"[{(time.time() - t0) / 60:.1f} min] hard deadline: stopping the benchmark", flush=True)
        _stop(proc)
        stopped, rc = True, 3
    except KeyboardInterrupt:
        _stop(proc)
        raise
    wall = (time.time() - t0) / 60
    if stopped:   # the table from the finished runs (the interrupted ones are listed as missing)
        subprocess.run([sys.executable, str(RO)] + common + ["--jobs", str(jobs), "--report-only"], env=env,
                       cwd=str(REPO), timeout=180, stdout=subprocess.DEVNULL)
    res = {}
    if base.with_suffix(".json").exists():
        res = json.loads(base.with_suffix(".json").read_text())
        res["gpu_script"] = {"wall_clock_min": round(wall, 2), "jobs": jobs, "deadline_min": args.deadline_min,
                             "hard_deadline_min": args.hard_deadline_min, "stopped_at_hard_deadline": stopped,
                             "exit": rc}
        base.with_suffix(".json").write_text(json.dumps(res, indent=1))
        with open(base.with_suffix(".md"), "a") as f:
            f.write(f"\nWritten by benchmarks/robust_overfitting_gpu.py: {jobs} processes on {args.device}, "
                    f"wall clock {wall:.1f} min" + (" (stopped at the hard deadline: partial)" if stopped else "")
                    + ".\n")
    missing = res.get("missing") or []
    if rc == 0 and missing:
        rc = 3   # the soft deadline left tasks unstarted
    print(f"\n{res.get('n_runs', 0)} runs in the table, {len(missing)} tasks missing, wall clock {wall:.1f} min, "
          f"exit {rc} ({ {0: 'complete', 1: 'a run failed', 3: 'partial'}.get(rc, 'error') })")
    if args.export:
        for f in export(base, out, args.export):
            print(f"exported {f}")
    if args.device != "cpu" and res:
        names = " ".join(f"benchmarks/results/{base.name}{s}" for s in (".json", ".md", ".png"))
        print("\nTo commit (beside the CPU table, which is not touched): copy the exported "
              f"{base.name}.{{json,md,png}} into benchmarks/results/, then\n  git add {names}\n  "
              f"git commit -m 'Issue 13: fmnist-long on one GPU ({res.get('machine', '').split(' (')[0]})'"
              + ("\n(partial: start it again with the same --out on a warm machine to resume)" if rc == 3 else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
