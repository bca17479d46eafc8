"""Periodic work: a wake during a run is not lost (it runs once more as soon as the run ends,
not at the next interval), and many wakes make one run."""

from __future__ import annotations

import threading

from gpuctl.runtime.periodic import Periodic


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
