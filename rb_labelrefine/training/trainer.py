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
early-stopping protocol; ``eval.select_on: test`` only when asked), clean and PGD-k accuracy on a
fixed test subset draw the curve, and a checkpoint of *everything* that shapes the run is written
atomically.

The loop and the step live here; each part has a module of its own, and none of them is handed
the trainer (they receive what they need and return values):

    build.py       config -> model, averagers, rectifier (and its teachers), objective, AWP, optimizer
    stream.py      the batch stream: epoch order, resume skip, auxiliary rows, checks, ranks
    step.py        AMP / channels_last / compile / DDP collectives, the non-finite snapshot, epoch sums
    checkpoint.py  what a checkpoint holds and the checks it passes before it is restored
    rundir.py      lock, resume policy, finished-run detection, the run directory's files
    runlog.py      train.log, history.csv, TensorBoard / W&B (written through rundir.py)
    extension.py   --resume with more train.epochs: extending a finished run
    signals.py     the one owner of the stop state (DDP only agrees on a flag)
    selection.py   per-epoch evaluation, best and best-by-CE selection
    finish.py      final weights, summary, curves, end-of-run AutoAttack
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import __version__
from ..averaging import frozen_bn_stats
from ..config import Config
from . import rng
from .build import (build_averagers, build_awp_for, build_data, build_model, build_objective_for, build_optimizer,
                    build_rectifier_for, configure_torch, param_groups, teacher_loader,  # noqa: F401 (re-export)
                    validation_points)
from .build import resolve_device as _resolve_device
from .checkpoint import CHECKPOINT_FORMAT, Checkpointer, check_header, loop_state, positions, restore, restore_parts
from .distributed import init_distributed
from .errors import NonFiniteLossError, ResumeError, TrainingInterrupted
from .finish import Finisher, effective_decays, test_points
from .io import safe_torch_load
from .rundir import RunDir
from .schedule import lr_at, onecycle_at, set_lr
from .selection import Selector, bn_loader, epoch_line, epoch_record, eval_loaders, evaluated_model
from .signals import StopSignal
from .step import EpochSums, StepRuntime, StepSnapshot, bn_momentum, nonfinite_error
# the batch stream: epoch order, resume skip, auxiliary rows, checks, ranks, device-resident batches
from .stream import EpochSampler, build_stream, first_samples  # noqa: F401 (EpochSampler re-exported)

__all__ = ["Trainer", "TrainingInterrupted", "NonFiniteLossError", "ResumeError", "train"]


class Trainer:
    """Train one config into ``out_dir``.  ``fit()`` returns the summary dict."""

    def __init__(self, cfg: Config, out_dir, *, resume: bool = False, progress: bool = True,
                 log=None, handle_signals: bool = True, datasets=None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.handle_signals = handle_signals
        self._datasets = datasets
        say = lambda msg: self.log(msg)  # noqa: E731 (quiet on ranks other than 0, once set up)
        self.run = RunDir(cfg, self.out, resume=resume, log=say)       # lock, resume policy, files
        self.log = self.run.tee(self.log)                               # and train.log (rank 0)
        self.stop = StopSignal(say)                                     # the one owner of the stop state
        self.checkpointer = Checkpointer(self.run.path("checkpoint"), self.run.save_checkpoint)
        self.finisher = Finisher(cfg, self.run, self.stop, say)         # final weights, summary, AutoAttack

    @property
    def resume(self) -> bool:
        """Whether this fit continues from a checkpoint (False for a run stopped before its first one)."""
        return self.run.resume

    # ------------------------------------------------------------------ setup
    def _setup(self):
        """Build the parts from the config (training/build.py), in the order that draws the same
        random numbers as before: data, model, averagers, rectifier, objective, runtime, AWP, optimizer."""
        cfg = self.cfg
        configure_torch(cfg.train)
        device = _resolve_device(cfg.train.device)
        # [DDP] under torchrun (WORLD_SIZE > 1): join the process group, cuda:LOCAL_RANK, quiet ranks
        self.dist = init_distributed(device, cfg.train.dist_timeout_s)
        self.device = self.dist.rank_device(device)
        if not self.dist.is_main:
            self.log, self.progress = (lambda msg: None), False
        rng.seed_all(cfg.train.seed)
        x0 = self._setup_data()
        self.model = build_model(cfg, self.info, self.device, x0, init=not self.resume)  # model.init_from
        self.wa, self.swa = build_averagers(cfg, self.model, self.steps_per_epoch, self.total_steps)
        # per-sample state (SGLR) indexes auxiliary samples after the real ones: len(train) + archive index
        n_samples = self.stream.num_samples
        self.rectifier = build_rectifier_for(cfg, self.model, num_classes=self.info.num_classes, num_samples=n_samples,
                                             total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                                             load_teacher=teacher_loader(cfg, self.info, self.device),
                                             shared_ema=self.wa, device=self.device)
        self._val_points = validation_points(cfg, self.rectifier, self.val_ds, self.info.num_classes)
        self.objective = build_objective_for(cfg, self.model)
        # amp, channels_last (student and the rectifier's modules), compile, DDP wrapping and broadcast
        self._fast = StepRuntime(cfg.train, self.device, self.model, self.objective, modules=self.rectifier.modules(),
                                 replicas=[m.module for m in (self.wa, self.swa) if m is not None], dist=self.dist,
                                 global_batch=lambda step: self.stream.global_batch_size(step % self.steps_per_epoch),
                                 rank_sizes=lambda step: self.stream.rank_sizes(step % self.steps_per_epoch),
                                 steps_per_epoch=self.steps_per_epoch)
        self.awp = build_awp_for(cfg, self.model, grad_transform=self._fast.awp_grad_transform)
        self.optimizer = build_optimizer(cfg, self.model)
        self.val_loader, self.curve_loader = eval_loaders(cfg, self.val_ds, self.test_ds, self.info.num_classes)
        self.selector = Selector(cfg, has_val=self.val_loader is not None, save=self._save_weights)
        self._snapshot = StepSnapshot(self.model, self.device)
        self.sums = EpochSums(self.device, self._fast.reduce_epoch_sums)   # the epoch's training loss/accuracy

    # ------------------------------------------------------------------ data [the batch stream's pieces]
    def _setup_data(self) -> torch.Tensor:
        """The data sets and the batch stream (training/stream.py: order, steps per epoch, the
        auxiliary rows, the ranks' shares, where batches are built); returns the first training
        samples (checked), to check the model against."""
        cfg = self.cfg
        self.train_ds, self.val_ds, self.test_ds, self.info = self._datasets = build_data(cfg, self._datasets)
        x0, _, _ = first_samples(self.train_ds, self.info.num_classes)
        self.stream = build_stream(cfg, self.train_ds, self.info.num_classes, tuple(x0.shape[1:]), self.device,
                                   self.dist)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        return x0

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int, batch: int) -> dict:
        """Everything that shapes the rest of the run (training/checkpoint.py says what, and checks it)."""
        scaler, fp = self._fast.scaler, self.run.fingerprint
        return {
            "format": CHECKPOINT_FORMAT, "version": __version__,
            "config_fingerprint": fp["config_fingerprint"], "run_config": fp["run_config"],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "batch": batch, "global_step": self.global_step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rectifier": self.rectifier.state_dict(),
            **{k: (o.state_dict() if o is not None else None) for k, o in self._optional_parts()},
            "rng": rng.state_dict(),
            "stream": self.stream.state_dict(),   # where batches are built (the aux position is "aux")
            **self.selector.state_dict(),
            "history": json.dumps(self.history),
            "epoch_acc": self.sums.state_dict(),
        }

    def _optional_parts(self):
        return (("wa", self.wa), ("swa", self.swa), ("awp", self.awp), ("aux", self.stream.aux))

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Restore a checkpoint -- only one that proves it belongs to this run (its fingerprint),
        whose positions fit this run's schedule and whose tensors have this run's shapes; anything
        else is a :class:`ResumeError` naming what does not fit (nothing on disk is changed)."""
        check_header(state, where)
        self.run.check_fingerprint(state, where)
        if state.get("version") != __version__:
            self.log(f"note: {where} was written by rb_labelrefine {state.get('version')}, this is {__version__}: "
                     "the resumed run may differ from an uninterrupted one")
        epoch, batch, step = positions(state, self.cfg.train.epochs, self.steps_per_epoch, where)
        history, epoch_acc = loop_state(state, epoch, where)
        restore_parts(state, [("best", lambda _: self.selector.load_state_dict(state, epoch))], where)
        loaders = [("model", self.model.load_state_dict), ("optimizer", self.optimizer.load_state_dict),
                   ("rectifier", self.rectifier.load_state_dict)]
        loaders += [(n, o.load_state_dict) for n, o in self._optional_parts() if o is not None]
        if self._fast.scaler is not None and state.get("scaler"):
            loaders.append(("scaler", self._fast.scaler.load_state_dict))
        loaders.append(("rng", rng.load_state_dict))
        # where batches are built (a checkpoint from before the batch stream has none: per item)
        restore_parts({"stream": state.get("stream")}, [("stream", self.stream.load_state_dict)], where)
        restore(state, loaders, where, shaped={"rectifier": self.rectifier, "wa": self.wa, "swa": self.swa},
                optimizer=self.optimizer)
        self.sums.load_state_dict(epoch_acc)
        self.global_step, self.history = step, history
        self.start_epoch, self.start_batch = epoch, batch

    def save_checkpoint(self, epoch: int, batch: int) -> Path:
        return self.checkpointer.save(self.state_dict(epoch, batch))

    def _save_weights(self, model: nn.Module, which: str, epoch: int, eval_model: str):
        return self.run.write_weights(model, which, self.run.weights_meta(self.info, epoch, eval_model))

    # ------------------------------------------------------------------ evaluation
    def evaluated_model(self) -> tuple[nn.Module, str]:
        return evaluated_model(self.cfg, self.model, self.wa, self.swa, self._bn_loader, self.device)

    def _bn_loader(self, epoch: Optional[int] = None):
        """SWA's BatchNorm recompute pass (training/selection.py)."""
        return bn_loader(self.train_ds, self.cfg.data.batch_size, self.cfg.train.seed, epoch)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        from ..config import check_runnable

        check_runnable(self.cfg)
        with self.run.opened():
            done = self.run.finished_summary()
            return done if done is not None else self._fit()

    def _fit(self) -> dict:
        self.run.prepare()
        self._setup()
        self.selector.require_split()  # refused before anything is written
        self.run.start()
        self.global_step, self.start_epoch, self.start_batch = 0, 0, 0
        self.history = []
        if self.run.resume:
            ckpt = self.run.path("checkpoint")
            self.load_state_dict(safe_torch_load(ckpt, map_location=self.device), f"the checkpoint {ckpt}")
            self.run.check_weights_files()  # a weights file dropped in from another run is refused
            self.run.resumed(self.start_epoch, self.start_batch, self.steps_per_epoch)  # (extending: a note)
        # [DDP] a rank that stops answering: every other rank stops naming it (train.dist_timeout_s)
        with self.stop.installed(self.handle_signals, distributed=self.dist.enabled), \
                self.dist.timeouts(self.run.resume_hint):
            return self._loop()

    def _loop(self) -> dict:
        t_start = time.time()
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            self._train_epoch(epoch, self.start_batch if epoch == self.start_epoch else 0)
            self.rectifier.end_epoch(self.model)
            if self.swa is not None:
                snap = self.swa.end_epoch(self.model, epoch)
                if snap and self.cfg.swa.bn_update and self.cfg.swa.bn_form == "code":  # after every snapshot
                    self.swa.update_bn(self._bn_loader(epoch), device=self.device, form="code")
            self._end_of_epoch(epoch)
            if self.stop.requested:
                self._interrupt(epoch + 1, 0)
        self.stop.finish()
        model, which = self.evaluated_model()
        facts = {"steps_per_epoch": self.steps_per_epoch, "device": self.device, "elapsed": time.time() - t_start,
                 "effective_decays": effective_decays(self.wa, self.rectifier),
                 "test_points": functools.partial(test_points, self.test_ds, self.info.num_classes)}
        return self.finisher(model, which, info=self.info, history=self.history, selection=self.selector.summary(),
                             facts=facts)

    def _train_epoch(self, epoch: int, skip: int) -> None:
        """One epoch's training steps, from batch ``skip`` (a resumed epoch) on."""
        cfg = self.cfg
        bar = self._epoch_batches(epoch, skip)
        self.sums.begin(resumed=bool(skip))
        self.model.train()
        batch = skip
        # Python's/numpy's global generators are a function of the position (training/rng.py)
        rng.reseed_globals(cfg.train.seed, epoch, batch, self.dist.rank)
        for x, y, idx in bar:
            set_lr(self.optimizer, lr_at(cfg, epoch, batch, self.steps_per_epoch),
                   onecycle_at(cfg, epoch)[1] if cfg.optim.schedule == "onecycle" else None)
            try:
                loss, logits_adv = self.train_step(x, y, idx, epoch)
            except NonFiniteLossError as exc:
                self.sums.flush()
                kept = self.checkpointer.save_last_good(self.state_dict(epoch, batch))
                msg = f"{exc}; {kept} Lower optim.lr, check the data, or set train.grad_clip."
                self.run.record(f"failed: {msg}")      # train.log says why the run stopped, too
                raise NonFiniteLossError(msg) from None
            self.sums.add(loss, logits_adv, y)
            batch += 1
            rng.reseed_globals(cfg.train.seed, epoch, batch, self.dist.rank)  # before the next fetch
            if self.stop.requested and batch < self.steps_per_epoch:
                self.sums.flush()
                self._interrupt(epoch, batch)
        bar.close()
        self.sums.flush()

    # ------------------------------------------------------------------ batches [the batch stream's pieces]
    def _epoch_batches(self, epoch: int, skip: int):
        """The epoch's training batches from batch ``skip`` on, as the step takes them (checked, on
        the device, auxiliary rows after the real ones: training/stream.py), with a progress bar."""
        from tqdm.auto import tqdm

        self.dist.carry_epoch_sums(self.sums.acc if skip else None)   # [DDP] a resumed epoch's partial sums
        return tqdm(self.stream.epoch(epoch, skip), total=self.steps_per_epoch, initial=skip, leave=False,
                    desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                    disable=None if self.progress else True)  # None: off when not a terminal

    def train_step(self, x, y, idx, epoch: int):
        """One optimizer step on a batch (on the device); returns ``(loss, adversarial logits)``.
        ``train.bn_first_step_momentum``: the BatchNorm momentum of the first step (training/step.py)."""
        m = self.cfg.train.bn_first_step_momentum
        with bn_momentum(self.model, m if self.global_step == 0 else None):
            return self._step(x, y, idx, epoch)

    def _step(self, x, y, idx, epoch: int):
        # rt (training/step.py): amp autocast, channels_last input, compiled/DDP models, GradScaler,
        # sync-free non-finite check on accelerators, DDP collectives
        rt, step = self._fast, self.global_step
        x = rt.prepare_input(x)
        exact = rt.guard.per_step  # the loss is checked before the update: the state can be restored
        if exact:
            self._snapshot.take()
        use_awp = self.awp is not None and epoch >= self.cfg.awp.warmup_epochs
        parts = [self._micro_step(*p, epoch, use_awp, exact, i == 0) for i, p in enumerate(rt.micro_batches(x, y, idx))]
        if self.cfg.train.grad_clip:
            rt.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        if use_awp and self.awp.restores_before_step:
            self.awp.restore()
        rt.step(self.optimizer)
        if use_awp and not self.awp.restores_before_step:
            self.awp.restore()
        rt.after_update(self.model, self.rectifier, step, self.stop)  # DDP: buffers, per-sample state, stop
        self.rectifier.after_step(self.model)
        if self.wa is not None:  # (when ADR shares it as its teacher, ADR does not update it)
            self.wa.update(self.model)
        self.global_step += 1
        return rt.joined(parts)

    def _micro_step(self, x, y, idx, share: float, epoch: int, use_awp: bool, exact: bool, first: bool):
        """Attack, loss and backward of a micro-batch (train.accum_steps; else the batch): ``(loss, logits, share)``."""
        rt, step = self._fast, self.global_step
        with rt.autocast():
            target = self.rectifier.targets(x, y, index=idx)
            x_adv = self.objective.adversarial(rt.attack_model, x, target)  # DDP: the unwrapped module
            self.model.train()
            if use_awp:
                self.awp.perturb(self.model, rt.awp_loss(self.objective, x, x_adv, target, step))
            with (frozen_bn_stats(self.model) if use_awp and self.awp.freezes_bn_stats else contextlib.nullcontext()):
                loss, logits_adv = self.objective.loss(rt.train_model, x, x_adv, target)
        bad = rt.nonfinite(loss, step)  # per step on the CPU; a device-side flag read every log_every steps elsewhere
        if bad is not None:
            if use_awp:
                self.awp.restore()
            # back to the state after the previous step (no update made); Checkpointer.save_last_good keeps it
            if exact:
                self._snapshot.restore()
            raise nonfinite_error(bad, epoch)
        # the first part zeroes the gradients; fp16: scaled; DDP: the rank's share of the global batch
        rt.backward(loss, y.shape[0], step, share, zero=self.optimizer if first else None)
        return loss, logits_adv, share

    def _interrupt(self, epoch: int, batch: int):
        """A stop signal at a safe point: checkpoint, curves, :class:`TrainingInterrupted`."""
        self.save_checkpoint(epoch, batch)
        self.run.write_curves(self.history)
        raise TrainingInterrupted(
            f"stopped by {self.stop.name} at epoch {epoch + (1 if batch else 0)}, step {self.global_step}; checkpoint "
            f"written to {self.run.path('checkpoint')}. {self.run.resume_hint()}")

    def _end_of_epoch(self, epoch: int):
        """Evaluate (training/selection.py), select, log, write the history and the checkpoint."""
        cfg = self.cfg
        model, which = self.evaluated_model()
        train = {"lr": lr_at(cfg, epoch, 0, self.steps_per_epoch), **self.sums.record()}
        fit = self.rectifier.fit_validation(*self._val_points, epoch)
        rec = epoch_record(cfg, epoch, model, which, train=train, fit=fit, val_loader=self.val_loader,
                           curve_loader=self.curve_loader, device=self.device)
        self.history.append(rec)
        self.selector.end_epoch(epoch, rec, model, which)
        (self.log if self.progress else self.run.record)(epoch_line(cfg, rec))  # train.log either way
        self.run.write_history(self.history)
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
            self.save_checkpoint(epoch + 1, 0)


def train(cfg: Config, out_dir, **kw) -> dict:
    return Trainer(cfg, out_dir, **kw).fit()
