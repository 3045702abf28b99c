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
           "check_optimizer_shapes", "check_values", "check_aux_position", "restore", "restore_parts",
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
    for k, v in epoch_acc.items():   # the partial epoch's sums go into history.json's record
        if not math.isfinite(v):
            raise ResumeError(f"{where}: 'epoch_acc.{k}' is {v}, not a finite number")
    for key in ("best", "best_pgd_ce"):   # a NaN/inf score would never be beaten (best never updated)
        rec = state.get(key)
        if isinstance(rec, dict) and "score" in rec:
            v = rec["score"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ResumeError(f"{where}: '{key}.score' is {v!r}, not a finite number")
    return history, epoch_acc


def restore(state: dict, loaders: list, where: str, *, shaped: dict, optimizer) -> None:
    """Restore the parts: ``shaped`` (name -> owner: rectifier, wa, swa) are checked tensor by tensor
    first (``copy_`` would broadcast a wrong-sized tensor silently), EMA / SWA states written before
    they kept ``nn.Module``'s layout are upgraded, then ``loaders`` run in order (all-or-nothing per
    part); the optimizer's per-parameter state is checked against its parameters."""
    from ..averaging import upgrade_legacy_state

    state = {**state, **{k: upgrade_legacy_state(state[k]) for k in ("rectifier", "wa", "swa") if k in state}}
    owners = {name: getattr(load, "__self__", None) for name, load in loaders}   # bound load_state_dict methods
    model = owners.get("model")
    if isinstance(model, torch.nn.Module):
        check_shapes(model.state_dict(), state.get("model"), f"{where}: 'model'")
    for name, owner in shaped.items():
        if owner is not None:
            check_shapes(owner.state_dict(), state.get(name), f"{where}: '{name}'")
    check_values(state, where)
    if owners.get("aux") is not None and state.get("aux") is not None:
        check_aux_position(state["aux"], owners["aux"], state.get("global_step"), where)
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
        if _kind(theirs) != _kind(mine):   # load_state_dict's copy_ would cast it silently
            raise ResumeError(f"{where}{path} is a {str(theirs.dtype).replace('torch.', '')} tensor, this run needs "
                              f"{str(mine.dtype).replace('torch.', '')}")
    elif isinstance(mine, dict):
        if not isinstance(theirs, dict):
            raise ResumeError(f"{where}{path} is a {type(theirs).__name__}, not a state dict")
        for k, v in mine.items():
            if torch.is_tensor(v) or isinstance(v, dict):
                if k not in theirs:
                    raise ResumeError(f"{where}{path} has no {k!r}")
                check_shapes(v, theirs[k], where, f"{path}.{k}")


def _kind(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "bool" if t.dtype == torch.bool else \
        "float" if t.is_floating_point() else "integer"


def check_values(state: dict, where: str) -> None:
    """Every tensor and number of the trained parts (model, optimizer, rectifier, wa, swa, awp) is
    finite, and the optimizer's per-parameter buffers are floating point: a :class:`ResumeError`
    naming the first entry that is not (a NaN in the file would otherwise surface epochs later as
    a "non-finite training loss", an int8 buffer be cast silently)."""
    for part in _FINITE_PARTS + ("awp",):
        bad = _first_nonfinite(state.get(part), part)
        if bad is not None:
            raise ResumeError(f"{where}: '{bad[0]}' holds {bad[1]} (the file is damaged or was edited; resume from "
                              "an intact copy or start again)")
    opt = state.get("optimizer")
    per_param = opt.get("state") if isinstance(opt, dict) else None
    for pid, entry in (per_param.items() if isinstance(per_param, dict) else ()):
        for k, v in (entry.items() if isinstance(entry, dict) else ()):
            if torch.is_tensor(v) and v.dim() > 0 and not v.is_floating_point():
                raise ResumeError(f"{where}: 'optimizer.state.{pid}.{k}' is a {str(v.dtype).replace('torch.', '')} "
                                  "tensor, not floating point")


def _first_nonfinite(obj, path: str):
    """``(path, what)`` of the first non-finite floating tensor or float in a nested state, or None."""
    if torch.is_tensor(obj):
        if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
            n_nan = int(torch.isnan(obj).sum())
            what = f"{n_nan} NaN" if n_nan else f"{int((~torch.isfinite(obj)).sum())} infinite"
            return path, f"{what} value(s) of {obj.numel()}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad = _first_nonfinite(v, f"{path}.{k}")
            if bad is not None:
                return bad
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _first_nonfinite(v, f"{path}.{i}")
            if bad is not None:
                return bad
    elif isinstance(obj, float) and not math.isfinite(obj):
        return path, repr(obj)
    return None


def check_aux_position(aux_state, stream, global_step, where: str) -> None:
    """The auxiliary stream's position (``pass``, ``offset``) inside the archive and no further than
    ``global_step`` steps can have drawn (``stream.max_rows_per_step`` generated rows each)."""
    if not isinstance(aux_state, dict):
        raise ResumeError(f"{where}: 'aux' is a {type(aux_state).__name__}, not the auxiliary stream's position")
    n = getattr(stream, "n", None)
    vals = {}
    for key in ("pass", "offset"):
        v = aux_state.get(key)
        if torch.is_tensor(v) and v.numel() == 1 and not v.is_floating_point():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ResumeError(f"{where}: 'aux.{key}' is {v!r}, not an integer")
        vals[key] = v
    if n is not None and not 0 <= vals["offset"] < n:
        raise ResumeError(f"{where}: 'aux.offset' is {vals['offset']}, outside [0, {n}) (the archive's images)")
    per_step = getattr(stream, "max_rows_per_step", None)
    if n is not None and per_step is not None and isinstance(global_step, int):
        most = global_step * per_step   # rows drawn at most so far
        if not 0 <= vals["pass"] <= most // n:
            raise ResumeError(f"{where}: 'aux.pass' is {vals['pass']}, outside [0, {most // n}] ({global_step} steps "
                              f"of at most {per_step} generated rows over {n} images)")
        if vals["pass"] * n + vals["offset"] > most:
            raise ResumeError(f"{where}: 'aux' position (pass {vals['pass']}, offset {vals['offset']}) is beyond the "
                              f"{most} rows {global_step} steps can have drawn")
    elif vals["pass"] < 0:
        raise ResumeError(f"{where}: 'aux.pass' is {vals['pass']}, not a pass number (>= 0)")


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
