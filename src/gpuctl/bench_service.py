"""`python -m gpuctl.bench_service` (`make bench-service`): a day of an inference service run by
gpuctld's own controller, on a store of its own, with an injected clock.

Unlike `gpuctl simulate` (the scheduling core alone), this drives the daemon's code: the
heartbeats of simulated agents, node loss by heartbeat timeout, the cycle, `scale`, and the
replacement of replicas as `core.services` rules it, at the daemon's default settings
(heartbeats every 3 s, lost after 12 s, checked every second, a cycle every 5 s or when woken).

The service follows a diurnal curve (scaled every 15 minutes between its night and day
counts); replicas crash at random (a mean time between failures per replica) and a node that
holds replicas is lost every hour at a random minute (repaired and back after a while). It
reports:

- availability: replica-seconds actually running (what the agents run) over replica-seconds
  desired;
- time to replace: from a replica's failure (the crash, or the moment its node died) until its
  replacement runs;
- node-hours: the nodes holding replicas, each kept while idle for the lease keeper's idle grace
  (an upper bound of what leases that end when their node empties cost: the keeper gives an
  emptied node back at once when no queued job fits it), against a fleet sized for the peak
  all day.

Everything is seeded: the same arguments give the same figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpuctl.core.leasing import Offer
from gpuctl.core.model import JobKind, JobSpec, JobState, Node, RankState
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.config import DaemonConfig
from gpuctl.runtime.controller import Controller, ControllerSettings, RankRef
from gpuctl.runtime.logstore import LogStore
from gpuctl.sim.lease_replay import node_of_offer
from gpuctl.store.sql import open_store

# Lambda's gpu_8x_h100_sxm5, on demand (shared/catalogs/skypilot/lambda.csv).
PRICE_PER_HOUR = 31.92
SCALE_EVERY_S = 900
START = datetime(2026, 1, 1, tzinfo=UTC)  # midnight: the curve's low


def h100_offer(price: float) -> Offer:
    """An 8 x H100 SXM node at `price` an hour (the datasheet's figures)."""
    return Offer(
        provider="lambda",
        sku="gpu_8x_h100_sxm5",
        gpu_model="H100 SXM",
        gpu_count=8,
        gpu_memory_mib=81_559,
        hbm_gbps=3350,
        nvlink_gbps=900,
        network_gbps=3200,
        cpu_milli=208_000,
        memory_mib=1_800_000,
        price_per_hour=price,
    )


@dataclass
class _Agent:
    """One node's agent: the replicas it runs; `dead_until` while its node is down."""

    node: Node
    running: set[RankRef] = field(default_factory=set)
    dead_until: float | None = None
    last_used: float = -math.inf  # when it last held a replica


@dataclass(frozen=True)
class Figures:
    hours: float
    nodes: int
    replicas_night: int
    replicas_day: int
    gpus_per_replica: int
    availability: float
    replica_hours_desired: float
    replica_hours_running: float
    failures: int
    crashes: int
    nodes_lost: int
    replicas_lost: int
    replace_s_p50: float
    replace_s_p95: float
    replace_s_max: float
    replaced: int
    node_hours_used: float
    node_hours_peak_fleet: float
    dollars_used: float
    dollars_peak_fleet: float
    wall_s: float


def desired(t: float, night: int, day: int) -> int:
    """Replicas wanted at `t` seconds past midnight: the night count at midnight, the day
    count at noon, a cosine between."""
    return round(night + (day - night) * (1 - math.cos(2 * math.pi * t / 86_400)) / 2)


def run(
    *,
    hours: float = 24.0,
    nodes: int = 8,
    night: int = 8,
    day: int = 24,
    gpus: int = 2,
    crash_mtbf_h: float = 24.0,
    node_loss_every_s: float = 3600.0,
    repair_s: float = 1200.0,
    price: float = PRICE_PER_HOUR,
    seed: int = 1,
    weights: dict[str, float] | None = None,
    workdir: Path | None = None,
) -> Figures:
    defaults = DaemonConfig()
    beat, check = defaults.heartbeat_interval_s, defaults.heartbeat_check_interval_s
    cycle_every, grace = defaults.cycle_interval_s, defaults.lease_idle_grace_s
    rng = random.Random(seed)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = open_store(f"sqlite:///{Path(tmp) / 'state.db'}")
        clock = FakeClock(START)
        woken: list[bool] = [False]
        ctl = Controller(
            store,
            clock,
            build_policy("default", weights),
            LogStore(Path(tmp) / "logs", max_bytes_per_rank=1024),
            ControllerSettings(
                heartbeat_interval_s=beat,
                heartbeat_timeout_s=defaults.heartbeat_timeout_s,
                kill_grace_s=defaults.kill_grace_s,
            ),
            wake=lambda: woken.__setitem__(0, True),
        )
        offer = h100_offer(price)
        agents = {
            f"gpu-{i:02d}": _Agent(node_of_offer(offer, f"gpu-{i:02d}", fabric="ib-a/s1/l1"))
            for i in range(nodes)
        }
        for a in agents.values():
            ctl.register_node(a.node)
        spec = JobSpec(
            kind=JobKind.INFERENCE,
            command=("vllm", "serve"),
            name="chat",
            replicas=desired(0, night, day),
            gpus_per_node=gpus,
        )
        job_id = ctl.submit(spec).id
        failed_at: list[float] = []  # failures waiting for their replacement to run
        replace_s: list[float] = []
        crashes = lost_nodes = lost_replicas = 0
        want_s = run_s = 0.0
        used_s = 0.0
        next_loss = rng.uniform(0, node_loss_every_s)
        steps = int(hours * 3600 / check)
        for step in range(1, steps + 1):
            t = step * check
            clock.advance(timedelta(seconds=check))
            # A node that was lost comes back (repaired): its agent registers afresh.
            for a in agents.values():
                if a.dead_until is not None and t >= a.dead_until:
                    a.dead_until = None
                    ctl.register_node(a.node)
            # One node holding replicas dies each period, at a random moment in it.
            if t >= next_loss:
                next_loss += node_loss_every_s
                holding = [a for a in agents.values() if a.running and a.dead_until is None]
                if holding:
                    victim = rng.choice(holding)
                    failed_at.extend(t for _ in victim.running)
                    lost_replicas += len(victim.running)
                    victim.running.clear()
                    victim.dead_until = t + repair_s
                    lost_nodes += 1
            # Replicas crash at random, each at its own rate.
            for a in agents.values():
                for ref in sorted(a.running, key=lambda r: r.rank):
                    if rng.random() < check / (crash_mtbf_h * 3600):
                        a.running.discard(ref)
                        failed_at.append(t)
                        crashes += 1
                        ctl.report_rank(a.node.id, ref, RankState.EXITED, 1, "simulated crash")
            if step % round(SCALE_EVERY_S / check) == 0:
                wanted = desired(t, night, day)
                if ctl.store.get_job(job_id).spec.replicas != wanted:
                    ctl.scale(job_id, wanted)
            if step % round(beat / check) == 0:
                for a in agents.values():
                    if a.dead_until is not None:
                        continue
                    hb = ctl.heartbeat(a.node.id, sorted(a.running, key=lambda r: r.rank))
                    for ref in hb.stop:
                        a.running.discard(ref)
                        ctl.report_rank(a.node.id, ref, RankState.EXITED, -15, "stopped")
                    for assignment in hb.assignments:
                        a.running.add(assignment.ref)
                        ctl.report_rank(a.node.id, assignment.ref, RankState.RUNNING)
                        if assignment.rank.last_failure and failed_at:
                            replace_s.append(t - failed_at.pop(0))
            ctl.expire_heartbeats()
            if woken[0] or step % round(cycle_every / check) == 0:
                woken[0] = False
                ctl.run_cycle()
            # What ran over this step: the replicas the live agents run, the nodes in use.
            running = sum(len(a.running) for a in agents.values() if a.dead_until is None)
            want_s += ctl.store.get_job(job_id).spec.replicas * check
            run_s += running * check
            for a in agents.values():
                if a.running:
                    a.last_used = t
                if t - a.last_used <= grace:
                    used_s += check
        job = ctl.store.get_job(job_id)
        assert job.state is JobState.RUNNING, job.reason
        store.close()
    peak_nodes = math.ceil(day * gpus / 8)
    hours_run = steps * check / 3600
    return Figures(
        hours=hours_run,
        nodes=nodes,
        replicas_night=night,
        replicas_day=day,
        gpus_per_replica=gpus,
        availability=run_s / want_s if want_s else 1.0,
        replica_hours_desired=want_s / 3600,
        replica_hours_running=run_s / 3600,
        failures=crashes + lost_replicas,
        crashes=crashes,
        nodes_lost=lost_nodes,
        replicas_lost=lost_replicas,
        replace_s_p50=statistics.median(replace_s) if replace_s else 0.0,
        replace_s_p95=_quantile(replace_s, 0.95),
        replace_s_max=max(replace_s, default=0.0),
        replaced=len(replace_s),
        node_hours_used=used_s / 3600,
        node_hours_peak_fleet=peak_nodes * hours_run,
        dollars_used=used_s / 3600 * price,
        dollars_peak_fleet=peak_nodes * hours_run * price,
        wall_s=time.perf_counter() - wall,
    )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def report(f: Figures) -> str:
    saved = f.dollars_peak_fleet - f.dollars_used
    return "\n".join(
        [
            f"a service of {f.replicas_night}-{f.replicas_day} replicas x {f.gpus_per_replica} "
            f"GPUs over {f.hours:g} h on {f.nodes} nodes of 8 H100 "
            f"(${f.dollars_peak_fleet / max(f.node_hours_peak_fleet, 1e-9):.2f}/h each)",
            f"  availability   {100 * f.availability:.3f} % "
            f"({f.replica_hours_running:.1f} of {f.replica_hours_desired:.1f} replica-hours)",
            f"  failures       {f.crashes} replica crashes, {f.nodes_lost} nodes lost with "
            f"{f.replicas_lost} replicas",
            f"  replaced in    p50 {f.replace_s_p50:.0f} s, p95 {f.replace_s_p95:.0f} s, "
            f"max {f.replace_s_max:.0f} s ({f.replaced} replacements)",
            f"  node-hours     {f.node_hours_used:.1f} holding replicas (idle grace kept) vs "
            f"{f.node_hours_peak_fleet:.1f} for a fleet sized for the peak",
            f"  lease dollars  ${f.dollars_used:,.0f} vs ${f.dollars_peak_fleet:,.0f}: "
            f"${saved:,.0f} saved by scaling down",
            f"  ({f.wall_s:.0f} s of wall time)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpuctl-bench-service", description=__doc__.split("\n")[0])
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--night", type=int, default=8, help="replicas at midnight (default 8)")
    p.add_argument("--day", type=int, default=24, help="replicas at noon (default 24)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs per replica (default 2)")
    p.add_argument("--crash-mtbf-h", type=float, default=24.0, help="per replica (default 24)")
    p.add_argument("--node-loss-every-s", type=float, default=3600.0)
    p.add_argument("--repair-s", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="SCORE=W",
        help="a score weight of the default policy, e.g. spread=0 (packs replicas)",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the daemon's own log: nodes lost, replicas...
    figures = run(
        hours=args.hours,
        nodes=args.nodes,
        night=args.night,
        day=args.day,
        gpus=args.gpus,
        crash_mtbf_h=args.crash_mtbf_h,
        node_loss_every_s=args.node_loss_every_s,
        repair_s=args.repair_s,
        seed=args.seed,
        weights={k: float(v) for k, _, v in (w.partition("=") for w in args.weight)},
    )
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures.__dict__, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
