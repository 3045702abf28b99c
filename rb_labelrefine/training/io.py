"""Kept for the imports written before the file layer left ``training/``: crash-safe writes and
code-free checkpoint reading are :mod:`rb_labelrefine.fileio` (what ``runs.py`` and ``export/`` use
without importing the trainer); the run directory's writer lock is :mod:`.lock`.  New code imports
from those two."""
from __future__ import annotations

import os  # noqa: F401  (tests patch io.os.replace / io.tempfile.mkstemp: the same module objects)
import tempfile  # noqa: F401

from ..errors import BadInputError, RunLockedError, StorageError, UnsafeCheckpointError  # noqa: F401
from ..fileio import (_UMASK, FILE_MODE, MAX_CHECKPOINT_BYTES, _weights_only_reason,  # noqa: F401
                      atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text,
                      ensure_writable_dir, remove_stale_temps, safe_torch_load)
from .lock import LOCK_FILE, RunLock

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "safe_torch_load", "remove_stale_temps", "UnsafeCheckpointError", "StorageError", "ensure_writable_dir",
           "RunLock", "LOCK_FILE"]
