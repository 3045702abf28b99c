"""The rectifier contract.

A rectifier answers one question per batch: *what distribution should this batch be trained
(and attacked) towards?*  It may also keep state across steps (an EMA teacher, a per-sample
memory, frozen teachers), which it updates in :meth:`Rectifier.after_step` /
:meth:`Rectifier.end_epoch` and serialises with ``state_dict``/``load_state_dict``.

In a user's own torchattacks loop (the same lines for every method)::

    rect.to(device)                               # once, after the model is on its device
    for epoch in range(epochs):
        for x, y, idx in loader:                  # idx: dataset indices (IndexedDataset)
            target = rect.targets(x, y, index=idx)        # before the attack
            x_adv = atk(x, target.for_attack)             # labels or a [B, C] distribution
            loss = target.loss(model(x_adv), x_adv)       # soft CE (+ KD terms)
            opt.zero_grad(); loss.backward(); opt.step()
            rect.after_step(model)                        # EMA teacher, memory write, step counter
        rect.end_epoch(model)                             # epoch counter (SGLR's start epoch)

``x`` is what the model sees: models take [0, 1] inputs with any normalisation inside them, and
the rectifier's teachers are fed the same ``x``.  ``index`` is accepted by every rectifier and
used by those with per-sample state (``needs_index``).  A step abandoned before
``after_step`` (e.g. a non-finite loss) leaves the rectifier's state as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..fast import teacher_forward
from ..losses import kd_loss, soft_cross_entropy

__all__ = ["Rectifier", "Target", "KDTerm"]


@dataclass
class KDTerm:
    """``weight * KD_T(student(inputs), teacher(inputs))`` with a frozen teacher."""
    weight: float
    teacher: nn.Module
    temperature: float


class Target:
    """The training target of one batch.

    ``labels``     hard labels [B] (always kept: metrics, attacks that need them).
    ``for_attack`` what the attack maximises the loss against: labels or a [B, C] distribution.
    ``loss(logits, inputs)`` the soft cross-entropy (weight ``ce_weight``) against the batch's
    distribution plus any KD terms evaluated on ``inputs`` (the images the logits came from).

    A distribution that depends on the model's own predictions on x and x' (SGLR) is computed
    lazily by ``resolver(logits_nat, logits_adv)`` the first time it is needed, and cached, so a
    second call (AWP's proxy pass, then the real pass) sees the same target.
    """

    def __init__(self, labels: torch.Tensor, dist: Optional[torch.Tensor] = None, *,
                 for_attack: Optional[torch.Tensor] = None, ce_weight: float = 1.0,
                 kd_terms: Sequence[KDTerm] = (),
                 resolver: Optional[Callable[[Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]] = None):
        self.labels = labels
        self._dist = None if dist is None else dist.detach()
        self.for_attack = for_attack if for_attack is not None else (self._dist if self._dist is not None else labels)
        self.ce_weight = ce_weight
        self.kd_terms = list(kd_terms)
        self._resolver = resolver
        self._x_adv: Optional[torch.Tensor] = None

    def distribution(self, logits_nat: Optional[torch.Tensor] = None,
                     logits_adv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The CE target: a [B, C] distribution, or the hard labels [B] when it is one-hot."""
        if self._dist is None and self._resolver is not None:
            nat = None if logits_nat is None else logits_nat.detach()
            adv = None if logits_adv is None else logits_adv.detach()
            self._dist = self._resolver(nat, adv).detach()
            self._resolver = None
        return self._dist if self._dist is not None else self.labels

    def loss(self, logits: torch.Tensor, inputs: Optional[torch.Tensor] = None, *,
             logits_nat: Optional[torch.Tensor] = None, logits_adv: Optional[torch.Tensor] = None,
             reduction: str = "mean") -> torch.Tensor:
        """The loss on ``logits`` = model(``inputs``).  ``logits_nat`` / ``logits_adv`` are the
        clean / adversarial logits a model-dependent target refines itself from; by default
        ``logits`` are the adversarial ones (PGD-AT form: ``target.loss(model(x_adv), x_adv)``)
        and the clean ones are computed when needed."""
        total = logits.new_zeros(()) if reduction == "mean" else logits.new_zeros(logits.shape[0])
        if self.ce_weight:
            adv = logits if logits_adv is None else logits_adv
            total = total + self.ce_weight * soft_cross_entropy(
                logits, self.distribution(logits_nat, adv), reduction=reduction)
        if self.kd_terms:
            if inputs is None:
                raise ValueError("this target has KD terms: pass the inputs the logits were computed on")
            for term in self.kd_terms:
                t_logits = teacher_forward(term.teacher, inputs)  # inference mode, a normal tensor
                total = total + term.weight * kd_loss(logits, t_logits, term.temperature, reduction=reduction)
        return total


class Rectifier:
    """Base class: one-hot targets, no state.  Subclasses override :meth:`targets`."""

    name = "onehot"
    #: True if :meth:`targets` needs each sample's dataset index (per-sample memory).
    needs_index = False

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.step = 0
        self.epoch = 0

    # -- per batch ---------------------------------------------------------------------------
    def targets(self, x: torch.Tensor, y: torch.Tensor, *, index: Optional[torch.Tensor] = None) -> Target:
        return Target(y)

    # -- hooks -------------------------------------------------------------------------------
    def after_step(self, model: nn.Module) -> None:
        """Call after every optimizer step."""
        self.step += 1

    def end_epoch(self, model: nn.Module) -> None:
        """Call at the end of every epoch."""
        self.epoch += 1

    #: validation images (x, y) this rectifier wants at the end of every epoch (0: none)
    validation_points = 0

    def fit_validation(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict:
        """End of epoch ``epoch`` (0-based): fit what the rectifier tunes on the first
        ``validation_points`` validation images (ADR ``schedule: auto``); returns the values to log
        in the epoch's history record."""
        return {}

    def synchronize(self, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Distributed data parallel: after each step, make per-sample state identical on every
        rank.  ``all_gather(t)`` concatenates ``t`` -- one row per sample of this rank's batch of the
        step -- from all ranks (rank order, i.e. the order of the global batch) and is a collective:
        every rank calls it the same number of times.  State that only follows the weights (EMA
        teachers) or is frozen needs nothing: the default does nothing."""

    # -- modules -----------------------------------------------------------------------------
    def modules(self) -> list:
        """The modules (``nn.Module``) this rectifier holds and runs -- EMA and frozen teachers, not the
        student it is given.  The trainer puts them in ``channels_last`` with the student and, under
        torchrun, broadcasts their weights from rank 0; a rectifier that holds a teacher lists it here
        (however it stores it: an attribute, a list, a dict).  The default: none."""
        return []

    def effective_decays(self) -> dict:
        """The per-step decays of the weight averages this rectifier keeps (e.g. an EMA teacher), by
        name, as the run used them (rescaled to its steps per epoch): the summary's
        ``effective_decays`` reports them beside WA's.  The default: none."""
        return {}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])

    def to(self, device) -> "Rectifier":
        """Move the rectifier's tensors and teachers to ``device`` (returns ``self``)."""
        return self

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def _check_labels(self, y: torch.Tensor) -> None:
        if y.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
