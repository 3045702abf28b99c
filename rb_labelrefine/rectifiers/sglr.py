"""SGLR -- Self-Guided Label Refinement (Li, Yu et al., "Soften to Defend").

The model softens its own labels: a per-sample memory S [N, C] of soft labels, updated with an
exponential moving average of the model's predictions (paper Eq. 8), so each sample needs its
dataset index.  Two behaviours, switchable with ``variant``:

``"paper"`` (default) -- Eq. 6-8 as the paper's prose and Table 4 describe them:
    q_i  = c * softmax_T(f(x_i)) + (1 - c) * softmax_T(f(x'_i))      clean/adversarial knowledge (Eq. 7)
    p_i  = (1 - alpha) * onehot(y_i) + alpha * q_i                    self-guided soft label   (Eq. 6)
    S_i <- m * S_i + (1 - m) * p_i                                   historical average       (Eq. 8)
    best alpha = 0.2, T = 1.5 (Table 4); m = 0.9, c = 0.2 from the public code.

``"code"`` -- the public implementation (called SGLS there): plain hard-label PGD-AT until
epoch ``start_epoch`` (90 of 200 in the CIFAR scripts), then
    S_i <- m * S_i + (1 - m) * (0.2 * softmax f(x_i) + 0.8 * softmax f(x'_i))   (T = 1, no one-hot mix)

In both, S starts as onehot(y), the attack uses the hard label, and the loss is
``-sum_c S_i,c log softmax f(x'_i)_c`` with the freshly updated S_i.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Rectifier, Target

__all__ = ["SGLR"]


class SGLR(Rectifier):
    name = "sglr"
    needs_index = True

    def __init__(self, model: nn.Module, num_classes: int, num_samples: int, *, variant: str = "paper",
                 alpha: float = 0.2, temperature: float = 1.5, momentum: float = 0.9,
                 clean_weight: float = 0.2, start_epoch: int = 0):
        super().__init__(num_classes)
        if variant not in ("paper", "code"):
            raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
        for name, v in (("alpha", alpha), ("momentum", momentum), ("clean_weight", clean_weight)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.model = model
        self.variant = variant
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.momentum, self.clean_weight = float(momentum), float(clean_weight)
        self.start_epoch = int(start_epoch)
        self.num_samples = int(num_samples)
        # memory: soft labels; `seen` marks rows initialised to onehot(y)
        self.memory = torch.zeros(num_samples, num_classes)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)
        self._pending = None

    @property
    def active(self) -> bool:
        return self.epoch >= self.start_epoch

    def targets(self, x, y, *, index=None) -> Target:
        self._check_labels(y)
        if index is None:
            raise ValueError("SGLR keeps a per-sample memory: pass each sample's dataset index "
                             "(wrap the dataset in rb_labelrefine.data.IndexedDataset)")
        # range check on the index as given (the loader's CPU tensor): no host-device sync
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(f"sample index out of range [0, {self.num_samples}): "
                             f"min {int(index.min())}, max {int(index.max())}")
        index = index.to(self.memory.device, non_blocking=True).long()
        if not self.active:
            return Target(y)  # hard-label AT before the start epoch
        return Target(y, for_attack=y, resolver=lambda nat, adv: self._update(x, y, index, nat, adv))

    @torch.no_grad()
    def _update(self, x, y, index, logits_nat: Optional[torch.Tensor], logits_adv: Optional[torch.Tensor]):
        if logits_nat is None:
            logits_nat = self.model(x)
        if logits_adv is None:
            raise ValueError("SGLR needs the adversarial logits to refine its labels")
        T = self.temperature if self.variant == "paper" else 1.0
        q = (self.clean_weight * F.softmax(logits_nat.float() / T, dim=1)
             + (1.0 - self.clean_weight) * F.softmax(logits_adv.float() / T, dim=1))    # Eq. 7
        onehot = F.one_hot(y.long(), self.num_classes).float().to(q.device)
        if self.variant == "paper":
            new = (1.0 - self.alpha) * onehot + self.alpha * q                         # Eq. 6
        else:
            new = q
        mem = self.memory[index].to(q.device)
        fresh = ~self.seen[index].to(q.device)
        mem = torch.where(fresh[:, None], onehot, mem)                                 # S_0 = onehot
        mem = self.momentum * mem + (1.0 - self.momentum) * new                        # Eq. 8
        self.memory[index] = mem.to(self.memory.device)
        self.seen[index] = True
        self._pending = (index, mem)  # the rows this rank updated (distributed: see synchronize)
        return mem

    @torch.no_grad()
    def synchronize(self, all_gather) -> None:
        """DDP: write every rank's freshly updated rows into every rank's memory (the ranks' samples
        of one step are disjoint slices of one global batch, so the writes never collide)."""
        if not self.active:
            return
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("SGLR.synchronize: this step never computed its soft labels (the objective did not "
                               "ask the target for its distribution)")
        index = all_gather(pending[0].long()).to(self.memory.device)
        rows = all_gather(pending[1].float()).to(self.memory.device)
        self.memory[index] = rows
        self.seen[index] = True

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(memory=self.memory.clone(), seen=self.seen.clone())
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state["memory"].shape != self.memory.shape:
            raise ValueError(f"SGLR memory shape {tuple(state['memory'].shape)} does not match "
                             f"{tuple(self.memory.shape)} (a different data set or number of classes?)")
        self.memory.copy_(state["memory"])
        self.seen.copy_(state["seen"])

    def to(self, device):
        self.memory = self.memory.to(device)
        self.seen = self.seen.to(device)
        return self

    def extra_repr(self):
        return (f"variant={self.variant!r}, alpha={self.alpha}, T={self.temperature}, m={self.momentum}, "
                f"clean_weight={self.clean_weight}, start_epoch={self.start_epoch}")
