"""Stopping a run cleanly: SIGTERM and Ctrl-C request a stop, the stop deadline decides whether the current
iteration is finished or dropped.

The first signal marks the stop as requested and calls the trainer's `on_first` callback (it writes a
compact checkpoint of the last finished iteration at once: on a preempted VM the raylet gets the signal
too, and Ray ends the driver when its raylet is gone); a second one interrupts at once
(KeyboardInterrupt). Whether the rest of an iteration still fits before the deadline is estimated from
the seconds per member measured so far (`StopRequest.fits`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

# Signals that stop a run cleanly (a second one aborts at once); exit status 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """A stop was requested (SIGTERM, Ctrl-C) and the current iteration is dropped (raised inside the
    loop only)."""


class StopRequest:
    """Whether a stop was requested, by which signal, and by when the run must have stopped.

    Args:
        deadline_s: seconds from the request within which the run should have stopped
            (`TrainConfig.stop_deadline`).
    """

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.requested = False
        self.signal: int | None = None  # the signal that requested the stop
        self.stop_at: float | None = None  # time.monotonic() by which the run should have stopped
        self.member_s: float | None = None  # wall seconds per member in the last finished iteration
        self.update_s = 0.0  # wall seconds of the last update

    def request(self, signum: int) -> None:
        """Marks the stop as requested by `signum`; the deadline starts now."""
        self.requested, self.signal = True, signum
        self.stop_at = time.monotonic() + self.deadline_s

    def fits(self, done: int, total: int, started: float) -> bool:
        """Whether the rest of an iteration (`done` of `total` members finished since `started`, a
        time.monotonic()) and its update fit before the deadline: estimated from this iteration's members,
        else the last iteration's (`member_s`). False before any estimate exists."""
        now = time.monotonic()
        per_member = (now - started) / done if done else self.member_s  # all engines together
        if per_member is None or self.stop_at is None:
            return False
        return now + per_member * (total - done) + self.update_s <= self.stop_at

    @contextlib.contextmanager
    def signals(self, on_first: Callable[[], None]) -> Iterator[None]:
        """While active (main thread only: elsewhere a no-op), the first of `STOP_SIGNALS` requests the
        stop, says so on the console and calls `on_first`; a second one raises KeyboardInterrupt. The
        previous handlers are put back on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.requested:
                raise KeyboardInterrupt(name)
            self.request(signum)
            tqdm.write(
                f"{name}: stopping; the current iteration is finished if that fits in "
                f"{self.deadline_s:g} s, then a checkpoint is written ({name} again aborts)"
            )
            on_first()

        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
