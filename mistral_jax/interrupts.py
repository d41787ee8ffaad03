"""Signals as values: SIGINT / SIGTERM / SIGHUP recorded and acted on where the work can stop cleanly.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupted(BaseException):
    """A signal whose default action is to end the process: unwinds, then it is raised again."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside a garbage-collection callback (jax has one)."""
    import gc

    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


class Interrupts:
    """Records SIGINT / SIGTERM instead of letting their handlers raise wherever Python is
    (a KeyboardInterrupt raised in a garbage-collection callback is printed and dropped, and
    one raised while the partial output is removed would leave it behind). `check()` acts on
    a recorded signal at a point of the conversion's choosing. Until `defer()` (while there
    is nothing to clean up) the handler also runs at once, unless Python is inside a
    garbage-collection callback (the next `check()` acts on it then). Outside the main
    thread, or for a signal that was ignored, it changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.saved: dict[int, Any] = {}
        self.pending: int | None = None
        self.immediate = True

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous not in (signal.SIG_IGN, None):
                    self.saved[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum
        if not self.immediate:
            return
        if in_gc_callback(frame):  # what it raised would be printed and dropped:
            return  # the next check() acts on it
        self._act(signum)
        self.pending = None

    def defer(self) -> None:
        """From now on only record signals (after acting on one already recorded)."""
        self.immediate = False
        self.check()

    def check(self) -> None:
        """Act on a recorded signal: call its previous handler (which raises, as Python's
        SIGINT handler and the CLI's SIGTERM handler do), or for the default action raise
        Interrupted. A handler that returns lets the conversion go on."""
        signum, self.pending = self.pending, None
        if signum is not None:
            self._act(signum)

    def _act(self, signum: int) -> None:
        handler = self.saved[signum]
        if handler == signal.SIG_DFL:
            raise Interrupted(signum)
        handler(signum, None)

    def __exit__(self, kind, exc, tb) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        if isinstance(exc, Interrupted):
            signal.raise_signal(exc.signum)  # the default action: the process ends here
            raise SystemExit(128 + exc.signum)
        if isinstance(exc, Exception):
            self.check()  # a signal recorded while an error unwound: the signal wins
