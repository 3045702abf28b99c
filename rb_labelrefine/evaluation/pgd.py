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

__all__ = ["NORMS", "ATTACK_LOSSES", "VAL_ATTACKS", "attack_loss", "pgd_attack", "pgd_correct", "pgd_accuracy",
           "clean_accuracy", "iter_batches", "eval_mode", "describe_pgd", "format_eps"]

NORMS = ("Linf", "L2")
ATTACK_LOSSES = ("ce", "margin", "dlr")
# eval.val_attack -> the loss PGD ascends.  Cross-entropy PGD overstates the robustness of models
# trained on soft labels (ADR lost ~4.5 points to AutoAttack's DLR attacks that CE attacks missed,
# benchmarks/results/robust_overfitting_fmnist.md), so selecting "best" by it flatters them; the
# margin (Carlini & Wagner 2017, eq. 6 without the confidence term) and DLR (Croce & Hein 2020,
# eq. 5) losses do not depend on how the probability mass is spread over the wrong classes.
VAL_ATTACKS = {"pgd_ce": "ce", "pgd_margin": "margin", "pgd_dlr": "dlr"}
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


def attack_loss(logits: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Per-sample loss an untargeted attack *ascends* (higher = closer to / past a mistake).

    ``ce``: cross-entropy.  ``margin``: ``max_{j != y} z_j - z_y`` (positive iff misclassified).
    ``dlr``: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi`` the logits
    sorted in decreasing order (Croce & Hein 2020, eq. 5; invariant to shifting and scaling the
    logits; needs >= 3 classes).
    """
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {list(ATTACK_LOSSES)}")
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "dlr" and logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    margin = others.max(1).values - z_y
    if loss == "margin":
        return margin
    top = logits.sort(1, descending=True).values
    return margin / (top[:, 0] - top[:, 2] + _TINY)


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
               norm: str = "Linf", random_start: bool = True,
               generator: Optional[torch.Generator] = None, loss: str = "ce") -> Tensor:
    """Untargeted PGD on ``loss`` (:func:`attack_loss`; default cross-entropy); returns ``x_adv``
    in [0, 1].

    The model is used as it is (callers choose train/eval mode); gradients are taken with
    ``torch.autograd.grad`` with respect to the input only, so parameter ``.grad`` fields are
    never touched.
    """
    _check_norm(norm)
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {list(ATTACK_LOSSES)}")
    if eps < 0 or alpha <= 0 or steps < 0:
        raise ValueError(f"need eps >= 0, alpha > 0, steps >= 0; got eps={eps}, alpha={alpha}, steps={steps}")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        objective = attack_loss(model(x + delta), y, loss).sum()
        (grad,) = torch.autograd.grad(objective, delta)
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


def pgd_correct(model: nn.Module, data: Data, eps: float, alpha: Optional[float] = None, steps: int = 10,
                norm: str = "Linf", random_start: bool = True, restarts: int = 1, device=None,
                batch_size: int = 256, n_ex: Optional[int] = None, seed: Optional[int] = 0,
                loss: str = "ce") -> Tensor:
    """Per-point outcome of PGD-``steps`` with ``restarts`` random restarts: a bool tensor (on the
    CPU, in data order), ``True`` where the point is classified correctly on the clean input *and*
    after every restart (the per-sample worst case).

    ``alpha`` defaults to ``2.5 * eps / steps`` (Madry et al.), which reaches the boundary of the
    ball from any start.  ``seed`` makes the random starts reproducible without touching the
    global RNG (``None``: global RNG).  ``loss``: what PGD ascends (:func:`attack_loss`).
    """
    _check_norm(norm)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {list(ATTACK_LOSSES)}")
    if alpha is None:
        alpha = 2.5 * eps / max(steps, 1)
    device = _resolve_device(model, device)
    generator = _generator_for(device, seed)
    out = []
    with eval_mode(model):
        for x, y in iter_batches(data, batch_size, n_ex):
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                still = model(x).argmax(1) == y
            for _ in range(restarts):
                if not bool(still.any()) or eps == 0:
                    break
                idx = still.nonzero(as_tuple=True)[0]
                x_adv = pgd_attack(model, x[idx], y[idx], eps, alpha, steps, norm, random_start, generator, loss)
                with torch.no_grad():
                    still[idx] = model(x_adv).argmax(1) == y[idx]
                if not random_start:
                    break  # a deterministic attack gives the same answer every restart
            out.append(still.cpu())
    if not out:
        raise ValueError("no data to evaluate")
    return torch.cat(out)


def pgd_accuracy(model: nn.Module, data: Data, eps: float, alpha: Optional[float] = None, steps: int = 10,
                 norm: str = "Linf", random_start: bool = True, restarts: int = 1, device=None,
                 batch_size: int = 256, n_ex: Optional[int] = None, seed: Optional[int] = 0,
                 loss: str = "ce") -> float:
    """Robust accuracy (percent) under PGD-``steps``: the mean of :func:`pgd_correct` (same
    arguments)."""
    correct = pgd_correct(model, data, eps, alpha, steps, norm, random_start, restarts, device, batch_size,
                          n_ex, seed, loss)
    return 100.0 * correct.sum().item() / len(correct)


def format_eps(eps: float) -> str:
    """``8/255`` style when eps is a whole number of 255ths (how papers write it)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


def describe_pgd(eps: float, steps: int, norm: str = "Linf", restarts: int = 1, loss: str = "ce") -> str:
    """A short label such as ``PGD-20 (Linf, eps=8/255)`` for logs and cards (``loss`` other
    than cross-entropy is named: ``PGD-10 margin (...)``)."""
    extra = f", {restarts} restarts" if restarts > 1 else ""
    name = f"PGD-{steps}" if loss == "ce" else f"PGD-{steps} {loss}"
    return f"{name} ({norm}, eps={format_eps(eps)}{extra})"

