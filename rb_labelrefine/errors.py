"""Every error the package raises on purpose, each with the exit code the command line gives it.

A leaf module: it imports nothing of the package (nor torch), so any module may raise these and
``cli._classify`` may read ``exit_code`` off any exception without importing the module that
raised it.  The table (the README's command-line section lists it too):

====  ==========================================================================================
0     success
1     training failed: a non-finite loss, or a rank stopped answering under torchrun (the last
      good state is checkpointed and resumable)
2     bad input: config, argument, data, checkpoint or run directory (the message names the
      field or path)
3     stopped by SIGTERM/SIGINT with a resumable checkpoint (the message prints ``--resume``)
4     an I/O failure: disk full, read-only or unwritable path
5     ``eval --sanity``: a gradient-masking check failed
70    an internal error: any exception that is not one of these types (a bug)
130   a second signal stopped the run at once
====  ==========================================================================================

Where a type also derives from a built-in exception (``ValueError``, ``FileNotFoundError``,
``OSError``, ``ImportError``) it is so that generic handlers written before keep working; the exit
code comes from ``exit_code``, never from the built-in base: a plain ``ValueError`` raised inside
the package is a bug (70), not bad input.
"""
from __future__ import annotations

import errno as _errno
import os as _os
from pathlib import Path as _Path

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_IO", "EXIT_CHECK_FAILED",
           "EXIT_INTERNAL", "EXIT_SECOND_SIGNAL", "PackageError", "BadInputError", "ConfigError", "UsageError",
           "ResumeError", "RunLockedError", "UnsafeCheckpointError", "TrainingInterrupted", "NonFiniteLossError",
           "StorageError", "MissingExtraError", "DatasetNotFoundError", "CorruptDatasetError", "UnsafePickleError",
           "ExportError", "exit_code_of"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_IO, EXIT_CHECK_FAILED = 0, 1, 2, 3, 4, 5
EXIT_INTERNAL = 70
EXIT_SECOND_SIGNAL = 130


class PackageError(Exception):
    """Base of the errors raised on purpose; ``exit_code`` is what the command line exits with."""
    exit_code = EXIT_INTERNAL


class BadInputError(PackageError, ValueError):
    """Bad input the user can fix; the message names the field, argument or path (exit 2)."""
    exit_code = EXIT_USAGE


class ConfigError(BadInputError):
    """A config value is missing, of the wrong type or out of range."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"config field '{field}': {message}")

    def __reduce__(self):  # picklable, so it crosses process-pool boundaries intact
        return (type(self), (self.field, self.message))


class UsageError(BadInputError):
    """A bad command-line argument."""


class ResumeError(BadInputError):
    """The resume directory does not belong to this config, or its checkpoint is unusable."""


class RunLockedError(ResumeError):
    """Another live process holds the run directory's lock."""


class UnsafeCheckpointError(PackageError, RuntimeError):
    """The file is not loadable without executing code from it (an untrusted input: exit 2)."""
    exit_code = EXIT_USAGE


class TrainingInterrupted(PackageError, RuntimeError):
    """SIGTERM/SIGINT: the current step finished, a checkpoint was written."""
    exit_code = EXIT_INTERRUPTED


class NonFiniteLossError(PackageError, RuntimeError):
    """The loss became NaN/Inf; the last good state was checkpointed."""
    exit_code = EXIT_FAILED


class StorageError(PackageError, OSError):
    """A file or directory could not be written: the message names the path, the reason and, for
    a full disk, how many bytes the write needed."""
    exit_code = EXIT_IO

    def __init__(self, path, exc: OSError, size=None, action: str = "write"):
        code = exc.errno if isinstance(exc, OSError) else None
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
        msg = f"cannot {action} {path}: {reason}"
        if code == _errno.ENOSPC:
            need = f"{size:,} bytes needed" if size is not None else "size of the write unknown"
            msg += f" ({need}, {_free_bytes(_Path(path).parent)} free)"
        super().__init__(code, msg, str(path))
        self.path, self.size = _Path(path), size

    def __str__(self):
        return self.strerror


def _free_bytes(directory) -> str:
    try:
        st = _os.statvfs(str(directory))
        return f"{st.f_bavail * st.f_frsize:,} bytes"
    except OSError:
        return "unknown"


class MissingExtraError(PackageError, ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""
    exit_code = EXIT_USAGE


class DatasetNotFoundError(PackageError, FileNotFoundError):
    """The data set's files are not where we looked; the message lists every path tried."""
    exit_code = EXIT_USAGE

    def __init__(self, name: str, looked_at, hint: str = ""):
        self.name = name
        self.looked_at = [str(p) for p in looked_at]
        lines = [f"{name} not found. Looked at:"]
        lines += [f"  - {p}" for p in self.looked_at]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))

    def __str__(self) -> str:
        # FileNotFoundError's default formatting expects (errno, strerror); keep our message.
        return self.args[0]


class CorruptDatasetError(BadInputError):
    """A data file exists but its contents are not what the format promises."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(CorruptDatasetError):
    """A pickle asked for something a genuine data file never contains (code execution)."""


class ExportError(BadInputError):
    """Bad input to the exporter; the message names the argument, file or field."""


def exit_code_of(exc: BaseException):
    """The exit code an exception carries, or ``None`` for one of no type of this module."""
    code = getattr(type(exc), "exit_code", None)
    return code if isinstance(code, int) else None
