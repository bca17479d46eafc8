"""Where a call's handler runs, so that people's calls can neither delay agents' calls nor
queue without end.

The server is `grpc.aio` (api.server): one thread runs gRPC and an event loop; the handlers,
which block (the store, the controller's lock), run on threads of two lanes. People's calls
run on a lane of their own, and when its threads are all taken the next one is refused at
once (RESOURCE_EXHAUSTED, with RetryInfo) instead of queued; everything else (agents, health
checks) runs on the other lane, which people's calls never fill. The fast local reads run on
the loop's own thread (`ApiServer(inline_reads=...)`) and take no lane at all.

Within the people's lane a `Gate` lets only a few handlers run at once: one interpreter runs
Python one thread at a time, and with 32 handlers in flight every release of the GIL (each
SQLite call) started a contest among all of them, ~350 futex calls a call and ~40 % of a core
in the kernel. A handler leaves the gate as soon as it waits on a commit, so the writes of many
calls still share one commit (store.groupcommit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

T = TypeVar("T")

# Handlers running Python at once. Measured on a 2-core machine with 32 GetJob calls in flight:
# 1 or 2 gave 560-660 calls/s, no gate 430-460/s; writers leave it when they wait, so it does
# not shrink their commits. Python runs one thread at a time whatever the cores, so 2 is
# enough anywhere: one runs while the other is in C.
GATE_SLOTS = 2


class Gate:
    """At most `slots` threads between `enter` and `leave` (or the end of the `with`). A
    thread enters only while it holds nothing else (at the start of a handler) and never
    enters again once it left, so no lock is ever held while waiting for the gate."""

    def __init__(self, slots: int = GATE_SLOTS) -> None:
        self._slots = threading.BoundedSemaphore(slots)  # a release too many raises
        self._inside = threading.local()

    def __enter__(self) -> Gate:
        self._slots.acquire()
        self._inside.held = True
        return self

    def __exit__(self, *_exc: object) -> None:
        self.leave()

    def leave(self) -> None:
        """Let the next thread in (this one is about to wait on I/O); a no-op for a thread
        that is not inside."""
        if getattr(self._inside, "held", False):
            self._inside.held = False
            self._slots.release()


class Lanes:
    """The two lanes' threads. People's work is admitted (`admit`) while the lane has a free
    thread, and runs through the gate when `gated`; a streaming call stays admitted from its
    start to its end, since each of its steps may wait (a watch waiting for a change)."""

    def __init__(self, *, people: int, others: int) -> None:
        self._people = futures.ThreadPoolExecutor(people, thread_name_prefix="grpc-people")
        self._others = futures.ThreadPoolExecutor(others, thread_name_prefix="grpc-others")
        self._capacity = people
        self.gate = Gate()
        self._lock = threading.Lock()
        self._taken = 0  # people's calls admitted and not yet done

    @property
    def people_in_flight(self) -> int:
        return self._taken

    def admit(self) -> bool:
        """Take a place in the people's lane, if one is free; `done` gives it back."""
        with self._lock:
            if self._taken >= self._capacity:
                return False
            self._taken += 1
            return True

    def done(self) -> None:
        with self._lock:
            self._taken -= 1

    def call(self, people: bool, fn: Callable[..., T], *args: Any) -> futures.Future[T]:
        """Run a unary call's handler `fn(*args)` on a thread: of the people's lane (`people`;
        admitted already, and done when it returns), through the gate; else of the other."""
        if people:
            return self._people.submit(self._gated, fn, args)
        return self._others.submit(fn, *args)

    def step(self, people: bool, fn: Callable[..., T], *args: Any) -> futures.Future[T]:
        """Run one step of a streaming call on a thread of its lane (outside the gate: a step
        may wait long)."""
        return (self._people if people else self._others).submit(fn, *args)

    def _gated(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            with self.gate:
                return fn(*args)
        finally:
            self.done()

    def shutdown(self) -> None:
        """Take no more work; what runs finishes on its own (a handler cannot be stopped)."""
        self._people.shutdown(wait=False, cancel_futures=True)
        self._others.shutdown(wait=False, cancel_futures=True)
