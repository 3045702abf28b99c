"""Training with data.aux (generated images stacked under each batch) and ADR schedule=auto:
batch composition, SGLR indexing, bit-exact resume after an in-process stop and after kill -9."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _extras import need

need("sklearn", "matplotlib", "torchattacks")   # digits, the curves, the training attack

from rb_labelrefine.config import ConfigError, load_config
from rb_labelrefine.data.aux import aux_count
from rb_labelrefine.runs import RUN_FILES, read_weights
from rb_labelrefine.training.io import safe_torch_load
from rb_labelrefine.training.trainer import ResumeError, Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
N_AUX = 150
TINY = ["model.arch=mlp", "data.train_subset=192", "data.batch_size=32", "attack.steps=2", "train.epochs=3",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=2",
        "eval.test_attack_steps=1", "eval.curve_test_size=64"]


@pytest.fixture(scope="module")
def aux_npz(tmp_path_factory):
    """Digits-shaped generated data: 8x8x1 uint8, labels 0-9."""
    path = tmp_path_factory.mktemp("aux") / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (N_AUX, 8, 8, 1), dtype=np.uint8),
             label=rng.integers(0, 10, N_AUX).astype(np.int64))
    return path


def _sets(aux, fraction=0.5, extra=()):
    return TINY + [f"data.aux={aux}", f"data.aux_fraction={fraction}", *extra]


def _no_times(history):
    return [{k: v for k, v in r.items() if k not in ("train_time_s", "adr_auto_s")} for r in history]


def _same_run(a: Path, b: Path):
    for which in ("final", "best"):
        sa, _ = read_weights(a / RUN_FILES[which])
        sb, _ = read_weights(b / RUN_FILES[which])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), which
    ha, hb = (json.loads((d / RUN_FILES["history"]).read_text()) for d in (a, b))
    assert _no_times(ha) == _no_times(hb)
    ca, cb = (safe_torch_load(d / RUN_FILES["checkpoint"]) for d in (a, b))
    assert ca["aux"] == cb["aux"]
    assert ca["rectifier"].get("auto") == cb["rectifier"].get("auto")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    return ha


def _stop_at(monkeypatch, step: int):
    """Make Trainer.train_step request a SIGTERM stop after global step ``step``; returns the original."""
    orig = Trainer.train_step

    def train_step(self, *a, **k):
        out = orig(self, *a, **k)
        if self.global_step == step:
            self.stop.request(signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return orig


def test_batches_hold_the_fraction_and_sglr_indexes_aux_samples_separately(tmp_path, aux_npz, monkeypatch):
    cfg = load_config("digits-sglr", _sets(aux_npz, 0.3, ["train.epochs=2"]))
    images = np.load(aux_npz)["image"]
    seen = []
    orig = Trainer.train_step

    def train_step(self, x, y, idx, epoch):
        seen.append((x.clone(), y.clone(), idx.clone()))
        return orig(self, x, y, idx, epoch)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.fit()
    n_real = len(tr.train_ds)
    assert len(seen) == 2 * tr.steps_per_epoch            # an epoch is still one pass over the real data
    drawn = []
    for x, y, idx in seen:
        real = int((idx < n_real).sum())
        assert real == 32 and bool((idx[:real] < n_real).all())              # real rows first, then aux
        k = len(idx) - real
        assert k == aux_count(real, 0.3) == 14 and abs(k / len(idx) - 0.3) <= 1 / len(idx)
        a = idx[real:] - n_real
        drawn.append(a)
        assert torch.equal((x[real:] * 255).round().to(torch.uint8),             # no augmentation here
                           torch.from_numpy(images[a.numpy()]).permute(0, 3, 1, 2))
    drawn = torch.cat(drawn)
    assert len(drawn) > N_AUX and sorted(drawn[:N_AUX].tolist()) == list(range(N_AUX))  # without replacement
    mem = tr.rectifier
    assert mem.memory.shape == (n_real + N_AUX, 10)
    assert torch.equal(mem.seen[n_real:].nonzero().squeeze(1), drawn.unique().sort().values)


def test_bad_aux_settings_name_the_field(tmp_path, aux_npz):
    with pytest.raises(ConfigError, match="data.aux_fraction.*must be in"):
        load_config("digits-pgdat", _sets(aux_npz, 1.0))
    with pytest.raises(ConfigError, match="data.aux_fraction.*data.aux is set"):
        Trainer(load_config("digits-pgdat", _sets(aux_npz, 0.0)), tmp_path / "a", progress=False).fit()
    with pytest.raises(ConfigError, match="data.aux.*file not found"):
        Trainer(load_config("digits-pgdat", _sets(tmp_path / "none.npz")), tmp_path / "b", progress=False).fit()
    np.savez(tmp_path / "big.npz", image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match=r"data.aux.*big.npz.*\(32, 32, 3\) images.*\(8, 8, 1\)"):
        Trainer(load_config("digits-pgdat", _sets(tmp_path / "big.npz")), tmp_path / "c", progress=False).fit()
    with pytest.raises(ConfigError, match="data.val_fraction.*schedule=auto"):
        Trainer(load_config("digits-adr", TINY + ["method.schedule=auto", "data.val_fraction=0"]), tmp_path / "d",
                progress=False).fit()
    for d in ("a", "b", "c", "d"):
        assert not (tmp_path / d / RUN_FILES["checkpoint"]).exists()


AUTO_AUX = ["method.schedule=auto", "method.auto_points=50", "method.auto_every=1", "data.augment=true"]


def test_adr_auto_with_aux_resumes_bit_exactly_after_a_mid_epoch_stop(tmp_path, aux_npz, monkeypatch):
    cfg = load_config("digits-adr", _sets(aux_npz, 0.5, AUTO_AUX))
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    orig = _stop_at(monkeypatch, 8)     # epoch 2, batch 2 of 6
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    ck = safe_torch_load(tmp_path / "run" / RUN_FILES["checkpoint"])
    assert (ck["epoch"], ck["batch"]) == (1, 2) and ck["aux"]["pass"] * N_AUX + ck["aux"]["offset"] == 8 * 32
    assert len(ck["rectifier"]["auto"]["fits"]) == 1
    monkeypatch.setattr(Trainer, "train_step", orig)
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    hist = _same_run(tmp_path / "run", tmp_path / "ref")
    for r in hist:   # logged per epoch: the fitted values and what they came from
        assert {"adr_tau", "adr_lambda", "adr_teacher_val_pgd", "adr_auto_points", "adr_auto_s"} <= set(r)
        assert r["adr_auto_points"] == 50 and r["adr_lambda"] == pytest.approx(r["adr_teacher_val_pgd"] / 100)


def test_adr_auto_resumes_bit_exactly_across_a_fit_interval(tmp_path, aux_npz, monkeypatch):
    """Fits after epochs 2 and 4 (auto_every=2), held values in between; stopped in epoch 3."""
    extra = ["method.schedule=auto", "method.auto_points=50", "method.auto_every=2", "train.epochs=4"]
    cfg = load_config("digits-adr", _sets(aux_npz, 0.5, extra))
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    orig = _stop_at(monkeypatch, 15)     # epoch 3, batch 3 of 6: after the first fit, before the second
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    ck = safe_torch_load(tmp_path / "run" / RUN_FILES["checkpoint"])
    assert (ck["epoch"], ck["batch"]) == (2, 3)
    assert ck["rectifier"]["auto"]["every"] == 2 and [f["epoch"] for f in ck["rectifier"]["auto"]["fits"]] == [2]
    monkeypatch.setattr(Trainer, "train_step", orig)
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    hist = _same_run(tmp_path / "run", tmp_path / "ref")
    assert [r["adr_auto_fit"] for r in hist] == [False, True, False, True]
    assert (hist[0]["adr_tau"], hist[0]["adr_lambda"]) == (cfg.method.tau_high, cfg.method.lambda_low)
    assert "adr_teacher_val_pgd" not in hist[0] and hist[0]["adr_auto_s"] == 0.0
    for k in ("adr_tau", "adr_lambda", "adr_teacher_val_pgd"):   # epoch 3 logs the values held from epoch 2
        assert hist[2][k] == hist[1][k]
    assert hist[1]["adr_tau"] != hist[3]["adr_tau"] or hist[1]["adr_lambda"] != hist[3]["adr_lambda"]
    with pytest.raises(ResumeError, match=r"method.auto_every: 2 -> 3"):   # a resume under another interval
        Trainer(load_config("digits-adr", _sets(aux_npz, 0.5, extra + ["method.auto_every=3"])),
                tmp_path / "run", resume=True, progress=False).fit()


def test_kill9_of_a_cli_run_with_aux_then_resume_is_bit_exact(tmp_path, aux_npz):
    sets = _sets(aux_npz, 0.5, AUTO_AUX + ["train.epochs=6", "data.train_subset=256"])

    def cmd(out, resume=False):
        argv = [sys.executable, "-m", "rb_labelrefine", "train", "--config", "digits-adr", "--out", str(out),
                "--quiet"]
        for s in sets:
            argv += ["--set", s]
        return argv + (["--resume"] if resume else [])

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.Popen(cmd(tmp_path / "ref"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    run = tmp_path / "run"
    victim = subprocess.Popen(cmd(run), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = run / RUN_FILES["checkpoint"], time.time() + 300
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(60) == -signal.SIGKILL, "the run ended before the kill"
    epoch = int(safe_torch_load(ckpt)["epoch"])
    assert 1 <= epoch < 6
    res = subprocess.run(cmd(run, resume=True), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {ckpt} at epoch {epoch + 1}" in res.stderr
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    _same_run(run, tmp_path / "ref")
