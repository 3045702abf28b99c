"""Every generated paper preset against the values of the paper / public code it names.

The tables below are transcribed from the sources (file paths given), independently of
``rb_labelrefine/configs/generate.py``: the 40 gin configs of the ADR code one by one, the
training scripts of the TRADES, TRADES-AWP, locuslab PGD-AT, KD+SWA and SGLS codes, and the LTD
paper.  Each preset name is mapped to the run it must be by the rules in ``expected()``, and every
generated preset must be covered.
"""
from __future__ import annotations

import pytest

from rb_labelrefine.config import list_presets, load_config

DS = ("cifar10", "cifar100", "tinyimagenet")
ARCHS = ("resnet18", "preactresnet18", "wrn34-10")
# the papers' presets (the Wang et al. 2023 recipe's, *-wang2023*, are checked in tests/test_dm_recipe.py)
GENERATED = [p for p in list_presets() if p.startswith(DS) and "-wang2023" not in p]

# ---------------------------------------------------------------- yuyuwu5/ADR config/<ds>/<file>.gin
# file: (main.epoch, lr, optimizer_type, milestones or "cosine", rho, temperature_high, temperature_low,
#        interpolation_low, interpolation_high, adv_train_mode).  temperature -1 = ADR off.
G = {
    "cifar10/preact-resnet18_pgd_awp": (100, 0.4, "awp", "cosine", 0.005, -1, -1, 0.7, 0.85, "PGD-AT"),
    "cifar10/preact-resnet18_pgd_awp_adr": (100, 0.4, "awp", "cosine", 0.005, 2.5, 1.5, 0.7, 0.85, "PGD-AT"),
    "cifar10/resnet18_pgd_awp": (200, 0.1, "awp", [100, 150], 0.005, -1, -1, 0.7, 0.85, "PGD-AT"),
    "cifar10/resnet18_pgd_awp_adr": (200, 0.1, "awp", [100, 150], 0.005, 2.5, 1.5, 0.7, 0.85, "PGD-AT"),
    "cifar10/resnet18_pgd_sgd": (200, 0.1, "sgd", [100, 150], None, -1, -1, 0.7, 0.95, "PGD-AT"),
    "cifar10/resnet18_pgd_sgd_adr": (200, 0.1, "sgd", [100, 150], None, 2.5, 2.0, 0.7, 0.95, "PGD-AT"),
    "cifar10/resnet18_trades_awp": (200, 0.1, "awp", [100, 150], 0.005, -1, -1, 0.7, 0.95, "TRADES"),
    "cifar10/resnet18_trades_awp_adr": (200, 0.1, "awp", [100, 150], 0.005, 2.5, 1.5, 0.7, 0.85, "TRADES"),
    "cifar10/resnet18_trades_sgd": (200, 0.1, "sgd", [100, 150], None, -1, -1, 0.7, 0.95, "TRADES"),
    "cifar10/resnet18_trades_sgd_adr": (200, 0.1, "sgd", [100, 150], None, 2.5, 2.0, 0.7, 0.95, "TRADES"),
    "cifar10/wrn_pgd_awp": (200, 0.1, "awp", [100, 150], 0.005, -1, -1, 0.7, 0.85, "PGD-AT"),
    "cifar10/wrn_pgd_awp_adr": (200, 0.1, "awp", [100, 150], 0.005, 2.5, 1.5, 0.7, 0.85, "PGD-AT"),
    "cifar10/wrn_pgd_sgd": (200, 0.1, "sgd", [100, 150], None, -1, -1, 0.7, 0.95, "PGD-AT"),
    "cifar10/wrn_pgd_sgd_adr": (200, 0.1, "sgd", [100, 150], None, 2.5, 2.0, 0.7, 0.95, "PGD-AT"),
    "cifar100/preact-resnet18_pgd_awp": (100, 0.4, "awp", "cosine", 0.005, -1, -1, 0.7, 0.85, "PGD-AT"),
    "cifar100/preact-resnet18_pgd_awp_adr": (100, 0.4, "awp", "cosine", 0.005, 3.0, 1.5, 0.5, 0.8, "PGD-AT"),
    "cifar100/resnet18_pgd_awp": (200, 0.1, "awp", [100, 150], 0.005, -1, -1, 0.7, 0.85, "PGD-AT"),
    "cifar100/resnet18_pgd_awp_adr": (200, 0.1, "awp", [100, 150], 0.005, 2.0, 1.0, 0.7, 0.85, "PGD-AT"),
    "cifar100/resnet18_pgd_sgd": (200, 0.1, "sgd", [100, 150], None, -1, -1, 0.7, 0.95, "PGD-AT"),
    "cifar100/resnet18_pgd_sgd_adr": (200, 0.1, "sgd", [100, 150], None, 1.5, 1.0, 0.7, 0.95, "PGD-AT"),
    "cifar100/resnet18_trades_awp": (200, 0.1, "awp", [100, 150], 0.005, -1, -1, 0.7, 0.95, "TRADES"),
    "cifar100/resnet18_trades_awp_adr": (200, 0.1, "awp", [100, 150], 0.005, 1.5, 1.0, 0.7, 0.95, "TRADES"),
    # the file binds ema_label_smooth_* (no such AdvTrainer parameters): a baseline either way
    "cifar100/resnet18_trades_sgd": (200, 0.1, "sgd", [100, 150], None, -1, -1, 0.7, 0.95, "TRADES"),
    "cifar100/resnet18_trades_sgd_adr": (200, 0.1, "sgd", [100, 150], None, 1.5, 1.0, 0.7, 0.95, "TRADES"),
    "cifar100/wrn_pgd_awp": (200, 0.1, "awp", [100, 150], 0.005, -1, -1, 0.7, 0.95, "PGD-AT"),
    "cifar100/wrn_pgd_awp_adr": (200, 0.1, "awp", [100, 150], 0.005, 2.0, 1.0, 0.7, 0.85, "PGD-AT"),
    "cifar100/wrn_pgd_sgd": (200, 0.1, "sgd", [100, 150], None, -1, -1, 0.7, 0.95, "PGD-AT"),
    "cifar100/wrn_pgd_sgd_adr": (200, 0.1, "sgd", [100, 150], None, 1.5, 1.0, 0.7, 0.95, "PGD-AT"),
    "tiny-imagenet/resnet18_pgd_awp": (80, 0.1, "awp", [40, 60], 0.001, -1, -1, 0.5, 0.9, "PGD-AT"),
    "tiny-imagenet/resnet18_pgd_awp_adr": (80, 0.1, "awp", [40, 60], 0.001, 2.0, 1.5, 0.3, 0.9, "PGD-AT"),
    "tiny-imagenet/resnet18_pgd_sgd": (80, 0.1, "sgd", [40, 60], None, -1, -1, 0.5, 0.9, "PGD-AT"),
    # the file writes "tmperature_low = 1.5" (gin rejects it); 1.5 as in the paper, Sec. 5.1
    "tiny-imagenet/resnet18_pgd_sgd_adr": (80, 0.1, "sgd", [40, 60], None, 2.0, 1.5, 0.5, 0.9, "PGD-AT"),
    "tiny-imagenet/resnet18_trades_awp": (80, 0.1, "awp", [40, 60], 0.001, -1, -1, 0.5, 0.9, "TRADES"),
    "tiny-imagenet/resnet18_trades_awp_adr": (80, 0.1, "awp", [40, 60], 0.001, 2.0, 1.5, 0.5, 0.9, "TRADES"),
    "tiny-imagenet/resnet18_trades_sgd": (80, 0.1, "sgd", [40, 60], None, -1, -1, 0.5, 0.9, "TRADES"),
    "tiny-imagenet/resnet18_trades_sgd_adr": (80, 0.1, "sgd", [40, 60], None, 2.0, 1.5, 0.5, 0.9, "TRADES"),
    "tiny-imagenet/wrn_pgd_awp": (80, 0.1, "awp", [40, 60], 0.001, -1, -1, 0.5, 0.9, "PGD-AT"),
    "tiny-imagenet/wrn_pgd_awp_adr": (80, 0.1, "awp", [40, 60], 0.001, 2.0, 1.5, 0.5, 0.9, "PGD-AT"),
    "tiny-imagenet/wrn_pgd_sgd": (80, 0.1, "sgd", [40, 60], None, -1, -1, 0.5, 0.9, "PGD-AT"),
    "tiny-imagenet/wrn_pgd_sgd_adr": (80, 0.1, "sgd", [40, 60], None, 2.0, 1.5, 0.5, 0.9, "PGD-AT"),
}
assert len(G) == 40 and sum(k.endswith("_adr") for k in G) == 20

GIN_DS = {"cifar10": "cifar10", "cifar100": "cifar100", "tinyimagenet": "tiny-imagenet"}
GIN_ARCH = {"resnet18": "resnet18", "preactresnet18": "preact-resnet18", "wrn34-10": "wrn"}


def adr_code_run(gin: str) -> dict:
    """What the ADR code does with one gin file (flattened config paths -> values).  Beyond the
    file: src/util/pgd_attack.py / trades_attack.py (PGD eps 8/255, step 2/255, 10 steps; TRADES start
    x + 0.001 U[0,1)); src/train.py (drop_last=True, batch 128: the README's and paper's); advTrainer.py
    (attack in train mode, TRADES on cat([x, x_adv]), beta 6, EMA 0.995); optimizer_scheduler.py
    (momentum 0.9, wd 5e-4, nesterov=True for 'sgd', plain SGD inside AWP, cosine: timm warm-up
    2.5 epochs from 1e-6, lr_min 0; BN without weight decay with extra data)."""
    epochs, lr, opt, ms, rho, th, tl, ll, lh, mode = G[gin]
    v = {"train.epochs": epochs, "optim.lr": lr, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
         "optim.nesterov": opt == "sgd", "data.drop_last": True, "attack.eps": 8 / 255, "attack.alpha": 2 / 255,
         "attack.steps": 10, "attack.bn_mode": "train", "awp.enabled": opt == "awp"}
    if ms == "cosine":
        v.update({"optim.schedule": "cosine", "optim.warmup_epochs": 2.5, "optim.warmup_start_lr": 1e-6,
                  "optim.lr_lag_steps": 1, "optim.bn_weight_decay": False, "model.arch": "dm_preact_resnet18",
                  "model.kwargs": {"activation": "swish"},  # create_model.py: DeepMind's PreAct, swish
                  "data.batch_size": 256, "data.aux_fraction": 0.75})  # App. F: 1024 per batch, 75 % generated
    else:
        v.update({"optim.schedule": "multistep", "optim.milestones": ms, "optim.gamma": 0.1,
                  "optim.lr_lag_steps": 0, "optim.warmup_epochs": 0.0, "data.batch_size": 128})
    if opt == "awp":
        v.update({"awp.variant": "sam", "awp.gamma": rho, "awp.warmup_epochs": 0})
    if mode == "TRADES":
        v.update({"objective.name": "trades", "objective.beta": 6.0, "objective.forward": "concat",
                  "attack.start": "uniform", "attack.start_std": 0.001})
    else:
        v.update({"objective.name": "pgd_at", "attack.start": "default"})
    if th > 0:
        v.update({"method.name": "adr", "method.ema_decay": 0.995, "method.tau_high": th, "method.tau_low": tl,
                  "method.lambda_low": ll, "method.lambda_high": lh})
    else:
        v["method.name"] = "onehot"
    return v


# yaodongyu/TRADES train_trades_cifar10.py (defaults) + trades.py
TRADES_CODE = {"train.epochs": 76, "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 2e-4,
               "optim.nesterov": False, "optim.milestones": [74, 89, 99],  # `epoch >= 75/90/100`, epochs from 1
               "data.batch_size": 128, "data.drop_last": False, "attack.eps": 0.031, "attack.alpha": 0.007,
               "attack.steps": 10, "attack.bn_mode": "eval", "attack.start": "normal", "attack.start_std": 0.001,
               "objective.name": "trades", "objective.beta": 6.0, "objective.forward": "three_pass",
               "method.name": "onehot", "awp.enabled": False}
# csdongxian/AWP trades_AWP/train_trades_cifar.py (defaults): epochs from 1, lr /10 at `epoch >= 100/150`
TRADES_AWP_CODE = {**TRADES_CODE, "train.epochs": 200, "optim.weight_decay": 5e-4, "optim.milestones": [99, 149],
                   "attack.eps": 8 / 255, "attack.alpha": 2 / 255, "awp.enabled": True, "awp.variant": "wu2020",
                   "awp.gamma": 0.005, "awp.warmup_epochs": 9,  # --awp-warmup 10, `epoch >= args.awp_warmup`
                   "objective.forward": "three_pass_adv_first"}  # model(x_adv), model(x) for the KL, model(x) CE
# locuslab/robust_overfitting train_cifar.py (defaults): piecewise 0.1 / 0.01 / 0.001 at t / epochs = 0.5 / 0.75,
# t = epoch + (i + 1) / n: each decay one step early
RICE_CODE = {"train.epochs": 200, "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
             "optim.nesterov": False, "optim.milestones": [0.5, 0.75], "optim.lr_lag_steps": -1, "data.batch_size": 128, "data.drop_last": False,
             "attack.eps": 8 / 255, "attack.alpha": 2 / 255, "attack.steps": 10, "attack.bn_mode": "train",
             "objective.name": "pgd_at", "method.name": "onehot", "awp.enabled": False}


def kd_code(ds: str) -> dict:
    """VITA-Group/Alleviate-Robust-Overfitting main_adv.py defaults (--decreasing_lr 50,150, T 2, PGD-20
    test/val, 45000/5000 split, attack with model.train()); Tiny-ImageNet 100 epochs, decays 50/80
    (paper Sec. 4.1); loss weights: the paper's (lambda1 robust 0.5, lambda2 standard 0.25)."""
    tiny = ds == "tinyimagenet"
    return {"train.epochs": 100 if tiny else 200, "optim.lr": 0.1, "optim.momentum": 0.9,
            "optim.weight_decay": 5e-4, "optim.nesterov": False, "optim.milestones": [50, 80] if tiny else [50, 150],
            "data.batch_size": 128, "data.drop_last": False, "data.val_fraction": 0.1, "eval.val_attack_steps": 20,
            "attack.eps": 8 / 255, "attack.alpha": 2 / 255, "attack.steps": 10, "attack.bn_mode": "train",
            "method.name": "kd", "method.kd_weights": "paper", "method.temperature": 2.0}


# devicerxx/SGLS main_adv.py defaults + scripts/cifar10/run_sgls.sh (ES=90, ALPHA=0.9, milestones 100 150)
SGLS_CODE = {"train.epochs": 200, "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
             "optim.nesterov": False, "optim.milestones": [99, 149],  # scheduler.step(epoch), epochs from 1
             "data.batch_size": 128, "data.drop_last": False, "attack.eps": 8 / 255, "attack.alpha": 2 / 255,
             "attack.steps": 10, "attack.bn_mode": "eval", "objective.name": "pgd_at", "method.name": "sglr",
             "method.variant": "code", "method.momentum": 0.9, "method.start_epoch": 90}
# SGLR paper Sec. 5 (200 epochs, SGD 0.9, lr 0.1) and Table 4 (alpha 0.2, T 1.5), decays of the code
SGLR_PAPER = {**SGLS_CODE, "optim.milestones": [100, 150], "method.variant": "paper", "method.alpha": 0.2,
              "method.temperature": 1.5}
del SGLR_PAPER["method.start_epoch"]
# LTD paper App. A.2: 120 epochs, /10 after the 80th and 100th, SGD 0.9, wd 5e-4, Nesterov, PGD-8; tau 5
LTD_PAPER = {"train.epochs": 120, "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
             "optim.nesterov": True, "optim.milestones": [80, 100], "attack.steps": 8, "attack.bn_mode": "eval",
             "objective.name": "trades", "objective.beta": 6.0, "method.name": "ltd", "method.temperature": 5.0}


def expected(name: str) -> dict:
    ds, rest = name.split("-", 1)
    arch = next(a for a in ARCHS if rest.startswith(a + "-"))
    suffix = rest[len(arch) + 1:]
    parts = suffix.split("-")
    obj = parts[0]
    wa = "wa" in parts
    awp = "awp" in parts
    cifar = ds in ("cifar10", "cifar100")
    if suffix == "pgdat-sglr-code":
        return SGLS_CODE
    if suffix in ("pgdat-sglr", "trades-sglr"):
        return {**SGLR_PAPER, **({"objective.name": "trades"} if obj == "trades" else {})}
    if "kd" in parts:
        v = {**kd_code(ds), "objective.name": "pgd_at" if obj == "pgdat" else "trades"}
        if "swa" in parts:
            v.update({"swa.enabled": True, "swa.start_epoch": None, "swa.bn_form": "code"})
        return v
    if suffix == "natural":
        v = kd_code(ds)
        for k in ("attack.eps", "attack.alpha", "attack.steps", "attack.bn_mode", "method.kd_weights",
                  "method.temperature"):
            v.pop(k)
        return {**v, "objective.name": "natural", "method.name": "onehot"}
    if "ltd" in parts:
        v = dict(LTD_PAPER)
        if awp:
            v.update({"awp.enabled": True, "awp.variant": "wu2020", "awp.gamma": 0.005, "awp.warmup_epochs": 9})
        return v
    gobj = "pgd" if obj == "pgdat" else "trades"
    if suffix == "trades-adrbaseline":
        return adr_code_run(f"{GIN_DS[ds]}/resnet18_trades_sgd")
    if "ls" in parts:
        return {**adr_code_run(f"{GIN_DS[ds]}/resnet18_{gobj}_sgd"), "method.name": "label_smoothing",
                "method.smoothing": 0.1}
    adr = "adr" in parts
    opt = "awp" if awp else "sgd"
    gin = f"{GIN_DS[ds]}/{GIN_ARCH[arch]}_{gobj}_{opt}{'_adr' if adr else ''}"
    if obj == "trades" and not adr and not awp and not (wa and gin in G):
        v = dict(TRADES_CODE)
    elif obj == "trades" and not adr and awp and arch == "wrn34-10" and cifar:
        v = dict(TRADES_AWP_CODE)
    elif obj == "pgdat" and not adr and not awp and arch == "preactresnet18" and cifar:
        v = dict(RICE_CODE)
    else:
        if gin not in G:  # no config for this architecture: the ADR code's ResNet-18 run
            gin = f"{GIN_DS[ds]}/resnet18_{gobj}_{opt}{'_adr' if adr else ''}"
        v = adr_code_run(gin)
    v["wa.enabled"] = wa
    if wa:
        v["wa.decay"] = 0.995
    return v


def _get(cfg, dotted):
    node = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def test_every_adr_gin_config_has_a_preset():
    """The 40 gin configs of the ADR code (20 with ADR) all have presets with their values."""
    covered = {}
    for name in GENERATED:
        exp = expected(name)
        for gin in G:
            if exp == {**adr_code_run(gin), "wa.enabled": exp.get("wa.enabled"),
                       **({"wa.decay": 0.995} if exp.get("wa.enabled") else {})}:
                covered.setdefault(gin, []).append(name)
    assert sorted(covered) == sorted(G), sorted(set(G) - set(covered))
    assert "cifar10-resnet18-pgdat-adr" in covered["cifar10/resnet18_pgd_sgd_adr"]
    assert "cifar10-preactresnet18-pgdat-adr-wa-awp" in covered["cifar10/preact-resnet18_pgd_awp_adr"]


@pytest.mark.parametrize("name", GENERATED)
def test_preset_has_the_official_values(name):
    cfg = load_config(name)
    exp = expected(name)
    wrong = {k: (_get(cfg, k), v) for k, v in exp.items()
             if not (_get(cfg, k) == pytest.approx(v) if isinstance(v, float) else _get(cfg, k) == v)}
    assert not wrong, f"{name}: field: (preset, official) {wrong}"
    assert cfg.description, name


def test_generated_presets_are_all_covered():
    """Every generated preset is one of the names the rules above map (27 per data set and
    architecture, the SGLR code form, the ADR code's TRADES baseline for ResNet-18)."""
    per = 27 + 1
    assert len(GENERATED) == len(DS) * len(ARCHS) * per + len(DS)
    for name in GENERATED:
        expected(name)  # raises for a name the table does not know


def test_description_names_the_source():
    for name in GENERATED:
        d = load_config(name).description
        assert any(s in d for s in ("yuyuwu5/ADR", "yaodongyu/TRADES", "csdongxian/AWP", "locuslab/robust_overfitting",
                                    "Alleviate-Robust-Overfitting", "devicerxx/SGLS", "App. A.2, no public code")), name
    gen = load_config("cifar10-preactresnet18-pgdat-adr-awp").description
    assert "--set data.aux=PATH" in gen and "cifar10_ddpm.npz" in gen


def test_generated_data_presets_need_the_aux_file(tmp_path):
    """The PreAct generated-data runs stack DDPM images under each batch: without the user's file
    they refuse to start, naming data.aux; with it they are runnable."""
    import numpy as np
    from rb_labelrefine.config import ConfigError, apply_overrides, check_runnable, config_from_dict, load_raw

    for name in ("cifar10-preactresnet18-pgdat-adr-awp", "cifar100-preactresnet18-pgdat-awp"):
        cfg = load_config(name)
        assert cfg.data.aux_fraction == 0.75 and cfg.data.batch_size == 256
        with pytest.raises(ConfigError) as err:
            check_runnable(cfg)
        assert err.value.field == "data.aux"
    path = tmp_path / "ddpm.npz"
    np.savez(path, image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, np.int64))
    cfg = config_from_dict(apply_overrides(load_raw("cifar10-preactresnet18-pgdat-adr-awp"), [f"data.aux={path}"]))
    check_runnable(cfg)
