"""gRPC's thread pool in two lanes, so that people's calls can neither delay agents' calls nor
queue without end.

gRPC hands each call to the pool before a servicer sees it, and a plain pool is one queue:
under a flood of people's calls, an agent's heartbeat waited its turn behind hundreds, and
every caller's latency grew with the flood. Here people's calls (the interceptor marks them,
`PeopleCall`) run on a lane of their own, and when its threads are all taken the next one is
refused at once (RESOURCE_EXHAUSTED, with RetryInfo) instead of queued; everything else
(agents, health checks, the refusals themselves, which take microseconds) runs on the other
lane, which people's calls never fill.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any


class PeopleCall:
    """A people's call behavior, marked for the people's lane; `refuse` answers it instead
    when the lane is full."""

    __slots__ = ("behavior", "refuse")

    def __init__(self, behavior: Callable[..., Any], refuse: Callable[..., Any]) -> None:
        self.behavior = behavior
        self.refuse = refuse

    def __call__(self, *args: Any) -> Any:
        return self.behavior(*args)


class Lanes(futures.Executor):
    def __init__(self, *, people: int, others: int) -> None:
        self._people = futures.ThreadPoolExecutor(people, thread_name_prefix="grpc-people")
        self._others = futures.ThreadPoolExecutor(others, thread_name_prefix="grpc-others")
        self._capacity = people
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
