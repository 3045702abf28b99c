"""Differential tests: a preset, unmodified but for model, data and epochs, trains step for step
like the public code it is the official run of.

Each ``ref_*`` function below is a plain-torch transcription of one public training script's
order of operations (read from the repository named in its docstring); none of them imports the
package's objectives, averaging or rectifiers.  Both sides start from the same initial weights,
see the same batches (recorded from the package's loader) and draw the attacks' random starts
from the same global RNG stream (seeded identically right before the first step; the package
draws nothing else from it during training).  Tiny model with BatchNorm, 20 images of 3x8x8,
batch 8, a few epochs: weights, BatchNorm statistics, EMA / SWA and per-sample memories must
agree to 1e-5.

Overrides beyond model, data and epochs are named where a feature would otherwise start after
the few epochs a test runs (SGLR's start epoch, SWA's start) or needs files (KD teachers).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rb_labelrefine.config import apply_overrides, config_from_dict, load_raw
from rb_labelrefine.data import DataInfo, IndexedDataset, TensorImageDataset
from rb_labelrefine.training.trainer import Trainer, lr_at

N, BATCH, C = 20, 8, 10
TOL = 1e-5
SEED = 1234


@pytest.fixture(autouse=True)
def _float64():
    """Both sides in double precision.  In float32 the two sides' equivalent but differently
    ordered operations (an EMA as lerp or as a*x + b*y, SGD's fused updates) leave 1e-7 differences
    that flip the sign of a near-zero input gradient every few steps -- a full 2*alpha move of a
    pixel of x'; in float64 they stay at 1e-15 and a sign flip is not a realistic event."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- the package side

def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 3, 8, 8, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    info = DataInfo(name="cifar10", num_classes=C, channels=3, image_size=8, mean=(0.5, 0.5, 0.5),
                    std=(0.25, 0.25, 0.25), source="test")
    ds = IndexedDataset(TensorImageDataset(x, y))
    empty = IndexedDataset(TensorImageDataset(x[:0], y[:0]))
    return x, y, (ds, empty, ds, info)


def _config(preset: str, epochs: int, extra=()):
    raw = load_raw(preset)
    over = [f"train.epochs={epochs}", "model.arch=tiny_cnn", "model.kwargs={width: 4}",
            f"data.batch_size={BATCH}", "data.augment=false", "train.device=cpu", *extra]
    return config_from_dict(apply_overrides(raw, over))


def package_run(preset, epochs, tmp_path, extra=()):
    """Drive ``Trainer.train_step`` the way ``Trainer._loop`` does (lr per step, the rectifier's
    and SWA's end of epoch), without the per-epoch evaluation.  Returns the trainer, the initial
    weights and the batches (dataset indices) it trained on."""
    cfg = _config(preset, epochs, extra)
    x, y, datasets = _data()
    tr = Trainer(cfg, tmp_path / "run", progress=False, handle_signals=False, datasets=datasets)
    tr._setup()
    init = copy.deepcopy(tr.model.state_dict())
    tr.global_step = 0
    tr.bn_batches = []
    batches = []
    torch.manual_seed(SEED)
    for epoch in range(epochs):
        tr.model.train()
        for b, (xb, yb, idx) in enumerate(tr.stream.epoch(epoch)):   # the stream's batches, as the loop takes them
            for g in tr.optimizer.param_groups:
                g["lr"] = lr_at(cfg, epoch, b, tr.steps_per_epoch)
            batches.append((epoch, idx.clone()))
            tr.train_step(xb, yb, idx, epoch)
        tr.rectifier.end_epoch(tr.model)
        if tr.swa is not None and tr.swa.end_epoch(tr.model, epoch) and cfg.swa.bn_form == "code":
            # the loop's BatchNorm recompute after every snapshot; its batches are recorded so the
            # reference walks the same shuffled partition.  Like the evaluation, it belongs to the end
            # of the epoch, whose draws from the global RNG (here: the loader's base seed; in the code:
            # its shuffle and evaluation attacks) are not part of the comparison.
            with torch.random.fork_rng(devices=[]):
                bn_batches = list(tr._bn_loader(epoch))
            tr.bn_batches.append([b[2] for b in bn_batches])
            tr.swa.update_bn(bn_batches, device=tr.device, form="code")
    return tr, init, batches


def fresh_model(tr, init):
    m = copy.deepcopy(tr.model)
    m.load_state_dict(init)
    m.train()
    return m


# ----------------------------------------------------------------------------- comparisons

def _float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def assert_same(a: nn.Module, b: nn.Module, what: str, buffers: bool = True):
    """Parameters (and floating buffers: BatchNorm statistics) equal to TOL.  The integer
    ``num_batches_tracked`` is not compared: it only matters for ``momentum=None``."""
    sa = _float_state(a) if buffers else dict(a.named_parameters())
    sb = _float_state(b) if buffers else dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].detach() - sb[k].detach()).abs().max()) for k in sa)
    assert worst < TOL, f"{what}: max abs difference {worst:.3g}"
    return worst


def _moved(a: nn.Module, init: dict):
    """The run changed the weights (a comparison of two untouched models proves nothing)."""
    return max(float((p.detach() - init[k]).abs().max()) for k, p in a.named_parameters()) > 1e-4


# ----------------------------------------------------------------------------- reference pieces

def ce(logits, target):
    """nn.CrossEntropyLoss: integer labels or class probabilities (both codes use it)."""
    return nn.CrossEntropyLoss()(logits, target)


def timm_multistep_lr(base, step, milestones_steps, gamma=0.1):
    """timm MultiStepLRScheduler as the ADR code drives it: ``scheduler.step(t)`` after step t sets
    ``base * gamma ** bisect_right(decay_t, t + 1)`` for step t + 1 (step 0: base)."""
    if step == 0:
        return base
    return base * gamma ** sum(1 for m in milestones_steps if m <= step)


def timm_cosine_lr(base, step, total, warmup_t, warmup_init=1e-6, lr_min=0.0):
    """timm CosineLRScheduler (ADR code, generated-data configs): step 0 runs at warmup_init,
    step s at the value set after step s - 1."""
    t = max(step - 1, 0)
    if step == 0 or t < warmup_t:
        return warmup_init + t * (base - warmup_init) / warmup_t if step else warmup_init
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / total))


def adr_cosine(base, final, epochs, n):
    """src/util/utils.py cosine_scheduler (no warm-up), indexed by global step."""
    iters = np.arange(epochs * n)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


class TimmEma:
    """timm ModelEmaV2 (the ADR code's teacher / WA): a deepcopy in eval mode, every state_dict
    entry updated as ``decay * ema + (1 - decay) * model``."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model):
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.copy_(e * self.decay + (1.0 - self.decay) * m)
            else:
                e.copy_(m)


def _set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- ADR code (yuyuwu5/ADR)

def ref_adr_code(model, x, y, batches, *, epochs, n, obj, awp, adr, lr, nesterov, schedule, rho=0.005,
                 lam=(0.7, 0.95), tau=(2.5, 2.0), bn_no_decay=False, warmup=2.5, eps=8 / 255, alpha=2 / 255):
    """src/advTrainer.py ``_train_one_epoch`` with src/adr.py, src/util/pgd_attack.py,
    src/util/trades_attack.py, src/util/awp.py, src/util/bypass_bn.py and the optimizer and
    scheduler of src/util/optimizer_scheduler.py."""
    torch.manual_seed(SEED)
    ema = TimmEma(model, 0.995)
    if bn_no_decay:  # group_weight: BatchNorm parameters without weight decay (extra-data runs)
        bn = {id(p) for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
              for p in mod.parameters()}
        params = [dict(params=[p for p in model.parameters() if id(p) not in bn]),
                  dict(params=[p for p in model.parameters() if id(p) in bn], weight_decay=0.0)]
    else:
        params = model.parameters()
    # build_sgd_optimizer: nesterov=True; build_awp_optimizer: AWP around plain torch.optim.SGD
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=nesterov and not awp)
    taus = adr_cosine(tau[0], tau[1], epochs, n)
    lams = adr_cosine(lam[0], lam[1], epochs, n)
    for step, (epoch, idx) in enumerate(batches):
        if schedule == "cosine":
            _set_lr(opt, timm_cosine_lr(lr, step, epochs * n, int(warmup * n)))
        else:
            _set_lr(opt, timm_multistep_lr(lr, step, [100 * n, 150 * n]))
        img, label = x[idx], y[idx]
        model.train()
        if adr:  # ADR.__call__
            with torch.no_grad():
                onehot = F.one_hot(label, C)
                pt = F.softmax(ema.module(img) / taus[step], dim=1)
                target_prob = torch.gather(pt, 1, label.unsqueeze(1)).squeeze()
                lam_i = torch.clamp(lams[step] - (pt.max(1)[0] - target_prob), 0.0, 1.0).unsqueeze(1)
                label = lam_i * pt + (1 - lam_i) * onehot
        if obj == "pgd":  # PGD.attack, model left in train mode
            adv = img.clone() + torch.empty_like(img).uniform_(-eps, eps)
            adv = torch.clamp(adv, 0, 1).detach()
            for _ in range(10):
                adv.requires_grad = True
                g = torch.autograd.grad(ce(model(adv), label), adv)[0]
                adv = adv.detach() + alpha * g.sign()
                adv = torch.clamp(img + torch.clamp(adv - img, -eps, eps), 0, 1).detach()
        else:  # TRADES.attack
            kl = nn.KLDivLoss(reduction="batchmean", log_target=True)
            adv = img.clone().detach() + 0.001 * torch.rand_like(img).detach()
            with torch.no_grad():
                nat = F.log_softmax(model(img), dim=1)
            for _ in range(10):
                adv.requires_grad = True
                g = torch.autograd.grad(kl(F.log_softmax(model(adv), dim=1), nat), adv)[0]
                adv = adv.detach() + alpha * torch.sign(g.detach())
                adv = torch.clamp(torch.min(torch.max(adv, img - eps), img + eps), 0.0, 1.0).detach()
        model.train()
        opt.zero_grad()

        def loss_fn():
            if obj == "pgd":
                return ce(model(adv), label)
            out = model(torch.cat([img, adv]))
            nat_l, adv_l = out[: img.shape[0]], out[img.shape[0]:]
            kl = nn.KLDivLoss(reduction="batchmean", log_target=True)
            return ce(nat_l, label) + 6.0 * kl(F.log_softmax(adv_l, 1), F.log_softmax(nat_l, 1))

        if awp:
            loss_fn().backward()
            old = {}
            with torch.no_grad():  # AWP.first_step
                for p in model.parameters():
                    if p.grad is None:
                        continue
                    old[p] = p.data.clone()
                    p.add_(p.grad * (rho * p.data.norm() / (p.grad.norm() + 1e-20)))
            opt.zero_grad()
            bns = [mm for mm in model.modules() if isinstance(mm, nn.modules.batchnorm._BatchNorm)]
            moms = [mm.momentum for mm in bns]
            for mm in bns:  # disable_running_stats
                mm.momentum = 0
            loss_fn().backward()
            with torch.no_grad():  # AWP.second_step
                for p in model.parameters():
                    if p.grad is not None:
                        p.data = old[p]
            opt.step()
            opt.zero_grad()
            for mm, mo in zip(bns, moms):  # enable_running_stats
                mm.momentum = mo
        else:
            loss_fn().backward()
            opt.step()
        ema.update(model)
    return model, ema


ADR_CASES = {
    # preset: the gin file's values (config/cifar10/...)
    "cifar10-resnet18-pgdat-adr-wa": dict(obj="pgd", awp=False, adr=True, lam=(0.7, 0.95), tau=(2.5, 2.0)),
    "cifar10-resnet18-pgdat-adr-wa-awp": dict(obj="pgd", awp=True, adr=True, lam=(0.7, 0.85), tau=(2.5, 1.5)),
    "cifar10-resnet18-trades-adr-wa": dict(obj="trades", awp=False, adr=True, lam=(0.7, 0.95), tau=(2.5, 2.0)),
    "cifar10-resnet18-trades-adr-wa-awp": dict(obj="trades", awp=True, adr=True, lam=(0.7, 0.85), tau=(2.5, 1.5)),
    "cifar100-resnet18-pgdat-adr-awp": dict(obj="pgd", awp=True, adr=True, lam=(0.7, 0.85), tau=(2.0, 1.0)),
    "tinyimagenet-resnet18-pgdat-adr-awp": dict(obj="pgd", awp=True, adr=True, lam=(0.3, 0.9), tau=(2.0, 1.5),
                                                rho=0.001),
    "cifar10-resnet18-pgdat-wa": dict(obj="pgd", awp=False, adr=False),          # PGD-AT baseline
    "cifar10-resnet18-trades-wa-awp": dict(obj="trades", awp=True, adr=False),    # TRADES baseline
}


@pytest.mark.parametrize("preset", sorted(ADR_CASES))
def test_adr_code_runs(preset, tmp_path):
    case = ADR_CASES[preset]
    epochs = 3
    tr, init, batches = package_run(preset, epochs, tmp_path)
    x, y, _ = _data()
    n = N // BATCH  # the ADR code's loader drops the last partial batch
    assert tr.steps_per_epoch == n and len(batches) == epochs * n
    ref, ema = ref_adr_code(fresh_model(tr, init), x, y, batches, epochs=epochs, n=n, lr=0.1, nesterov=True,
                            schedule="multistep", **case)
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, f"{preset}: weights and BatchNorm statistics")
    teacher = tr.wa.module if tr.wa is not None else tr.rectifier.teacher.module
    assert_same(teacher, ema.module, f"{preset}: EMA (ADR teacher / WA)")


def test_adr_code_generated_data_run(tmp_path):
    """config/cifar10/preact-resnet18_pgd_awp_adr.gin without its DDPM data: lr 0.4, timm cosine
    with a 2.5-epoch warm-up from 1e-6, no weight decay on BatchNorm, SAM-style AWP."""
    preset, epochs = "cifar10-preactresnet18-pgdat-adr-wa-awp", 4
    # the data override: the transcription trains on the real batches only (no DDPM file here)
    tr, init, batches = package_run(preset, epochs, tmp_path, extra=("data.aux_fraction=0",))
    x, y, _ = _data()
    n = N // BATCH
    ref, ema = ref_adr_code(fresh_model(tr, init), x, y, batches, epochs=epochs, n=n, obj="pgd", awp=True,
                            adr=True, lam=(0.7, 0.85), tau=(2.5, 1.5), lr=0.4, nesterov=False, schedule="cosine",
                            bn_no_decay=True)
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, "generated-data run: weights and BatchNorm statistics")
    assert_same(tr.wa.module, ema.module, "generated-data run: EMA")


# ----------------------------------------------------------------------------- TRADES code

def ref_trades_attack(model, xn, kl_sum, eps, step_size):
    """trades.py ``trades_loss``'s inner maximisation (the TRADES-AWP code has the same loop): start
    at x + 0.001 N(0, 1) unclamped, 10 signed steps on the summed KL to the clean prediction."""
    adv = xn.detach() + 0.001 * torch.randn(xn.shape).detach()
    for _ in range(10):
        adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = kl_sum(F.log_softmax(model(adv), dim=1), F.softmax(model(xn), dim=1))
        g = torch.autograd.grad(loss_kl, [adv])[0]
        adv = adv.detach() + step_size * torch.sign(g.detach())
        adv = torch.clamp(torch.min(torch.max(adv, xn - eps), xn + eps), 0.0, 1.0)
    return adv

def ref_trades_code(model, x, y, batches, *, eps=0.031, step_size=0.007, beta=6.0):
    """yaodongyu/TRADES train_trades_cifar10.py + trades.py ``trades_loss`` (lr constant over the
    few epochs: its decays are at the 1-based epochs 75/90/100)."""
    torch.manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    kl_sum = nn.KLDivLoss(reduction="sum")
    model.train()
    for epoch, idx in batches:
        xn, t = x[idx], y[idx]
        opt.zero_grad()
        model.eval()
        adv = ref_trades_attack(model, xn, kl_sum, eps, step_size)
        model.train()
        adv = torch.clamp(adv, 0.0, 1.0).detach()
        opt.zero_grad()
        logits = model(xn)
        loss = F.cross_entropy(logits, t) + beta * (1.0 / len(xn)) * kl_sum(
            F.log_softmax(model(adv), dim=1), F.softmax(model(xn), dim=1))
        loss.backward()
        opt.step()
    return model


def test_trades_code_run(tmp_path):
    preset, epochs = "cifar10-resnet18-trades", 3
    tr, init, batches = package_run(preset, epochs, tmp_path)
    x, y, _ = _data()
    assert tr.steps_per_epoch == math.ceil(N / BATCH)  # no drop_last in the TRADES code
    ref = ref_trades_code(fresh_model(tr, init), x, y, batches)
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, "TRADES code: weights and BatchNorm statistics (three train-mode passes)")


# ----------------------------------------------------------------------------- locuslab PGD-AT

def ref_rice_code(model, x, y, batches, *, epochs, n, eps=8 / 255, alpha=2 / 255):
    """locuslab/robust_overfitting train_cifar.py (PGD, 1 restart, no early stop), piecewise lr
    evaluated at ``epoch + (i + 1) / n``."""
    torch.manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def lr_schedule(t):
        return 0.1 if t / epochs < 0.5 else (0.01 if t / epochs < 0.75 else 0.001)

    for step, (epoch, idx) in enumerate(batches):
        X, t = x[idx], y[idx]
        model.train()
        opt.param_groups[0].update(lr=lr_schedule(epoch + (step % n + 1) / n))
        delta = torch.zeros_like(X).uniform_(-eps, eps)
        delta = torch.min(torch.max(delta, 0 - X), 1 - X)
        delta.requires_grad = True
        for _ in range(10):
            loss = F.cross_entropy(model(X + delta), t)
            loss.backward()
            g = delta.grad.detach()
            d = torch.clamp(delta + alpha * torch.sign(g), min=-eps, max=eps)
            d = torch.min(torch.max(d, 0 - X), 1 - X)
            delta.data = d
            delta.grad.zero_()
        F.cross_entropy(model(X + delta), t, reduction="none")  # the restart's loss (BN statistics only)
        delta = delta.detach()
        loss = F.cross_entropy(model(torch.clamp(X + delta, 0, 1)), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model(X)  # the clean accuracy forward (BN statistics only)
    return model


def test_rice_pgdat_run(tmp_path):
    """Both lr decays (at 50 % and 75 % of 4 epochs, one step early as in the code) included.
    Weights only: the code's two extra train-mode forwards move its BatchNorm statistics, not its
    trajectory (the attack runs in train mode) -- documented in docs/fidelity.md."""
    preset, epochs = "cifar10-preactresnet18-pgdat", 4
    n = math.ceil(N / BATCH)
    tr, init, batches = package_run(preset, epochs, tmp_path)
    x, y, _ = _data()
    ref = ref_rice_code(fresh_model(tr, init), x, y, batches, epochs=epochs, n=n)
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, "locuslab PGD-AT: weights", buffers=False)


# ----------------------------------------------------------------------------- SGLS code

def ref_sgls_code(model, x, y, batches, *, es, momentum=0.9, eps=8 / 255, step_size=2 / 255):
    """devicerxx/SGLS main_adv.py ``train`` with losses/loss.py ``SGLS.__call__`` (1-based epochs;
    lr constant: MultiStepLR(100, 150) stepped with the epoch)."""
    torch.manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
    soft = torch.zeros(N, C)
    soft[torch.arange(N), y] = 1
    for epoch0, index in batches:
        epoch = epoch0 + 1
        xn, t = x[index], y[index]
        model.train()
        opt.zero_grad()
        model.eval()
        adv = xn.detach() + torch.empty_like(xn).uniform_(-eps, eps)
        adv = torch.clamp(adv, min=0, max=1)
        for _ in range(10):
            adv.requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(model(adv), t)
            g = torch.autograd.grad(loss, [adv])[0]
            adv = adv.detach() + step_size * torch.sign(g.detach())
            adv = torch.clamp(torch.min(torch.max(adv, xn - eps), xn + eps), 0.0, 1.0)
        model.train()
        opt.zero_grad()
        adv = torch.clamp(adv, 0.0, 1.0).detach()
        logits = model(adv)
        if epoch < es:
            loss = F.cross_entropy(logits, t)
        else:
            prob = F.softmax(logits.detach(), dim=1)
            clean_prob = F.softmax(model(xn).detach(), dim=1)
            soft[index] = momentum * soft[index] + (1 - momentum) * (0.2 * clean_prob + 0.8 * prob)
            loss = torch.sum(-F.log_softmax(logits, dim=1) * soft[index], dim=1).mean()
        loss.backward(retain_graph=True)
        opt.step()
    return model, soft


@pytest.mark.parametrize("start", [None, 2])
def test_sgls_code_run(start, tmp_path):
    """The code form as published (es = 90: hard labels throughout 3 epochs) and with es = 2 (the one
    extra override, so that the soft labels start within the test; 1-based like the code)."""
    preset, epochs = "cifar10-resnet18-pgdat-sglr-code", 3
    extra = [f"method.start_epoch={start}"] if start else []
    tr, init, batches = package_run(preset, epochs, tmp_path, extra=extra)
    x, y, _ = _data()
    ref, soft = ref_sgls_code(fresh_model(tr, init), x, y, batches, es=start or 90)
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, "SGLS code: weights and BatchNorm statistics")
    rect = tr.rectifier
    mem = torch.where(rect.seen[:, None], rect.memory, F.one_hot(y, C).float())  # rows not yet written: onehot
    diff = float((mem - soft).abs().max())
    assert diff < TOL, f"SGLS code: per-sample memory differs by {diff:.3g}"
    if start:
        assert float((soft - F.one_hot(y, C).float()).abs().max()) > 1e-3  # the soft phase did run


# ----------------------------------------------------------------------------- KD+SWA code

def ref_kd_swa_code(model, teachers, x, y, batches, bn_batches, *, swa_start, coef, T=2.0, eps=8 / 255,
                    gamma=2 / 255):
    """VITA-Group/Alleviate-Robust-Overfitting main_adv.py + utils.py: advertorch LinfPGDAttack
    (rand_init, CE, clip [0, 1]) on the model in train mode, ``train_epoch_adv_dual_teacher``
    (teacher1 = standard, teacher2 = robust), ``loss_fn_kd`` (T^2 * cross-entropy), after each epoch
    from ``swa_start``: ``moving_average`` (parameters) then ``bn_update`` over the shuffled loader."""
    torch.manual_seed(SEED)
    std_t, rob_t = teachers
    coef_ce, coef_kd1, coef_kd2 = coef
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
    swa = copy.deepcopy(model)
    swa_n = 0

    def loss_fn_kd(scores, target_scores):
        kd = -(F.softmax(target_scores / T, dim=1) * F.log_softmax(scores / T, dim=1)).sum(dim=1).mean()
        return kd * T ** 2

    epochs = sorted({e for e, _ in batches})
    for epoch in epochs:
        model.train()
        std_t.eval()
        rob_t.eval()
        for e, idx in batches:
            if e != epoch:
                continue
            xb, t = x[idx], y[idx]
            delta = torch.zeros_like(xb)
            delta.uniform_(-1, 1)
            delta = eps * delta
            delta = torch.clamp(xb + delta, 0.0, 1.0) - xb
            delta.requires_grad_()
            for p in model.parameters():  # ctx_noparamgrad
                p.requires_grad_(False)
            for _ in range(10):
                loss = nn.CrossEntropyLoss()(model(xb + delta), t)
                loss.backward()
                delta.data = delta.data + gamma * delta.grad.data.sign()
                delta.data = torch.clamp(delta.data, -eps, eps)
                delta.data = torch.clamp(xb.data + delta.data, 0.0, 1.0) - xb.data
                delta.grad.data.zero_()
            for p in model.parameters():
                p.requires_grad_(True)
            adv = torch.clamp(xb + delta, 0.0, 1.0).detach()
            out = model(adv)
            with torch.no_grad():
                s1, s2 = std_t(adv), rob_t(adv)
            loss = (nn.CrossEntropyLoss()(out, t) * coef_ce + loss_fn_kd(out, s1) * coef_kd1
                    + loss_fn_kd(out, s2) * coef_kd2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch >= swa_start:
            with torch.no_grad():  # moving_average(swa_model, model, 1 / (swa_n + 1))
                a = 1.0 / (swa_n + 1)
                for p1, p2 in zip(swa.parameters(), model.parameters()):
                    p1.data *= (1.0 - a)
                    p1.data += p2.data * a
            swa_n += 1
            kd_bn_update(swa, x, bn_batches.pop(0))
    return model, swa


def kd_bn_update(model, x, loader):
    """utils.py ``bn_update``: reset the statistics, then momentum b / (n + b) per batch of the
    shuffled training loader (the package's shuffled partition, recorded: ``loader`` holds index
    tensors)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    momenta = {}
    for m in bns:
        m.running_mean = torch.zeros_like(m.running_mean)
        m.running_var = torch.ones_like(m.running_var)
        momenta[m] = m.momentum
    n = 0
    with torch.no_grad():
        for idx in loader:
            xb = x[idx]
            b = xb.size(0)
            for m in bns:
                m.momentum = b / (n + b)
            model(xb)
            n += b
    for m in bns:
        m.momentum = momenta[m]


def test_kd_swa_code_run(tmp_path):
    """Paper loss weights (the preset's default: robust 0.5, standard 0.25, CE 0.25).  Extra
    overrides: the two teachers' weight files, and SWA from epoch 1 (the preset starts it at the
    first lr decay, epoch 50)."""
    preset, epochs = "cifar10-preactresnet18-pgdat-kd-swa", 3
    cfg = _config(preset, epochs)
    _, _, datasets = _data()
    from rb_labelrefine.runs import build_model_for

    paths = []
    for i, name in enumerate(("standard", "robust")):
        torch.manual_seed(100 + i)
        teacher = build_model_for(cfg, datasets[3])
        with torch.no_grad():  # non-trivial running statistics
            teacher.train()
            teacher(torch.rand(16, 3, 8, 8))
        p = tmp_path / f"{name}.pt"
        torch.save(teacher.state_dict(), p)
        paths.append(p)
    extra = [f"method.standard_teacher={paths[0]}", f"method.robust_teacher={paths[1]}", "swa.start_epoch=1"]
    tr, init, batches = package_run(preset, epochs, tmp_path, extra=extra)
    x, y, _ = _data()
    teachers = []
    for p in paths:
        t = build_model_for(cfg, datasets[3])
        t.load_state_dict(torch.load(p, weights_only=True))
        teachers.append(t)
    assert len(tr.bn_batches) == epochs - 1
    ref, swa = ref_kd_swa_code(fresh_model(tr, init), teachers, x, y, batches, list(tr.bn_batches), swa_start=1,
                               coef=(0.25, 0.25, 0.5))
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, "KD+SWA code: weights and BatchNorm statistics")
    assert_same(tr.swa.module, swa, "KD+SWA code: SWA weights and recomputed BatchNorm statistics")


# ----------------------------------------------------------------------------- TRADES-AWP code

def ref_trades_awp_code(model, x, y, batches, *, awp_warmup, gamma=0.005, beta=6.0, eps=8 / 255,
                        step_size=2 / 255):
    """csdongxian/AWP trades_AWP/train_trades_cifar.py ``train`` with utils_awp.py ``TradesAWP``
    (epochs from 1: AWP when ``epoch >= args.awp_warmup``; the proxy is a copy of the model, one
    SGD step (lr 0.1) on ``-(CE + beta KL)``, the layer-wise perturbation of every "weight" of rank
    >= 2 scaled to gamma * ||w||, removed after the optimizer step)."""
    torch.manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    proxy = copy.deepcopy(model)
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=0.1)
    kl_sum = nn.KLDivLoss(reduction="sum")
    for epoch0, idx in batches:
        epoch = epoch0 + 1
        xn, t = x[idx], y[idx]
        model.eval()  # perturb_input
        adv = ref_trades_attack(model, xn, kl_sum, eps, step_size)
        model.train()
        diff = None
        if epoch >= awp_warmup:  # TradesAWP.calc_awp, then perturb
            proxy.load_state_dict(model.state_dict())
            proxy.train()
            loss = -1.0 * (F.cross_entropy(proxy(xn), t) + beta * F.kl_div(
                F.log_softmax(proxy(adv), dim=1), F.softmax(proxy(xn), dim=1), reduction="batchmean"))
            proxy_opt.zero_grad()
            loss.backward()
            proxy_opt.step()
            new = proxy.state_dict()
            diff = {k: w.norm() / ((new[k] - w).norm() + 1e-20) * (new[k] - w)
                    for k, w in model.state_dict().items() if w.dim() > 1 and "weight" in k}
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if k in diff:
                        p.add_(gamma * diff[k])
        opt.zero_grad()
        logits_adv = model(adv)
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(xn), dim=1), reduction="batchmean")
        loss = F.cross_entropy(model(xn), t) + beta * loss_robust
        opt.zero_grad()
        loss.backward()
        opt.step()
        if diff is not None:  # restore
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if k in diff:
                        p.add_(-gamma * diff[k])
    return model


def test_trades_awp_code_run(tmp_path):
    """Extra override: AWP from the 0-based epoch 1 (the preset's 9 = the code's --awp-warmup 10),
    against the code's 1-based ``epoch >= 2``.  The loss passes x', x, x matter: the next step's
    eval-mode attack reads the running statistics they leave."""
    preset, epochs = "cifar10-wrn34-10-trades-awp", 3
    tr, init, batches = package_run(preset, epochs, tmp_path, extra=["awp.warmup_epochs=1"])
    x, y, _ = _data()
    ref = ref_trades_awp_code(fresh_model(tr, init), x, y, batches, awp_warmup=2)
    assert _moved(tr.model, init)
    assert_same(tr.model, ref, "TRADES-AWP code: weights and BatchNorm statistics")
