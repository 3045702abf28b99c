"""The run directory as the trainer sees it: the lock, the resume policy, finished-run detection,
and the files written during a run (config, history, weights, curves).

Under torchrun only rank 0 writes: the writers here are no-ops on the other ranks
(:func:`~rb_labelrefine.training.distributed.rank_zero_only`), and rank 0 alone checks and locks the
directory.  The layout itself (file names, the fingerprint, weights files) is
:mod:`rb_labelrefine.runs`: export never imports training.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from ..config import Config, ConfigError, config_to_dict, dump_config
from ..runs import (RESUMABLE_DIFFERENCES, RUN_FILES, added_later_note, check_fingerprint, fingerprint_metadata,
                    info_to_metadata, read_weights)
from ..runs import flatten_config as _flatten
from ..runs import write_weights as _write_weights
from .distributed import is_main_process, rank_zero_only
from .errors import ResumeError
from .io import RunLock, atomic_torch_save, atomic_write_json, atomic_write_text, ensure_writable_dir, \
    remove_stale_temps, safe_torch_load

__all__ = ["RunDir"]

# [DDP] under torchrun only rank 0 writes files: these writers are no-ops on the other ranks
# (and plain pass-throughs in a single process).
save_torch, write_json, write_text, remove_temps = (
    rank_zero_only(f) for f in (atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temps))
write_weights = rank_zero_only(_write_weights, returns_path_arg=1)


class RunDir:
    """``out`` for ``cfg``; ``resume`` is the requested policy, :attr:`resume` the one that applies
    once :meth:`opened` checked the directory (a run killed before its first checkpoint starts over)."""

    def __init__(self, cfg: Config, out, *, resume: bool, log: Callable[[str], None]):
        self.cfg, self.out, self.resume, self.log = cfg, Path(out), resume, log
        self.fingerprint = fingerprint_metadata(cfg)
        self._curves_skipped = False

    def path(self, which: str) -> Path:
        return self.out / RUN_FILES[which]

    # ------------------------------------------------------------------ opening
    @contextlib.contextmanager
    def opened(self):
        """Check that ``out`` is writable, lock it, apply the resume policy; unlock on exit, and remove
        the directory again if this call created it and nothing was written."""
        writer = int(os.environ.get("RANK", "0")) == 0  # [DDP] rank 0 alone writes, checks and locks
        created, lock = False, None
        if writer:  # a read-only / full / bad --out fails now, not after hours of work
            created = ensure_writable_dir(self.out, create=not self.resume)
        if self.resume and (created is None or not self.out.is_dir()):  # refused before anything is created
            raise ResumeError(f"--resume: no checkpoint at {self.path('checkpoint')} ({self.out} is not a "
                              "directory); start a new run without --resume")
        if writer:
            lock = RunLock(self.out).acquire()
        try:
            if lock is not None and lock.stale:
                self.log(f"note: {self.out} held a lock file of a process that is gone ({lock.stale}); taken over")
            self._check_out_dir()
            yield self
        finally:
            if lock is not None:
                lock.release()
            if created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only if the run failed before writing anything (empty)

    def _check_out_dir(self):
        ckpt, cfg_file = self.path("checkpoint"), self.path("config")
        if self.resume:
            if not ckpt.exists():
                if cfg_file.exists() and not self.path("final").exists():
                    # The run was killed (kill -9, OOM, node loss) before its first checkpoint:
                    # nothing to lose, so a requeued `--resume` starts it over instead of failing
                    # forever.  Only for the same config.
                    self._check_same_config(cfg_file)
                    self.log(f"--resume: {self.out} has no checkpoint yet (stopped before the first one); "
                             "starting from the beginning")
                    self.resume = False
                    return
                raise ResumeError(f"--resume: no checkpoint at {ckpt}; start a new run without --resume")
            if cfg_file.exists():
                self._check_same_config(cfg_file)
        elif ckpt.exists() or self.path("final").exists():
            raise ResumeError(f"{self.out} already holds a run; pass --resume to continue it, or choose a new "
                              "--out directory (nothing was overwritten)")

    def _check_same_config(self, cfg_file: Path):
        from ..config import load_config
        try:
            old = load_config(str(cfg_file))
        except ConfigError as exc:
            raise ResumeError(f"--resume: {cfg_file} is not a valid config ({exc})") from None
        a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(self.cfg))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_DIFFERENCES)
        if diff:
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8])
            raise ResumeError(f"--resume: {self.out} was trained with a different config ({shown}). "
                              "Resume with the same config, or choose a new --out directory.")

    # ------------------------------------------------------------------ what belongs to this run
    def check_fingerprint(self, stored: dict, where: str) -> None:
        """:func:`~rb_labelrefine.runs.check_fingerprint` for ``--resume``: a file of another run is a
        :class:`ResumeError`; fields accepted as added later (by a newer rb_labelrefine, at their
        defaults) are logged in one line."""
        try:
            added = check_fingerprint(self.cfg, stored, where)
        except ValueError as exc:
            raise ResumeError(f"--resume: {exc}") from None
        if added:
            self.log(added_later_note(where, added))

    def check_weights_files(self, required: bool = False) -> None:
        """The best / final weights files present belong to this run (a file dropped in from another
        run is refused); ``required``: both must be there."""
        for which in ("best", "final"):
            if required or self.path(which).exists():
                try:
                    _, meta = read_weights(self.path(which))
                except ValueError as exc:
                    raise ResumeError(f"--resume: {exc}") from None
                self.check_fingerprint(meta, str(self.path(which)))

    def finished_summary(self) -> Optional[dict]:
        """``--resume`` of a finished run: its summary, after checking that the checkpoint belongs
        to this config and ended training; nothing is written.  None when the run is not finished."""
        if not self.resume or not all(self.path(k).is_file() for k in ("summary", "final", "checkpoint")):
            return None
        try:
            summary = json.loads(self.path("summary").read_text())
        except (OSError, ValueError):
            return None  # torn by hand: the final stage is redone
        state = safe_torch_load(self.path("checkpoint"))
        where = f"the checkpoint {self.path('checkpoint')}"
        if not isinstance(state, dict):
            raise ResumeError(f"{where} holds a {type(state).__name__}, not a training checkpoint")
        self.check_fingerprint(state, where)
        self.check_weights_files(required=True)
        if (state.get("epoch"), state.get("batch")) != (self.cfg.train.epochs, 0) or not isinstance(summary, dict):
            return None
        self.log(f"--resume: {self.out} is finished (all {self.cfg.train.epochs} epochs, {RUN_FILES['summary']} "
                 "written): nothing to do, nothing changed")
        return summary

    def log_resumed(self, epoch: int, batch: int) -> None:
        self.log(f"resumed from {self.path('checkpoint')} at epoch {epoch + 1}, batch {batch}")
        if batch and self.cfg.data.augment and self.cfg.data.num_workers > 0:
            self.log("note: resumed mid-epoch with augmentation in DataLoader workers: the rest of this "
                     "epoch is augmented differently from an uninterrupted run (not bit-exact)")

    # ------------------------------------------------------------------ writing
    def prepare(self) -> None:
        """Before setup: temporary files of writes cut short by a kill -9 go."""
        if self.out.is_dir():
            remove_temps(self.out, RUN_FILES.values())

    def start(self) -> None:
        """After setup: the directory exists; a new run writes its config."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            write_text(self.path("config"), dump_config(self.cfg))

    def save_checkpoint(self, state: dict, path: Path) -> None:
        save_torch(state, path)

    def write_history(self, history: list) -> None:
        write_json(self.path("history"), history)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path("summary"), summary)

    def weights_meta(self, info, epoch: int, which: str) -> dict:
        c = self.cfg
        return {"arch": c.model.arch, "num_classes": info.num_classes, "dataset": info.name, "epoch": epoch,
                "eval_model": which, "method": c.method.name, "objective": c.objective.name,
                "data_info": info_to_metadata(info), **self.fingerprint}

    def write_weights(self, model, which: str, meta: dict) -> Path:
        return write_weights(model, self.path(which), meta)

    def write_curves(self, history: list) -> Optional[Path]:
        if not history or not is_main_process():  # [DDP] rank 0 writes files
            return None
        from .._optional import MissingExtraError
        from ..plots import plot_curves

        try:
            return plot_curves({self.cfg.name: history}, self.path("curves"))
        except MissingExtraError as exc:  # the core install has no matplotlib: the run itself is complete
            if not self._curves_skipped:  # called every epoch: say it once
                self.log(f"no {RUN_FILES['curves']}: {exc}")
                self._curves_skipped = True
            return None

    def resume_hint(self) -> str:
        return f"Resume with: rb-labelrefine train --config {self.path('config')} --out {self.out} --resume"
