"""End to end, high availability: two gpuctld on one PostgreSQL, agents and a client given
both addresses; the leader is killed with SIGKILL under a submit storm with a gang running
(`gpuctl.bench_failover`, one short round)."""

from __future__ import annotations

import pytest

from gpuctl.bench_failover import one_round

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_a_standby_takes_over_losing_nothing_and_binding_nothing_twice(postgres_server, tmp_path):
    r = one_round(postgres_server, tmp_path, storm_s=3.0)
    assert r.acked > 0
    assert (r.lost, r.bound_twice, r.gang_restarted, r.nodes_lost) == (0, 0, 0, 0)
    # It takes over at all; how fast is the benchmark's figure (make bench-failover), not a test's.
    assert r.leading_s < 30.0 and r.takeover_s < 30.0
