"""The second robust-overfitting table (benchmarks/robust_overfitting_tuned.py): a grid fixed
before the runs, the same number of trials for every tuned method, selection on the validation
split only, the chosen setting on the remaining seeds, resumable."""
import gzip
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from _extras import need
from rb_labelrefine.config import load_config
from rb_labelrefine.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "robust_overfitting_tuned.py"


def _module():
    spec = importlib.util.spec_from_file_location("robust_overfitting_tuned", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_grid_is_fixed_equal_k_and_starts_at_each_preset():
    t = _module()
    grid = t.load_grid(t.GRID_FILE)
    assert grid["k"] == 4 and grid["select_on"] == "final"
    assert set(grid["methods"]) == {"adr", "sglr", "kd_swa", "ltd", "label_smoothing"}
    assert set(grid["bases"]) == {"pgd_at", "trades"}
    assert {len(v) for v in grid["methods"].values()} == {grid["k"]}
    t.check_grid_loads(grid)   # every trial is a valid setting of its method's preset
    for m, trials in grid["methods"].items():
        # trial 0 is the first table's setting (ties go to it)
        preset = load_config(t.ro.METHODS[m]).method
        assert {k: getattr(preset, k) for k in trials[0]} == trials[0], m
        # and every trial changes a setting the preset has
        for tr in trials:
            assert all(hasattr(preset, k) for k in tr)
    assert t.grid_sha(grid) == t.grid_sha(json.loads(t.GRID_FILE.read_text()))


def test_grid_errors_are_clear(tmp_path):
    t = _module()
    good = json.loads(t.GRID_FILE.read_text())
    bad = json.loads(json.dumps(good))
    bad["methods"]["ltd"].pop()
    with pytest.raises(t.GridError, match="ltd has 3 trials; every method must have k = 4"):
        t.validate_grid(bad)
    bad = json.loads(json.dumps(good))
    bad["methods"]["ltd"][1] = dict(bad["methods"]["ltd"][0])
    with pytest.raises(t.GridError, match="ltd trial 1 repeats"):
        t.validate_grid(bad)
    bad = json.loads(json.dumps(good))
    bad["bases"] = ["pgd_at"]
    with pytest.raises(t.GridError, match="ltd's base 'trades' is missing"):
        t.validate_grid(bad)
    bad = json.loads(json.dumps(good))
    bad["methods"]["adr"][2] = {"lamda_low": 0.5}
    with pytest.raises(t.GridError, match="adr trial 2"):
        t.check_grid_loads(bad)
    with pytest.raises(t.GridError, match="at least two seeds"):
        t.plan(["adr"], [0], t.ro.PRESETS["smoke"], tmp_path, good)
    # the run folder keeps its grid: another grid is refused
    t.lock_grid(tmp_path, good)
    t.lock_grid(tmp_path, good)
    other = json.loads(json.dumps(good))
    other["methods"]["label_smoothing"][3] = {"smoothing": 0.3}
    with pytest.raises(t.GridError, match="another tuning grid"):
        t.lock_grid(tmp_path, other)


def _fake_trial(d: Path, val: list, test_pgd: list, points: str):
    d.mkdir(parents=True)
    hist = [{"epoch": e + 1, "val_pgd": v + 1, "val_pgd_margin": v, "test_pgd": tp, "test_clean": tp + 20}
            for e, (v, tp) in enumerate(zip(val, test_pgd))]
    (d / "history.json").write_text(json.dumps(hist))
    (d / "benchmark_record.json").write_text(json.dumps({"final": {"pgd20": test_pgd[-1], "pgd20_points": points}}))


def test_selection_reads_the_validation_split_only(tmp_path):
    t = _module()
    vals = [[40, 50, 45], [40, 48, 47], [30, 60, 44], [40, 41, 46]]   # final-epoch best: trial 1
    rng = random.Random(0)

    def make(root, test_of):
        dirs = []
        for i, v in enumerate(vals):
            d = root / f"t{i}"
            _fake_trial(d, v, test_of(i), "".join(rng.choice("01") for _ in range(50)))
            dirs.append(d)
        return dirs

    a = t.select_method(make(tmp_path / "a", lambda i: [10.0 * i, 20.0 * i, 30.0 * i]), "val_pgd_margin", "final")
    # the trials' test numbers permuted / scrambled (as if the test labels were permuted): same choice
    b = t.select_method(make(tmp_path / "b", lambda i: [rng.uniform(0, 100) for _ in range(3)]),
                        "val_pgd_margin", "final")
    assert a["chosen"] == b["chosen"] == 1 and a["scores"] == b["scores"]
    # ... while a validation number changes it (the test can fail), and best-epoch selection differs
    vals[3][-1] = 49
    assert t.select_method(make(tmp_path / "c", lambda i: [0, 0, 0]), "val_pgd_margin", "final")["chosen"] == 3
    assert t.select_method(make(tmp_path / "d", lambda i: [0, 0, 0]), "val_pgd_margin", "best")["chosen"] == 2
    # ties go to the earlier trial (trial 0 = the preset); a test entry cannot be the selection key
    assert t.select([{"final": 5.0}, {"final": 5.0}], "final") == 0
    with pytest.raises(ValueError, match="validation entry"):
        t.trial_scores([{"epoch": 1, "test_pgd": 3.0}], "test_pgd")


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_tuned_smoke_selects_runs_reports_and_resumes(tmp_path):
    need("pyautoattack")
    out, res_dir = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--methods", "label_smoothing", "--jobs", "1",
           "--out", str(out), "--results-dir", str(res_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((res_dir / "robust_overfitting_tuned_smoke.json").read_text())
    s = res["setup"]
    assert (s["tuning_seed"], s["table_seeds"], s["k"], s["selection_key"]) == (0, [1], 4, "val_pgd_margin")
    trials = res["trials"]["label_smoothing"]
    assert [tr["trial"] for tr in trials] == [0, 1, 2, 3]
    # the choice is the highest final-epoch validation score in the trials' own history (ties: earliest)
    finals = [json.loads((Path(tr["run_dir"]) / "history.json").read_text())[-1]["val_pgd_margin"] for tr in trials]
    chosen = max(range(4), key=lambda i: (finals[i], -i))
    assert [tr["chosen"] for tr in trials] == [i == chosen for i in range(4)]
    assert res["selection"]["label_smoothing"]["values"] == trials[chosen]["values"]
    # the table: the chosen setting and the base on the table seed only, paired, with AutoAttack
    m = res["methods"]
    assert set(m) == {"pgd_at", "label_smoothing"}
    assert (m["pgd_at"]["trials"], m["label_smoothing"]["trials"]) == (1, 4)
    assert m["label_smoothing"]["setting"] == trials[chosen]["values"]
    assert m["label_smoothing"]["seeds_used"] == [1] and m["pgd_at"]["seeds_used"] == [1]
    rec = json.loads((out / "label_smoothing_s1" / "benchmark_record.json").read_text())
    assert f"method.smoothing={trials[chosen]['values']['smoothing']}" in rec["overrides"]
    assert rec["final"]["autoattack_n"] == 16
    rows = [r for r in res["paired"] if r["method"] == "label_smoothing"]
    assert rows and all(r["base"] == "pgd_at" and r["seeds"] == [1] for r in rows)
    assert not res["missing"]
    md = (res_dir / "robust_overfitting_tuned_smoke.md").read_text()
    assert "**K = 4 trials per tuned method**" in md and "**Paired differences to the base objective**" in md

    # resume: everything reused, nothing retrained (the records are not rewritten)
    recs = sorted(out.rglob("benchmark_record.json"))
    assert len(recs) == 6
    before = {f: f.stat().st_mtime_ns for f in recs}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("(reused)") == 4 + 2 + 2     # 4 trials, 2 table runs, their AutoAttack
    assert {f: f.stat().st_mtime_ns for f in recs} == before

    # run folders gone (a new machine): --import-results rebuilds the same table from the results
    # file alone -- trials with their validation scores, table runs with their per-point outcomes
    saved = tmp_path / "saved.json"
    saved.write_bytes((res_dir / "robust_overfitting_tuned_smoke.json").read_bytes())
    out3, res3 = tmp_path / "runs_new", tmp_path / "res3"
    cmd3 = [sys.executable, str(SCRIPT), "--preset", "smoke", "--methods", "label_smoothing", "--jobs", "1",
            "--out", str(out3), "--results-dir", str(res3), "--import-results", str(saved)]
    proc = subprocess.run(cmd3, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "imported 4 finished trials" in proc.stdout and "start " not in proc.stdout
    assert not list(out3.rglob("benchmark_record.json"))          # nothing trained, nothing attacked
    r3 = json.loads((res3 / "robust_overfitting_tuned_smoke.json").read_text())
    assert sorted(r3["imported"]) == sorted(recs_key.parent.name for recs_key in recs)
    for k in ("selection", "paired", "per_point"):
        assert r3[k] == res[k], k
    assert {m: {w: e[w] for w in ("best", "final", "seeds_used", "setting")} for m, e in r3["methods"].items()} == \
        {m: {w: e[w] for w in ("best", "final", "seeds_used", "setting")} for m, e in res["methods"].items()}
    assert "6 runs imported" in (res3 / "robust_overfitting_tuned_smoke.md").read_text()
    # the trials of another grid are refused, naming the field; a malformed trial is skipped with the reason
    bad = json.loads(saved.read_text())
    bad["setup"]["grid_sha256"] = "0" * 64
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    proc = subprocess.run(cmd3[:-1] + [str(tmp_path / "bad.json"), "--report-only"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "grid_sha256" in proc.stderr
    bad = json.loads(saved.read_text())
    k0 = sorted(bad["trial_runs"])[0]
    bad["trial_runs"][k0]["scores"]["final"] = "high"
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    proc = subprocess.run(cmd3[:-1] + [str(tmp_path / "bad2.json"), "--report-only"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and f"{k0}: malformed" in proc.stdout
    r4 = json.loads((res3 / "robust_overfitting_tuned_smoke.json").read_text())
    assert "label_smoothing" not in r4["selection"] and any(x.startswith("trial:") for x in r4["missing"])

    # the grid is fixed once runs exist: another one is refused
    other = json.loads((ROOT / "benchmarks" / "tuning_grid.json").read_text())
    other["methods"]["label_smoothing"][3] = {"smoothing": 0.3}
    (tmp_path / "g.json").write_text(json.dumps(other))
    proc = subprocess.run(cmd + ["--grid", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "another tuning grid" in proc.stderr

    # the same trials (--tune-only: no table runs) on a copy of the data set whose *test* labels are
    # permuted: the trials' validation curves and the choice are the same, their test numbers are not
    data = tmp_path / "fmnist_permuted_test"
    data.mkdir()
    for f in Path(FASHION_MNIST_ROOT).glob("*-idx*-ubyte.gz"):
        if f.name != "t10k-labels-idx1-ubyte.gz":
            (data / f.name).symlink_to(f)
    raw = gzip.decompress((Path(FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte.gz").read_bytes())
    labels = list(raw[8:])
    random.Random(0).shuffle(labels)
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:8] + bytes(labels)))
    out2 = tmp_path / "runs_permuted"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--methods", "label_smoothing", "--jobs",
                           "1", "--tune-only", "--out", str(out2), "--results-dir", str(tmp_path / "res2"),
                           "--data-root", str(data)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res2 = json.loads((tmp_path / "res2" / "robust_overfitting_tuned_smoke.json").read_text())
    assert res2["selection"]["label_smoothing"]["chosen"] == chosen
    assert res2["selection"]["label_smoothing"]["scores"] == res["selection"]["label_smoothing"]["scores"]
    assert not res2["methods"] and not list(out2.glob("*_s1"))
    h1 = [json.loads((Path(tr["run_dir"]) / "history.json").read_text()) for tr in trials]
    h2 = [json.loads((Path(tr["run_dir"]) / "history.json").read_text()) for tr in res2["trials"]["label_smoothing"]]
    val = lambda h: [{k: v for k, v in r.items() if k.startswith("val_")} for r in h]  # noqa: E731
    assert [val(h) for h in h1] == [val(h) for h in h2]
    assert [[r.get("test_clean") for r in h] for h in h1] != [[r.get("test_clean") for r in h] for h in h2]


def test_import_trials_checks_the_grid_the_overrides_and_the_scores(tmp_path):
    """--import-results for trials, without training: a trial is taken with its validation scores
    only when the file's grid, selection key and the trial's overrides match this invocation."""
    t = _module()
    grid = t.load_grid(t.GRID_FILE)
    p = dict(t.ro.PRESETS["fmnist-long"])
    key = t.val_key(p)
    _, trials, _ = t.plan(["label_smoothing"], [0, 1], p, tmp_path / "out", grid)
    ts = trials["label_smoothing"]
    setup = {"grid_sha256": t.grid_sha(grid), "selection_key": key, "select_on": grid["select_on"],
             **{k: p[k] for k in ("train_subset", "val_size", "epochs", "milestones", "batch_size")}}
    sc = {"final": 50.0, "best": 55.0, "final_epoch": 200, "best_epoch": 30}
    runs = {tr["key"]: {"record": {"key": tr["key"], "preset": tr["preset"], "overrides": tr["overrides"],
                                   "train_seconds": 60.0}, "scores": dict(sc, final=50.0 + i)}
            for i, tr in enumerate(ts)}
    runs[ts[1]["key"]]["record"]["overrides"] = ts[1]["overrides"][:-1]             # another setting
    runs[ts[2]["key"]]["scores"]["best_epoch"] = None                              # malformed
    f = tmp_path / "tuned.json"
    f.write_text(json.dumps({"setup": setup, "trial_runs": runs, "machine": "m"}))
    recs, scores, notes = t.import_trials(f, trials, grid, p, key)
    assert sorted(recs) == sorted([ts[0]["key"], ts[3]["key"]])
    assert scores[ts[3]["key"]]["final"] == 53.0 and recs[ts[0]["key"]]["imported"]["machine"] == "m"
    assert any(ts[1]["key"] in n and "other overrides" in n for n in notes)
    assert any(ts[2]["key"] in n and "malformed" in n for n in notes)
    # a first-table file (no trial_runs) holds no trials; another selection key is refused by name
    f.write_text(json.dumps({"setup": setup, "runs": {}}))
    assert t.import_trials(f, trials, grid, p, key) == ({}, {}, [])
    f.write_text(json.dumps({"setup": dict(setup, selection_key="val_pgd"), "trial_runs": runs}))
    with pytest.raises(SystemExit, match="selection_key"):
        t.import_trials(f, trials, grid, p, key)


def test_pending_tasks_train_a_teacher_only_while_a_run_needs_it(tmp_path):
    t = _module()
    grid = t.load_grid(t.GRID_FILE)
    p = dict(t.ro.PRESETS["fmnist-long"])
    teachers, trials, table = t.plan(["kd_swa"], [0, 1], p, tmp_path / "out", grid)
    assert teachers and all(set(tr["deps"]) <= set(teachers) for tr in trials["kd_swa"])
    base = {m: js for m, js in table.items() if m not in trials}
    keys = lambda tasks: [(ph, j["key"]) for ph, j in tasks]  # noqa: E731
    every = t.pending_tasks(teachers, trials, base, {}, {})
    assert keys(every)[:len(teachers)] == [("train", k) for k in teachers]
    # every kd_swa trial imported and no table run left that needs them: no teacher, no trial
    done = {tr["key"]: {} for tr in trials["kd_swa"]}
    rest = t.pending_tasks(teachers, trials, base, done, {})
    assert not any(k in teachers for _, k in keys(rest)) and not any(ph == "trial" for ph, _ in rest)
    assert keys(rest) == [("train", j["key"]) for js in base.values() for j in js]
    # one trial left: its teachers come back
    one = dict(done)
    one.pop(trials["kd_swa"][2]["key"])
    assert {k for ph, k in keys(t.pending_tasks(teachers, trials, base, one, {})) if k in teachers} == \
        set(trials["kd_swa"][2]["deps"])
    assert t.pending_tasks(teachers, trials, base, done, {}, tune_only=True) == []


def test_a_run_attacked_on_more_points_is_not_reported_as_missing_its_autoattack():
    """The first table's pgd_at_s1 was attacked on 1000 points (per-point outcomes kept): it serves
    the 500-point table with its first 500, so the report must not list ``aa:pgd_at_s1``."""
    t = _module()
    ck = lambda n, k: {"autoattack": 50.0, "autoattack_n": n, "autoattack_points": "1" * k,  # noqa: E731
                       "pgd20_points": "1" * max(k, 1000)}
    assert t.attacked({"best": ck(1000, 1000), "final": ck(1000, 1000)}, 500)
    assert t.attacked({"best": ck(500, 500), "final": ck(500, 500)}, 500)
    assert not t.attacked({"best": ck(300, 300), "final": ck(300, 300)}, 500)       # fewer points
    assert not t.attacked({"best": ck(1000, 0), "final": ck(1000, 1000)}, 500)     # no outcomes kept
    assert not t.attacked({"best": {"autoattack": None}, "final": ck(500, 500)}, 500)
    # the grid is named as the repository has it, wherever the checkout is
    assert t._repo_rel(t.GRID_FILE) == "benchmarks/tuning_grid.json"
