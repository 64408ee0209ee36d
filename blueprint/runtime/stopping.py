"""SIGTERM and SIGINT while a stage waits on work it started elsewhere (torchrun's ranks, a TrainJob's nodes).

Without this, the signal ends the waiting process at once and what it started runs on, orphaned: ranks holding
GPUs for a minute, a TrainJob holding nodes until its activeDeadlineSeconds. Inside `passing_on(stop)` the first
SIGTERM/SIGINT calls `stop(signum)` instead (pass it on; or raise `Stopped`, so the waiting code cleans up), and
on leaving, once the work is gone, the signal is delivered again to the handler that was there before: the
process then ends as that signal would have ended it (143 for SIGTERM, KeyboardInterrupt for SIGINT). A
`Stopped` raised by `stop` goes on up when that handler returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """Raised by a `stop` callback into the waiting code: a BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def raise_stopped(signum: int) -> None:
    """A `stop` for waiting code that cleans up as it unwinds."""
    raise Stopped(signum)


@contextlib.contextmanager
def passing_on(stop: Callable[[int], None]) -> Iterator[list[int]]:
    """While inside, SIGTERM/SIGINT call `stop(signum)` (the first one only); the list holds what was received.
    Outside the main thread (where handlers cannot be set) it does nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame) -> None:
        if not received:
            received.append(signum)
            stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if received:
            signal.raise_signal(received[0])  # now to the handler before ours: the process ends as it would have
