"""StopFlag: SIGINT and SIGTERM ask a training loop to save a checkpoint and stop after the
current step, instead of killing it mid-step. A second signal aborts at once, without waiting
for the save (saves are atomic: the previous checkpoint stays intact)."""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while the loop was stopping: it aborts without saving."""

    def __init__(self, signum: int):
        super().__init__(f"a second {signal.Signals(signum).name} while stopping; aborted without saving")
        self.signum = signum


class StopFlag:
    """The first SIGINT / SIGTERM asks the loop to save a checkpoint and stop after the current
    step (`requested`, and `signum` says which signal); a second one raises Interrupted."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        self.requested = True

    @property
    def exit_status(self) -> int | None:
        """The shell's status for death by the signal received (128 + its number): 130 for
        SIGINT, 143 for SIGTERM; None when no signal came."""
        return None if self.signum is None else 128 + self.signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
