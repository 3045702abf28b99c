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
        # one seed: the interval is the test points' alone
        assert r["final_diff"]["half_width_seeds"] == 0.0
        assert r["final_diff"]["half_width_points"] == r["final_diff"]["half_width"]
    md = next((tmp_path / "results").glob("*.md")).read_text()
    assert "**Paired differences to the base objective**" in md
    assert "| final CI ± | points / seeds |" in md and "from the test points, ± 0.00 from the seeds)" in md
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
    out = ro.aa_at_n(rec, 300)
    assert out["best"] == {"pgd20": 54.0, "clean": 77.0}
    assert out["final"] == rec["final"] and rec["best"] == old  # the input is not modified


def test_robust_overfitting_more_points_serve_a_smaller_table_with_their_first_points():
    """A checkpoint attacked on 8 points with its per-point outcomes kept serves a table at n = 4:
    AutoAttack, PGD-20-on-the-AA-points and the per-stage numbers recomputed from the first 4
    outcomes (per-stage numbers dropped where no per-stage outcomes were kept); without per-point outcomes it is dropped instead,
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
    out = ro.aa_at_n(rec, 4)
    b = out["best"]
    assert b["autoattack"] == 75.0 and b["autoattack_points"] == "1101" and b["autoattack_n"] == 4
    assert b["pgd20_aa_points"] == 100.0 and b["autoattack_first_of"] == 8 and b["autoattack_all"] == 50.0
    assert b["pgd20"] == 60.0
    assert b["autoattack_stage_points"] == {"clean": "1111", "apgd-ce": "1101", "apgd-t": "1101"}
    # per-stage accuracies on the first 4 points, from the per-stage outcomes (not the 8-point numbers)
    assert b["autoattack_per_attack"] == {"apgd-ce": 75.0, "apgd-t": 75.0}
    no_stages = {k: v for k, v in big.items() if k != "autoattack_stage_points"}
    assert "autoattack_per_attack" not in ro.aa_at_n({"best": no_stages}, 4)["best"]
    assert "autoattack" not in out["final"] and out["final"]["pgd20"] == 60.0
    assert ro.covers(big, 4) and ro.covers(big, 8) and not ro.covers(big, 9)
    assert not ro.covers(rec["final"], 4)
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

    run_mod = sys.modules["robust_overfitting.run"]   # where the scheduler lives (the package beside the script)
    monkeypatch.setattr(run_mod, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(run_mod, "run_job", run_job)
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


def _ro():
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_overfitting", ROOT / "benchmarks" / "robust_overfitting.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    return ro


def _fake_records(ro, jobs, aa_n, n_pgd, seed=0):
    """Records of the shape _run_job writes, with random per-point outcomes (no training)."""
    import random

    rng = random.Random(seed)
    pts = lambda n, p: "".join("1" if rng.random() < p else "0" for _ in range(n))  # noqa: E731
    out = {}
    for j in jobs:
        rec = {"key": j["key"], "method": j["method"], "seed": j["seed"], "preset": j["preset"],
               "overrides": list(j["overrides"]), "run_dir": j["out_dir"],
               "curve": [{"epoch": e, "lr": 0.1, "test_clean": 70 + rng.random(), "test_pgd": 50 + 5 * rng.random(),
                          "val_pgd": 55.0, "train_robust_acc": 60.0 + e} for e in (1, 2)],
               "curve_peak": {"epoch": 2, "test_pgd": 55.0}, "train_robust_acc": {"at_best": 61.0, "last5_mean": 62.0},
               "effective_decays": {}, "swa_start_epoch": None, "eval_model": "raw", "attack_bn_mode": "eval",
               "steps_per_epoch": 2, "train_seconds": 60.0, "wall_train_seconds": 61.0, "autoattack_seconds": 30.0,
               "threads": 1, "commit": "abc", "device": "cpu"}
        for w, ep in (("best", 1), ("final", 2), ("best_pgd_ce", 2)):
            pg, cl = pts(n_pgd, 0.55), pts(n_pgd, 0.7)
            aa = "".join(c if rng.random() < 0.9 else "0" for c in pg[:aa_n])
            rec[w] = {"epoch": ep, "clean": 100.0 * cl.count("1") / n_pgd, "pgd20": 100.0 * pg.count("1") / n_pgd,
                      "clean_points": cl,
                      "pgd20_points": pg, "autoattack": 100.0 * aa.count("1") / aa_n, "autoattack_n": aa_n,
                      "autoattack_points": aa, "autoattack_suite": "standard", "val_pgd10": 55.0,
                      "pgd20_aa_points": 100.0 * pg[:aa_n].count("1") / aa_n,
                      "autoattack_per_attack": {"apgd-ce": 50.0}}
        if j["method"] == "natural":
            for w in ("best", "final"):
                rec[w] = {k: v for k, v in rec[w].items() if not k.startswith("autoattack")}
            del rec["best_pgd_ce"]
        out[j["key"]] = rec
    return out


def _write(ro, tmp_path, records, jobs, p, seeds, name="res"):
    import argparse

    args = argparse.Namespace(preset="smoke", seeds=seeds, jobs=1, out=tmp_path / "runs", device="cpu")
    ro.write_results(records, jobs, args, p, None, tmp_path / name, [])
    return tmp_path / name / f"robust_overfitting_{p['tag']}.json"


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("imported", "reused")}


def test_robust_overfitting_import_results_round_trip_and_legacy_files(tmp_path):
    """Run directories do not outlive a machine, the results JSON does: --import-results rebuilds
    the records from it -- exactly from the 'runs' section, and from an older file without it (per-seed
    results + per-point outcomes; its mean curve pooled exactly into the method's curve) -- so the
    table, paired CIs included, comes out the same; the teachers of a run still to train are not
    imported, nor runs without AutoAttack; another setting is refused naming the field."""
    need("matplotlib")
    ro = _ro()
    p = dict(ro.PRESETS["smoke"])
    out = tmp_path / "runs"
    jobs = ro.build_jobs(["pgd_at", "adr", "kd_swa"], [0, 1], p, out)
    records = _fake_records(ro, jobs, p["aa_n"], p["curve_n"])
    f = _write(ro, tmp_path, records, jobs, p, [0, 1])
    res = json.loads(f.read_text())
    assert set(res["runs"]) == set(records) and not res["imported"]
    assert all("pgd20_points" not in r["final"] for r in res["runs"].values())   # the points live in per_point

    got, notes = ro.import_results(f, jobs, p, out)
    assert set(got) == set(records), notes
    assert all(_strip(got[k]) == records[k] for k in records)
    assert got["adr_s1"]["imported"]["sha256"] and got["adr_s1"]["imported"]["legacy"] is False
    f2 = _write(ro, tmp_path, got, jobs, p, [0, 1], "res2")
    res2 = json.loads(f2.read_text())
    assert res2["paired"] == res["paired"] and res2["per_point"] == res["per_point"]
    assert res2["methods"] == res["methods"]
    assert set(res2["imported"]) == set(records)
    # the compute of imported runs is named apart (measured on their machine)
    assert res2["compute_min_imported"] == {"runs": len(records), "train": pytest.approx(len(records) * 61 / 60),
                                            "autoattack": pytest.approx(len(records) * 0.5)}
    assert "compute_min_imported" not in res
    assert "Imported from an earlier results file" in (tmp_path / "res2" / f2.with_suffix(".md").name).read_text()

    # an older file (no "runs"): rebuilt from the per-seed results; the mean curve pooled exactly
    legacy = {k: v for k, v in res.items() if k not in ("runs", "imported")}
    lf = tmp_path / "legacy.json"
    lf.write_text(json.dumps(legacy))
    got, notes = ro.import_results(lf, jobs, p, out)
    assert set(got) == set(records), notes
    for k, r in records.items():
        for w in ro.checkpoints_of(r):
            # (the natural teacher's best: only its outcomes were kept, its numbers follow from them)
            keep = [x for x in r[w] if x != "autoattack_per_attack" and (
                k != "natural_s0" or w != "best" or x in ("clean", "pgd20", "clean_points", "pgd20_points"))]
            assert {x: got[k][w].get(x) for x in keep} == {x: r[w][x] for x in keep}, (k, w)
    agg_new, agg_old = ro.aggregate(got, [0, 1], p["aa_n"]), ro.aggregate(records, [0, 1], p["aa_n"])
    for m in ("pgd_at", "adr"):
        for a, b in zip(agg_new[m]["curve"], agg_old[m]["curve"], strict=True):
            assert a == pytest.approx(b)
    assert ro.paired_claims(got, p["aa_n"]) == ro.paired_claims(records, p["aa_n"])
    # with a third seed trained here, the pooled curve is the mean over all three
    jobs3 = ro.build_jobs(["pgd_at"], [0, 1, 2], p, out)
    got3, _ = ro.import_results(lf, jobs3, p, out)
    r2 = _fake_records(ro, [j for j in jobs3 if j["seed"] == 2], p["aa_n"], p["curve_n"], seed=5)
    allr = {**{k: records[k] for k in ("pgd_at_s0", "pgd_at_s1")}, **r2}
    c_exact = ro.aggregate(allr, [0, 1, 2], p["aa_n"])["pgd_at"]["curve"]
    c_pool = ro.aggregate({**got3, **r2}, [0, 1, 2], p["aa_n"])["pgd_at"]["curve"]
    assert [c["test_pgd"] for c in c_pool] == pytest.approx([c["test_pgd"] for c in c_exact])
    assert [c["test_pgd_std"] for c in c_pool] == pytest.approx([c["test_pgd_std"] for c in c_exact])

    # the teachers of a run that still trains stay out (their weights are needed); a run's own record wins
    jobs4 = ro.build_jobs(["pgd_at", "kd_swa"], [0, 1, 2], p, out)
    got4, notes4 = ro.import_results(f, jobs4, p, out)
    assert "pgd_at_s0" not in got4 and "natural_s0" not in got4 and "kd_swa_s0" in got4
    assert any("kd_swa_s2 trains from its weights" in n for n in notes4)
    assert set(ro.import_results(f, jobs4, p, out, keep_teachers=True)[0]) >= {"pgd_at_s0", "natural_s0"}
    (out / "adr_s0").mkdir(parents=True)
    (out / "adr_s0" / "benchmark_record.json").write_text("{}")
    got5, notes5 = ro.import_results(f, jobs, p, out)
    assert "adr_s0" not in got5 and any("adr_s0: its own run directory" in n for n in notes5)

    # --prefer-imported: the table keeps the imported record; the run trained here is compared in a note
    assert "adr_s0" in ro.import_results(f, jobs, p, out, prefer=["adr_s0"])[0]
    here = _fake_records(ro, [j for j in jobs if j["key"] == "adr_s0"], p["aa_n"], p["curve_n"], seed=9)["adr_s0"]
    import argparse

    (out / "pgd_at_s0").mkdir(parents=True)      # a teacher trained here: the note on who taught whom
    (out / "pgd_at_s0" / "benchmark_record.json").write_text("{}")
    ro.write_results(got, jobs, argparse.Namespace(preset="smoke", seeds=[0, 1], jobs=1, out=out, device="cpu"), p,
                     None, tmp_path / "res3", [], shadowed={"adr_s0": here})
    res3 = json.loads(next((tmp_path / "res3").glob("*.json")).read_text())
    rr = res3["repeat_runs"]["adr_s0"]
    assert rr["here"]["final"]["autoattack"] == here["final"]["autoattack"]
    assert rr["imported"]["final"]["autoattack"] == records["adr_s0"]["final"]["autoattack"]
    assert res3["paired"] == res["paired"]          # the table itself is the imported one
    md3 = next((tmp_path / "res3").glob("*.md")).read_text()
    assert "Repeatability: adr_s0 was trained twice" in md3
    assert "Teachers: the imported students (kd_swa_s0, kd_swa_s1) learned from the teachers" in md3
    assert "pgd_at_s0 were trained again here" in md3

    # malformed runs are skipped with the reason, never half-used
    mal = json.loads(f.read_text())
    mal["per_point"]["adr_s1"]["final"]["pgd20_points"] = "01x1"
    mal["runs"]["pgd_at_s1"]["final"]["autoattack"] = "55"
    mal["runs"]["kd_swa_s1"]["overrides"] = "optim.lr=1"
    (tmp_path / "mal.json").write_text(json.dumps(mal))
    got8, notes8 = ro.import_results(tmp_path / "mal.json", jobs, p, out, keep_teachers=True)
    assert not {"adr_s1", "pgd_at_s1", "kd_swa_s1"} & set(got8) and "kd_swa_s0" in got8
    assert any("adr_s1: malformed" in n and "not 0/1 strings" in n for n in notes8)
    assert any("pgd_at_s1: malformed" in n and "final.autoattack is not a number" in n for n in notes8)
    assert any("kd_swa_s1: malformed" in n and "overrides" in n for n in notes8)
    bad_runs = dict(json.loads(f.read_text()), runs=[1])
    (tmp_path / "badruns.json").write_text(json.dumps(bad_runs))
    with pytest.raises(SystemExit, match="'runs' is not an object"):
        ro.import_results(tmp_path / "badruns.json", jobs, p, out)
    leg_bad = dict(legacy, per_point=dict(legacy["per_point"], adr_s1=[1]), compute_per_run_min=[])
    (tmp_path / "legbad.json").write_text(json.dumps(leg_bad))
    got9, notes9 = ro.import_results(tmp_path / "legbad.json", jobs, p, out, keep_teachers=True)
    assert "adr_s1" not in got9 and "kd_swa_s1" in got9   # no per-point outcomes: skipped, the rest is fine

    # a run without AutoAttack cannot be completed from the file: not imported (train-only: it is)
    nr = json.loads(f.read_text())
    nr["per_point"]["adr_s1"]["final"].pop("autoattack_points")
    nr["runs"]["adr_s1"]["final"]["autoattack"] = None
    (tmp_path / "noaa.json").write_text(json.dumps(nr))
    got6, notes6 = ro.import_results(tmp_path / "noaa.json", jobs, p, out)
    assert "adr_s1" not in got6 and any("adr_s1: not attacked" in n for n in notes6)
    assert "adr_s1" in ro.import_results(tmp_path / "noaa.json", jobs, p, out, train_only=True)[0]

    # other settings, other overrides, not a results file: refused / skipped with the reason
    other = dict(res, setup=dict(res["setup"], epochs=7))
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="epochs: file 7, preset 2"):
        ro.import_results(tmp_path / "other.json", jobs, p, out)
    ov = json.loads(f.read_text())
    ov["runs"]["pgd_at_s1"]["overrides"].append("optim.lr=0.5")
    (tmp_path / "ov.json").write_text(json.dumps(ov))
    got7, notes7 = ro.import_results(tmp_path / "ov.json", jobs, p, out)
    assert "pgd_at_s1" not in got7 and any("pgd_at_s1: trained with other overrides" in n for n in notes7)
    (tmp_path / "junk.json").write_text('{"a": 1}')
    with pytest.raises(SystemExit, match="not a results file"):
        ro.import_results(tmp_path / "junk.json", jobs, p, out)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="not JSON"):
        ro.import_results(tmp_path / "bad.json", jobs, p, out)


def test_robust_overfitting_round_order_and_missing_import_file(tmp_path):
    ro = _ro()
    p = dict(ro.PRESETS["smoke"])
    keys = [j["key"] for j in ro.build_jobs(["ltd", "trades", "pgd_at", "kd_swa"], [0, 1], dict(p, multi_seed=[
        "pgd_at", "kd_swa", "trades", "ltd"]), tmp_path, order="round")]
    # seed by seed; within a seed the claim rows first, TRADES before LTD; the teachers before all
    assert keys == ["natural_s0", "pgd_at_s0", "kd_swa_s0", "trades_s0", "ltd_s0",
                    "pgd_at_s1", "kd_swa_s1", "trades_s1", "ltd_s1"]
    # --seeds-of: more seeds for some rows than for the others, still seed by seed
    keys = [j["key"] for j in ro.build_jobs(["pgd_at", "trades"], [0, 1, 2], dict(p, multi_seed=["pgd_at", "trades"]),
                                            tmp_path, order="round", seeds_of={"trades": [0]})]
    assert keys == ["pgd_at_s0", "trades_s0", "pgd_at_s1", "pgd_at_s2"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke",
                          "--seeds-of", "trades=0,x", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--seeds-of 'trades=0,x': expected METHOD=SEED,SEED" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke",
                          "--prefer-imported", "pgd_at_s0", "--out", str(tmp_path / "r")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--prefer-imported goes with --report-only and --import-results" in bad.stderr
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke", "--methods",
           "pgd_at", "--import-results", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r"),
           "--results-dir", str(tmp_path / "res")]
    if not Path(FASHION_MNIST_ROOT).exists():
        pytest.skip("Fashion-MNIST not installed (checked before the import file)")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope.json: no such file" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_robust_overfitting_train_minutes_of_a_resumed_run_cover_every_process(tmp_path):
    """A run resumed in another process: this script's wall time and the trainer's clock count only
    the last process; the sum of the history's per-epoch step times covers all of them."""
    ro = _ro()
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text(json.dumps([{"epoch": e, "train_time_s": 30.0} for e in range(1, 11)]))
    recs = {"a": {"run_dir": str(run), "wall_train_seconds": 20.0, "train_seconds": 25.0},
            "b": {"run_dir": str(tmp_path / "gone"), "wall_train_seconds": 20.0, "train_seconds": 25.0},
            "c": {"run_dir": str(run), "train_seconds": 25.0, "imported": {"file": "x"}}}
    ro.add_history_seconds(recs)
    assert ro.train_seconds(recs["a"]) == 300.0 and recs["a"]["history_train_seconds"] == 300.0
    assert ro.train_seconds(recs["b"]) == 25.0 and "history_train_seconds" not in recs["b"]
    assert "history_train_seconds" not in recs["c"]     # an imported run's path is not opened


def test_robust_overfitting_seeds_on_fresh_points_are_paired_per_seed():
    """``--aa-offset``: later seeds attacked on other test images.  ``_covers`` knows the offset (a
    run attacked elsewhere is attacked again for this one, any offset serves a table), and
    ``paired_claims`` pairs each seed on its own points, all seeds in one interval."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_overfitting", ROOT / "benchmarks" / "robust_overfitting.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    d = {"autoattack": 50.0, "autoattack_n": 4, "autoattack_points": "1100", "autoattack_offset": 4,
         "pgd20_points": "11111111"}
    assert ro.covers(d, 4) and ro.covers(d, 4, 4) and not ro.covers(d, 4, 0)
    assert ro.covers({**d, "autoattack_offset": None}, 4, 0)   # records from before the offset: 0

    def rec(method, seed, off, final, best):
        pts = lambda s: {"autoattack": 100.0 * s.count("1") / 4, "autoattack_n": 4,  # noqa: E731
                         "autoattack_points": s, "autoattack_offset": off, "pgd20_points": "1" * 8,
                         "pgd20_aa_points": 100.0, "epoch": 1}
        return {"method": method, "seed": seed, "best": pts(best), "final": pts(final)}
    records = {}
    for s, off in ((0, 0), (1, 0), (2, 4), (3, 4)):
        records[f"pgd_at_s{s}"] = rec("pgd_at", s, off, "1000", "1100")
        records[f"adr_s{s}"] = rec("adr", s, off, "1100" if s < 2 else "1111", "1100")
    rows = [r for r in ro.paired_claims(records, 4, n_boot=200)
            if r["metric"] == "autoattack" and r["method"] == "adr" and r["selection"] == "best"]
    assert len(rows) == 1
    r = rows[0]
    assert r["seeds"] == [0, 1, 2, 3] and r["n_points"] == 4 and r["n_points_all"] == 8
    assert r["points_from"] == {"0": [0, 1], "4": [2, 3]}
    assert r["final_diff"]["diff"] == pytest.approx((25 + 25 + 75 + 75) / 4)
    assert ro.points_label(r) == "4 per seed (8 in all)"
    # a seed whose method and base were attacked on different points is left out, not mispaired
    records["adr_s3"] = rec("adr", 3, 0, "1111", "1100")
    r = [r for r in ro.paired_claims(records, 4, n_boot=200)
         if r["metric"] == "autoattack" and r["method"] == "adr" and r["selection"] == "best"][0]
    assert r["seeds"] == [0, 1, 2]
    assert ro.seed_ranges(["adr_s13", "adr_s14", "adr_s16", "pgd_at_s13"]) == "adr seeds 13-14, 16, pgd_at seed 13"


@pytest.mark.parametrize("argv, msg", [(["--aa-offset", "1900"], "--aa-offset must be between 0"),
                                       (["--aa-offset", "-1"], "--aa-offset must be between 0"),
                                       (["--aa-offset", "500", "--report-only"], "--report-only takes every")])
def test_robust_overfitting_rejects_a_bad_aa_offset(argv, msg, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_overfitting", ROOT / "benchmarks" / "robust_overfitting.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    with pytest.raises(SystemExit) as e:
        ro.main(["--preset", "fmnist-long", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_committed_reports_re_render_byte_for_byte_from_their_json():
    """The robust-overfitting package (plan / run / records / aggregate / report) renders the committed
    tables from the committed JSON exactly as they are on disk, and the tuned table's script uses
    only its public names."""
    import importlib
    import re

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    ro = importlib.import_module("robust_overfitting")
    tuned = importlib.import_module("robust_overfitting_tuned")
    assert Path(ro.__file__).parent.name == "robust_overfitting"   # the package, not the script
    res = ROOT / "benchmarks" / "results"
    for mod, name in ((ro, "robust_overfitting_fmnist"), (ro, "robust_overfitting_fmnist_long"),
                      (tuned, "robust_overfitting_tuned_fmnist_long")):
        md = mod.render_markdown(json.loads((res / f"{name}.json").read_text()))
        assert md.encode() == (res / f"{name}.md").read_bytes(), name
    assert not re.search(r"\bro\._", (ROOT / "benchmarks" / "robust_overfitting_tuned.py").read_text())
