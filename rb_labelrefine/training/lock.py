"""One writer per run directory: :class:`RunLock` (``fcntl.flock``: the kernel releases it when its
holder exits in any way, kill -9 included, so a lock left by a dead process is never stale).  Only a
training run writes into a run directory, so the lock is the trainer's; the file layer under it is
:mod:`rb_labelrefine.fileio`."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
from pathlib import Path
from typing import Optional

from ..errors import RunLockedError, StorageError
from ..fileio import FILE_MODE

__all__ = ["RunLock", "LOCK_FILE"]


LOCK_FILE = ".rb_labelrefine.lock"


class RunLock:
    """An exclusive lock on a run directory (``DIR/.rb_labelrefine.lock``), held while a run trains.

    ``fcntl.flock`` on an open file: the kernel drops it when the holder exits however it exits
    (kill -9 included), so a lock file left behind by a dead process never blocks anyone; the file
    holds the holder's PID and host for the message a second writer gets.  Released (and the file
    removed) by :meth:`release`."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: Optional[int] = None
        self.stale: Optional[str] = None   # the holder a lock file named when it was found unlocked

    def acquire(self) -> "RunLock":
        import fcntl

        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.directory} is in use by another rb-labelrefine process ({holder}); one run directory "
                    "takes one writer at a time: wait for it to finish or stop it, or choose another --out "
                    "(nothing was changed)") from None
            except OSError as exc:
                os.close(fd)
                raise StorageError(self.path, exc, action="lock") from None
            # the holder before us may have removed the file between our open and our lock: then
            # we locked an orphaned inode, and must lock the file that is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(str(self.path)).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        self.stale = previous if _HOLDER.fullmatch(previous) else None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def _open(self) -> int:
        """Open (or create) the lock file without ever following a link or blocking on a special
        file: a downloaded run directory may hold ``.rb_labelrefine.lock -> ../victim`` (a link
        survives unpacking), and opening through it would truncate and overwrite the victim.
        ``O_NOFOLLOW`` refuses a link in the last component, ``O_NONBLOCK`` keeps a FIFO from
        hanging the open, and the opened file must be a regular file with one name (a hard link
        to a file elsewhere is refused too).  Anything else is a :class:`RunLockedError` (exit 2)
        naming the path; nothing is written."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
            | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(str(self.path), flags, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(str(self.path)):
                raise RunLockedError(_refused_lock(self.path, "is a symbolic link")) from None
            if exc.errno in (errno.ENXIO, errno.EISDIR):
                raise RunLockedError(_refused_lock(self.path, "is not a regular file")) from None
            raise StorageError(self.path, exc, action="create the lock file") from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise StorageError(self.path, exc, action="inspect the lock file") from None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise RunLockedError(_refused_lock(self.path, "is not a regular file"))
        if st.st_nlink > 1:
            os.close(fd)
            raise RunLockedError(_refused_lock(self.path, f"has {st.st_nlink} hard links (a file shared with "
                                                          "another place)"))
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(str(self.path))     # while still locked: nobody can have taken it meanwhile
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_HOLDER = re.compile(r"pid \d{1,10} on [A-Za-z0-9._-]{1,255}")


def _refused_lock(path: Path, why: str) -> str:
    return (f"refusing to use the run lock {path}: it {why}; a run directory's lock file is created by "
            "rb-labelrefine itself, never through a link. Remove it if the directory is yours, or train into "
            "another --out (nothing was changed)")


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "PID unknown"
