"""The benchmark scripts run (tiny settings) and write what their README promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _extras import need
from rb_labelrefine.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_robust_overfitting_smoke(tmp_path):
    need("pyautoattack", "matplotlib")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke", "--methods",
           "pgd_at", "adr", "--seeds", "0", "--jobs", "1", "--out", str(tmp_path / "runs"), "--results-dir",
           str(tmp_path / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    for name in ("pgd_at", "adr"):
        rec = res["methods"][name]
        for which in ("best", "final"):
            assert set(rec[which]) >= {"epoch", "clean", "pgd20", "autoattack", "pgd20_aa_points"}
            # AutoAttack is never above PGD-20 on the same points (the report's sanity line)
            assert rec[which]["autoattack"] <= rec[which]["pgd20_aa_points"] + 1e-9
        assert rec["curve"]
    assert [c for c in res["claims"] if c["method"] == "adr" and c["metric"] == "autoattack"
            and c["final_diff_se"] > 0]
    # per-point outcomes of every checkpoint, and paired CIs of ADR against its base (PGD-AT)
    pp = res["per_point"]["adr_s0"]
    assert set(pp) == {"best", "final", "best_pgd_ce"}    # smoke selects by margin PGD: both bests kept
    assert len(pp["final"]["autoattack_points"]) == 16 and len(pp["final"]["pgd20_points"]) == 64
    assert 100 * pp["final"]["autoattack_points"].count("1") / 16 == rec["final"]["autoattack"]
    stages = pp["final"]["autoattack_stage_points"]   # per point after each stage, the last one = the final
    assert list(stages) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"][:len(stages)] and len(stages) >= 2
    assert all(len(v) == 16 for v in stages.values()) and list(stages.values())[-1] == pp["final"]["autoattack_points"]
    rows = [r for r in res["paired"] if r["method"] == "adr"]
    assert {(r["metric"], r["selection"]) for r in rows} == {(m, s) for m in ("autoattack", "pgd20")
                                                            for s in ("best", "best_pgd_ce")}
    for r in rows:
        assert r["base"] == "pgd_at" and r["seeds"] == [0]
        assert r["final_diff"]["lo"] <= r["final_diff"]["diff"] <= r["final_diff"]["hi"]
        assert r["halves_gap"] in ("yes", "no", "cannot tell")
    md = next((tmp_path / "results").glob("*.md")).read_text()
    assert "**Paired differences to the base objective**" in md
    assert "Sanity: on the same 16 points, AutoAttack accuracy ≤ PGD-20 accuracy for 4 of 4 checkpoints" in md
    assert list((tmp_path / "results").glob("*.png"))


def test_robust_overfitting_aa_n_out_of_range_is_refused(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke", "--aa-n", "0",
           "--out", str(tmp_path / "r"), "--results-dir", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--aa-n must be between 1 and" in proc.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "res").exists()


def test_robust_overfitting_missing_data_is_a_clear_error(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke", "--methods",
           "pgd_at", "--seeds", "0", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
           "--results-dir", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr + proc.stdout


def test_robust_overfitting_table_never_mixes_autoattack_sample_sizes():
    """A run attacked at another n (e.g. 100 before the preset moved to 300) counts as not
    attacked: its AutoAttack fields and PGD-20-on-the-AA-points are dropped, the rest kept."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_overfitting", ROOT / "benchmarks" / "robust_overfitting.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    old = {"autoattack": 50.0, "autoattack_n": 100, "autoattack_per_attack": {"apgd-ce": 51.0},
           "pgd20_aa_points": 52.0, "pgd20": 54.0, "clean": 77.0}
    rec = {"best": dict(old), "final": dict(old, autoattack_n=300)}
    out = ro._aa_at_n(rec, 300)
    assert out["best"] == {"pgd20": 54.0, "clean": 77.0}
    assert out["final"] == rec["final"] and rec["best"] == old  # the input is not modified


def test_robust_overfitting_more_points_serve_a_smaller_table_with_their_first_points():
    """A checkpoint attacked on 8 points with its per-point outcomes kept serves a table at n = 4:
    AutoAttack and PGD-20-on-the-AA-points recomputed from the first 4 outcomes, the per-stage
    numbers (unknown for the subset) dropped; without per-point outcomes it is dropped instead,
    and the AutoAttack phase does not redo it (``_covers``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_overfitting", ROOT / "benchmarks" / "robust_overfitting.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    big = {"autoattack": 50.0, "autoattack_n": 8, "autoattack_points": "11010000",
           "autoattack_stage_points": {"clean": "11110110", "apgd-ce": "11010100", "apgd-t": "11010000"},
           "autoattack_per_attack": {"apgd-ce": 62.5, "apgd-t": 50.0}, "pgd20_aa_points": 62.5,
           "pgd20_points": "1111000011", "pgd20": 60.0, "clean": 80.0}
    rec = {"best": dict(big), "final": {k: v for k, v in big.items() if k != "autoattack_points"}}
    out = ro._aa_at_n(rec, 4)
    b = out["best"]
    assert b["autoattack"] == 75.0 and b["autoattack_points"] == "1101" and b["autoattack_n"] == 4
    assert b["pgd20_aa_points"] == 100.0 and b["autoattack_first_of"] == 8 and b["autoattack_all"] == 50.0
    assert "autoattack_per_attack" not in b and b["pgd20"] == 60.0
    assert b["autoattack_stage_points"] == {"clean": "1111", "apgd-ce": "1101", "apgd-t": "1101"}
    assert "autoattack" not in out["final"] and out["final"]["pgd20"] == 60.0
    assert ro._covers(big, 4) and ro._covers(big, 8) and not ro._covers(big, 9)
    assert not ro._covers(rec["final"], 4)
    assert rec["best"] == big   # the input is not modified


def test_robust_overfitting_schedule_orders_skips_failures_and_takes_new_tasks(monkeypatch, capsys):
    """The scheduler shared by robust_overfitting.py and robust_overfitting_tuned.py, on an in-process
    pool: order and hold per round, at most `jobs` running, a failed run's dependants dropped with the
    reason, a failure's traceback kept, tasks appended by on_done run, nothing starts past the deadline."""
    import importlib.util
    from concurrent.futures import Future

    spec = importlib.util.spec_from_file_location("robust_overfitting", ROOT / "benchmarks" / "robust_overfitting.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    started, max_running = [], []

    class Pool:   # runs a task when it is submitted; its future is already done
        def __init__(self, max_workers, mp_context):
            self.jobs = max_workers

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, job, phase):
            fut = Future()
            try:
                fut.set_result(fn(job, phase))
            except Exception as exc:
                fut.set_exception(exc)
            return fut

    def run_job(job, phase):
        started.append((phase, job["key"], len(records)))   # how many had finished when it started
        if job["key"] == "bad":
            raise RuntimeError("bad broke")
        return {"key": job["key"], "phase": phase}

    monkeypatch.setattr(ro, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(ro, "run_job", run_job)
    job = lambda k, deps=(): {"key": k, "deps": list(deps)}  # noqa: E731
    a, bad, c, d = job("a"), job("bad"), job("c", ["bad"]), job("d", ["a"])
    pending = [("train", bad), ("train", c), ("train", a), ("train", d)]
    failed, running, records = {}, {}, {}

    def on_done(phase, j, rec):
        max_running.append(len(running))
        records[(phase, j["key"])] = rec
        if phase == "train" and j["key"] == "a":
            pending.append(("aa", j))          # as the tuned script adds tasks when one completes

    ro.schedule(pending, jobs=2, ready=lambda phase, j: all((("train", x) in records) for x in j["deps"]),
                on_done=on_done, elapsed=lambda: 0.0, failed=failed, running=running,
                order=lambda pend: (sorted(pend, key=lambda t: t[1]["key"]), lambda phase, j: j["key"] == "d"
                                    and ("aa", "a") not in records),
                run_phase=lambda phase: phase.upper(), dep_failed="needed run failed")
    # round 1: a, bad (2 jobs); round 2: aa a, c dropped, d held; round 3: d
    assert started == [("TRAIN", "a", 0), ("TRAIN", "bad", 0), ("AA", "a", 1), ("TRAIN", "d", 2)]
    assert set(records) == {("train", "a"), ("aa", "a"), ("train", "d")} and max(max_running) <= 1
    assert failed["c"] == "needed run failed" and "RuntimeError: bad broke" in failed["bad"]
    assert pending == [] and running == {}
    err = capsys.readouterr().err
    assert "FAILED train bad:" in err and "Traceback" in err
    # past the deadline nothing starts; the tasks stay pending
    pending = [("train", job("e"))]
    ro.schedule(pending, jobs=1, ready=lambda *_: True, on_done=on_done, elapsed=lambda: 5.0, failed={},
                running={}, deadline_min=4.0)
    assert pending == [("train", job("e"))] and len(started) == 4
