"""Periodic work: a wake during a run is not lost (it runs once more as soon as the run ends,
not at the next interval), and many wakes make one run."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from gpuctl.runtime.periodic import Periodic
from tests.test_e2e import wait_until


def test_wakes_during_a_run_make_one_more_run_at_once():
    periodic = Periodic()
    started, release, second = threading.Event(), threading.Event(), threading.Event()
    runs = []

    def cycle() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            started.set()
            release.wait(10)
        else:
            second.set()

    periodic.every("cycle", 3600, cycle)  # the interval never comes: only wakes run it
    periodic.start()
    try:
        assert started.wait(10)
        for _ in range(50):  # a burst of submits during the cycle
            periodic.wake("cycle")
        release.set()
        assert second.wait(10), "the wake during the run was lost"
    finally:
        periodic.shutdown()
    assert runs == [0, 1]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_woken_runs_keep_their_gap_and_leave_the_rest_of_the_time_to_others(monkeypatch):
    """A storm of wakes runs the cycle at most every `min_gap_s`, and after runs of d seconds
    not before `rest` x d: the cycle gets at most 1 / (1 + rest) of the time. One long run
    alone (the first, over a full store) does not hold the next back."""
    clock = _Clock()
    monkeypatch.setattr("gpuctl.runtime.periodic.time", clock)
    periodic = Periodic()
    runs = threading.Semaphore(0)

    def cycle() -> None:
        clock.now += 4.0  # a 4-second cycle
        runs.release()

    periodic.every("cycle", 3600, cycle, min_gap_s=0.5, rest=2.0)
    periodic.start()
    try:
        assert runs.acquire(timeout=10)
        wait_until(lambda: "cycle" not in periodic._running)
        before = datetime.now(UTC)
        periodic.wake("cycle")  # after one long run: the gap only
        due = periodic.scheduler.get_job("cycle").next_run_time
        assert due - before <= timedelta(seconds=0.6)
        assert runs.acquire(timeout=10)  # the second 4-second run
        wait_until(lambda: "cycle" not in periodic._running)
        before = datetime.now(UTC)
        periodic.wake("cycle")
        due = periodic.scheduler.get_job("cycle").next_run_time
        assert timedelta(seconds=7.5) < due - before <= timedelta(seconds=8.5)  # 2 x 4 s
        periodic.wake("cycle")  # more wakes change nothing: one run is due
        assert periodic.scheduler.get_job("cycle").next_run_time == due
        assert not runs.acquire(blocking=False)
    finally:
        periodic.shutdown()
