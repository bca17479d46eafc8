"""A discrete-event replay of a workload through the same `core.schedule` the daemon runs.

A virtual clock jumps from event to event (arrivals, completions); after each batch of events
at one instant a cycle runs and its decisions are applied as the daemon applies them: bindings
start (and finish after the job's run time), preempted jobs go back to the queue as a new
attempt and start over. Reports average job completion time, queueing delay and GPU
utilisation.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta

from gpuctl.core import schedule
from gpuctl.core.model import Job, JobState, Node
from gpuctl.core.plugins import Policy
from gpuctl.core.queue import placement_gpus
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.synthetic import SimJob

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_FINISH, _ARRIVE = 0, 1  # at one instant, completions free GPUs before arrivals are queued


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    job_id: int
    name: str
    gpus: float
    arrival_s: float
    start_s: float | None  # its last (successful) start; None: never started
    end_s: float | None
    preempted: int  # times it was stopped and requeued


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayReport:
    policy: str
    jobs: int
    completed: int
    never_started: int
    avg_jct_s: float  # completed jobs: end - arrival
    p50_jct_s: float
    avg_queue_s: float  # completed jobs: first start - arrival
    p99_queue_s: float
    max_queue_s: float
    gpu_utilisation: float  # GPU-seconds run / (cluster GPUs x first arrival .. last end)
    makespan_s: float
    cycles: int
    preemptions: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def replay(
    nodes: Sequence[Node],
    workload: Sequence[SimJob],
    policy: Policy,
    *,
    start: datetime = EPOCH,
) -> tuple[ReplayReport, tuple[JobRecord, ...]]:
    """Run `workload` on `nodes` under `policy` until no event is left."""
    jobs = {i + 1: w for i, w in enumerate(workload)}
    events: list[tuple[float, int, int, int, int]] = []  # (time, kind, seq, job id, attempt)
    seq = 0
    for job_id, w in jobs.items():
        events.append((w.arrival_s, _ARRIVE, seq, job_id, 0))
        seq += 1
    heapq.heapify(events)
    pending: dict[int, Job] = {}
    running: dict[int, Job] = {}
    first_start: dict[int, float] = {}
    last_start: dict[int, float] = {}
    ended: dict[int, float] = {}
    preempted: dict[int, int] = {}
    gpu_seconds = 0.0
    cycles = preemptions = 0
    while events:
        now_s = events[0][0]
        while events and events[0][0] == now_s:
            _, kind, _, job_id, attempt = heapq.heappop(events)
            if kind == _ARRIVE:
                w = jobs[job_id]
                pending[job_id] = Job(
                    id=job_id, spec=w.spec, created_at=start + timedelta(seconds=w.arrival_s)
                )
            elif job_id in running and running[job_id].attempt == attempt:
                done = running.pop(job_id)
                gpu_seconds += placement_gpus(done.placement) * (now_s - last_start[job_id])
                ended[job_id] = now_s
        if not pending:
            continue
        now = start + timedelta(seconds=now_s)
        result = schedule(
            Snapshot.build(nodes, list(running.values())), list(pending.values()), policy, now=now
        )
        cycles += 1
        for p in result.preemptions:
            victim = running.pop(p.job_id)
            gpu_seconds += placement_gpus(victim.placement) * (now_s - last_start[p.job_id])
            pending[p.job_id] = replace(
                victim,
                state=JobState.PENDING,
                attempt=victim.attempt + 1,
                placement=None,
                started_at=None,
            )
            preempted[p.job_id] = preempted.get(p.job_id, 0) + 1
            preemptions += 1
        for b in result.bindings:
            job = pending.pop(b.job_id)
            running[b.job_id] = replace(
                job, state=JobState.RUNNING, placement=b.placement, started_at=now
            )
            first_start.setdefault(b.job_id, now_s)
            last_start[b.job_id] = now_s
            heapq.heappush(
                events, (now_s + jobs[b.job_id].duration_s, _FINISH, seq, b.job_id, job.attempt)
            )
            seq += 1
    records = tuple(
        JobRecord(
            job_id=job_id,
            name=w.name,
            gpus=w.gpus,
            arrival_s=w.arrival_s,
            start_s=last_start.get(job_id),
            end_s=ended.get(job_id),
            preempted=preempted.get(job_id, 0),
        )
        for job_id, w in jobs.items()
    )
    return _report(
        policy.name, nodes, records, first_start, gpu_seconds, cycles, preemptions
    ), records


def _report(
    name: str,
    nodes: Sequence[Node],
    records: Sequence[JobRecord],
    first_start: dict[int, float],
    gpu_seconds: float,
    cycles: int,
    preemptions: int,
) -> ReplayReport:
    done = [r for r in records if r.end_s is not None]
    jct = sorted(r.end_s - r.arrival_s for r in done if r.end_s is not None)
    queued = sorted(first_start[r.job_id] - r.arrival_s for r in done)
    first = min((r.arrival_s for r in records), default=0.0)
    last = max((r.end_s for r in done if r.end_s is not None), default=first)
    capacity = sum(n.gpu_count for n in nodes) * (last - first)
    return ReplayReport(
        policy=name,
        jobs=len(records),
        completed=len(done),
        never_started=sum(1 for r in records if r.start_s is None),
        avg_jct_s=statistics.fmean(jct) if jct else 0.0,
        p50_jct_s=statistics.median(jct) if jct else 0.0,
        avg_queue_s=statistics.fmean(queued) if queued else 0.0,
        p99_queue_s=queued[min(len(queued) - 1, int(0.99 * len(queued)))] if queued else 0.0,
        max_queue_s=queued[-1] if queued else 0.0,
        gpu_utilisation=gpu_seconds / capacity if capacity > 0 else 0.0,
        makespan_s=last - first,
        cycles=cycles,
        preemptions=preemptions,
    )
