"""Fast paths of the training step: AMP, channels_last, ``torch.compile``, sync-free checks.

The numeric pieces live here (rectifiers use :func:`teacher_forward`); the trainer's
:class:`~rb_labelrefine.training.step.StepRuntime` puts them together, and routes the few places of
``Trainer.train_step`` that differ between the plain and the fast paths through them:

* ``train.channels_last``: the model (and the rectifier's teachers, ``Rectifier.modules()``) use
  ``torch.channels_last``.  The batch
  itself stays NCHW: a convolution whose weight is channels_last produces channels_last outputs
  anyway, and torchattacks draws its random start with ``empty_like(x).uniform_()`` *in memory
  order* -- a channels_last x would permute the noise and change the run.  So the option changes
  the speed, not the numbers (up to float re-association).
* ``train.amp`` (``bf16`` | ``fp16``): ``torch.autocast`` around the step's forward passes (the
  attack, the teachers, the losses' forwards); the student's logits are cast back to float32 before
  any loss (:class:`FloatLogits`), so the attack's cross entropy and the training losses run in
  float32 on every device (CPU autocast would otherwise run ``log_softmax`` in bf16).  ``fp16`` uses
  a ``torch.amp.GradScaler`` (CUDA, and CPU where torch supports it).
* ``train.compile``: ``torch.compile`` of the student for the attack and the training forward
  (the averaged copies, teachers and AWP's proxy stay eager; parameters are shared, so the
  checkpoint keys do not change).
* the non-finite-loss check: on the CPU it stays per step (``bool(isfinite)`` is free there) with
  the trainer's exact semantics; on accelerators a per-step ``bool`` would be a host-device sync, so
  a device-side flag (with the first bad step and its value) is read every ``check_every`` steps
  (``train.log_every``) and at the last step of every epoch -- :class:`NonFiniteGuard`.
* distributed data parallel (:mod:`rb_labelrefine.training.distributed`): the training forward goes
  through DDP, the attack through the unwrapped module, and the step's collectives (buffers, per-
  sample state, the stop-signal agreement, the non-finite flag) are issued by ``StepRuntime``.

Teachers run under ``torch.inference_mode`` (:func:`teacher_forward`); the result is cloned into a
normal tensor because inference tensors cannot be saved for backward (KD's targets are).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ["AMP_DTYPES", "teacher_forward", "autocast", "FloatLogits", "make_grad_scaler", "NonFinite",
           "NonFiniteGuard", "compile_module"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_forward(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a frozen / averaged teacher: no autograd bookkeeping at all (inference mode).

    The clone makes the result a normal tensor, so it may enter autograd as a constant (KD's
    targets are saved for the student's backward; inference tensors cannot be)."""
    with torch.inference_mode():
        out = teacher(x)
    return out.clone()


def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in (bf16, fp16), a no-op context for ``None``."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


class FloatLogits(nn.Module):
    """``module(x).float()``: under autocast, the losses see float32 logits.  A transparent
    wrapper (``train()``/``eval()``/``named_modules`` reach the wrapped module)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def make_grad_scaler(device: torch.device, amp: Optional[str]):
    """A ``GradScaler`` for fp16 (None otherwise, or where torch has none for this device)."""
    if amp != "fp16":
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, AttributeError, TypeError):  # pragma: no cover - depends on the torch build
        return None


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``; the backend can be chosen with the environment variable
    ``RB_LABELREFINE_COMPILE_BACKEND`` (default: torch's, inductor -- which needs a C++ compiler on
    the CPU; ``aot_eager`` traces the same graphs without code generation, for tests)."""
    backend = os.environ.get("RB_LABELREFINE_COMPILE_BACKEND")
    return torch.compile(module, backend=backend) if backend else torch.compile(module)


@dataclass
class NonFinite:
    """A non-finite training loss: its value (as text), the global step (0-based) it happened at,
    and a note for the message (empty on the per-step path)."""
    value: str
    step: int
    note: str = ""


class NonFiniteGuard:
    """Is the training loss finite?  Per step on the CPU, sync-free on accelerators.

    ``per_step=True``: ``bool(torch.isfinite(loss))`` after every forward -- free on the CPU, where
    the trainer can then restore the state before the step exactly.  ``per_step=False``: each step
    only updates device tensors (a flag, the first bad step, its loss); the host reads them every
    ``check_every`` steps, at the last step of an epoch and when asked (``force``), so the step
    issues no host-device synchronisation.  ``any_rank`` (distributed) makes all ranks agree.
    """

    def __init__(self, per_step: bool, check_every: int = 50, any_rank: Optional[Callable] = None):
        self.per_step = bool(per_step)
        self.check_every = max(int(check_every), 1)
        self.any_rank = any_rank
        self._bad = self._first = self._value = None

    def __call__(self, loss: torch.Tensor, step: int, steps_per_epoch: int, force: bool = False) -> Optional[NonFinite]:
        loss = loss.detach()
        if self.per_step:
            bad = not bool(torch.isfinite(loss))
            note = ""
            if self.any_rank is not None:
                any_bad = self.any_rank(bad)
                if any_bad and not bad:
                    note = " (on another rank)"
                bad = any_bad
            return NonFinite(_fmt(loss), step, note) if bad else None
        # accelerators: device-side bookkeeping, no host sync
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.bool, device=loss.device)
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._value = torch.zeros((), dtype=torch.float32, device=loss.device)
        newly = ~torch.isfinite(loss) & ~self._bad
        self._first.masked_fill_(newly, step)
        self._value = torch.where(newly, loss.float(), self._value)
        self._bad |= newly
        last_of_epoch = steps_per_epoch > 0 and (step + 1) % steps_per_epoch == 0
        if not (force or last_of_epoch or (step + 1) % self.check_every == 0):
            return None
        return self.check(step)

    def check(self, step: int) -> Optional[NonFinite]:
        """Read the device-side flag (one sync): the first non-finite step since training began."""
        if self._bad is None:
            return None
        local_bad = bool(self._bad)
        bad = self.any_rank(local_bad) if self.any_rank is not None else local_bad
        if not bad:
            return None
        first = int(self._first) if local_bad else step
        value = _fmt(self._value) if local_bad else "non-finite on another rank"
        return NonFinite(value, first, f" (found at step {step + 1}: on accelerators the loss is checked "
                                       f"every {self.check_every} steps without a host sync)")


def _fmt(loss: torch.Tensor) -> str:
    return str(loss.float().item())

