"""Errors raised by the data sources.

Both derive from the built-in exception a caller would already catch (``FileNotFoundError``
for absent data, ``ValueError`` for bad bytes), so generic handlers keep working while the CLI
can still tell "go and get the data" apart from "the files you have are broken".
"""
from __future__ import annotations

__all__ = ["DatasetNotFoundError", "CorruptDatasetError", "UnsafePickleError"]


# defined in the package's leaf errors.py (each with its exit code: 2); re-exported here
from ..errors import CorruptDatasetError, DatasetNotFoundError, UnsafePickleError  # noqa: F401
