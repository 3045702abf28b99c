"""Validated run configuration.

A config is a tree of small dataclasses, one per part of the run
(data -> model -> method -> objective/attack -> companions -> optimiser -> train -> eval),
loaded from YAML presets shipped as package data or from a user's file, and overridden
field by field with ``--set section.key=value``.  Every error names the offending field
(``ConfigError.field``) so the CLI can report it and exit with code 2.

The ``method`` section is flat in YAML (``method: {name: ltd, temperature: 5}``) and is parsed
against the chosen method's own settings dataclass (``rb_labelrefine/rectifiers/<method>.py``):
omitted fields take that method's paper defaults, and a field of another method is an error
naming it.  Dumped configs hold the chosen method's fields only.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError  # defined in the leaf errors.py, with its exit code

__all__ = [
    "ConfigError", "Config", "load_config", "list_presets", "apply_overrides", "config_to_dict",
    "config_from_dict", "validate", "check_runnable", "make_method", "parse_method", "dump_config",
]

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "synthetic", "imagenet")
OBJECTIVES = ("pgd_at", "trades", "natural")
ATTACKS = ("pgd", "tpgd", "apgd", "fgsm", "mifgsm")
NORMS = ("Linf", "L2")
BN_MODES = ("train", "eval", "train_frozen")
EVAL_MODELS = ("auto", "raw", "ema", "swa")
VAL_ATTACK_NAMES = ("pgd_ce", "pgd_margin", "pgd_dlr")   # = evaluation.pgd.VAL_ATTACKS (no torch import here)
SCHEDULES = ("multistep", "cosine", "constant", "onecycle", "peak_cosine")
OPTIMIZERS = ("sgd", "adamw")
TRADES_FORWARDS = ("separate", "concat", "three_pass", "three_pass_adv_first")
ATTACK_STARTS = ("default", "uniform", "normal", "uniform_eps")
WA_FORMS = ("timm", "gowal")
AUX_BATCH_FORMS = ("add", "split")
SWA_BN_FORMS = ("equal", "code")
AWP_VARIANTS = ("wu2020", "sam")


@dataclass
class DataConfig:
    name: str = "digits"            # digits | fashion_mnist | cifar10 | cifar100 | tiny_imagenet | synthetic
    root: Optional[str] = None      # where the data set lives on disk (None: the source's default)
    val_fraction: float = 0.1       # held-out split that selects the best checkpoint (KD+SWA: 9:1)
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    augment: bool = False           # random crop (pad 4) + horizontal flip, CIFAR style
    batch_size: int = 128
    num_workers: int = 0
    seed: int = 0                   # seeds the splits, independent of the training seed
    # drop the partial last training batch (the ADR code: 390 steps per CIFAR-10 epoch); the
    # step count, the lr schedule, EMA decay scaling and resume all use the dropped count
    drop_last: bool = False
    # generated auxiliary data (rb_labelrefine/data/aux.py): an uncompressed .npz with 'image'
    # (uint8 N x H x W x C) and 'label' (N); aux_fraction of every training batch is drawn from it,
    # stacked under the data.batch_size real images (ADR App. F: batch 1024, 75 % generated =
    # batch_size 256, aux_fraction 0.75)
    aux: Optional[str] = None
    aux_fraction: float = 0.0
    # add: aux_count(batch_size, aux_fraction) generated images stacked under batch_size real ones
    # (the ADR code); split: batch_size is the whole batch, int(batch_size * aux_fraction) of it
    # generated (the Carmon / Gowal / Wang et al. 2023 SemiSupervisedSampler: 512 = 154 + 358)
    aux_batch: str = "add"
    # an epoch is ceil(epoch_images / whole batch) steps, each epoch's real images the head of a
    # fresh permutation (the SemiSupervisedSampler's num_batches = ceil(50000 / batch) on CIFAR);
    # None: an epoch is one pass over the real training split
    epoch_images: Optional[int] = None
    # imagenet only (ImageFolder root/train, root/val; rb_labelrefine/data/imagenet.py): the crop size of
    # RandomResizedCrop (training) and of RobustBench's Res256Crop224 scaled with it (evaluation); null: 224
    image_size: Optional[int] = None
    # where training batches are built (rb_labelrefine/training/stream.py): true = images kept on the
    # training device as uint8, whole batches gathered and crop+flipped there from a generator seeded
    # per (seed, epoch, batch); false = per item through a DataLoader (augmentation from the global
    # RNG); auto = true on a CUDA device when the data set is a tensor set that fits in a quarter of
    # its free memory, else false (so CPU runs keep their numbers)
    device_resident: str = "auto"


@dataclass
class ModelConfig:
    arch: str = "small_cnn"         # registry name, or timm:<name>
    kwargs: dict = field(default_factory=dict)
    # start training from these weights instead of a random initialisation: a run directory (its
    # best.safetensors; name DIR/final.safetensors for the last epoch's), a .safetensors written by
    # this package (a run's or an export's), or timm:pretrained (timm's pretrained weights of a
    # timm:<name> arch; downloads them).  The architecture must match (checked per tensor).
    init_from: Optional[str] = None


@dataclass
class ObjectiveConfig:
    name: str = "pgd_at"            # pgd_at | trades
    beta: float = 6.0               # TRADES / LTD lambda
    # TRADES forward passes of the training loss (BatchNorm statistics differ, see objectives.py):
    # separate: f(x), f(x') | concat: f(cat[x, x']) once, BatchNorm sees 2B (the ADR code)
    # three_pass: f(x), f(x'), f(x) (the TRADES code) | three_pass_adv_first: f(x'), f(x), f(x)
    # (the TRADES-AWP code; CE on the last pass)
    forward: str = "separate"


@dataclass
class AttackConfig:
    """The inner maximisation used in training (torchattacks)."""
    name: str = "auto"              # auto: PGD for pgd_at, TPGD (the TRADES KL attack) for trades
    norm: str = "Linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    bn_mode: str = "train"          # BatchNorm mode during the attack; the ADR and KD code attack in train mode
    # Random start of PGD / TPGD (Linf): default = the attack's own (PGD: x + U(-eps, eps), clamped;
    # TPGD: x + 0.001 N(0, 1), clamped); uniform = x + start_std U[0, 1), no clamp (the ADR code's
    # TRADES attack); normal = x + start_std N(0, 1), no clamp (the TRADES code)
    start: str = "default"
    start_std: float = 0.001
    # (uniform_eps: x + U(-eps, eps) clamped to [0, 1], for TPGD too -- the DM-Improves-AT code's
    # TRADES attack.  bn_mode train_frozen: BatchNorm in train mode (batch statistics) without
    # updating its running statistics -- that code's track_bn_stats(model, False) around the attack)


@dataclass
class WAConfig:
    enabled: bool = False
    decay: float = 0.995
    warmup_epochs: float = 0.0      # copy the raw weights (no averaging) before this point
    # timm: parameters and float buffers averaged with the fixed decay (ModelEmaV2, the ADR code);
    # gowal: Gowal et al. 2020's WA as the DM-Improves-AT code's ema_update -- parameters only,
    # decay min(decay, (1 + d) / (10 + d)) at d = updates - W, copies while updates < W, BatchNorm
    # statistics taken from the trained model (its update_bn)
    form: str = "timm"
    warmup_fraction: float = 0.0    # gowal: W = warmup_fraction * all training steps (the code: 0.025)


@dataclass
class SWAConfig:
    enabled: bool = False
    start_epoch: Optional[int] = None   # None: the first lr decay (Chen et al. 2021)
    bn_update: bool = True              # recompute BatchNorm statistics before evaluating the average
    # equal: every batch weighs the same (cumulative average), recomputed when the average is next
    # evaluated, over the training split in order; code: batches weigh by size (momentum b/(n+b)),
    # after every snapshot, over the shuffled (augmented) training loader (the KD+SWA code)
    bn_form: str = "equal"


@dataclass
class AWPConfig:
    enabled: bool = False
    # wu2020: Wu et al. 2020 / their code (proxy step, layer-wise on weights of rank >= 2, restored
    # after the SGD step); sam: the ADR code's util/awp.py (every parameter with a gradient, restored
    # before the SGD step, BatchNorm statistics from the pass at the unperturbed weights)
    variant: str = "wu2020"
    gamma: float = 0.005            # relative weight-perturbation radius (ADR: rho = 0.005)
    # AWP is active from the 0-based epoch index warmup_epochs on.  The AWP code's epochs count
    # from 1 ("epoch >= args.awp_warmup"): its --awp-warmup K is warmup_epochs = K - 1.
    warmup_epochs: int = 0
    proxy_lr: float = 0.01          # wu2020 only


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"
    milestones: list = field(default_factory=lambda: [0.5, 0.75])   # fractions of training (<1) or epochs
    gamma: float = 0.1
    # Linear warm-up over the first int(warmup_epochs * steps_per_epoch) steps, from
    # warmup_start_lr towards lr; the schedule is not shifted by it (timm's CosineLRScheduler with
    # warmup_prefix=False, as the ADR code uses it: 2.5 epochs from 1e-6).
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    # The lr of global step s is the schedule at max(s - lr_lag_steps, 0).  1 reproduces a timm
    # scheduler stepped after the optimizer step with the step's own index (the ADR code's cosine
    # runs); its multistep runs need 0 (timm's MultiStepLRScheduler adds the step back); -1 is the
    # locuslab PGD-AT code's lr_schedule(epoch + (i + 1) / n), each decay one step earlier.
    lr_lag_steps: int = 0
    bn_weight_decay: bool = True    # false: no weight decay on normalisation-layer weights and biases
    # schedule onecycle: torch's OneCycleLR(max_lr=lr, pct_start, total_steps=train.epochs) with
    # its defaults (cosine, div_factor 25, final_div_factor 1e4), stepped once per epoch -- the
    # DM-Improves-AT code's "cosinew"; cycle_momentum: its momentum cycle 0.95 -> 0.85 -> 0.95
    # replaces optim.momentum (torch's default, so the code's)
    onecycle_pct_start: float = 0.025
    cycle_momentum: bool = True
    # sgd | adamw (torch.optim.AdamW with optim.betas; momentum and nesterov unused): Singh et al. 2023
    name: str = "sgd"
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # no weight decay on parameters with ndim <= 1 and on biases (Singh et al.'s code, timm's convention)
    no_decay_1d: bool = False
    # schedule peak_cosine (Singh et al.'s get_cosine_lr): per epoch e, linear from warmup_start_lr to lr
    # over warmup_epochs, then lr_min + (lr - lr_min) (1 + cos(pi (e - P) / (E - P))) / 2; within an
    # epoch linear between the values of e and e + 1
    lr_min: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    deterministic: bool = False
    # Time constants of EMA-like state are per step in the papers (CIFAR, 391 steps/epoch).
    # When set, every per-step decay d is applied as d ** (reference / steps_per_epoch), so
    # the averaging horizon stays the same number of *epochs* on a smaller data set.
    reference_steps_per_epoch: Optional[int] = None
    checkpoint_every: int = 1
    grad_clip: Optional[float] = None
    log_every: int = 50
    channels_last: bool = False
    amp: Optional[str] = None       # None | bf16 | fp16
    compile: bool = False
    # BatchNorm momentum of the first training step (then each layer's own): 1.0 = running
    # statistics start from the first batch's (Haiku's initialisation; the DM-Improves-AT code)
    bn_first_step_momentum: Optional[float] = None
    # gradient accumulation: each optimizer step of data.batch_size samples runs as accum_steps
    # micro-batches of batch_size / accum_steps (attack, loss and backward per micro-batch, the loss
    # scaled so the gradient is the full batch's mean gradient).  BatchNorm sees micro-batches: its
    # statistics are per micro-batch, so a BatchNorm model trains differently (README)
    accum_steps: int = 1
    # TensorBoard event files of history.json's per-epoch scalars in DIR/tensorboard (the
    # 'tensorboard' extra); does not change the run (may differ on --resume)
    tensorboard: bool = False
    # Weights & Biases: {project: NAME} (also entity, name, group, tags, mode) logs history.json's
    # per-epoch scalars and the config to W&B (the 'wandb' extra); does not change the run
    wandb: Optional[dict] = None
    # under torchrun: seconds a collective waits for every rank before the run stops naming the rank
    # that stopped answering (torch.distributed's process-group timeout); may differ on --resume
    dist_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    model: str = "auto"             # which weights are validated/exported: auto picks swa > ema > raw
    val_attack_steps: int = 10      # PGD-10 on the validation split picks the best checkpoint (ADR)
    select_by: str = "auto"         # robust | clean | auto (clean for objective natural, else robust)
    # the split the best checkpoint is selected on: val (the held-out split; a run without one is
    # refused) | test (the ADR code's choice: the test curve; recorded as best.selected_on)
    select_on: str = "val"
    # the validation attack behind select_by=robust: pgd_ce (ADR's PGD-10) | pgd_margin | pgd_dlr.
    # Not pgd_ce: history.json has val_pgd (CE) and val_<attack> every epoch, and the CE-selected
    # checkpoint is kept beside best as best_pgd_ce.safetensors, so a table can report both.
    val_attack: str = "pgd_ce"
    test_attack_steps: int = 20     # per-epoch PGD-20 curve on a fixed test subset
    test_every: int = 1
    curve_test_size: Optional[int] = 500
    autoattack: bool = False        # run AutoAttack standard on best and final at the end
    autoattack_n: Optional[int] = None
    autoattack_version: str = "standard"
    batch_size: int = 256


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    paper: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # the chosen method's own settings (rb_labelrefine/rectifiers/<method>.py); ``method.name`` is its name
    method: Any = field(default_factory=lambda: make_method("onehot"), metadata={"method": True})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    wa: WAConfig = field(default_factory=WAConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- dict <-> dataclass

def config_to_dict(cfg: Config) -> dict:
    """Plain data; the ``method`` section holds ``name`` and the chosen method's fields only."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("method"):
            out[f.name] = {"name": value.name, **dataclasses.asdict(value)}
        else:
            out[f.name] = dataclasses.asdict(value) if is_dataclass(value) else copy.deepcopy(value)
    return out


_INT_LIMIT = 2 ** 53          # integers beyond this are not exact as floats and no count or seed needs them
WANDB_KEYS = {"project", "entity", "name", "group", "tags", "mode"}   # train.wandb: what wandb.init takes
SEED_MAX = 2 ** 32 - 1       # numpy's legacy seeding takes [0, 2**32)
BATCH_MAX = 1 << 20


def _coerce(path: str, value: Any, annotation: str, default: Any) -> Any:
    """Coerce a YAML/CLI value to the declared field type, or raise ConfigError naming the field."""
    ann = str(annotation)
    optional = ann.startswith("Optional")
    if value is None:
        if optional:
            return None
        raise ConfigError(path, "must not be null")
    base = ann[len("Optional["):-1] if optional else ann
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise TypeError
        if base == "int":
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            out = int(value)
            if not -_INT_LIMIT <= out <= _INT_LIMIT:   # 1e30, a 5,000-digit integer: no field takes such a count
                shown = f"an integer of {out.bit_length()} bits" if out.bit_length() > 128 else repr(value)
                raise ConfigError(path, f"must be an integer of magnitude at most {_INT_LIMIT:,}, got {shown}")
            return out
        if base == "float":
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str):
                value = _parse_number(value, path)
            out = float(value)
            if not math.isfinite(out):
                raise ConfigError(path, f"must be a finite number, got {value!r}")
            return out
        if base == "str":
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        if base == "list":
            if not isinstance(value, list):
                raise TypeError
            return list(value)
        if base == "dict":
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(path, f"expected {base}, got {value!r}") from None
    return value


def _parse_number(text: str, path: str = "<value>") -> float:
    """Accept '8/255' as well as '0.0314' (eps values are usually written as fractions of 255)."""
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        if float(den) == 0:
            raise ConfigError(path, f"division by zero in {text!r}")
        return float(num) / float(den)
    return float(text)


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    obj = cls()
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise ConfigError(path, f"unknown field; known fields: {', '.join(sorted(known))}")
        f = known[key]
        current = getattr(obj, key)
        if f.metadata.get("method"):
            setattr(obj, key, parse_method(value, path))
        elif is_dataclass(current):
            setattr(obj, key, _build(type(current), value, path))
        else:
            if isinstance(value, str) and str(f.type) in ("float", "Optional[float]"):
                try:
                    value = _parse_number(value, path)
                except ConfigError:
                    raise
                except ValueError:
                    raise ConfigError(path, f"expected a number, got {value!r}") from None
            setattr(obj, key, _coerce(path, value, f.type, current))
    return obj


def _methods():
    from .rectifiers import registry  # importing the package registers the built-in methods

    return registry


def parse_method(data: Any, path: str = "method"):
    """Parse the flat ``method:`` section against the chosen method's settings dataclass (types
    only; :func:`validate` / :func:`make_method` check the values)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    name = data.get("name", "onehot")
    if not isinstance(name, str):
        raise ConfigError(f"{path}.name", f"expected a method name, got {name!r}")
    reg = _methods()
    if name not in reg.METHODS:
        raise ConfigError(f"{path}.name", f"unknown method {name!r}; choose one of {reg.method_names()}")
    spec = reg.METHODS[name]
    own = spec.field_names()
    for key in data:
        if key != "name" and key not in own:
            owners = [n for n, sp in reg.METHODS.items() if key in sp.field_names()]
            valid = ", ".join(own) if own else "none besides name"
            msg = f"not a setting of {name}; {name}'s settings: {valid}"
            if owners:  # typically a preset of another method with --set method.name=...
                msg = (f"a setting of {' / '.join(owners)}, not of {name}; {name}'s settings: {valid}. To switch "
                       f"methods, replace the whole section: --set 'method={{name: {name}}}'")
            raise ConfigError(f"{path}.{key}", msg)
    return _build(spec.settings, {k: v for k, v in data.items() if k != "name"}, path)


def make_method(name: str, **settings):
    """The validated settings of method ``name`` (errors name ``method.<field>``)."""
    m = parse_method({"name": name, **settings})
    m.validate()
    return m


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

def _check(cond: bool, path: str, message: str):
    if not cond:
        raise ConfigError(path, message)


def validate(cfg: Config) -> Config:
    d = cfg.data
    _check(d.name in DATASETS, "data.name", f"unknown data set {d.name!r}; choose one of {sorted(DATASETS)}")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _check(1 <= d.batch_size <= BATCH_MAX, "data.batch_size", f"must be in [1, {BATCH_MAX}], got {d.batch_size}")
    _check(0 <= d.seed <= SEED_MAX, "data.seed", f"must be in [0, {SEED_MAX}], got {d.seed}")
    _check(d.train_subset is None or d.train_subset >= 1, "data.train_subset", "must be >= 1")
    _check(d.test_subset is None or d.test_subset >= 1, "data.test_subset", "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    if d.drop_last and d.train_subset is not None:
        _check(d.train_subset >= d.batch_size, "data.drop_last",
               f"drop_last with train_subset={d.train_subset} < batch_size={d.batch_size} leaves no training step")
    _check(0.0 <= d.aux_fraction < 1.0, "data.aux_fraction", f"must be in [0, 1), got {d.aux_fraction}")
    _check(d.aux_batch in AUX_BATCH_FORMS, "data.aux_batch",
           f"must be one of {list(AUX_BATCH_FORMS)}, got {d.aux_batch!r}")
    _check(d.epoch_images is None or d.epoch_images >= 1, "data.epoch_images", "must be >= 1 or null")
    _check(d.image_size is None or d.image_size >= 1, "data.image_size", "must be >= 1 or null")
    _check(d.image_size is None or d.name == "imagenet", "data.image_size",
           f"applies to data.name=imagenet only (the {d.name} images have their own size)")
    d.device_resident = str(d.device_resident).lower()   # YAML true/false arrive as booleans
    _check(d.device_resident in ("auto", "true", "false"), "data.device_resident",
           f"must be auto, true or false, got {d.device_resident!r}")
    if d.aux_batch == "split" and d.aux_fraction > 0:
        _check(d.batch_size - int(d.batch_size * d.aux_fraction) >= 1, "data.aux_batch",
               f"split leaves no real image in a batch of {d.batch_size} at aux_fraction {d.aux_fraction}")

    _check(bool(cfg.model.arch), "model.arch", "must name an architecture")

    cfg.method.validate()  # the method's own rules (rb_labelrefine/rectifiers/<method>.py)

    o = cfg.objective
    _check(o.name in OBJECTIVES, "objective.name", f"unknown objective {o.name!r}; choose one of {list(OBJECTIVES)}")
    _check(o.beta >= 0, "objective.beta", f"must be >= 0, got {o.beta}")
    cfg.method.check_config(cfg)
    _check(o.forward in TRADES_FORWARDS, "objective.forward",
           f"must be one of {list(TRADES_FORWARDS)}, got {o.forward!r}")
    _check(o.forward == "separate" or o.name == "trades", "objective.forward",
           f"forward={o.forward!r} is a form of the TRADES loss; objective.name is {o.name!r}")

    a = cfg.attack
    _check(a.name == "auto" or a.name in ATTACKS, "attack.name",
           f"unknown attack {a.name!r}; choose auto or one of {list(ATTACKS)}")
    _check(a.norm in NORMS, "attack.norm", f"must be one of {list(NORMS)}, got {a.norm!r}")
    _check(a.eps > 0, "attack.eps", f"must be > 0, got {a.eps}")
    _check(a.alpha > 0, "attack.alpha", f"must be > 0, got {a.alpha}")
    _check(a.steps >= 1, "attack.steps", f"must be >= 1, got {a.steps}")
    _check(a.bn_mode in BN_MODES, "attack.bn_mode", f"must be one of {list(BN_MODES)}, got {a.bn_mode!r}")
    if a.norm == "Linf":
        _check(a.eps <= 1.0, "attack.eps", f"an Linf radius above 1 covers the whole [0,1] input box, got {a.eps}")
    _check(a.start in ATTACK_STARTS, "attack.start", f"must be one of {list(ATTACK_STARTS)}, got {a.start!r}")
    _check(a.start_std > 0, "attack.start_std", f"must be > 0, got {a.start_std}")
    if a.start != "default":
        _check(a.name in ("auto", "pgd", "tpgd") and a.norm == "Linf", "attack.start",
               f"start={a.start!r} is implemented for the Linf PGD and TPGD attacks, not {a.name} {a.norm}")
        _check(a.random_start, "attack.start", f"start={a.start!r} needs attack.random_start=true")

    _check(0.0 <= cfg.wa.decay < 1.0, "wa.decay", f"must be in [0, 1), got {cfg.wa.decay}")
    _check(cfg.wa.warmup_epochs >= 0, "wa.warmup_epochs", "must be >= 0")
    _check(cfg.wa.form in WA_FORMS, "wa.form", f"must be one of {list(WA_FORMS)}, got {cfg.wa.form!r}")
    _check(0.0 <= cfg.wa.warmup_fraction < 1.0, "wa.warmup_fraction",
           f"must be in [0, 1), got {cfg.wa.warmup_fraction}")
    _check(cfg.wa.form == "gowal" or cfg.wa.warmup_fraction == 0, "wa.warmup_fraction",
           "is the gowal form's warm-up; with wa.form=timm use wa.warmup_epochs")
    _check(cfg.swa.start_epoch is None or cfg.swa.start_epoch >= 0, "swa.start_epoch", "must be >= 0")
    _check(cfg.swa.bn_form in SWA_BN_FORMS, "swa.bn_form",
           f"must be one of {list(SWA_BN_FORMS)}, got {cfg.swa.bn_form!r}")
    _check(cfg.awp.variant in AWP_VARIANTS, "awp.variant",
           f"must be one of {list(AWP_VARIANTS)}, got {cfg.awp.variant!r}")
    _check(cfg.awp.gamma > 0, "awp.gamma", f"must be > 0, got {cfg.awp.gamma}")
    _check(cfg.awp.warmup_epochs >= 0, "awp.warmup_epochs", "must be >= 0")
    _check(cfg.awp.proxy_lr > 0, "awp.proxy_lr", f"must be > 0, got {cfg.awp.proxy_lr}")

    op = cfg.optim
    _check(op.lr > 0, "optim.lr", f"must be > 0, got {op.lr}")
    _check(op.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= op.momentum < 1, "optim.momentum", "must be in [0, 1)")
    _check(op.schedule in SCHEDULES, "optim.schedule", f"must be one of {list(SCHEDULES)}")
    _check(op.gamma > 0, "optim.gamma", f"must be > 0 (the lr is multiplied by it at each milestone), got {op.gamma}")
    _check(all(isinstance(v, (int, float)) and v > 0 for v in op.milestones), "optim.milestones",
           "must be a list of positive numbers (fractions of training < 1, or epochs)")
    _check(op.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {op.warmup_epochs}")
    _check(op.warmup_epochs == 0 or op.warmup_epochs < cfg.train.epochs, "optim.warmup_epochs",
           f"must be shorter than training (train.epochs={cfg.train.epochs}), got {op.warmup_epochs}")
    _check(0 <= op.warmup_start_lr <= op.lr, "optim.warmup_start_lr",
           f"must be in [0, optim.lr={op.lr}], got {op.warmup_start_lr}")
    _check(0 < op.onecycle_pct_start < 1, "optim.onecycle_pct_start",
           f"must be in (0, 1), got {op.onecycle_pct_start}")
    _check(op.name in OPTIMIZERS, "optim.name", f"must be one of {list(OPTIMIZERS)}, got {op.name!r}")
    _check(len(op.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in op.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {op.betas!r}")
    _check(0 <= op.lr_min <= op.lr, "optim.lr_min", f"must be in [0, optim.lr={op.lr}], got {op.lr_min}")
    if op.schedule == "peak_cosine":
        _check(op.lr_lag_steps == 0, "optim.lr_lag_steps", "must be 0 with optim.schedule=peak_cosine")
    if op.schedule == "onecycle":
        _check(op.warmup_epochs == 0 and op.lr_lag_steps == 0, "optim.schedule",
               "onecycle has its own warm-up (optim.onecycle_pct_start): set optim.warmup_epochs=0 and "
               "optim.lr_lag_steps=0")

    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device) is not None, "train.device",
           f"must be auto, cpu, cuda[:N] or mps, got {t.device!r}")
    _check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip",
           f"must be > 0 (a gradient-norm bound) or null, got {t.grad_clip}")
    _check(t.threads is None or 1 <= t.threads <= 4096, "train.threads", f"must be in [1, 4096], got {t.threads}")
    _check(0 <= t.seed <= SEED_MAX, "train.seed", f"must be in [0, {SEED_MAX}], got {t.seed}")
    _check(t.reference_steps_per_epoch is None or t.reference_steps_per_epoch >= 1,
           "train.reference_steps_per_epoch", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(isinstance(t.dist_timeout_s, (int, float)) and not isinstance(t.dist_timeout_s, bool)
           and 1 <= t.dist_timeout_s <= 7 * 86400, "train.dist_timeout_s",
           f"must be a number of seconds in [1, 604800], got {t.dist_timeout_s!r}")
    _check(t.amp in (None, "bf16", "fp16"), "train.amp", f"must be null, bf16 or fp16, got {t.amp!r}")
    _check(t.bn_first_step_momentum is None or 0 < t.bn_first_step_momentum <= 1, "train.bn_first_step_momentum",
           f"must be in (0, 1] or null, got {t.bn_first_step_momentum}")
    if t.wandb is not None:
        bad = sorted(set(t.wandb) - WANDB_KEYS)
        _check(not bad, "train.wandb", f"unknown key(s) {bad}; allowed: {sorted(WANDB_KEYS)}")
        _check(isinstance(t.wandb.get("project"), str) and bool(t.wandb["project"]), "train.wandb",
               "needs a project name: {project: NAME}")
    _check(isinstance(t.accum_steps, int) and 1 <= t.accum_steps <= d.batch_size, "train.accum_steps",
           f"must be in [1, data.batch_size={d.batch_size}], got {t.accum_steps}")
    if t.accum_steps > 1:
        _check(d.batch_size % t.accum_steps == 0, "train.accum_steps",
               f"data.batch_size={d.batch_size} is not a multiple of train.accum_steps={t.accum_steps}")
        _check(not cfg.awp.enabled, "train.accum_steps",
               "gradient accumulation with awp.enabled is not supported (AWP perturbs the weights on the whole "
               "batch's loss): set train.accum_steps=1 or awp.enabled=false")
        _check(d.aux_fraction == 0, "train.accum_steps",
               "gradient accumulation with data.aux_fraction > 0 is not supported (the batch's real and "
               "auxiliary rows would be split unevenly): set train.accum_steps=1 or data.aux_fraction=0")
        _check(cfg.method.name != "sglr", "train.accum_steps",
               "gradient accumulation with method.name=sglr is not supported (SGLR writes one target's rows of its "
               "per-sample memory per optimizer step; the other micro-batches' rows would be lost): set "
               "train.accum_steps=1")

    e = cfg.eval
    _check(e.model in EVAL_MODELS, "eval.model", f"must be one of {list(EVAL_MODELS)}")
    if e.model == "ema":
        _check(cfg.wa.enabled, "eval.model", "eval.model=ema needs wa.enabled=true")
    if e.model == "swa":
        _check(cfg.swa.enabled, "eval.model", "eval.model=swa needs swa.enabled=true")
    _check(e.val_attack_steps >= 1, "eval.val_attack_steps", "must be >= 1")
    _check(e.select_by in ("auto", "robust", "clean"), "eval.select_by", "must be auto, robust or clean")
    _check(e.select_on in ("val", "test"), "eval.select_on", f"must be val or test, got {e.select_on!r}")
    _check(e.select_on == "val" or e.val_attack == "pgd_ce", "eval.val_attack",
           f"{e.val_attack} is a validation attack; with eval.select_on: test the test curve's PGD selects")
    _check(e.val_attack in VAL_ATTACK_NAMES, "eval.val_attack",
           f"must be one of {list(VAL_ATTACK_NAMES)}, got {e.val_attack!r}")
    _check(e.test_attack_steps >= 1, "eval.test_attack_steps", "must be >= 1")
    _check(e.test_every >= 1, "eval.test_every", "must be >= 1")
    _check(e.autoattack_n is None or e.autoattack_n >= 1, "eval.autoattack_n",
           f"must be >= 1 (or null: the whole test split), got {e.autoattack_n}")
    _check(1 <= e.batch_size <= BATCH_MAX, "eval.batch_size", f"must be in [1, {BATCH_MAX}], got {e.batch_size}")
    _check(e.curve_test_size is None or e.curve_test_size >= 1, "eval.curve_test_size", "must be >= 1 or null")
    _check(e.autoattack_version in ("standard", "plus", "rand"), "eval.autoattack_version",
           "must be standard | plus | rand (custom attack lists: rb-labelrefine eval --attacks ...)")
    return cfg


def check_runnable(cfg: Config) -> Config:
    """Checks that only matter when a run starts (presets may leave teacher paths for the
    user to fill in with --set)."""
    d = cfg.data
    if d.aux is not None:
        _check(Path(d.aux).is_file(), "data.aux", f"file not found: {d.aux}")
        _check(d.aux_fraction > 0, "data.aux_fraction", "data.aux is set: give the share of each batch drawn "
               "from it (e.g. 0.75, ADR App. F; 0.7, Wang et al. 2023)")
    else:
        _check(d.aux_fraction == 0, "data.aux", f"data.aux_fraction is {d.aux_fraction}: set data.aux to the .npz "
               "of generated images (e.g. cifar10_ddpm.npz, see rb_labelrefine/data/aux.py)")
    cfg.method.check_runnable()
    return cfg


# ----------------------------------------------------------------------------- presets

def _preset_dir():
    return resources.files("rb_labelrefine") / "configs" / "presets"


def list_presets() -> list[str]:
    """Preset names (files starting with '_' are shared bases, not presets)."""
    return sorted(p.name[:-5] for p in _preset_dir().iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


# Bounds of a config file (a downloaded run's config.yaml is untrusted input): a config is a few
# KB; alias expansion and nesting are bounded before anything is built from the document.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 20_000     # nodes of the document with every alias expanded (an "anchor bomb": 2^k)


class _YAMLLimit(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (naming the key) and documents nested more
    than :data:`MAX_YAML_DEPTH` levels or larger than :data:`MAX_YAML_NODES` nodes once aliases are
    expanded; both bounds are checked on the composed node graph, before any object is built."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YAMLLimit(f"nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue    # the base class reports an unhashable key
                if key in seen:
                    raise _YAMLLimit(f"duplicate key {key!r} (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                                     "a key may appear once per mapping")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """Nodes of the document with every alias expanded, computed on the (shared) node graph in
    linear time; stops counting once over the limit."""
    sizes: dict = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _safe_yaml(text: str):
    """``yaml.safe_load`` of one document within the bounds above (``_YAMLLimit`` otherwise)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise _YAMLLimit(f"expands to more than {MAX_YAML_NODES:,} values (aliases of aliases); a config is "
                             "far smaller")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(text: str, origin: str) -> dict:
    try:
        data = _safe_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{origin} is not valid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError("--config", f"{origin} holds a value that cannot be read: {str(exc)[:200]}") from None
    if data is None:  # an empty file is a mistake, not "train the defaults"
        raise ConfigError("--config", f"{origin} is empty (no config in it)")
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{origin} must hold a mapping at the top level")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_text(path: Path, origin: str, field: str) -> str:
    """The file's text: a regular file (never a FIFO or device), at most MAX_CONFIG_BYTES, UTF-8;
    the config.yaml of a run directory is never read through a link."""
    from .safe_files import UnsafeFileError, read_bytes

    inside_run = path.name == "config.yaml"
    try:
        data = read_bytes(path, max_bytes=MAX_CONFIG_BYTES, follow_links=not inside_run)
    except UnsafeFileError as exc:
        raise ConfigError(field, f"{origin}: {exc.problem}") from None
    except OSError as exc:
        raise ConfigError(field, f"cannot read {origin}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(field, f"{origin} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_raw(name_or_path: str, _chain: tuple = ()) -> dict:
    """Read a preset by name or a YAML file by path; resolves ``base:`` inheritance."""
    field = "--config" if not _chain else f"base (in {_chain[-1]})"
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(field, f"must name a preset or a YAML file, got {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(field, f"file not found: {name_or_path}")
        if path.is_dir():
            raise ConfigError(field, f"{name_or_path} is a directory, not a YAML file (a run's config is "
                              f"{path / 'config.yaml'})")
        key = str(path.resolve())
        data = _read_yaml(_read_text(path, str(path), field), str(path))
    else:
        f = _preset_dir() / f"{name_or_path}.yaml"
        if not f.is_file():
            raise ConfigError(field, f"unknown preset {name_or_path!r}; run 'rb-labelrefine configs' to list them")
        key = f"preset {name_or_path}"
        data = _read_yaml(_read_text(f, f"preset {name_or_path}", field), f"preset {name_or_path}")
        data.setdefault("name", name_or_path)
    if key in _chain:
        raise ConfigError("base", "inheritance cycle: " + " -> ".join(_chain + (key,)))
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"base (in {key})", f"must be a preset name or a YAML path, got {base!r}")
        data = _merge(load_raw(base, _chain + (key,)), data)
    return data


def _set_path(data: dict, dotted: str, value: Any):
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"'{k}' is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "overrides must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(item, "empty key")
        try:
            value = _safe_yaml(raw) if raw.strip() else None
        except _YAMLLimit as exc:
            raise ConfigError(key, f"--set value: {exc}") from None
        except yaml.YAMLError:
            value = raw
        except (ValueError, RecursionError) as exc:   # e.g. an integer of more than 4300 digits
            raise ConfigError(key, f"--set value cannot be read: {str(exc)[:200]}") from None
        _set_path(data, key, value)
    return data


def load_config(name_or_path: str, overrides: Optional[list[str]] = None) -> Config:
    return config_from_dict(apply_overrides(load_raw(name_or_path), overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
