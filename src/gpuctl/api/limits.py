"""How many calls may be in flight, per caller and overall, so that nothing one client does
starves the rest: streams hold a worker thread each for as long as they run, so they get a
share of the pool, never all of it, and agents keep threads of their own for heartbeats."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from gpuctl.core.errors import ResourceExhausted
from gpuctl.core.trust import Principal, Role


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSettings:
    workers: int = 64  # the server's thread pool
    agent_reserve: int = 8  # threads people's calls never take: heartbeats always get through
    max_streams: int = 16  # open watches and log follows, everyone's together
    streams_per_caller: int = 4
    calls_per_caller: int = 16  # unary calls in flight from one caller
    calls_per_node: int = 4  # an agent calls one at a time; a few in flight at most

    def violations(self) -> list[str]:
        out = []
        if self.workers < self.agent_reserve + self.max_streams + 1:
            out.append(
                f"workers ({self.workers}) must exceed agent_reserve + max_streams "
                f"({self.agent_reserve} + {self.max_streams}), or unary calls could starve"
            )
        return out


BUSY = "gpuctld is busy: too many calls in flight"
BUSY_RETRY_S = 0.5


class Limits:
    def __init__(self, settings: LimitSettings | None = None) -> None:
        self.settings = settings or LimitSettings()
        self._lock = threading.Lock()
        self._calls: Counter[tuple[str, str]] = Counter()
        self._streams: Counter[tuple[str, str]] = Counter()
        self._people = 0  # people's calls and streams in flight
        self._streams_total = 0

    def acquire(self, who: Principal, *, stream: bool) -> None:
        """Take a slot for a call by `who`, or raise `ResourceExhausted` at once."""
        s = self.settings
        key = (who.role.value if who.role is Role.NODE else "person", who.name)
        with self._lock:
            if who.role is Role.NODE:
                if self._calls[key] >= s.calls_per_node:
                    raise ResourceExhausted(
                        f"node {who.name} has {s.calls_per_node} calls in flight already",
                        retry_after_s=0.5,
                    )
                self._calls[key] += 1
                return
            if self._people >= s.workers - s.agent_reserve:
                raise ResourceExhausted(BUSY, retry_after_s=BUSY_RETRY_S)
            if stream:
                if self._streams[key] >= s.streams_per_caller:
                    raise ResourceExhausted(
                        f"{who.name} has {s.streams_per_caller} watches or log follows open "
                        "already; close one",
                        retry_after_s=5.0,
                    )
                if self._streams_total >= s.max_streams:
                    raise ResourceExhausted(
                        f"gpuctld serves {s.max_streams} watches and log follows at most",
                        retry_after_s=5.0,
                    )
                self._streams[key] += 1
                self._streams_total += 1
            else:
                if self._calls[key] >= s.calls_per_caller:
                    raise ResourceExhausted(
                        f"{who.name} has {s.calls_per_caller} calls in flight already",
                        retry_after_s=0.5,
                    )
                self._calls[key] += 1
            self._people += 1

    def release(self, who: Principal, *, stream: bool) -> None:
        key = (who.role.value if who.role is Role.NODE else "person", who.name)
        with self._lock:
            counter = self._streams if stream and who.role is not Role.NODE else self._calls
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
            if who.role is not Role.NODE:
                self._people -= 1
                if stream:
                    self._streams_total -= 1
