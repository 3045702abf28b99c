"""Objectives (PGD-AT, TRADES) and the weight-space companions (EMA/WA, SWA, AWP)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _extras import need
from rb_labelrefine import AWP, EMA, PGDAT, SWA, TRADES, OneHot, Target, bn_update, scale_decay, trades_kl
from rb_labelrefine.attacks import build_attack


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------ objectives
def test_trades_loss_is_natural_ce_plus_beta_kl():
    model = _net()
    x, y = _batch()
    x_adv = (x + 0.05).clamp(0, 1)
    obj = TRADES(attack=None, beta=6.0)
    model.eval()
    loss, _ = obj.loss(model, x, x_adv, Target(y))
    ln, la = model(x), model(x_adv)
    kl = (F.softmax(ln, 1) * (F.log_softmax(ln, 1) - F.log_softmax(la, 1))).sum(1).mean()
    assert torch.allclose(loss, F.cross_entropy(ln, y) + 6.0 * kl, atol=1e-5)
    assert torch.allclose(trades_kl(ln, la), kl, atol=1e-6)


def test_trades_soft_target_replaces_label_in_natural_term_only():
    model = _net().eval()
    x, y = _batch()
    x_adv = (x - 0.05).clamp(0, 1)
    dist = torch.softmax(torch.randn(6, 3), 1)
    loss, _ = TRADES(None, beta=2.0).loss(model, x, x_adv, Target(y, dist))
    ln, la = model(x), model(x_adv)
    expect = -(dist * F.log_softmax(ln, 1)).sum(1).mean() + 2.0 * trades_kl(ln, la)
    assert torch.allclose(loss, expect, atol=1e-5)


def test_pgd_at_attack_accepts_soft_targets_and_stays_in_ball():
    model = _net().eval()
    x, y = _batch(16)
    atk = build_attack("pgd", model, eps=0.1, alpha=0.03, steps=5, bn_mode="eval")
    dist = torch.softmax(torch.randn(16, 3), 1)
    obj = PGDAT(atk)
    x_adv = obj.adversarial(model, x, Target(y, dist))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # the attack raises the soft-target loss
    ce = lambda inp: -(dist * F.log_softmax(model(inp), 1)).sum(1).mean()
    assert ce(x_adv) > ce(x)
    loss, logits = obj.loss(model, x, x_adv, Target(y, dist))
    assert torch.allclose(loss, ce(x_adv), atol=1e-6) and logits.shape == (16, 3)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_attack_bn_mode(bn_mode):
    model = _net()
    model.train()
    bn = model[2]
    before = bn.running_mean.clone()
    x, y = _batch(8)
    atk = build_attack("pgd", model, eps=0.1, alpha=0.05, steps=2, bn_mode=bn_mode)
    atk(x, y)
    changed = not torch.equal(before, bn.running_mean)
    assert changed == (bn_mode == "train")      # train mode: batch statistics, running stats updated
    assert model.training                        # the caller's mode is restored


def test_tpgd_is_the_trades_attack():
    model = _net().eval()
    x, y = _batch(8)
    x_adv = build_attack("tpgd", model, eps=0.1, alpha=0.03, steps=3, bn_mode="eval")(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert trades_kl(model(x), model(x_adv)) > trades_kl(model(x), model(x + 1e-4 * 0))


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("name,norm,bn_mode", [("pgd", "Linf", "train"), ("pgd", "L2", "eval"),
                                               ("tpgd", "Linf", "eval"), ("fgsm", "Linf", "train"),
                                               ("mifgsm", "Linf", "eval")])
def test_attacks_match_torchattacks_exactly(name, norm, bn_mode):
    """The package's own attacks draw the same random numbers and take the same steps as
    torchattacks 3.x: the same x' (and the same BatchNorm statistics) from the same seed."""
    torchattacks = need("torchattacks")
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 3, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    soft = torch.softmax(torch.randn(6, 3, generator=g), 1)
    eps, alpha, steps = (0.5, 0.2, 3) if norm == "L2" else (0.1, 0.03, 3)
    cls = {("pgd", "Linf"): torchattacks.PGD, ("pgd", "L2"): torchattacks.PGDL2, ("tpgd", "Linf"): torchattacks.TPGD,
           ("fgsm", "Linf"): torchattacks.FGSM, ("mifgsm", "Linf"): torchattacks.MIFGSM}[name, norm]
    outs = []
    for impl in ("ours", "torchattacks"):
        model = _conv_net().train()
        if impl == "ours":
            atk = build_attack(name, model, eps=eps, alpha=alpha, steps=steps, norm=norm, bn_mode=bn_mode)
        else:
            kw = {"eps": eps} if name == "fgsm" else {"eps": eps, "alpha": alpha, "steps": steps}
            atk = cls(model, **kw)
            train = bn_mode == "train"
            atk.set_model_training_mode(model_training=train, batchnorm_training=train, dropout_training=False)
        torch.manual_seed(11)
        labels = y if name in ("tpgd", "fgsm") else soft        # soft targets too (ADR Eq. 2)
        outs.append((atk(x, labels), model[1].running_mean.clone(), model.training))
    (ours, rm_ours, tr_ours), (ref, rm_ref, _) = outs
    assert torch.equal(ours, ref)
    assert torch.equal(rm_ours, rm_ref)
    assert tr_ours


def test_apgd_needs_the_attacks_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchattacks", None)     # as if it were not installed
    with pytest.raises(ImportError, match=r'extra \[attacks\]\); install it with pip install --no-deps'):
        build_attack("apgd", _net(), eps=0.1, alpha=0.1, steps=1)


def test_build_attack_errors():
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("nope", _net(), eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="bn_mode"):
        build_attack("pgd", _net(), eps=0.1, alpha=0.1, steps=1, bn_mode="sometimes")


# ------------------------------------------------------------------ EMA / WA
def test_ema_average_including_buffers():
    model = _net()
    ema = EMA(model, decay=0.75)
    w0 = ema.module[1].weight.clone()
    with torch.no_grad():
        model[1].weight.add_(2.0)
        model[2].running_mean.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module[1].weight, 0.75 * w0 + 0.25 * model[1].weight, atol=1e-6)
    assert torch.allclose(ema.module[2].running_mean, 0.25 * model[2].running_mean, atol=1e-6)
    assert torch.equal(ema.module[2].num_batches_tracked, model[2].num_batches_tracked)
    assert not ema.module.training


def test_ema_warmup_copies_raw_weights():
    model = _net()
    ema = EMA(model, decay=0.9, warmup_steps=2)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.module[1].weight, model[1].weight)


def test_scale_decay_keeps_horizon_in_epochs():
    assert scale_decay(0.995, 391, 391) == 0.995
    d = scale_decay(0.995, 4, 391)
    assert d == pytest.approx(0.995 ** (391 / 4))
    # after one epoch, the weight left on the old average is the same as on CIFAR
    assert d ** 4 == pytest.approx(0.995 ** 391)
    assert scale_decay(0.995, 4, None) == 0.995


# ------------------------------------------------------------------ SWA
def test_swa_running_mean_of_epoch_snapshots_from_start_epoch():
    model = _net()
    swa = SWA(model, start_epoch=1)
    snaps = []
    for epoch in range(4):
        with torch.no_grad():
            model[1].weight.add_(float(epoch + 1))
        if swa.end_epoch(model, epoch):
            snaps.append(model[1].weight.clone())
    assert int(swa.n_averaged) == 3
    assert torch.allclose(swa.module[1].weight, torch.stack(snaps).mean(0), atol=1e-5)


def test_bn_update_recomputes_statistics():
    model = _net()
    x, _ = _batch(64)
    loader = [(x[i:i + 16], None, None) for i in range(0, 64, 16)]
    bn_update(loader, model)
    feats = model[1](model[0](x))
    assert torch.allclose(model[2].running_mean, feats.mean(0), atol=1e-5)
    assert model[2].momentum == 0.1


# ------------------------------------------------------------------ AWP
def test_awp_perturbs_by_gamma_times_norm_and_restores_exactly():
    model = _net().eval()   # eval: the loss evaluations below must not move BN statistics
    orig = copy.deepcopy(model.state_dict())
    x, y = _batch()
    awp = AWP(model, gamma=0.01)
    loss_fn = lambda m: F.cross_entropy(m(x), y)
    base_loss = loss_fn(model).item()
    awp.perturb(model, loss_fn)
    for name in ("1.weight", "4.weight"):
        diff = model.state_dict()[name] - orig[name]
        assert diff.norm().item() == pytest.approx(0.01 * orig[name].norm().item(), rel=1e-4)
    assert torch.equal(model.state_dict()["1.bias"], orig["1.bias"])   # rank-1 tensors untouched
    assert loss_fn(model).item() > base_loss - 1e-6                     # ascent direction
    awp.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k]), k


def test_awp_keeps_the_update_taken_at_perturbed_weights():
    model = _net()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    awp = AWP(model, gamma=0.01)
    w_before = model[1].weight.detach().clone()
    awp.perturb(model, lambda m: F.cross_entropy(m(x), y))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = model[1].weight.grad.clone()
    opt.step()
    awp.restore()
    assert torch.allclose(model[1].weight, w_before - 0.1 * g, atol=1e-6)


def test_onehot_target_loss_is_cross_entropy():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(OneHot(3).targets(torch.zeros(4, 1), y).loss(logits), F.cross_entropy(logits, y))
