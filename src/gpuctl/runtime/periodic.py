"""The daemon's periodic work on APScheduler: the scheduling cycle (also woken on demand),
heartbeat expiry, time limits and lease bookkeeping."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

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

    def every(self, name: str, seconds: float, fn: Callable[[], object]) -> None:
        def run() -> None:
            with self._lock:
                self._running.add(name)
                self._again.discard(name)
            try:
                fn()
            except Exception:
                log.exception("periodic task %s failed; it runs again in %gs", name, seconds)
            finally:
                with self._lock:
                    self._running.discard(name)
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
        job = self.scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
