"""Generated data (``data.aux``) under ``torchrun --nproc_per_node=2`` (gloo, CPU).

Claims tested: each rank draws its own share of every global batch's generated rows (disjoint,
from one seeded stream whose position is the same on every rank and in the checkpoint); SGLR's
memory addresses generated rows after the real ones identically on both ranks; the 2-rank run
equals the one-process run (model without BatchNorm, deterministic attacks: see
tests/test_distributed.py) including an uneven share of generated rows (9 = 5 + 4) -- and so does a
run with ``data.device_resident=true`` and augmentation (crops drawn per global batch); it resumes
bit-exactly after a SIGTERM to one rank mid-epoch and after ``kill -9`` of the whole job; and
``--resume`` of the finished run changes nothing.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rb_labelrefine.config import load_config
from rb_labelrefine.runs import RUN_FILES, read_weights
from rb_labelrefine.training.io import safe_torch_load
from rb_labelrefine.training.trainer import Trainer
from _compare import same_state

REPO = Path(__file__).resolve().parents[1]
N_AUX = 90
# 150 real rows in batches of 32: 4 x 32 + 22; aux_fraction 0.3 adds 14 (7 + 7) and, to the last, 9 (5 + 4)
SETS = ["data.name=synthetic", "data.batch_size=32", "data.val_fraction=0.125", "data.train_subset=150",
        "model.arch=mlp", "attack.eps=0.1", "attack.alpha=0.05", "attack.steps=2", "attack.random_start=false",
        "train.epochs=3", "train.threads=1", "wa.enabled=true", "eval.curve_test_size=32",
        "eval.val_attack_steps=2", "eval.test_attack_steps=2", "train.reference_steps_per_epoch=null",
        "data.aux_fraction=0.3"]
PRESET = "digits-sglr"

# batches built as whole tensors, augmented from per-batch seeded generators: the same crops on two
# ranks as in one process
RESIDENT = ["data.augment=true", "data.device_resident=true"]

WORKER = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from rb_labelrefine import cli
    from rb_labelrefine.training import trainer as T

    root, preset, sets, RESIDENT = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    rank = int(os.environ["RANK"])
    plan, done = {}, []
    orig_step = T.Trainer.train_step
    def train_step(self, x, y, idx, *a, **k):
        if "record" in plan:
            plan["record"].append(idx.tolist())
        out = orig_step(self, x, y, idx, *a, **k)
        p = plan.get("stop")
        if p is not None and rank == p[0] and self.global_step == p[1]:
            del plan["stop"]
            os.kill(os.getpid(), signal.SIGTERM)   # a real signal, to this rank only
        return out
    T.Trainer.train_step = train_step
    orig_fit = T.Trainer.fit
    def fit(self):
        out = orig_fit(self)
        done.append(self)
        return out
    T.Trainer.fit = fit

    def files(out):
        d = Path(root) / out
        return {p.name: [hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns]
                for p in sorted(d.iterdir()) if p.is_file()}

    record = {}
    def run(out, resume=False, extra=(), **p):
        plan.clear(); plan.update(p)
        argv = ["train", "--config", preset, "--out", f"{root}/{out}", "--quiet"]
        for s in sets + list(extra):
            argv += ["--set", s]
        rc = cli.main(argv + (["--resume"] if resume else []))
        dist.barrier()
        return rc
    batches = []
    record["ref"] = run("ref", record=batches)
    record["batches"] = batches
    t = done[-1]
    torch.save({"model": t.model.state_dict(), "rectifier": t.rectifier.state_dict(),
                "optimizer": t.optimizer.state_dict(), "history": t.history},
               f"{root}/ref.rank{rank}.pt")
    record["stop"] = run("stop", stop=(1, 7))   # epoch 2, batch 3 of 5
    st = T.safe_torch_load(f"{root}/stop/checkpoint.pt")
    record["stop_at"] = [int(st["epoch"]), int(st["batch"])]
    record["resume"] = run("stop", resume=True)
    record["resident"] = run("resident", extra=RESIDENT)
    t = done[-1]
    torch.save({"model": t.model.state_dict(), "rectifier": t.rectifier.state_dict()},
               f"{root}/resident.rank{rank}.pt")
    before = files("ref")
    record["finished"] = run("ref", resume=True)
    record["unchanged"] = before == files("ref")
    with open(f"{root}/record.rank{rank}.json", "w") as f:
        json.dump(record, f)
""")


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so a
    process-group kill does not reach them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill9_job(proc) -> None:
    """kill -9 of a whole torchrun job: its workers and the launcher, at once."""
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(60)


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def aux_npz(tmp_path_factory):
    """Synthetic-shaped generated data: 32x32x3 uint8, labels 0-9."""
    path = tmp_path_factory.mktemp("aux") / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (N_AUX, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, 10, N_AUX).astype(np.int64))
    return path


def _sets(aux):
    return SETS + [f"data.aux={aux}"]


def _cli(out, aux, resume=False):
    argv = ["-m", "rb_labelrefine", "train", "--config", PRESET, "--out", str(out), "--quiet"]
    for s in _sets(aux):
        argv += ["--set", s]
    return argv + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, aux_npz):
    root = tmp_path_factory.mktemp("ddp_aux")
    worker = root / "worker.py"
    worker.write_text(WORKER)
    # the kill -9 victim runs beside the worker's runs (a job of its own)
    victim = subprocess.Popen(_torchrun(*_cli(root / "killed", aux_npz)), cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = subprocess.Popen(_torchrun(str(worker), str(root), PRESET, json.dumps(_sets(aux_npz)), json.dumps(RESIDENT)),
                           cwd=REPO,
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt, deadline = root / "killed" / RUN_FILES["checkpoint"], time.time() + 400
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert victim.poll() is None, "the run ended before the kill"
    _kill9_job(victim)
    killed_at = int(safe_torch_load(ckpt)["epoch"])
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out[-4000:]
    resumed = subprocess.run(_torchrun(*_cli(root / "killed", aux_npz, resume=True)), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    records = [json.loads((root / f"record.rank{r}.json").read_text()) for r in (0, 1)]
    return root, records, killed_at, resumed


def _same_run(run: Path, ref: Path):
    for which in ("best", "final"):
        a, _ = read_weights(run / RUN_FILES[which])
        b, _ = read_weights(ref / RUN_FILES[which])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    h = [[{k: v for k, v in r.items() if k != "train_time_s"} for r in json.loads((d / RUN_FILES["history"]).read_text())]
         for d in (run, ref)]
    assert h[0] == h[1]
    ca, cb = safe_torch_load(run / RUN_FILES["checkpoint"]), safe_torch_load(ref / RUN_FILES["checkpoint"])
    for part in ("model", "optimizer", "wa", "rectifier", "rng", "aux", "epoch", "batch", "global_step"):
        same_state(ca[part], cb[part], part)


def test_ranks_draw_disjoint_shares_of_the_generated_rows_and_index_them_alike(ddp):
    root, records, _, _ = ddp
    n_real = 150
    b0, b1 = records[0]["batches"], records[1]["batches"]
    assert len(b0) == len(b1) == 3 * 5
    drawn = []
    for k, (i0, i1) in enumerate(zip(b0, b1)):
        last = k % 5 == 4
        real0, real1 = [i for i in i0 if i < n_real], [i for i in i1 if i < n_real]
        gen0, gen1 = [i for i in i0 if i >= n_real], [i for i in i1 if i >= n_real]
        assert i0 == real0 + gen0 and i1 == real1 + gen1                       # real rows first, then generated
        assert (len(real0), len(real1), len(gen0), len(gen1)) == ((11, 11, 5, 4) if last else (16, 16, 7, 7))
        assert not set(real0) & set(real1)
        drawn += gen0 + gen1
    # one stream over both ranks: without replacement, a pass over the archive before any repeat
    assert sorted(drawn[:N_AUX]) == [n_real + i for i in range(N_AUX)]
    r0, r1 = (torch.load(root / f"ref.rank{r}.pt", weights_only=False) for r in (0, 1))
    same_state(r0["rectifier"], r1["rectifier"], "rectifier")      # SGLR memory identical on both ranks
    same_state(r0["model"], r1["model"], "model")
    assert r0["rectifier"]["memory"].shape[0] == n_real + N_AUX
    assert bool(r0["rectifier"]["seen"][n_real:].all())              # every generated row written


@pytest.mark.parametrize("name, extra", [("ref", []), ("resident", RESIDENT)])
def test_two_ranks_with_aux_equal_one_process(ddp, tmp_path, aux_npz, name, extra):
    root, records, _, _ = ddp
    assert all(rec[name] == 0 for rec in records)
    t = Trainer(load_config(PRESET, _sets(aux_npz) + extra), tmp_path / "single", progress=False)
    t.fit()
    r0, r1 = (torch.load(root / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1))
    same_state(r0["rectifier"], r1["rectifier"], "rectifier")
    for part in ("model", "rectifier"):
        mine, theirs = t.model.state_dict() if part == "model" else t.rectifier.state_dict(), r0[part]
        for k, v in mine.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.allclose(v, theirs[k], atol=1e-5, rtol=1e-5), (part, k, (v - theirs[k]).abs().max())
            elif torch.is_tensor(v):
                assert torch.equal(v, theirs[k]), (part, k)
    ck = [safe_torch_load(d / RUN_FILES["checkpoint"]) for d in (tmp_path / "single", root / name)]
    assert ck[0]["aux"] == ck[1]["aux"] and ck[0]["stream"] == ck[1]["stream"] == {"resident": name == "resident"}
    for a, b in zip(t.history, json.loads((root / name / RUN_FILES["history"]).read_text())):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_sigterm_to_one_rank_then_resume_is_bit_exact_and_a_finished_resume_changes_nothing(ddp):
    root, records, _, _ = ddp
    for rec in records:
        assert rec["ref"] == 0 and rec["stop"] == 3 and rec["resume"] == 0 and rec["finished"] == 0, rec
        assert rec["stop_at"][0] == 1 and rec["stop_at"][1] >= 2, rec   # mid-epoch 2, agreed by both ranks
    assert records[0]["unchanged"]
    _same_run(root / "stop", root / "ref")


def test_kill9_of_the_job_then_resume_under_torchrun_is_bit_exact(ddp):
    root, _, killed_at, resumed = ddp
    assert 1 <= killed_at < 3
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at epoch {killed_at + 1}" in resumed.stderr
    _same_run(root / "killed", root / "ref")
