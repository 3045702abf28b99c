"""Exit codes by cause (issue 24): a plain ``ValueError`` inside the package is a bug (exit 70), so
every place where user input -- config values, arguments, data, run directories, checkpoints, result
JSON -- is refused raises a typed error (rb_labelrefine/errors.py) naming the field or file: exit 2.

* A table through the real command line (``cli.main``), one representative bad input per converted
  place: the exit code, the named field/path, no traceback, no file that existed changed.
* ``--resume`` refuses an auxiliary-stream position outside the archive or beyond what the steps
  done can have drawn (``aux.offset``, ``aux.pass``), naming the entry.
* An auxiliary archive truncated or replaced while training ends in exit 2 naming it (never SIGBUS):
  the cheap check before each batch read, the full one before each checkpoint.
* A broken GitHub ``autoattack`` (torchattacks 3.4's copy) in ``eval`` is exit 2 naming the package
  and ``rb-labelrefine doctor``, not an internal error.
* A run written before ``eval.select_on`` existed, with ``data.val_fraction: 0`` (it selected on the
  test curve), resumes with ``--set eval.select_on=test``.
* ``--resume`` never reads ``summary.json`` through a link.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _extras import need

need("sklearn")

from rb_labelrefine.config import load_config
from rb_labelrefine.runs import RUN_FILES, read_weights
from rb_labelrefine.training.io import LOCK_FILE, safe_torch_load
from rb_labelrefine.training.trainer import Trainer
# the shared CLI helpers and the autouse fixture (no plots; the process-wide torch settings restored)
from test_run_integrity import TINY, _hash_tree, _main, _quiet_and_restore, _train_argv  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
N_AUX = 200


def _argv(out, sets=(), preset="digits-pgdat", resume=False):
    return _train_argv(out, preset, sets, resume)


@pytest.fixture(scope="module")
def aux_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("aux") / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (N_AUX, 8, 8, 1), dtype=np.uint8),
             label=rng.integers(0, 10, N_AUX).astype(np.int64))
    return path


def _aux_sets(aux):
    return [f"data.aux={aux}", "data.aux_fraction=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, aux_npz):
    """Finished tiny runs: plain (test_subset 300) and with generated data."""
    root = tmp_path_factory.mktemp("runs")
    out = {"plain": root / "plain", "aux": root / "aux"}
    Trainer(load_config("digits-pgdat", TINY + ["data.test_subset=300"]), out["plain"], progress=False).fit()
    Trainer(load_config("digits-pgdat", TINY + _aux_sets(aux_npz)), out["aux"], progress=False).fit()
    return out


def _copy(runs, t: Path, name: str, unfinished: bool = False) -> Path:
    run = t / "run"
    shutil.copytree(runs[name], run)
    if unfinished:
        (run / RUN_FILES["summary"]).unlink()
    return run


def _edit_checkpoint(run: Path, fn) -> Path:
    state = safe_torch_load(run / RUN_FILES["checkpoint"])
    fn(state)
    torch.save(state, run / RUN_FILES["checkpoint"])
    return run


def _results(t: Path, **aa) -> Path:
    p = t / "res.json"
    p.write_text(json.dumps({"autoattack": {"clean_acc": 50.0, "robust_acc": 20.0, "n": 4, "eps": 0.3, **aa},
                             "which": "best"}))
    return p


def _aux_resume(r, t, a, **edit):
    run = _edit_checkpoint(_copy(r, t, "aux", unfinished=True), lambda s: s["aux"].update(edit))
    return _argv(run, _aux_sets(a), resume=True)


# Each case: setup(runs, tmp, aux) -> argv; the exit code; substrings stderr must contain.
CASES = {
    # data/builder.py (formerly ValueError -> 70)
    "data.train_subset larger than the data": (
        lambda r, t, a: _argv(t / "new", ["data.train_subset=100000"]), 2,
        ["config field 'data.train_subset'", "100000", "training images remain"]),
    "data.test_subset larger than the test set": (
        lambda r, t, a: _argv(t / "new", ["data.test_subset=100000"]), 2,
        ["config field 'data.test_subset'", "100000", "the test set has 397 images"]),
    # refused by the config's own checks (the builder's are the same for the Python API)
    "unknown data.name": (lambda r, t, a: _argv(t / "new", ["data.name=bogus"]), 2,
                          ["config field 'data.name'", "bogus"]),
    "data.image_size on digits": (lambda r, t, a: _argv(t / "new", ["data.image_size=16"]), 2,
                                  ["config field 'data.image_size'"]),
    "unknown model.arch": (lambda r, t, a: _argv(t / "new", ["model.arch=bogus"]), 2,
                           ["config field 'model.arch'", "bogus"]),
    # evaluation/autoattack.py, evaluation/checkpoint.py
    "eval --attacks unknown": (
        lambda r, t, a: ["eval", "--checkpoint", _copy(r, t, "plain"), "--n", "4", "--attacks", "apgd-ce,bogus"], 2,
        ["unknown attacks ['bogus']"]),
    # export/robustbench_export.py
    "export --results of another norm": (
        lambda r, t, a: ["export", "--checkpoint", _copy(r, t, "plain"), "--out", t / "exp", "--results",
                         _results(t, norm="L2")], 2,
        ["the best evaluation was measured for L2, but the export is for Linf"]),
    # training/checkpoint.py + data/aux.py: the auxiliary stream's position on --resume
    "checkpoint aux.offset beyond the archive": (
        lambda r, t, a: _aux_resume(r, t, a, offset=10 ** 4), 2, ["'aux.offset' is 10000, outside [0, 200)"]),
    "checkpoint aux.pass = 10**30": (
        lambda r, t, a: _aux_resume(r, t, a, **{"pass": 10 ** 30}), 2,
        ["'aux.pass' is 1" + "0" * 30 + ", outside [0, "]),
    "checkpoint aux.pass = -3": (
        lambda r, t, a: _aux_resume(r, t, a, **{"pass": -3}), 2, ["'aux.pass' is -3, outside [0, "]),
    "checkpoint aux.offset not an integer": (
        lambda r, t, a: _aux_resume(r, t, a, offset=2.5), 2, ["'aux.offset' is 2.5, not an integer"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_naming_it_and_changes_nothing(capsys, runs, aux_npz, tmp_path, case):
    setup, code, needles = CASES[case]
    argv = setup(runs, tmp_path, aux_npz)
    before = _hash_tree(tmp_path)
    rc, _, err = _main(capsys, argv)
    assert rc == code, err
    for n in needles:
        assert n in err, (n, err)
    assert "Traceback" not in err and "internal error" not in err
    after = _hash_tree(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file that existed before changed"
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())
    assert not list(tmp_path.rglob(LOCK_FILE))


def test_eval_of_a_run_whose_test_data_shrank_names_the_field(capsys, runs, tmp_path, monkeypatch):
    """The run was trained with data.test_subset=300; the data now hold 100 test images."""
    from rb_labelrefine.data import builder
    from rb_labelrefine.data.datasets import TensorImageDataset

    real = builder.load_digits_data

    def fewer(**kw):
        train, test, info = real(**kw)
        return train, TensorImageDataset(test.x[:100], test.y[:100]), info

    monkeypatch.setattr(builder, "load_digits_data", fewer)
    rc, _, err = _main(capsys, ["eval", "--checkpoint", _copy(runs, tmp_path, "plain"), "--n", "4"])
    assert rc == 2, err
    assert "config field 'data.test_subset'" in err and "300" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the aux file changing

def _truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _replace(path: Path):
    """Another file of the same size and modification time under the name (a new inode)."""
    st = os.stat(path)
    other = path.with_name(path.name + ".new")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF   # inside the zip directory's tail: the digest differs
    other.write_bytes(bytes(data))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)


@pytest.mark.parametrize("when", ["truncated after epoch 1", "replaced before the epoch-1 checkpoint"])
def test_an_aux_file_changed_during_training_exits_2_naming_it(capsys, tmp_path, aux_npz, monkeypatch, when):
    aux = tmp_path / "gen.npz"
    shutil.copy(aux_npz, aux)
    orig = Trainer._end_of_epoch

    def end_of_epoch(self, epoch):
        if epoch == 0 and when.startswith("replaced"):
            _replace(aux)          # same size and mtime: only the full check at the checkpoint sees it
        orig(self, epoch)
        if epoch == 0 and when.startswith("truncated"):
            _truncate(aux)         # the next batch read would die by SIGBUS

    monkeypatch.setattr(Trainer, "_end_of_epoch", end_of_epoch)
    out = tmp_path / "run"
    rc, _, err = _main(capsys, _argv(out, _aux_sets(aux) + ["train.epochs=3"]))
    assert rc == 2, err
    assert str(aux) in err and "changed while training read it" in err and "Traceback" not in err
    assert ("size changed" in err) if when.startswith("truncated") else ("another file replaced it" in err)
    ck = safe_torch_load(out / RUN_FILES["checkpoint"]) if (out / RUN_FILES["checkpoint"]).exists() else None
    if when.startswith("truncated"):   # the epoch-1 checkpoint was written before the change: resumable
        assert ck is not None and (ck["epoch"], ck["batch"]) == (1, 0)
    else:                               # no checkpoint written over the changed file
        assert ck is None


def test_the_cheap_check_runs_before_every_aux_read(tmp_path, aux_npz, monkeypatch):
    from rb_labelrefine.data.aux import AuxData

    calls = []
    orig = AuxData.check
    monkeypatch.setattr(AuxData, "check", lambda self, full=True: (calls.append(full), orig(self, full))[1])
    t = Trainer(load_config("digits-pgdat", TINY + _aux_sets(aux_npz) + ["train.epochs=1"]), tmp_path / "r",
                progress=False)
    t.fit()
    assert calls.count(False) == t.steps_per_epoch and calls.count(True) >= 1


# ----------------------------------------------------------------------------- a broken autoattack

def test_a_broken_github_autoattack_in_eval_is_exit_2_naming_the_package_and_doctor(runs, tmp_path):
    fake = tmp_path / "site" / "autoattack"
    fake.mkdir(parents=True)
    # torchattacks 3.4's copy: imports what torch >= 2 no longer has
    (fake / "__init__.py").write_text("from torch.autograd.gradcheck import zero_gradients\nclass AutoAttack: pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "rb_labelrefine", "eval", "--checkpoint", str(runs["plain"]),
                          "--n", "4", "--attacks", "apgd-ce"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "the installed package 'autoattack'" in res.stderr and "zero_gradients" in res.stderr
    assert "rb-labelrefine doctor" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- a run from before eval.select_on

def _as_before_select_on(run: Path):
    """Make ``run`` look written before eval.select_on existed: config.yaml without the field, every
    file's fingerprint computed without it."""
    import hashlib as _h

    text = (run / RUN_FILES["config"]).read_text()
    lines = text.splitlines()
    assert sum("select_on:" in ln for ln in lines) == 1
    (run / RUN_FILES["config"]).write_text("\n".join(ln for ln in lines if "select_on:" not in ln) + "\n")

    def old(meta):
        fields = json.loads(meta["run_config"])
        fields.pop("eval.select_on")
        text = json.dumps(fields, sort_keys=True, default=str)
        return text, _h.sha256(text.encode()).hexdigest()[:16]

    state = safe_torch_load(run / RUN_FILES["checkpoint"])
    state["run_config"], state["config_fingerprint"] = old(state)
    torch.save(state, run / RUN_FILES["checkpoint"])
    from safetensors.torch import save_file

    for which in ("best", "best_pgd_ce", "final"):
        p = run / RUN_FILES[which]
        if p.exists():
            tensors, meta = read_weights(p)
            meta = dict(meta)
            meta["run_config"], meta["config_fingerprint"] = old(meta)
            save_file(tensors, str(p), metadata=meta)


def test_an_old_run_with_val_fraction_0_resumes_with_select_on_test(capsys, tmp_path, monkeypatch):
    sets = ["data.val_fraction=0", "eval.select_on=test", "train.epochs=2"]
    out = tmp_path / "run"
    orig = Trainer.train_step

    def train_step(self, *a, **k):   # stop mid-epoch 2 (6 steps per epoch)
        res = orig(self, *a, **k)
        if self.global_step == 8:
            self.stop.request(signal.SIGTERM)
        return res

    monkeypatch.setattr(Trainer, "train_step", train_step)
    rc, _, err = _main(capsys, _argv(out, sets))
    assert rc == 3, err
    monkeypatch.setattr(Trainer, "train_step", orig)
    _as_before_select_on(out)
    before = _hash_tree(out)
    old_sets = [s for s in sets if not s.startswith("eval.select_on")]
    rc, _, err = _main(capsys, _argv(out, old_sets, resume=True))      # as before: refused, nothing changed
    assert rc == 2 and "eval.select_on" in err, err
    assert _hash_tree(out) == before
    rc, _, err = _main(capsys, _argv(out, old_sets + ["eval.select_on=test"], resume=True))
    assert rc == 0, err
    assert "eval.select_on" in err and "what the run did before" in err   # the note, once per file
    summary = json.loads((out / RUN_FILES["summary"]).read_text())
    assert summary["best"]["selected_on"] == "test" and "Traceback" not in err


# ----------------------------------------------------------------------------- summary.json through a link

def test_resume_never_reads_summary_json_through_a_link(capsys, runs, tmp_path):
    run = _copy(runs, tmp_path, "plain")
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({"secret": 1}))
    (run / RUN_FILES["summary"]).unlink()
    os.symlink(victim, run / RUN_FILES["summary"])
    rc, out, err = _main(capsys, _argv(run, ["data.test_subset=300"], resume=True))
    assert rc == 0, err
    assert "is finished" not in err + out          # the link was not taken for the run's summary
    assert victim.read_text() == json.dumps({"secret": 1})
    assert not (run / RUN_FILES["summary"]).is_symlink()
    assert "secret" not in (run / RUN_FILES["summary"]).read_text()
