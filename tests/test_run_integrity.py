"""Issue 12, training / eval / CLI side: every bad input is named, runs cannot clobber each other,
a checkpoint proves it belongs to its run.

* A table of bad inputs through the real CLI (``cli.main``): each exits with the code of its cause
  (2 bad input, 4 I/O failure), names the field or path, prints no traceback, and leaves every file
  that existed before byte-identical.
* One writer per run directory: a second ``train`` / ``--resume`` while a real training process
  holds the directory exits 2 naming the holder's PID; after that process is killed -9 its lock
  file no longer blocks anyone.
* Foreign checkpoints (an ADR checkpoint in a PGD-AT run, seed 1 in seed 0, a best.safetensors of
  another run) are refused naming what differs; positions out of range are refused naming the field.
* ``--resume`` of a finished run changes nothing and says so.
* ``eval --sanity`` prints its table and exits 5 when a check fails.
* GradScaler state is checkpointed and restored.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _extras import need

need("sklearn")

from rb_labelrefine import cli
from rb_labelrefine.config import load_config
from rb_labelrefine.data import load_digits_data
from rb_labelrefine.runs import (RUN_FILES, build_model_for, config_fingerprint, info_to_metadata, read_weights,
                                 write_weights)
from rb_labelrefine.training import io as rio
from rb_labelrefine.training.io import LOCK_FILE, RunLock, safe_torch_load
from rb_labelrefine.training.trainer import ResumeError, Trainer, TrainingInterrupted

TINY = ["model.arch=mlp", "data.train_subset=192", "data.batch_size=32", "attack.steps=2", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=2", "eval.curve_test_size=64"]


def _train_argv(out, preset="digits-pgdat", sets=(), resume=False):
    argv = ["train", "--config", str(preset), "--out", str(out), "--quiet"]
    for s in list(TINY) + list(sets):
        argv += ["--set", s]
    return argv + (["--resume"] if resume else [])


def _main(capsys, argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _hash_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_restore():
    """No curve plots in this process; give back the trainer's process-wide settings."""
    import rb_labelrefine.plots as plots

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plots, "plot_curves", lambda *a, **k: None)
        yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished tiny runs: PGD-AT seed 0 (the victim), PGD-AT seed 1 and ADR (the foreigners)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, preset, extra in (("pgdat", "digits-pgdat", []), ("seed1", "digits-pgdat", ["train.seed=1"]),
                                ("adr", "digits-adr", [])):
        out[name] = root / name
        Trainer(load_config(preset, TINY + extra), out[name], progress=False).fit()
    return out


def _copy_run(runs, tmp_path, name="pgdat", unfinished=False) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs[name], run)
    if unfinished:  # as after a stop in the final stage: training done, summary not written
        (run / RUN_FILES["summary"]).unlink()
    return run


def _edit_checkpoint(run: Path, fn):
    state = safe_torch_load(run / RUN_FILES["checkpoint"])
    fn(state)
    torch.save(state, run / RUN_FILES["checkpoint"])


def _huge_cifar(tmp: Path) -> Path:
    """A CIFAR-10 folder whose first batch asks numpy.ndarray for 8 TB (only allowed globals)."""
    class Huge:
        def __reduce__(self):
            return (np.ndarray, ((10 ** 6, 10 ** 6),))
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": Huge(), b"labels": [0]}, fh, protocol=3)
    return tmp / "cifar"


def _protocol4_payload(path: Path, marker: Path):
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=4)


# Each case: setup(runs, tmp) -> argv; the exit code; substrings stderr must contain.
def _yaml(tmp, name, text):
    p = tmp / name
    p.write_text(text)
    return p


CASES = {
    "--set arithmetic 1/0": (lambda r, t: _train_argv(t / "new", sets=["attack.eps=1/0"]), 2,
                             ["config field 'attack.eps'", "division by zero"]),
    "base: cycle": (lambda r, t: (_yaml(t, "a.yaml", "base: " + str(t / "b.yaml") + "\n"),
                                  _yaml(t, "b.yaml", "base: " + str(t / "a.yaml") + "\n"),
                                  _train_argv(t / "new", t / "a.yaml"))[-1], 2, ["inheritance cycle", "a.yaml"]),
    "base: not a string": (lambda r, t: _train_argv(t / "new", _yaml(t, "c.yaml", "base: 5\n")), 2,
                           ["base (in", "c.yaml", "must be a preset name or a YAML path, got 5"]),
    "--config a directory": (lambda r, t: _train_argv(t / "new", t), 2, ["'--config'", "is a directory"]),
    "empty YAML": (lambda r, t: _train_argv(t / "new", _yaml(t, "empty.yaml", "")), 2, ["empty.yaml is empty"]),
    "YAML not UTF-8": (lambda r, t: ((t / "bin.yaml").write_bytes(b"name: \xff\xfe\n"),
                                     _train_argv(t / "new", t / "bin.yaml"))[-1], 2, ["bin.yaml is not UTF-8"]),
    "model.kwargs negative": (lambda r, t: _train_argv(t / "new", sets=["model.kwargs={hidden: -3}"]), 2,
                              ["config field 'model.kwargs'", "negative dimension"]),
    "model.kwargs unknown": (lambda r, t: _train_argv(t / "new", sets=["model.kwargs={bogus: 1}"]), 2,
                             ["config field 'model.kwargs'", "bogus"]),
    "device cuda:abc": (lambda r, t: _train_argv(t / "new", sets=["train.device=cuda:abc"]), 2,
                        ["config field 'train.device'", "cuda:abc"]),
    "device mps unavailable": (lambda r, t: _train_argv(t / "new", sets=["train.device=mps"]), 2,
                               ["config field 'train.device'", "MPS backend is not available"]),
    "eval.autoattack_n=0": (lambda r, t: _train_argv(t / "new", sets=["eval.autoattack=true", "eval.autoattack_n=0"]),
                            2, ["config field 'eval.autoattack_n'", "must be >= 1"]),
    "optim.gamma < 0": (lambda r, t: _train_argv(t / "new", sets=["optim.gamma=-0.1"]), 2,
                        ["config field 'optim.gamma'", "must be > 0"]),
    "train.grad_clip < 0": (lambda r, t: _train_argv(t / "new", sets=["train.grad_clip=-1"]), 2,
                            ["config field 'train.grad_clip'", "must be > 0"]),
    "awp.proxy_lr < 0": (lambda r, t: _train_argv(t / "new", sets=["awp.enabled=true", "awp.proxy_lr=-0.01"]), 2,
                         ["config field 'awp.proxy_lr'", "must be > 0"]),
    "--out a symlink loop": (lambda r, t: (os.symlink(t / "loop", t / "loop"), _train_argv(t / "loop"))[-1], 2,
                             ["--out:", "loop"]),
    "--out a file": (lambda r, t: _train_argv(_yaml(t, "afile", "x")), 2, ["--out:", "afile", "not a directory"]),
    "--out under a file": (lambda r, t: _train_argv(_yaml(t, "afile", "x") / "run"), 2, ["--out:", "afile/run"]),
    "--out a 300-character name": (lambda r, t: _train_argv(t / ("x" * 300)), 2, ["--out:", "File name too long"]),
    "0-byte checkpoint.pt": (lambda r, t: ((_copy_run(r, t, unfinished=True) / RUN_FILES["checkpoint"]).write_bytes(b""),
                                           _train_argv(t / "run", resume=True))[-1], 2,
                             ["checkpoint.pt is empty (0 bytes)"]),
    "checkpoint without optimizer": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s.pop("optimizer")),
                      _train_argv(t / "run", resume=True))[-1], 2, ["checkpoint.pt is incomplete", "'optimizer'"]),
    "checkpoint without rng": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s.pop("rng")),
                      _train_argv(t / "run", resume=True))[-1], 2, ["checkpoint.pt is incomplete", "'rng'"]),
    "checkpoint batch = 10**9": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s.update(batch=10 ** 9)),
                      _train_argv(t / "run", resume=True))[-1], 2, ["'batch' is 1000000000, outside [0, 0]"]),
    "checkpoint epoch = -1": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s.update(epoch=-1)),
                      _train_argv(t / "run", resume=True))[-1], 2, ["'epoch' is -1, outside [0, 2]"]),
    "checkpoint with a wrong-shaped momentum": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s["optimizer"]["state"][0].update(
            momentum_buffer=torch.zeros(3))), _train_argv(t / "run", resume=True))[-1], 2,
        ["optimizer state 'momentum_buffer' of parameter 0", "(3,)"]),
    # values on --resume (issue 24): each names the entry, nothing is rewritten
    "checkpoint with NaN in the model": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s["model"]["model.1.weight"].view(-1)
                                       .__setitem__(0, float("nan"))), _train_argv(t / "run", resume=True))[-1], 2,
        ["'model.model.1.weight' holds 1 NaN value(s)"]),
    "checkpoint with inf in the momentum": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s["optimizer"]["state"][0][
            "momentum_buffer"].view(-1).__setitem__(3, float("inf"))), _train_argv(t / "run", resume=True))[-1], 2,
        ["'optimizer.state.0.momentum_buffer' holds 1 infinite value(s)"]),
    "checkpoint with int8 model tensors": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s["model"].update(
            {"model.1.weight": s["model"]["model.1.weight"].to(torch.int8)})), _train_argv(t / "run", resume=True))[-1],
        2, ["'model'.model.1.weight is a int8 tensor, this run needs float32"]),
    "checkpoint with an int8 momentum": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s["optimizer"]["state"][0].update(
            momentum_buffer=s["optimizer"]["state"][0]["momentum_buffer"].to(torch.int8))),
                      _train_argv(t / "run", resume=True))[-1], 2,
        ["'optimizer.state.0.momentum_buffer' is a int8 tensor, not floating point"]),
    "checkpoint best.score NaN": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True),
                                       lambda s: s["best"].update(score=float("nan"))),
                      _train_argv(t / "run", resume=True))[-1], 2, ["'best.score' is nan, not a finite number"]),
    "checkpoint best.score inf": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True),
                                       lambda s: s["best"].update(score=float("inf"))),
                      _train_argv(t / "run", resume=True))[-1], 2, ["'best.score' is inf, not a finite number"]),
    "checkpoint epoch_acc NaN": (
        lambda r, t: (_edit_checkpoint(_copy_run(r, t, unfinished=True), lambda s: s.update(
            epoch_acc={"loss": float("nan"), "correct": 0.0, "seen": 32.0, "time": 0.0})),
                      _train_argv(t / "run", resume=True))[-1], 2, ["'epoch_acc.loss' is nan, not a finite number"]),
    "ADR checkpoint in a PGD-AT run": (
        lambda r, t: (shutil.copy(r["adr"] / RUN_FILES["checkpoint"], _copy_run(r, t, unfinished=True)),
                      _train_argv(t / "run", resume=True))[-1], 2,
        ["checkpoint.pt belongs to another run", "method.name: 'adr' in the file, 'onehot' in config.yaml"]),
    "seed-1 checkpoint in a seed-0 run": (
        lambda r, t: (shutil.copy(r["seed1"] / RUN_FILES["checkpoint"], _copy_run(r, t, unfinished=True)),
                      _train_argv(t / "run", resume=True))[-1], 2,
        ["checkpoint.pt belongs to another run", "train.seed: 1 in the file, 0 in config.yaml"]),
    "seed-1 best.safetensors in a seed-0 run (resume)": (
        lambda r, t: (shutil.copy(r["seed1"] / RUN_FILES["best"], _copy_run(r, t, unfinished=True)),
                      _train_argv(t / "run", resume=True))[-1], 2,
        ["best.safetensors belongs to another run", "train.seed"]),
    "seed-1 best.safetensors in a seed-0 run (eval)": (
        lambda r, t: (shutil.copy(r["seed1"] / RUN_FILES["best"], _copy_run(r, t)),
                      ["eval", "--checkpoint", t / "run", "--n", "4"])[-1], 2,
        ["best.safetensors belongs to another run", "train.seed"]),
    "protocol-4 pickle as checkpoint.pt": (
        lambda r, t: (_protocol4_payload(_copy_run(r, t, unfinished=True) / RUN_FILES["checkpoint"], t / "MARKER"),
                      _train_argv(t / "run", resume=True))[-1], 2,
        ["refusing to load", "checkpoint.pt", "builtins.exec"]),
    "weights of another shape": (
        lambda r, t: (_write_wide(_copy_run(r, t) / RUN_FILES["best"]),
                      ["eval", "--checkpoint", t / "run", "--n", "4"])[-1], 2,
        ["best.safetensors does not match mlp", "model.1.weight is (32, 64), mlp has (64, 64)"]),
    "weights with unreadable data_info": (
        lambda r, t: (_write_meta(_copy_run(r, t) / RUN_FILES["best"], {"data_info": "{"}),
                      ["eval", "--checkpoint", t / "run", "--n", "4"])[-1], 2,
        ["best.safetensors", "data_info is not valid JSON"]),
    "weights with num_classes = -1": (
        lambda r, t: (_write_meta(_copy_run(r, t) / RUN_FILES["best"], {"data_info": json.dumps(
            {"name": "digits", "num_classes": -1, "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.4]})}),
                      ["eval", "--checkpoint", t / "run", "--n", "4"])[-1], 2,
        ["best.safetensors", "data_info.num_classes must be in [1, 100000], got -1"]),
    "eval --n 0": (lambda r, t: ["eval", "--checkpoint", _copy_run(r, t), "--n", "0"], 2, ["--n: must be >= 1"]),
    "eval --json into a missing directory": (
        lambda r, t: ["eval", "--checkpoint", _copy_run(r, t), "--n", "4", "--json", t / "nodir" / "x.json"], 2,
        ["--json", "nodir", "does not exist"]),
    "eval --json a directory": (lambda r, t: ["eval", "--checkpoint", _copy_run(r, t), "--n", "4", "--json", t], 2,
                                ["--json", "is a directory"]),
    "leaderboard --model-info a list": (
        lambda r, t: ["leaderboard", "--model-info", _yaml(t, "list.json", "[1, 2]")], 2, ["list.json", "JSON list"]),
    "leaderboard --model-info a directory": (lambda r, t: ["leaderboard", "--model-info", t], 2,
                                             ["--model-info", "is a directory"]),
    "leaderboard AutoAttack NaN": (
        lambda r, t: ["leaderboard", "--model-info", _yaml(t, "nan.json", '{"autoattack_acc": NaN}')], 2,
        ["AutoAttack accuracy must be a percentage in [0, 100], got nan"]),
    "leaderboard AutoAttack 150": (lambda r, t: ["leaderboard", "--autoattack", "150"], 2,
                                   ["AutoAttack accuracy must be a percentage in [0, 100], got 150"]),
    "CIFAR pickle with a huge ndarray": (
        lambda r, t: _train_argv(t / "new", sets=["data.name=cifar10", f"data.root={_huge_cifar(t)}",
                                                 "model.arch=tiny_cnn"]), 2,
        ["data_batch_1", "8,000,000,000,000 bytes", "refused before allocating"]),
}


def _write_wide(path: Path):
    _, _, info = load_digits_data()
    wide = build_model_for(load_config("digits-pgdat", ["model.arch=mlp", "model.kwargs={hidden: 32}"]), info)
    write_weights(wide, path, {"data_info": info_to_metadata(info)})  # no fingerprint: as written by hand


def _write_meta(path: Path, meta: dict):
    state, old = read_weights(path)
    from safetensors.torch import save_file

    old = {k: v for k, v in old.items() if k not in ("config_fingerprint", "run_config")}  # as if by hand
    save_file(state, str(path), metadata={**old, **meta})


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_by_cause_names_it_and_changes_nothing(capsys, runs, tmp_path, case):
    setup, code, needles = CASES[case]
    argv = setup(runs, tmp_path)
    before = _hash_tree(tmp_path)
    rc, _, err = _main(capsys, argv)
    assert rc == code, err
    for n in needles:
        assert n in err, (n, err)
    assert "Traceback" not in err
    after = _hash_tree(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file that existed before changed"
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())
    assert not list(tmp_path.rglob(LOCK_FILE))


def test_debug_flag_shows_the_traceback(capsys, tmp_path):
    rc, _, err = _main(capsys, ["--debug"] + _train_argv(tmp_path / "new", sets=["attack.eps=1/0"]))
    assert rc == 2 and "Traceback" in err and "division by zero" in err
    rc, _, err = _main(capsys, _train_argv(tmp_path / "new", sets=["attack.eps=1/0"]) + ["--debug"])
    assert rc == 2 and "Traceback" in err


# ----------------------------------------------------------------------------- I/O failures: exit 4

def test_read_only_out_exits_4_before_data_or_model_are_built(capsys, tmp_path, monkeypatch):
    import rb_labelrefine.data as data

    built = []
    monkeypatch.setattr(data, "build_datasets", lambda *a, **k: built.append(1))
    real = rio.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if dir is not None and Path(dir) == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(rio.tempfile, "mkstemp", read_only)
    (tmp_path / "ro").mkdir()
    rc, _, err = _main(capsys, _train_argv(tmp_path / "ro"))
    assert rc == 4, err
    assert f"cannot write into {tmp_path / 'ro'}: Read-only file system" in err and "Traceback" not in err
    assert built == []


def test_disk_full_while_checkpointing_exits_4_naming_the_path_and_the_bytes(capsys, tmp_path, monkeypatch):
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".checkpoint.pt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    rc, _, err = _main(capsys, _train_argv(tmp_path / "run"))
    assert rc == 4, err
    assert f"cannot write {tmp_path / 'run' / 'checkpoint.pt'}: No space left on device (" in err
    assert "bytes needed" in err and "free)" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_weights_are_written_by_python_so_a_full_disk_is_an_oserror(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(rio.StorageError, match=r"final.safetensors: full \([\d,]+ bytes needed"):
        write_weights(torch.nn.Linear(2, 2), tmp_path / "final.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- unsafe pickles

@pytest.mark.parametrize("text", [
    # torch <= 2.14 and 2.15 zip files: the culprit on a line of its own
    "Weights only load failed. ...\n\tWeightsUnpickler error: Unsupported global: GLOBAL builtins.exec was not an "
    "allowed global by default. Please use `torch.serialization.add_safe_globals([exec])`\n\nCheck the documentation",
    # 2.15 plain pickles: after a sentence on the same line, the culprit on the next
    "Weights only load failed. Please file an issue with the following so that we can make `weights_only=True` "
    "compatible with your use case: WeightsUnpickler error: \n\nUnsupported global: GLOBAL builtins.exec\n\n"
    "Check the documentation of torch.load",
])
def test_refusal_names_the_blocked_global_in_either_message_form(tmp_path, text):
    reason = rio._weights_only_reason(pickle.UnpicklingError(text), tmp_path / "missing.pt")
    assert reason.startswith("Unsupported global: GLOBAL builtins.exec"), reason


def test_refusal_names_the_global_even_when_torch_does_not(tmp_path):
    _protocol4_payload(tmp_path / "p4.pt", tmp_path / "MARKER")
    with pytest.raises(rio.UnsafeCheckpointError, match=r"the file references builtins\.exec"):
        safe_torch_load(tmp_path / "p4.pt")
    assert not (tmp_path / "MARKER").exists()


# ----------------------------------------------------------------------------- finished run, foreign files

def test_resume_of_a_finished_run_changes_nothing_and_says_so(capsys, runs, tmp_path):
    run = _copy_run(runs, tmp_path)
    before = _hash_tree(run)
    mtimes = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    rc, out, err = _main(capsys, _train_argv(run, resume=True))
    assert rc == 0, err
    assert "is finished (all 2 epochs, summary.json written): nothing to do, nothing changed" in err
    assert out.startswith("digits-pgdat: 2 epochs")
    assert _hash_tree(run) == before
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == mtimes


def test_finished_run_with_a_foreign_checkpoint_is_refused(capsys, runs, tmp_path):
    run = _copy_run(runs, tmp_path)
    shutil.copy(runs["seed1"] / RUN_FILES["checkpoint"], run)
    rc, _, err = _main(capsys, _train_argv(run, resume=True))
    assert rc == 2 and "train.seed: 1 in the file, 0 in config.yaml" in err, err


def test_every_run_file_carries_the_fingerprint(runs):
    cfg = load_config("digits-pgdat", TINY)
    fp = config_fingerprint(cfg)
    assert safe_torch_load(runs["pgdat"] / RUN_FILES["checkpoint"])["config_fingerprint"] == fp
    for which in ("best", "final"):
        assert read_weights(runs["pgdat"] / RUN_FILES[which])[1]["config_fingerprint"] == fp
    # the fields allowed to differ on resume do not change it; anything else does
    assert config_fingerprint(load_config("digits-pgdat", TINY + ["train.threads=2", "train.log_every=7"])) == fp
    assert config_fingerprint(load_config("digits-pgdat", TINY + ["train.seed=1"])) != fp


# ----------------------------------------------------------------------------- one writer per directory

def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nobody(capsys, tmp_path):
    """A real training process holds the directory; this process is the second writer."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    long = _train_argv(run, sets=["train.epochs=500", "train.checkpoint_every=1000", "eval.test_every=1000"])
    holder = subprocess.Popen([sys.executable, "-m", "rb_labelrefine", *long], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.time() + 300
        while not (run / RUN_FILES["config"]).exists():  # written after setup, under the lock
            assert holder.poll() is None, holder.stderr.read()
            assert time.time() < end, "the training process did not start"
            time.sleep(0.05)
        lock_text = (run / LOCK_FILE).read_text()
        assert lock_text.startswith(f"pid {holder.pid} on ")
        config = (run / RUN_FILES["config"]).read_bytes()
        for resume in (False, True):
            rc, _, err = _main(capsys, long + (["--resume"] if resume else []))
            assert rc == 2, err
            assert f"is in use by another rb-labelrefine process (pid {holder.pid} on" in err
            assert "nothing was changed" in err and "Traceback" not in err
        assert holder.poll() is None, "the first run must still be training (raise its epochs if not)"
        assert (run / RUN_FILES["config"]).read_bytes() == config
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (run / LOCK_FILE).exists()  # kill -9 leaves the file, but not the lock
    lock = RunLock(run).acquire()
    try:
        assert lock.stale == f"pid {holder.pid} on {os.uname().nodename}"
    finally:
        lock.release()
    assert not (run / LOCK_FILE).exists()


def test_lock_is_exclusive_between_open_files_and_released_on_exit(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(ResumeError, match=rf"pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()  # flock: a second open file description conflicts even in one process
    a.release()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["relative_link", "absolute_link", "dangling_link", "hard_link", "fifo", "directory"])
def test_the_lock_never_opens_through_a_link_or_a_special_file(tmp_path, kind):
    """A downloaded run directory may hold ``.rb_labelrefine.lock -> ../victim.txt`` (a relative link
    survives unpacking): taking the lock must refuse it, exit-2 style, and leave the victim alone."""
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the thesis, chapter 1\n")
    lock = run / LOCK_FILE
    if kind == "relative_link":
        lock.symlink_to(Path("..") / victim.name)
    elif kind == "absolute_link":
        lock.symlink_to(victim)
    elif kind == "dangling_link":
        lock.symlink_to(tmp_path / "created_through_the_link")
    elif kind == "hard_link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(ResumeError, match=r"refusing to use the run lock .*nothing was changed") as info:
        RunLock(run).acquire()
    assert str(lock) in str(info.value)
    assert victim.read_text() == "the thesis, chapter 1\n"
    assert not (tmp_path / "created_through_the_link").exists()
    assert os.path.lexists(lock)  # the refusal deletes nothing either


def test_a_linked_lock_in_a_run_directory_exits_2_from_the_cli_and_the_victim_is_untouched(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / LOCK_FILE).symlink_to(Path("..") / "victim.txt")
    for resume in (False, True):
        rc, _, err = _main(capsys, _train_argv(run) + (["--resume"] if resume else []))
        assert rc == 2, err
        assert "symbolic link" in err and LOCK_FILE in err and "Traceback" not in err
        assert victim.read_text() == "keep me"


def test_a_lock_file_that_holds_other_text_is_not_printed_as_its_holder(tmp_path):
    (tmp_path / LOCK_FILE).write_text("SECRET first line of something else\n")
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.stale is None
    finally:
        lock.release()


# ----------------------------------------------------------------------------- eval --sanity

def test_eval_sanity_prints_the_table_and_exits_5_on_a_failed_check(capsys, runs, tmp_path, monkeypatch):
    import rb_labelrefine.evaluation.autoattack as aa
    import rb_labelrefine.evaluation.sanity as sanity

    flag = "there are points with zero gradient!"

    def fake_aa(model, x, y, **k):  # the official run is tested elsewhere; its zero-gradient flag matters here
        return {"clean_acc": 93.0, "robust_acc": 93.0, "n": int(len(y)), "flags": [flag], "version": "standard",
                "norm": k.get("norm"), "eps": k.get("eps"), "backend": "stub", "backend_version": "0"}
    monkeypatch.setattr(aa, "run_autoattack", fake_aa)
    monkeypatch.setattr(sanity, "_square", lambda *a, **k: 0.0)
    rc, out, err = _main(capsys, ["eval", "--checkpoint", runs["pgdat"], "--n", "16", "--sanity",
                                  "--json", tmp_path / "r.json"])
    assert rc == 5, err
    assert "| check | result | verdict | reason |" in out and "AutoAttack's own flags" in out and flag in out
    assert "gradient-masking sanity check(s) failed: " in err and "autoattack_flags" in err
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["sanity"]["passed"] is False and "autoattack_flags" in saved["sanity"]["failed"]


# ----------------------------------------------------------------------------- GradScaler

def test_grad_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    import rb_labelrefine.fast as fast

    cfg = load_config("digits-pgdat", TINY + ["train.amp=fp16"])
    scaler = fast.make_grad_scaler(torch.device("cpu"), "fp16")
    if scaler is None:
        pytest.skip("this torch has no CPU GradScaler")
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t._setup()
    assert t._fast.scaler is not None and t._fast.scaler.is_enabled()
    t.global_step, t.history = 0, []
    t._fast.scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    t._fast.scaler.update(new_scale=1234.0)
    state = t.state_dict(0, 0)
    assert state["scaler"]["scale"] == 1234.0
    u = Trainer(cfg, tmp_path / "run", progress=False)
    u._setup()
    assert u._fast.scaler.get_scale() != 1234.0
    u.load_state_dict(state)
    assert u._fast.scaler.get_scale() == 1234.0
    assert u._fast.scaler.state_dict() == t._fast.scaler.state_dict()


def test_readme_lists_every_exit_code():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = {int(m) for m in re.findall(r"^\| (\d+) \| ", readme, flags=re.M)}
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")} | {130}
    assert documented == codes


def test_fp16_run_interrupted_mid_epoch_resumes_with_its_grad_scaler(tmp_path, monkeypatch):
    """fp16 autocast runs on this CPU: the GradScaler's growth tracker (steps since the last
    overflow) continues across a resume instead of restarting at 0."""
    from rb_labelrefine.fast import make_grad_scaler

    cfg = load_config("digits-pgdat", TINY + ["train.amp=fp16"])
    if make_grad_scaler(torch.device("cpu"), "fp16") is None:
        pytest.skip("this torch has no CPU GradScaler")
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    orig = Trainer.train_step

    def stop_at_5(self, *a, **k):
        out = orig(self, *a, **k)
        if self.global_step == 5 and not self.resume:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(Trainer, "train_step", stop_at_5)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert safe_torch_load(tmp_path / "run" / RUN_FILES["checkpoint"])["scaler"]["_growth_tracker"] == 5
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    a, b = (safe_torch_load(tmp_path / d / RUN_FILES["checkpoint"]) for d in ("run", "ref"))
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == a["global_step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    mode = 0o666 & ~rio._UMASK  # weights get the mode of every other run file, not mkstemp's 0600
    assert all((tmp_path / "run" / RUN_FILES[w]).stat().st_mode & 0o777 == mode for w in ("best", "final", "history"))
