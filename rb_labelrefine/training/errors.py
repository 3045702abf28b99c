"""The trainer's exceptions, in a module of their own: ``trainer`` and ``distributed`` both raise
them without importing each other."""
from __future__ import annotations

__all__ = ["TrainingInterrupted", "NonFiniteLossError", "ResumeError", "RunLockedError"]


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT: the current step finished, a checkpoint was written."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the last good state was checkpointed."""


class ResumeError(ValueError):
    """The resume directory does not belong to this config, or its checkpoint is unusable."""


class RunLockedError(ResumeError):
    """Another live process holds the run directory's lock."""
