"""Fast PGD-k and clean accuracy, for validation during training and for sanity checks.

This is a plain PGD loop (Madry et al. 2018) rather than a torchattacks object: the trainer
evaluates every epoch, and one function call over a loader is cheaper and easier to reason
about than rebuilding an attack per batch.  It is *not* the final evaluation -- that is
AutoAttack (:mod:`rb_labelrefine.evaluation.autoattack`).

Conventions shared by every function here:

* inputs are in [0, 1] (normalisation lives inside the model), ``eps``/``alpha`` in that space;
* the model is put in eval mode for the duration of the call and restored afterwards;
* accuracies are returned in percent;
* ``data`` is a ``DataLoader`` (or any iterable) yielding ``(x, y)`` or ``(x, y, idx)``, or a
  pair of tensors ``(x, y)``.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NORMS", "pgd_attack", "pgd_accuracy", "clean_accuracy", "iter_batches", "eval_mode",
           "describe_pgd", "format_eps"]

NORMS = ("Linf", "L2")
_TINY = 1e-12

Data = Union[Tuple[Tensor, Tensor], Iterable]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode (BatchNorm running statistics, no dropout) for the block, then restore."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    return norm


def _is_tensor_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and torch.is_tensor(data[0]) and torch.is_tensor(data[1]))


def iter_batches(data: Data, batch_size: int = 256, n_ex: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches from a loader or a tensor pair, stopping after ``n_ex`` points."""
    if n_ex is not None and n_ex < 1:
        raise ValueError(f"n_ex must be >= 1, got {n_ex}")
    seen = 0
    if _is_tensor_pair(data):
        x_all, y_all = data
        if len(x_all) != len(y_all):
            raise ValueError(f"x has {len(x_all)} points but y has {len(y_all)}")
        total = len(x_all) if n_ex is None else min(n_ex, len(x_all))
        for i in range(0, total, batch_size):
            yield x_all[i:min(i + batch_size, total)], y_all[i:min(i + batch_size, total)]
        return
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("a loader must yield (x, y) or (x, y, idx) batches, "
                            f"got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if n_ex is not None:
            x, y = x[:n_ex - seen], y[:n_ex - seen]
        seen += len(x)
        if len(x):
            yield x, y
        if n_ex is not None and seen >= n_ex:
            return


def _l2_norm(v: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast against ``v``."""
    return v.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (v.dim() - 1)))


def _random_start(x: Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    if norm == "Linf":
        delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return delta * eps
    # L2: a uniform direction and a radius drawn uniformly in [0, eps].
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _l2_norm(direction)
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device,
                        dtype=x.dtype)
    return direction * radius * eps


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _l2_norm(delta)).clamp(max=1.0)
    return delta * scale


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
               norm: str = "Linf", random_start: bool = True,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Untargeted PGD on the cross-entropy loss; returns ``x_adv`` in [0, 1].

    The model is used as it is (callers choose train/eval mode); gradients are taken with
    ``torch.autograd.grad`` with respect to the input only, so parameter ``.grad`` fields are
    never touched.
    """
    _check_norm(norm)
    if eps < 0 or alpha <= 0 or steps < 0:
        raise ValueError(f"need eps >= 0, alpha > 0, steps >= 0; got eps={eps}, alpha={alpha}, steps={steps}")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "Linf":
                step = alpha * grad.sign()
            else:
                step = alpha * grad / _l2_norm(grad)
            delta = _project(delta + step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x   # stay a valid image; keeps the ball constraint
        delta = delta.detach()
    return (x + delta).detach()


def _generator_for(device: torch.device, seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def clean_accuracy(model: nn.Module, data: Data, device=None, batch_size: int = 256,
                   n_ex: Optional[int] = None) -> float:
    """Top-1 accuracy (percent) on unperturbed inputs, model in eval mode."""
    device = _resolve_device(model, device)
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for x, y in iter_batches(data, batch_size, n_ex):
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    if total == 0:
        raise ValueError("no data to evaluate")
    return 100.0 * correct / total


def pgd_accuracy(model: nn.Module, data: Data, eps: float, alpha: Optional[float] = None, steps: int = 10,
                 norm: str = "Linf", random_start: bool = True, restarts: int = 1, device=None,
                 batch_size: int = 256, n_ex: Optional[int] = None, seed: Optional[int] = 0) -> float:
    """Robust accuracy (percent) under PGD-``steps`` with ``restarts`` random restarts.

    A point counts as robust only if it is classified correctly on the clean input *and* after
    every restart (the per-sample worst case).  ``alpha`` defaults to ``2.5 * eps / steps``
    (Madry et al.), which reaches the boundary of the ball from any start.  ``seed`` makes
    the random starts reproducible without touching the global RNG (``None``: global RNG).
    """
    _check_norm(norm)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if alpha is None:
        alpha = 2.5 * eps / max(steps, 1)
    device = _resolve_device(model, device)
    generator = _generator_for(device, seed)
    robust = total = 0
    with eval_mode(model):
        for x, y in iter_batches(data, batch_size, n_ex):
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                still = model(x).argmax(1) == y
            for _ in range(restarts):
                if not bool(still.any()) or eps == 0:
                    break
                idx = still.nonzero(as_tuple=True)[0]
                x_adv = pgd_attack(model, x[idx], y[idx], eps, alpha, steps, norm, random_start, generator)
                with torch.no_grad():
                    still[idx] = model(x_adv).argmax(1) == y[idx]
                if not random_start:
                    break  # a deterministic attack gives the same answer every restart
            robust += still.sum().item()
            total += len(y)
    if total == 0:
        raise ValueError("no data to evaluate")
    return 100.0 * robust / total


def format_eps(eps: float) -> str:
    """``8/255`` style when eps is a whole number of 255ths (how papers write it)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


def describe_pgd(eps: float, steps: int, norm: str = "Linf", restarts: int = 1) -> str:
    """A short label such as ``PGD-20 (Linf, eps=8/255)`` for logs and cards."""
    extra = f", {restarts} restarts" if restarts > 1 else ""
    return f"PGD-{steps} ({norm}, eps={format_eps(eps)}{extra})"

