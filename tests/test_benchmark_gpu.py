"""robust_overfitting.py --device and robust_overfitting_gpu.py, checked on a CPU (issue 13).

No GPU is needed: CUDA is faked where a test needs it (the device string is followed to the
trainer's config and to the AutoAttack call; nothing runs on it)."""
import importlib.util
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def ro():
    return _load("robust_overfitting")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch as if one CUDA device were there (names only; nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(total_memory=2 ** 37))


def test_cpu_jobs_keep_their_overrides_and_gpu_jobs_name_the_device(ro, tmp_path):
    p = ro.PRESETS["fmnist-long"]
    cpu = ro.build_jobs(["pgd_at", "kd_swa"], [0], p, tmp_path)
    gpu = ro.build_jobs(["pgd_at", "kd_swa"], [0], p, tmp_path, device="cuda:0")
    assert [j["key"] for j in cpu] == [j["key"] for j in gpu]
    for c, g in zip(cpu, gpu):
        # CPU records written before --device existed are still reused: same overrides
        assert not any(o.startswith(("train.device", "train.deterministic")) for o in c["overrides"])
        assert c["device"] == "cpu" and g["device"] == "cuda:0"
        assert set(g["overrides"]) - set(c["overrides"]) == {"train.device=cuda:0", "train.deterministic=true"}
        assert set(c["overrides"]) <= set(g["overrides"])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_device_reaches_the_trainer_config(ro, tmp_path, monkeypatch, device):
    import rb_labelrefine.training.trainer as tr

    seen = {}

    def fake_trainer(cfg, out, **kw):
        seen["device"], seen["deterministic"] = cfg.train.device, cfg.train.deterministic
        raise _Stop

    calls = []
    monkeypatch.setattr(tr, "Trainer", fake_trainer)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    job = ro.build_jobs(["pgd_at"], [0], ro.PRESETS["smoke"], tmp_path, device=device)[0]
    with pytest.raises(_Stop):
        ro.run_task(job, "train")
    # "cpu", not the config's default "auto" (which would pick a GPU where one is present)
    assert seen == {"device": device, "deterministic": device != "cpu"}
    assert calls == ([] if device == "cpu" else [((True,), {"warn_only": True})])


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_device_reaches_autoattack_and_the_scored_model(ro, tmp_path, monkeypatch, device):
    import rb_labelrefine.data as data
    import rb_labelrefine.evaluation.autoattack as aa
    import rb_labelrefine.runs as runs

    job = ro.build_jobs(["pgd_at"], [0], ro.PRESETS["smoke"], tmp_path, device=device)[0]
    job["aa_n"] = 4
    out = Path(job["out_dir"])
    out.mkdir(parents=True)
    ro.write_record(out / "benchmark_record.json", {"overrides": job["overrides"], "preset": job["preset"],
                                                      "best": {"epoch": 1}, "final": {"epoch": 2}})
    g = torch.Generator().manual_seed(0)
    test = [(torch.rand(1, 28, 28, generator=g), i % 10) for i in range(8)]
    monkeypatch.setattr(data, "build_datasets", lambda *a, **k: (None, None, test, None))
    loaded, attacked = [], []

    def fake_load(run_dir, which="best", device="cpu"):
        loaded.append((which, device))
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval(), None, None

    def fake_aa(model, x, y, **kw):
        attacked.append(kw["device"])
        return {"robust_acc": 0.0, "clean_acc": 25.0, "n": len(y), "robust_correct": torch.zeros(len(y), dtype=bool)}

    monkeypatch.setattr(runs, "load_run_model", fake_load)
    monkeypatch.setattr(aa, "run_autoattack", fake_aa)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rec = ro.run_task(job, "aa")
    assert loaded == [("best", device), ("final", device)] and attacked == [device, device]
    assert rec["best"]["autoattack_device"] == rec["final"]["autoattack_device"] == device
    assert rec["final"]["autoattack_points"] == "0000"


def test_benchmark_refuses_cuda_without_a_gpu(ro, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = ro.main(["--preset", "smoke", "--device", "cuda", "--out", str(tmp_path / "r"),
                  "--results-dir", str(tmp_path / "res")])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err
    assert ro.main(["--preset", "smoke", "--device", "tpu", "--out", str(tmp_path / "r")]) == 2
    assert "must be cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "res").exists()


def test_gpu_script_exits_2_without_a_gpu(tmp_path, monkeypatch, capsys):
    gpu = _load("robust_overfitting_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    assert gpu.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no GPU: torch.cuda.is_available() is False" in err and not started
    # --device cpu is a check of the script on the smoke preset only (it would not be a GPU table)
    assert gpu.main(["--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "--device cpu only checks this script" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not started


def test_gpu_results_sit_beside_the_cpu_ones(ro, fake_cuda, tmp_path, monkeypatch):
    from rb_labelrefine.data import FASHION_MNIST_ROOT

    if not Path(FASHION_MNIST_ROOT).exists():
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) not installed")
    gpu = _load("robust_overfitting_gpu")
    a = gpu.results_base("fmnist-long", "cuda", tmp_path, None)
    b = gpu.results_base("fmnist-long", "cpu", tmp_path, None)
    assert a.name == "robust_overfitting_fmnist_long_gpu" and b.name == "robust_overfitting_fmnist_long"
    assert a.parent == b.parent == ROOT / "benchmarks" / "results"
    # the benchmark itself: default --out <preset>-gpu, files tagged _gpu, the device named
    monkeypatch.chdir(tmp_path)
    res = tmp_path / "res"
    (res).mkdir()
    (res / "robust_overfitting_smoke.json").write_text("{}")     # a CPU table stays as it is
    assert ro.main(["--preset", "smoke", "--methods", "pgd_at", "--seeds", "0", "--device", "cuda",
                    "--report-only", "--results-dir", str(res)]) == 0
    assert (tmp_path / "runs" / "robust_overfitting" / "smoke-gpu").is_dir()
    assert (res / "robust_overfitting_smoke.json").read_text() == "{}"
    out = json.loads((res / "robust_overfitting_smoke_gpu.json").read_text())
    assert out["setup"]["device"] == "cuda" and out["machine"].startswith("GPU Fake H200 (128 GiB")
    assert "train.device=cuda" in out["setup"]["overrides"] and out["missing"] == ["train:pgd_at_s0"]
    assert "Device: cuda -- GPU Fake H200" in (res / "robust_overfitting_smoke_gpu.md").read_text()


def test_gpu_script_hard_deadline_stops_the_group_and_writes_a_partial_table(tmp_path, monkeypatch, capsys):
    """At the hard deadline the benchmark's process group is stopped and the table rebuilt from the
    finished runs (--report-only); exit 3.  The processes are faked: no clock is involved."""
    import rb_labelrefine.data as data

    gpu = _load("robust_overfitting_gpu")
    monkeypatch.setattr(data, "load_fashion_mnist", lambda root=None: None)
    killed, ran = [], []

    class FakePopen:
        pid = 4242

        def __init__(self, cmd, **kw):
            self.cmd, self.kw, self.waits = cmd, kw, 0

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            return -15

    procs = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: procs.append(FakePopen(cmd, **kw)) or procs[-1])
    monkeypatch.setattr(gpu.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    base = tmp_path / "res" / "robust_overfitting_smoke"

    def fake_run(cmd, **kw):
        ran.append(cmd)
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps({"n_runs": 1, "missing": ["aa:pgd_at_s0"], "machine": "m"}))
        base.with_suffix(".md").write_text("table\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    rc = gpu.main(["--device", "cpu", "--preset", "smoke", "--out", str(tmp_path / "r"), "--results-dir",
                   str(tmp_path / "res"), "--jobs", "3", "--hard-deadline-min", "0.5", "--export",
                   str(tmp_path / "exp"), "--", "--train-only"])
    assert rc == 3
    (p,) = procs
    assert p.kw["start_new_session"] and p.kw["env"]["OMP_NUM_THREADS"] == "1"
    assert p.cmd[p.cmd.index("--jobs") + 1] == "3" and "--train-only" in p.cmd and "--deadline-min" in p.cmd
    assert killed == [(4242, signal.SIGTERM)]
    (rep,) = ran
    assert "--report-only" in rep and rep[rep.index("--out") + 1] == str((tmp_path / "r").resolve())
    res = json.loads(base.with_suffix(".json").read_text())
    assert res["gpu_script"]["stopped_at_hard_deadline"] is True and res["gpu_script"]["jobs"] == 3
    assert "stopped at the hard deadline: partial" in base.with_suffix(".md").read_text()
    assert sorted(f.name for f in (tmp_path / "exp").iterdir()) == [
        "robust_overfitting_smoke.json", "robust_overfitting_smoke.md", "robust_overfitting_smoke_runs.tar.gz"]


def test_gpu_runs_attack_1000_points_unless_told_otherwise():
    gpu = _load("robust_overfitting_gpu")
    assert gpu.gpu_extra("fmnist-long", "cuda", []) == ["--aa-n", "1000"]
    assert gpu.gpu_extra("fmnist-long", "cuda:0", ["--seeds", "0"]) == ["--seeds", "0", "--aa-n", "1000"]
    # the user's own sample size wins, in either spelling; the CPU check and the smoke preset keep theirs
    assert gpu.gpu_extra("fmnist-long", "cuda", ["--aa-n", "500"]) == ["--aa-n", "500"]
    assert gpu.gpu_extra("fmnist-long", "cuda", ["--aa-n=300"]) == ["--aa-n=300"]
    assert gpu.gpu_extra("smoke", "cpu", []) == [] and gpu.gpu_extra("smoke", "cuda", []) == []
    ro = _load("robust_overfitting")
    assert gpu.GPU_AA_N["fmnist-long"] <= ro.PRESETS["fmnist-long"]["test_subset"]
