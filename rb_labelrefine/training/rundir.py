"""The run directory as the trainer sees it: the lock, the resume policy, finished-run detection,
and the files written during a run (config, history, weights, curves).

Under torchrun only rank 0 writes: the writers here are no-ops on the other ranks
(:func:`~rb_labelrefine.training.distributed.rank_zero_only`), and rank 0 alone checks and locks the
directory.  The layout itself (file names, the fingerprint, weights files) is
:mod:`rb_labelrefine.runs`: export never imports training.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

from ..config import Config, ConfigError, config_to_dict, dump_config
from ..runs import (RESUMABLE_DIFFERENCES, RUN_FILES, added_later_note, check_fingerprint, fingerprint_metadata,
                    info_to_metadata, read_weights)
from ..runs import as_before
from ..safe_files import read_json
from ..runs import flatten_config as _flatten
from ..runs import write_weights as _write_weights
from .distributed import is_main_process, rank_zero_only
from .extension import check_extension, extension_note, restamp_for_extension, same_run
from .errors import ResumeError
from .io import RunLock, atomic_torch_save, atomic_write_json, atomic_write_text, ensure_writable_dir, \
    remove_stale_temps, safe_torch_load
from .runlog import LogFile, TensorBoard, WandB, history_csv, require_tensorboard, require_wandb, summary_line

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
        self.previous: Optional[Config] = None   # --resume extending a finished run: its config (extension.py)
        self.logfile = LogFile(self.path("log"))
        if cfg.train.tensorboard:
            require_tensorboard()  # a missing extra is refused before anything is built or written
        self.tensorboard = TensorBoard(self.path("tensorboard")) if cfg.train.tensorboard else None
        if cfg.train.wandb:
            require_wandb()
        self.wandb = WandB(cfg.train.wandb, self.out, config_to_dict(cfg)) if cfg.train.wandb else None

    def tee(self, console: Callable[[str], None]) -> Callable[[str], None]:
        """``console`` and ``train.log`` (rank 0; buffered until the run writes its first file)."""
        def log(msg: str) -> None:
            console(msg)
            self.record(msg)
        return log

    def record(self, msg: str) -> None:
        """One line to ``train.log`` only (the epoch lines of a --quiet run)."""
        if is_main_process():
            self.logfile.write(msg)

    def _live(self) -> None:
        if is_main_process():
            self.logfile.open()

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
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_DIFFERENCES
                      and not as_before(k, b.get(k), a.get(k), a))   # a field added later, as the run was
        if diff == ["train.epochs"] and self.path("checkpoint").exists() and b[diff[0]] > a[diff[0]]:
            self.previous = check_extension(old, self.cfg, self.path("checkpoint"))  # more epochs: extend
            return
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
            # extending a finished run: its files carry the finished run's fingerprint until restamped
            if self.previous is None or not same_run(self.previous, stored, where):
                raise ResumeError(f"--resume: {exc}") from None
            added = []
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
            # never through a link, nor from a FIFO or device (a downloaded run is untrusted input)
            summary = read_json(self.path("summary"), max_bytes=16 << 20, follow_links=False)
        except (OSError, ValueError):
            return None  # torn by hand (or not a regular file): the final stage is redone
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

    def resumed(self, epoch: int, batch: int, steps_per_epoch: int) -> None:
        """After the checkpoint was restored: say so; extending a finished run, its files are
        restamped and the new config written (training/extension.py), with a note on the schedule."""
        self.log(f"resumed from {self.path('checkpoint')} at epoch {epoch + 1}, batch {batch}")
        if self.previous is not None:
            self._live()
            if is_main_process():
                restamp_for_extension(self.out, self.previous, self.cfg, self.fingerprint)
            self.log(extension_note(self.previous, self.cfg, steps_per_epoch))
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
        self._live()
        save_torch(state, path)

    def write_history(self, history: list) -> None:
        """history.json, history.csv (the same rows) and, with train.tensorboard, the last epoch's scalars."""
        self._live()
        write_json(self.path("history"), history)
        write_text(self.path("history_csv"), history_csv(history))
        for tracker in (self.tensorboard, self.wandb):
            if tracker is not None and history and is_main_process():
                tracker.write(history[-1])

    def write_summary(self, summary: dict) -> None:
        self._live()
        if self.cfg.model.init_from:  # where the weights training started from came from
            summary["init_from"] = self.cfg.model.init_from
        write_json(self.path("summary"), summary)
        self.record(summary_line(summary))
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None and is_main_process():
            self.wandb.close(summary)

    def weights_meta(self, info, epoch: int, which: str) -> dict:
        c = self.cfg
        return {"arch": c.model.arch, "num_classes": info.num_classes, "dataset": info.name, "epoch": epoch,
                "eval_model": which, "method": c.method.name, "objective": c.objective.name,
                "data_info": info_to_metadata(info), **self.fingerprint}

    def write_weights(self, model, which: str, meta: dict) -> Path:
        self._live()
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
        """The command that resumes the run -- asked for when the run stops, so train.log records it."""
        from .distributed import launch_command   # under torchrun: the torchrun command line

        hint = f"Resume with: {launch_command()} train --config {self.path('config')} --out {self.out} --resume"
        self.record(f"stopped. {hint}")
        return hint
