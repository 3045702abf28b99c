"""SIGTERM under ``torchrun --nproc_per_node=2`` (gloo, CPU): one signal path for one process and DDP.

In one torchrun launch, five CLI runs in sequence: an uninterrupted reference; a run whose rank 1
alone gets SIGTERM mid-epoch (both ranks must stop at the same step, exit 3, and leave a
mid-epoch checkpoint), then its ``--resume``; a run whose ranks get SIGTERM while the final
weights are written (before the fix the DDP handler only noted it and the run exited 0), then its
``--resume``.  Both resumed runs must end bit-identical to the reference.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rb_labelrefine.runs import RUN_FILES, read_weights
from rb_labelrefine.training.io import safe_torch_load
from _compare import same_state

SETS = ["data.name=synthetic", "data.batch_size=32", "data.val_fraction=0.125", "data.train_subset=160",
        "model.arch=mlp", "attack.eps=0.1", "attack.alpha=0.05", "attack.steps=2", "attack.random_start=false",
        "train.epochs=2", "train.threads=1", "wa.enabled=true", "eval.curve_test_size=32",
        "eval.val_attack_steps=2", "eval.test_attack_steps=2", "train.reference_steps_per_epoch=null"]

WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import torch.distributed as dist
    from rb_labelrefine import cli
    from rb_labelrefine.training import trainer as T
    from rb_labelrefine.training.io import safe_torch_load

    root, sets = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    plan = {}
    orig_step = T.Trainer.train_step
    def train_step(self, *a, **k):
        out = orig_step(self, *a, **k)
        p = plan.get("step")
        if p is not None and rank == p[0] and self.global_step == p[1]:
            del plan["step"]
            os.kill(os.getpid(), signal.SIGTERM)   # a real signal, to this rank only
        return out
    T.Trainer.train_step = train_step
    from rb_labelrefine.training import rundir as R   # where the run directory's files are written
    orig_write = R.write_weights
    def write_weights(model, path, meta):
        out = orig_write(model, path, meta)
        if plan.get("final") and os.path.basename(str(path)) == "final.safetensors":
            del plan["final"]
            os.kill(os.getpid(), signal.SIGTERM)   # every rank, as a scheduler does
        return out
    R.write_weights = write_weights

    record = []
    def run(out, resume=False, **p):
        plan.clear(); plan.update(p)
        argv = ["train", "--config", "digits-pgdat", "--out", f"{root}/{out}", "--quiet"]
        for s in sets:
            argv += ["--set", s]
        rc = cli.main(argv + (["--resume"] if resume else []))
        if dist.is_initialized():
            dist.barrier()
        pos = None
        ck = f"{root}/{out}/checkpoint.pt"
        if os.path.exists(ck):
            st = safe_torch_load(ck)
            pos = [int(st["epoch"]), int(st["batch"])]
        record.append({"out": out, "resume": resume, "rc": rc, "checkpoint": pos,
                       "summary": os.path.exists(f"{root}/{out}/summary.json")})
    run("ref")
    run("train_stop", step=(1, 2))
    run("train_stop", resume=True)
    run("final_stop", final=True)
    run("final_stop", resume=True)
    with open(f"{root}/record.rank{rank}.json", "w") as f:
        json.dump(record, f)
""")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_signals")
    worker = root / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(root), json.dumps(SETS)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads((root / f"record.rank{r}.json").read_text()) for r in (0, 1)]
    return root, records, res.stdout + res.stderr


def _no_times(history):
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in history]


def _assert_same_run(run, ref):
    for which in ("best", "final"):
        a, _ = read_weights(run / RUN_FILES[which])
        b, _ = read_weights(ref / RUN_FILES[which])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    h = [json.loads((d / RUN_FILES["history"]).read_text()) for d in (run, ref)]
    assert _no_times(h[0]) == _no_times(h[1])
    ca, cb = safe_torch_load(run / RUN_FILES["checkpoint"]), safe_torch_load(ref / RUN_FILES["checkpoint"])
    for part in ("model", "optimizer", "wa", "rectifier", "rng", "epoch", "batch", "global_step"):
        same_state(ca[part], cb[part], part)


def test_sigterm_to_one_rank_mid_epoch_stops_both_at_the_same_step(ddp):
    root, records, log = ddp
    for rec in records:  # both ranks
        ref, stop, resume = rec[0], rec[1], rec[2]
        assert ref["rc"] == 0 and resume["rc"] == 0, rec
        assert stop["rc"] == 3, rec
        epoch, batch = stop["checkpoint"]
        assert epoch == 0 and batch > 0 and not stop["summary"], stop  # a mid-epoch checkpoint, agreed on
    assert records[0][1]["checkpoint"] == records[1][1]["checkpoint"]
    assert "stopped by SIGTERM at epoch 1" in log
    assert "Resume with: torchrun --nproc_per_node=2 -m rb_labelrefine train" in log   # how it was started
    _assert_same_run(root / "train_stop", root / "ref")


def test_sigterm_in_the_final_stage_exits_3_and_resume_redoes_only_that_stage(ddp):
    root, records, log = ddp
    for rec in records:
        stop, resume = rec[3], rec[4]
        assert stop["rc"] == 3 and stop["checkpoint"] == [2, 0] and not stop["summary"], stop
        assert resume["rc"] == 0 and resume["summary"], resume
    assert "stopped by SIGTERM after training finished" in log
    _assert_same_run(root / "final_stop", root / "ref")
    summary = json.loads((root / "final_stop" / RUN_FILES["summary"]).read_text())
    assert summary["best_epoch"] >= 1


# ----------------------------------------------------------------------------- epoch sums and timeouts
SUMS_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from rb_labelrefine.training.distributed import DistributedContext
    from rb_labelrefine.training.step import EpochSums

    rank, world, out = int(sys.argv[1]), 2, sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistributedContext(rank, world, 0, "gloo")
    # per-step losses of this rank: float32 values whose running sums round (a real epoch's)
    rng = np.random.default_rng(123 + rank)
    losses = [torch.tensor(v, dtype=torch.float32) for v in rng.uniform(0.1, 3.0, 40).astype(np.float32)]
    y = torch.zeros(7, dtype=torch.long)
    logits = torch.zeros(7, 3)

    def epoch(sums, steps, resumed):
        ctx.carry_epoch_sums(sums.acc if resumed else None)   # as the trainer: before begin
        sums.begin(resumed=resumed)
        for l in steps:
            sums.add(l, logits, y)
        sums.flush()

    def fresh():
        return EpochSums(torch.device("cpu"), lambda l, c, s, acc=None: ctx.reduce_epoch_sums(l, c, s, acc))

    ref = fresh()
    epoch(ref, losses, False)
    result = {"ref": ref.record()["train_loss"]}
    for mode in ("own", "total"):   # own: today's checkpoint; total: one without every rank's own sums
        first = fresh()
        epoch(first, losses[:13], False)                  # SIGTERM after 13 steps: flushed, checkpointed
        saved = json.loads(json.dumps(first.state_dict()))
        if mode == "total":
            saved = {k: v for k, v in saved.items() if "@" not in k}
        resumed = fresh()
        resumed.load_state_dict(saved)
        epoch(resumed, losses[13:], True)
        result[mode] = resumed.record()["train_loss"]
    with open(f"{out}/sums.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()   # else gloo's threads may abort the exit ("terminate called ...")
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resumed_epochs_train_loss_under_ddp_is_exactly_the_uninterrupted_one(tmp_path):
    """Each rank continues its own float32 running sums (kept per rank in the checkpoint): the
    resumed epoch's train_loss equals the uninterrupted one to the last bit.  Continuing from the
    reduced total on every rank (what a checkpoint without them gives) differs in the last digits."""
    worker = tmp_path / "sums.py"
    worker.write_text(SUMS_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(tmp_path), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = [json.loads((tmp_path / f"sums.rank{r}.json").read_text()) for r in (0, 1)]
    assert res[0] == res[1]
    assert res[0]["own"] == res[0]["ref"]            # exact, not approx
    assert res[0]["total"] != res[0]["ref"]          # the former carry: the 8th-digit difference
    assert abs(res[0]["total"] - res[0]["ref"]) < 1e-5 * abs(res[0]["ref"])


FROZEN_WORKER = textwrap.dedent("""
    import json, os, signal, subprocess, sys
    from rb_labelrefine import cli
    from rb_labelrefine.training import trainer as T

    root, sets = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    orig_step = T.Trainer.train_step
    def train_step(self, *a, **k):
        out = orig_step(self, *a, **k)
        if rank == 1 and self.global_step == 2:
            # frozen (as by SIGSTOP) until killed well after the other rank's timeout
            subprocess.Popen(["sh", "-c", f"sleep 20; kill -KILL {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
        return out
    T.Trainer.train_step = train_step
    argv = ["train", "--config", "digits-pgdat", "--out", f"{root}/frozen", "--quiet"]
    for s in sets + ["train.dist_timeout_s=3"]:
        argv += ["--set", s]
    rc = cli.main(argv)
    with open(f"{root}/frozen.rank{rank}.rc", "w") as f:
        f.write(str(rc))
""")


def test_a_frozen_rank_stops_the_others_after_train_dist_timeout_s_naming_it(tmp_path):
    worker = tmp_path / "frozen.py"
    worker.write_text(FROZEN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(tmp_path), json.dumps(SETS)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert (tmp_path / "frozen.rank0.rc").read_text() == "1", log[-3000:]   # a failed run, not a bug (70)
    assert "rank 0: rank 1 stopped answering" in log and "train.dist_timeout_s=3 s" in log, log[-3000:]
    assert "Resume with: torchrun --nproc_per_node=2 -m rb_labelrefine train" in log, log[-3000:]
    assert "Traceback" not in log.split("rank 0: rank 1 stopped answering")[0][-2000:]


def test_train_dist_timeout_s_is_a_checked_field_that_may_differ_on_resume():
    from rb_labelrefine.config import ConfigError, load_config
    from rb_labelrefine.runs import config_fingerprint

    assert load_config("digits-pgdat").train.dist_timeout_s == 600
    for bad in ("0", "-5", "nan", "true", "1e9"):
        with pytest.raises(ConfigError, match="train.dist_timeout_s"):
            load_config("digits-pgdat", [f"train.dist_timeout_s={bad}"])
    assert config_fingerprint(load_config("digits-pgdat", ["train.dist_timeout_s=5"])) == \
        config_fingerprint(load_config("digits-pgdat"))


def test_the_resume_command_names_torchrun_under_torchrun(monkeypatch):
    from rb_labelrefine.training.distributed import launch_command

    for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launch_command() == "rb-labelrefine"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_command() == "torchrun --nproc_per_node=4 -m rb_labelrefine"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch_command().startswith("torchrun --nnodes=2 ") and launch_command().endswith(
        "--nproc_per_node=2 -m rb_labelrefine")
