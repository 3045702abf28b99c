"""Running the runs: train (or reuse / resume) and score one run, AutoAttack its checkpoints, and
the pool of one-thread processes that runs them in order."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Optional

from rb_labelrefine.evaluation.paired import points_str

from .plan import CHECKPOINTS, REPO
from .records import checkpoints_of, covers


def write_record(rec_path: Path, rec: dict) -> None:
    tmp = rec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, rec_path)


def write_json_md(base: Path, result: dict, markdown: str) -> None:
    """Write ``result`` to ``base``.json and ``markdown`` to ``base``.md (each via a .tmp file, so a
    reader never sees a half-written one); creates ``base``'s folder."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown)):
        tmp = base.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, base.with_suffix(suffix))


def run_job(job: dict, phase: str = "train") -> dict:
    """Run one task; any error comes back as a RuntimeError carrying the traceback (some
    exceptions, e.g. the package's ConfigError, cannot be unpickled and would break the pool)."""
    try:
        return run_task(job, phase)
    except Exception as exc:
        raise RuntimeError(f"{job['key']} ({phase}): {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None


def schedule(pending: list, *, jobs: int, ready, on_done, elapsed, failed: dict, running: dict,
             order=None, deadline_min: Optional[float] = None, run_phase=None,
             dep_failed: str = "a run it needs failed") -> None:
    """Run the tasks of ``pending`` (``(phase, job)`` pairs) with at most ``jobs`` at a time.

    Shared by this script and robust_overfitting_tuned.py.  The tasks run as
    ``run_job(job, run_phase(phase))`` (default: the phase itself) in a pool of ``jobs`` spawned
    processes.  Each round: ``order(pending)`` gives ``(tasks, hold)`` -- the pending tasks in the
    order to try and a predicate ``hold(phase, job)`` (or None) for tasks to leave for a later
    round; default: ``(list(pending), None)``.  In that order, until ``jobs`` tasks run or
    ``elapsed()`` (minutes, checked once a round) is past ``deadline_min``: a task whose dependency
    failed (``job["deps"]``, or for ``"aa"`` its own training) is dropped and recorded in
    ``failed`` with the reason ``dep_failed``; a task with ``ready(phase, job)`` is started.  Then it waits
    for the first task to finish: a result goes to ``on_done(phase, job, rec)`` (which may append
    tasks to ``pending``), an exception is recorded in ``failed[job["key"]]`` with its traceback
    and printed to stderr.  It returns when nothing is running and nothing can start.
    ``pending``, ``failed`` and ``running`` (future -> task) are the caller's and are updated in place.
    """
    import multiprocessing as mp

    run_phase = run_phase or (lambda phase: phase)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            is_late = deadline_min is not None and elapsed() > deadline_min
            tasks, hold = order(pending) if order is not None else (list(pending), None)
            for phase, j in tasks:
                if len(running) >= jobs or is_late:
                    break
                if hold is not None and hold(phase, j):
                    continue
                if any(d in failed for d in j["deps"]) or (phase == "aa" and j["key"] in failed):
                    failed.setdefault(j["key"], dep_failed)
                    pending.remove((phase, j))
                    continue
                if ready(phase, j):
                    pending.remove((phase, j))
                    running[pool.submit(run_job, j, run_phase(phase))] = (phase, j)
                    print(f"[{elapsed():5.1f} min] start {phase} {j['key']}", flush=True)
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                phase, j = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception:
                    failed[j["key"]] = traceback.format_exc()
                    print(f"[{elapsed():5.1f} min] FAILED {phase} {j['key']}:\n{failed[j['key']]}",
                          file=sys.stderr, flush=True)
                    continue
                on_done(phase, j, rec)


def exit_status(failed: dict) -> int:
    """0, or 1 after naming the failed runs on stderr."""
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def score_points(model, x, y, a) -> dict:
    """Clean and PGD-20 accuracy of one checkpoint, with the per-point outcomes (0/1 strings)."""
    import torch

    from rb_labelrefine.evaluation.pgd import pgd_correct

    dev = next(model.parameters()).device
    x, y = x.to(dev), y.to(dev)
    with torch.no_grad():
        clean = torch.cat([model(x[i:i + 256]).argmax(1) == y[i:i + 256] for i in range(0, len(y), 256)]).cpu()
    pgd = pgd_correct(model, (x, y), eps=a.eps, alpha=a.alpha, steps=20, norm=a.norm, seed=0)
    return {"clean": 100.0 * clean.float().mean().item(), "pgd20": 100.0 * pgd.float().mean().item(),
            "clean_points": points_str(clean), "pgd20_points": points_str(pgd)}


def run_task(job: dict, phase: str = "train") -> dict:
    """``phase="train"``: train one run (or reuse / resume it) and score its best and final
    weights with clean accuracy and PGD-20.  ``phase="aa"``: add AutoAttack on both."""
    import torch

    torch.set_num_threads(1)   # one thread per process on the GPU too (the processes share the cores)
    dev = job.get("device", "cpu")
    if dev != "cpu":   # before the first cuBLAS call of this worker (the AA phase builds no Trainer)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    from rb_labelrefine.config import load_config

    out = Path(job["out_dir"])
    rec_path = out / "benchmark_record.json"
    cfg = load_config(job["preset"], job["overrides"])
    cfg.name = job["key"]
    cfg.train.device = dev   # not "auto": --device cpu stays on the CPU where a GPU is present
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as logf:
        def log(msg):
            logf.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
            logf.flush()

        rec = None
        if rec_path.exists():
            rec = json.loads(rec_path.read_text())
            if rec.get("overrides") != job["overrides"] or rec.get("preset") != job["preset"]:
                raise RuntimeError(f"{out} holds a run with different settings; choose another --out")
        if phase == "aa":
            if rec is None:
                raise RuntimeError(f"{out}: train it before AutoAttack")
            return attack_run(job, cfg, rec_path, rec, log)
        if rec is not None and all("pgd20_points" in rec[w] for w in checkpoints_of(out)):
            rec["reused"] = True
            return rec
        if rec is not None:   # a record from before per-point outcomes were stored: add them (cheap)
            return _add_points(job, cfg, rec_path, rec)
        return train_run(job, cfg, log)


def _aa_done(d: dict, job: dict) -> bool:
    """A checkpoint's record already holds the AutoAttack this job asks for (n, offset, suite, points)."""
    return (d.get("autoattack") is not None and covers(d, job["aa_n"], job.get("aa_offset", 0))
            and d.get("autoattack_suite", "standard") == job.get("aa_suite", "standard")
            and d.get("pgd20_aa_points") is not None and d.get("autoattack_points") is not None)


def attack_run(job: dict, cfg, rec_path: Path, rec: dict, log) -> dict:
    """AutoAttack the checkpoints of a trained run (``job["aa_checkpoints"]``, in that order) on its
    test points ``aa_offset .. aa_offset + aa_n - 1`` with the job's suite, and PGD-20 on exactly those
    points; each checkpoint's result is written to the record as soon as it is there."""
    from rb_labelrefine.evaluation.checkpoint import evaluate_checkpoint, run_test_split, stack_test_points
    from rb_labelrefine.evaluation.pgd import pgd_accuracy
    from rb_labelrefine.runs import load_run_model

    out, dev = rec_path.parent, job.get("device", "cpu")
    # in the order asked for (--aa-checkpoints final best: the final number first)
    todo = [w for w in job.get("aa_checkpoints", CHECKPOINTS) if w in rec and not _aa_done(rec[w], job)]
    if not todo:
        rec["reused"] = True
        return rec
    test = run_test_split(cfg)
    off, suite = job.get("aa_offset", 0), job.get("aa_suite", "standard")
    x, y = stack_test_points(test, job["aa_n"], off)   # the test subset's images off .. off + aa_n - 1
    a = cfg.attack
    for which in todo:
        if which == "best_pgd_ce" and rec[which].get("epoch") == rec["best"].get("epoch") \
                and rec["best"].get("autoattack_points") is not None \
                and covers(rec["best"], job["aa_n"], off) \
                and rec["best"].get("autoattack_suite", "standard") == suite:
            # the same epoch's weights: CE validation picked the same checkpoint
            rec = json.loads(rec_path.read_text())
            rec[which].update({k: v for k, v in rec["best"].items() if k.startswith("autoattack")
                               or k == "pgd20_aa_points"})
            write_record(rec_path, rec)
            continue
        model, _, _ = load_run_model(out, which, device=dev)
        fields = {"autoattack_device": dev, "autoattack_offset": off}
        # PGD-20 on exactly the AutoAttack points: the curve's PGD-20 uses more images, so only
        # this number can be compared with AutoAttack (which must not be above it: a sanity check).
        fields["pgd20_aa_points"] = pgd_accuracy(model, (x, y), eps=a.eps, alpha=a.alpha, steps=20,
                                                 norm=a.norm, seed=0)
        t1 = time.time()
        aa = evaluate_checkpoint(which=which, model=model, cfg=cfg, test_data=test, n=job["aa_n"], offset=off,
                                 suite=suite, attack_params=job["aa_params"], device=dev, seed=0)
        log(f"AutoAttack on {which}: clean {aa['clean_acc']:.2f} robust {aa['robust_acc']:.2f} (n={aa['n']}, "
            f"{time.time() - t1:.0f}s)")
        fields.update({"autoattack": aa["robust_acc"], "autoattack_clean": aa["clean_acc"],
                       "autoattack_n": aa["n"], "autoattack_per_attack": aa.get("per_attack"),
                       "autoattack_suite": suite,
                       "autoattack_version": aa.get("version"), "autoattack_flags": aa.get("flags"),
                       "autoattack_points": points_str(aa["robust_correct"])})
        if aa.get("per_attack_correct"):
            # per point after each stage (clean, apgd-ce, apgd-t, ...): AutoAttack's own robust
            # flags from this same run, for paired per-stage comparisons (issue 13)
            fields["autoattack_stage_points"] = {k: points_str(v) for k, v in aa["per_attack_correct"].items()}
        # re-read before writing: another invocation may have attacked another checkpoint of
        # this run meanwhile (the checkpoints of one run can be attacked side by side)
        rec = json.loads(rec_path.read_text())
        rec[which].update(fields)
        rec["autoattack_seconds"] = round((rec.get("autoattack_seconds") or 0.0) + time.time() - t1, 1)
        write_record(rec_path, rec)   # one checkpoint's AutoAttack survives an interruption
    return rec


def _add_points(job: dict, cfg, rec_path: Path, rec: dict) -> dict:
    """A record from before per-point outcomes were stored: score its checkpoints again (clean, PGD-20)."""
    from rb_labelrefine.evaluation.checkpoint import run_test_split, stack_test_points
    from rb_labelrefine.runs import RUN_FILES, load_run_model

    out = rec_path.parent
    x, y = stack_test_points(run_test_split(cfg), job["curve_n"])
    summary = json.loads((out / RUN_FILES["summary"]).read_text())
    for which in checkpoints_of(out):
        model, _, _ = load_run_model(out, which, device=job.get("device", "cpu"))
        rec.setdefault(which, {"autoattack": None, "autoattack_n": None})
        rec[which].update(score_points(model, x, y, cfg.attack))
    if "best_pgd_ce" in rec:
        rec["best_pgd_ce"]["epoch"] = summary.get("best_pgd_ce_epoch")
    write_record(rec_path, rec)
    rec["reused"] = True
    return rec


def train_run(job: dict, cfg, log) -> dict:
    """Train a run (resumed from its checkpoint where one is there; only scored where it finished),
    score its checkpoints on the curve's test points, and write its record."""
    import torch

    from rb_labelrefine.evaluation.checkpoint import run_test_split, stack_test_points
    from rb_labelrefine.runs import RUN_FILES, load_run_model
    from rb_labelrefine.training.trainer import Trainer

    out, dev = Path(job["out_dir"]), job.get("device", "cpu")
    resume = (out / RUN_FILES["checkpoint"]).exists() and not (out / RUN_FILES["summary"]).exists()
    t0 = time.time()
    if (out / RUN_FILES["summary"]).exists():
        summary = json.loads((out / RUN_FILES["summary"]).read_text())
    else:
        summary = Trainer(cfg, out, resume=resume, progress=True, log=log, handle_signals=False).fit()
    t_train = time.time() - t0
    history = json.loads((out / RUN_FILES["history"]).read_text())

    # score best and final on the same fixed test points (the curve's)
    x, y = stack_test_points(run_test_split(cfg), job["curve_n"])
    scores = {}
    for which in checkpoints_of(out):
        model, _, _ = load_run_model(out, which, device=dev)
        scores[which] = {**score_points(model, x, y, cfg.attack), "autoattack": None, "autoattack_n": None}
        log(f"{which}: clean {scores[which]['clean']:.2f} pgd20 {scores[which]['pgd20']:.2f} on {len(y)} test images")
    _selection_fields(scores, summary)
    rec = {"key": job["key"], "method": job["method"], "seed": job["seed"], "preset": job["preset"],
           "overrides": job["overrides"], "run_dir": str(out), **scores, **_curve_fields(history, summary),
           "effective_decays": summary.get("effective_decays", {}), "swa_start_epoch": _swa_start(cfg),
           "eval_model": summary.get("eval_model"), "attack_bn_mode": summary.get("attack_bn_mode"),
           "steps_per_epoch": summary.get("steps_per_epoch"),
           "train_seconds": summary.get("train_seconds"), "wall_train_seconds": round(t_train, 1),
           "autoattack_seconds": None, "threads": torch.get_num_threads(), "commit": commit(), "device": dev}
    write_record(out / "benchmark_record.json", rec)
    return rec


def _selection_fields(scores: dict, summary: dict) -> None:
    """Each checkpoint's epoch, validation PGD-10 and the attack that selected it (from the summary)."""
    scores["best"]["epoch"] = summary["best_epoch"]
    scores["best"]["val_pgd10"] = summary["best"].get("val_pgd")
    scores["best"]["selected_by"] = summary["best"].get("val_attack", "pgd_ce")
    scores["final"]["epoch"] = summary["epochs"]
    scores["final"]["val_pgd10"] = summary["final"].get("val_pgd")
    if "best_pgd_ce" in scores:
        scores["best_pgd_ce"]["epoch"] = summary.get("best_pgd_ce_epoch")
        scores["best_pgd_ce"]["val_pgd10"] = (summary.get("best_pgd_ce") or {}).get("val_pgd")
        scores["best_pgd_ce"]["selected_by"] = "pgd_ce"


def _curve_fields(history: list, summary: dict) -> dict:
    """The test curve (every ``eval.test_every`` epochs), its peak, and the training robust accuracy."""
    val_keys = tuple(k for k in (history[0] if history else {}) if k.startswith("val_pgd_"))
    curve = [{k: r.get(k) for k in ("epoch", "lr", "test_clean", "test_pgd", "val_pgd", "train_robust_acc") + val_keys}
             for r in history if r.get("test_pgd") is not None]
    peak = max(curve, key=lambda r: r["test_pgd"]) if curve else None
    tra = [r["train_robust_acc"] for r in history]
    return {"curve": curve,
            "curve_peak": {"epoch": peak["epoch"], "test_pgd": peak["test_pgd"]} if peak else None,
            "train_robust_acc": {"at_best": history[summary["best_epoch"] - 1]["train_robust_acc"]
                                 if summary["best_epoch"] >= 1 else None,
                                 "last5_mean": sum(tra[-5:]) / max(len(tra[-5:]), 1)}}


def _swa_start(cfg) -> Optional[int]:
    if not cfg.swa.enabled:
        return None
    if cfg.swa.start_epoch is not None:
        return cfg.swa.start_epoch
    return sorted(m if m >= 1 else round(m * cfg.train.epochs) for m in cfg.optim.milestones)[0]


def commit() -> Optional[str]:
    """The commit of the package the runs used (presets included), "+dirty" with local changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine_string(device: str = "cpu") -> str:
    """The machine; with a CUDA ``device`` the GPU by name (torch.cuda.get_device_name)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device != "cpu":
        d = torch.device(device)
        return (f"GPU {torch.cuda.get_device_name(d)} "
                f"({torch.cuda.get_device_properties(d).total_memory / 2 ** 30:.0f} GiB, device {device}, all runs "
                f"as processes on this one GPU), {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}), Python {platform.python_version()}")
    gpu = "no GPU" if not torch.cuda.is_available() else "GPU present but not used"
    return (f"{cpu}, {os.cpu_count()} CPU cores (shared with other work; timings are noisy), {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")
