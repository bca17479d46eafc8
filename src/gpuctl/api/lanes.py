"""gRPC's thread pool in two lanes, so that people's calls can neither delay agents' calls nor
queue without end.

gRPC hands each call to the pool before a servicer sees it, and a plain pool is one queue:
under a flood of people's calls, an agent's heartbeat waited its turn behind hundreds, and
every caller's latency grew with the flood. Here people's calls (the interceptor marks them,
`PeopleCall`) run on a lane of their own, and when its threads are all taken the next one is
refused at once (RESOURCE_EXHAUSTED, with RetryInfo) instead of queued; everything else
(agents, health checks, the refusals themselves, which take microseconds) runs on the other
lane, which people's calls never fill.

Within the people's lane a `Gate` lets only a few handlers run at once: one interpreter runs
Python one thread at a time, and with 32 handlers in flight every release of the GIL (each
SQLite call, each gRPC call into C) started a contest among all of them, ~350 futex calls a
call and ~40 % of a core in the kernel. A handler leaves the gate as soon as it waits on a
commit, so the writes of many calls still share one commit (store.groupcommit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

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


class PeopleCall:
    """A people's call behavior, marked for the people's lane; `refuse` answers it instead
    when the lane is full. It runs inside `gate`: for a streaming call that is only making
    its generator, so a watch waiting for changes never holds the gate."""

    __slots__ = ("behavior", "gate", "refuse")

    def __init__(
        self, behavior: Callable[..., Any], refuse: Callable[..., Any], gate: Gate | None = None
    ) -> None:
        self.behavior = behavior
        self.refuse = refuse
        self.gate = gate

    def __call__(self, *args: Any) -> Any:
        if self.gate is None:
            return self.behavior(*args)
        with self.gate:
            return self.behavior(*args)


class Lanes(futures.Executor):
    def __init__(self, *, people: int, others: int) -> None:
        self._people = futures.ThreadPoolExecutor(people, thread_name_prefix="grpc-people")
        self._others = futures.ThreadPoolExecutor(others, thread_name_prefix="grpc-others")
        self._capacity = people
        self.gate = Gate()
        self._lock = threading.Lock()
        self._taken = 0  # people's calls running or about to

    @property
    def people_in_flight(self) -> int:
        return self._taken

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        # gRPC submits a function of the call, with the method's behavior among its arguments.
        marked = next((i for i, a in enumerate(args) if isinstance(a, PeopleCall)), None)
        if marked is None:
            return self._others.submit(fn, *args, **kwargs)
        with self._lock:
            admitted = self._taken < self._capacity
            if admitted:
                self._taken += 1
        if not admitted:
            refused = list(args)
            refused[marked] = args[marked].refuse
            return self._others.submit(fn, *refused, **kwargs)
        return self._people.submit(self._run, fn, args, kwargs)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:  # every task admitted runs (a call cancelled meanwhile returns at once)
            with self._lock:
                self._taken -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._people.shutdown(wait, cancel_futures=cancel_futures)
        self._others.shutdown(wait, cancel_futures=cancel_futures)
