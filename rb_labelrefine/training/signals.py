"""The stop state of a run: the one owner of "was a SIGTERM/SIGINT received, and does it apply yet".

One :class:`StopSignal` per trainer.  Its handler is the only thing that notes a signal, in a single
process and under torchrun:

* in a single process, and after the last training step (final weights, AutoAttack: no collectives
  left), a signal applies at once: :attr:`requested` is true from the next safe point on;
* during training under torchrun, a signal is only *pending* until every rank agrees at the same
  step (:meth:`agree`, given the process group's all-reduce of a flag), so all ranks stop -- or go
  on -- together.  The distributed helpers only agree on the flag; they write nothing here.

A second signal while one is noted raises :class:`KeyboardInterrupt` (stop now).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Callable, Optional

__all__ = ["StopSignal"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Stop requests of one run; ``log(msg)`` says what a received signal will do."""

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self.signum: Optional[int] = None      # the stop that applies (agreed on under torchrun)
        self._pending: Optional[int] = None    # noted, not yet agreed on by every rank
        self._agree = False                    # under torchrun, during training
        self.finishing = False                 # the last training step is done

    # ------------------------------------------------------------------ state
    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Stop at the next safe point, as a received (and agreed) signal would."""
        self.signum = int(signum)

    # ------------------------------------------------------------------ the handler
    def handle(self, signum, frame=None) -> None:
        if self.signum is not None or self._pending is not None:
            raise KeyboardInterrupt  # second signal: stop now
        if self._agree and not self.finishing:
            self._pending = signum
        else:
            self.signum = signum
        what = signal.Signals(signum).name
        if self.finishing:
            self._log(f"received {what} after the last training step: stopping after the current write (a second "
                      "signal stops at once)")
        else:
            self._log(f"received {what}: finishing the current step, then checkpointing")

    @contextlib.contextmanager
    def installed(self, enabled: bool = True, *, distributed: bool = False):
        """The handler for SIGTERM/SIGINT while the block runs (``enabled``; only possible in the main
        thread), the previous handlers after it.  ``distributed``: ranks agree before a stop applies."""
        self._agree = bool(distributed)
        old = {}
        if enabled:
            for sig in _SIGNALS:
                with contextlib.suppress(ValueError):  # not the main thread
                    old[sig] = signal.signal(sig, self.handle)
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    # ------------------------------------------------------------------ torchrun
    def agree(self, any_rank: Callable[[bool], bool]) -> bool:
        """Whether any rank has a pending signal (``any_rank`` is the collective: every rank calls this
        at the same step); if so the stop applies on every rank.  Returns whether it newly applied."""
        if not any_rank(self._pending is not None):
            return False
        self.signum = self._pending or signal.SIGTERM
        self._pending = None
        return True

    def finish(self) -> None:
        """The last training step is done: from now on a signal applies at once; one that arrived after
        the last agreement applies now."""
        self.finishing = True
        if self._pending is not None:
            self.signum, self._pending = self._pending, None
