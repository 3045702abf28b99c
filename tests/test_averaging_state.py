"""EMA and SWA keep nn.Module's state_dict contract (issue 22): a module that holds one saves it
under its own prefix, and everything the averager holds -- weights, count, settings -- comes back
through load_state_dict; the layout written before (a nested ``{"module": ...}`` dict) still loads,
and a training checkpoint in that layout still resumes bit for bit."""
import os
import signal
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import rb_labelrefine as rl
from _compare import same_state
from rb_labelrefine.averaging import upgrade_legacy_state


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


class Holder(nn.Module):
    """A user's module that keeps its averagers as submodules (as timm's train.py keeps ModelEmaV3)."""

    def __init__(self, net, decay=0.9, warmup=2, start=1):
        super().__init__()
        self.net = net
        self.ema = rl.EMA(net, decay=decay, warmup_steps=warmup)
        self.swa = rl.SWA(net, start_epoch=start)


def _train(h: Holder, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(h.net.parameters(), lr=0.1)
    for s in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(h.net(x), y).backward()
        opt.step()
        h.ema.update(h.net)
        h.swa.end_epoch(h.net, s)


def test_a_module_holding_ema_and_swa_round_trips_through_its_state_dict_with_a_prefix():
    src = Holder(_net(), decay=0.8, warmup=1, start=2)
    _train(src, 5)
    dest = OrderedDict()
    sd = src.state_dict(destination=dest, prefix="outer.")
    assert sd is dest                                   # destination honoured
    assert "outer.ema.module.0.weight" in sd and "outer.ema.num_updates" in sd and "outer.ema._extra_state" in sd
    assert "outer.swa.module.3.bias" in sd and "outer.swa.n_averaged" in sd and "outer.swa._extra_state" in sd
    assert not any(k.startswith(("ema", "swa")) for k in sd)   # everything under the prefix
    assert sd["outer.ema._extra_state"] == {"decay": 0.8, "warmup_steps": 1}
    assert sd["outer.swa._extra_state"] == {"start_epoch": 2, "bn_stale": True}
    kept = src.state_dict(keep_vars=True)
    assert kept["ema.module.0.weight"] is src.ema.module[0].weight   # keep_vars honoured

    dst = Holder(_net(), decay=0.5, warmup=7, start=0)   # other settings, fresh counts
    dst.swa.bn_stale = False
    dst.load_state_dict({k[len("outer."):]: v for k, v in sd.items()})
    same_state(dst.state_dict(), src.state_dict())
    assert (dst.ema.decay, dst.ema.warmup_steps, int(dst.ema.num_updates), dst.ema._count) == (0.8, 1, 5, 5)
    assert (dst.swa.start_epoch, int(dst.swa.n_averaged), dst.swa.bn_stale, dst.swa.active) == (2, 3, True, True)
    # and both go on exactly as the originals
    _train(src, 3, seed=2)
    _train(dst, 3, seed=2)
    same_state(dst.state_dict(), src.state_dict())


def test_a_bare_ema_state_dict_is_the_module_layout_and_bad_extra_state_is_refused():
    ema = rl.EMA(_net(), decay=0.9)
    assert ema.state_dict().keys() == {"num_updates", "_extra_state", *(f"module.{k}" for k in ema.module.state_dict())}
    sd = ema.state_dict()
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.5"):
        rl.EMA(_net()).load_state_dict({**sd, "_extra_state": {"decay": 1.5}})
    with pytest.raises(ValueError, match="SWA extra state: 'start_epoch' is 'x'"):
        rl.SWA(_net(), 0).load_state_dict({**rl.SWA(_net(), 0).state_dict(), "_extra_state": {"start_epoch": "x"}})
    with pytest.raises(RuntimeError, match="num_updates"):   # strict: a missing count is an error
        rl.EMA(_net()).load_state_dict({k: v for k, v in sd.items() if k != "num_updates"})


def _legacy_ema(ema):
    """The state dict EMA returned before it kept nn.Module's contract."""
    return {"module": ema.module.state_dict(), "num_updates": ema.num_updates.clone(), "decay": ema.decay}


def _legacy_swa(swa):
    return {"module": swa.module.state_dict(), "n_averaged": swa.n_averaged.clone(),
            "start_epoch": swa.start_epoch, "bn_stale": swa.bn_stale}


def test_the_layout_written_before_still_loads():
    src = Holder(_net(), decay=0.7, warmup=0, start=1)
    _train(src, 4)
    ema, swa = rl.EMA(_net(), decay=0.7), rl.SWA(_net(), start_epoch=1)
    ema.load_state_dict(_legacy_ema(src.ema))
    swa.load_state_dict(_legacy_swa(src.swa))
    same_state(ema.state_dict(), src.ema.state_dict())
    same_state(swa.state_dict(), src.swa.state_dict())
    assert ema._count == 4
    # nested (a rectifier's state with its teacher): upgraded where found, the rest untouched
    nested = {"step": 3, "teacher": _legacy_ema(src.ema)}
    up = upgrade_legacy_state(nested)
    assert up["step"] == 3 and "module.0.weight" in up["teacher"]
    today = {"step": 3, "teacher": src.ema.state_dict()}
    assert upgrade_legacy_state(today) is today


def test_adr_rectifier_state_holds_its_teacher_in_the_module_layout():
    model = _net()
    adr = rl.ADR(model, num_classes=3, total_steps=4)
    adr.after_step(model)
    sd = adr.state_dict()
    assert "module.0.weight" in sd["teacher"] and int(sd["teacher"]["num_updates"]) == 1
    other = rl.ADR(_net(), num_classes=3, total_steps=4)
    other.load_state_dict({**sd, "teacher": _legacy_ema(adr.teacher)})   # an old rectifier state
    same_state(other.state_dict(), sd)


# ----------------------------------------------------------------------------- a training checkpoint

TINY = ["model.arch=mlp", "data.train_subset=192", "data.batch_size=32", "attack.steps=2", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=2", "eval.curve_test_size=64", "eval.autoattack=false"]


def test_a_checkpoint_written_in_the_old_layout_resumes_bit_exact(tmp_path, monkeypatch):
    """A run stopped mid-epoch whose checkpoint holds WA, SWA and ADR's teacher in the old layout
    (as the code before this change wrote them) resumes to the uninterrupted run, bit for bit."""
    pytest.importorskip("sklearn")
    from rb_labelrefine.config import load_config
    from rb_labelrefine.runs import RUN_FILES, read_weights
    from rb_labelrefine.training.io import atomic_torch_save, safe_torch_load
    from rb_labelrefine.training.trainer import Trainer, TrainingInterrupted

    cfg = load_config("digits-adr-wa", TINY + ["train.epochs=3", "swa.enabled=true", "swa.start_epoch=1",
                                          "method.ema_decay=0.99"])   # its own teacher beside WA
    Trainer(cfg, tmp_path / "ref", progress=False).fit()

    orig = Trainer.train_step

    def train_step(self, *a, **k):   # SIGTERM right after step 15 (epoch 3, mid-epoch)
        out = orig(self, *a, **k)
        if self.global_step == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", orig)
    ck_path = tmp_path / "run" / RUN_FILES["checkpoint"]
    ck = safe_torch_load(ck_path)
    assert int(ck["swa"]["n_averaged"]) == 1   # SWA has a snapshot to lose

    def old(sd, kind):
        mod = OrderedDict((k[len("module."):], v) for k, v in sd.items() if k.startswith("module."))
        extra = sd["_extra_state"]
        if kind == "ema":
            return {"module": mod, "num_updates": sd["num_updates"], "decay": extra["decay"]}
        return {"module": mod, "n_averaged": sd["n_averaged"], **extra}

    ck["wa"], ck["swa"] = old(ck["wa"], "ema"), old(ck["swa"], "swa")
    ck["rectifier"]["teacher"] = old(ck["rectifier"]["teacher"], "ema")
    atomic_torch_save(ck, ck_path)
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    for which in ("final", "best"):
        a, _ = read_weights(tmp_path / "run" / RUN_FILES[which])
        b, _ = read_weights(tmp_path / "ref" / RUN_FILES[which])
        same_state(a, b, which)
    a, b = (safe_torch_load(d / RUN_FILES["checkpoint"]) for d in (tmp_path / "run", tmp_path / "ref"))
    for key in ("model", "optimizer", "rectifier", "wa", "swa", "rng", "epoch", "batch", "global_step"):
        same_state(a[key], b[key], key)
