"""The trainer's exceptions (defined, with their exit codes, in the package's leaf
:mod:`rb_labelrefine.errors`; kept here for the imports written before it)."""
from __future__ import annotations

# defined in the package's leaf errors.py, each with its exit code; re-exported here
from ..errors import NonFiniteLossError, ResumeError, RunLockedError, TrainingInterrupted

__all__ = ["TrainingInterrupted", "NonFiniteLossError", "ResumeError", "RunLockedError"]
