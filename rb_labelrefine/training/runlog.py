"""Experiment tracking files of a run directory: ``train.log`` (what the console showed),
``history.csv`` (history.json's rows as a table) and TensorBoard event files
(``train.tensorboard``).  Written by rank 0 only (:class:`~rb_labelrefine.training.rundir.RunDir`
calls these on rank 0).
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Optional

__all__ = ["LogFile", "history_csv", "TensorBoard", "require_tensorboard", "WandB", "require_wandb", "summary_line"]


class LogFile:
    """``train.log``: lines are buffered until :meth:`open` (the run has started writing: lock held,
    directory there), then appended, one timestamped line each; never truncated (``--resume``
    appends).  Opened without following a symbolic link."""

    def __init__(self, path: Path):
        self.path, self._buffer, self._live = Path(path), [], False

    def open(self) -> None:
        if not self._live:
            self._live = True
            lines, self._buffer = self._buffer, []
            self._append(lines)

    def write(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if self._live:
            self._append([line])
        else:
            self._buffer.append(line)

    def _append(self, lines: list) -> None:
        if not lines:
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path, flags, 0o666)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write("".join(ln.rstrip("\n") + "\n" for ln in lines))


def _cell(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return "" if v is None else v


def _flat(rec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = " ".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def history_csv(history: list) -> str:
    """``history.json``'s rows as CSV: one row per epoch, the columns in order of first appearance
    (nested values as ``outer.inner``; a value an epoch lacks, e.g. the test curve of an epoch
    without one, is empty)."""
    rows = [_flat(r) for r in history]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()


def require_tensorboard():
    """torch's SummaryWriter, or a MissingExtraError naming the ``tensorboard`` extra."""
    from .._optional import require

    require("tensorboard", "tensorboard", "train.tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class TensorBoard:
    """The per-epoch scalars of the history as TensorBoard events in ``log_dir`` (step = epoch,
    1-based).  Created at the first epoch written, with ``purge_step`` at that epoch, so events a
    killed run wrote after its last checkpoint are dropped by TensorBoard on ``--resume``."""

    def __init__(self, log_dir: Path):
        self.log_dir, self._writer = Path(log_dir), None

    def write(self, rec: dict) -> None:
        step = int(rec.get("epoch", 0))
        if self._writer is None:
            self._writer = require_tensorboard()(log_dir=str(self.log_dir), purge_step=step)
        for k, v in _flat(rec).items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k.replace(".", "/"), float(v), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def require_wandb():
    """The ``wandb`` module, or a MissingExtraError naming the ``wandb`` extra."""
    from .._optional import require

    return require("wandb", "wandb", "train.wandb")


class WandB:
    """The per-epoch scalars of the history (step = epoch) and the config in a W&B run.  Its id is
    derived from the run directory, so ``--resume`` continues the same W&B run (``resume="allow"``)."""

    def __init__(self, settings: dict, out: Path, config: dict):
        import hashlib

        self.settings, self.config, self._run = dict(settings), config, None
        self.id = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]

    def write(self, rec: dict) -> None:
        if self._run is None:
            self._run = require_wandb().init(**self.settings, id=self.id, resume="allow", config=self.config)
        values = {k.replace(".", "/"): v for k, v in _flat(rec).items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._run.log(values, step=int(rec.get("epoch", 0)))

    def close(self, summary: dict) -> None:
        if self._run is not None:
            self._run.summary.update({k: v for k, v in _flat(summary).items() if isinstance(v, (int, float, str))})
            self._run.finish()
            self._run = None


def summary_line(s: dict) -> str:
    """The summary's one line in train.log."""
    b, f = s.get("best") or {}, s.get("final") or {}

    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.1f}%"

    line = (f"finished: {s.get('epochs')} epochs in {s.get('train_seconds', 0):.0f}s | best epoch "
            f"{s.get('best_epoch')} "
            f"(val PGD {pct(b.get('val_pgd'))}, test PGD {pct(b.get('test_pgd'))}) | final test clean "
            f"{pct(f.get('test_clean'))}, test PGD {pct(f.get('test_pgd'))}")
    aa = s.get("autoattack")
    if aa:
        line += f" | AutoAttack best {aa['best']['robust_acc']:.1f}% final {aa['final']['robust_acc']:.1f}%"
    return line
