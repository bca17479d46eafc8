"""The daemon's periodic work on APScheduler: the scheduling cycle (also woken on demand),
heartbeat expiry, time limits and lease bookkeeping."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self) -> None:
        # One worker: the controller serialises mutations anyway, and one thread keeps the
        # order of cycles and expiry checks simple to reason about.
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._again: set[str] = set()  # woken while running: run once more when it ends
        self._woken: set[str] = set()  # a woken run is due and not started yet
        self._next_wake: dict[str, float] = {}  # name: monotonic time a wake may run it

    def every(
        self,
        name: str,
        seconds: float,
        fn: Callable[[], object],
        *,
        min_gap_s: float = 0.0,
        rest: float = 0.0,
    ) -> None:
        """Run `fn` every `seconds`, and when woken; a woken run starts no sooner than
        `min_gap_s`, nor `rest` times the length of the last runs, after the last run ended
        (so that a storm of wakes leaves it at most 1 / (1 + rest) of the time). The shorter
        of the last two runs counts: one long run alone (the first cycle over a store full of
        work) does not hold the next back."""
        took = [0.0]  # the run before the last

        def run() -> None:
            with self._lock:
                self._running.add(name)
                self._again.discard(name)
                self._woken.discard(name)
            start = time.monotonic()
            try:
                fn()
            except Exception:
                log.exception("periodic task %s failed; it runs again in %gs", name, seconds)
            finally:
                end = time.monotonic()
                with self._lock:
                    self._running.discard(name)
                    length = min(end - start, took[0])
                    took[0] = end - start
                    self._next_wake[name] = end + max(min_gap_s, rest * length)
                    again = name in self._again
                    self._again.discard(name)
                if again:
                    self.wake(name)

        self.scheduler.add_job(
            run, "interval", seconds=seconds, id=name, name=name, next_run_time=datetime.now(UTC)
        )

    def wake(self, name: str) -> None:
        """Run `name` as soon as possible (coalesced with a run already due)."""
        if not self.scheduler.running:
            return
        with self._lock:
            if name in self._running:
                # A wake during a run: once more when it ends, however many wakes come
                # (waking the scheduler now would only be refused, max_instances = 1).
                self._again.add(name)
                return
            if name in self._woken:
                return  # a run is due already
            self._woken.add(name)
            wait = self._next_wake.get(name, 0.0) - time.monotonic()
        job = self.scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=max(0.0, wait)))

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
