"""A discrete-event replay of a mixed workload through `core.schedule`, on a fixed fleet (every
node up from the start) or on leased nodes: the cycle's lease requests are granted at once and
billed from then, each node registers after a fixed boot delay, and a release ends its lease at
once. Training runs its run time once bound; a replica is cancelled when its service no longer
wants it, placed or not.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from gpuctl.core import schedule
from gpuctl.core.leasing import Leasing, Offer
from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    Job,
    JobState,
    LeaseState,
    NetKind,
    Network,
    Node,
    NodeLease,
)
from gpuctl.core.plugins import Policy, RankRequest, replica_share
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.workload import Workload

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)  # midnight: the services' curves start here
# At one instant: work ends (freeing GPUs), booted nodes register, work arrives, then ticks.
_END, _BOOTED, _ARRIVE, _TICK = 0, 1, 2, 3
_LEAF = 16  # nodes per leaf switch in a fixed fleet


@dataclass(frozen=True, slots=True, kw_only=True)
class Bill:
    """One node paid for from `start_s` to `end_s` (inf: never given back)."""

    sku: str
    gpus: int
    price_per_hour: float
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """A stretch of one demand on GPUs; a replica's decode tokens/s there."""

    demand_id: int
    start_s: float
    end_s: float
    gpus: float
    tokens_per_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a fleet did with a workload: what it paid for, what ran, when training ended."""

    bills: tuple[Bill, ...]
    served: tuple[Served, ...]
    ended: Mapping[int, float]  # training demand -> completion time
    cycles: int = 0


def tokens_per_s(weights_gb: float, hbm_gbps: float, gpus: float) -> float:
    """Decode tokens/s of one replica on `gpus` GPUs of `hbm_gbps` each: every weight is
    streamed from HBM once per token."""
    return hbm_gbps * gpus / weights_gb if weights_gb > 0 else 0.0


def node_of_offer(offer: Offer, node_id: str, *, fabric: str = "", lease_id: str = "") -> Node:
    """A registered node of `offer`, as its agent would report it (datasheet figures). The
    network kind is not in an offer and no filter reads it: Gb/s between nodes is what counts."""
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{node_id}-{i}",
            model=offer.gpu_model,
            memory_mib=offer.gpu_memory_mib,
            hbm_gbps=offer.hbm_gbps,
            nvlink_gbps=offer.nvlink_gbps,
        )
        for i in range(offer.gpu_count)
    )
    network = (
        Network(kind=NetKind.INFINIBAND, ports=1, gbps_per_port=offer.network_gbps)
        if offer.network_gbps > 0
        else Network()
    )
    return Node(
        id=node_id,
        address=f"{node_id}.sim",
        fabric=fabric,
        provider=offer.provider,
        sku=offer.sku,
        region=offer.region,
        cpu_milli=offer.cpu_milli,
        memory_mib=offer.memory_mib,
        price_per_hour=offer.price_per_hour,
        lease_id=lease_id,
        profile=BandwidthProfile(
            gpus=gpus,
            nvlink_domain_size=offer.gpu_count if offer.nvlink_gbps else 0,
            network=network,
            bf16_tflops=offer.bf16_tflops * offer.gpu_count,
            source="sim",
        ),
    )


def fixed_fleet(offer: Offer, count: int, *, name: str = "fleet") -> tuple[Node, ...]:
    """`count` nodes of `offer` on one fabric, `_LEAF` to a leaf switch."""
    return tuple(
        node_of_offer(offer, f"{name}-{i:03d}", fabric=f"{name}/s1/l{i // _LEAF}")
        for i in range(count)
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Replay:
    """The state of one replay; `run` is the whole of it."""

    def __init__(
        self,
        workload: Workload,
        policy: Policy,
        *,
        nodes: Sequence[Node] = (),
        offers: Sequence[Offer] = (),
        boot_s: float = 0.0,
        idle_grace_s: float = 0.0,
        warm_nodes: int = 0,
        service_grace_s: float = 0.0,
        service_headroom: int = 0,
    ) -> None:
        self.demands = {d.id: d for d in workload.demands}
        self.policy = policy
        self.leased = bool(offers)
        self.offers = tuple(offers)
        self.offer = {(o.provider, o.sku): o for o in offers}
        self.boot_s = boot_s
        self.grace = idle_grace_s
        self.warm_nodes = warm_nodes
        self.service_grace = service_grace_s
        self.service_headroom = service_headroom
        self.nodes: dict[str, Node] = {n.id: n for n in nodes}
        self.events: list[tuple[float, int, int, int | str, int]] = []
        self.seq = 0
        self.pending: dict[int, Job] = {}
        self.running: dict[int, Job] = {}
        self.serving: dict[int, tuple[float, float, float]] = {}  # id -> (since, gpus, tok/s)
        self.served: list[Served] = []
        self.ended: dict[int, float] = {}
        # leases (leased fleets only)
        self.leases: dict[str, NodeLease] = {}  # open: requested or active
        self.fabric: dict[str, str] = {}  # lease -> fabric path its node joins
        self.billed_from: dict[str, float] = {}
        forever = float("inf")  # a fixed fleet is paid for from the start, whatever runs
        self.bills: list[Bill] = [
            Bill(sku=n.sku, gpus=n.gpu_count, price_per_hour=n.price_per_hour, start_s=0.0,
                 end_s=forever)
            for n in nodes
        ]  # fmt: skip
        self.idle_since: dict[str, datetime] = {}
        self.ticked: set[tuple[str, datetime]] = set()
        self.failed: dict[int, set[tuple[str, str]]] = {}
        self.count = 0
        self.cycles = 0
        for d in workload.demands:
            self._push(d.arrival_s, _ARRIVE, d.id)
            if not d.training:
                self._push(d.until_s, _END, d.id, -1)

    def _push(self, t: float, kind: int, key: int | str, attempt: int = 0) -> None:
        heapq.heappush(self.events, (t, kind, self.seq, key, attempt))
        self.seq += 1

    def run(self) -> Outcome:
        t = 0.0
        while self.events:
            t = self.events[0][0]
            while self.events and self.events[0][0] == t:
                _, kind, _, key, attempt = heapq.heappop(self.events)
                self._event(t, kind, key, attempt)
            if self.pending or (self.leased and self.leases):
                self._cycle(t)
        for lease_id in list(self.leases):  # nothing was left to release it: bill to the end
            self._close(lease_id, t)
        return Outcome(
            bills=tuple(self.bills),
            served=tuple(self.served),
            ended=dict(self.ended),
            cycles=self.cycles,
        )

    # -- events ---------------------------------------------------------------------------

    def _event(self, t: float, kind: int, key: int | str, attempt: int) -> None:
        if kind == _ARRIVE:
            assert isinstance(key, int)
            d = self.demands[key]
            self.pending[key] = Job(id=key, spec=d.spec, created_at=EPOCH + timedelta(seconds=t))
        elif kind == _END:
            assert isinstance(key, int)
            if attempt < 0:  # a replica no longer wanted
                self.pending.pop(key, None)
                if key in self.running:
                    self._stop(key, t)
                    self._to_service(key)
            elif key in self.running and self.running[key].attempt == attempt:
                self._stop(key, t)
                self.ended[key] = t
        elif kind == _BOOTED:
            assert isinstance(key, str)
            lease = self.leases.get(key)
            if lease is not None and lease.state is LeaseState.REQUESTED:
                self.leases[key] = replace(lease, state=LeaseState.ACTIVE)
                offer = self.offer[lease.provider, lease.sku]
                self.nodes[lease.node_id] = node_of_offer(
                    offer, lease.node_id, fabric=self.fabric[key], lease_id=key
                )

    def _to_service(self, replica: int) -> None:
        """The leases of a replica that ended go to a running replica of its service: in the
        daemon a service is one job, which owns the nodes its replicas were leased for."""
        service = self.demands[replica].service
        heir = min((j for j in self.running if self.demands[j].service == service), default=None)
        if heir is None:
            return
        for lease in list(self.leases.values()):
            if lease.for_job_id == replica:
                self.leases[lease.id] = replace(lease, for_job_id=heir)

    def _stop(self, job_id: int, t: float) -> Job:
        job = self.running.pop(job_id)
        since, gpus, rate = self.serving.pop(job_id)
        if t > since:
            self.served.append(
                Served(demand_id=job_id, start_s=since, end_s=t, gpus=gpus, tokens_per_s=rate)
            )
        return job

    # -- cycles ---------------------------------------------------------------------------

    def _cycle(self, t: float) -> None:
        now = EPOCH + timedelta(seconds=t)
        leasing = self._leasing(now) if self.leased else None
        result = schedule(
            Snapshot.build(tuple(self.nodes.values()), tuple(self.running.values())),
            tuple(self.pending.values()),
            self.policy,
            now=now,
            leasing=leasing,
        )
        self.cycles += 1
        for p in result.preemptions:
            victim = self._stop(p.job_id, t)
            self.pending[p.job_id] = replace(
                victim,
                state=JobState.PENDING,
                attempt=victim.attempt + 1,
                placement=None,
                started_at=None,
            )
        idle = set(self.idle_since)
        by_node = {x.node_id: x for x in self.leases.values() if x.state is LeaseState.ACTIVE}
        for b in result.bindings:
            job = self.pending.pop(b.job_id)
            self.running[b.job_id] = replace(
                job, state=JobState.RUNNING, placement=b.placement, started_at=now
            )
            d = self.demands[b.job_id]
            node = self.nodes[b.placement.ranks[0].node_id]
            rate = 0.0
            if not d.training:
                share = replica_share(RankRequest.of(d.spec))
                rate = tokens_per_s(d.spec.weights_gb, node.profile.hbm_gbps, share)
            self.serving[b.job_id] = (t, d.gpus, rate)
            if d.training:
                self._push(t + d.duration_s, _END, b.job_id, job.attempt)
            # As the daemon does: an idle leased node a job now uses serves that job.
            for node_id in dict.fromkeys(b.placement.node_ids):
                lease = by_node.get(node_id)
                if lease is not None and node_id in idle and lease.for_job_id != b.job_id:
                    self.leases[lease.id] = replace(lease, for_job_id=b.job_id)
        for r in result.lease_requests:
            self._request(r.job_id, r.provider, r.sku, r.count, r.price_per_hour, r.same_fabric, t)
        for r in result.lease_releases:
            lease = self.leases.get(r.lease_id)
            if lease is None:
                continue
            if r.unusable and r.job_id is not None:
                self.failed.setdefault(r.job_id, set()).add((lease.provider, lease.sku))
            self._close(r.lease_id, t)
        if self.leased and (self.grace > 0 or self.service_grace > 0):
            self._tick_after_grace()

    def _leasing(self, now: datetime) -> Leasing:
        held = {
            r.node_id
            for j in self.running.values()
            if j.placement is not None
            for r in j.placement.ranks
        }
        for lease in self.leases.values():
            if lease.state is not LeaseState.ACTIVE:
                continue
            if lease.node_id in held:
                self.idle_since.pop(lease.node_id, None)
            else:
                self.idle_since.setdefault(lease.node_id, now)
        return Leasing(
            offers=self.offers,
            leases=tuple(self.leases.values()),
            renewable=frozenset(o.provider for o in self.offers),
            failed={j: frozenset(f) for j, f in self.failed.items() if j in self.pending},
            idle_since=dict(self.idle_since),
            idle_grace_s=self.grace,
            warm_nodes=self.warm_nodes,
            service_grace_s=self.service_grace,
            service_headroom=self.service_headroom,
        )

    def _tick_after_grace(self) -> None:
        """A cycle when an idle node's graces run out, so the release is not left to chance."""
        for node_id, since in self.idle_since.items():
            if node_id in self.nodes and (node_id, since) not in self.ticked:
                self.ticked.add((node_id, since))
                for grace in {self.grace, self.service_grace} - {0.0}:
                    self._push((since - EPOCH).total_seconds() + grace, _TICK, node_id)

    def _request(
        self,
        job_id: int,
        provider: str,
        sku: str,
        count: int,
        price: float,
        same_fabric: bool,
        t: float,
    ) -> None:
        offer = self.offer[provider, sku]
        fabric = ""
        if same_fabric or offer.network_gbps > 0:
            fabric = f"{_slug(provider)}-f{self.seq}/s1/l1"  # a fresh fabric per acquire
        for _ in range(count):
            self.count += 1
            lease_id = f"L{self.count:05d}"
            node_id = f"{_slug(sku)}-{self.count:05d}"
            self.leases[lease_id] = NodeLease(
                id=lease_id,
                provider=provider,
                provider_lease_id=f"sim/{lease_id}",
                node_id=node_id,
                sku=sku,
                price_per_hour=price,
                acquired_at=EPOCH + timedelta(seconds=t),
                for_job_id=job_id,
                state=LeaseState.REQUESTED,
            )
            self.fabric[lease_id] = fabric
            self.billed_from[lease_id] = t
            self._push(t + self.boot_s, _BOOTED, lease_id)

    def _close(self, lease_id: str, t: float) -> None:
        lease = self.leases.pop(lease_id)
        offer = self.offer[lease.provider, lease.sku]
        node = self.nodes.pop(lease.node_id, None)
        if node is not None:
            busy = [
                j.id
                for j in self.running.values()
                if j.placement is not None and lease.node_id in j.placement.node_ids
            ]
            if busy:
                raise AssertionError(f"lease {lease_id} released under jobs {busy}")
        self.idle_since.pop(lease.node_id, None)
        self.bills.append(
            Bill(
                sku=lease.sku,
                gpus=offer.gpu_count,
                price_per_hour=lease.price_per_hour,
                start_s=self.billed_from.pop(lease_id),
                end_s=t,
            )
        )


def replay(
    workload: Workload,
    policy: Policy,
    *,
    nodes: Sequence[Node] = (),
    offers: Sequence[Offer] = (),
    boot_s: float = 0.0,
    idle_grace_s: float = 0.0,
    warm_nodes: int = 0,
    service_grace_s: float = 0.0,
    service_headroom: int = 0,
) -> Outcome:
    """Replay `workload` until every demand has ended: on `nodes` (a fixed fleet, paid for from
    0 on), and with `offers`, on nodes leased from them as the cycles ask (`boot_s` from request
    to registered; the cycle's `idle_grace_s`, `warm_nodes`, `service_grace_s` and
    `service_headroom`)."""
    return _Replay(
        workload,
        policy,
        nodes=nodes,
        offers=offers,
        boot_s=boot_s,
        idle_grace_s=idle_grace_s,
        warm_nodes=warm_nodes,
        service_grace_s=service_grace_s,
        service_headroom=service_headroom,
    ).run()
