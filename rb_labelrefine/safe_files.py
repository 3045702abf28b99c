"""Reading untrusted files without hanging, exhausting memory or following planted links.

A run directory, an export, a data root or a JSON result may come from elsewhere (a download, an
unpacked archive), so every file the package reads from one goes through this module:

* it is opened with ``O_NONBLOCK`` (a FIFO or a device cannot hang the open) and, where the
  caller says so (``follow_links=False``: files *inside* a run directory, whose names we chose),
  with ``O_NOFOLLOW`` (a planted ``config.yaml -> /dev/zero`` or ``-> ~/.ssh/id_rsa`` is refused);
* the opened file must be a regular file (``fstat`` on the open descriptor, so nothing can be
  swapped in between the check and the read), no larger than a limit given by the caller, checked
  *before* a byte is read;
* JSON is parsed only after a linear scan has bounded its nesting depth (``json`` recurses);
* files the package creates next to a target (``.partial``, ``.tmp``) are created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``: a pre-existing name -- a link above all -- is never written
  through.

Every refusal is an :class:`UnsafeFileError` (bad input: CLI exit 2) whose message names the file.
Stdlib only (and the leaf ``errors.py``): ``leaderboard`` and ``configs`` must not import torch.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from typing import Optional

from .errors import BadInputError

__all__ = ["UnsafeFileError", "open_regular", "open_binary", "read_bytes", "read_text", "read_json",
           "check_json_depth", "create_exclusive", "is_regular_nofollow", "MiB", "GiB"]

MiB, GiB = 1 << 20, 1 << 30
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafeFileError(BadInputError):
    """A file is not something the package reads: a link where none belongs, not a regular file,
    too large, too deeply nested.  ``path`` is the file; the message names it."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


def _label(path, what: Optional[str]) -> str:
    return f"{what}: {path}" if what else str(path)


def open_regular(path, what: Optional[str] = None, *, max_bytes: int, follow_links: bool = True) -> int:
    """An open, blocking, read-only descriptor of the regular file ``path`` of at most ``max_bytes``.

    ``what`` (e.g. ``"--results"``) prefixes the path in messages.  Raises
    :class:`UnsafeFileError` (link refused, not a regular file, too large) or ``FileNotFoundError``
    naming the path; other ``OSError`` s (permissions) pass through with the path set."""
    label = _label(path, what)
    flags = os.O_RDONLY | _NONBLOCK | _CLOEXEC | (0 if follow_links else _NOFOLLOW)
    try:
        fd = os.open(os.fspath(path), flags)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{label} does not exist", str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            if not follow_links and os.path.islink(path):
                raise UnsafeFileError(label, "is a symbolic link; a file in this place is never read through a "
                                      "link (copy the file itself here)") from None
            raise UnsafeFileError(label, "is a symbolic link loop") from None
        if exc.errno in (errno.ENXIO, errno.ENODEV):
            raise UnsafeFileError(label, "is not a regular file (a socket or device)") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise UnsafeFileError(label, "the path is too long") from None
        exc.filename = exc.filename or str(path)
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeFileError(label, "is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
            raise UnsafeFileError(label, f"is {kind}, not a regular file; refusing to read it")
        if st.st_size > max_bytes:
            raise UnsafeFileError(label, f"is {st.st_size:,} bytes; at most {max_bytes:,} are read from such a "
                                  "file (refused before reading it)")
        if _NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_binary(path, what: Optional[str] = None, *, max_bytes: int, follow_links: bool = True):
    """:func:`open_regular` as a binary file object (``with open_binary(...) as f``)."""
    return os.fdopen(open_regular(path, what, max_bytes=max_bytes, follow_links=follow_links), "rb")


def read_bytes(path, what: Optional[str] = None, *, max_bytes: int, follow_links: bool = True) -> bytes:
    with open_binary(path, what, max_bytes=max_bytes, follow_links=follow_links) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:   # grew after the check
        raise UnsafeFileError(_label(path, what), f"holds more than {max_bytes:,} bytes")
    return data


def read_text(path, what: Optional[str] = None, *, max_bytes: int, follow_links: bool = True) -> str:
    data = read_bytes(path, what, max_bytes=max_bytes, follow_links=follow_links)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(_label(path, what), f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def check_json_depth(text: str, max_depth: int, label: str) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (``json`` would recurse into a RecursionError);
    a linear scan that skips strings."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise UnsafeFileError(label, f"is nested more than {max_depth} levels deep; refused")
        elif ch in "]}":
            depth -= 1


def read_json(path, what: Optional[str] = None, *, max_bytes: int = 16 * MiB, max_depth: int = 32,
              follow_links: bool = True):
    """Parse a JSON file, bounded in size and depth.  Errors are :class:`UnsafeFileError` naming the
    file.  ``NaN``/``Infinity`` parse (as Python's ``json`` writes them); the schemas of the fields
    read refuse non-finite values naming the field."""
    label = _label(path, what)
    text = read_text(path, what, max_bytes=max_bytes, follow_links=follow_links)
    check_json_depth(text, max_depth, label)
    try:
        return json.loads(text)
    except RecursionError:
        raise UnsafeFileError(label, "is nested too deeply") from None
    except ValueError as exc:
        raise UnsafeFileError(label, f"is not valid JSON ({exc})") from None


def create_exclusive(path, mode: int = 0o666) -> int:
    """Create ``path`` for writing; refuse (``FileExistsError``) if anything -- a file, a link, a
    dangling link -- already has that name.  Returns the descriptor."""
    return os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def is_regular_nofollow(path) -> bool:
    """``path`` is a regular file itself (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(os.fspath(path)).st_mode)
    except OSError:
        return False
