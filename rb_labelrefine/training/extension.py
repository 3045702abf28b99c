"""Extending a finished run: ``--resume`` with only ``train.epochs`` raised.

The run continues from its last checkpoint (the end of its last epoch) as the *longer* run: from
the first new epoch on, everything that is defined over the whole run follows the new
``train.epochs`` -- the learning-rate schedule (milestones given as fractions of training move with
it; cosine / one-cycle / peak-cosine stretch to the new end) and a rectifier's schedule over all
steps (ADR's temperature and interpolation) -- as if the run had been configured with the new
number of epochs and resumed at that point (timm's ``train.py --resume`` with more ``--epochs``
does the same to its scheduler).  What a checkpointed part holds of its own schedule stays: SWA's
start epoch (the average goes on), WA's warm-up point.  The printed note says how the learning rate
changes.  Best-checkpoint selection continues over all epochs.

Before training continues, the run's files are made the longer run's (each step atomic, and
repeating them after a kill is harmless; ``config.yaml`` is written last, so until it is, a
``--resume`` extends again):

1. ``best.safetensors`` (and ``best_pgd_ce``) and ``checkpoint.pt`` get the new fingerprint (same
   tensors);
2. the finished run's ``final.safetensors`` and ``summary.json`` are kept as
   ``final_epochs<N>.safetensors`` and ``summary_epochs<N>.json`` (nothing is lost);
3. ``config.yaml`` is the new config.

Only a finished run (its checkpoint at the end of its last epoch) is extended; a stopped one is
refused with the command that finishes it first.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import Config, dump_config
from ..runs import RUN_FILES, check_fingerprint, read_weights
from .errors import ResumeError
from ..fileio import atomic_torch_save, atomic_write_bytes, atomic_write_text, safe_torch_load
from .schedule import first_decay_epoch, lr_at

__all__ = ["check_extension", "same_run", "restamp_for_extension", "extension_note", "kept_name"]


def same_run(cfg: Config, stored: dict, where: str) -> bool:
    """Whether ``stored`` (a checkpoint, a weights file's metadata) carries ``cfg``'s fingerprint."""
    try:
        check_fingerprint(cfg, stored, where)
    except ValueError:
        return False
    return True


def check_extension(old: Config, new: Config, ckpt: Path) -> Config:
    """``old`` if ``ckpt`` is the checkpoint at the end of ``old``'s run (so the run can be
    extended to ``new.train.epochs``); else a :class:`ResumeError` saying why."""
    n, m = old.train.epochs, new.train.epochs
    state = safe_torch_load(ckpt)
    where = f"the checkpoint {ckpt}"
    if not isinstance(state, dict):
        raise ResumeError(f"{where} holds a {type(state).__name__}, not a training checkpoint")
    try:
        check_fingerprint(old, state, where)
    except ValueError as exc:
        raise ResumeError(f"--resume: {exc}") from None
    at = (state.get("epoch"), state.get("batch"))
    if at != (n, 0):
        raise ResumeError(
            f"--resume with train.epochs {n} -> {m}: only a finished run is extended, and {where} is at epoch "
            f"{at[0]}, batch {at[1]} of {n} epochs. Finish it first with the same config (rb-labelrefine train "
            f"--config {ckpt.parent / RUN_FILES['config']} --out {ckpt.parent} --resume), then extend it.")
    return old


def kept_name(which: str, epochs: int) -> str:
    """``final_epochs10.safetensors``: the finished run's file, kept when it is extended."""
    stem, dot, suffix = RUN_FILES[which].partition(".")
    return f"{stem}_epochs{epochs}{dot}{suffix}"


def _restamp_weights(path: Path, fingerprint: dict) -> None:
    from safetensors.torch import save

    state, meta = read_weights(path)
    if meta.get("config_fingerprint") == fingerprint["config_fingerprint"]:
        return
    meta = {**meta, **{k: str(v) for k, v in fingerprint.items()}}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata=meta))


def restamp_for_extension(out: Path, old: Config, new: Config, fingerprint: dict) -> None:
    """The steps of the module docstring, in order (rank 0)."""
    out = Path(out)
    for which in ("best", "best_pgd_ce"):
        if (out / RUN_FILES[which]).is_file():
            _restamp_weights(out / RUN_FILES[which], fingerprint)
    ckpt = out / RUN_FILES["checkpoint"]
    state = safe_torch_load(ckpt)
    if state.get("config_fingerprint") != fingerprint["config_fingerprint"]:
        state["config_fingerprint"], state["run_config"] = fingerprint["config_fingerprint"], fingerprint["run_config"]
        atomic_torch_save(state, ckpt)
    for which in ("final", "summary"):
        src = out / RUN_FILES[which]
        if src.is_file() and not src.is_symlink():
            os.replace(src, out / kept_name(which, old.train.epochs))
    atomic_write_text(out / RUN_FILES["config"], dump_config(new))


def _milestones(cfg: Config) -> list:
    """The (1-based) epochs whose first step has each decay (schedule.lr_at: epoch index >= m * E)."""
    E = cfg.train.epochs
    return sorted(math.ceil(m * E) + 1 if m < 1 else math.ceil(m) + 1 for m in cfg.optim.milestones)


def extension_note(old: Config, new: Config, steps_per_epoch: int) -> str:
    """The printed note: epochs, how the learning rate changes, SWA's start, the files kept."""
    n, m, o = old.train.epochs, new.train.epochs, new.optim
    spe = max(steps_per_epoch, 1)
    before, after = lr_at(old, n - 1, spe - 1, spe), lr_at(new, n, 0, spe)
    sched = f"optim.schedule={o.schedule}"
    if o.schedule == "multistep":
        frac = any(x < 1 for x in o.milestones)
        sched += (f", the lr decays from epochs {_milestones(old)} -> {_milestones(new)}" if frac
                  else f", the lr decays from epochs {_milestones(new)} (milestones given as epochs: unchanged)")
    span = f"epoch {m} follows" if m == n + 1 else f"epochs {n + 1}-{m} follow"
    text = (f"note: extending the finished {n}-epoch run to {m} epochs: {span} the schedule of a "
            f"{m}-epoch run ({sched}); lr {before:.6g} at the last step -> {after:.6g} at epoch {n + 1}")
    if new.method.name == "adr":
        text += "; ADR's temperature and interpolation schedules stretch to the new end as well"
    if new.swa.enabled:  # SWA's start is part of its checkpointed state: the average goes on as it was
        start = first_decay_epoch(old) if old.swa.start_epoch is None else old.swa.start_epoch
        text += f"; SWA keeps its start (snapshots from epoch {start + 1})"
    kept = ", ".join(kept_name(w, n) for w in ("final", "summary"))
    return text + f"; the {n}-epoch run's final weights and summary are kept as {kept}"
