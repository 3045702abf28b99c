"""The built-in trainer: a composition of parts, no branching on a method's name.

    config -> data, model -> rectifier, objective(attack), companions (WA / SWA / AWP)
           -> loop (checkpoint / resume / signals) -> best + final weights -> summary

Per step (the same five lines a user writes in their own torchattacks loop)::

    target = rectifier.targets(x, y, index=idx)
    x_adv  = objective.adversarial(model, x, target)
    loss   = objective.loss(model, x, x_adv, target)      # AWP: at perturbed weights
    optimizer step
    rectifier.after_step(model); averagers update

Per epoch: PGD-k on the held-out validation split selects the best checkpoint (the papers'
early-stopping protocol), clean and PGD-k accuracy on a fixed test subset draw the curve, and
a checkpoint of *everything* that shapes the run is written atomically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from .. import __version__
from ..attacks import build_attack, default_attack_name
from ..averaging import EMA, SWA, build_awp, frozen_bn_stats, scale_decay
from ..config import Config, ConfigError, config_to_dict, dump_config
from ..objectives import build_objective
from ..rectifiers.registry import BuildContext, build_rectifier
from ..runs import (RESUMABLE_DIFFERENCES, RUN_FILES, added_later_note, build_model_for, check_fingerprint,
                    fingerprint_metadata, info_to_metadata, read_weights, write_weights)
from ..runs import flatten_config as _flatten
from ..runs import load_error_detail as _load_error_detail
from . import rng
from .errors import NonFiniteLossError, ResumeError, TrainingInterrupted
from .io import (RunLock, atomic_torch_save, atomic_write_json, atomic_write_text, ensure_writable_dir,
                 remove_stale_temps, safe_torch_load)
# [fast paths / DDP hook] step runtime (amp, channels_last, compile, sync-free checks) and torchrun support
from ..fast import StepRuntime
from .distributed import init_distributed, is_main_process, rank_zero_only

# [DDP hook] under torchrun only rank 0 writes files: these writers are no-ops on the other ranks
# (and plain pass-throughs in a single process).  See training/distributed.py.
atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temps = (
    rank_zero_only(f) for f in (atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temps))
write_weights = rank_zero_only(write_weights, returns_path_arg=1)

__all__ = ["Trainer", "TrainingInterrupted", "NonFiniteLossError", "ResumeError", "train"]

CHECKPOINT_FORMAT = 1
# What a checkpoint must hold (RESUMABLE_DIFFERENCES, the config fields that may differ on a
# resume, and the run fingerprint live in rb_labelrefine/runs.py).
_CHECKPOINT_KEYS = ("epoch", "batch", "global_step", "model", "optimizer", "rectifier", "rng", "best", "history")


class EpochSampler(Sampler):
    """A permutation that depends only on (seed, epoch): a resumed run sees the same order,
    and can skip the batches it already did."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.skip:].tolist())

    def __len__(self):
        return self.n - self.skip


def _resolve_device(name: str) -> torch.device:
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


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Learning rate of a step.  Milestones < 1 are fractions of training (ADR: 0.5, 0.75),
    larger ones are epochs (KD+SWA: 100, 150); they apply from the first step of that epoch.

    ``optim.lr_lag_steps`` evaluates the schedule ``lag`` steps earlier (clamped at step 0), and
    ``optim.warmup_epochs`` replaces its first ``W = int(warmup_epochs * steps_per_epoch)`` steps
    by ``warmup_start_lr + s * (lr - warmup_start_lr) / W`` -- timm's warm-up, not a shift of the
    schedule (what the ADR code's cosine runs use, with lag 1)."""
    o, E = cfg.optim, cfg.train.epochs
    spe = max(steps_per_epoch, 1)
    s = max(epoch * spe + step_in_epoch - o.lr_lag_steps, 0)
    warm = int(o.warmup_epochs * spe)
    if s < warm:
        return o.warmup_start_lr + s * (o.lr - o.warmup_start_lr) / warm
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        t = (s // spe + (s % spe) / spe) / E
        return 0.5 * o.lr * (1 + math.cos(math.pi * min(t, 1.0)))
    n = sum(1 for m in o.milestones if s // spe >= (m * E if m < 1 else m))
    return o.lr * (o.gamma ** n)


def count_steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of ``n`` samples (``data.drop_last``: full batches only)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def param_groups(model: nn.Module, bn_weight_decay: bool = True) -> list:
    """SGD parameter groups.  ``bn_weight_decay=False``: the weights and biases of normalisation
    layers get no weight decay, every other parameter (convolution / linear biases included)
    keeps it -- the ADR code's ``group_weight`` (with extra data), which exempts the parameters
    whose names contain "batchnorm", i.e. its BatchNorm layers' weights and biases."""
    if bn_weight_decay:
        return [{"params": list(model.parameters())}]
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in norm]},
              {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def first_decay_epoch(cfg: Config) -> int:
    ms = sorted(int(round(m * cfg.train.epochs)) if m < 1 else int(m) for m in cfg.optim.milestones)
    return ms[0] if ms else cfg.train.epochs // 2


def _check_batch(x, y, idx, num_classes: int, where: str) -> None:
    """``validate_batch`` on every batch, not only the first 8 samples checked at setup: a bad
    label deep in the data otherwise surfaces as an IndexError from the loss, NaN pixels as a
    misleading NonFiniteLossError, and 0-255 pixels or bad validation/test samples not at all.
    One min/max per tensor on the CPU batch -- negligible next to a PGD step.  The message says
    which split and batch, and which dataset indices are at fault."""
    from ..data import validate_batch

    try:
        validate_batch(x, y, num_classes)
    except ValueError as exc:
        at = ""
        if torch.is_tensor(idx) and x.dim() == 4 and y.dim() == 1 and len(x) == len(y) == len(idx):
            flat = x.detach().flatten(1).double()
            bad = ((y < 0) | (y >= num_classes) | ~torch.isfinite(flat).all(1)
                   | (flat < 0).any(1) | (flat > 1).any(1))
            if bool(bad.any()):
                at = f" (dataset indices {idx[bad][:5].tolist()}{' ...' if int(bad.sum()) > 5 else ''})"
        raise ValueError(f"{where}: {exc}{at}") from None


class _CheckedLoader:
    """An evaluation loader whose batches are validated on their way to the evaluator."""

    def __init__(self, loader, num_classes: int, split: str):
        self.loader, self.num_classes, self.split = loader, num_classes, split

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            _check_batch(batch[0], batch[1], batch[2] if len(batch) > 2 else None, self.num_classes,
                         f"{self.split} data (batch {i + 1})")
            yield batch

    def __len__(self):
        return len(self.loader)


class Trainer:
    """Train one config into ``out_dir``.  ``fit()`` returns the summary dict."""

    def __init__(self, cfg: Config, out_dir, *, resume: bool = False, progress: bool = True,
                 log=None, handle_signals: bool = True, datasets=None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._curves_skipped = False
        self.handle_signals = handle_signals
        self._stop_signal: Optional[int] = None
        self.best_pgd_ce = {"epoch": -1, "score": -1.0}   # kept only when eval.val_attack is not pgd_ce
        self._finishing = False  # True once the last training step is done (final writes, AutoAttack)
        self._datasets = datasets
        self._step_bufs = None
        self._fingerprint = fingerprint_metadata(cfg)

    # ------------------------------------------------------------------ setup
    def _check_out_dir(self):
        ckpt = self.out / RUN_FILES["checkpoint"]
        cfg_file = self.out / RUN_FILES["config"]
        if self.resume:
            if not ckpt.exists():
                if cfg_file.exists() and not (self.out / RUN_FILES["final"]).exists():
                    # The run was killed (kill -9, OOM, node loss) before its first checkpoint:
                    # nothing to lose, so a requeued `--resume` starts it over instead of failing
                    # forever.  Only for the same config.
                    self._check_same_config(cfg_file)
                    self.log(f"--resume: {self.out} has no checkpoint yet (stopped before the first one); "
                             "starting from the beginning")
                    self.resume = False
                    return
                raise ResumeError(f"--resume: no checkpoint at {ckpt}; start a new run without --resume")
            if cfg_file.exists():
                self._check_same_config(cfg_file)
        elif ckpt.exists() or (self.out / RUN_FILES["final"]).exists():
            raise ResumeError(f"{self.out} already holds a run; pass --resume to continue it, or choose a new "
                              "--out directory (nothing was overwritten)")

    def _check_same_config(self, cfg_file: Path):
        from ..config import load_config
        try:
            old = load_config(str(cfg_file))
        except ConfigError as exc:
            raise ResumeError(f"--resume: {cfg_file} is not a valid config ({exc})") from None
        a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(self.cfg))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_DIFFERENCES)
        if diff:
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8])
            raise ResumeError(f"--resume: {self.out} was trained with a different config ({shown}). "
                              "Resume with the same config, or choose a new --out directory.")

    def _setup(self):
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = _resolve_device(cfg.train.device)
        # [DDP hook] under torchrun (WORLD_SIZE > 1): join the process group, cuda:LOCAL_RANK, quiet ranks
        self.dist = init_distributed(self)
        rng.seed_all(cfg.train.seed)

        from ..data import build_datasets

        if self._datasets is None:
            d = cfg.data
            self._datasets = build_datasets(d.name, root=d.root, val_fraction=d.val_fraction,
                                            train_subset=d.train_subset, augment=d.augment, seed=d.seed,
                                            test_subset=d.test_subset)
        self.train_ds, self.val_ds, self.test_ds, self.info = self._datasets
        if len(self.train_ds) == 0:
            raise ConfigError("data.train_subset", "the training split is empty")
        self.sampler = EpochSampler(len(self.train_ds), cfg.train.seed)
        self.train_loader = DataLoader(self.train_ds, batch_size=cfg.data.batch_size, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, drop_last=cfg.data.drop_last,
                                       # its own generator: creating an epoch's iterator must not
                                       # draw from the global RNG (bit-exact resume mid-epoch)
                                       generator=torch.Generator().manual_seed(cfg.train.seed))
        self.steps_per_epoch = count_steps_per_epoch(len(self.train_ds), cfg.data.batch_size, cfg.data.drop_last)
        if self.steps_per_epoch == 0:
            raise ConfigError("data.drop_last", f"{len(self.train_ds)} training samples make no full batch of "
                              f"{cfg.data.batch_size}: drop_last leaves no training step")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        # check the data against the model once, with clear messages, before hours of training
        x0, y0, i0 = next(iter(DataLoader(self.train_ds, batch_size=min(8, len(self.train_ds)))))
        _check_batch(x0, y0, i0, self.info.num_classes, "training data (first samples)")
        self.aux = self._open_aux(tuple(x0.shape[1:])) if cfg.data.aux else None

        self.model = build_model_for(cfg, self.info).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        with torch.no_grad():
            self.model.eval()
            try:
                out = self.model(x0.to(self.device))
            except RuntimeError as exc:
                raise ConfigError("model.arch", f"{cfg.model.arch} cannot take the data's inputs of shape "
                                  f"{tuple(x0.shape[1:])}: {str(exc).splitlines()[0]}") from None
            self.model.train()
        if out.shape[-1] != self.info.num_classes:
            raise ConfigError("model.arch", f"the model predicts {out.shape[-1]} classes, the data has "
                              f"{self.info.num_classes}")

        self.decay_scale = lambda d: scale_decay(d, self.steps_per_epoch, cfg.train.reference_steps_per_epoch)
        self.wa = None
        if cfg.wa.enabled:
            self.wa = EMA(self.model, decay=self.decay_scale(cfg.wa.decay),
                          warmup_steps=int(round(cfg.wa.warmup_epochs * self.steps_per_epoch)))
        self.swa = None
        if cfg.swa.enabled:
            start = cfg.swa.start_epoch if cfg.swa.start_epoch is not None else first_decay_epoch(cfg)
            self.swa = SWA(self.model, start_epoch=start)
        # per-sample state (SGLR) indexes auxiliary samples after the real ones: len(train) + archive index
        n_samples = len(self.train_ds) + (len(self.aux.data) if self.aux is not None else 0)
        ctx = BuildContext(model=self.model, num_classes=self.info.num_classes, num_samples=n_samples,
                           total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                           decay_scale=self.decay_scale, load_teacher=self._load_teacher, shared_ema=self.wa,
                           config=cfg)
        self.rectifier = build_rectifier(cfg.method, ctx).to(self.device)
        self._val_points = (None, None)
        if self.rectifier.validation_points:  # fixed validation images the rectifier refits on per epoch
            if not len(self.val_ds):
                raise ConfigError("data.val_fraction", f"{cfg.method.name} fits its parameters on the validation "
                                  "split (method.schedule=auto): set data.val_fraction > 0")
            self._val_points = _stack(self.val_ds, self.rectifier.validation_points)
            _check_batch(*self._val_points, None, self.info.num_classes, "validation data (rectifier fit)")
        a = cfg.attack
        atk_name = default_attack_name(cfg.objective.name) if a.name == "auto" else a.name
        attack = build_attack(atk_name, self.model, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm,
                              random_start=a.random_start, bn_mode=a.bn_mode, start=a.start,
                              start_std=a.start_std)
        self.objective = build_objective(cfg.objective.name, attack, beta=cfg.objective.beta,
                                         forward=cfg.objective.forward)
        self.awp = (build_awp(cfg.awp.variant, self.model, gamma=cfg.awp.gamma, proxy_lr=cfg.awp.proxy_lr)
                    if cfg.awp.enabled else None)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(param_groups(self.model, o.bn_weight_decay), lr=o.lr,
                                         momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.eval_loaders()
        # [fast paths / DDP hook] amp, channels_last, compile, DDP wrapping + sharded loader (rb_labelrefine/fast.py)
        self._fast = StepRuntime(self, self.dist)

    def _open_aux(self, chw: tuple):
        """The auxiliary stream (data.aux): seeded by train.seed, augmented as the real images."""
        from ..data import CorruptDatasetError, DatasetNotFoundError, RandomCropFlip
        from ..data.aux import open_aux

        if self.dist.enabled:
            raise ConfigError("data.aux", "auxiliary data is not supported under torchrun yet; train in one process")
        c, h, w = chw
        transform = RandomCropFlip(padding=4) if self.cfg.data.augment else None
        try:
            return open_aux(self.cfg.data.aux, self.cfg.train.seed, num_classes=self.info.num_classes,
                            image_shape=(h, w, c), transform=transform)
        except (CorruptDatasetError, DatasetNotFoundError) as exc:
            raise ConfigError("data.aux", str(exc)) from None

    def _with_aux(self, x, y, idx):
        """Stack data.aux_fraction of auxiliary images under a real batch (the ADR code's aux_loader)."""
        from ..data.aux import aux_count

        xa, ya, ia = self.aux.draw(aux_count(len(y), self.cfg.data.aux_fraction))
        return torch.cat([x, xa]), torch.cat([y, ya]), torch.cat([torch.as_tensor(idx), ia + len(self.train_ds)])

    def eval_loaders(self):
        bs, C = self.cfg.eval.batch_size, self.info.num_classes
        self.val_loader = (_CheckedLoader(DataLoader(self.val_ds, batch_size=bs), C, "validation")
                           if len(self.val_ds) else None)
        test = self.test_ds
        n = self.cfg.eval.curve_test_size
        if n is not None and n < len(test):
            test = torch.utils.data.Subset(test, list(range(n)))  # fixed subset (test is pre-shuffled)
        self.curve_loader = _CheckedLoader(DataLoader(test, batch_size=bs), C, "test")

    def _load_teacher(self, path: str, field: str) -> nn.Module:
        """A frozen teacher of the student's architecture: a run directory (its best weights)
        or a .safetensors / weights-only .pt state dict."""
        from .io import UnsafeCheckpointError

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
        teacher = build_model_for(self.cfg, self.info)
        try:
            teacher.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            first = _load_error_detail(exc)
            raise ConfigError(field, f"teacher {p} does not match the student's architecture "
                              f"{self.cfg.model.arch} ({first})") from None
        return teacher.to(self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int, batch: int) -> dict:
        scaler = self._fast.scaler
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "config_fingerprint": self._fingerprint["config_fingerprint"],
            "run_config": self._fingerprint["run_config"],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "batch": batch, "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rectifier": self.rectifier.state_dict(),
            "wa": self.wa.state_dict() if self.wa is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "awp": self.awp.state_dict() if self.awp is not None else None,
            "aux": self.aux.state_dict() if self.aux is not None else None,
            "rng": rng.state_dict(),
            "best": dict(self.best),
            "best_pgd_ce": dict(self.best_pgd_ce),
            "history": json.dumps(self.history),
            "epoch_acc": {k: float(v) for k, v in self.epoch_acc.items()},
        }

    def _check_fingerprint(self, stored: dict, where: str) -> None:
        """:func:`~rb_labelrefine.runs.check_fingerprint` for ``--resume``: a file of another run is a
        :class:`ResumeError`; fields accepted as added later (by a newer rb_labelrefine, at their
        defaults) are logged in one line."""
        try:
            added = check_fingerprint(self.cfg, stored, where)
        except ValueError as exc:
            raise ResumeError(f"--resume: {exc}") from None
        if added:
            self.log(added_later_note(where, added))

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Restore a checkpoint -- only one that proves it belongs to this run (its fingerprint),
        whose positions fit this run's schedule and whose tensors have this run's shapes; anything
        else is a :class:`ResumeError` naming what does not fit (nothing on disk is changed)."""
        if not isinstance(state, dict):
            raise ResumeError(f"{where} holds a {type(state).__name__}, not a training checkpoint")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"{where}: unsupported checkpoint format {state.get('format')!r}")
        missing = [k for k in _CHECKPOINT_KEYS if k not in state]
        if missing:
            raise ResumeError(f"{where} is incomplete: it has no {', '.join(repr(k) for k in missing)} "
                              "(not a checkpoint written by rb_labelrefine's trainer)")
        self._check_fingerprint(state, where)
        if state.get("version") != __version__:
            self.log(f"note: {where} was written by rb_labelrefine {state.get('version')}, this is {__version__}: "
                     "the resumed run may differ from an uninterrupted one")
        E, spe = self.cfg.train.epochs, self.steps_per_epoch
        epoch = _checked_int(state, "epoch", 0, E, where)
        batch = _checked_int(state, "batch", 0, 0 if epoch == E else spe - 1, where)
        step = _checked_int(state, "global_step", 0, E * spe, where)
        if step != epoch * spe + batch:
            raise ResumeError(f"{where}: 'global_step' is {step}, but epoch {epoch} and batch {batch} of {spe} steps "
                              f"per epoch mean step {epoch * spe + batch}")
        try:
            history = json.loads(state["history"])
            best = dict(state["best"])
            best_pgd_ce = dict(state.get("best_pgd_ce") or {"epoch": -1, "score": -1.0})
            epoch_acc = {k: float(v) for k, v in dict(state.get("epoch_acc") or {}).items()}
            if not isinstance(history, list) or len(history) != epoch:
                raise ValueError(f"{len(history) if isinstance(history, list) else 'no'} records for {epoch} epochs")
            if not -1 <= int(best.get("epoch", -1)) <= epoch:
                raise ValueError(f"best epoch {best.get('epoch')} after {epoch} epochs")
        except (TypeError, ValueError, KeyError) as exc:
            raise ResumeError(f"{where}: 'history'/'best' do not fit ({str(exc)[:200]})") from None
        parts = [("rectifier", self.rectifier), ("wa", self.wa), ("swa", self.swa)]
        for name, owner in parts:
            if owner is not None:
                _check_shapes(owner.state_dict(), state.get(name), f"{where}: '{name}'")
        loaders = [("model", self.model.load_state_dict), ("optimizer", self.optimizer.load_state_dict),
                   ("rectifier", self.rectifier.load_state_dict)]
        loaders += [(n, o.load_state_dict) for n, o in (("wa", self.wa), ("swa", self.swa), ("awp", self.awp),
                                                        ("aux", self.aux)) if o is not None]
        if self._fast.scaler is not None and state.get("scaler"):
            loaders.append(("scaler", self._fast.scaler.load_state_dict))
        loaders.append(("rng", rng.load_state_dict))
        for name, load in loaders:
            try:
                load(state[name])
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                raise ResumeError(f"{where}: its '{name}' state does not fit this run: {_load_error_detail(exc)}") from None
            if name == "optimizer":
                _check_optimizer_shapes(self.optimizer, where)
        self.global_step = step
        self.best = best
        self.best_pgd_ce = best_pgd_ce
        self.history = history
        self.epoch_acc = epoch_acc
        self.start_epoch, self.start_batch = epoch, batch

    def save_checkpoint(self, epoch: int, batch: int) -> Path:
        path = self.out / RUN_FILES["checkpoint"]
        state = self.state_dict(epoch, batch)
        bad = _nonfinite_parts(state)
        if bad:  # never replace a good checkpoint by a diverged state: weights that overflowed while
            # the loss was still finite, or a non-finite loss not yet read back from an accelerator
            raise NonFiniteLossError(f"at epoch {epoch + (1 if batch else 0)}, step {self.global_step}: "
                                     f"{self._kept_checkpoint(path, bad)} Lower optim.lr, check the data, "
                                     "or set train.grad_clip.")
        atomic_torch_save(state, path)
        return path

    # ------------------------------------------------------------------ evaluation
    def evaluated_model(self) -> tuple[nn.Module, str]:
        which = self.cfg.eval.model
        if which == "auto":
            which = "swa" if (self.swa is not None and self.swa.active) else ("ema" if self.wa is not None else "raw")
        if which == "swa" and self.swa is not None and self.swa.active:
            if self.swa.bn_stale and self.cfg.swa.bn_update:
                self.swa.update_bn(self._bn_loader(), device=self.device, form=self.cfg.swa.bn_form)
            return self.swa.module, "swa"
        if which == "ema" and self.wa is not None:
            return self.wa.module, "ema"
        return self.model, "raw"

    def _bn_loader(self, epoch: Optional[int] = None):
        """The BatchNorm recompute pass over the training split: in order (form equal), or (form
        code, ``epoch`` given) a fresh permutation of its own that depends only on (seed, epoch) --
        the KD+SWA code walks its shuffled loader; the global RNG must not move (resume)."""
        if epoch is None:
            return DataLoader(self.train_ds, batch_size=self.cfg.data.batch_size, shuffle=False)
        sampler = EpochSampler(len(self.train_ds), self.cfg.train.seed + 7919)
        sampler.set_epoch(epoch)
        return DataLoader(self.train_ds, batch_size=self.cfg.data.batch_size, sampler=sampler)

    def _evaluate(self, model: nn.Module, loader, steps: int, loss: str = "ce",
                  clean: bool = True) -> tuple[Optional[float], float]:
        from ..evaluation.pgd import clean_accuracy, pgd_accuracy

        a = self.cfg.attack
        was = model.training
        model.eval()
        clean_acc = clean_accuracy(model, loader, device=self.device) if clean else None
        robust = pgd_accuracy(model, loader, eps=a.eps, alpha=a.alpha, steps=steps, norm=a.norm,
                              random_start=True, device=self.device, loss=loss)
        model.train(was)
        return clean_acc, robust

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        """The one SIGTERM/SIGINT handler, in a single process and under torchrun.  During training
        under torchrun the ranks act on a signal only once all of them agree, at the same step
        (:meth:`DistributedContext.after_update`); after the last step (final writes, AutoAttack:
        no more collectives) it applies at once, as in a single process."""
        dist = getattr(self, "dist", None)
        agree = dist is not None and dist.enabled and not self._finishing
        if self._stop_signal is not None or (dist is not None and dist.pending_signal is not None):
            raise KeyboardInterrupt  # second signal: stop now
        if agree:
            dist.pending_signal = signum
        else:
            self._stop_signal = signum
        if self._finishing:
            self.log(f"received {signal.Signals(signum).name} after the last training step: stopping after the "
                     "current write (a second signal stops at once)")
        else:
            self.log(f"received {signal.Signals(signum).name}: finishing the current step, then checkpointing")

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        from ..config import check_runnable

        check_runnable(self.cfg)
        # [DDP] rank 0 alone writes the directory, so it alone checks and locks it
        writer = int(os.environ.get("RANK", "0")) == 0
        created, lock = False, None
        if writer:  # a read-only / full / bad --out fails now, not after hours of work
            created = ensure_writable_dir(self.out, create=not self.resume)
        if self.resume and (created is None or not self.out.is_dir()):  # refused before anything is created
            raise ResumeError(f"--resume: no checkpoint at {self.out / RUN_FILES['checkpoint']} ({self.out} is not a "
                              "directory); start a new run without --resume")
        if writer:
            lock = RunLock(self.out).acquire()
        try:
            if lock is not None and lock.stale:
                self.log(f"note: {self.out} held a lock file of a process that is gone ({lock.stale}); taken over")
            self._check_out_dir()
            done = self._finished_summary() if self.resume else None
            if done is not None:
                return done
            return self._fit()
        finally:
            if lock is not None:
                lock.release()
            if created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only if the run failed before writing anything (empty)

    def _finished_summary(self) -> Optional[dict]:
        """``--resume`` of a finished run: its summary, after checking that the checkpoint belongs
        to this config and ended training; nothing is written.  None when the run is not finished."""
        paths = {k: self.out / RUN_FILES[k] for k in ("summary", "final", "checkpoint")}
        if not all(p.is_file() for p in paths.values()):
            return None
        try:
            summary = json.loads(paths["summary"].read_text())
        except (OSError, ValueError):
            return None  # torn by hand: the final stage is redone
        state = safe_torch_load(paths["checkpoint"])
        where = f"the checkpoint {paths['checkpoint']}"
        if not isinstance(state, dict):
            raise ResumeError(f"{where} holds a {type(state).__name__}, not a training checkpoint")
        self._check_fingerprint(state, where)
        for which in ("best", "final"):
            try:
                _, meta = read_weights(self.out / RUN_FILES[which])
            except ValueError as exc:
                raise ResumeError(f"--resume: {exc}") from None
            self._check_fingerprint(meta, str(self.out / RUN_FILES[which]))
        if (state.get("epoch"), state.get("batch")) != (self.cfg.train.epochs, 0) or not isinstance(summary, dict):
            return None
        self.log(f"--resume: {self.out} is finished (all {self.cfg.train.epochs} epochs, {RUN_FILES['summary']} "
                 "written): nothing to do, nothing changed")
        return summary

    def _fit(self) -> dict:
        if self.out.is_dir():  # temporary files of writes cut short by a kill -9
            remove_stale_temps(self.out, RUN_FILES.values())
        self._setup()
        self.out.mkdir(parents=True, exist_ok=True)
        self.global_step, self.start_epoch, self.start_batch = 0, 0, 0
        self.best = {"epoch": -1, "score": -1.0}
        self.best_pgd_ce = {"epoch": -1, "score": -1.0}
        self.history = []
        self.epoch_acc = {}
        if self.resume:
            ckpt = self.out / RUN_FILES["checkpoint"]
            self.load_state_dict(safe_torch_load(ckpt, map_location=self.device), f"the checkpoint {ckpt}")
            for which in ("best", "final"):  # a weights file dropped in from another run
                if (self.out / RUN_FILES[which]).exists():
                    try:
                        _, meta = read_weights(self.out / RUN_FILES[which])
                    except ValueError as exc:
                        raise ResumeError(f"--resume: {exc}") from None
                    self._check_fingerprint(meta, str(self.out / RUN_FILES[which]))
            self.log(f"resumed from {self.out / RUN_FILES['checkpoint']} at epoch {self.start_epoch + 1}, "
                     f"batch {self.start_batch}")
            if self.start_batch and self.cfg.data.augment and self.cfg.data.num_workers > 0:
                self.log("note: resumed mid-epoch with augmentation in DataLoader workers: the rest of this "
                         "epoch is augmented differently from an uninterrupted run (not bit-exact)")
        else:
            atomic_write_text(self.out / RUN_FILES["config"], dump_config(self.cfg))
        old_handlers = {}
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    old_handlers[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass
        try:
            return self._loop()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

    def _loop(self) -> dict:
        cfg = self.cfg
        t_start = time.time()
        from tqdm.auto import tqdm

        for epoch in range(self.start_epoch, cfg.train.epochs):
            skip = self.start_batch if epoch == self.start_epoch else 0
            # EpochSampler.skip counts *samples*: skip the `skip` whole batches already done
            # (passing the batch count re-did all but `skip` samples of a resumed epoch).
            self.sampler.set_epoch(epoch, skip * cfg.data.batch_size)
            # The loader's own generator only seeds DataLoader workers (augmentation in workers);
            # re-seed it per epoch so an epoch's worker seeds do not depend on how many epochs
            # this process has already iterated (a run resumed at an epoch boundary = uninterrupted).
            self.train_loader.generator.manual_seed(cfg.train.seed * 100003 + epoch)
            if skip == 0:
                self.epoch_acc = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
            t0 = time.time()
            self.model.train()
            bar = tqdm(self.train_loader, total=self.steps_per_epoch, initial=skip, leave=False,
                       desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=None if self.progress else True)  # None: off when not a terminal
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            if skip:
                # Resumed mid-epoch: carry on the float32 running sums from where they stopped
                # (adding the flushed partial sums as doubles rounds differently, so the history's
                # train_loss would differ in the last bits from an uninterrupted run).
                loss_sum += self.epoch_acc["loss"]
                correct += self.epoch_acc["correct"]
                self.epoch_acc["loss"] = self.epoch_acc["correct"] = 0.0
            seen = 0
            batch = skip
            # Python's/numpy's global generators are a function of the position (training/rng.py)
            rng.reseed_globals(cfg.train.seed, epoch, batch, self.dist.rank)
            for x, y, idx in bar:
                lr = lr_at(cfg, epoch, batch, self.steps_per_epoch)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                if self.aux is not None:
                    x, y, idx = self._with_aux(x, y, idx)
                _check_batch(x, y, idx, self.info.num_classes, f"training data (epoch {epoch + 1}, batch {batch + 1})")
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                try:
                    loss, logits_adv = self.train_step(x, y, idx, epoch)
                except NonFiniteLossError as exc:
                    self._flush_epoch_acc(loss_sum, correct, seen, t0)
                    raise NonFiniteLossError(f"{exc}; {self._save_last_good(epoch, batch)} Lower optim.lr, "
                                             "check the data, or set train.grad_clip.") from None
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits_adv.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                batch += 1
                rng.reseed_globals(cfg.train.seed, epoch, batch, self.dist.rank)  # before the next fetch
                if self._stop_signal is not None and batch < self.steps_per_epoch:
                    self._flush_epoch_acc(loss_sum, correct, seen, t0)
                    self.save_checkpoint(epoch, batch)
                    self._interrupted(epoch, batch)
            bar.close()
            self._flush_epoch_acc(loss_sum, correct, seen, t0)
            self.rectifier.end_epoch(self.model)
            if self.swa is not None:
                snap = self.swa.end_epoch(self.model, epoch)
                if snap and cfg.swa.bn_update and cfg.swa.bn_form == "code":  # after every snapshot
                    self.swa.update_bn(self._bn_loader(epoch), device=self.device, form="code")
            self._end_of_epoch(epoch)
            if self._stop_signal is not None:
                self.save_checkpoint(epoch + 1, 0)
                self._interrupted(epoch + 1, 0)
        self._finishing = True
        if self.dist.pending_signal is not None:  # arrived after the last step's agreement
            self._stop_signal, self.dist.pending_signal = self.dist.pending_signal, None
        return self._finish(time.time() - t_start)

    def _snapshot_step_state(self):
        """What a step changes before its loss is known to be finite: the buffers (BatchNorm
        statistics, updated by the attack's and the loss's forward passes) and the RNG (random
        starts).  Copied into preallocated tensors -- a few small copies per step."""
        if self._step_bufs is None:
            self._step_bufs = list(self.model.buffers())
            self._step_bufs_copy = [b.detach().clone() for b in self._step_bufs]
        elif self._step_bufs:
            torch._foreach_copy_(self._step_bufs_copy, self._step_bufs)
        self._step_rng = (torch.get_rng_state(),
                          torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None)

    @torch.no_grad()
    def _restore_step_state(self):
        if self._step_bufs:
            torch._foreach_copy_(self._step_bufs, self._step_bufs_copy)
        torch.set_rng_state(self._step_rng[0])
        if self._step_rng[1] is not None:
            torch.cuda.set_rng_state_all(self._step_rng[1])

    def train_step(self, x, y, idx, epoch: int):
        # [fast paths / DDP hook] rt: amp autocast, channels_last input, compiled/DDP models, GradScaler,
        # sync-free non-finite check on accelerators, DDP collectives (rb_labelrefine/fast.py StepRuntime)
        rt = self._fast
        x = rt.prepare_input(x)
        exact = rt.guard.per_step  # the loss is checked before the update: the state can be restored
        if exact:
            self._snapshot_step_state()
        with rt.autocast():
            target = self.rectifier.targets(x, y, index=idx)
            x_adv = self.objective.adversarial(rt.attack_model, x, target)  # DDP: the unwrapped module
            self.model.train()
            use_awp = self.awp is not None and epoch >= self.cfg.awp.warmup_epochs
            if use_awp:
                self.awp.perturb(self.model, rt.awp_loss(self.objective, x, x_adv, target))
            with (frozen_bn_stats(self.model) if use_awp and self.awp.freezes_bn_stats else contextlib.nullcontext()):
                loss, logits_adv = self.objective.loss(rt.train_model, x, x_adv, target)
        bad = rt.nonfinite(loss)  # per step on the CPU; a device-side flag read every log_every steps elsewhere
        if bad is not None:
            if use_awp:
                self.awp.restore()
            # back to exactly the state after the previous step (no update was made); the loop
            # checkpoints it (see _save_last_good).  With the deferred (accelerator) check there is
            # no snapshot: _save_last_good keeps the existing checkpoint if the state is not finite.
            if exact:
                self._restore_step_state()
            raise NonFiniteLossError(f"non-finite training loss ({bad.value}) at epoch {epoch + 1}, "
                                     f"step {bad.step + 1}{bad.note}")
        self.optimizer.zero_grad(set_to_none=True)
        rt.backward(loss, y.shape[0])  # fp16: scaled; DDP: the rank's share of the global batch
        if self.cfg.train.grad_clip:
            rt.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        if use_awp and self.awp.restores_before_step:
            self.awp.restore()
        rt.step(self.optimizer)
        if use_awp and not self.awp.restores_before_step:
            self.awp.restore()
        rt.after_update()  # DDP: rank 0's buffers, per-sample state gathered, agreed stop signals
        self.rectifier.after_step(self.model)
        if self.wa is not None:  # (when ADR shares it as its teacher, ADR does not update it)
            self.wa.update(self.model)
        self.global_step += 1
        return loss, logits_adv

    def _save_last_good(self, epoch: int, batch: int) -> str:
        """After a non-finite loss: checkpoint the state before the failed step if every tensor in
        it is finite; otherwise (the previous update already overflowed, or a rectifier stored
        NaN) keep the checkpoint on disk -- never replace a good checkpoint by a diverged one."""
        state = self.state_dict(epoch, batch)
        bad = _nonfinite_parts(state)
        path = self.out / RUN_FILES["checkpoint"]
        if not bad:
            atomic_torch_save(state, path)
            return f"the last good state (before this step) is in {path}."
        return self._kept_checkpoint(path, bad)

    @staticmethod
    def _kept_checkpoint(path: Path, bad: list) -> str:
        if path.exists():
            try:
                old = safe_torch_load(path)
                where = f" (epoch {old['epoch']}, batch {old['batch']}, step {old['global_step']})"
            except Exception:  # pragma: no cover - reported, not fatal
                where = ""
            return (f"the {' and '.join(bad)} state is no longer finite, so it was not checkpointed; the last good "
                    f"state is the existing checkpoint {path}{where}.")
        return (f"the {' and '.join(bad)} state is no longer finite and no earlier checkpoint exists "
                "(training diverged before the first one), so nothing was saved.")

    def _flush_epoch_acc(self, loss_sum, correct, seen, t0):
        seen = self._fast.reduce_epoch_sums(loss_sum, correct, seen)  # [DDP hook] sums over all ranks
        acc = self.epoch_acc
        acc["loss"] += float(loss_sum)
        acc["correct"] += float(correct)
        acc["seen"] += seen
        acc["time"] += time.time() - t0
        loss_sum.zero_()
        correct.zero_()

    def _interrupted(self, epoch, batch):
        self._write_curves()
        sig = signal.Signals(self._stop_signal).name
        raise TrainingInterrupted(
            f"stopped by {sig} at epoch {epoch + (1 if batch else 0)}, step {self.global_step}; checkpoint written to "
            f"{self.out / RUN_FILES['checkpoint']}. {self._resume_hint()}")

    def _resume_hint(self) -> str:
        return (f"Resume with: rb-labelrefine train --config {self.out / RUN_FILES['config']} --out {self.out} "
                "--resume")

    def _stop_if_signalled_after_training(self, done: str):
        """A signal that arrives after the last step (while the final weights are written or
        AutoAttack runs) stops at the next safe point: the checkpoint of the last epoch is on disk,
        so ``--resume`` skips training and only redoes this final stage."""
        if self._stop_signal is None:
            return
        sig = signal.Signals(self._stop_signal).name
        raise TrainingInterrupted(
            f"stopped by {sig} after training finished (all {self.cfg.train.epochs} epochs; {done}); the final "
            f"stage was not completed ({RUN_FILES['summary']} not written); resuming skips training and redoes only that "
            f"stage. {self._resume_hint()}")

    def _end_of_epoch(self, epoch: int):
        cfg = self.cfg
        acc = self.epoch_acc
        model, which = self.evaluated_model()
        rec = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch, 0, self.steps_per_epoch),
               "train_loss": acc["loss"] / max(acc["seen"], 1),
               "train_robust_acc": 100.0 * acc["correct"] / max(acc["seen"], 1),
               "train_time_s": acc["time"], "eval_model": which}
        rec.update(self.rectifier.fit_validation(*self._val_points, epoch))
        va = cfg.eval.val_attack
        if self.val_loader is not None:
            rec["val_clean"], rec["val_pgd"] = self._evaluate(model, self.val_loader, cfg.eval.val_attack_steps)
            if va != "pgd_ce":
                from ..evaluation.pgd import VAL_ATTACKS

                rec[f"val_{va}"] = self._evaluate(model, self.val_loader, cfg.eval.val_attack_steps,
                                                  loss=VAL_ATTACKS[va], clean=False)[1]
        if (epoch + 1) % cfg.eval.test_every == 0 or epoch + 1 == cfg.train.epochs:
            rec["test_clean"], rec["test_pgd"] = self._evaluate(model, self.curve_loader, cfg.eval.test_attack_steps)
        self.history.append(rec)
        # The papers select by validation robust accuracy; a naturally trained model (a KD / LTD
        # teacher) is selected by validation clean accuracy (its robust accuracy is ~0).
        by = self.cfg.eval.select_by
        if by == "auto":
            by = "clean" if self.cfg.objective.name == "natural" else "robust"
        val_key = "val_pgd" if va == "pgd_ce" else f"val_{va}"
        score = rec.get(val_key if by == "robust" else "val_clean",
                        rec.get("test_pgd" if by == "robust" else "test_clean"))
        if score is not None and score > self.best.get("score", self.best.get("val_pgd", -1.0)):
            self.best = {"epoch": epoch + 1, "score": score, "selected_by": by, "val_pgd": rec.get("val_pgd"),
                         "val_clean": rec.get("val_clean"),
                         "test_clean": rec.get("test_clean"), "test_pgd": rec.get("test_pgd"), "eval_model": which}
            if by == "robust":
                self.best["val_attack"] = va
                if va != "pgd_ce":
                    self.best[val_key] = rec.get(val_key)
            write_weights(model, self.out / RUN_FILES["best"], self._weights_meta(epoch + 1, which))
        # the checkpoint cross-entropy PGD would pick, beside the one the other attack picks
        ce_score = rec.get("val_pgd") if by == "robust" and va != "pgd_ce" else None
        if ce_score is not None and ce_score > self.best_pgd_ce.get("score", -1.0):
            self.best_pgd_ce = {"epoch": epoch + 1, "score": ce_score, "val_pgd": ce_score,
                                val_key: rec.get(val_key), "test_pgd": rec.get("test_pgd")}
            write_weights(model, self.out / RUN_FILES["best_pgd_ce"], self._weights_meta(epoch + 1, which))
        parts = [f"epoch {epoch + 1}/{cfg.train.epochs}", f"loss {rec['train_loss']:.4f}",
                 f"train-adv {rec['train_robust_acc']:.1f}%"]
        if "val_pgd" in rec:
            parts.append(f"val clean {rec['val_clean']:.1f}% pgd{cfg.eval.val_attack_steps} {rec['val_pgd']:.1f}%"
                         + (f" {va} {rec[val_key]:.1f}%" if va != "pgd_ce" else ""))
        if "test_pgd" in rec:
            parts.append(f"test clean {rec['test_clean']:.1f}% pgd{cfg.eval.test_attack_steps} {rec['test_pgd']:.1f}%")
        parts.append(f"[{which}] {acc['time']:.1f}s")
        if self.progress:
            self.log(" | ".join(parts))
        atomic_write_json(self.out / RUN_FILES["history"], self.history)
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
            self.save_checkpoint(epoch + 1, 0)

    def _weights_meta(self, epoch: int, which: str) -> dict:
        return {"arch": self.cfg.model.arch, "num_classes": self.info.num_classes, "dataset": self.info.name,
                "epoch": epoch, "eval_model": which, "method": self.cfg.method.name,
                "objective": self.cfg.objective.name, "data_info": info_to_metadata(self.info),
                **self._fingerprint}

    def _write_curves(self):
        if not self.history or not is_main_process():  # [DDP hook] rank 0 writes files
            return None
        from .._optional import MissingExtraError
        from ..plots import plot_curves

        try:
            return plot_curves({self.cfg.name: self.history}, self.out / RUN_FILES["curves"])
        except MissingExtraError as exc:  # the core install has no matplotlib: the run itself is complete
            if not self._curves_skipped:  # called every epoch: say it once
                self.log(f"no {RUN_FILES['curves']}: {exc}")
                self._curves_skipped = True
            return None

    def _finish(self, elapsed: float) -> dict:
        cfg = self.cfg
        model, which = self.evaluated_model()
        self._stop_if_signalled_after_training("nothing of the final stage written yet")
        final_path = write_weights(model, self.out / RUN_FILES["final"], self._weights_meta(cfg.train.epochs, which))
        self._stop_if_signalled_after_training(f"final weights written to {final_path}")
        last = self.history[-1] if self.history else {}
        final_keys = ("val_clean", "val_pgd", "test_clean", "test_pgd") + \
            ((f"val_{cfg.eval.val_attack}",) if cfg.eval.val_attack != "pgd_ce" else ())
        summary = {
            "name": cfg.name, "method": cfg.method.name, "objective": cfg.objective.name,
            "dataset": self.info.name, "arch": cfg.model.arch, "epochs": cfg.train.epochs,
            "steps_per_epoch": self.steps_per_epoch, "device": str(self.device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "train_seconds": round(elapsed, 2),
            "attack_bn_mode": cfg.attack.bn_mode, "eval_model": which,
            "effective_decays": {k: v for k, v in {
                "wa": self.wa.decay if self.wa is not None else None,
                "adr_teacher": getattr(getattr(self.rectifier, "teacher", None), "decay", None)}.items() if v is not None},
            "best_epoch": self.best["epoch"],
            "best": {k: v for k, v in self.best.items() if k != "epoch"},
            **({"best_pgd_ce_epoch": self.best_pgd_ce["epoch"],
                "best_pgd_ce": {k: v for k, v in self.best_pgd_ce.items() if k != "epoch"}}
               if self.best_pgd_ce["epoch"] >= 1 else {}),
            "final": {"epoch": cfg.train.epochs, **{k: last.get(k) for k in final_keys}},
            "paths": {"best": str(self.out / RUN_FILES["best"]), "final": str(final_path),
                      "config": str(self.out / RUN_FILES["config"]), "history": str(self.out / RUN_FILES["history"]),
                      "checkpoint": str(self.out / RUN_FILES["checkpoint"])},
        }
        curves = self._write_curves()
        if curves is not None:
            summary["paths"]["curves"] = str(curves)
        if cfg.eval.autoattack and is_main_process():  # [DDP hook] AutoAttack on rank 0 only
            summary["autoattack"] = self.run_autoattack()
        self._stop_if_signalled_after_training("final weights written, evaluation done")
        atomic_write_json(self.out / RUN_FILES["summary"], summary)
        return summary

    def run_autoattack(self) -> dict:
        """AutoAttack (official) on the best and the final weights, on the test split."""
        from ..evaluation.autoattack import run_autoattack
        from ..runs import read_weights as _rw

        cfg = self.cfg
        x, y = _stack(self.test_ds, cfg.eval.autoattack_n)
        _check_batch(x, y, None, self.info.num_classes, "test data (AutoAttack)")
        out = {}
        for which in ("best", "final"):
            model = build_model_for(cfg, self.info).to(self.device)
            state, _ = _rw(self.out / RUN_FILES[which])
            model.load_state_dict(state)
            model.eval()
            res = run_autoattack(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps,
                                 version=cfg.eval.autoattack_version, device=str(self.device),
                                 batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
            out[which] = res
            self.log(f"AutoAttack ({cfg.eval.autoattack_version}) on {which}: clean {res['clean_acc']:.2f}%  "
                     f"robust {res['robust_acc']:.2f}%  ({res['n']} points, {res.get('elapsed_s', 0):.0f}s)")
            if which == "best":
                self._stop_if_signalled_after_training("final weights written; AutoAttack done on the best weights only")
        return out


def _checked_int(state: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = state[key]
    if torch.is_tensor(v) and v.numel() == 1 and not v.is_floating_point():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ResumeError(f"{where}: '{key}' is {v!r}, not an integer")
    if not lo <= v <= hi:
        raise ResumeError(f"{where}: '{key}' is {v}, outside [{lo}, {hi}] for this run")
    return v


def _check_shapes(mine, theirs, where: str, path: str = "") -> None:
    """Every tensor ``mine`` holds is in ``theirs`` with the same shape (``copy_`` would otherwise
    broadcast a wrong-sized tensor silently)."""
    if torch.is_tensor(mine):
        if not torch.is_tensor(theirs) or theirs.shape != mine.shape:
            got = tuple(theirs.shape) if torch.is_tensor(theirs) else type(theirs).__name__
            raise ResumeError(f"{where}{path} has shape {got}, this run needs {tuple(mine.shape)}")
    elif isinstance(mine, dict):
        if not isinstance(theirs, dict):
            raise ResumeError(f"{where}{path} is a {type(theirs).__name__}, not a state dict")
        for k, v in mine.items():
            if torch.is_tensor(v) or isinstance(v, dict):
                if k not in theirs:
                    raise ResumeError(f"{where}{path} has no {k!r}")
                _check_shapes(v, theirs[k], where, f"{path}.{k}")


def _check_optimizer_shapes(optimizer, where: str) -> None:
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    raise ResumeError(f"{where}: optimizer state '{k}' of parameter {pi} (group {gi}) has shape "
                                      f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")


def _all_finite(obj) -> bool:
    """Every floating tensor and float in a (nested) state dict is finite (one sync per device)."""
    flags, ok = [], True

    def walk(o):
        nonlocal ok
        if torch.is_tensor(o):
            if o.is_floating_point() and o.numel():
                flags.append(torch.isfinite(o).all())
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, float) and not math.isfinite(o):
            ok = False

    walk(obj)
    return ok and all(bool(torch.stack([f for f in flags if f.device == d]).all()) for d in {f.device for f in flags})


def _nonfinite_parts(state: dict) -> list:
    """The parts of a training state (model, optimizer, ...) holding NaN/Inf."""
    return [k for k in ("model", "optimizer", "rectifier", "wa", "swa") if not _all_finite(state.get(k))]


def _stack(ds, n: Optional[int] = None):
    n = len(ds) if n is None else min(n, len(ds))
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        xs.append(item[0])
        ys.append(int(item[1]))
    return torch.stack(xs), torch.tensor(ys)


def train(cfg: Config, out_dir, **kw) -> dict:
    return Trainer(cfg, out_dir, **kw).fit()
