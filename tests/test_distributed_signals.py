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
