"""Config -> the parts a run trains with: device, model, averagers (WA / SWA), rectifier (with its
teachers), objective with its attack, AWP, optimizer.  Each builder takes what it needs and returns
the part; none of them knows the trainer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from ..attacks import build_attack, default_attack_name
from ..averaging import EMA, SWA, build_awp, scale_decay
from ..config import Config, ConfigError
from ..objectives import build_objective
from ..rectifiers.registry import BuildContext, build_rectifier
from ..runs import RUN_FILES, build_model_for, load_error_detail, load_state_checked, read_weights
from .io import UnsafeCheckpointError, safe_torch_load
from .schedule import first_decay_epoch

__all__ = ["configure_torch", "build_data", "resolve_device", "build_model", "build_averagers", "build_rectifier_for", "validation_points",
           "build_objective_for",
           "build_awp_for", "build_optimizer", "param_groups", "teacher_loader"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError("train.device", f"not a device: {name!r} ({str(exc).strip()[:120]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device", f"{name!r} was requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("train.device", f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device", "'mps' was requested but the MPS backend is not available on this machine")
    return dev


def configure_torch(train_cfg) -> None:
    """``train.threads`` and ``train.deterministic`` (process-wide torch settings)."""
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    if train_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_data(cfg: Config, datasets=None) -> tuple:
    """``(train, val, test, info)``: ``datasets`` when given, else the configured data set's splits."""
    if datasets is None:
        from ..data import build_datasets

        d = cfg.data
        datasets = build_datasets(d.name, root=d.root, val_fraction=d.val_fraction, train_subset=d.train_subset,
                                  augment=d.augment, seed=d.seed, test_subset=d.test_subset, image_size=d.image_size)
    if len(datasets[0]) == 0:
        raise ConfigError("data.train_subset", "the training split is empty")
    return tuple(datasets)


TIMM_PRETRAINED = "timm:pretrained"


def initial_model(cfg: Config, info, init: bool = True) -> nn.Module:
    """The untrained student, or (``model.init_from``, when ``init``) the student with the weights
    training starts from: a run directory's best weights, a .safetensors of this package (read by
    :func:`~rb_labelrefine.runs.read_weights`: no code runs), or timm's pretrained weights."""
    src, field = cfg.model.init_from, "model.init_from"
    if not init or not src:
        return build_model_for(cfg, info)
    if src == TIMM_PRETRAINED:
        if not cfg.model.arch.startswith("timm:"):
            raise ConfigError(field, f"{TIMM_PRETRAINED} needs a timm model (model.arch: timm:<name>), "
                              f"not {cfg.model.arch}")
        from dataclasses import replace

        return build_model_for(replace(cfg, model=replace(cfg.model, kwargs={**cfg.model.kwargs, "pretrained": True})),
                               info)
    p = Path(src)
    p = p / RUN_FILES["best"] if p.is_dir() else p
    if p.suffix != ".safetensors":
        raise ConfigError(field, f"{src}: give a run directory, a .safetensors file written by rb_labelrefine (a "
                          f"run's or an export's) or {TIMM_PRETRAINED}")
    if not p.is_file():
        raise ConfigError(field, f"weights not found: {p}")
    try:
        state, meta = read_weights(p)
    except (ValueError, OSError) as exc:
        raise ConfigError(field, str(exc)) from None
    arch = meta.get("arch")
    if arch and arch != cfg.model.arch:
        raise ConfigError(field, f"{p} holds a {arch} model; this run's model.arch is {cfg.model.arch}")
    try:
        return load_state_checked(build_model_for(cfg, info), state, str(p), cfg.model.arch)
    except ValueError as exc:  # missing / unexpected keys, shapes, non-finite values: named per tensor
        raise ConfigError(field, str(exc)) from None


def build_model(cfg: Config, info, device: torch.device, x0: torch.Tensor, init: bool = True) -> nn.Module:
    """The student on ``device`` (``init``: from ``model.init_from``'s weights; a resumed run's come
    from its checkpoint), checked once against a batch of the data (``x0``), with clear messages,
    before hours of training."""
    model = initial_model(cfg, info, init).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.eval()
        try:
            out = model(x0.to(device))
        except RuntimeError as exc:
            raise ConfigError("model.arch", f"{cfg.model.arch} cannot take the data's inputs of shape "
                              f"{tuple(x0.shape[1:])}: {str(exc).splitlines()[0]}") from None
        model.train()
    if out.shape[-1] != info.num_classes:
        raise ConfigError("model.arch", f"the model predicts {out.shape[-1]} classes, the data has {info.num_classes}")
    return model


def decay_scaler(cfg: Config, steps_per_epoch: int) -> Callable[[float], float]:
    """Per-step decay -> the decay at this data set's steps per epoch (``train.reference_steps_per_epoch``)."""
    return lambda d: scale_decay(d, steps_per_epoch, cfg.train.reference_steps_per_epoch)


def build_averagers(cfg: Config, model: nn.Module, steps_per_epoch: int,
                    total_steps: int) -> Tuple[Optional[EMA], Optional[SWA]]:
    """``(wa, swa)``: the EMA of the weights (``wa``; ``wa.form: gowal``: Gowal et al.'s) and
    stochastic weight averaging, or None."""
    wa = swa = None
    decay = decay_scaler(cfg, steps_per_epoch)
    if cfg.wa.enabled and cfg.wa.form == "gowal":
        from ..averaging import GowalEMA

        wa = GowalEMA(model, decay=decay(cfg.wa.decay), warmup_point=cfg.wa.warmup_fraction * total_steps)
    elif cfg.wa.enabled:
        wa = EMA(model, decay=decay(cfg.wa.decay), warmup_steps=int(round(cfg.wa.warmup_epochs * steps_per_epoch)))
    if cfg.swa.enabled:
        start = cfg.swa.start_epoch if cfg.swa.start_epoch is not None else first_decay_epoch(cfg)
        swa = SWA(model, start_epoch=start)
    return wa, swa


def build_rectifier_for(cfg: Config, model: nn.Module, *, num_classes: int, num_samples: int, total_steps: int,
                        steps_per_epoch: int, load_teacher, shared_ema, device: torch.device):
    """The configured method's rectifier, on ``device``.  ``num_samples``: rows of per-sample state
    (auxiliary samples are indexed after the real ones)."""
    ctx = BuildContext(model=model, num_classes=num_classes, num_samples=num_samples, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch, decay_scale=decay_scaler(cfg, steps_per_epoch),
                       load_teacher=load_teacher, shared_ema=shared_ema, config=cfg)
    return build_rectifier(cfg.method, ctx).to(device)


def validation_points(cfg: Config, rectifier, val_ds, num_classes: int) -> tuple:
    """``(x, y)``: the fixed validation images a rectifier refits on per epoch
    (``Rectifier.validation_points``; ADR ``schedule: auto``), checked; ``(None, None)`` for none."""
    if not rectifier.validation_points:
        return None, None
    if not len(val_ds):
        raise ConfigError("data.val_fraction", f"{cfg.method.name} fits its parameters on the validation "
                          "split (method.schedule=auto): set data.val_fraction > 0")
    from .stream import check_batch, stack

    points = stack(val_ds, rectifier.validation_points)
    check_batch(*points, None, num_classes, "validation data (rectifier fit)")
    return points


def build_objective_for(cfg: Config, model: nn.Module):
    """The training objective with its inner attack on ``model``."""
    a = cfg.attack
    atk_name = default_attack_name(cfg.objective.name) if a.name == "auto" else a.name
    attack = build_attack(atk_name, model, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm,
                          random_start=a.random_start, bn_mode=a.bn_mode, start=a.start, start_std=a.start_std)
    return build_objective(cfg.objective.name, attack, beta=cfg.objective.beta, forward=cfg.objective.forward)


def build_awp_for(cfg: Config, model: nn.Module, grad_transform=None):
    """Adversarial weight perturbation (``awp.enabled``) or None; ``grad_transform``: what its proxy
    gradients go through (fp16 overflow, DDP averaging: :meth:`StepRuntime.awp_grad_transform`)."""
    if not cfg.awp.enabled:
        return None
    awp = build_awp(cfg.awp.variant, model, gamma=cfg.awp.gamma, proxy_lr=cfg.awp.proxy_lr)
    awp.grad_transform = grad_transform  # set once, by the one that builds it
    return awp


def param_groups(model: nn.Module, bn_weight_decay: bool = True, no_decay_1d: bool = False) -> list:
    """SGD parameter groups.  ``bn_weight_decay=False``: the weights and biases of normalisation
    layers get no weight decay, every other parameter (convolution / linear biases included)
    keeps it -- the ADR code's ``group_weight`` (with extra data), which exempts the parameters
    whose names contain "batchnorm", i.e. its BatchNorm layers' weights and biases."""
    if no_decay_1d:   # optim.no_decay_1d: Singh et al.'s ``param.ndim <= 1 or name.endswith(".bias")``
        named = list(model.named_parameters())
        flat = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
        ids = {id(p) for p in flat}
        groups = [{"params": [p for _, p in named if id(p) not in ids]}, {"params": flat, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]
    if bn_weight_decay:
        return [{"params": list(model.parameters())}]
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in norm]},
              {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.bn_weight_decay, o.no_decay_1d)
    if o.name == "adamw":   # Singh et al. 2023: AdamW(param_groups, betas=(0.9, 0.95))
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov)


def teacher_loader(cfg: Config, info, device: torch.device) -> Callable[[str, str], nn.Module]:
    """``load(path, field)``: a frozen teacher of the student's architecture from a run directory (its
    best weights) or a .safetensors / weights-only .pt state dict; errors name ``field``."""

    def load(path: str, field: str) -> nn.Module:
        p = Path(path)
        if p.is_dir():
            p = p / RUN_FILES["best"]
        if not p.exists():
            raise ConfigError(field, f"teacher checkpoint not found: {p}")
        if p.suffix == ".safetensors":
            try:
                state, _ = read_weights(p)
            except ValueError as exc:
                raise ConfigError(field, str(exc)) from None
        else:
            try:
                state = safe_torch_load(p)
            except (UnsafeCheckpointError, ValueError) as exc:  # unsafe, or not a torch file at all
                raise ConfigError(field, str(exc)) from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
        teacher = build_model_for(cfg, info)
        try:
            teacher.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(field, f"teacher {p} does not match the student's architecture "
                              f"{cfg.model.arch} ({load_error_detail(exc)})") from None
        return teacher.to(device)
    return load
