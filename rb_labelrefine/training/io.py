"""Crash-safe file writing and code-free checkpoint reading.

* :func:`atomic_path` -- write to a temporary file in the same directory, flush + fsync, then
  ``os.replace`` onto the target: a kill at any moment leaves either the old file or the new
  one, never a torn one.
* :func:`safe_torch_load` -- ``torch.load(weights_only=True)``: tensors and plain containers
  only.  A file that would need full unpickling (arbitrary classes, ``__reduce__`` payloads) is
  refused with :class:`UnsafeCheckpointError` and nothing in it is executed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "safe_torch_load", "remove_stale_temps", "UnsafeCheckpointError"]

# mkstemp creates its file with mode 0600; the renamed result should get the mode a plain
# open() would give it (0666 & ~umask), or other users/containers cannot read runs they share.
_UMASK = os.umask(0)
os.umask(_UMASK)


class UnsafeCheckpointError(RuntimeError):
    """The file is not loadable without executing code from it."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(directory, names) -> list:
    """Delete the temporary files (``.NAME.*.tmp``) that :func:`atomic_path` leaves behind when the
    process is killed mid-write; returns the removed paths.  Call it only while no other process
    writes into ``directory``."""
    removed = []
    for name in names:
        for p in Path(directory).glob(f".{name}.*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _weights_only_reason(exc) -> str:
    """What the weights-only unpickler refused (e.g. "Unsupported global: GLOBAL builtins.exec was
    not an allowed global by default"): torch's message starts with a generic, ANSI-coloured
    preamble and names the culprit on a later "WeightsUnpickler error:" line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:"):].split(". Please use")[0].strip().rstrip(".")[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def safe_torch_load(path, map_location="cpu"):
    """Load a torch file with ``weights_only=True``; refuse anything needing full unpickling."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs full unpickling, which can execute arbitrary code "
            f"(weights-only load said: {_weights_only_reason(exc)}). Only load checkpoints "
            "saved as tensors/plain containers or safetensors; if you trust the file, convert it "
            "yourself to a state_dict of tensors.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0][:300]})") from None
