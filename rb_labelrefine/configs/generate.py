"""Write the paper presets (``python -m rb_labelrefine.configs.generate``).

One YAML file per setting the papers report, named
``<dataset>-<arch>-<objective>-<method>[-wa][-awp][-swa]``, each inheriting a shared base
(``_<dataset>.yaml``) that holds the data set's protocol.  Hyper-parameters and their sources:

* CIFAR protocol (all four papers): Linf eps 8/255, step 2/255, 10 steps; SGD 0.9, wd 5e-4,
  batch 128, lr 0.1; crop 32 pad 4 + flip; 200 epochs.
* ADR (Wu et al. 2024, Sec. 5.1): lr /10 at 50 % and 75 %; EMA 0.995; CIFAR-10 lambda 0.7->0.95,
  tau 2.5->2.0; CIFAR-100 lambda 0.7->0.95, tau 1.5->1.0; TinyImageNet lambda 0.5->0.9,
  tau 2.0->1.5, 80 epochs; AWP gamma 0.005; PGD-10 validation; attack in train mode (code).
* KD+SWA (Chen et al. 2021): lr /10 at epochs 50 and 150 (paper); T = 2; weights robust 0.5,
  standard 0.25 (paper; ``method.kd_weights=code`` gives 0.6/0.1); SWA from the first decay;
  9:1 train/val split, PGD-20 validation.
* LTD (Chen et al.): TRADES form, beta 6, teacher temperature 5 (CIFAR-10 best), 120 epochs,
  lr /10 at 80 and 100; attack in eval mode (TRADES code).
* SGLR (Li et al.): alpha 0.2, T 1.5 (Table 4), m 0.9; lr /10 at 100 and 150; paper variant by
  default, ``method.variant=code`` for the public code (start epoch 90, counted as its 1-based
  ``epoch >= es``; ``method.start_epoch`` unset = the variant's default).
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
ADR_HP = {"cifar10": dict(lambda_low=0.7, lambda_high=0.95, tau_high=2.5, tau_low=2.0),
          "cifar100": dict(lambda_low=0.7, lambda_high=0.95, tau_high=1.5, tau_low=1.0),
          "tinyimagenet": dict(lambda_low=0.5, lambda_high=0.9, tau_high=2.0, tau_low=1.5)}
ARCHS = {"resnet18": "resnet18", "preactresnet18": "preact_resnet18", "wrn34-10": "wrn_34_10"}
COMPANIONS = {"": {}, "-wa": dict(wa=dict(enabled=True, decay=0.995)), "-awp": dict(awp=dict(enabled=True, gamma=0.005)),
              "-wa-awp": dict(wa=dict(enabled=True, decay=0.995), awp=dict(enabled=True, gamma=0.005))}


def _presets_for(ds: str):
    adr = dict(method=dict(name="adr", ema_decay=0.995, **ADR_HP[ds]), optim=dict(milestones=[0.5, 0.75]),
               attack=dict(bn_mode="train"), paper="ADR (Wu, Wang, Chen, ICLR 2024)")
    kd = dict(method=dict(name="kd", kd_weights="paper", temperature=2.0), optim=dict(milestones=[50, 150]),
              data=dict(val_fraction=0.1), eval=dict(val_attack_steps=20), attack=dict(bn_mode="train"),
              paper="KD+SWA (Chen, Zhang, Liu, Chang, Wang, ICLR 2021)")
    sglr = dict(method=dict(name="sglr", variant="paper", alpha=0.2, temperature=1.5, momentum=0.9),
                optim=dict(milestones=[100, 150]), attack=dict(bn_mode="train"),
                paper="SGLR (Li, Yu et al., Soften to Defend)")
    ltd = dict(method=dict(name="ltd", temperature=5.0), objective=dict(name="trades", beta=6.0),
               optim=dict(milestones=[80, 100]), train=dict(epochs=120 if ds != "tinyimagenet" else 80),
               attack=dict(bn_mode="eval"), paper="LTD (Chen et al., Low Temperature Distillation)")
    base_at = dict(method=dict(name="onehot"), optim=dict(milestones=[0.5, 0.75]), attack=dict(bn_mode="train"),
                   paper="PGD-AT (Madry et al., ICLR 2018)")
    base_trades = dict(method=dict(name="onehot"), optim=dict(milestones=[0.5, 0.75]), attack=dict(bn_mode="eval"),
                       paper="TRADES (Zhang et al., ICML 2019)")
    ls = dict(method=dict(name="label_smoothing", smoothing=0.1), optim=dict(milestones=[0.5, 0.75]),
              attack=dict(bn_mode="train"), paper="label smoothing baseline (Szegedy et al. 2016)")
    out = {}
    for obj, objd in (("pgdat", dict(name="pgd_at")), ("trades", dict(name="trades", beta=6.0))):
        base = base_at if obj == "pgdat" else base_trades
        for comp, cd in COMPANIONS.items():
            out[f"{obj}{comp}"] = _m(base, dict(objective=objd), cd)
            out[f"{obj}-adr{comp}"] = _m(adr, dict(objective=objd), cd)
        out[f"{obj}-kd"] = _m(kd, dict(objective=objd))
        out[f"{obj}-kd-swa"] = _m(kd, dict(objective=objd), dict(swa=dict(enabled=True)))
        out[f"{obj}-sglr"] = _m(sglr, dict(objective=objd))
        out[f"{obj}-ls"] = _m(ls, dict(objective=objd))
    out["trades-ltd"] = _m(ltd)
    out["trades-ltd-awp"] = _m(ltd, dict(awp=dict(enabled=True, gamma=0.005)))
    out["natural"] = dict(method=dict(name="onehot"), objective=dict(name="natural"), optim=dict(milestones=[0.5, 0.75]),
                          paper="standard training (teacher for KD+SWA / LTD)")
    return out


def _m(*dicts):
    """Deep-merge left to right (the same merge as ``base:`` inheritance)."""
    out: dict = {}
    for d in dicts:
        out = _merge(out, d)
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
            for suffix, body in _presets_for(ds).items():
                name = f"{ds}-{arch_name}-{suffix}"
                doc = {"base": f"_{ds}", "description": f"{body.get('paper', '')}: {ds}, {arch_name}, {suffix}",
                       **{k: v for k, v in body.items()}, "model": dict(arch=arch)}
                (HERE / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
                n += 1
    print(f"wrote {n} presets to {HERE}")


if __name__ == "__main__":
    main()
