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
* Wang et al. 2023, *Better Diffusion Models Further Improve Adversarial Training*
  (wzekai99/DM-Improves-AT): its README's ``train-wa.py`` command (WRN-28-10 swish, cifar10s,
  batch 512, 400 epochs, lr 0.2, beta 5, unsup-fraction 0.7, ls 0.1) over ``core/utils/parser.py``'s
  defaults (cosinew scheduler, Nesterov, wd 5e-4, PGD-10 2/255, augment base, tau 0.995 in
  train-wa.py) and ``gowal21uncovering/utils/{watrain,trades}.py``, ``core/utils/{train,utils}.py``,
  ``core/data/{semisup,cifar10s}.py``, ``core/models/wideresnetwithswish.py`` -- see
  :func:`wang2023`.
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


def wang2023(ds: str, depth: int, width: int) -> dict:
    """The DM-Improves-AT recipe (Wang et al. 2023), value by value from its code:

    * data -- ``SemiSupervisedSampler``: a batch of 512 holds ``int(512 * 0.7)`` = 358 generated and
      154 real images (data.aux_batch split), an epoch is ``ceil(50000 / 512)`` = 98 batches whose real
      images are the head of a fresh permutation (data.epoch_images 50000); ``validation=True`` holds out
      the first 1024 training images (val_fraction 1024 / 50000); augmentation ``base`` (crop 32 pad 4,
      flip) on real and generated images alike;
    * TRADES, ``trades_loss``: attack from x + U(-eps, eps) clamped, 10 sign steps of 2/255 on the
      batch-mean KL to the clean prediction, BatchNorm in train mode with its statistics frozen
      (``track_bn_stats(model, False)``); loss CE(f(x), smoothed y) + beta KL(f(x) || f(x')) over two
      train-mode passes f(x), f(x'); ``SmoothCrossEntropyLoss(0.1)`` = CE against 0.9 onehot + 0.1 / C;
    * ``WATrainer``: SGD lr 0.2, momentum 0.9 (cycled by OneCycleLR), Nesterov, wd 5e-4 except the
      "batchnorm" parameters; ``cosinew`` = OneCycleLR(pct_start 0.025, total_steps = epochs) stepped per
      epoch; WA ``ema_update`` tau 0.995 with dynamic decay and a warm-up of 0.025 x all steps,
      parameters only, BatchNorm statistics from the model (``update_bn``); BatchNorm momentum 1.0 on
      global step 0 then 0.01; selection by PGD-40 on the CW margin of the WA model on the held-out 1024.
    """
    return dict(
        data=dict(augment=True, batch_size=512, aux_batch="split", aux_fraction=0.7, epoch_images=50000,
                  val_fraction=1024 / 50000, drop_last=False),
        model=dict(arch=f"dm_wrn_{depth}_{width}"),
        objective=dict(name="trades", beta=5.0, forward="separate"),
        attack=dict(name="tpgd", eps="8/255", alpha="2/255", steps=10, start="uniform_eps", bn_mode="train_frozen"),
        method=dict(name="label_smoothing", smoothing=0.1),
        wa=dict(enabled=True, decay=0.995, form="gowal", warmup_fraction=0.025),
        optim=dict(lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True, schedule="onecycle",
                   onecycle_pct_start=0.025, cycle_momentum=True, bn_weight_decay=False),
        train=dict(epochs=400, bn_first_step_momentum=1.0),
        eval=dict(model="ema", val_attack="pgd_margin", val_attack_steps=40),
    )


WANG_PAPER = "Wang, Pang, Du, Lin, Liu, Yan. Better Diffusion Models Further Improve Adversarial Training, ICML 2023"
WANG_DIFFERS = (
    "Where it differs from the code: the generated images are drawn without replacement (the code: "
    "torch.randint, with replacement) and stacked after the real ones (the code shuffles each batch; "
    "BatchNorm and the batch-mean losses do not depend on the order); the held-out 1024 are a stratified "
    "random split (the code: the first 1024 training images); the validation PGD-40 (step attack.alpha "
    "2/255, as the code's) ascends the margin max_j!=y z_j - z_y (eval.val_attack pgd_margin; the code's CWLoss "
    "clamps it at 0, so it stops moving a point once misclassified) and keeps the earlier epoch on a tie (the "
    "code: >=, the later); the RobustBench entries' own runs (20M/50M images, up to 2000 "
    "epochs, batch 1024 for WRN-70-16, their argtxt files) are this recipe at another scale: "
    "--set data.batch_size=... train.epochs=... with the matching data.aux file.")


def _wang_presets(ds: str):
    """{name: (body, description, paper)} of the recipe and of each label-refinement method on it."""
    out = {}
    aux = ("requires data.aux: the EDM set of the code's README (HuggingFace P2333/DM-Improves-AT, "
           f"{ds}/1m.npz ... 50m; give it with --set data.aux=PATH; not set: the run refuses to start, "
           "see rb_labelrefine/data/aux.py)")
    adr_tau = (2.5, 2.0) if ds == "cifar10" else (1.5, 1.0)
    for depth, width in ((28, 10), (70, 16)):
        base = wang2023(ds, depth, width)
        arch = (f"WRN-{depth}-{width} swish (DeepMind form, RobustBench's DMWideResNet: model.arch "
                f"dm_wrn_{depth}_{width})")
        head = (f"the recipe of Wang et al. 2023 (wzekai99/DM-Improves-AT, README train-wa.py command and "
                f"core/utils/parser.py defaults) on {ds} with {arch}: TRADES beta 5, label smoothing 0.1, "
                "WA tau 0.995 (Gowal form, warm-up 2.5 % of steps), batch 512 of which 70 % generated, lr 0.2 "
                "OneCycle per epoch (cosinew) with Nesterov, wd 5e-4 (none on BatchNorm), 400 epochs; "
                + aux + ". " + WANG_DIFFERS)
        name = f"{ds}-dmwrn{depth}-{width}-wang2023"
        out[name] = (base, "DM-Improves-AT: " + head, WANG_PAPER)
        untried = ("UNTRIED COMBINATION (no published run; the question this preset exists to answer): {m} in "
                   "place of the label smoothing of ")
        variants = {
            "adr": (dict(method=dict(name="adr", ema_decay=0.995, lambda_low=0.7, lambda_high=0.95,
                                     tau_high=adr_tau[0], tau_low=adr_tau[1])),
                    f"ADR (lambda 0.7 -> 0.95, tau {adr_tau[0]} -> {adr_tau[1]}: the ADR code's {ds} TRADES "
                    "config; its own EMA teacher 0.995, the WA stays the recipe's)", PAPERS["adr"]),
            "adr-auto": (dict(method=dict(name="adr", ema_decay=0.995, lambda_low=0.7, lambda_high=0.95,
                                          tau_high=adr_tau[0], tau_low=adr_tau[1], schedule="auto")),
                         "ADR with tau/lambda fitted on validation adversarial examples (method.schedule auto)",
                         PAPERS["adr"]),
            "sglr": (dict(method=dict(name="sglr", variant="paper", alpha=0.2, temperature=1.5, momentum=0.9)),
                     "SGLR, the paper's form (alpha 0.2, T 1.5, m 0.9), TRADES form; its per-sample memory covers "
                     "the generated images too (N x C floats: 1M x 10 = 40 MB, 50M x 100 = 20 GB)",
                     PAPERS["sglr"]),
            "kd-swa": (dict(method=dict(name="kd", kd_weights="paper", temperature=2.0),
                            wa=dict(enabled=False), swa=dict(enabled=True), eval=dict(model="swa")),
                       "KD+SWA (robust and standard self-teachers trained beforehand on the same recipe: "
                       "method.robust_teacher / method.standard_teacher; SWA from the middle of training -- the "
                       "one-cycle schedule has no decay step, optim.milestones' first fraction 0.5 is used -- "
                       "in place of the recipe's WA)", PAPERS["kd"]),
            "ltd": (dict(method=dict(name="ltd", temperature=5.0)),
                    "LTD (its natural teacher, temperature 5, in the CE term of the recipe's TRADES; "
                    "method.teacher: a naturally trained dm_wrn of the same size)", PAPERS["ltd"]),
        }
        for suffix, (over, what, paper) in variants.items():
            body = _m(base, over)
            body["method"] = dict(over["method"])   # the method section is replaced, not merged
            if suffix == "kd-swa":
                body["wa"] = dict(enabled=False)
            out[f"{name}-{suffix}"] = (body, untried.format(m=what) + "DM-Improves-AT: " + head,
                                       f"{paper} on the recipe of Wang et al. 2023")
    return out


# ---------------------------------------------------------------- ImageNet (Singh et al. 2023)
SINGH_PAPER = ("Singh, Croce, Hein. Revisiting Adversarial Training for ImageNet: Architectures, Training and "
               "Generalization across Threat Models, NeurIPS 2023")
# README rows with a plain timm architecture (the *-CvSt ConvStem models are the code's own classes):
# name -> (timm model, epochs)
SINGH_RUNS = {"convnext_tiny": ("convnext_tiny", 300), "vit_small": ("vit_small_patch16_224", 300),
              "convnext_base": ("convnext_base", 50), "vit_base": ("vit_base_patch16_224", 50)}
SINGH_DIFFERS = (
    "Not reproduced (the package has no such feature): the code's heavy augmentation (data.augmentations 1: "
    "RandAugment, Mixup/CutMix through timm's Mixup, whose label smoothing 0.1 it carries -- here the plain "
    "method label_smoothing 0.1 with RandomResizedCrop + flip), its own apgd_train (here torchattacks' APGD-CE, "
    "attack.name apgd, 2 steps: pip install torchattacks), the clean-trained initialisation (the README's "
    "clean-init checkpoints: give one with model.kwargs.pretrained or start from scratch), fp16 autocast "
    "(train.amp fp16 is the package's), the GPU count behind --training.batch_size 80 (per GPU; here the global "
    "batch); model selection: the code keeps the last EMA, here best-by-validation as everywhere (eval.model "
    "ema on a 0.1 % held-out split)")


def singh2023(timm_name: str, epochs: int) -> dict:
    """nmndeep/revisiting-at ``run_train.sh`` over ``main.py``'s fastargs defaults: AdamW(betas 0.9, 0.95),
    lr 1e-3, wd 0.05 without decay on 1-d parameters and biases, get_cosine_lr with lr_peak_epoch 20 from
    1e-4 x lr to lr then cosine to 5e-6 (interpolated per step), APGD 2 iterations at eps 4/255, label
    smoothing 0.1, timm ModelEmaV2 0.9999, 224 px."""
    return dict(
        data=dict(name="imagenet", augment=True, batch_size=80, val_fraction=0.001, image_size=224, num_workers=8),
        model=dict(arch=f"timm:{timm_name}"),
        objective=dict(name="pgd_at"),
        attack=dict(name="apgd", norm="Linf", eps="4/255", alpha="1/255", steps=2),
        method=dict(name="label_smoothing", smoothing=0.1),
        wa=dict(enabled=True, decay=0.9999),
        optim=dict(name="adamw", betas=[0.9, 0.95], lr=1e-3, weight_decay=0.05, no_decay_1d=True,
                   schedule="peak_cosine", warmup_epochs=20, warmup_start_lr=1e-7, lr_min=5e-6),
        train=dict(epochs=epochs),
        eval=dict(model="ema", val_attack_steps=10, curve_test_size=500, batch_size=64),
    )


def _imagenet_presets():
    out = {}
    for short, (timm_name, epochs) in SINGH_RUNS.items():
        body = singh2023(timm_name, epochs)
        head = (f"Singh et al. 2023 (nmndeep/revisiting-at run_train.sh + main.py defaults), its {short} row "
                f"({epochs} epochs): timm:{timm_name}, ImageNet Linf eps 4/255, AdamW (0.9, 0.95) lr 1e-3 wd 0.05 "
                "(none on 1-d parameters / biases), 20 warm-up epochs from 1e-4 x lr then cosine to 5e-6, APGD-CE 2 "
                "steps, label smoothing 0.1, EMA 0.9999 evaluated, 224 px (data.root: the ImageFolder train/ val/ "
                "tree; test: RobustBench's 5,000-image subset when present). " + SINGH_DIFFERS)
        out[f"imagenet-{short}-singh2023"] = (body, head, SINGH_PAPER)
        adr = _m(body, {})
        adr["method"] = dict(name="adr", ema_decay=0.995, lambda_low=0.5, lambda_high=0.9, tau_high=2.0, tau_low=1.5)
        out[f"imagenet-{short}-singh2023-adr"] = (
            adr, "UNTRIED COMBINATION (no published run): ADR in place of the label smoothing of " + head +
            " ADR's values are its Tiny-ImageNet ones (lambda 0.5 -> 0.9, tau 2.0 -> 1.5; the ADR paper has no "
            "ImageNet run), its own EMA teacher 0.995 per step", PAPERS["adr"] + " on the recipe of Singh et al. 2023")
    return out


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
        if old.name.lstrip("_").startswith(tuple(DATASETS) + ("imagenet",)):
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
        if ds in ("cifar10", "cifar100"):
            for name, (body, desc, paper) in _wang_presets(ds).items():
                body = dict(body)
                model = body.pop("model")
                doc = {"base": f"_{ds}", "description": desc, "paper": paper, **body, "model": model}
                (HERE / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
                n += 1
    (HERE / "_imagenet.yaml").write_text(
        "# shared protocol, inherited by the presets below\n" +
        yaml.safe_dump(dict(data=dict(name="imagenet", augment=True, val_fraction=0.001),
                            attack=dict(eps="4/255", alpha="1/255", steps=2)), sort_keys=False))
    for name, (body, desc, paper) in _imagenet_presets().items():
        body = dict(body)
        model = body.pop("model")
        doc = {"base": "_imagenet", "description": desc, "paper": paper, **body, "model": model}
        (HERE / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        n += 1
    print(f"wrote {n} presets to {HERE}")


if __name__ == "__main__":
    main()
