"""What a training checkpoint holds, and the checks a checkpoint must pass before it is restored.

A checkpoint is one dict (``torch.save``, weights-only loadable) with a header (format, version, the
run's fingerprint), the position (``epoch``, ``batch``, ``global_step``), one entry per part that
holds state (model, optimizer, rectifier, wa, swa, awp, aux, scaler, rng, the selection's best
records, the history, the partial epoch sums).  Restoring is all-or-nothing per part: a state that
does not prove it belongs to this run (fingerprint), whose position does not fit the schedule, or
whose tensors do not have this run's shapes is a :class:`ResumeError` naming what does not fit.

Writing never replaces a good checkpoint by a diverged state (:class:`Checkpointer`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Tuple

import torch

from ..runs import load_error_detail
from .errors import NonFiniteLossError, ResumeError
from .io import safe_torch_load

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEYS", "check_header", "positions", "loop_state", "check_shapes",
           "check_optimizer_shapes", "restore", "restore_parts",
           "nonfinite_parts", "Checkpointer"]

CHECKPOINT_FORMAT = 1
# What a checkpoint must hold (RESUMABLE_DIFFERENCES, the config fields that may differ on a
# resume, and the run fingerprint live in rb_labelrefine/runs.py).
CHECKPOINT_KEYS = ("epoch", "batch", "global_step", "model", "optimizer", "rectifier", "rng", "best", "history")
_FINITE_PARTS = ("model", "optimizer", "rectifier", "wa", "swa")


def check_header(state, where: str) -> None:
    """A dict of this checkpoint format with every key the trainer writes."""
    if not isinstance(state, dict):
        raise ResumeError(f"{where} holds a {type(state).__name__}, not a training checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{where}: unsupported checkpoint format {state.get('format')!r}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ResumeError(f"{where} is incomplete: it has no {', '.join(repr(k) for k in missing)} "
                          "(not a checkpoint written by rb_labelrefine's trainer)")


def positions(state: dict, epochs: int, steps_per_epoch: int, where: str) -> Tuple[int, int, int]:
    """``(epoch, batch, global_step)``, each an integer inside this run's schedule, consistent."""
    E, spe = epochs, steps_per_epoch
    epoch = _checked_int(state, "epoch", 0, E, where)
    batch = _checked_int(state, "batch", 0, 0 if epoch == E else spe - 1, where)
    step = _checked_int(state, "global_step", 0, E * spe, where)
    if step != epoch * spe + batch:
        raise ResumeError(f"{where}: 'global_step' is {step}, but epoch {epoch} and batch {batch} of {spe} steps "
                          f"per epoch mean step {epoch * spe + batch}")
    return epoch, batch, step


def loop_state(state: dict, epoch: int, where: str) -> Tuple[list, dict]:
    """``(history, epoch_acc)``: one history record per epoch done, the partial epoch's sums."""
    import json

    try:
        history = json.loads(state["history"])
        epoch_acc = {k: float(v) for k, v in dict(state.get("epoch_acc") or {}).items()}
        if not isinstance(history, list) or len(history) != epoch:
            raise ValueError(f"{len(history) if isinstance(history, list) else 'no'} records for {epoch} epochs")
    except (TypeError, ValueError, KeyError) as exc:
        raise ResumeError(f"{where}: 'history'/'best' do not fit ({str(exc)[:200]})") from None
    return history, epoch_acc


def restore(state: dict, loaders: list, where: str, *, shaped: dict, optimizer) -> None:
    """Restore the parts: ``shaped`` (name -> owner: rectifier, wa, swa) are checked tensor by tensor
    first (``copy_`` would broadcast a wrong-sized tensor silently), EMA / SWA states written before
    they kept ``nn.Module``'s layout are upgraded, then ``loaders`` run in order (all-or-nothing per
    part); the optimizer's per-parameter state is checked against its parameters."""
    from ..averaging import upgrade_legacy_state

    state = {**state, **{k: upgrade_legacy_state(state[k]) for k in ("rectifier", "wa", "swa") if k in state}}
    for name, owner in shaped.items():
        if owner is not None:
            check_shapes(owner.state_dict(), state.get(name), f"{where}: '{name}'")
    restore_parts(state, loaders, where,
                  after=lambda name: name == "optimizer" and check_optimizer_shapes(optimizer, where))


def restore_parts(state: dict, loaders: Iterable[Tuple[str, Callable[[object], None]]], where: str,
                  after: Callable[[str], None] = lambda name: None) -> None:
    """``load(state[name])`` for each part, in order; any failure is a :class:`ResumeError` naming the
    part.  ``after(name)`` runs after each part (e.g. checks that need the loaded state)."""
    for name, load in loaders:
        try:
            load(state[name])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ResumeError(f"{where}: its '{name}' state does not fit this run: {load_error_detail(exc)}") from None
        after(name)


def _checked_int(state: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = state[key]
    if torch.is_tensor(v) and v.numel() == 1 and not v.is_floating_point():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ResumeError(f"{where}: '{key}' is {v!r}, not an integer")
    if not lo <= v <= hi:
        raise ResumeError(f"{where}: '{key}' is {v}, outside [{lo}, {hi}] for this run")
    return v


def check_shapes(mine, theirs, where: str, path: str = "") -> None:
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
                check_shapes(v, theirs[k], where, f"{path}.{k}")


def check_optimizer_shapes(optimizer, where: str) -> None:
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


def nonfinite_parts(state: dict) -> list:
    """The parts of a training state (model, optimizer, ...) holding NaN/Inf."""
    return [k for k in _FINITE_PARTS if not _all_finite(state.get(k))]


class Checkpointer:
    """Writes ``path`` with ``save(state, path)`` (atomic; a no-op on ranks other than 0), never a
    state that holds NaN/Inf."""

    def __init__(self, path: Path, save: Callable[[dict, Path], object]):
        self.path, self._save = Path(path), save

    def save(self, state: dict) -> Path:
        """The checkpoint of a good state; a diverged one (weights that overflowed while the loss was
        still finite, or a non-finite loss not yet read back from an accelerator) is a
        :class:`NonFiniteLossError` that keeps the checkpoint on disk."""
        bad = nonfinite_parts(state)
        if bad:
            where = f"at epoch {state['epoch'] + (1 if state['batch'] else 0)}, step {state['global_step']}"
            raise NonFiniteLossError(f"{where}: {self.kept(bad)} Lower optim.lr, check the data, or set "
                                     "train.grad_clip.")
        self._save(state, self.path)
        return self.path

    def save_last_good(self, state: dict) -> str:
        """After a non-finite loss: checkpoint the state before the failed step if every tensor in it
        is finite; otherwise (the previous update already overflowed, or a rectifier stored NaN) keep
        the checkpoint on disk.  Returns the sentence that says which."""
        bad = nonfinite_parts(state)
        if not bad:
            self._save(state, self.path)
            return f"the last good state (before this step) is in {self.path}."
        return self.kept(bad)

    def kept(self, bad: list) -> str:
        path = self.path
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
