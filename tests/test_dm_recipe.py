"""The recipe of Wang et al. 2023 (github:wzekai99/DM-Improves-AT), the training of the top CIFAR
RobustBench entries: its presets, its swish DeepMind WideResNet, and a differential test of its
training step.

``ref_dm_code`` is a plain-torch transcription of the code's order of operations
(``gowal21uncovering/utils/watrain.py`` ``WATrainer.train`` / ``ema_update`` / ``update_bn``,
``gowal21uncovering/utils/trades.py`` ``trades_loss``, ``core/utils/utils.py``
``SmoothCrossEntropyLoss`` / ``track_bn_stats`` / ``set_bn_momentum``, ``core/utils/train.py``'s
``cosinew`` scheduler = torch's ``OneCycleLR`` stepped per epoch); it imports nothing of the
package's objectives, attacks, averaging or rectifiers.  The package side is
``Trainer.train_step`` of the unmodified preset with model, data and epochs overridden: a tiny
swish DMWideResNet (BatchNorm momentum 0.01, as the code's), 20 random 32x32 images plus a tiny
generated-data archive, batch 8 of which int(8 * 0.7) = 5 generated, 3 epochs.  Both sides draw the
attack's random start from the same global RNG stream; weights, BatchNorm statistics and the
weight average must agree to 1e-5 in float64.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rb_labelrefine.config import (ConfigError, apply_overrides, check_runnable, config_from_dict, list_presets,
                                   load_config, load_raw)
from rb_labelrefine.data import DataInfo, IndexedDataset, TensorImageDataset

N, BATCH, C, EPOCHS = 20, 8, 10, 3
TOL = 1e-5
SEED = 4321
EPS, ALPHA = 8 / 255, 2 / 255
PRESET = "cifar10-dmwrn28-10-wang2023"


def _trainer_mod():
    from rb_labelrefine.training import trainer

    return trainer


# ----------------------------------------------------------------------------- presets

def test_recipe_presets_exist_and_name_their_source():
    names = [n for n in list_presets() if "wang2023" in n]
    for ds in ("cifar10", "cifar100"):
        for arch in ("dmwrn28-10", "dmwrn70-16"):
            base = f"{ds}-{arch}-wang2023"
            for suffix in ("", "-adr", "-adr-auto", "-sglr", "-kd-swa", "-ltd"):
                assert base + suffix in names
    for n in names:
        cfg = load_config(n)
        assert "DM-Improves-AT" in cfg.description and "data.aux" in cfg.description
        assert ("UNTRIED" in cfg.description) == (not n.endswith("wang2023")), n
        assert cfg.data.aux is None and cfg.data.aux_fraction == 0.7 and cfg.data.aux_batch == "split"
        with pytest.raises(ConfigError) as exc:   # generated data required, as the other generated-data presets
            check_runnable(cfg)
        assert exc.value.field == "data.aux"


def test_recipe_values_from_the_code():
    cfg = load_config(PRESET)
    assert (cfg.objective.name, cfg.objective.beta, cfg.objective.forward) == ("trades", 5.0, "separate")
    assert (cfg.method.name, cfg.method.smoothing) == ("label_smoothing", 0.1)
    assert (cfg.wa.enabled, cfg.wa.decay, cfg.wa.form, cfg.wa.warmup_fraction) == (True, 0.995, "gowal", 0.025)
    assert (cfg.data.batch_size, cfg.data.epoch_images, cfg.data.augment) == (512, 50000, True)
    o = cfg.optim
    assert (o.lr, o.schedule, o.onecycle_pct_start, o.nesterov, o.weight_decay, o.bn_weight_decay) == \
        (0.2, "onecycle", 0.025, True, 5e-4, False)
    a = cfg.attack
    assert (a.name, a.steps, a.start, a.bn_mode) == ("tpgd", 10, "uniform_eps", "train_frozen")
    assert math.isclose(a.eps, 8 / 255) and math.isclose(a.alpha, 2 / 255)
    assert (cfg.train.epochs, cfg.train.bn_first_step_momentum) == (400, 1.0)
    assert cfg.model.arch == "dm_wrn_28_10"
    assert load_config("cifar100-dmwrn70-16-wang2023").model.arch == "dm_wrn_70_16"
    adr = load_config("cifar100-dmwrn28-10-wang2023-adr").method
    assert (adr.name, adr.tau_high, adr.tau_low) == ("adr", 1.5, 1.0)
    # in a batch of 512: the SemiSupervisedSampler's 154 real + 358 generated
    assert cfg.data.batch_size - int(cfg.data.batch_size * cfg.data.aux_fraction) == 154


@pytest.mark.parametrize("over, field", [
    ("data.aux_batch=both", "data.aux_batch"),
    ("data.epoch_images=0", "data.epoch_images"),
    ("optim.warmup_epochs=2", "optim.schedule"),
    ("wa.form=swa", "wa.form"),
    ("attack.bn_mode=frozen", "attack.bn_mode"),
    ("train.bn_first_step_momentum=0", "train.bn_first_step_momentum"),
])
def test_recipe_switches_reject_bad_values(over, field):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(apply_overrides(load_raw(PRESET), [over]))
    assert exc.value.field == field


def test_wa_warmup_fraction_needs_gowal_form():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(apply_overrides(load_raw("cifar10-resnet18-trades-wa"), ["wa.warmup_fraction=0.1"]))
    assert exc.value.field == "wa.warmup_fraction"


# ----------------------------------------------------------------------------- schedule and WA formulas

@pytest.mark.parametrize("epochs", [3, 10, 41, 400])
def test_onecycle_matches_torch_onecycle_stepped_per_epoch(epochs):
    """core/utils/train.py init_scheduler 'cosinew': OneCycleLR(max_lr=lr, pct_start=0.025,
    total_steps=num_epochs), scheduler.step() after each epoch; momentum cycled (torch default)."""
    onecycle_at = _trainer_mod().onecycle_at
    cfg = config_from_dict(apply_overrides(load_raw(PRESET), [f"train.epochs={epochs}"]))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2, momentum=0.9, nesterov=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=0.025, total_steps=epochs)
        for e in range(epochs):
            lr, mom = onecycle_at(cfg, e)
            assert math.isclose(lr, opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15), e
            assert math.isclose(mom, opt.param_groups[0]["momentum"], rel_tol=1e-12), e
            opt.step()
            sched.step()
    assert onecycle_at(config_from_dict(apply_overrides(load_raw(PRESET), ["optim.cycle_momentum=false"])), 0)[1] \
        is None


def _code_decay(global_step, decay_rate, warmup_steps):
    """watrain.py ema_update's decay (dynamic_decay=True)."""
    factor = int(global_step >= warmup_steps)
    delta = global_step - warmup_steps
    decay = min(decay_rate, (1. + delta) / (10. + delta)) if 10. + delta != 0 else decay_rate
    return decay * factor


def test_gowal_ema_decay_is_the_codes():
    from rb_labelrefine.averaging import GowalEMA

    warm = 0.025 * 400 * (50000 // 512 + 1)   # WATrainer.warmup_steps of the README run (980)
    ema = GowalEMA(nn.Linear(2, 2), decay=0.995, warmup_point=warm)
    for t in list(range(1, 1200)) + [5000, 39200]:
        assert ema.decay_at(t) == pytest.approx(_code_decay(t, 0.995, warm), abs=1e-15), t
    assert ema.decay_at(979) == 0.0 and ema.decay_at(980) == pytest.approx(0.1)


def test_gowal_ema_state_round_trip():
    from rb_labelrefine.averaging import GowalEMA

    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    a = GowalEMA(m, decay=0.99, warmup_point=2.5)
    for _ in range(4):
        with torch.no_grad():
            m[0].weight.add_(0.1)
        m(torch.randn(4, 3))
        a.update(m)
    b = GowalEMA(copy.deepcopy(m), decay=0.5, warmup_point=0.0)
    b.load_state_dict(a.state_dict())
    assert (b.decay, b.warmup_point, b._count) == (0.99, 2.5, 4)
    assert torch.equal(b.module[1].running_mean, m[1].running_mean)   # statistics: the model's


# ----------------------------------------------------------------------------- the swish WideResNet

def _rb_dm_module():
    from rb_labelrefine.compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures import dm_wide_resnet

    return dm_wide_resnet


def test_dm_wrn_28_10_is_robustbenchs_dmwideresnet():
    """Keys and shapes equal those of the installed robustbench's class as its model zoo builds
    Wang2023Better_WRN-28-10, and the same weights give the same outputs (batch of 2)."""
    from rb_labelrefine.models import create_model

    dm = _rb_dm_module()
    torch.manual_seed(0)
    mine = create_model("dm_wrn_28_10", num_classes=10)
    theirs = dm.DMWideResNet(num_classes=10, depth=28, width=10, activation_fn=nn.SiLU,
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    a, b = mine.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert all(m.momentum == 0.01 for m in mine.modules() if isinstance(m, nn.BatchNorm2d))
    theirs.load_state_dict(a)
    mine.eval(), theirs.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(mine(x), theirs(x), rtol=0, atol=1e-5)


def test_dm_wrn_70_16_shapes_match_robustbench():
    """WRN-70-16 (267M parameters): keys and shapes on the meta device (no memory)."""
    from rb_labelrefine.models.dm_wide_resnet import DMWideResNet

    dm = _rb_dm_module()
    with torch.device("meta"):
        mine = DMWideResNet(100, depth=70, width=16)
        theirs = dm.DMWideResNet(num_classes=100, depth=70, width=16, activation_fn=nn.SiLU)
    a, b = mine.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_dm_wrn_rejects_bad_arguments():
    from rb_labelrefine.models import create_model

    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("dm_wrn", num_classes=10, depth=27)
    with pytest.raises(ValueError, match="activation"):
        create_model("dm_wrn", num_classes=10, depth=10, width=1, activation="gelu")
    with pytest.raises(ValueError, match="32x32"):
        create_model("dm_wrn", num_classes=10, image_size=64, depth=10, width=1)


def test_dm_wrn_exports_as_robustbench_native_entry():
    """The model-zoo entry is RobustBench's own DMWideResNet(..., Swish, mean 0, std 1) inside
    normalize_model; loading the trained state into it reproduces the outputs exactly."""
    from rb_labelrefine.export import robustbench_export as rx
    from rb_labelrefine.models import build_model

    info = DataInfo(name="cifar10", num_classes=10, channels=3, image_size=32, mean=(0.49, 0.48, 0.45),
                    std=(0.25, 0.24, 0.26), source="test")
    torch.manual_seed(0)
    net = build_model("dm_wrn", 10, 3, 32, info.mean, info.std, depth=10, width=2)
    spec = rx._zoo_spec("dm_wrn", {"depth": 10, "width": 2}, info)
    assert spec.native and spec.callee == "DMWideResNet" and spec.module.endswith("dm_wide_resnet")
    rb = spec.build()
    rb.load_state_dict(rx._rb_layout(net.state_dict()))
    net.eval(), rb.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), rb(x))
    src = rx._zoo_source("Test2023_DMWRN", "cifar10", "Linf", "dm_wrn", spec)
    assert "import DMWideResNet, Swish" in src and "DMWideResNet(10, 10, 2, Swish, [0.0, 0.0, 0.0]" in src


# ----------------------------------------------------------------------------- differential test

@pytest.fixture
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _aux_file(tmp_path, n=30):
    rng = np.random.default_rng(0)
    path = tmp_path / "gen.npz"
    np.savez(path, image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, C, n).astype(np.int64))
    return path


def package_run(tmp_path, preset=PRESET, extra=(), epochs=EPOCHS):
    """``Trainer.train_step`` driven as ``Trainer._loop`` drives it (lr and momentum per epoch,
    the generated images stacked under each real batch); returns the trainer, the initial weights
    and the batches it trained on."""
    tm = _trainer_mod()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 3, 32, 32, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    info = DataInfo(name="cifar10", num_classes=C, channels=3, image_size=32, mean=(0.5, 0.5, 0.5),
                    std=(0.25, 0.25, 0.25), source="test")
    ds = IndexedDataset(TensorImageDataset(x, y))
    empty = IndexedDataset(TensorImageDataset(x[:0], y[:0]))
    over = [f"train.epochs={epochs}", "model.arch=dm_wrn", "model.kwargs={depth: 10, width: 1}",
            f"data.batch_size={BATCH}", "data.augment=false", f"data.aux={_aux_file(tmp_path)}",
            f"data.epoch_images={N}", "train.device=cpu", *extra]
    cfg = config_from_dict(apply_overrides(load_raw(preset), over))
    tr = tm.Trainer(cfg, tmp_path / "run", progress=False, handle_signals=False, datasets=(ds, empty, ds, info))
    tr._setup()
    init = copy.deepcopy(tr.model.state_dict())
    tr.global_step = 0
    batches = []
    torch.manual_seed(SEED)
    for epoch in range(epochs):
        tr.model.train()
        # the run's batch stream: real rows, then the generated rows (dataset index >= N)
        for b, (xb, yb, idx) in enumerate(tr.stream.epoch(epoch)):
            lr, mom = tm.onecycle_at(cfg, epoch)
            for grp in tr.optimizer.param_groups:
                grp["lr"], grp["momentum"] = lr, mom
            assert lr == tm.lr_at(cfg, epoch, b, tr.steps_per_epoch)
            batches.append((epoch, idx[idx < N].clone(), xb.clone(), yb.clone()))
            tr.train_step(xb, yb, idx, epoch)
        tr.rectifier.end_epoch(tr.model)
    return tr, init, batches


def ref_dm_code(model, batches, *, epochs, n, beta=5.0, ls=0.1, tau=0.995, lr=0.2):
    """DM-Improves-AT's WATrainer.train over the recorded batches (1-based epochs as in the code)."""
    torch.manual_seed(SEED)
    wa_model = copy.deepcopy(model)                     # WATrainer.__init__
    update_steps, warmup_steps = n, 0.025 * epochs * n  # int(floor(50000 / bs) + 1); 0.025 * epochs * steps
    decay, no_decay = [], []                            # init_optimizer's group_weight
    for name, p in model.named_parameters():
        (no_decay if "batchnorm" in name else decay).append(p)
    opt = torch.optim.SGD([dict(params=decay), dict(params=no_decay, weight_decay=0.0)], lr=lr,
                          weight_decay=5e-4, momentum=0.9, nesterov=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, pct_start=0.025, total_steps=epochs)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def track_bn_stats(flag):
        for m in bns:
            m.track_running_stats = flag

    def smooth_ce(logits, target):                      # SmoothCrossEntropyLoss(smoothing=ls)
        logprobs = F.log_softmax(logits, dim=-1)
        nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
        return ((1.0 - ls) * nll + ls * (-logprobs.mean(dim=-1))).mean()

    kl = nn.KLDivLoss(reduction="batchmean")
    for epoch in range(1, epochs + 1):
        model.train()
        update_iter = 0
        for _, _, x_natural, y in [b for b in batches if b[0] == epoch - 1]:
            global_step = (epoch - 1) * update_steps + update_iter
            if global_step == 0:
                for m in bns:
                    m.momentum = 1.0
            elif global_step == 1:
                for m in bns:
                    m.momentum = 0.01
            update_iter += 1
            # trades_loss
            model.train()
            track_bn_stats(False)
            x_adv = x_natural.detach() + torch.empty_like(x_natural).uniform_(-EPS, EPS).detach()
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
            p_natural = F.softmax(model(x_natural), dim=1).detach()
            for _ in range(10):
                x_adv.requires_grad_()
                with torch.enable_grad():
                    loss_kl = kl(F.log_softmax(model(x_adv), dim=1), p_natural)
                grad = torch.autograd.grad(loss_kl, [x_adv])[0]
                x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
                x_adv = torch.min(torch.max(x_adv, x_natural - EPS), x_natural + EPS)
                x_adv = torch.clamp(x_adv, 0.0, 1.0)
            model.train()
            track_bn_stats(True)
            x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
            opt.zero_grad()
            logits_natural = model(x_natural)
            logits_adv = model(x_adv)
            loss = smooth_ce(logits_natural, y) + beta * kl(F.log_softmax(logits_adv, dim=1),
                                                           F.softmax(logits_natural, dim=1))
            loss.backward()
            opt.step()
            global_step = (epoch - 1) * update_steps + update_iter
            d = _code_decay(global_step, tau, warmup_steps)   # ema_update
            with torch.no_grad():
                for p_swa, p_model in zip(wa_model.parameters(), model.parameters()):
                    p_swa.data *= d
                    p_swa.data += p_model.data * (1 - d)
        sched.step()
        for m1, m2 in zip(wa_model.modules(), model.modules()):   # update_bn
            if isinstance(m1, nn.modules.batchnorm._BatchNorm):
                m1.running_mean = m2.running_mean
                m1.running_var = m2.running_var
                m1.num_batches_tracked = m2.num_batches_tracked
    return model, wa_model


def _assert_same(a, b, what):
    sa = {k: v for k, v in a.state_dict().items() if v.is_floating_point()}
    sb = {k: v for k, v in b.state_dict().items() if v.is_floating_point()}
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < TOL, f"{what}: max abs difference {worst:.3g}"


def test_recipe_step_equals_dm_improves_at_code(tmp_path, _float64):
    tr, init, batches = package_run(tmp_path)
    real_bs = BATCH - int(BATCH * 0.7)   # 3 real + 5 generated per batch
    n = math.ceil(N / BATCH)             # num_batches = ceil(dataset_size / batch_size)
    assert tr.steps_per_epoch == n and len(batches) == EPOCHS * n
    for epoch in range(EPOCHS):
        reals = [b[1] for b in batches if b[0] == epoch]
        assert all(len(r) == real_bs for r in reals) and all(len(b[3]) == BATCH for b in batches)
        flat = torch.cat(reals)
        assert len(set(flat.tolist())) == len(flat)   # the head of one permutation
    model = copy.deepcopy(tr.model)
    model.load_state_dict(init)
    ref, ref_wa = ref_dm_code(model, batches, epochs=EPOCHS, n=n)
    moved = max(float((p.detach() - init[k]).abs().max()) for k, p in tr.model.named_parameters())
    assert moved > 1e-3
    _assert_same(tr.model, ref, "weights and BatchNorm statistics")
    _assert_same(tr.wa.module, ref_wa, "weight average (parameters; statistics = the model's)")
    # the first step's momentum 1.0 was undone: every layer is back at the architecture's 0.01
    assert all(m.momentum == 0.01 for m in tr.model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("over, part", [("attack.bn_mode=train", "model"), ("wa.form=timm", "wa")])
def test_recipe_differential_can_fail(over, part, tmp_path, _float64):
    """The comparison can fail: the attack updating BatchNorm statistics (attack.bn_mode train, what
    the other presets' codes do), or timm's EMA in place of the code's WA, no longer equal the code."""
    extra = (over, "wa.warmup_fraction=0") if part == "wa" else (over,)
    tr, init, batches = package_run(tmp_path, extra=extra, epochs=2)
    model = copy.deepcopy(tr.model)
    model.load_state_dict(init)
    ref, ref_wa = ref_dm_code(model, batches, epochs=2, n=math.ceil(N / BATCH))
    with pytest.raises(AssertionError):
        if part == "model":
            _assert_same(tr.model, ref, "weights and BatchNorm statistics")
        else:
            _assert_same(tr.wa.module, ref_wa, "weight average")


def test_gpu_recipe_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/dm_recipe_gpu.py (the recipe row for a lent GPU) on a tiny network on the CPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dm_recipe_gpu", Path(__file__).resolve().parents[1] / "benchmarks" / "dm_recipe_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--device", "cpu", "--depth", "10", "--width", "1", "--batch", "8", "--n", "16", "--aux-n", "16",
                     "--warmup", "0", "--steps", "1", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())["records"][0]
    assert rec["steps"] == 1 and rec["images_per_s"] > 0 and rec["amp"] is None


def test_recipe_fits_and_exports_as_robustbench_dmwideresnet(tmp_path):
    """The preset's whole run (fit: split batches of real + generated rows, Gowal WA evaluated,
    one-cycle lr) with a tiny swish DMWideResNet, then export: RobustBench's own load_model builds
    DMWideResNet(..., Swish, ...) from the entry and reproduces the outputs (checked by the export)."""
    from _extras import need

    need("robustbench")
    from rb_labelrefine.export.robustbench_export import export_run
    from rb_labelrefine.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 32, 32, generator=g), torch.randint(0, C, (40,), generator=g)
    info = DataInfo(name="cifar10", num_classes=C, channels=3, image_size=32, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2471, 0.2435, 0.2616), source="test")
    over = [f"data.aux={_aux_file(tmp_path)}", "data.batch_size=8", "data.epoch_images=40", "train.epochs=2",
            "model.arch=dm_wrn", "model.kwargs={depth: 10, width: 1}", "train.device=cpu", "eval.val_attack_steps=2",
            "eval.test_attack_steps=2", "eval.curve_test_size=8"]
    cfg = config_from_dict(apply_overrides(load_raw(PRESET), over))
    ds, val = IndexedDataset(TensorImageDataset(x, y)), IndexedDataset(TensorImageDataset(x[:8], y[:8]))
    Trainer(cfg, tmp_path / "run", progress=False, handle_signals=False, datasets=(ds, val, ds, info)).fit()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["eval_model"] for h in hist] == ["ema", "ema"]
    export_run(tmp_path / "run", tmp_path / "export", name="Test2026DMWRN")
    entry = (tmp_path / "export" / "model_zoo_entry.py").read_text()
    assert "DMWideResNet(10, 10, 1, Swish, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])" in entry
    assert (tmp_path / "export" / "models" / "cifar10" / "Linf" / "Test2026DMWRN.pt").is_file()
