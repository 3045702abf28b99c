"""Errors raised by the data sources.

Both derive from the built-in exception a caller would already catch (``FileNotFoundError``
for absent data, ``ValueError`` for bad bytes), so generic handlers keep working while the CLI
can still tell "go and get the data" apart from "the files you have are broken".
"""
from __future__ import annotations

__all__ = ["DatasetNotFoundError", "CorruptDatasetError", "UnsafePickleError"]


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where we looked; the message lists every path tried."""

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


class CorruptDatasetError(ValueError):
    """A data file exists but its contents are not what the format promises."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(CorruptDatasetError):
    """A pickle asked for something a genuine data file never contains (code execution)."""
