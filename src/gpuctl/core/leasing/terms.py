"""The terms of leasing in the core: offers (a provider's SKU as the core ranks it), budgets and
spend, the lease side of a cycle's input, and what the cycle asks of the lease keeper
(requests, releases). Offers are plain values: the core never sees a provider."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gpuctl.core.model import LeaseState, NodeLease


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """One SKU a provider can lease, as the core ranks it (the runtime builds these from the
    providers' catalogs)."""

    provider: str  # the configured provider that acquires it
    sku: str
    gpu_model: str = ""
    gpu_count: int = 0
    gpu_memory_mib: int = 0  # per GPU
    hbm_gbps: float = 0.0  # per GPU
    nvlink_gbps: float = 0.0  # per GPU; 0: no NVLink domain
    network_gbps: float = 0.0  # between nodes, per node; 0: it cannot join a fabric
    bf16_tflops: float = 0.0  # per GPU
    cpu_milli: int = 0  # 0: not stated (assumed to fit)
    memory_mib: int = 0  # 0: not stated
    region: str = ""
    price_per_hour: float = 0.0  # the whole node
    max_lease_s: float = 0.0  # how long one grant lasts; 0: unlimited
    renewable: bool = True  # the provider can extend a grant before it ends


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """What a queue may lease: dollars per hour held at once, and dollars in all (0: no cap)."""

    dollars_per_hour: float = 0.0
    dollars: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Spend:
    """What a queue holds now ($/h of its open leases) and has been charged so far."""

    dollars_per_hour: float = 0.0
    dollars: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Leasing:
    """The lease side of a cycle's input; without it (`schedule(..., leasing=None)`) the cycle
    neither requests nor releases leases."""

    offers: tuple[Offer, ...] = ()
    # Every lease not yet ended (requested, active, releasing), managed or self-registered.
    leases: tuple[NodeLease, ...] = ()
    renewable: frozenset[str] = frozenset()  # providers whose leases can be extended
    budgets: Mapping[str, Budget] = field(default_factory=dict)  # by queue
    spend: Mapping[str, Spend] = field(default_factory=dict)  # by queue
    # job -> (provider, sku) that failed it lately: the cycle asks for the next-best instead
    failed: Mapping[int, frozenset[tuple[str, str]]] = field(default_factory=dict)
    idle_since: Mapping[str, datetime] = field(default_factory=dict)  # leased node -> since
    idle_grace_s: float = 0.0
    # Idle leased nodes kept beyond those a queued job will take (a warm pool), the cheapest
    # first: a replica added when a service scales up then starts at once instead of waiting
    # out a new node's boot.
    warm_nodes: int = 0
    # An idle leased node whose job is a service still running (on fewer replicas than when the
    # node served it) is kept this long for that service's next scale-up, if its replica fits
    # the node: a scale-up then starts at once instead of waiting out a new node's boot.
    service_grace_s: float = 0.0
    # Replicas of each running service kept ready: idle leased capacity for that many more of
    # its replicas, leased ahead when missing, so that a scale-up starts at once (the service
    # then leases the next while its new replica serves). Services: the running inference jobs,
    # replicas alike (`service_key`) counting as one.
    service_headroom: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequest:
    """Lease `count` nodes of `sku` from `provider` for `job_id` (one fabric for a gang)."""

    job_id: int
    provider: str
    sku: str
    count: int
    price_per_hour: float  # per node
    same_fabric: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRelease:
    """Give lease `lease_id` back. `unusable`: the job it was leased for could not use its
    node, so that offer counts as failed for the job."""

    lease_id: str
    node_id: str = ""
    reason: str = ""
    job_id: int | None = None
    unusable: bool = False


def managed(lease: NodeLease) -> bool:
    """A lease gpuctl asked a provider for (not a node that registered by itself)."""
    return bool(lease.provider_lease_id) or lease.state is LeaseState.REQUESTED


def duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))
