"""Weight-space companions: EMA / weight averaging (WA), SWA and AWP.

* :class:`EMA` -- ``theta_t <- gamma * theta_t + (1 - gamma) * theta_s`` after every optimizer
  step (ADR Sec. 4.2; timm's ModelEmaV2 semantics: parameters *and* floating buffers, so the
  averaged BatchNorm statistics come along; integer buffers are copied).
* :class:`SWA` -- the running mean of one snapshot per epoch from ``start_epoch`` on, BatchNorm
  statistics recomputed on training data before it is evaluated (Chen et al. 2021, Sec. 4.2).
* :class:`AWP` -- adversarial weight perturbation (Wu et al. 2020): before the update, move each
  layer's weight by ``gamma * ||w_l||`` in the ascent direction of the adversarial loss, take the
  gradient there, restore the weights exactly, step.
* :class:`SAMAWP` -- the ADR code's AWP (``util/awp.py``, SAM-style): every parameter with a
  gradient moves by ``rho * ||p|| * g / ||g||``, the gradient at the moved weights is applied to
  the restored ones.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["EMA", "SWA", "AWP", "SAMAWP", "build_awp", "scale_decay", "bn_update", "frozen_bn_stats",
           "upgrade_legacy_state", "GowalEMA"]


def scale_decay(decay: float, steps_per_epoch: int, reference_steps_per_epoch: Optional[int]) -> float:
    """Keep an EMA's horizon the same number of *epochs* when the number of steps per epoch
    changes: ``decay ** (reference / steps_per_epoch)``.  With CIFAR's 391 steps/epoch as the
    reference, 0.995 (about half an epoch) becomes 0.995**(391/4) = 0.61 at 4 steps/epoch."""
    if reference_steps_per_epoch is None or steps_per_epoch == reference_steps_per_epoch:
        return float(decay)
    return float(decay) ** (float(reference_steps_per_epoch) / float(steps_per_epoch))


def _float_tensors(module: nn.Module):
    """Parameters and floating-point buffers, in a fixed order."""
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]


def _int_buffers(module: nn.Module):
    return [b for b in module.buffers() if not b.is_floating_point()]


class EMA(nn.Module):
    """Exponential moving average of a model's weights (the ADR teacher; WA when evaluated).

    ``warmup_steps``: before this many updates the average is reset to the raw weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._count = 0  # host copy of num_updates: the warm-up test needs no device sync
        self._pairs = None

    def _refresh(self, model):
        ema_t, src_t = _float_tensors(self.module), _float_tensors(model)
        if len(ema_t) != len(src_t):
            raise ValueError("EMA: the model's parameters do not match the averaged copy")
        self._pairs = (ema_t, src_t, _int_buffers(self.module), _int_buffers(model), model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None or self._pairs[4] is not model:
            self._refresh(model)
        ema_t, src_t, ema_i, src_i, _ = self._pairs
        self.num_updates += 1
        self._count += 1
        if self._count <= self.warmup_steps:
            torch._foreach_copy_(ema_t, src_t)
        else:
            # theta_t <- gamma theta_t + (1 - gamma) theta_s  ==  lerp(theta_t, theta_s, 1 - gamma)
            torch._foreach_lerp_(ema_t, src_t, 1.0 - self.decay)
        if ema_i:
            torch._foreach_copy_(ema_i, src_i)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # nn.Module's state_dict contract (prefix, destination, keep_vars: a parent that holds an EMA
    # saves it under its own prefix, as timm's ModelEmaV3): the averaged weights as ``module.*``,
    # the count as the ``num_updates`` buffer, the settings as extra state.
    def get_extra_state(self) -> dict:
        return {"decay": self.decay, "warmup_steps": self.warmup_steps}

    def set_extra_state(self, state) -> None:
        decay = _extra_field(state, "decay", float, "EMA")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA extra state: decay must be in [0, 1), got {decay}")
        self.decay = decay
        if "warmup_steps" in state:   # (absent in the layout written before this one)
            self.warmup_steps = _extra_field(state, "warmup_steps", int, "EMA")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.num_updates)   # the host copy follows the restored count
        self._pairs = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes the layout rb_labelrefine wrote before this one (see :func:`upgrade_legacy_state`)."""
        return super().load_state_dict(upgrade_legacy_state(state_dict), strict=strict, assign=assign)


def _extra_field(state, key: str, kind, owner: str):
    """``state[key]`` of an averager's extra state, checked to be a number of ``kind``."""
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"{owner} extra state has no {key!r}")
    v = state[key]
    if torch.is_tensor(v) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise ValueError(f"{owner} extra state: {key!r} is {v!r}, not {'an integer' if kind is int else 'a number'}")
    return kind(v)


# keys of the state dicts EMA / SWA returned before they kept nn.Module's contract
_LEGACY_KEYS = {"num_updates": {"module", "num_updates", "decay"},
                "n_averaged": {"module", "n_averaged", "start_epoch", "bn_stale"}}


def upgrade_legacy_state(state):
    """An :class:`EMA` / :class:`SWA` state dict in the layout written before they kept
    ``nn.Module``'s contract (``{"module": {...}, "num_updates": t, "decay": d}``, and for SWA
    ``{"module": {...}, "n_averaged": t, "start_epoch": e, "bn_stale": b}``) in today's layout
    (``module.*``, the count buffer, ``_extra_state``); any other object is returned as it is.
    Inside a dict (a rectifier's state, a whole checkpoint part) such states are upgraded where
    they are found, so an old checkpoint resumes."""
    if not isinstance(state, dict):
        return state
    count = next((c for c, keys in _LEGACY_KEYS.items() if c in state and set(state) <= keys), None)
    if count is not None and isinstance(state.get("module"), dict):
        inner = state["module"]
        new = OrderedDict((f"module.{k}", v) for k, v in inner.items())
        new[count] = state[count]
        new["_extra_state"] = {k: state[k] for k in ("decay", "start_epoch", "bn_stale") if k in state}
        if getattr(inner, "_metadata", None) is not None:   # (module versions, e.g. BatchNorm's)
            new._metadata = OrderedDict((f"module.{k}" if k else "module", v) for k, v in inner._metadata.items())
        return new
    upgraded = {k: upgrade_legacy_state(v) for k, v in state.items()}
    if all(upgraded[k] is state[k] for k in state):
        return state   # nothing old inside: the very same object
    return upgraded


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def bn_update(loader: Iterable, model: nn.Module, device=None, max_batches: Optional[int] = None,
              form: str = "equal") -> None:
    """Recompute BatchNorm running statistics over ``loader`` (which may yield ``(x, y, index)``).

    ``form="equal"``: a cumulative average, every batch weighing the same (what
    ``torch.optim.swa_utils.update_bn`` does); all BN buffers are reset first.
    ``form="code"``: the KD+SWA code's ``utils.bn_update``: running mean 0 / variance 1, then
    momentum ``b / (n + b)`` for a batch of ``b`` after ``n`` samples -- a mean weighted by batch
    size (``num_batches_tracked`` is not reset there, and not here).
    """
    if form not in ("equal", "code"):
        raise ValueError(f"form must be 'equal' or 'code', got {form!r}")
    bns = _batchnorms(model)
    if not bns:
        return
    momenta = {}
    for m in bns:
        if form == "equal":
            m.reset_running_stats()
        else:
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
        momenta[m] = m.momentum
        m.momentum = None  # cumulative moving average (form "code" sets it per batch)
    was_training = model.training
    model.train()
    n = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if device is not None:
            x = x.to(device)
        if form == "code":
            b = x.shape[0]
            for m in bns:
                m.momentum = b / (n + b)
            n += b
        model(x)
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm momentum 0 inside the block: train-mode forwards use batch statistics but leave
    the running statistics as they are (the ADR code's ``disable_running_stats`` around its
    second AWP pass; ``num_batches_tracked`` still counts, as there)."""
    bns = _batchnorms(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


class SWA(nn.Module):
    """Stochastic weight averaging (Izmailov et al. 2018) as used by Chen et al. 2021:
    one snapshot per epoch from ``start_epoch`` on, ``avg <- avg + (w - avg) / (n + 1)``."""

    def __init__(self, model: nn.Module, start_epoch: int):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.start_epoch = int(start_epoch)
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))
        self.bn_stale = True

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        """Call with the 0-based index of the epoch that just finished; returns True if a
        snapshot was taken."""
        if epoch < self.start_epoch:
            return False
        params_avg = [p for p in self.module.parameters()]
        params_src = [p.detach() for p in model.parameters()]
        n = int(self.n_averaged)
        if n == 0:
            torch._foreach_copy_(params_avg, params_src)
        else:
            torch._foreach_lerp_(params_avg, params_src, 1.0 / (n + 1))
        self.n_averaged += 1
        self.bn_stale = True
        return True

    @property
    def active(self) -> bool:
        return int(self.n_averaged) > 0

    def update_bn(self, loader, device=None, max_batches=None, form: str = "equal"):
        bn_update(loader, self.module, device=device, max_batches=max_batches, form=form)
        self.module.eval()
        self.bn_stale = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # nn.Module's state_dict contract, as :class:`EMA`: ``module.*``, the ``n_averaged`` buffer,
    # and the settings as extra state
    def get_extra_state(self) -> dict:
        return {"start_epoch": self.start_epoch, "bn_stale": self.bn_stale}

    def set_extra_state(self, state) -> None:
        self.start_epoch = _extra_field(state, "start_epoch", int, "SWA")
        self.bn_stale = bool(state.get("bn_stale", True))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes the layout rb_labelrefine wrote before this one (see :func:`upgrade_legacy_state`)."""
        return super().load_state_dict(upgrade_legacy_state(state_dict), strict=strict, assign=assign)


class AWP:
    """Adversarial weight perturbation (Wu, Xia, Wang 2020), the public code's form:

    1. copy the model into a proxy; take one SGD step of size ``proxy_lr`` on the proxy that
       *increases* the adversarial loss (at the fixed x');
    2. per layer with a weight of rank >= 2: ``v_l = gamma * ||w_l|| * d_l / ||d_l||`` with
       ``d_l = w_proxy_l - w_l``;
    3. ``perturb``: w += v; the caller computes the loss and backward at w + v and steps;
       ``restore``: removes v (after ``optimizer.step()``, as the public code does).
    """

    variant = "wu2020"
    restores_before_step = False  # the update computed at w + v is applied at w + v, then v is removed
    freezes_bn_stats = False

    def __init__(self, model: nn.Module, gamma: float = 0.005, proxy_lr: float = 0.01):
        if gamma <= 0:
            raise ValueError(f"AWP gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.proxy_lr = float(proxy_lr)
        self.proxy = copy.deepcopy(model)
        self._names = [n for n, p in model.named_parameters() if p.dim() > 1]
        self._diff: Optional[list] = None
        #: optional ``grads -> grads`` applied to the proxy gradients (the trainer's distributed
        #: runtime averages them across ranks; under fp16 AMP it drops overflowed ones)
        self.grad_transform: Optional[Callable[[list], list]] = None

    @torch.no_grad()
    def _load_proxy(self, model):
        dst = list(self.proxy.parameters()) + list(self.proxy.buffers())
        src = list(model.parameters()) + list(model.buffers())
        if dst:
            torch._foreach_copy_(dst, src)  # one fused copy instead of a python loop

    def perturb(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """Compute and apply the perturbation. ``loss_fn(m)`` returns the adversarial loss of
        network ``m`` at the already-crafted adversarial examples (same target)."""
        if self._diff is not None:
            raise RuntimeError("AWP.perturb called twice without restore")
        self._load_proxy(model)
        self.proxy.train(model.training)
        params = dict(self.proxy.named_parameters())
        weights = [params[n] for n in self._names]
        loss = loss_fn(self.proxy)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        if self.grad_transform is not None:
            grads = self.grad_transform(list(grads))
        src = dict(model.named_parameters())
        diffs = []
        with torch.no_grad():
            for name, g in zip(self._names, grads):
                w = src[name]
                if g is None:
                    diffs.append(None)
                    continue
                # one ascent step of the proxy: d = w_proxy' - w = +proxy_lr * g
                d = self.proxy_lr * g
                v = self.gamma * w.norm() * d / (d.norm() + 1e-20)
                diffs.append(v)
            # keep exact copies: w + v - v is not bit-exact in floating point
            ws = [src[n] for n in self._names]
            self._backup = [w.detach().clone() for w in ws]
            moved = [(w, v) for w, v in zip(ws, diffs) if v is not None]
            if moved:
                torch._foreach_add_([w for w, _ in moved], [v for _, v in moved])
            self._perturbed = [w.detach().clone() for w in ws]
        self._diff = diffs
        self._model = model

    @torch.no_grad()
    def restore(self) -> None:
        """Remove the perturbation.  As in the public code this is called *after*
        ``optimizer.step()``: the update computed at w + v is kept, v is removed, i.e.
        ``w <- w_saved + (w_now - w_perturbed)`` -- bit-exact ``w_saved`` if no step was taken."""
        if self._diff is None:
            return
        src = dict(self._model.named_parameters())
        ws = [src[n] for n in self._names]
        if ws:
            # saved + (w - pert), fused over the layers (the same float operations as per layer)
            upd = torch._foreach_sub(ws, self._perturbed)
            torch._foreach_add_(upd, self._backup)
            torch._foreach_copy_(ws, upd)
        self._diff = self._backup = self._perturbed = None

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "proxy_lr": self.proxy_lr}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])
        self.proxy_lr = float(state["proxy_lr"])


class SAMAWP:
    """The ADR code's AWP (``src/util/awp.py`` with ``advTrainer.py``), a SAM-style step:

    1. ``perturb``: the training loss at w (a train-mode pass: BatchNorm running statistics are
       updated here, at the unperturbed weights), its gradient g; for *every* parameter with a
       gradient (biases and BatchNorm affine included), per parameter
       ``e = g * (rho * ||p|| / (||g|| + 1e-20))`` and ``p += e`` (``first_step``);
    2. the caller's training pass at w + e runs under :func:`frozen_bn_stats` (momentum 0, the
       code's ``disable_running_stats``) and backpropagates;
    3. ``restore`` *before* the optimizer step puts the saved w back exactly (``second_step``:
       ``p.data = old_p``), so the SGD step applies the gradient at w + e to w.

    In the ADR code this wraps plain SGD (momentum and weight decay, no Nesterov).
    """

    variant = "sam"
    restores_before_step = True
    freezes_bn_stats = True
    EPS = 1e-20

    def __init__(self, model: nn.Module, gamma: float = 0.005):
        if gamma <= 0:
            raise ValueError(f"AWP gamma (rho) must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self._saved: Optional[list] = None
        #: optional ``grads -> grads`` (the trainer's runtime: DDP averaging, fp16 overflow)
        self.grad_transform: Optional[Callable[[list], list]] = None

    def perturb(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """``loss_fn(model)``: the training loss at the current weights (same x', same target)."""
        if self._saved is not None:
            raise RuntimeError("AWP.perturb called twice without restore")
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss_fn(model), params, allow_unused=True)
        if self.grad_transform is not None:
            grads = self.grad_transform(list(grads))
        with torch.no_grad():
            moved = [(p, g) for p, g in zip(params, grads) if g is not None]
            self._saved = [(p, p.detach().clone()) for p, _ in moved]
            for p, g in moved:
                scale = self.gamma * p.norm() / (g.norm() + self.EPS)
                p.add_(g * scale)

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            return
        for p, old in self._saved:
            p.copy_(old)
        self._saved = None

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "variant": self.variant}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])


def build_awp(variant: str, model: nn.Module, gamma: float, proxy_lr: float = 0.01):
    """``awp.variant``: ``wu2020`` (:class:`AWP`) or ``sam`` (:class:`SAMAWP`)."""
    if variant == "wu2020":
        return AWP(model, gamma=gamma, proxy_lr=proxy_lr)
    if variant == "sam":
        return SAMAWP(model, gamma=gamma)
    raise ValueError(f"AWP variant must be 'wu2020' or 'sam', got {variant!r}")


class GowalEMA(EMA):
    """Weight averaging in the form of Gowal et al. 2020 as the DM-Improves-AT code writes it
    (``gowal21uncovering/utils/watrain.py``: ``ema_update`` after every optimizer step, then
    ``update_bn`` at the end of each epoch):

    * after the ``t``-th update (t = 1, 2, ...): while ``t < warmup_point`` the average is the
      trained weights (decay 0); afterwards decay ``min(decay, (1 + d) / (10 + d))`` with
      ``d = t - warmup_point`` (the code's ``dynamic_decay``; ``warmup_point`` = 0.025 x all steps);
    * parameters only: the BatchNorm statistics (and every other buffer) are the trained model's --
      the code points the average's running statistics at the model's at each epoch end, so they
      are the same tensors whenever the average is evaluated.
    """
    dynamic = True

    def __init__(self, model: nn.Module, decay: float = 0.995, warmup_point: float = 0.0):
        super().__init__(model, decay=decay, warmup_steps=0)
        if warmup_point < 0:
            raise ValueError(f"warmup_point must be >= 0, got {warmup_point}")
        self.warmup_point = float(warmup_point)

    def decay_at(self, t: int) -> float:
        """The code's decay after the ``t``-th update (0 = copy)."""
        if t < self.warmup_point:
            return 0.0
        d = t - self.warmup_point
        return min(self.decay, (1.0 + d) / (10.0 + d)) if 10.0 + d != 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None or self._pairs[4] is not model:
            ema_p, src_p = list(self.module.parameters()), list(model.parameters())
            if len(ema_p) != len(src_p):
                raise ValueError("EMA: the model's parameters do not match the averaged copy")
            self._pairs = (ema_p, src_p, list(self.module.buffers()), list(model.buffers()), model)
        ema_p, src_p, ema_b, src_b, _ = self._pairs
        self.num_updates += 1
        self._count += 1
        decay = self.decay_at(self._count)
        if decay == 0.0:
            torch._foreach_copy_(ema_p, src_p)
        else:
            # the code: p_avg *= decay; p_avg += p * (1 - decay)
            torch._foreach_mul_(ema_p, decay)
            torch._foreach_add_(ema_p, src_p, alpha=1.0 - decay)
        if ema_b:
            torch._foreach_copy_(ema_b, src_b)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "warmup_point": self.warmup_point, "form": "gowal"}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.warmup_point = _extra_field(state, "warmup_point", float, "EMA")
