"""Crash-safe file writing and code-free checkpoint reading -- the file layer under training,
evaluation and export (it imports none of them: ``runs.py`` and ``export/`` use it without
importing the trainer).

* :func:`atomic_path` -- write to a temporary file in the same directory, flush + fsync, then
  ``os.replace`` onto the target: a kill at any moment leaves either the old file or the new
  one, never a torn one.
* :func:`safe_torch_load` -- ``torch.load(weights_only=True)``: tensors and plain containers
  only.  A file that would need full unpickling (arbitrary classes, ``__reduce__`` payloads) is
  refused with :class:`UnsafeCheckpointError` and nothing in it is executed.
* A failed write (disk full, read-only, permissions) raises :class:`StorageError` naming the path
  (and, when the disk is full, the bytes needed); :func:`ensure_writable_dir` finds out before
  any work is done.

The run directory's writer lock is the trainer's (:mod:`rb_labelrefine.training.lock`).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch

from .errors import BadInputError, StorageError, UnsafeCheckpointError
from .safe_files import open_binary

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "safe_torch_load", "remove_stale_temps", "UnsafeCheckpointError", "StorageError", "ensure_writable_dir",
           "FILE_MODE", "MAX_CHECKPOINT_BYTES"]


# mkstemp creates its file with mode 0600; the renamed result should get the mode a plain
# open() would give it (0666 & ~umask), or other users/containers cannot read runs they share.
_UMASK = os.umask(0)
os.umask(_UMASK)
#: the mode of every file written here (and of the run lock)
FILE_MODE = 0o666 & ~_UMASK


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
def atomic_path(path, size: Optional[int] = None):
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``.
    An ``OSError`` on the way (the writer's included) becomes a :class:`StorageError` naming
    ``path``; ``size`` (bytes, when known) goes into a disk-full message."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(path, exc, size) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, FILE_MODE)
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(path, exc, size) from None
    finally:
        with contextlib.suppress(OSError):
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
    with atomic_path(path, size=len(data)) as tmp:
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


def _weights_only_reason(exc, path: Path) -> str:
    """What the weights-only unpickler refused, e.g. "Unsupported global: GLOBAL builtins.exec was
    not an allowed global by default".  torch's message starts with a generic, ANSI-coloured
    preamble and puts the culprit after "WeightsUnpickler error:" -- at the start of a line, in the
    middle of one, or on the next line, depending on the torch version and the pickle protocol.
    Some refusals name no global at all ("Unsupported operand 149" for protocol 4); then the
    globals the file references are read from its opcodes (never executed) and named."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    reason = ""
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please use|\n\s*\n\s*Check the documentation|$)", text, re.S)
    if m:
        reason = " ".join(m.group(1).split()).rstrip(".")
    if not reason:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = lines[0] if lines else type(exc).__name__
    if "global" not in reason.lower():
        names = _pickle_globals(path)
        if names:
            reason += f"; the file references {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
    return reason[:300]


_SAFE_GLOBALS = re.compile(r"^(torch\.|collections\.OrderedDict$|builtins\.(set|frozenset|bytearray|slice|complex)$|"
                           r"_codecs\.encode$|numpy\.)")


def _pickle_globals(path: Path, limit: int = 64 << 20) -> list:
    """``module.name`` of every global a pickle (plain, or the data.pkl of a torch zip file) refers
    to, torch's and numpy's own left out.  Reads opcodes only; nothing is resolved or called."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None or z.getinfo(member).file_size > limit:
                    return []
                data = z.read(member)
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - a malformed pickle: report what was read up to there
        pass
    return [n for n in dict.fromkeys(names) if not _SAFE_GLOBALS.match(n)]


def _first_line(exc) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


MAX_CHECKPOINT_BYTES = 64 << 30


def safe_torch_load(path, map_location="cpu", *, follow_links: Optional[bool] = None):
    """Load a torch file with ``weights_only=True``; refuse anything needing full unpickling.

    The file must be a regular file (a FIFO or device is refused before it can hang or flood the
    reader) of at most :data:`MAX_CHECKPOINT_BYTES`, read through the descriptor that was checked;
    a run directory's ``checkpoint.pt`` is never read through a symbolic link (``follow_links``
    None: links are followed for any other name, e.g. a teacher checkpoint named in a config)."""
    path = Path(path)
    if follow_links is None:
        follow_links = path.name != "checkpoint.pt"
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, f"checkpoint not found: {path}", str(path))
    try:
        f = open_binary(path, max_bytes=MAX_CHECKPOINT_BYTES, follow_links=follow_links)
    except PermissionError as exc:
        raise StorageError(path, exc, action="read") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BadInputError(f"{path} is empty (0 bytes), not a torch checkpoint")
        try:
            with warnings.catch_warnings():  # "Detected pickle protocol 4": the refusal below says what matters
                warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it needs full unpickling, which can execute arbitrary code "
                f"(weights-only load said: {_weights_only_reason(exc, path)}). Only load checkpoints "
                "saved as tensors/plain containers or safetensors; if you trust the file, convert it "
                "yourself to a state_dict of tensors.") from None
        except PermissionError as exc:
            raise StorageError(path, exc, action="read") from None
        except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError,
                MemoryError, RecursionError, OverflowError, zipfile.BadZipFile) as exc:
            raise BadInputError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: "
                                f"{_first_line(exc)})") from None


def ensure_writable_dir(path, what: str = "--out", create: bool = True) -> Optional[bool]:
    """Prove a file can be written in directory ``path`` -- before hours of work, not after --,
    creating it (and its parents) if ``create``.  Returns whether it was created, or None when it
    does not exist and ``create`` is false.  A path that is a file, a symlink loop or too long is
    bad input (``ValueError`` naming ``what``); a read-only or full file system is a
    :class:`StorageError`."""
    path = Path(path)
    try:
        path.resolve(strict=False)
        exists, is_dir, is_link = path.exists(), path.is_dir(), path.is_symlink()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
        raise BadInputError(f"{what}: {path}: {getattr(exc, 'strerror', None) or _first_line(exc)}") from None
    if exists and not is_dir:
        raise BadInputError(f"{what}: {path} exists and is not a directory")
    if is_link and not exists:
        try:
            os.stat(str(path))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadInputError(f"{what}: {path} is a symbolic link loop") from None
        raise BadInputError(f"{what}: {path} is a dangling symbolic link")
    if not exists:
        if not create:
            return None
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BadInputError(f"{what}: {path} (or one of its parents) exists and is not a directory") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR):  # the path itself is wrong
                raise BadInputError(f"{what}: {path}: {exc.strerror}") from None
            raise StorageError(path, exc, action="create the directory") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".rb_labelrefine.", suffix=".probe", dir=str(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(path, exc, action="write into") from None
    return not exists
