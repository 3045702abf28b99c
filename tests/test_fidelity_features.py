"""The training-step options that reproduce the public codes' runs (issue 10), each checked against
a small hand-written computation: AWP's SAM form, the TRADES forward forms, attack starts,
drop_last, the SWA BatchNorm recompute forms, lr warm-up / lag, no weight decay on normalisation
parameters, the swish DM PreAct-ResNet-18 -- and a mid-epoch resume that stays bit-exact with
all of them on."""
from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _extras import need

need("sklearn")

from rb_labelrefine.attacks import build_attack
from rb_labelrefine.averaging import SWA, SAMAWP, bn_update, frozen_bn_stats
from rb_labelrefine.config import ConfigError, load_config
from rb_labelrefine.objectives import TRADES
from rb_labelrefine.rectifiers.base import Target
from rb_labelrefine.runs import RUN_FILES
from rb_labelrefine.training.io import safe_torch_load
from rb_labelrefine.training.trainer import Trainer, TrainingInterrupted, lr_at, param_groups

TINY = ["data.train_subset=100", "data.batch_size=32", "attack.steps=2", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=1", "eval.curve_test_size=32", "model.arch=tiny_cnn",
        "model.kwargs={width: 4}"]


def _bn_net(seed=0, cin=3, width=4, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def _batch(n=6, seed=1, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g) * 0.6 + 0.2, torch.randint(0, classes, (n,), generator=g)


def _onehot(y, classes=5):
    return Target(y, F.one_hot(y, classes).float())


def _bn(model):
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ----------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("sets, field, text", [
    (["awp.variant=sharp"], "awp.variant", "must be one of ['wu2020', 'sam']"),
    (["objective.forward=twice"], "objective.forward", "must be one of"),
    (["objective.forward=concat"], "objective.forward", "is a form of the TRADES loss"),
    (["attack.start=gauss"], "attack.start", "must be one of ['default', 'uniform', 'normal', 'uniform_eps']"),
    (["attack.start=normal", "attack.name=apgd"], "attack.start", "Linf PGD and TPGD"),
    (["attack.start=normal", "attack.random_start=false"], "attack.start", "needs attack.random_start=true"),
    (["attack.start_std=0"], "attack.start_std", "must be > 0"),
    (["swa.bn_form=fast"], "swa.bn_form", "must be one of ['equal', 'code']"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs", "must be >= 0"),
    (["optim.warmup_epochs=40", "train.epochs=40"], "optim.warmup_epochs", "must be shorter than training"),
    (["optim.warmup_start_lr=5"], "optim.warmup_start_lr", "must be in [0, optim.lr"),
    (["optim.lr_lag_steps=0.5"], "optim.lr_lag_steps", "expected int"),
    (["optim.bn_weight_decay=maybe"], "optim.bn_weight_decay", "expected bool"),
    (["data.drop_last=true", "data.train_subset=10", "data.batch_size=32"], "data.drop_last", "no training step"),
])
def test_bad_values_name_the_field(sets, field, text):
    with pytest.raises(ConfigError) as err:
        load_config("digits-pgdat", sets)
    assert err.value.field == field and text in err.value.message, err.value


def test_defaults_are_todays_behaviour():
    cfg = load_config("digits-pgdat")
    assert (cfg.awp.variant, cfg.objective.forward, cfg.attack.start, cfg.swa.bn_form) == (
        "wu2020", "separate", "default", "equal")
    assert (cfg.data.drop_last, cfg.optim.warmup_epochs, cfg.optim.lr_lag_steps, cfg.optim.bn_weight_decay) == (
        False, 0.0, 0, True)


# ----------------------------------------------------------------------------- AWP, SAM form

def test_sam_awp_moves_every_parameter_by_rho_times_its_norm_and_restores_exactly():
    rho = 0.01
    model = _bn_net()
    with torch.no_grad():
        _bn(model).bias.uniform_(-0.5, 0.5)  # initialised to 0, where rho * ||p|| = 0 would not move it
    model.train()
    x, y = _batch()
    ref = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(ref(x), y)  # the hand computation: gradient at w, BN stats at w
    grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))

    awp = SAMAWP(model, gamma=rho)
    awp.perturb(model, lambda m: F.cross_entropy(m(x), y))
    for n, p in model.named_parameters():  # biases and BatchNorm affine move too
        e = p.detach() - w0[n]
        g = grads[n]
        assert float(e.norm()) == pytest.approx(rho * float(w0[n].norm()), rel=1e-5), n
        cos = float((e * g).sum() / (e.norm() * g.norm()))
        assert cos == pytest.approx(1.0, abs=1e-6), n
    bn, bn_ref = _bn(model), _bn(ref)
    assert torch.equal(bn.running_mean, bn_ref.running_mean) and torch.equal(bn.running_var, bn_ref.running_var)

    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with frozen_bn_stats(model):  # the pass at w + e leaves the running statistics alone
        model(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] + 1 and bn.momentum == 0.1
    awp.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n]), n


def _adr_pgd(model, x, y, eps, alpha, steps):
    """The ADR code's util/pgd_attack.py, re-typed: uniform start, sign steps, model as it is."""
    adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        grad = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)[0]
        adv = torch.clamp(x + torch.clamp(adv.detach() + alpha * grad.sign() - x, -eps, eps), 0, 1).detach()
    return adv


def test_sam_awp_train_step_follows_the_adr_code_order(tmp_path):
    """Trainer.train_step with awp.variant=sam against the ADR code's PGD-AT + AWP step
    (advTrainer.py): attack in train mode; forward/backward at w; first_step; momentum-0 pass at
    w + e; restore; plain SGD step."""
    cfg = load_config("digits-pgdat", TINY + ["awp.enabled=true", "awp.variant=sam", "awp.gamma=0.01",
                                              "attack.bn_mode=train", "optim.lr=0.05"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr._setup()
    tr.global_step = 0
    ref = copy.deepcopy(tr.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay, nesterov=False)  # the AWP optimizer's SGD
    assert not cfg.optim.nesterov
    a = cfg.attack
    for step in range(3):
        x, y = _batch(8, seed=10 + step, classes=10)
        x = F.interpolate(x, size=8)[:, :1]  # digits: 1 x 8 x 8
        torch.manual_seed(100 + step)
        tr.train_step(x, y, torch.arange(8), epoch=0)
        torch.manual_seed(100 + step)
        ref.train()
        x_adv = _adr_pgd(ref, x, y, a.eps, a.alpha, a.steps)
        opt.zero_grad()
        F.cross_entropy(ref(x_adv), y).backward()
        saved = []
        with torch.no_grad():
            for p in ref.parameters():
                saved.append(p.clone())
                p.add_(p.grad * (0.01 * p.norm() / (p.grad.norm() + 1e-20)))
        opt.zero_grad()
        with frozen_bn_stats(ref):
            F.cross_entropy(ref(x_adv), y).backward()
        with torch.no_grad():
            for p, s in zip(ref.parameters(), saved):
                p.copy_(s)
        opt.step()
    for (n, t), r in zip(tr.model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(t.float(), r.float(), atol=1e-6, rtol=0), n


def test_awp_warmup_epochs_is_the_0_based_epoch_index_awp_starts_at(tmp_path, monkeypatch):
    cfg = load_config("digits-pgdat", TINY + ["awp.enabled=true", "awp.variant=sam", "awp.warmup_epochs=1",
                                              "train.epochs=3"])
    seen = []
    orig = Trainer.train_step

    def spy(self, x, y, idx, epoch):
        calls = []
        real = self.awp.perturb
        self.awp.perturb = lambda *a, **k: (calls.append(1), real(*a, **k))
        try:
            return orig(self, x, y, idx, epoch)
        finally:
            self.awp.perturb = real
            seen.append((epoch, len(calls)))

    monkeypatch.setattr(Trainer, "train_step", spy)
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert {e: c for e, c in seen} == {0: 0, 1: 1, 2: 1}


# ----------------------------------------------------------------------------- TRADES forwards

class _Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def _trades_loss_by_hand(logits_nat, logits_adv, kl_nat, y, beta):
    ce = F.cross_entropy(logits_nat, y)
    p = F.softmax(kl_nat, 1)
    return ce + beta * (p * (F.log_softmax(kl_nat, 1) - F.log_softmax(logits_adv, 1))).sum(1).mean()


@pytest.mark.parametrize("forward", ["separate", "concat", "three_pass", "three_pass_adv_first"])
def test_trades_forward_forms_batches_and_running_statistics(forward):
    x, y = _batch(6)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    net = _bn_net()
    net.train()
    ref = copy.deepcopy(net)
    rec = _Recorder(net)
    loss, logits_adv = TRADES(attack=None, beta=6.0, forward=forward).loss(rec, x, x_adv, _onehot(y))

    batches = {"separate": [x, x_adv], "concat": [torch.cat([x, x_adv])], "three_pass": [x, x_adv, x],
               "three_pass_adv_first": [x_adv, x, x]}[forward]
    assert len(rec.inputs) == len(batches) and all(torch.equal(a, b) for a, b in zip(rec.inputs, batches))
    # running mean by hand: one EMA update per pass with that pass's batch statistics
    m = _bn(ref).momentum
    rm = _bn(ref).running_mean.clone()
    pre = ref[0]
    for b in batches:
        with torch.no_grad():
            rm = (1 - m) * rm + m * pre(b).mean(dim=(0, 2, 3))
    assert torch.allclose(_bn(net).running_mean, rm, atol=1e-7)
    # the loss from the logits of those batches
    outs = [ref(b) for b in batches]
    if forward == "concat":
        nat, adv, kl_nat = outs[0][:6], outs[0][6:], outs[0][:6]
    elif forward == "three_pass_adv_first":
        adv, kl_nat, nat = outs
    else:
        nat, adv = outs[0], outs[1]
        kl_nat = outs[2] if forward == "three_pass" else nat
    assert torch.allclose(loss, _trades_loss_by_hand(nat, adv, kl_nat, y, 6.0), atol=1e-6)
    assert torch.allclose(logits_adv, adv, atol=1e-6)


def test_concat_differs_from_separate_through_batchnorm_only():
    x, y = _batch(6)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    out = {}
    for forward in ("separate", "concat", "three_pass"):
        net = _bn_net()
        net.train()
        out[forward] = float(TRADES(None, 6.0, forward).loss(net, x, x_adv, _onehot(y))[0].detach())
    assert out["separate"] == pytest.approx(out["three_pass"], abs=1e-6)  # train-mode f(x) twice: same logits
    assert abs(out["separate"] - out["concat"]) > 1e-4                   # 2B batch statistics


# ----------------------------------------------------------------------------- attack starts

class _Flat(nn.Module):
    """Zero input gradient (sign 0: the step keeps the start) and a record of what it saw."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(5))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.b.expand(x.shape[0], 5) + 0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("name", ["pgd", "tpgd"])
@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_small_starts_are_x_plus_std_noise_without_clamp(name, start):
    x, y = _batch(4)
    x[0] = 0.0  # unclamped: negative start pixels where x = 0 (normal noise)
    model = _Flat()
    atk = build_attack(name, model, eps=8 / 255, alpha=2 / 255, steps=1, start=start, start_std=0.01)
    torch.manual_seed(5)
    atk(x, y)
    torch.manual_seed(5)
    expected = x + 0.01 * (torch.rand_like(x) if start == "uniform" else torch.randn_like(x))
    first = model.inputs[1] if name == "tpgd" else model.inputs[0]  # TPGD: clean logits first
    assert torch.equal(first, expected)
    if start == "normal":
        assert float(first.min()) < 0
    else:
        assert float((first - x).min()) >= 0 and float((first - x).max()) < 0.01


def test_default_tpgd_start_is_clamped():
    x, y = _batch(4)
    x[0] = 0.0
    model = _Flat()
    torch.manual_seed(5)
    build_attack("tpgd", model, eps=8 / 255, alpha=2 / 255, steps=1)(x, y)
    assert float(model.inputs[1].min()) >= 0


def test_uniform_start_tpgd_reproduces_the_adr_trades_attack():
    """The ADR code's util/trades_attack.py re-typed: x + 0.001 U[0,1), the clean log-probs under
    no_grad, KL(batchmean, log_target) steps -- all in train mode (BN statistics move)."""
    x, _ = _batch(8)
    eps, alpha, steps = 8 / 255, 2 / 255, 3
    net = _bn_net()
    ref = copy.deepcopy(net)
    atk = build_attack("tpgd", net, eps=eps, alpha=alpha, steps=steps, start="uniform", bn_mode="train")
    net.train()
    torch.manual_seed(3)
    adv = atk(x, None)
    torch.manual_seed(3)
    ref.train()
    a = x.clone() + 0.001 * torch.rand_like(x)
    with torch.no_grad():
        nat = F.log_softmax(ref(x), 1)
    for _ in range(steps):
        a.requires_grad = True
        kl = F.kl_div(F.log_softmax(ref(a), 1), nat, reduction="batchmean", log_target=True)
        g = torch.autograd.grad(kl, a)[0]
        a = torch.clamp(torch.min(torch.max(a.detach() + alpha * g.sign(), x - eps), x + eps), 0, 1).detach()
    assert torch.allclose(adv, a, atol=1e-7)
    assert torch.allclose(_bn(net).running_mean, _bn(ref).running_mean, atol=1e-7)


# ----------------------------------------------------------------------------- learning rate

def _cfg_lr(**optim):
    sets = [f"optim.{k}={v}" for k, v in optim.items()]
    return load_config("digits-pgdat", ["train.epochs=4"] + sets)


def test_warmup_and_lag_values_by_hand():
    cfg = _cfg_lr(lr=0.4, schedule="cosine", warmup_epochs=2.5, warmup_start_lr=1e-6, lr_lag_steps=1)
    spe, T, W = 10, 40, 25
    lr = [lr_at(cfg, s // spe, s % spe, spe) for s in range(T)]
    assert lr[0] == lr[1] == pytest.approx(1e-6)
    assert lr[2] == pytest.approx(1e-6 + (0.4 - 1e-6) / W)
    assert lr[25] == pytest.approx(1e-6 + 24 * (0.4 - 1e-6) / W)
    assert lr[26] == pytest.approx(0.5 * 0.4 * (1 + math.cos(math.pi * 25 / T)))  # not shifted by the warm-up
    assert lr[39] == pytest.approx(0.5 * 0.4 * (1 + math.cos(math.pi * 38 / T)))


def test_cosine_warmup_with_lag_1_equals_timm_as_the_adr_code_steps_it():
    timm_sched = pytest.importorskip("timm.scheduler")
    spe, E = 7, 4
    cfg = _cfg_lr(lr=0.4, schedule="cosine", warmup_epochs=2.5, warmup_start_lr=1e-6, lr_lag_steps=1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sch = timm_sched.CosineLRScheduler(opt, t_initial=E * spe, lr_min=0, warmup_lr_init=1e-6,
                                       warmup_t=int(2.5 * spe))
    for s in range(E * spe):
        assert lr_at(cfg, s // spe, s % spe, spe) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), s
        sch.step(s)  # after the optimizer step, with the step's own index (advTrainer.py)


def test_multistep_with_lag_0_equals_timm_as_the_adr_code_steps_it():
    timm_sched = pytest.importorskip("timm.scheduler")
    spe, E = 5, 6
    cfg = _cfg_lr(lr=0.1, schedule="multistep", milestones="[3, 5]")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sch = timm_sched.MultiStepLRScheduler(opt, decay_t=[3 * spe, 5 * spe], decay_rate=0.1)
    for s in range(E * spe):
        assert lr_at(cfg, s // spe, s % spe, spe) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), s
        sch.step(s)


def test_lag_minus_1_is_the_locuslab_schedule_and_sgls_is_milestones_99_149():
    spe, E = 4, 8
    lr_max = 0.1
    # locuslab/robust_overfitting train_cifar.py: lr_schedule(epoch + (i + 1) / n), piecewise 0.5 / 0.75
    cfg = load_config("digits-pgdat", [f"train.epochs={E}", "optim.lr=0.1", "optim.milestones=[0.5, 0.75]",
                                       "optim.lr_lag_steps=-1"])
    for epoch in range(E):
        for i in range(spe):
            t = epoch + (i + 1) / spe
            expected = lr_max if t / E < 0.5 else (lr_max / 10 if t / E < 0.75 else lr_max / 100)
            assert lr_at(cfg, epoch, i, spe) == pytest.approx(expected), (epoch, i)
    assert lr_at(cfg, 3, spe - 1, spe) == pytest.approx(0.01)  # the last step of epoch 4 (1-based) is decayed
    # devicerxx/SGLS main_adv.py: MultiStepLR([m1, m2]).step(epoch) with 1-based epochs, once per epoch
    cfg = load_config("digits-pgdat", [f"train.epochs={E}", "optim.lr=0.1", "optim.milestones=[3, 5]"])
    for epoch in range(E):
        n = sum(1 for m in (4, 6) if epoch + 1 >= m)  # closed form: gamma ** bisect_right(milestones, epoch)
        assert lr_at(cfg, epoch, 0, spe) == pytest.approx(lr_max * 0.1 ** n), epoch


def test_no_lag_no_warmup_is_the_old_cosine():
    cfg = _cfg_lr(schedule="cosine", lr=0.1)
    for s in (0, 3, 17, 39):
        t = (s // 10 + (s % 10) / 10) / 4
        assert lr_at(cfg, s // 10, s % 10, 10) == 0.5 * 0.1 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- weight decay groups

def test_no_weight_decay_on_normalisation_parameters_only():
    net = _bn_net()
    groups = param_groups(net, bn_weight_decay=False)
    opt = torch.optim.SGD(groups, lr=1.0, momentum=0.0, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only weight decay moves a parameter, w <- (1 - lr * wd) w
    for n, p in net.named_parameters():
        factor = 1.0 if n.startswith("1.") else 0.9  # "1." is the BatchNorm; conv / linear biases decay
        assert torch.allclose(p, before[n] * factor), n
    assert len(param_groups(net, True)) == 1


# ----------------------------------------------------------------------------- SWA BatchNorm forms

def test_swa_bn_update_code_form_weights_batches_by_size():
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 5, 5) + 1, torch.randn(4, 3, 5, 5), torch.randn(2, 3, 5, 5) * 3 - 2]
    feats = [_bn_net()[0](x).detach() for x in xs]
    means = [f.mean(dim=(0, 2, 3)) for f in feats]
    vars_ = [f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in feats]
    sizes = torch.tensor([4.0, 4.0, 2.0])
    out = {}
    for form in ("code", "equal"):
        net = _bn_net()
        bn_update([(x,) for x in xs], net, form=form)
        out[form] = (_bn(net).running_mean.clone(), _bn(net).running_var.clone())
    w = sizes / sizes.sum()
    assert torch.allclose(out["code"][0], sum(wi * m for wi, m in zip(w, means)), atol=1e-5)
    assert torch.allclose(out["code"][1], sum(wi * v for wi, v in zip(w, vars_)), atol=1e-5)
    assert torch.allclose(out["equal"][0], sum(means) / 3, atol=1e-5)
    assert torch.allclose(out["equal"][1], sum(vars_) / 3, atol=1e-5)
    assert not torch.allclose(out["code"][0], out["equal"][0], atol=1e-3)


def test_swa_code_form_recomputes_after_every_snapshot_on_a_shuffled_pass(tmp_path, monkeypatch):
    cfg = load_config("digits-pgdat", TINY + ["swa.enabled=true", "swa.start_epoch=0", "swa.bn_form=code",
                                              "train.epochs=3"])
    calls = []
    orig = SWA.update_bn

    def spy(self, loader, device=None, max_batches=None, form="equal"):
        idx = torch.cat([b[2] for b in loader])
        calls.append((form, idx))
        return orig(self, loader, device=device, max_batches=max_batches, form=form)

    monkeypatch.setattr(SWA, "update_bn", spy)
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert [f for f, _ in calls] == ["code"] * 3
    for _, idx in calls:
        assert sorted(idx.tolist()) == list(range(100)) and idx.tolist() != list(range(100))
    assert calls[0][1].tolist() != calls[1][1].tolist()  # a fresh permutation per snapshot


# ----------------------------------------------------------------------------- drop_last

@pytest.mark.parametrize("drop_last, steps", [(True, 3), (False, 4)])
def test_drop_last_step_count_schedule_and_decay_scaling(tmp_path, monkeypatch, drop_last, steps):
    cfg = load_config("digits-pgdat", TINY + [f"data.drop_last={drop_last}", "wa.enabled=true",
                                              "train.reference_steps_per_epoch=391"])
    sizes = []
    orig = Trainer.train_step

    def spy(self, x, y, idx, epoch):
        sizes.append(int(y.shape[0]))
        return orig(self, x, y, idx, epoch)

    monkeypatch.setattr(Trainer, "train_step", spy)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    summary = tr.fit()
    assert summary["steps_per_epoch"] == steps and tr.global_step == 2 * steps
    assert sizes == ([32] * 3 if drop_last else [32, 32, 32, 4]) * 2
    assert tr.wa.decay == pytest.approx(0.995 ** (391 / steps))


# ----------------------------------------------------------------------------- dm_preact_resnet18

def test_dm_preact_resnet18_swish_keeps_the_robustbench_dm_keys():
    from rb_labelrefine.compat.robustbench import import_robustbench
    from rb_labelrefine.models.registry import create_model

    import_robustbench()
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMPreActResNet

    from rb_labelrefine.models.robustbench_archs import Swish

    relu, swish = (create_model("dm_preact_resnet18", 10, activation=a) for a in ("relu", "swish"))
    assert list(relu.state_dict()) == list(swish.state_dict()) == list(DMPreActResNet(10).state_dict())
    acts = [m for m in swish.modules() if isinstance(m, Swish)]
    assert len(acts) == 17 and not any(isinstance(m, nn.ReLU) for m in swish.modules())
    z = torch.linspace(-4, 4, 9, requires_grad=True)
    out = acts[0](z)
    out.sum().backward()
    s = torch.sigmoid(z.detach())
    assert torch.allclose(out, z.detach() * s) and torch.allclose(z.grad, s * (1 + z.detach() * (1 - s)))
    with pytest.raises(ValueError, match="dm_preact_resnet18"):
        create_model("preact_resnet18", 10, activation="swish")


# ----------------------------------------------------------------------------- resume, all options on

def _fit_with_stops(cfg, out, stops, monkeypatch):
    pending = sorted(stops)
    orig = Trainer.train_step

    def step(self, *a, **k):
        res = orig(self, *a, **k)
        if pending and self.global_step == pending[0]:
            pending.pop(0)
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    monkeypatch.setattr(Trainer, "train_step", step)
    resume = False
    while True:
        try:
            return Trainer(cfg, out, resume=resume, progress=False).fit()
        except TrainingInterrupted:
            resume = True


def _same(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{where}[{i}]")


@pytest.mark.parametrize("preset, extra", [
    ("digits-trades-adr", ["objective.forward=concat", "attack.start=uniform", "awp.enabled=true",
                           "awp.variant=sam", "optim.schedule=cosine", "optim.warmup_epochs=0.5",
                           "optim.warmup_start_lr=1e-6", "optim.lr_lag_steps=1", "optim.bn_weight_decay=false",
                           "attack.bn_mode=train"]),
    ("digits-trades", ["objective.forward=three_pass", "attack.start=normal", "swa.enabled=true",
                       "swa.start_epoch=0", "swa.bn_form=code", "data.augment=true"]),
])
def test_mid_epoch_resume_is_bit_exact_with_the_new_options(tmp_path, monkeypatch, preset, extra):
    cfg = load_config(preset, TINY + ["data.drop_last=true"] + extra)
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    _fit_with_stops(cfg, tmp_path / "run", [2, 4], monkeypatch)  # mid-epoch 1, mid-epoch 2 (3 steps each)
    a = safe_torch_load(tmp_path / "run" / RUN_FILES["checkpoint"])
    b = safe_torch_load(tmp_path / "ref" / RUN_FILES["checkpoint"])
    for key in ("model", "optimizer", "rectifier", "wa", "swa", "awp", "rng", "global_step"):
        _same(a[key], b[key], key)
    assert a["global_step"] == 6
