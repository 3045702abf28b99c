"""Reliability: training survives interruption and bad input; checkpoints are safe to load.

* ``kill -9`` of a training process at seeded moments (setup, mid-epoch, during the writes of the
  best weights / history / checkpoint / final weights), then ``--resume`` until done: the final and
  best weights, the history and the checkpoint equal those of an uninterrupted run bit for bit, and
  every checkpoint that ever appeared on disk loads.
* SIGTERM / SIGINT: exit code 3, a message saying how to resume, a resumable checkpoint; resuming
  ends bit-identical.  Mid-epoch interruptions of every method (ADR, SGLR, KD+SWA, LTD, TRADES,
  AWP, WA, augmentation) resume bit-identically too.
* Pickled payloads given as a checkpoint, a teacher or weights are refused (exit code 2) and never run.
* Bad config values, bad data, mismatched teachers/configs/run directories and a diverging loss
  are each rejected with their own message, and no existing output file changes.
* Atomic writes: a failure between writing and renaming leaves the previous file and no temporary.

The ``kill -9`` sweep runs the real CLI (``cli.main(argv)``) in processes forked from a server that
has already imported torch, so each start costs milliseconds instead of ~8 s of imports; one test
runs ``python -m rb_labelrefine train`` itself.  Set ``RBLR_RELIABILITY_REPORT=path.json`` to dump the
measured figures (kill points and phases, resume times, checkpoint size, messages).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from _compare import same_state
from _extras import need

need("sklearn", "matplotlib", "torchattacks")

from rb_labelrefine import cli
from rb_labelrefine.config import load_config
from rb_labelrefine.data import IndexedDataset, TensorImageDataset, load_digits_data, load_synthetic
from rb_labelrefine.runs import RUN_FILES, build_model_for, load_run_model, read_weights, write_weights
from rb_labelrefine.training import io as rio
from rb_labelrefine.training.io import UnsafeCheckpointError, atomic_torch_save, safe_torch_load
from rb_labelrefine.training.trainer import NonFiniteLossError, ResumeError, Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
FIGURES: dict = {"messages": {}}

# The config of the kill/signal tests: ADR + WA (EMA evaluated) + AWP on a BatchNorm CNN, 8 steps
# per epoch, 3 epochs, an lr decay -- every piece of state a resume has to restore.
PRESET = "digits-adr-wa"
SETS = ["model.arch=tiny_cnn", "data.train_subset=256", "data.batch_size=32", "attack.steps=2", "awp.enabled=true",
        "train.epochs=3", "train.device=cpu", "train.deterministic=true", "train.threads=1",
        "eval.val_attack_steps=2", "eval.test_attack_steps=2", "eval.curve_test_size=64"]
# Smaller still, for the per-method in-process runs and the bad-input tests (6 steps per epoch).
TINY = ["model.arch=mlp", "data.train_subset=192", "data.batch_size=32", "attack.steps=2", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=2", "eval.curve_test_size=64"]


def _argv(out, preset=PRESET, sets=SETS, resume=False):
    argv = ["train", "--config", str(preset), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--resume"] if resume else [])


# ----------------------------------------------------------------------------- process harness

_SERVER = r"""
import json, os, signal, sys, time, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot                      # the trainer plots curves
import sklearn.datasets                       # digits
import torch, torch._inductor.config          # what use_deterministic_algorithms imports
import torchattacks
from rb_labelrefine import cli
import rb_labelrefine.training.trainer
out = sys.stdout
out.write("READY\n"); out.flush()
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:                          # the child: the real CLI, its real exit code
            code = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                slow = req.get("slow")
                if slow:                      # widen the window between a write and its rename
                    real = os.replace
                    def _slow_replace(src, dst, *a, **k):
                        if os.path.basename(str(dst)) in slow["names"]:
                            time.sleep(slow["delay"])
                        return real(src, dst, *a, **k)
                    os.replace = _slow_replace
                code = cli.main(req["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush(); sys.stderr.flush()
                finally:
                    os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n"); out.flush()
    elif req["op"] == "poll":
        try:
            pid, status = os.waitpid(req["pid"], 0 if req.get("block") else os.WNOHANG)
            rc = None if pid == 0 else os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            rc = "gone"
        out.write(json.dumps({"rc": rc}) + "\n"); out.flush()
"""


class ForkServer:
    """Starts CLI runs as real processes (fork of an interpreter that has imported everything)."""

    def __init__(self, prestart=None, env=None):
        """``prestart=(argv, log)``: queued at once, run as soon as the server has imported."""
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=str(REPO), env=env)
        self.ready = False
        self.live = set()
        self.prestart_pid = None
        self._prestart = prestart is not None
        if prestart is not None:
            self.proc.stdin.write(json.dumps({"op": "run", "argv": [str(a) for a in prestart[0]],
                                              "log": str(prestart[1])}) + "\n")
            self.proc.stdin.flush()

    def ensure_ready(self):
        if not self.ready:
            line = self.proc.stdout.readline()
            assert line.strip() == "READY", f"fork server failed to start: {line!r}"
            self.ready = True
            if self._prestart:
                self.prestart_pid = json.loads(self.proc.stdout.readline())["pid"]
                self.live.add(self.prestart_pid)

    def _rpc(self, req):
        self.ensure_ready()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        return json.loads(line)

    def start(self, argv, log, slow=None) -> int:
        pid = self._rpc({"op": "run", "argv": [str(a) for a in argv], "log": str(log), "slow": slow})["pid"]
        self.live.add(pid)
        return pid

    def poll(self, pid):
        rc = self._rpc({"op": "poll", "pid": pid})["rc"]
        if rc is not None:
            self.live.discard(pid)
        return rc

    def wait(self, pid, timeout=240.0):
        end = time.time() + timeout
        while time.time() < end:
            rc = self.poll(pid)
            if rc is not None:
                return rc
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        self.poll(pid)
        pytest.fail(f"child {pid} did not finish within {timeout}s")

    def run(self, argv, log, timeout=240.0):
        t0 = time.time()
        rc = self.wait(self.start(argv, log), timeout)
        return rc, time.time() - t0, Path(log).read_text()

    def close(self):
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self._rpc({"op": "poll", "pid": pid, "block": True})
        self.proc.kill()  # nothing to flush: skip the interpreter's (slow, torch-laden) shutdown
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()


@pytest.fixture(scope="module", autouse=True)
def forkserver(tmp_path_factory):
    """Started first (autouse) so its imports overlap with the in-process tests; its first child
    is the uninterrupted reference run (see ``reference``)."""
    ref = tmp_path_factory.mktemp("ref")
    server = ForkServer(prestart=(_argv(ref / "run"), ref / "run.log"), env=_with_rng_consumer(ref / "inject"))
    server.ref_dir = ref / "run"
    yield server
    server.close()


_IMPORT_TIME_RNG_CONSUMER = r"""
import importlib.abc, random, sys

class _DrawOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        random.random()
        draw = getattr(sys.modules.get("numpy.random"), "__dict__", {}).get("random")
        if callable(draw):             # numpy.random fully imported: draw from its global generator
            try:
                draw()
            except Exception:
                pass
        return None

sys.meta_path.insert(0, _DrawOnImport())
"""


def _with_rng_consumer(directory: Path) -> dict:
    """An environment whose Python runs ``_IMPORT_TIME_RNG_CONSUMER`` (a ``sitecustomize``)."""
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(_IMPORT_TIME_RNG_CONSUMER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module", autouse=True)
def python_m_sigterm(tmp_path_factory):
    """``python -m rb_labelrefine train`` started at once in the background (its ~10 s of imports
    overlap with the other tests); a thread sends SIGTERM early in epoch 2.  Checked by
    test_sigterm_to_python_m_training_exits_3_and_resumes_bit_exact."""
    d = tmp_path_factory.mktemp("python_m")
    run, err = d / "run", d / "stderr.txt"
    state = {"run": run, "err": err}
    # Every module this process imports draws from Python's and numpy's global generators, as
    # `import rich` does (issue 26): the run must still equal the reference (a fork of a process
    # that imported everything before it was seeded).
    env = _with_rng_consumer(d / "inject")
    t0 = time.time()
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "rb_labelrefine", *_argv(run)], stdout=subprocess.DEVNULL,
                                stderr=f, cwd=str(d), env=env)
    state["proc"] = proc

    def until(cond, timeout=300.0):
        end = time.time() + timeout
        while time.time() < end and proc.poll() is None:
            if cond():
                return True
            time.sleep(0.01)
        return False

    def watch():
        if until(lambda: (run / "config.yaml").exists()):
            state["start_to_config_s"] = round(time.time() - t0, 2)
        if until(lambda: _history_len(run) >= 1):
            time.sleep(random.Random(7).uniform(0.0, 0.4) * _epoch1_seconds(run))
            proc.send_signal(signal.SIGTERM)
            state["signal_sent_after_s"] = round(time.time() - t0, 2)

    state["thread"] = threading.Thread(target=watch, daemon=True)
    state["thread"].start()
    yield state
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _no_plots():
    """Curves are drawn at every interruption and at the end (~0.3 s each) and change no result:
    not in this process (the CLI children still draw them)."""
    import rb_labelrefine.plots as plots

    with pytest.MonkeyPatch.context() as m:
        m.setattr(plots, "plot_curves", lambda *a, **k: None)
        yield


@pytest.fixture(scope="module", autouse=True)
def _torch_globals():
    """The trainer sets threads and deterministic mode process-wide; give them back afterwards."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    path = os.environ.get("RBLR_RELIABILITY_REPORT")
    if path:
        Path(path).write_text(json.dumps(FIGURES, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- comparisons

def _hash_dir(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir()) if p.is_file()}


def _read(path: Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


def _temps(d: Path) -> list:
    return sorted(p.name for p in Path(d).glob(".*.tmp"))


def _split_safetensors(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _assert_same_weights(a: Path, b: Path):
    """Bit for bit: the same tensor bytes and the same header (dtypes, shapes, offsets, metadata).
    The files themselves are not byte-identical across processes: safetensors writes the metadata
    map in a per-process random order, so the header is compared parsed."""
    ha, da = _split_safetensors(a)
    hb, db = _split_safetensors(b)
    assert ha == hb, f"{a.name}: headers differ"
    assert da == db, f"{a.name}: tensor bytes differ"
    sa, _ = read_weights(a)
    sb, _ = read_weights(b)
    assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _no_times(history):
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in history]


def _assert_same_run(run: Path, ref: Path):
    for which in ("final", "best"):
        _assert_same_weights(run / RUN_FILES[which], ref / RUN_FILES[which])
    h = _no_times(json.loads((run / RUN_FILES["history"]).read_text()))
    assert h == _no_times(json.loads((ref / RUN_FILES["history"]).read_text()))
    a, b = safe_torch_load(run / RUN_FILES["checkpoint"]), safe_torch_load(ref / RUN_FILES["checkpoint"])
    for key in a:
        if key == "history":
            assert _no_times(json.loads(a[key])) == _no_times(json.loads(b[key]))
        elif key == "epoch_acc":
            same_state({k: v for k, v in a[key].items() if k != "time"}, {k: v for k, v in b[key].items() if k != "time"})
        else:
            same_state(a[key], b[key], key)
    sa, sb = (json.loads((d / RUN_FILES["summary"]).read_text()) for d in (run, ref))
    for key in ("best_epoch", "best", "final", "eval_model", "effective_decays"):
        assert sa[key] == sb[key], key


def _checkpoint_ok(path: Path) -> tuple:
    """Loads with weights_only=True and holds a complete training state."""
    state = safe_torch_load(path)
    assert state["format"] == 1
    for key in ("model", "optimizer", "rectifier", "rng", "best", "history", "epoch", "batch", "global_step"):
        assert key in state, key
    return int(state["epoch"]), int(state["batch"])


def _ckpt_pos(run: Path):
    p = run / RUN_FILES["checkpoint"]
    return _checkpoint_ok(p) if p.exists() else None


def _history_len(run):
    try:
        return len(json.loads((run / RUN_FILES["history"]).read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _epoch1_seconds(run):
    """Epoch 1's training time in ``run`` (history written): signals sent a fraction of it after
    epoch 1 ends land in epoch 2, however fast or loaded the machine is."""
    try:
        return float(json.loads((run / RUN_FILES["history"]).read_text())[0]["train_time_s"])
    except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):
        return 0.0


@pytest.fixture(scope="module")
def reference(forkserver):
    """The uninterrupted run every interrupted one must reproduce (the fork server's first child)."""
    forkserver.ensure_ready()
    out = forkserver.ref_dir
    rc = forkserver.wait(forkserver.prestart_pid)
    assert rc == 0, _read(out.parent / "run.log")
    FIGURES["reference_train_seconds"] = json.loads((out / RUN_FILES["summary"]).read_text())["train_seconds"]
    FIGURES["checkpoint_bytes"] = (out / RUN_FILES["checkpoint"]).stat().st_size
    FIGURES["weights_bytes"] = (out / RUN_FILES["final"]).stat().st_size
    return out


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished tiny run (mlp on digits, in-process); tests copy it before touching it."""
    out = tmp_path_factory.mktemp("good") / "run"
    Trainer(load_config("digits-pgdat", TINY), out, progress=False).fit()
    return out


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory):
    """A frozen teacher (random init) for mlp and tiny_cnn students on digits."""
    root = tmp_path_factory.mktemp("teachers")
    _, _, info = load_digits_data()
    paths = {}
    for arch in ("mlp", "tiny_cnn"):
        torch.manual_seed(1)
        paths[arch] = root / f"{arch}.pt"
        torch.save(build_model_for(load_config("digits-pgdat", [f"model.arch={arch}"]), info).state_dict(), paths[arch])
    return paths


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("config, sets, field, text", [
    ("digits-pgdat", ["attack.eps=-0.1"], "attack.eps", "must be > 0, got -0.1"),
    ("digits-pgdat", ["attack.eps=lots"], "attack.eps", "expected a number, got 'lots'"),
    ("digits-adr", ["method.lambda_low=1.5"], "method.lambda_low", "must be in [0, 1], got 1.5"),
    ("digits-adr", ["method.lambda_high=-0.2"], "method.lambda_high", "must be in [0, 1], got -0.2"),
    ("digits-pgdat", ["method.name=magic"], "method.name", "unknown method 'magic'"),
    ("digits-pgdat", ["train.epochz=3"], "train.epochz", "unknown field"),
    ("digits-pgdat", ["optim.lr=0"], "optim.lr", "must be > 0"),
    ("/nonexistent/run.yaml", [], "--config", "file not found: /nonexistent/run.yaml"),
    ("no-such-preset", [], "--config", "unknown preset 'no-such-preset'"),
    ("digits-ltd", [], "method.teacher", "LTD needs a naturally trained teacher"),
    ("digits-ltd", ["method.teacher=/nonexistent/t.pt"], "method.teacher", "file not found: /nonexistent/t.pt"),
])
def test_bad_config_exits_2_naming_the_field_and_touches_nothing(capsys, good_run, config, sets, field, text):
    before = _hash_dir(good_run)
    for resume in (False, True):
        rc, err = _main(capsys, _argv(good_run, config, TINY + sets, resume=resume))
        assert rc == 2, err
        assert f"rb-labelrefine: error: config field '{field}': " in err and text in err, err
    FIGURES["messages"][f"config {' '.join(sets) or config}"] = err.strip()
    assert _hash_dir(good_run) == before


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A run on an in-memory data set, stopped with a checkpoint after epoch 1 of 2."""
    tr, te, info = load_synthetic(n_train=160, n_test=64, num_classes=4, channels=1, image_size=8)
    cfg = load_config("digits-pgdat", TINY + ["data.name=synthetic"])
    out = tmp_path_factory.mktemp("syn") / "run"
    orig = Trainer._end_of_epoch

    def stop_after_first_epoch(self, epoch):
        orig(self, epoch)
        if epoch == 0:
            self.stop.request(signal.SIGTERM)
    Trainer._end_of_epoch = stop_after_first_epoch
    try:
        with pytest.raises(TrainingInterrupted):
            Trainer(cfg, out, progress=False, datasets=_splits(tr.x, tr.y, te.x, te.y, info)).fit()
    finally:
        Trainer._end_of_epoch = orig
    assert _checkpoint_ok(out / RUN_FILES["checkpoint"]) == (1, 0)
    return cfg, out, (tr, te, info)


def _splits(x, y, tx, ty, info, vx=None, vy=None):
    n = len(x) // 5
    vx = x[:n] if vx is None else vx
    vy = y[:n] if vy is None else vy
    ds = lambda a, b: IndexedDataset(TensorImageDataset(a, b))  # noqa: E731
    return ds(x[n:], y[n:]), ds(vx, vy), ds(tx, ty), info


def _corrupt(case, tr, te, info):
    x, y, tx, ty = tr.x.clone(), tr.y.clone(), te.x.clone(), te.y.clone()
    n = len(x) // 5
    vx, vy = x[:n].clone(), y[:n].clone()
    if case == "label >= num_classes deep in the data":
        y[n + 100] = 4
    elif case == "negative label in the first batch":
        y[n] = -1
    elif case == "NaN pixel":
        x[n + 90, 0, 3, 3] = float("nan")
    elif case == "Inf pixel":
        x[n + 20, 0, 0, 0] = float("inf")
    elif case == "0-255 pixels":
        x[n + 70] *= 255
    elif case == "validation label":
        vy[5] = 9
    elif case == "test NaN":
        tx[3] = float("nan")
    elif case == "shape mismatch":
        x = torch.rand(len(x), 3, 16, 16)
        vx = x[:n]
    return _splits(x, y, tx, ty, info, vx, vy)


@pytest.mark.parametrize("case, text", [
    ("label >= num_classes deep in the data",
     r"training data \(epoch 2, batch \d+\): labels must be in \[0, 4\), got values in \[0, 4\] "
     r"\(dataset indices \[100\]\)"),
    ("negative label in the first batch",
     r"training data \(first samples\): labels must be in \[0, 4\), got values in \[-1, \d\] "
     r"\(dataset indices \[0\]\)"),
    ("NaN pixel", r"training data \(epoch 2, batch \d+\): inputs contain NaN \(1 values\) \(dataset indices \[90\]\)"),
    ("Inf pixel", r"training data \(epoch 2, batch \d+\): inputs contain Inf \(1 values\) \(dataset indices \[20\]\)"),
    ("0-255 pixels", r"training data \(epoch 2, batch \d+\): inputs must be pixels in \[0, 1\], got values in .*"
                     r"\(dataset indices \[70\]\)"),
    ("validation label", r"validation data \(batch 1\): labels must be in \[0, 4\), got values in \[\d, 9\] "
                         r"\(dataset indices \[5\]\)"),
    ("test NaN", r"test data \(batch 1\): inputs contain NaN \(64 values\) \(dataset indices \[3\]\)"),
    ("shape mismatch", r"config field 'model.arch': mlp cannot take the data's inputs of shape \(3, 16, 16\)"),
])
def test_bad_data_is_rejected_with_its_own_message_and_nothing_changes(tmp_path, synthetic_run, case, text):
    cfg, src, (tr, te, info) = synthetic_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = _hash_dir(run)
    with pytest.raises(ValueError, match=text) as exc:  # ConfigError is a ValueError: both exit 2 in the CLI
        Trainer(cfg, run, resume=True, progress=False, datasets=_corrupt(case, tr, te, info)).fit()
    FIGURES["messages"][f"data: {case}"] = str(exc.value)
    assert _hash_dir(run) == before
    assert _checkpoint_ok(run / RUN_FILES["checkpoint"]) == (1, 0)


def test_bad_data_through_the_cli_exits_2(capsys, monkeypatch, tmp_path, synthetic_run):
    import rb_labelrefine.data as data

    _, _, (tr, te, info) = synthetic_run
    monkeypatch.setattr(data, "build_datasets",
                        lambda *a, **k: _corrupt("label >= num_classes deep in the data", tr, te, info))
    rc, err = _main(capsys, _argv(tmp_path / "out", "digits-pgdat", TINY + ["data.name=synthetic"]))
    assert rc == 2 and "rb-labelrefine: error: training data (epoch 1, batch" in err and "labels must be in" in err, err


def test_teacher_of_another_architecture_names_the_field(capsys, tmp_path, teacher_pt, good_run):
    _, _, info = load_digits_data()
    torch.manual_seed(0)
    wide = build_model_for(load_config("digits-pgdat", ["model.arch=mlp", "model.kwargs={hidden: 32}"]), info)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    write_weights(wide, tmp_path / "wide.safetensors")
    cases = {"tiny_cnn .pt": teacher_pt["tiny_cnn"], "mlp(hidden=32) .pt": tmp_path / "wide.pt",
             "mlp(hidden=32) .safetensors": tmp_path / "wide.safetensors"}
    for name, teacher in cases.items():
        rc, err = _main(capsys, _argv(tmp_path / "out", "digits-ltd", TINY + [f"method.teacher={teacher}"]))
        assert rc == 2, err
        assert "config field 'method.teacher': teacher" in err
        assert "does not match the student's architecture mlp" in err
        assert "size mismatch for" in err or "Missing key(s) in state_dict" in err, err
        FIGURES["messages"][f"teacher {name}"] = err.strip()
    # a tiny_cnn run directory as the robust teacher of an mlp student
    rc, err = _main(capsys, _argv(tmp_path / "out", "digits-kd-swa", TINY + ["model.arch=tiny_cnn",
                                                                           f"method.robust_teacher={good_run}"]))
    assert rc == 2 and "config field 'method.robust_teacher': teacher" in err and "tiny_cnn" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_resume_with_another_config_names_the_differing_fields(capsys, good_run):
    before = _hash_dir(good_run)
    rc, err = _main(capsys, _argv(good_run, "digits-pgdat", TINY + ["attack.steps=3", "optim.lr=0.01"], resume=True))
    assert rc == 2
    assert "was trained with a different config (attack.steps: 2 -> 3, optim.lr: 0.05 -> 0.01)" in err, err
    FIGURES["messages"]["resume with another config"] = err.strip()
    with pytest.raises(ResumeError, match=r"method.name: 'onehot' -> 'adr'"):
        Trainer(load_config("digits-adr", TINY), good_run, resume=True, progress=False).fit()
    assert _hash_dir(good_run) == before


def test_new_run_into_a_run_directory_is_refused(capsys, good_run, tmp_path):
    before = _hash_dir(good_run)
    rc, err = _main(capsys, _argv(good_run, "digits-pgdat", TINY))
    assert rc == 2 and "already holds a run; pass --resume to continue it" in err and "nothing was overwritten" in err
    FIGURES["messages"]["new run into a run directory"] = err.strip()
    assert _hash_dir(good_run) == before
    rc, err = _main(capsys, _argv(tmp_path / "nothing", "digits-pgdat", TINY, resume=True))
    assert rc == 2 and "--resume: no checkpoint at" in err
    FIGURES["messages"]["--resume of an empty directory"] = err.strip()


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, good_run):
    """kill -9 before the first checkpoint leaves only config.yaml: a requeued --resume starts from
    the beginning (same config only) instead of failing forever."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(good_run / "config.yaml", run / "config.yaml")
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"torn")  # a write cut short
    logs = []
    Trainer(load_config("digits-pgdat", TINY), run, resume=True, progress=False, log=logs.append).fit()
    assert any("starting from the beginning" in m for m in logs)
    assert _temps(run) == []
    _assert_same_run(run, good_run)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(good_run / "config.yaml", other / "config.yaml")
    with pytest.raises(ResumeError, match="different config"):
        Trainer(load_config("digits-pgdat", TINY + ["attack.steps=3"]), other, resume=True, progress=False).fit()


def test_non_finite_loss_exits_1_with_a_loadable_last_good_checkpoint(capsys, tmp_path):
    out = tmp_path / "run"
    argv = _argv(out, "digits-pgdat", TINY + ["optim.lr=1e30"])
    rc, err = _main(capsys, argv)
    assert rc == 1, err
    assert "rb-labelrefine: error: non-finite training loss (nan) at epoch 1, step 2; the last good state " \
           "(before this step) is in" in err, err
    FIGURES["messages"]["non-finite loss (optim.lr=1e30)"] = err.strip()
    state = safe_torch_load(out / RUN_FILES["checkpoint"])
    assert (state["epoch"], state["batch"], state["global_step"]) == (0, 1, 1)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "failed: non-finite training loss (nan) at epoch 1, step 2" in (out / RUN_FILES["log"]).read_text()
    # it is exactly the state before the failed step: resuming it fails at the same step, the same way
    rc2, err2 = _main(capsys, argv + ["--resume"])
    assert rc2 == 1 and err2.splitlines()[-1] == err.splitlines()[-1], (err, err2)


@pytest.mark.parametrize("then", ["next step", "SIGTERM checkpoint"])
def test_a_diverged_state_never_replaces_a_good_checkpoint(tmp_path, monkeypatch, synthetic_run, then):
    """Weights that overflowed in an update while the loss was still finite are never
    checkpointed -- neither when the next loss turns NaN nor by a signal's checkpoint: the good
    checkpoint of epoch 1 stays, and the message points to it (exit code 1 in the CLI)."""
    cfg, src, (tr, te, info) = synthetic_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = _hash_dir(run)
    orig = Trainer.train_step

    def overflow(self, *a, **k):
        out = orig(self, *a, **k)
        if self.global_step == 6:  # second step of epoch 2
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
            if then == "SIGTERM checkpoint":
                os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(Trainer, "train_step", overflow)
    prefix = (r"non-finite training loss \(nan\) at epoch 2, step 7; " if then == "next step"
              else r"at epoch 2, step 6: ")
    with pytest.raises(NonFiniteLossError, match=prefix + r"the model( and \w+)* state is no longer finite, so it was "
                                                 r"not checkpointed; the last good state is the existing checkpoint "
                                                 r".*checkpoint.pt \(epoch 1, batch 0, step 4\)") as exc:
        Trainer(cfg, run, resume=True, progress=False, datasets=_splits(tr.x, tr.y, te.x, te.y, info)).fit()
    FIGURES["messages"][f"diverged weights ({then})"] = str(exc.value)
    assert _hash_dir(run) == before


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_writes_keep_the_old_file_and_leave_no_temporary(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": torch.tensor(1)}, ckpt)
    w = tmp_path / "final.safetensors"
    write_weights(torch.nn.Linear(2, 2), w)
    before = _hash_dir(tmp_path)

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:               # the rename fails
        m.setattr(rio.os, "replace", fail_replace)
        with pytest.raises(OSError, match="No space left"):
            atomic_torch_save({"step": torch.tensor(2)}, ckpt)
        with pytest.raises(OSError, match="No space left"):
            write_weights(torch.nn.Linear(2, 2), w)
    real_write = Path.write_bytes
    for exc in (RuntimeError("writer crashed"), KeyboardInterrupt()):  # the writer dies half-way
        def torn_write(self, data, _exc=exc):
            real_write(self, data[:10])
            raise _exc
        with monkeypatch.context() as m:
            m.setattr(Path, "write_bytes", torn_write)
            with pytest.raises(type(exc)):
                write_weights(torch.nn.Linear(2, 2), w)
            with pytest.raises(type(exc)):
                atomic_torch_save({"step": torch.tensor(3)}, ckpt)
    assert _hash_dir(tmp_path) == before and _temps(tmp_path) == []
    assert int(safe_torch_load(ckpt)["step"]) == 1
    # written files get the mode a plain open() would give them, not mkstemp's 0600
    assert (ckpt.stat().st_mode & 0o777) == (0o666 & ~rio._UMASK)
    (tmp_path / ".checkpoint.pt.x1.tmp").write_bytes(b"")
    (tmp_path / ".unrelated.tmp").write_bytes(b"")
    assert [p.name for p in rio.remove_stale_temps(tmp_path, RUN_FILES.values())] == [".checkpoint.pt.x1.tmp"]
    assert (tmp_path / ".unrelated.tmp").exists()


# ----------------------------------------------------------------------------- pickled payloads

class _Payload:
    """Unpickling this object creates ``marker`` (pickling it does not)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


@pytest.fixture
def evil(tmp_path, good_run):
    marker = tmp_path / "PAYLOAD_RAN"
    d = tmp_path / "evil"
    d.mkdir()
    files = {"plain.pt": d / "plain.pt", "zip.pt": d / "zip.pt", "fake.safetensors": d / "fake.safetensors"}
    with open(files["plain.pt"], "wb") as f:                   # a bare pickle (torch's legacy format path)
        pickle.dump({"model": _Payload(marker)}, f, protocol=2)
    torch.save({"format": 1, "model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, files["zip.pt"])  # torch zip
    files["fake.safetensors"].write_bytes(files["plain.pt"].read_bytes())
    run = tmp_path / "evil_run"                                 # a real run directory, every file swapped
    shutil.copytree(good_run, run)
    for name in ("checkpoint", "best", "final"):
        (run / RUN_FILES[name]).write_bytes(files["zip.pt"].read_bytes())
    assert not marker.exists()
    return {"marker": marker, "run": run, **files}


def _main(capsys, argv) -> tuple:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err


def test_library_loaders_refuse_pickled_payloads(evil):
    for name in ("plain.pt", "zip.pt"):
        with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .* arbitrary code \(weights-only load "
                                                        r"said: Unsupported global: GLOBAL exec was not an allowed"):
            safe_torch_load(evil[name])
    for name in ("plain.pt", "zip.pt", "fake.safetensors"):
        with pytest.raises(ValueError, match="is not a valid safetensors file"):
            read_weights(evil[name])
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        load_run_model(evil["run"], "best")
    assert not evil["marker"].exists()


@pytest.mark.parametrize("preset, field", [("digits-ltd", "method.teacher"), ("digits-kd-swa", "method.robust_teacher"),
                                           ("digits-kd-swa", "method.standard_teacher")])
@pytest.mark.parametrize("file", ["plain.pt", "zip.pt", "fake.safetensors", "run"])
def test_cli_pickled_teacher_is_refused_exit_2(capsys, evil, tmp_path, preset, field, file):
    out = tmp_path / "out"
    rc, err = _main(capsys, _argv(out, preset, TINY + [f"{field}={evil[file]}"]))
    assert rc == 2, err
    assert f"config field '{field}'" in err
    assert ("refusing to load" in err) if file.endswith(".pt") else ("is not a valid safetensors file" in err)
    FIGURES["messages"][f"pickled teacher ({file})"] = err.strip()
    assert not evil["marker"].exists()
    assert not out.exists() or not any(out.iterdir())


def test_export_loaders_refuse_pickled_payloads(capsys, evil, tmp_path):
    export = pytest.importorskip("rb_labelrefine.export")
    for fn, arg in ((getattr(export, "read_pt_state_dict", None), evil["zip.pt"]),
                    (getattr(export, "read_pt_state_dict", None), evil["plain.pt"]),
                    (getattr(export, "load_exported", None), evil["fake.safetensors"])):
        if fn is not None:
            with pytest.raises(ValueError):
                fn(arg)
    with pytest.raises(ValueError):
        export.export_run(evil["run"], tmp_path / "export")
    rc, err = _main(capsys, ["export", "--checkpoint", evil["run"], "--out", tmp_path / "export2"])
    assert rc == 2 and "is not a valid safetensors file" in err, err
    rc, err = _main(capsys, ["eval", "--checkpoint", evil["run"], "--n", "8"])
    assert rc == 2 and "is not a valid safetensors file" in err, err
    assert not evil["marker"].exists()


# ----------------------------------------------------------------------------- mid-epoch, every method

@pytest.fixture
def stop_after_steps(monkeypatch):
    """``stop_after_steps([5, 9])``: SIGTERM this process right after those global steps."""
    pending = []
    orig = Trainer.train_step

    def train_step(self, *a, **k):
        out = orig(self, *a, **k)
        if pending and self.global_step == pending[0]:
            pending.pop(0)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)

    def arm(steps):
        pending[:] = sorted(steps)
    return arm


def _fit_until_done(cfg, out, datasets=None) -> list:
    """fit(); on TrainingInterrupted resume, until done.  Returns the (epoch, batch) of each stop."""
    stops, resume = [], False
    while True:
        try:
            Trainer(cfg, out, resume=resume, progress=False, datasets=datasets).fit()
            return stops
        except TrainingInterrupted:
            stops.append(_checkpoint_ok(out / RUN_FILES["checkpoint"]))
            resume = True


@pytest.mark.parametrize("preset, extra", [
    ("digits-pgdat", ["data.augment=true"]),                         # augmentation draws from the global RNG
    ("digits-sglr", []),                                             # per-sample label memory
    ("digits-trades-adr", ["awp.enabled=true"]),                     # ADR's own EMA teacher, TRADES, AWP
    ("digits-kd-swa", ["model.arch=tiny_cnn", "swa.start_epoch=1"]),  # teachers, SWA + BatchNorm update
    ("digits-ltd", []),                                              # natural teacher, TRADES
])
def test_mid_epoch_interruptions_resume_bit_exact_for_every_method(tmp_path, stop_after_steps, teacher_pt, preset,
                                                                   extra):
    arch = next((e.split("=")[1] for e in extra if e.startswith("model.arch=")), "mlp")
    teach = {"digits-kd-swa": [f"method.robust_teacher={teacher_pt[arch]}",
                               f"method.standard_teacher={teacher_pt[arch]}"],
             "digits-ltd": [f"method.teacher={teacher_pt[arch]}"]}.get(preset, [])
    cfg = load_config(preset, TINY + extra + teach)
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    steps_per_epoch, total = 6, 6 * cfg.train.epochs
    rng = random.Random(preset)
    fixed = steps_per_epoch * 2 - 1  # mid-epoch 2 (the 5th of 6 batches), besides two seeded points
    stops = sorted(rng.sample([s for s in range(1, total) if s != fixed], 2) + [fixed])
    stop_after_steps(stops)
    where = _fit_until_done(cfg, tmp_path / "run")
    assert len(where) == 3 and any(batch > 0 for _, batch in where), where
    _assert_same_run(tmp_path / "run", tmp_path / "ref")


@pytest.mark.parametrize("during", ["final weights", "autoattack"])
def test_signal_after_the_last_step_stops_with_exit_3_and_resume_redoes_only_the_final_stage(
        tmp_path, good_run, monkeypatch, during):
    """SIGTERM while the final weights are written (or AutoAttack runs) after the last training
    step: the run stops at the next safe point as interrupted (not "done" with a half-finished
    summary), says so, and ``--resume`` skips training and finishes the final stage only."""
    import rb_labelrefine.training.rundir as tr   # the run directory's writers

    sets = TINY + (["eval.autoattack=true", "eval.autoattack_n=8"] if during == "autoattack" else [])
    cfg = load_config("digits-pgdat", sets)
    run = tmp_path / "run"
    fired = []

    if during == "final weights":
        orig = tr.write_weights

        def hook(model, path, meta):
            out = orig(model, path, meta)
            if Path(path).name == RUN_FILES["final"] and not fired:
                fired.append(path)
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        monkeypatch.setattr(tr, "write_weights", hook)
    else:
        import rb_labelrefine.evaluation.autoattack as aa

        def hook(model, x, y, **k):  # AutoAttack itself is tested elsewhere: a stand-in, for speed
            if not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
            return {"clean_acc": 50.0, "robust_acc": 25.0, "n": int(y.shape[0]), "elapsed_s": 0.0}
        monkeypatch.setattr(aa, "run_autoattack", hook)
    lines = []
    with pytest.raises(TrainingInterrupted, match="after training finished") as exc:
        Trainer(cfg, run, progress=False, log=lines.append).fit()
    assert fired and "Resume with: rb-labelrefine train" in str(exc.value)
    assert any("after the last training step" in ln for ln in lines), lines
    assert not (run / RUN_FILES["summary"]).exists()
    assert _checkpoint_ok(run / RUN_FILES["checkpoint"]) == (cfg.train.epochs, 0)
    before = _no_times(json.loads((run / RUN_FILES["history"]).read_text()))
    summary = Trainer(cfg, run, resume=True, progress=False).fit()
    assert _no_times(json.loads((run / RUN_FILES["history"]).read_text())) == before  # no epoch re-trained
    assert (run / RUN_FILES["summary"]).exists() and summary["best_epoch"] >= 1
    if during == "autoattack":
        assert set(summary["autoattack"]) == {"best", "final"}
    else:
        _assert_same_run(run, good_run)


# ----------------------------------------------------------------------------- kill -9 (real processes)

def _phase(run: Path, epochs: int) -> str:
    temps = _temps(run)
    if temps:
        names = sorted({t[1:].split(".")[0] + "." + t[1:].split(".")[1] for t in temps})
        return "during the write of " + ", ".join(names) + " (before its rename)"
    pos = _ckpt_pos(run)
    hist = len(json.loads((run / RUN_FILES["history"]).read_text())) if (run / RUN_FILES["history"]).exists() else 0
    if pos is None:
        return "before the first checkpoint (setup or epoch 1)"
    if hist > pos[0]:
        return f"end of epoch {hist}: best/history written, checkpoint not yet"
    if pos[0] == epochs:
        return "after the last checkpoint (final weights / summary)"
    return f"epoch {pos[0] + 1}: training or evaluation"


def test_kill9_at_seeded_moments_then_resume_is_bit_exact(forkserver, reference, tmp_path):
    rng = random.Random(20240607)
    run = tmp_path / "run"
    epochs = load_config(PRESET, SETS).train.epochs
    # an epoch's training time in the reference run (this machine, now): delays that land mid-epoch
    epoch_s = min(r["train_time_s"] for r in json.loads((reference / RUN_FILES["history"]).read_text()))
    slow = {"names": ["best.safetensors", "history.json", "checkpoint.pt", "final.safetensors"], "delay": 0.3}
    plan = [("delay", rng.uniform(0.05, 0.6)),                       # from the start: setup / epoch 1
            ("temp", ["best.safetensors", "history.json"]),           # end of an epoch, before its checkpoint
            ("after_checkpoint", rng.uniform(0.0, 0.9) * epoch_s),    # somewhere in the next epoch
            ("temp", ["checkpoint.pt"]),                              # mid checkpoint write
            ("after_checkpoint", rng.uniform(0.0, 0.9) * epoch_s),
            ("temp", ["final.safetensors"])]                          # after the last checkpoint
    kills, resume_s, loads, seen = [], [], 0, set()
    for kind, arg in plan:
        log = tmp_path / f"kill{len(kills)}.log"
        start_pos = _ckpt_pos(run) if run.exists() else None
        # slowed writes also for the fixed "delay": they stretch the run (3 epochs take ~0.5 s on an
        # idle machine) so that the delay lands before the run ends however fast the machine is
        pid = forkserver.start(_argv(run, resume=(run / "config.yaml").exists()), log,
                               slow=slow if kind in ("temp", "delay") else None)
        t0, t_ckpt, resumed_at, rc = time.time(), None, None, None
        while True:
            rc = forkserver.poll(pid)
            if rc is not None:
                break
            now = time.time()
            ck = run / RUN_FILES["checkpoint"]
            if ck.exists():  # every version of the checkpoint that ever appears must load
                st = ck.stat()
                if (st.st_ino, st.st_mtime_ns) not in seen:
                    seen.add((st.st_ino, st.st_mtime_ns))
                    pos = _checkpoint_ok(ck)
                    loads += 1
                    if t_ckpt is None and pos != start_pos:
                        t_ckpt = now
            if resumed_at is None and "resumed from" in _read(log):
                resumed_at = now - t0
            if ((kind == "delay" and now - t0 >= arg)
                    or (kind == "temp" and any(any(run.glob(f".{n}.*.tmp")) for n in arg))
                    or (kind == "after_checkpoint" and t_ckpt is not None and now - t_ckpt >= arg)):
                os.kill(pid, signal.SIGKILL)
                rc = forkserver.wait(pid)
                break
            time.sleep(0.005)
        if resumed_at is not None:
            resume_s.append(round(resumed_at, 3))
        if rc != -signal.SIGKILL:  # the run finished before this moment came
            assert rc == 0, log.read_text()
            kills.append({"target": f"{kind} {arg}", "landed": False})
            break
        phase = _phase(run, epochs)
        pos = _ckpt_pos(run) if run.exists() else None  # never corrupt after a kill
        kills.append({"target": f"{kind} {arg}", "landed": True, "after_s": round(time.time() - t0, 2),
                      "phase": phase, "checkpoint_at": pos, "temps_left": _temps(run) if run.exists() else []})
    else:
        rc = None
    if rc != 0:  # resume until done
        log = tmp_path / "final.log"
        t0 = time.time()
        rc, dt, text = forkserver.run(_argv(run, resume=True), log)
        assert rc == 0, text
        FIGURES["final_resume_to_done_s"] = round(dt, 2)
        m = [ln for ln in text.splitlines() if "resumed from" in ln]
        assert m, text
    landed = [k for k in kills if k["landed"]]
    FIGURES["kill9"] = {"points": kills, "landed": len(landed), "distinct_phases": sorted({k["phase"] for k in landed}),
                        "checkpoint_versions_loaded_while_running": loads,
                        "resume_start_to_training_s": resume_s}
    assert len(landed) >= 5, kills
    assert len({k["phase"] for k in landed}) >= 4, kills
    assert any("checkpoint.pt" in k["phase"] for k in landed), kills
    assert _temps(run) == [], "temporary files of killed writes were not cleaned up"
    _assert_same_run(run, reference)
    FIGURES["kill9"]["bit_exact"] = True


# ----------------------------------------------------------------------------- SIGTERM / SIGINT (real processes)

def _wait_for(cond, timeout=180.0, what=""):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def _resume_command(message: str, run: Path) -> list:
    line = [ln for ln in message.splitlines() if "Resume with: rb-labelrefine " in ln][-1]
    argv = shlex.split(line.split("Resume with: rb-labelrefine ", 1)[1])
    assert argv == ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume"]
    return argv


def test_sigterm_to_python_m_training_exits_3_and_resumes_bit_exact(forkserver, reference, tmp_path,
                                                                     python_m_sigterm):
    """The real entry point, ``python -m rb_labelrefine train``, gets SIGTERM early in epoch 2
    (started in the background by the python_m_sigterm fixture); the command its message
    suggests resumes it to the reference run, bit for bit."""
    st = python_m_sigterm
    run, proc = st["run"], st["proc"]
    st["thread"].join(300)
    rc = proc.wait(120)
    text = _read(st["err"])
    assert "signal_sent_after_s" in st, text
    assert rc == 3, text
    assert "received SIGTERM: finishing the current step, then checkpointing" in text
    assert "stopped by SIGTERM at epoch" in text
    pos = _checkpoint_ok(run / RUN_FILES["checkpoint"])
    FIGURES["sigterm_python_m"] = {"exit_code": rc, "checkpoint_at": pos,
                                   "start_to_config_s": st.get("start_to_config_s"),
                                   "message": [ln for ln in text.splitlines() if "stopped by" in ln][-1]}
    rc, dt, log = forkserver.run(_resume_command(text, run), tmp_path / "resume.log")
    assert rc == 0, log
    FIGURES["sigterm_python_m"]["resume_to_done_s"] = round(dt, 2)
    _assert_same_run(run, reference)


@pytest.mark.parametrize("sig, twice", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_signal_to_training_process_then_resume_is_bit_exact(forkserver, reference, tmp_path, sig, twice):
    """SIGINT (Ctrl-C) behaves like SIGTERM.  A second signal stops at once (no new checkpoint):
    whatever it interrupts, the checkpoint on disk still loads and resuming is still exact."""
    run, log = tmp_path / "run", tmp_path / "run.log"
    pid = forkserver.start(_argv(run), log)
    _wait_for(lambda: _history_len(run) >= 1 or forkserver.poll(pid) is not None, what="epoch 1")
    # Land in epoch 2: a random fraction of this run's epoch-1 time (a fixed 0-0.3 s overshot all
    # of training on an idle machine, where the 3 epochs take ~0.3 s; a signal after the last step
    # has its own deterministic test).
    time.sleep(random.Random(int(sig) + twice).uniform(0.0, 0.4) * _epoch1_seconds(run))
    os.kill(pid, sig)
    if twice:
        time.sleep(0.002)
        os.kill(pid, sig)
    rc = forkserver.wait(pid)
    text = log.read_text()
    name = signal.Signals(sig).name
    if twice:
        assert rc != 0, text
    else:
        assert rc == 3, text
        assert f"stopped by {name}" in text and "Resume with: rb-labelrefine train" in text
    pos = _checkpoint_ok(run / RUN_FILES["checkpoint"])
    assert _temps(run) == []  # even the second signal, mid-write, leaves no temporary behind
    FIGURES.setdefault("signals", []).append({"signal": name, "twice": twice, "exit_code": rc, "checkpoint_at": pos})
    rc, _, text = forkserver.run(_argv(run, resume=True), tmp_path / "resume.log")
    assert rc == 0, text
    _assert_same_run(run, reference)


def test_cli_resume_from_a_pickled_checkpoint_is_refused_exit_2(forkserver, evil, tmp_path):
    before = _hash_dir(evil["run"])
    rc, _, text = forkserver.run(["train", "--config", evil["run"] / "config.yaml", "--out", evil["run"], "--resume"],
                                 tmp_path / "resume.log")
    assert rc == 2, text
    assert "rb-labelrefine: error: refusing to load" in text and "checkpoint.pt" in text
    assert "Unsupported global: GLOBAL exec" in text and "\x1b[" not in text
    FIGURES["messages"]["pickled --resume checkpoint"] = text.strip().splitlines()[-1]
    assert not evil["marker"].exists()
    assert _hash_dir(evil["run"]) == before
