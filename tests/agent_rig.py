"""Helpers shared by the agent runner tests: a hand-moved monotonic clock, and a bounded wait
for a real process to reach a state."""

from __future__ import annotations

import time
from collections.abc import Callable


class FakeClock:
    """A monotonic clock the test moves; the runner's kill grace runs on it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    """Wait for a real process to reach a state (not for time to pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a process")
        time.sleep(0.01)
