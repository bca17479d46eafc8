"""`python -m gpuctl.sim.digest` (`make decisions-digest`): a digest of every decision the core
makes over B2-style inputs, so a change meant to keep every decision (issue "The core's shape")
is checked, not assumed: run it before and after, and compare.

Per size (nodes x pending, seed): one 512-GPU gang alone, 300 inference replica sets alone, the
burst cycle over the mixed queue, the same with every node leased, then three steady cycles
(the previous decisions applied, 1 % of the running jobs done, the queue topped up). Every
binding (with its placement), reason, reservation, preemption, lease request and release goes
into the digest, in order.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from gpuctl.core.cycle import CycleResult, schedule
from gpuctl.core.plugins import DEFAULT_POLICY, build_policy
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.scale import (
    NOW,
    background,
    gang_job,
    inference_jobs,
    leased,
    pending_jobs,
    scale_cluster,
    steady_step,
)

SIZES = ((1000, 10_000, 1), (300, 3000, 2), (2000, 5000, 3))


def _add(h: hashlib._Hash, result: CycleResult) -> None:
    for b in result.bindings:
        h.update(repr((b.job_id, b.placement)).encode())
    for u in result.unschedulable:
        h.update(repr((u.job_id, u.reason)).encode())
    for decisions in (
        result.reservations,
        result.preemptions,
        result.lease_requests,
        result.lease_releases,
    ):
        h.update(repr(decisions).encode())


def digest(nodes: int, pending: int, seed: int, *, steady: int = 3, policy: str = "") -> str:
    chosen = build_policy(policy or DEFAULT_POLICY)
    cluster = scale_cluster(nodes)
    running = list(background(cluster, seed=seed))
    snapshot = Snapshot.build(cluster, running)
    h = hashlib.sha256()
    _add(h, schedule(snapshot, (gang_job(512),), chosen, now=NOW))
    _add(h, schedule(snapshot, inference_jobs(300, seed=seed + 1), chosen, now=NOW))
    queue = list(pending_jobs(pending, seed=seed + 2))
    result = schedule(snapshot, queue, chosen, now=NOW)
    _add(h, result)
    _add(h, schedule(snapshot, queue, chosen, now=NOW, leasing=leased(cluster)))
    now, next_id = NOW, pending + 1
    for cycle in range(steady):
        running, queue, now, next_id = steady_step(
            result, running, queue, now, seed=seed + 100 + cycle, queue=pending, next_id=next_id
        )
        result = schedule(Snapshot.build(cluster, running), queue, chosen, now=now)
        _add(h, result)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuctl.sim.digest", description=__doc__)
    p.add_argument("--policy", default="", help=f"default: {DEFAULT_POLICY}")
    args = p.parse_args(argv)
    for nodes, pending, seed in SIZES:
        print(f"{nodes} nodes x {pending} pending, seed {seed}: ", end="", flush=True)
        print(digest(nodes, pending, seed, policy=args.policy), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
