"""The runtime of a training step: AMP, channels_last, ``torch.compile``, the non-finite check and
the step's DDP collectives (the numeric pieces are in :mod:`rb_labelrefine.fast`).

:class:`StepRuntime` is built once at the end of the trainer's setup from the parts it needs (the
student, the rectifier's modules, the objective, the process group) and *returns* what differs between
the plain and the fast paths: the models the attack and the loss run through, the grad scaler, the
non-finite guard and the transform AWP's proxy gradients need (:meth:`awp_grad_transform`).  It
receives no trainer and writes no other object's attributes.
:class:`StepSnapshot` keeps what a step changes before its loss is known to be finite.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..config import ConfigError
from ..fast import FloatLogits, NonFinite, NonFiniteGuard, autocast, compile_module, make_grad_scaler
from .errors import NonFiniteLossError

__all__ = ["StepRuntime", "StepSnapshot", "EpochSums", "bn_momentum", "nonfinite_error"]


def nonfinite_error(bad: NonFinite, epoch: int) -> NonFiniteLossError:
    """The error of a non-finite loss found in epoch ``epoch`` (0-based)."""
    return NonFiniteLossError(f"non-finite training loss ({bad.value}) at epoch {epoch + 1}, step {bad.step + 1}"
                              f"{bad.note}")


class StepRuntime:
    """The per-step glue the trainer calls; see the module docstring.

    ``attack_model`` (what the attack differentiates), ``train_model`` (what the training loss runs
    through: DDP / compiled / float-logit wrapped), ``scaler``, ``guard``.
    ``global_batch(step)``: the number of samples in the global batch of a step (DDP loss weights);
    ``rank_sizes(step)``: every rank's share of it (DDP's per-sample state exchange; default: the
    global batch shared evenly).
    """

    def __init__(self, train_cfg, device: torch.device, model: nn.Module, objective, *,
                 modules: Sequence[nn.Module] = (), replicas: Sequence[nn.Module] = (), dist=None,
                 global_batch: Optional[Callable[[int], int]] = None, steps_per_epoch: int = 0,
                 rank_sizes: Optional[Callable[[int], list]] = None):
        t = train_cfg
        self.device, self.dist = device, (dist if dist is not None and dist.enabled else None)
        self.amp = t.amp
        self.accum_steps = int(getattr(t, "accum_steps", 1) or 1)
        if self.accum_steps > 1 and self.dist is not None:
            raise ConfigError("train.accum_steps", "gradient accumulation under torchrun (DDP) is not supported: "
                              "set train.accum_steps=1 (more ranks already give a larger global batch)")
        self.channels_last = bool(t.channels_last)
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.rank_sizes = rank_sizes or global_batch
        if self.channels_last:  # the student and the rectifier's teachers (Rectifier.modules())
            for m in (model, *modules):
                m.to(memory_format=torch.channels_last)
        attack_model = compile_module(model) if t.compile else model
        if self.dist is not None:
            self.dist.broadcast_modules([model, *replicas, *modules])  # rank 0's initial weights everywhere
            train_model = self.dist.wrap(model)           # DDP: gradients are averaged in backward
            if t.compile:
                train_model = compile_module(train_model)
        else:
            train_model = attack_model
        if self.amp is not None:
            attack_model, train_model = FloatLogits(attack_model), FloatLogits(train_model)
        self.attack_model, self.train_model = attack_model, train_model
        attack = getattr(objective, "attack", None)
        if attack is not None and attack_model is not model:
            attack.set_model(attack_model)           # built once; torchattacks keeps its settings
        self.scaler = make_grad_scaler(device, self.amp)
        self.guard = NonFiniteGuard(device.type == "cpu", check_every=t.log_every,
                                    any_rank=self.dist.any_true if self.dist is not None else None)

    # ------------------------------------------------------------------ per step
    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last: deliberately not converted (see rb_labelrefine/fast.py: random starts)
        return x

    def autocast(self):
        return autocast(self.device, self.amp)

    def _loss_weight(self, n_local: int, step: int) -> float:
        return 1.0 if self.dist is None else self.dist.loss_weight(n_local, self.global_batch(step))

    def awp_loss(self, objective, x, x_adv, target, step: int) -> Callable[[nn.Module], torch.Tensor]:
        """AWP's proxy loss: float32 logits under AMP, the rank's share of the global batch under
        DDP (its gradients are averaged across ranks by :meth:`awp_grad_transform`)."""
        w = self._loss_weight(x.shape[0], step)
        wrap = FloatLogits if self.amp is not None else (lambda m: m)

        def fn(m):
            loss = objective.loss(wrap(m), x, x_adv, target)[0]
            if w != 1.0:
                loss = loss * w
            return self.scaler.scale(loss) if self.scaler is not None else loss
        return fn

    def awp_grad_transform(self, grads):
        """What AWP does to its proxy gradients: fp16 overflow -> no direction; DDP -> averaged."""
        if self.scaler is not None:  # scaled fp16 gradients: the direction is what AWP uses; an overflow gives none
            grads = [None if g is None else torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
        if self.dist is not None:
            grads = self.dist.average(grads)
        return grads

    def nonfinite(self, loss: torch.Tensor, step: int) -> Optional[NonFinite]:
        return self.guard(loss, step, self.steps_per_epoch)

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor, idx):
        """``train.accum_steps``: the batch as ``(x, y, idx, share)`` micro-batches (``share``: the
        micro-batch's fraction of the batch, its loss weight); the whole batch (share 1) without."""
        if self.accum_steps == 1:
            return [(x, y, idx, 1.0)]
        n, k = y.shape[0], self.accum_steps
        parts = zip(x.tensor_split(k), y.tensor_split(k), idx.tensor_split(k) if idx is not None else [None] * k)
        return [(a, b, c, b.shape[0] / n) for a, b, c in parts if b.shape[0]]

    @staticmethod
    def joined(parts: list) -> tuple:
        """``(loss, logits)`` of the whole batch from its micro-batches' ``(loss, logits, share)``: the
        share-weighted mean loss (the full batch's mean) and the logits in batch order."""
        if len(parts) == 1:
            return parts[0][:2]
        loss = sum(lo.detach().float() * share for lo, _, share in parts)
        return loss, torch.cat([lg.detach() for _, lg, _ in parts])

    def backward(self, loss: torch.Tensor, n_local: int, step: int, share: float = 1.0, zero=None) -> None:
        """``share``: a micro-batch's fraction of the batch (``train.accum_steps``): its mean loss is
        weighted by it, so the accumulated gradient is the batch's mean gradient.  ``zero``: an
        optimizer whose gradients are set to None first (the batch's first micro-batch)."""
        if zero is not None:
            zero.zero_grad(set_to_none=True)
        if share != 1.0:
            loss = loss * share
        w = self._loss_weight(n_local, step)
        if w != 1.0:
            loss = loss * w
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def unscale_(self, optimizer) -> None:
        """Before gradient clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def after_update(self, model: nn.Module, rectifier, step: int, stop) -> None:
        """After the optimizer step (and AWP's restore), before the averagers follow the weights.
        DDP: identical buffers and per-sample state on every rank, and an agreed decision on a stop
        signal -- every step with gloo (cheap), at the non-finite check interval with nccl."""
        if self.dist is None:
            return
        self.dist.sync_step(model, rectifier, self.rank_sizes(step))
        if self.dist.backend == "nccl" and (step + 1) % self.guard.check_every != 0:
            return
        if stop.agree(self.dist.any_true) and not self.guard.per_step:
            bad = self.guard.check(step)  # a checkpoint follows: never checkpoint a state that went non-finite
            if bad is not None:
                raise nonfinite_error(bad, bad.step // max(self.steps_per_epoch, 1))

    def reduce_epoch_sums(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, acc=None) -> int:
        """Distributed: the epoch's sums over all ranks (in place); returns the global count (each
        rank's own running sums kept in ``acc`` for a resume: DistributedContext.reduce_epoch_sums)."""
        return seen if self.dist is None else self.dist.reduce_epoch_sums(loss_sum, correct, seen, acc)


class StepSnapshot:
    """What a step changes before its loss is known to be finite: the model's buffers (BatchNorm
    statistics, updated by the attack's and the loss's forward passes) and torch's RNG (random
    starts).  Copied into preallocated tensors -- a few small copies per step."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.cuda = model, device.type == "cuda"
        self._bufs = self._copies = self._rng = None

    def take(self) -> None:
        if self._bufs is None:
            self._bufs = list(self.model.buffers())
            self._copies = [b.detach().clone() for b in self._bufs]
        elif self._bufs:
            torch._foreach_copy_(self._copies, self._bufs)
        self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.cuda else None)

    @torch.no_grad()
    def restore(self) -> None:
        if self._bufs:
            torch._foreach_copy_(self._bufs, self._copies)
        torch.set_rng_state(self._rng[0])
        if self._rng[1] is not None:
            torch.cuda.set_rng_state_all(self._rng[1])


@contextlib.contextmanager
def bn_momentum(model: nn.Module, momentum: Optional[float]):
    """Every BatchNorm layer of ``model`` with ``momentum`` while the block runs (None: unchanged) --
    Haiku's BatchNorm initialisation, where the first step's batches set the running statistics (the
    DM-Improves-AT code's ``set_bn_momentum(model, 1.0)`` at global step 0)."""
    bns = [b for b in model.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)] if momentum is not None else []
    own = [b.momentum for b in bns]
    for b in bns:
        b.momentum = momentum
    try:
        yield
    finally:
        for b, m in zip(bns, own):
            b.momentum = m


class EpochSums:
    """An epoch's training loss and robust accuracy: float32 sums on the device between flushes (no
    host sync per step), folded into :attr:`acc` (loss, correct, seen, time -- checkpointed) by
    :meth:`flush`; ``reduce(loss_sum, correct, seen)`` sums them over ranks (DDP) and returns the count."""

    def __init__(self, device: torch.device, reduce: Callable):
        self.device, self.reduce = device, reduce
        self.acc: dict = {}

    def state_dict(self) -> dict:
        return {k: float(v) for k, v in self.acc.items()}

    def load_state_dict(self, acc: dict) -> None:
        self.acc = {k: float(v) for k, v in dict(acc or {}).items()}

    def begin(self, resumed: bool) -> None:
        """A new epoch, or (``resumed``) the rest of one whose partial sums :attr:`acc` holds."""
        if not resumed:
            self.acc = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
        self.t0, self.seen = time.time(), 0
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        if resumed:
            # carry on the float32 running sums from where they stopped (adding the flushed partial
            # sums as doubles rounds differently: train_loss would differ in the last bits)
            self.loss += self.acc["loss"]
            self.correct += self.acc["correct"]
            self.acc["loss"] = self.acc["correct"] = 0.0

    def record(self) -> dict:
        """The epoch's history entries (after the last :meth:`flush`)."""
        acc = self.acc
        return {"train_loss": acc["loss"] / max(acc["seen"], 1),
                "train_robust_acc": 100.0 * acc["correct"] / max(acc["seen"], 1), "train_time_s": acc["time"]}

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach() * y.shape[0]
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += y.shape[0]

    def flush(self) -> None:
        """Fold the device sums into :attr:`acc` (before a checkpoint, at the end of the epoch)."""
        seen = self.reduce(self.loss, self.correct, self.seen, self.acc)  # [DDP] sums over all ranks
        acc = self.acc
        acc["loss"] += float(self.loss)
        acc["correct"] += float(self.correct)
        acc["seen"] += seen
        acc["time"] += time.time() - self.t0
        self.loss.zero_()
        self.correct.zero_()
        self.seen, self.t0 = 0, time.time()
