"""SGLR -- Self-Guided Label Refinement (Li, Yu et al., "Soften to Defend", CVPR 2024).

The model softens its own labels: a per-sample memory S [N, C] of soft labels, updated with an
exponential moving average of the model's predictions (paper Eq. 8), so each sample needs its
dataset index.  Two behaviours, switchable with ``variant``:

``"paper"`` (default) -- Eq. 6-8 as the paper's prose and Table 4 describe them:
    q_i  = c * softmax_T(f(x_i)) + (1 - c) * softmax_T(f(x'_i))      clean/adversarial knowledge (Eq. 7)
    p_i  = (1 - alpha) * onehot(y_i) + alpha * q_i                    self-guided soft label   (Eq. 6)
    S_i <- m * S_i + (1 - m) * p_i                                   historical average       (Eq. 8)
    best alpha = 0.2, T = 1.5 (Table 4); m = 0.9, c = 0.2 from the public code.

``"code"`` -- the public implementation (github.com/devicerxx/SGLS, class ``SGLS`` in
``losses/loss.py``): plain hard-label PGD-AT before the start epoch ``es``, then
    S_i <- m * S_i + (1 - m) * (0.2 * softmax f(x_i) + 0.8 * softmax f(x'_i))   (T = 1, no one-hot mix)

In both, S starts as onehot(y), the attack uses the hard label, and the loss is
``-sum_c S_i,c log softmax f(x'_i)_c`` with the freshly updated S_i.

Start epoch, counted as the public code counts it: its epochs run 1..E and soft labels are used
when ``epoch >= es``; here epochs are 0-based (``e``), so soft labels are used when
``e + 1 >= start_epoch`` -- ``start_epoch = 90`` uses hard labels for the first 89 epochs, and 0
(or 1) means from the start.  Defaults: 0 for the paper form; 90 for the code form, the value of
the public CIFAR scripts (``scripts/*/run_sgls.sh``: ``ES=90``) and of the ``SGLS`` class's own
default.  (``main_adv.py``'s argument parser defaults ``--sgls-es`` to 0, and the scripts pass
the misspelt ``--sat-es`` / ``--sat-alpha``, flags that parser does not define -- argparse rejects
them, so the scripts run only once the flags are corrected to ``--sgls-es 90``.)

The memory rows of a step are computed with the target (and cached, so AWP's proxy pass and the
real pass see one target) but written in :meth:`SGLR.after_step`: a step that is abandoned before
its update (a non-finite loss) leaves the memory as it was.

Config: ``method: {name: sglr, variant: paper, alpha: 0.2, temperature: 1.5, momentum: 0.9,
clean_weight: 0.2, start_epoch: null}`` (null: the variant's default, filled in when the config
is loaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Rectifier, Target
from .registry import BuildContext, MethodSettings, register_method

__all__ = ["SGLR", "SGLRSettings", "DEFAULT_START_EPOCH"]

VARIANTS = ("paper", "code")
#: start epoch (1-based, ``epoch >= es``) when none is given
DEFAULT_START_EPOCH = {"paper": 0, "code": 90}


class SGLR(Rectifier):
    name = "sglr"
    needs_index = True

    def __init__(self, model: nn.Module, num_classes: int, num_samples: int, *, variant: str = "paper",
                 alpha: float = 0.2, temperature: float = 1.5, momentum: float = 0.9,
                 clean_weight: float = 0.2, start_epoch: Optional[int] = None):
        super().__init__(num_classes)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
        for name, v in (("alpha", alpha), ("momentum", momentum), ("clean_weight", clean_weight)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if start_epoch is None:
            start_epoch = DEFAULT_START_EPOCH[variant]
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.model = model
        self.variant = variant
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.momentum, self.clean_weight = float(momentum), float(clean_weight)
        self.start_epoch = int(start_epoch)
        self.num_samples = int(num_samples)
        # memory: soft labels; `seen` marks rows initialised to onehot(y)
        self.memory = torch.zeros(num_samples, num_classes)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)
        self._pending = None  # (index, rows) of this step, written by after_step / synchronize

    @property
    def active(self) -> bool:
        """Soft labels this epoch: the public code's ``epoch >= es`` with 1-based epochs."""
        return self.epoch + 1 >= self.start_epoch

    def targets(self, x, y, *, index=None) -> Target:
        self._check_labels(y)
        if index is None:
            raise ValueError("SGLR keeps a per-sample memory: pass each sample's dataset index "
                             "(wrap the dataset in rb_labelrefine.data.IndexedDataset)")
        # range check on the index as given (the loader's CPU tensor): no host-device sync
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(f"sample index out of range [0, {self.num_samples}): "
                             f"min {int(index.min())}, max {int(index.max())}")
        self._pending = None  # rows of a step that never reached after_step are dropped
        index = index.to(self.memory.device, non_blocking=True).long()
        if not self.active:
            return Target(y)  # hard-label AT before the start epoch
        return Target(y, for_attack=y, resolver=lambda nat, adv: self._refine(x, y, index, nat, adv))

    @torch.no_grad()
    def _refine(self, x, y, index, logits_nat: Optional[torch.Tensor], logits_adv: Optional[torch.Tensor]):
        if logits_nat is None:
            logits_nat = self.model(x)  # the code's clean pass, in the model's current (train) mode
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
        self._pending = (index, mem)
        return mem

    @torch.no_grad()
    def _write(self, index, rows) -> None:
        self.memory[index] = rows.to(self.memory.device, self.memory.dtype)
        self.seen[index] = True

    def after_step(self, model: nn.Module) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._write(*pending)
        super().after_step(model)

    @torch.no_grad()
    def synchronize(self, all_gather) -> None:
        """DDP: write every rank's rows of this step into every rank's memory (the ranks' samples
        of one step are disjoint slices of one global batch, so the writes never collide).  Runs
        before :meth:`after_step`, which then has nothing left to write."""
        if not self.active:
            return
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("SGLR.synchronize: this step never computed its soft labels (the objective did not "
                               "ask the target for its distribution)")
        self._write(all_gather(pending[0].long()).to(self.memory.device), all_gather(pending[1].float()))

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
        self._pending = None

    def to(self, device):
        self.memory = self.memory.to(device)
        self.seen = self.seen.to(device)
        return self

    def extra_repr(self):
        return (f"variant={self.variant!r}, alpha={self.alpha}, T={self.temperature}, m={self.momentum}, "
                f"clean_weight={self.clean_weight}, start_epoch={self.start_epoch}")


@dataclass
class SGLRSettings(MethodSettings):
    variant: str = "paper"          # paper (Eq. 6-8) | code (the public SGLS implementation)
    alpha: float = 0.2              # paper Table 4: weight of the model's own distribution (Eq. 6)
    temperature: float = 1.5        # paper Table 4: T of Eq. 7 (the code form uses T = 1)
    momentum: float = 0.9           # m of the per-sample memory EMA (Eq. 8)
    clean_weight: float = 0.2       # c: weight of softmax f(x) vs f(x') (Eq. 7)
    start_epoch: Optional[int] = None   # soft labels when the 1-based epoch >= start_epoch; null: paper 0, code 90

    def validate(self) -> None:
        self._choice("variant", VARIANTS)
        self._unit("alpha", "momentum", "clean_weight")
        self._positive("temperature")
        if self.start_epoch is None:
            self.start_epoch = DEFAULT_START_EPOCH[self.variant]
        self._check(self.start_epoch >= 0, "start_epoch", f"must be >= 0, got {self.start_epoch}")


_BIBTEX = """@inproceedings{li2024soften,
  title     = {Soften to Defend: Towards Adversarial Robustness via Self-Guided Label Refinement},
  author    = {Li and Yu and others},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""  # author list abbreviated to the two surnames we can vouch for: check the proceedings


@register_method(
    "sglr", settings=SGLRSettings, label="SGLR", bibtex=_BIBTEX,
    title="Soften to Defend: Towards Adversarial Robustness via Self-Guided Label Refinement",
    summary=("Self-Guided Label Refinement: the one-hot label is softened with the model's own predictive "
             "distribution (interpolating clean and adversarial predictions) and kept as a per-sample "
             "exponential moving average over training."))
def build_sglr(s: SGLRSettings, ctx: BuildContext) -> SGLR:
    return SGLR(ctx.model, ctx.num_classes, ctx.num_samples, variant=s.variant, alpha=s.alpha,
                temperature=s.temperature, momentum=s.momentum, clean_weight=s.clean_weight,
                start_epoch=s.start_epoch)
