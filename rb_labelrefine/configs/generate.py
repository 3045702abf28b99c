"""Write the paper presets (``python -m rb_labelrefine.configs.generate``).

Every preset is the run of a public code base where one exists, with the file that holds each
value named in its description; ``docs/fidelity.md`` lists where the papers and the codes
differ and which option gives the other.  Names: ``<dataset>-<arch>-<objective>-<method>[-wa][-awp][-swa]``
(plus ``-code`` for a method's public-code form and ``-adrbaseline`` for the ADR code's TRADES
baseline, whose plain name is taken by the TRADES code's own run).  Each preset inherits the
data set's shared base ``_<dataset>.yaml``.

Sources (public code read at their GitHub HEAD; values below are copied from these files):

* ADR (yuyuwu5/ADR) -- the 40 gin configs ``config/<ds>/<arch>_<pgd|trades>_<sgd|awp>[_adr].gin``
  (epochs, lr, schedule, rho, lambda/tau, PGD) read by ``src/train.py`` (train loader
  ``drop_last=True``), ``src/util/optimizer_scheduler.py`` (SGD ``nesterov=True``; the AWP
  optimizer wraps plain SGD; BN parameters exempt from weight decay only with extra data; timm
  step / cosine schedulers indexed by global step), ``src/advTrainer.py`` (attack in train mode,
  TRADES as one forward of ``cat([x, x_adv])``, EMA 0.995 evaluated with ``--ema``),
  ``src/util/awp.py`` (SAM-style AWP), ``src/util/trades_attack.py`` (start x + 0.001 U[0, 1)).
  The README pairs "ADR" and "ADR + WA" with the same config (WA = evaluate the EMA).
* TRADES (yaodongyu/TRADES, ``train_trades_cifar10.py``, ``trades.py``): eps 0.031, step 0.007,
  10 steps, wd 2e-4, 76 epochs, lr /10 at the 1-based epochs 75/90/100 (0-based 74/89/99), attack
  in eval mode from x + 0.001 N(0, 1), loss over three train-mode forwards x, x', x.
* TRADES-AWP (csdongxian/AWP, ``trades_AWP/train_trades_cifar.py``): 200 epochs, lr /10 at the
  1-based epochs 100/150 (0-based 99/149), wd 5e-4, eps 8/255, step 2/255, gamma 0.005,
  ``--awp-warmup 10`` on 1-based epochs (AWP from the 0-based epoch 9).
* PGD-AT of Rice et al. (locuslab/robust_overfitting, ``train_cifar.py``): PreAct-ResNet-18,
  200 epochs, piecewise lr 0.1 -> 0.01 (epoch 100) -> 0.001 (epoch 150), wd 5e-4, no Nesterov.
* KD+SWA (VITA-Group/Alleviate-Robust-Overfitting, ``main_adv.py``, ``utils.py``,
  ``datasets.py``): lr /10 at 50/150 (``--decreasing_lr``), 9:1 split, PGD-20 validation, attack in
  train mode, T 2, weights CE 0.3 / standard 0.1 / robust 0.6 (the paper: robust 0.5, standard
  0.25 -- the default here, ``method.kd_weights=code`` for the code's), ``--swa_start 55`` (the
  paper: from the first decay -- the default here), SWA BN recompute by batch size after every
  snapshot.
* SGLS (devicerxx/SGLS, ``main_adv.py``, ``losses/loss.py``, ``scripts/*/run_sgls.sh``):
  1-based epochs, MultiStepLR 100/150 stepped with the 1-based epoch at the start of each epoch
  (= 0-based 99/149), soft labels from ``epoch >= es`` with es 90, m 0.9, attack after
  ``model.eval()``, plain SGD.
* LTD (paper App. A.2, no public code): 120 epochs, lr /10 after the 80th and 100th epoch,
  SGD 0.9, wd 5e-4, Nesterov, PGD-8; teacher temperature 5 (Sec. 4.3).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import _merge

HERE = Path(__file__).parent / "presets"

DATASETS = {
    "cifar10": dict(data=dict(name="cifar10", augment=True, val_fraction=0.02, batch_size=128),
                    attack=dict(eps="8/255", alpha="2/255", steps=10), train=dict(epochs=200)),
    "cifar100": dict(data=dict(name="cifar100", augment=True, val_fraction=0.02, batch_size=128),
                     attack=dict(eps="8/255", alpha="2/255", steps=10), train=dict(epochs=200)),
    "tinyimagenet": dict(data=dict(name="tiny_imagenet", augment=True, val_fraction=0.02, batch_size=128),
                         attack=dict(eps="8/255", alpha="2/255", steps=10), train=dict(epochs=80)),
}
ARCHS = {"resnet18": "resnet18", "preactresnet18": "preact_resnet18", "wrn34-10": "wrn_34_10"}
GIN_DS = {"cifar10": "cifar10", "cifar100": "cifar100", "tinyimagenet": "tiny-imagenet"}
GIN_ARCH = {"resnet18": "resnet18", "wrn34-10": "wrn", "preactresnet18": "preact-resnet18"}
WA = dict(wa=dict(enabled=True, decay=0.995))

# ---------------------------------------------------------------- the ADR code's gin configs
# (lambda_low, lambda_high, tau_high, tau_low) of the *_adr.gin files, keyed (ds, arch, obj, opt);
# the baseline files (temperature -1) share everything else with their _adr twin.
ADR_LAMBDA_TAU = {
    ("cifar10", "resnet18", "pgd", "sgd"): (0.7, 0.95, 2.5, 2.0),
    ("cifar10", "resnet18", "pgd", "awp"): (0.7, 0.85, 2.5, 1.5),
    ("cifar10", "resnet18", "trades", "sgd"): (0.7, 0.95, 2.5, 2.0),
    ("cifar10", "resnet18", "trades", "awp"): (0.7, 0.85, 2.5, 1.5),
    ("cifar10", "wrn34-10", "pgd", "sgd"): (0.7, 0.95, 2.5, 2.0),
    ("cifar10", "wrn34-10", "pgd", "awp"): (0.7, 0.85, 2.5, 1.5),
    ("cifar10", "preactresnet18", "pgd", "awp"): (0.7, 0.85, 2.5, 1.5),
    ("cifar100", "resnet18", "pgd", "sgd"): (0.7, 0.95, 1.5, 1.0),
    ("cifar100", "resnet18", "pgd", "awp"): (0.7, 0.85, 2.0, 1.0),
    ("cifar100", "resnet18", "trades", "sgd"): (0.7, 0.95, 1.5, 1.0),
    ("cifar100", "resnet18", "trades", "awp"): (0.7, 0.95, 1.5, 1.0),
    ("cifar100", "wrn34-10", "pgd", "sgd"): (0.7, 0.95, 1.5, 1.0),
    ("cifar100", "wrn34-10", "pgd", "awp"): (0.7, 0.85, 2.0, 1.0),
    ("cifar100", "preactresnet18", "pgd", "awp"): (0.5, 0.8, 3.0, 1.5),
    # resnet18_pgd_sgd_adr.gin misspells temperature_low ("tmperature_low", which gin rejects);
    # 1.5 is the paper's value (Sec. 5.1) and that of every other Tiny-ImageNet config
    ("tinyimagenet", "resnet18", "pgd", "sgd"): (0.5, 0.9, 2.0, 1.5),
    ("tinyimagenet", "resnet18", "pgd", "awp"): (0.3, 0.9, 2.0, 1.5),
    ("tinyimagenet", "resnet18", "trades", "sgd"): (0.5, 0.9, 2.0, 1.5),
    ("tinyimagenet", "resnet18", "trades", "awp"): (0.5, 0.9, 2.0, 1.5),
    ("tinyimagenet", "wrn34-10", "pgd", "sgd"): (0.5, 0.9, 2.0, 1.5),
    ("tinyimagenet", "wrn34-10", "pgd", "awp"): (0.5, 0.9, 2.0, 1.5),
}


def gin_path(ds: str, arch: str, obj: str, opt: str, adr: bool) -> str:
    return f"config/{GIN_DS[ds]}/{GIN_ARCH[arch]}_{obj}_{opt}{'_adr' if adr else ''}.gin"


def adr_code(ds: str, arch: str, obj: str, opt: str, adr: bool) -> dict:
    """The ADR code's run for one gin config (which must exist in ADR_LAMBDA_TAU)."""
    lam_lo, lam_hi, tau_hi, tau_lo = ADR_LAMBDA_TAU[(ds, arch, obj, opt)]
    generated = arch == "preactresnet18"  # the PreAct configs are the DDPM generated-data runs
    body: dict = dict(data=dict(drop_last=True), attack=dict(bn_mode="train"))
    if generated:
        # lr 0.4, timm CosineLRScheduler over all steps, 2.5-epoch warm-up from 1e-6, swish;
        # with extra data the code exempts BatchNorm parameters from weight decay and the
        # paper (App. F) uses batches of 1024 with 75 % generated images: 256 real ones
        body["train"] = dict(epochs=100)
        # timm's scheduler is stepped after the optimizer step with the step's own index: step s
        # runs at the schedule's value for s - 1 (lr_lag_steps 1); its MultiStep form adds the 1 back
        body["optim"] = dict(lr=0.4, schedule="cosine", warmup_epochs=2.5, warmup_start_lr=1e-6, lr_lag_steps=1,
                             bn_weight_decay=False)
        body["data"]["batch_size"] = 256
        body["data"]["aux_fraction"] = 0.75   # 768 generated images under each 256 real ones; data.aux: the user's file
        # its preact-resnet18 is DeepMind's form (3x3 convolution shortcuts, "SAME" padding)
        body["model"] = dict(arch="dm_preact_resnet18", kwargs=dict(activation="swish"))
    else:
        tiny = ds == "tinyimagenet"
        body["train"] = dict(epochs=80 if tiny else 200)
        body["optim"] = dict(lr=0.1, schedule="multistep", milestones=[40, 60] if tiny else [100, 150])
    body["optim"].update(momentum=0.9, weight_decay=5e-4, nesterov=opt == "sgd")
    if opt == "awp":
        body["awp"] = dict(enabled=True, variant="sam", gamma=0.001 if ds == "tinyimagenet" else 0.005,
                           warmup_epochs=0)
    if obj == "pgd":
        body["objective"] = dict(name="pgd_at")
    else:
        body["objective"] = dict(name="trades", beta=6.0, forward="concat")
        body["attack"].update(start="uniform", start_std=0.001)
    if adr:
        body["method"] = dict(name="adr", ema_decay=0.995, lambda_low=lam_lo, lambda_high=lam_hi,
                              tau_high=tau_hi, tau_low=tau_lo)
    else:
        body["method"] = dict(name="onehot")
    return body


def trades_code() -> dict:
    return dict(train=dict(epochs=76), data=dict(drop_last=False),
                optim=dict(lr=0.1, momentum=0.9, weight_decay=2e-4, nesterov=False, schedule="multistep",
                           milestones=[74, 89, 99]),
                attack=dict(eps=0.031, alpha=0.007, steps=10, bn_mode="eval", start="normal", start_std=0.001),
                objective=dict(name="trades", beta=6.0, forward="three_pass"), method=dict(name="onehot"))


def trades_awp_code() -> dict:
    return dict(train=dict(epochs=200), data=dict(drop_last=False),
                optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, schedule="multistep",
                           milestones=[99, 149]),
                attack=dict(bn_mode="eval", start="normal", start_std=0.001),
                objective=dict(name="trades", beta=6.0, forward="three_pass_adv_first"), method=dict(name="onehot"),
                awp=dict(enabled=True, variant="wu2020", gamma=0.005, warmup_epochs=9))


def rice_code() -> dict:
    # lr_schedule(epoch + (i + 1) / n) with t / epochs < 0.5 / 0.75: fractions, one step ahead
    return dict(train=dict(epochs=200), data=dict(drop_last=False),
                optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, schedule="multistep",
                           milestones=[0.5, 0.75], lr_lag_steps=-1),
                attack=dict(bn_mode="train"), objective=dict(name="pgd_at"), method=dict(name="onehot"))


def kd_code(ds: str, obj: str) -> dict:
    tiny = ds == "tinyimagenet"
    body = dict(train=dict(epochs=100 if tiny else 200), data=dict(drop_last=False, val_fraction=0.1),
                optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, schedule="multistep",
                           milestones=[50, 80] if tiny else [50, 150]),
                attack=dict(bn_mode="train"), eval=dict(val_attack_steps=20),
                method=dict(name="kd", kd_weights="paper", temperature=2.0))
    body["objective"] = dict(name="pgd_at") if obj == "pgdat" else dict(name="trades", beta=6.0)
    return body


def sgls_code(code_form: bool, obj: str) -> dict:
    body = dict(train=dict(epochs=200), data=dict(drop_last=False),
                optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, schedule="multistep",
                           milestones=[99, 149] if code_form else [100, 150]),
                attack=dict(bn_mode="eval"))
    body["objective"] = dict(name="pgd_at") if obj == "pgdat" else dict(name="trades", beta=6.0)
    if code_form:
        body["method"] = dict(name="sglr", variant="code", momentum=0.9, start_epoch=90)
    else:
        body["method"] = dict(name="sglr", variant="paper", alpha=0.2, temperature=1.5, momentum=0.9)
    return body


def ltd_paper() -> dict:
    return dict(train=dict(epochs=120), data=dict(drop_last=False),
                optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, schedule="multistep",
                           milestones=[80, 100]),
                attack=dict(steps=8, bn_mode="eval"), objective=dict(name="trades", beta=6.0),
                method=dict(name="ltd", temperature=5.0))


# ---------------------------------------------------------------- one preset per name

def _adr_family(ds: str, arch: str, obj: str, adr: bool, awp: bool, wa: bool):
    """PGD-AT / TRADES, one-hot or ADR, with WA and AWP: the official run that trained it."""
    gobj, opt = ("pgd" if obj == "pgdat" else "trades"), ("awp" if awp else "sgd")
    cifar = ds in ("cifar10", "cifar100")
    extra = WA if wa else {}
    has_gin = (ds, arch, gobj, opt) in ADR_LAMBDA_TAU
    # plain TRADES is the TRADES code's run; TRADES + WA is the ADR code's run where it has one
    if obj == "trades" and not adr and not awp and not (wa and has_gin):
        return _m(trades_code(), extra), (
            "TRADES (Zhang et al., ICML 2019), the TRADES code's protocol (yaodongyu/TRADES "
            "train_trades_cifar10.py, trades.py: eps 0.031, step 0.007, wd 2e-4, 76 epochs, lr /10 at the "
            "1-based epochs 75/90/100, three forwards x, x', x, attack in eval mode from x + 0.001 N(0,1))"
            + ("" if ds == "cifar10" else "; that script is CIFAR-10 only, its protocol is applied here")
            + ("; + WA (EMA 0.995, evaluated)" if wa else "")
            + ("; the ADR paper's TRADES baseline is the preset *-trades-adrbaseline" if arch == "resnet18" else ""))
    if obj == "trades" and awp and not adr and arch == "wrn34-10" and cifar:
        return _m(trades_awp_code(), extra), (
            "TRADES-AWP (Wu, Xia, Wang, NeurIPS 2020), the AWP code's protocol (csdongxian/AWP "
            "trades_AWP/train_trades_cifar.py: gamma 0.005, --awp-warmup 10 on 1-based epochs = AWP from the "
            "0-based epoch 9, lr /10 at the 1-based epochs 100/150, Wu et al.'s layer-wise AWP, loss passes "
            "x', x, x)"
            + ("; + WA (EMA 0.995, evaluated)" if wa else ""))
    if obj == "pgdat" and not adr and not awp and arch == "preactresnet18" and cifar:
        return _m(rice_code(), extra), (
            "PGD-AT (Madry et al. 2018) as run by Rice et al. 2020 (locuslab/robust_overfitting "
            "train_cifar.py: PreAct-ResNet-18, lr 0.1 -> 0.01 at 50 % -> 0.001 at 75 % of training, evaluated at "
            "epoch + (i+1)/n (each decay one step early: optim.lr_lag_steps -1), no Nesterov)"
            + ("; + WA (EMA 0.995, evaluated)" if wa else ""))
    src = arch if has_gin else "resnet18"
    path = gin_path(ds, src, gobj, opt, adr)
    body = adr_code(ds, src, gobj, opt, adr)
    what = ("ADR (Wu, Wang, Chen, ICLR 2024)" if adr else
            f"{'PGD-AT' if obj == 'pgdat' else 'TRADES'} baseline of the ADR paper")
    if src == arch:
        desc = f"{what}, the ADR code's run {path} (yuyuwu5/ADR)"
    else:
        desc = (f"{what}: the ADR code has no config for {arch}; its {path} (yuyuwu5/ADR) protocol on {arch}")
    if src == "preactresnet18":
        desc += (" -- the generated-data run: 768 DDPM images stacked under each 256 real ones "
                 "(data.aux_fraction 0.75); give the 1M DDPM file with --set data.aux=PATH "
                 f"({'cifar100' if ds == 'cifar100' else 'cifar10'}_ddpm.npz, see rb_labelrefine/data/aux.py; "
                 "not set: the run refuses to start). Not reproduced: the code's BatchNorm momentum 1.0 then "
                 "0.01 with extra data, and its aux loader replaying the first pass's batches")
    if awp:
        desc += "; SAM-style AWP of the ADR code (src/util/awp.py)"
    if wa:
        desc += "; WA = the EMA 0.995 evaluated (the code's --ema)"
    return _m(body, extra), desc


PAPERS = {"adr": "ADR (Wu, Wang, Chen, ICLR 2024)", "kd": "KD+SWA (Chen, Zhang, Liu, Chang, Wang, ICLR 2021)",
          "sglr": "SGLR (Li, Yu et al., Soften to Defend)", "ltd": "LTD (Chen et al., Low Temperature Distillation)",
          "label_smoothing": "label smoothing baseline (Szegedy et al. 2016)"}
BASE_PAPERS = {"pgd_at": "PGD-AT (Madry et al., ICLR 2018)", "trades": "TRADES (Zhang et al., ICML 2019)",
               "natural": "standard training (teacher for KD+SWA / LTD)"}


def _paper(body: dict) -> str:
    return PAPERS.get(body["method"]["name"]) or BASE_PAPERS[body["objective"]["name"]]


def _m(*dicts):
    """Deep-merge left to right (the same merge as ``base:`` inheritance)."""
    out: dict = {}
    for d in dicts:
        out = _merge(out, d)
    return out


def _presets_for(ds: str, arch: str):
    """{suffix: (body, description)} for one data set and architecture."""
    out = {}
    for obj in ("pgdat", "trades"):
        for adr in (False, True):
            for comp in ("", "-wa", "-awp", "-wa-awp"):
                name = f"{obj}{'-adr' if adr else ''}{comp}"
                out[name] = _adr_family(ds, arch, obj, adr, awp="awp" in comp, wa="wa" in comp)
        kd_src = ("KD+SWA (Chen, Zhang, Liu, Chang, Wang, ICLR 2021), the KD+SWA code's protocol "
                  "(VITA-Group/Alleviate-Robust-Overfitting main_adv.py: lr /10 at 50/150, 9:1 split, PGD-20 "
                  "validation, attack in train mode, T 2); loss weights of the paper (robust 0.5, standard 0.25; "
                  "method.kd_weights=code for the code's 0.6/0.1)")
        if ds == "tinyimagenet":
            kd_src += "; Tiny-ImageNet: 100 epochs, lr /10 at 50/80 (paper Sec. 4.1)"
        if obj == "trades":
            kd_src += "; TRADES form (the code is PGD-AT only)"
        out[f"{obj}-kd"] = (kd_code(ds, obj), kd_src)
        out[f"{obj}-kd-swa"] = (_m(kd_code(ds, obj), dict(swa=dict(enabled=True, bn_form="code"))),
                                kd_src + "; SWA from the first lr decay (paper; the code's --swa_start 55 is "
                                "swa.start_epoch=55), BN recomputed as the code does after every snapshot")
        sg = ("SGLR (Li, Yu et al., Soften to Defend), the paper's form (alpha 0.2, T 1.5, m 0.9; Table 4) on "
              "the SGLS code's schedule (devicerxx/SGLS: 200 epochs, lr /10 at 100/150, plain SGD, attack in "
              "eval mode)")
        if obj == "trades":
            sg += "; TRADES form (the code is PGD-AT only)"
        out[f"{obj}-sglr"] = (sgls_code(False, obj), sg)
        ls_body = _m(adr_code(ds, "resnet18", "pgd" if obj == "pgdat" else "trades", "sgd", False),
                     dict(method=dict(name="label_smoothing", smoothing=0.1)))
        out[f"{obj}-ls"] = (ls_body, "label smoothing 0.1 (Szegedy et al. 2016), a baseline of the ADR paper with "
                                     "no public code: the ADR code's protocol (yuyuwu5/ADR "
                                     f"{gin_path(ds, 'resnet18', 'pgd' if obj == 'pgdat' else 'trades', 'sgd', False)})")
    out["pgdat-sglr-code"] = (sgls_code(True, "pgdat"), (
        "SGLR, the public code's form (devicerxx/SGLS losses/loss.py SGLS, scripts/*/run_sgls.sh): hard labels "
        "until the 1-based epoch 90, then S <- 0.9 S + 0.1 (0.2 softmax f(x) + 0.8 softmax f(x')); attack "
        "after model.eval(); MultiStepLR stepped with the 1-based epoch at the start of each epoch = lr /10 "
        "from the 0-based epochs 99/149; plain SGD, wd 5e-4, batch 128"))
    ltd_src = ("LTD (Chen et al., Low Temperature Distillation; paper App. A.2, no public code): TRADES form, "
               "beta 6, teacher temperature 5, 120 epochs, lr /10 after the 80th and 100th epoch, SGD 0.9 with "
               "Nesterov, wd 5e-4, PGD-8 in training")
    if ds == "tinyimagenet":
        ltd_src += "; the paper has no Tiny-ImageNet run, its CIFAR schedule is used"
    out["trades-ltd"] = (ltd_paper(), ltd_src)
    out["trades-ltd-awp"] = (_m(ltd_paper(), dict(awp=dict(enabled=True, variant="wu2020", gamma=0.005,
                                                           warmup_epochs=9))),
                             ltd_src + "; + AWP of Wu et al. 2020 with the AWP code's settings (gamma 0.005, "
                                       "--awp-warmup 10 on 1-based epochs)")
    natural = kd_code(ds, "pgdat")
    natural.pop("attack")
    natural.update(objective=dict(name="natural"), method=dict(name="onehot"))
    out["natural"] = (natural,
                      "standard training, the KD+SWA code's protocol (VITA-Group/Alleviate-Robust-Overfitting "
                      "main_std.py: lr /10 at 50/150, 9:1 split): "
                      "the standard teacher of KD+SWA and the natural teacher of LTD")
    if arch == "resnet18":
        out["trades-adrbaseline"] = (adr_code(ds, "resnet18", "trades", "sgd", False), "TRADES baseline of the ADR paper, the ADR code's run "
                                        f"{gin_path(ds, 'resnet18', 'trades', 'sgd', False)} (yuyuwu5/ADR)")
    return out


def main():
    HERE.mkdir(parents=True, exist_ok=True)
    for old in HERE.glob("*.yaml"):  # only the files this script writes (offline presets are hand-written)
        if old.name.lstrip("_").startswith(tuple(DATASETS)):
            old.unlink()
    n = 0
    for ds, ds_cfg in DATASETS.items():
        (HERE / f"_{ds}.yaml").write_text("# shared protocol, inherited by the presets below\n" +
                                          yaml.safe_dump(ds_cfg, sort_keys=False))
        for arch_name, arch in ARCHS.items():
            for suffix, (body, desc) in _presets_for(ds, arch_name).items():
                body = dict(body)
                model = body.pop("model", dict(arch=arch))
                doc = {"base": f"_{ds}", "description": desc, "paper": _paper(body), **body, "model": model}
                (HERE / f"{ds}-{arch_name}-{suffix}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
                n += 1
    print(f"wrote {n} presets to {HERE}")


if __name__ == "__main__":
    main()
