"""gpuctld's Prometheus metrics.

Two kinds:
- what happens, counted as it happens: API calls (latency by method and code), scheduling
  cycles (duration, placements, preemptions), the wait from submit to placement, nodes lost;
- how things stand, read from the controller at each scrape (`_Standing`): pending jobs by
  kind, queue and reason class, GPUs by model and state, fragmentation, leases, dollars an
  hour, each node's heartbeat age and measured bandwidth.

Labels are bounded: kinds, states and classes are enums; queues are the configured ones, or
the `MAX_QUEUES` busiest with the rest as `other`; nodes are the fleet's. No job id is ever
a label. Names follow Prometheus' conventions (base units in the name, `_total` counters).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpuctl.core.cost import charged_now, prices_of
from gpuctl.core.cycle import CycleResult
from gpuctl.core.fleetstats import (
    LIVE_LEASES,
    REASON_CLASSES,
    fragmented_gpus,
    gpu_states,
    paid_per_hour,
    reason_class,
    views_now,
)
from gpuctl.core.model import Job, JobKind, JobState, Node, NodeState

MAX_QUEUES = 32  # queue label values when no queues are configured (the rest: "other")
GB = 1e9
# Seconds: calls take a millisecond or two; a cycle, a millisecond to seconds.
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From submit to placement: seconds on an idle fleet, hours or days for a queue.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400, 259200)


class DaemonMetrics:
    """gpuctld's registry: the event metrics, fed by the API server and the controller, and
    the standing figures, read from `controller` at each scrape."""

    def __init__(self, standing: Standing | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._calls = Histogram(
            "gpuctl_api_request_duration_seconds",
            "Time to answer a unary API call, by method and gRPC status code.",
            ["method", "code"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self._streams = CounterMetric(
            "gpuctl_api_streams",
            "Streaming API calls (watches, log follows) ended, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self._cycles = Histogram(
            "gpuctl_scheduling_cycle_duration_seconds",
            "Time of a scheduling cycle that had work (jobs pending or leases to give back).",
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self._placed = CounterMetric(
            "gpuctl_scheduling_placements",
            "Jobs placed (bound to GPUs) by the scheduling cycle, by kind.",
            ["kind"],
            registry=r,
        )
        self._preempted = CounterMetric(
            "gpuctl_scheduling_preemptions",
            "Jobs preempted (requeued) to make room for others.",
            registry=r,
        )
        self._waited = Histogram(
            "gpuctl_job_wait_seconds",
            "Time from a job's submission to its first placement, by kind.",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._lost = CounterMetric(
            "gpuctl_nodes_lost", "Nodes declared lost for missing heartbeats.", registry=r
        )
        for kind in JobKind:  # zero series exist before the first event, as alerts expect
            self._placed.labels(kind.value)
            self._waited.labels(kind.value)
        if standing is not None:
            r.register(standing)

    def call(self, method: str, code: str, seconds: float) -> None:
        self._calls.labels(method, code).observe(seconds)

    def stream(self, method: str, code: str) -> None:
        self._streams.labels(method, code).inc()

    def cycle(self, seconds: float, result: CycleResult, placed: Sequence[Job], now: datetime):
        """A cycle that decided took `seconds`; `placed` are the jobs it bound, as they were
        while pending (their submit time and first attempt tell the wait)."""
        self._cycles.observe(seconds)
        for job in placed:
            self._placed.labels(job.spec.kind.value).inc()
            if job.attempt == 0 and job.created_at is not None:
                waited = (now - job.created_at).total_seconds()
                self._waited.labels(job.spec.kind.value).observe(max(0.0, waited))
        if result.preemptions:
            self._preempted.inc(len(result.preemptions))

    def nodes_lost(self, count: int) -> None:
        if count:
            self._lost.inc(count)


class Standing(Collector):
    """The figures read at each scrape: one read of the nodes, the active jobs (kept in
    memory by the controller) and the live leases."""

    def __init__(
        self,
        *,
        nodes: Callable[[], Sequence[Node]],
        active: Callable[[], Sequence[Job]],
        leases: Callable[[], Iterable],
        now: Callable[[], datetime],
        leading: Callable[[], bool],
        queues: Sequence[str] = (),
    ) -> None:
        self._nodes = nodes
        self._active = active
        self._leases = leases
        self._now = now
        self._leading = leading
        self._queues = frozenset(queues)

    def describe(self) -> Iterator:
        return iter(())  # figures depend on the fleet: nothing to check at registration

    def collect(self) -> Iterator:
        started = time.perf_counter()
        now = self._now()
        nodes = self._nodes()
        jobs = self._active()
        views, pending = views_now(nodes, jobs, now)
        yield from self._jobs(jobs)
        yield from self._gpus(views, pending)
        yield from self._nodes_figures(nodes, now)
        yield from self._money(nodes, jobs)
        leader = GaugeMetricFamily(
            "gpuctl_leader", "1 on the gpuctld that leads (schedules and writes), 0 on a standby."
        )
        leader.add_metric([], 1.0 if self._leading() else 0.0)
        yield leader
        took = GaugeMetricFamily(
            "gpuctl_metrics_collect_seconds", "Time to gather the standing figures of this scrape."
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _queue_labels(self, jobs: Sequence[Job]) -> Callable[[str], str]:
        if self._queues:
            known = self._queues
        else:
            counts = Counter(j.spec.queue for j in jobs)
            known = frozenset(q for q, _ in counts.most_common(MAX_QUEUES))
        return lambda q: q if q in known else "other"

    def _jobs(self, jobs: Sequence[Job]) -> Iterator:
        label = self._queue_labels(jobs)
        pending: Counter[tuple[str, str, str]] = Counter()
        running: Counter[tuple[str, str]] = Counter()
        for job in jobs:
            kind, queue = job.spec.kind.value, label(job.spec.queue)
            if job.state is JobState.PENDING:
                pending[(kind, queue, reason_class(job.reason))] += 1
            else:
                running[(kind, queue)] += 1
        yield _family(
            "gpuctl_jobs_pending",
            "Jobs waiting to be placed, by kind, queue and what they wait for (reason: "
            + ", ".join(REASON_CLASSES)
            + ").",
            ["kind", "queue", "reason"],
            pending,
        )
        yield _family(
            "gpuctl_jobs_running",
            "Jobs holding GPUs (running, or stopping), by kind and queue.",
            ["kind", "queue"],
            running,
        )

    def _gpus(self, views, pending: Sequence[Job]) -> Iterator:
        yield _family(
            "gpuctl_gpus",
            "GPUs by model and state: allocated (held by jobs; shares add up), and the rest by "
            "their node's state: free, draining, degraded, lost.",
            ["model", "state"],
            {(model or "unknown", state): n for (model, state), n in gpu_states(views).items()},
        )
        g = GaugeMetricFamily(
            "gpuctl_fragmented_gpus",
            "Free GPUs on schedulable nodes that none of the queued job shapes can use (in "
            "GPUs; 0 with nothing queued).",
        )
        g.add_metric([], fragmented_gpus(views, pending))
        yield g

    def _nodes_figures(self, nodes: Sequence[Node], now: datetime) -> Iterator:
        states = Counter(n.state.value for n in nodes)
        g = GaugeMetricFamily("gpuctl_nodes", "Nodes by state.", labels=["state"])
        for state in NodeState:
            g.add_metric([state.value], states.get(state.value, 0))
        yield g
        age = GaugeMetricFamily(
            "gpuctl_node_heartbeat_age_seconds",
            "Seconds since each node's agent was last heard from.",
            labels=["node"],
        )
        bandwidth = GaugeMetricFamily(
            "gpuctl_node_bandwidth_bytes_per_second",
            "Each node's bandwidth as its agent reported it: hbm (per GPU, measured where "
            "measured, else the datasheet's), nvlink (per GPU) and network (the node's total).",
            labels=["node", "link"],
        )
        for n in nodes:
            if n.state is NodeState.RELEASED:
                continue
            if n.last_heartbeat is not None:
                age.add_metric([n.id], max(0.0, (now - n.last_heartbeat).total_seconds()))
            p = n.profile
            bandwidth.add_metric([n.id, "hbm"], p.hbm_gbps * GB)
            bandwidth.add_metric([n.id, "nvlink"], p.nvlink_gbps * GB)
            bandwidth.add_metric([n.id, "network"], p.network.total_gbps * GB / 8)
        yield age
        yield bandwidth

    def _money(self, nodes: Sequence[Node], jobs: Sequence[Job]) -> Iterator:
        leases = [x for x in self._leases() if x.state in LIVE_LEASES]
        yield _family(
            "gpuctl_leases",
            "Leases not yet ended, by provider and state.",
            ["provider", "state"],
            Counter((x.provider, x.state.value) for x in leases),
        )
        yield _family(
            "gpuctl_lease_cost_dollars_per_hour",
            "Dollars an hour paid now for leased nodes, by provider.",
            ["provider"],
            {(p,): round(d, 6) for p, d in paid_per_hour(leases).items()},
        )
        label = self._queue_labels(jobs)
        charged: Counter[str] = Counter()
        for job, rate in charged_now(jobs, prices_of(nodes)):
            charged[label(job.spec.queue)] += rate
        yield _family(
            "gpuctl_charged_dollars_per_hour",
            "Dollars an hour charged now to running jobs (their share of each node's price), "
            "by queue.",
            ["queue"],
            {(q,): round(d, 6) for q, d in charged.items()},
        )


def _family(
    name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]
) -> GaugeMetricFamily:
    """A gauge family of `values` by label values, in label order."""
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
