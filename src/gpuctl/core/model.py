"""The domain model: nodes with their measured bandwidth profiles, leases, jobs and placements.

Plain frozen dataclasses; protobuf messages and ORM rows are converted to and from these
only in `api/convert.py` and `store/mapping.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime

MILLI_PER_GPU = 1000


class JobKind(enum.StrEnum):
    TRAINING = "training"
    INFERENCE = "inference"


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"  # cancel asked, processes still being stopped: resources held
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a rank exited non-zero or was killed (the exit code says which)
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # its time limit ended it
    NODE_LOST = "node-lost"  # a node it ran on was lost, and it asked not to be requeued

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def holds_resources(self) -> bool:
        return self in (JobState.RUNNING, JobState.CANCELLING)


_FINISHED = frozenset(
    (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.NODE_LOST)
)


class RankState(enum.StrEnum):
    ASSIGNED = "assigned"  # bound to a node, the agent has not started it yet
    RUNNING = "running"
    EXITED = "exited"  # exit_code says how
    LOST = "lost"  # its node stopped answering


class NodeState(enum.StrEnum):
    READY = "ready"
    DRAINING = "draining"  # no new work; running work finishes
    DEGRADED = "degraded"  # its agent reports a hardware problem: no new work until it clears
    LOST = "lost"  # missed heartbeats past the timeout
    RELEASED = "released"


class LeaseState(enum.StrEnum):
    REQUESTED = "requested"
    ACTIVE = "active"
    RELEASING = "releasing"
    RELEASED = "released"
    EXPIRED = "expired"
    FAILED = "failed"


class NetKind(enum.StrEnum):
    NONE = "none"
    ETHERNET = "ethernet"
    ROCE = "roce"
    INFINIBAND = "infiniband"


class OnNodeLost(enum.StrEnum):
    REQUEUE = "requeue"
    FAIL = "fail"


class RestartPolicy(enum.StrEnum):
    """What becomes of an inference replica that ends (a service keeps its replica count):
    replaced whenever it ends, only when it fails (a non-zero exit, or its node lost or
    degraded), or never (one failed replica fails the job and stops the rest)."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class SpreadPolicy(enum.StrEnum):
    """Where an inference job's replicas go, for availability: one to a node where the
    cheapest fitting nodes allow (a node lost loses one replica; the default, as Kubernetes
    spreads a service's pods by default); one to a fabric (a switch or zone lost loses as few
    as the fitting nodes allow), then one to a node within each; or packed as tightly as the
    packing score says (fewer nodes busy: cheaper to scale down, more replicas lost with a
    node)."""

    NODE = "node"
    FABRIC = "fabric"
    NONE = "none"


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    index: int
    uuid: str
    model: str
    memory_mib: int
    hbm_gbps: float  # datasheet / theoretical
    nvlink_gbps: float = 0.0  # aggregate NVLink bandwidth of this GPU, 0 = none
    measured_hbm_gbps: float | None = None  # None: not measured
    mig_enabled: bool = False
    pci_bus_id: str = ""
    nvlink_links_active: int = 0
    nvlink_links_total: int = 0  # links the GPU has (active or not)
    nvlink_version: int = 0  # the NVLink generation, e.g. 4 on Hopper
    nvlink_peers: tuple[str, ...] = ()  # PCI bus ids at the far end of active links
    pcie_gen: int = 0  # current link
    pcie_width: int = 0
    pcie_max_gen: int = 0
    pcie_max_width: int = 0
    numa_node: int = -1  # -1: unknown
    cpu_affinity: str = ""  # CPU list, e.g. "0-47,96-143"


@dataclass(frozen=True, slots=True, kw_only=True)
class IbPort:
    """One InfiniBand or RoCE port, as /sys/class/infiniband shows it."""

    device: str  # e.g. mlx5_0
    port: int
    rate_gbps: float
    state: str  # ACTIVE, DOWN, ...
    phys_state: str  # LinkUp, Disabled, ...
    link_layer: str  # InfiniBand | Ethernet (RoCE)
    guid: str = ""  # port GUID, to check that nodes claiming one fabric are plausible


@dataclass(frozen=True, slots=True, kw_only=True)
class Network:
    kind: NetKind = NetKind.NONE
    ports: int = 0
    gbps_per_port: float = 0.0

    @property
    def total_gbps(self) -> float:
        return self.ports * self.gbps_per_port


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthProfile:
    """What the agent measured (or derived from the datasheet) about one node."""

    gpus: tuple[Gpu, ...] = ()
    nvlink_domain_size: int = 0  # GPUs reachable from each other over NVLink
    pcie_gen: int = 0
    pcie_width: int = 0
    network: Network = field(default_factory=Network)
    ib_ports: tuple[IbPort, ...] = ()
    bf16_tflops: float = 0.0  # dense, whole node
    source: str = "fake"  # "fake" | "nvml"
    measured_at: datetime | None = None

    @property
    def gpu_model(self) -> str:
        return self.gpus[0].model if self.gpus else ""

    @property
    def hbm_gbps(self) -> float:
        """HBM bandwidth per GPU (measured where known, else theoretical)."""
        if not self.gpus:
            return 0.0
        g = self.gpus[0]
        return g.measured_hbm_gbps if g.measured_hbm_gbps is not None else g.hbm_gbps

    @property
    def nvlink_gbps(self) -> float:
        return min((g.nvlink_gbps for g in self.gpus), default=0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    id: str  # unique name, e.g. the hostname
    address: str  # where ranks on this node are reachable (MASTER_ADDR when rank 0)
    fabric: str = ""  # fabric path "fabric/spine/leaf"; nodes sharing the first part can be ganged
    provider: str = "static"
    sku: str = ""
    region: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    cpu_milli: int = 0
    memory_mib: int = 0
    profile: BandwidthProfile = field(default_factory=BandwidthProfile)
    price_per_hour: float = 0.0
    state: NodeState = NodeState.READY
    state_reason: str = ""
    health_issues: tuple[
        str, ...
    ] = ()  # what the agent found wrong, e.g. "GPU 3: NVLink 2/18 down"
    lease_id: str = ""
    registered_at: datetime | None = None
    last_heartbeat: datetime | None = None

    @property
    def gpu_count(self) -> int:
        return len(self.profile.gpus)

    @property
    def fabric_name(self) -> str:
        return self.fabric.split("/", 1)[0] if self.fabric else ""

    @property
    def leaf(self) -> str:
        return self.fabric


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLease:
    id: str
    provider: str
    provider_lease_id: str = ""
    node_id: str = ""
    sku: str = ""
    price_per_hour: float = 0.0
    acquired_at: datetime | None = None
    expires_at: datetime | None = None
    released_at: datetime | None = None
    for_job_id: int | None = None
    state: LeaseState = LeaseState.REQUESTED
    # An active leased node with nothing on it: since when (what its idle grace counts from;
    # kept in the store, so that a gpuctld taking over counts from the same instant).
    idle_since: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What the user asked for. Validated by `core.validation.validate_spec`."""

    kind: JobKind
    command: tuple[str, ...]
    name: str = ""
    owner: str = ""
    queue: str = "default"
    priority: int = 0
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    time_limit_s: int = 0  # 0 = none
    # training: a gang of num_nodes x gpus_per_node, all or nothing, one fabric
    num_nodes: int = 1
    gpus_per_node: int = 0
    min_nvlink_gbps: float = 0.0
    min_net_gbps: float = 0.0
    # inference: replicas, each whole GPUs (gpus_per_node) or a share of one (gpu_milli)
    replicas: int = 1
    gpu_milli: int = 0  # 1..999: a share of one GPU; 0: whole GPUs
    gpu_memory_mib: int = 0  # per replica (weights + KV cache)
    # "" = any; else a model name such as "H100 SXM", or several a job accepts, "|"-separated
    # as the Alibaba trace writes them ("A100 80GB|H100 SXM"; the job file takes a list)
    gpu_model: str = ""
    cpu_milli: int = 0  # per rank/replica
    memory_mib: int = 0  # per rank/replica
    on_node_lost: OnNodeLost = OnNodeLost.REQUEUE
    preemptible: bool = False
    # inference: a decode throughput target per replica and the weights it streams per token;
    # tokens/s ~ HBM GB/s / weights GB, so the pair sets an HBM floor (0 = none)
    target_tokens_per_s: float = 0.0
    weights_gb: float = 0.0
    # keys of `env` whose values are shown to no one after submission (they reach the ranks)
    secret_env: tuple[str, ...] = ()
    # inference: None = on-failure; a training gang is all or nothing (never; `on_node_lost`)
    restart_policy: RestartPolicy | None = None
    # inference, a rolling update (`gpuctl update`): new replicas placed beyond the desired
    # count at once, replicas that may be short of available meanwhile, and how long a new
    # replica must run to count as available
    max_surge: int = 1
    max_unavailable: int = 0
    min_ready_s: int = 10
    progress_deadline_s: int = 600  # a new replica not available this long rolls it back
    # inference: the readiness probe the agent runs against the replica's $GPUCTL_PORT on its
    # node: an HTTP GET of this path (2xx or 3xx is ready), or a TCP connect; none: a replica
    # is ready once its process runs
    readiness_http: str = ""
    readiness_tcp: bool = False
    # inference: one replica to a node where it can, or packed
    spread: SpreadPolicy = SpreadPolicy.NODE

    @property
    def gpu_models(self) -> tuple[str, ...]:
        """The GPU models the job accepts (`gpu_model` split); () for any."""
        return tuple(m for m in (part.strip() for part in self.gpu_model.split("|")) if m)

    def accepts(self, model: str) -> bool:
        """Whether a GPU of `model` will do (model names compare case-insensitively)."""
        wanted = self.gpu_models
        return not wanted or model.casefold() in {m.casefold() for m in wanted}

    @property
    def is_gang(self) -> bool:
        """A training job of several nodes: placed all or nothing, on one fabric."""
        return self.kind is JobKind.TRAINING and self.num_nodes > 1

    @property
    def probed(self) -> bool:
        return bool(self.readiness_http or self.readiness_tcp)

    @property
    def restart(self) -> RestartPolicy:
        if self.kind is JobKind.TRAINING:
            return RestartPolicy.NEVER
        return self.restart_policy or RestartPolicy.ON_FAILURE

    @property
    def hbm_floor_gbps(self) -> float:
        """The HBM bandwidth a replica needs to meet its tokens/s target; 0 without one."""
        return self.target_tokens_per_s * self.weights_gb

    @property
    def rank_count(self) -> int:
        return self.num_nodes if self.kind is JobKind.TRAINING else self.replicas

    @property
    def total_gpus(self) -> float:
        if self.kind is JobKind.TRAINING:
            return float(self.num_nodes * self.gpus_per_node)
        if self.gpu_milli:
            return self.replicas * self.gpu_milli / MILLI_PER_GPU
        return float(self.replicas * self.gpus_per_node)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankPlacement:
    """Where one rank (training: one node of the gang) or replica (inference) runs."""

    rank: int
    node_id: str
    gpu_indices: tuple[int, ...] = ()
    gpu_milli: int = MILLI_PER_GPU  # per GPU in gpu_indices; < 1000 for a GPU share
    cpu_milli: int = 0
    memory_mib: int = 0
    state: RankState = RankState.ASSIGNED
    exit_code: int | None = None
    message: str = ""
    # A service's replica: how many replicas failed before this one in its place (the count
    # restarts from 0 after one ran long enough), the last one's failure, and when this one
    # started and ended (what its replacement's backoff counts from).
    restarts: int = 0
    last_failure: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    generation: int = 0  # a service's spec this replica runs (see Placement.generation)
    port: int = 0  # an inference replica's own port on its node ($GPUCTL_PORT); 0: none
    ready: bool = False  # its readiness probe passed (once: it then stays ready)

    @property
    def live(self) -> bool:
        return self.state in (RankState.ASSIGNED, RankState.RUNNING)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    ranks: tuple[RankPlacement, ...]
    master_addr: str = ""
    master_port: int = 0
    reason: str = ""  # why here, for `gpuctl describe`
    # A service's next rank number: replicas scaled away are gone from `ranks` but may still be
    # stopping on their nodes, so no new replica takes their number (0: one past the highest).
    next_rank: int = 0
    # A service's rolling update: the generation of its spec its replicas should run (each
    # update a new one), and the spec and generation it came from (kept while it rolls, for
    # a rollback; None when no update is under way).
    generation: int = 0
    previous_spec: JobSpec | None = None
    previous_generation: int = 0

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(r.node_id for r in self.ranks)

    def with_rank(self, rank: RankPlacement) -> Placement:
        return replace(self, ranks=tuple(rank if r.rank == rank.rank else r for r in self.ranks))


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    id: int
    spec: JobSpec
    state: JobState = JobState.PENDING
    request_id: str = ""
    attempt: int = 0  # bumped on every requeue; reports from older attempts are ignored
    placement: Placement | None = None
    reason: str = ""  # pending reason, or why it failed
    exit_code: int | None = None
    # CANCELLING: the end state once its ranks are stopped (CANCELLED, or TIMEOUT)
    end_state: JobState | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    revision: int = 0  # store-wide change counter, for WatchJobs resume


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Something that happened to a job or node, for `gpuctl describe`."""

    object_kind: str  # "job" | "node"
    object_id: str
    time: datetime
    type: str  # short word: Submitted, Scheduled, Started, Exited, Cancelled, NodeLost, ...
    message: str
