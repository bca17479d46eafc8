"""Protobuf <-> core model conversion; the only module that knows both shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from gpuctl.api._pb.agent.v1 import agent_pb2
from gpuctl.api._pb.v1 import auth_pb2, events_pb2, jobs_pb2, leases_pb2, nodes_pb2
from gpuctl.core import services
from gpuctl.core.cost import CostBy, CostReport
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import (
    BandwidthProfile,
    Event,
    Gpu,
    IbPort,
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    NetKind,
    Network,
    Node,
    NodeLease,
    NodeState,
    OnNodeLost,
    RankState,
    RestartPolicy,
    SpreadPolicy,
)
from gpuctl.core.trust import ApiToken, AuditEntry
from gpuctl.core.validation import spec_violations

JOB_KIND = {
    JobKind.TRAINING: jobs_pb2.JOB_KIND_TRAINING,
    JobKind.INFERENCE: jobs_pb2.JOB_KIND_INFERENCE,
}
JOB_STATE = {s: jobs_pb2.JobState.Value(f"JOB_STATE_{s.name}") for s in JobState}
RANK_STATE = {s: jobs_pb2.RankState.Value(f"RANK_STATE_{s.name}") for s in RankState}
NODE_STATE = {s: nodes_pb2.NodeState.Value(f"NODE_STATE_{s.name}") for s in NodeState}
NET_KIND = {k: nodes_pb2.NetKind.Value(f"NET_KIND_{k.name}") for k in NetKind}
LEASE_STATE = {s: leases_pb2.LeaseState.Value(f"LEASE_STATE_{s.name}") for s in LeaseState}
COST_BY = {b: leases_pb2.CostGroupBy.Value(f"COST_GROUP_BY_{b.name}") for b in CostBy}
RESTART_POLICY = {
    RestartPolicy.ALWAYS: jobs_pb2.RESTART_POLICY_ALWAYS,
    RestartPolicy.ON_FAILURE: jobs_pb2.RESTART_POLICY_ON_FAILURE,
    RestartPolicy.NEVER: jobs_pb2.RESTART_POLICY_NEVER,
}
RESTART_POLICY_FROM = {v: k for k, v in RESTART_POLICY.items()}
SPREAD = {
    SpreadPolicy.NODE: jobs_pb2.SPREAD_NODE,
    SpreadPolicy.FABRIC: jobs_pb2.SPREAD_FABRIC,
    SpreadPolicy.NONE: jobs_pb2.SPREAD_NONE,
}
SPREAD_FROM = {0: SpreadPolicy.NODE, **{v: k for k, v in SPREAD.items()}}
ON_NODE_LOST = {
    OnNodeLost.REQUEUE: jobs_pb2.ON_NODE_LOST_REQUEUE,
    OnNodeLost.FAIL: jobs_pb2.ON_NODE_LOST_FAIL,
}


def _inverse(table: dict) -> dict:
    return {v: k for k, v in table.items()}


JOB_STATE_FROM = _inverse(JOB_STATE)
RANK_STATE_FROM = _inverse(RANK_STATE)
NODE_STATE_FROM = _inverse(NODE_STATE)
NET_KIND_FROM = _inverse(NET_KIND)
LEASE_STATE_FROM = _inverse(LEASE_STATE)
COST_BY_FROM = {**_inverse(COST_BY), leases_pb2.COST_GROUP_BY_UNSPECIFIED: CostBy.JOB}


# -- time ---------------------------------------------------------------------------------


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    t = Timestamp()
    t.FromDatetime(value.astimezone(UTC))
    return t


# Times gpuctl accepts from the wire. Protobuf's own range (years 1-9999) makes
# `ToDatetime` raise, and the far ends of it overflow the datetime arithmetic done with them.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2201, 1, 1, tzinfo=UTC)  # exclusive: the year 2200 is the last allowed
_EARLIEST_S = int(EARLIEST_TIME.timestamp())
_LATEST_S = int(LATEST_TIME.timestamp())


def from_ts(msg: Timestamp, present: bool = True, field: str = "time") -> datetime | None:
    """The aware UTC time in `msg`; None when absent or zero. A time outside 1970..2200 raises
    `InvalidArgument` naming `field`."""
    if not present or (msg.seconds == 0 and msg.nanos == 0):
        return None
    if not _EARLIEST_S <= msg.seconds < _LATEST_S or not 0 <= msg.nanos < 1_000_000_000:
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    f"must be a time between {EARLIEST_TIME.year} and {LATEST_TIME.year - 1}, "
                    f"got {msg.seconds} seconds and {msg.nanos} nanoseconds since 1970",
                )
            ]
        )
    return msg.ToDatetime(tzinfo=UTC)


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


# -- jobs ---------------------------------------------------------------------------------


# The JobSpec integers and the wire type each travels as; protobuf raises ValueError on a
# value its type cannot hold, and TypeError on a float or a bool.
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1
_SPEC_INTS = {
    "priority": _INT32,
    "num_nodes": _INT32,
    "gpus_per_node": _INT32,
    "replicas": _INT32,
    "gpu_milli": _INT32,
    "gpu_memory_mib": _INT64,
    "cpu_milli": _INT64,
    "memory_mib": _INT64,
    "time_limit_s": 315_576_000_000,  # google.protobuf.Duration's range, 10,000 years
    "max_surge": _INT32,
    "max_unavailable": _INT32,
    "min_ready_s": 315_576_000_000,
    "progress_deadline_s": 315_576_000_000,
}
_SPEC_FLOATS = ("min_nvlink_gbps", "min_net_gbps", "target_tokens_per_s", "weights_gb")


def _wire_violations(spec: JobSpec) -> list[FieldViolation]:
    """The fields of `spec` the wire cannot carry, named and described as the server would."""
    if _fits_the_wire(spec):  # the common case, on every job of every reply: kept cheap
        return []
    wrong_type = [
        FieldViolation(f"spec.{name}", f"must be an integer, got {getattr(spec, name)!r:.64}")
        for name in _SPEC_INTS
        if isinstance(getattr(spec, name), bool) or not isinstance(getattr(spec, name), int)
    ] + [
        FieldViolation(f"spec.{name}", f"must be a number, got {getattr(spec, name)!r:.64}")
        for name in _SPEC_FLOATS
        if isinstance(getattr(spec, name), bool) or not isinstance(getattr(spec, name), int | float)
    ]
    if wrong_type:  # spec_violations compares numbers and cannot run on these
        return wrong_type
    too_large = {
        f"spec.{name}" for name, most in _SPEC_INTS.items() if abs(getattr(spec, name)) > most
    } | {
        f"spec.{name}"
        for name in _SPEC_FLOATS
        if isinstance(getattr(spec, name), int) and abs(getattr(spec, name)) > 2**1023
    }
    if not too_large:
        return []
    found = [v for v in spec_violations(spec) if v.field in too_large]
    return found + [
        FieldViolation(field, "is beyond the range the API carries")
        for field in sorted(too_large - {v.field for v in found})
    ]


def _fits_the_wire(spec: JobSpec) -> bool:
    for name, most in _SPEC_INTS.items():
        value = getattr(spec, name)
        if type(value) is not int or not -most <= value <= most:
            return False
    # Ints and anything else where a float goes: the long way.
    return all(type(getattr(spec, name)) is float for name in _SPEC_FLOATS)


def spec_to_pb(spec: JobSpec) -> jobs_pb2.JobSpec:
    """The wire form of `spec`. A value no message can carry (an int past int32, a string
    where a number goes) raises `InvalidArgument` naming the field, as the server's checks
    would; the rest of validation is the server's."""
    violations = _wire_violations(spec)
    if violations:
        raise InvalidArgument(violations)
    msg = jobs_pb2.JobSpec(
        kind=JOB_KIND[spec.kind],
        name=spec.name,
        queue=spec.queue,
        priority=spec.priority,
        command=list(spec.command),
        env=dict(spec.env),
        secret_env=list(spec.secret_env),
        working_dir=spec.working_dir,
        gpus_per_node=spec.gpus_per_node,
        min_nvlink_gbps=spec.min_nvlink_gbps,
        min_net_gbps=spec.min_net_gbps,
        gpu_milli=spec.gpu_milli,
        gpu_memory_mib=spec.gpu_memory_mib,
        gpu_model=spec.gpu_model,
        cpu_milli=spec.cpu_milli,
        memory_mib=spec.memory_mib,
        on_node_lost=ON_NODE_LOST[spec.on_node_lost],
        preemptible=spec.preemptible,
        num_nodes=spec.num_nodes,
        replicas=spec.replicas,
        target_tokens_per_s=spec.target_tokens_per_s,
        weights_gb=spec.weights_gb,
        restart_policy=RESTART_POLICY[spec.restart_policy] if spec.restart_policy else 0,
        max_surge=spec.max_surge,
        max_unavailable=spec.max_unavailable,
        readiness_http=spec.readiness_http,
        readiness_tcp=spec.readiness_tcp,
        spread=SPREAD[spec.spread],
    )
    if spec.time_limit_s:
        msg.time_limit.CopyFrom(duration(spec.time_limit_s))
    msg.min_ready.CopyFrom(duration(spec.min_ready_s))
    msg.progress_deadline.CopyFrom(duration(spec.progress_deadline_s))
    return msg


def spec_from_pb(msg: jobs_pb2.JobSpec, *, owner: str = "") -> JobSpec:
    """A model spec from the wire; structural problems raise `InvalidArgument` (the rest is
    `core.validation`'s job)."""
    violations: list[FieldViolation] = []
    kind = {v: k for k, v in JOB_KIND.items()}.get(msg.kind)
    if kind is None:
        violations.append(FieldViolation("spec.kind", "must be 'training' or 'inference'"))
    time_limit = msg.time_limit.seconds if msg.HasField("time_limit") else 0
    if msg.HasField("time_limit") and (msg.time_limit.seconds < 0 or msg.time_limit.nanos < 0):
        violations.append(FieldViolation("spec.time_limit", "must not be negative"))
    for name in ("min_ready", "progress_deadline"):
        value = getattr(msg, name)
        if msg.HasField(name) and (value.seconds < 0 or value.nanos < 0):
            violations.append(FieldViolation(f"spec.{name}", "must not be negative"))
    if msg.on_node_lost not in (0, *ON_NODE_LOST.values()):
        violations.append(FieldViolation("spec.on_node_lost", "must be 'requeue' or 'fail'"))
    if msg.restart_policy not in (0, *RESTART_POLICY_FROM):
        violations.append(
            FieldViolation("spec.restart_policy", "must be 'always', 'on-failure' or 'never'")
        )
    if msg.spread not in SPREAD_FROM:
        violations.append(FieldViolation("spec.spread", "must be 'node', 'fabric' or 'none'"))
    if violations:
        raise InvalidArgument(violations)
    assert kind is not None
    return JobSpec(
        kind=kind,
        command=tuple(msg.command),
        name=msg.name,
        owner=owner,
        queue=msg.queue or "default",
        priority=msg.priority,
        env=tuple(sorted(msg.env.items())),
        secret_env=tuple(sorted(set(msg.secret_env))),
        working_dir=msg.working_dir,
        time_limit_s=time_limit,
        num_nodes=msg.num_nodes if msg.HasField("num_nodes") else 1,
        gpus_per_node=msg.gpus_per_node,
        min_nvlink_gbps=msg.min_nvlink_gbps,
        min_net_gbps=msg.min_net_gbps,
        replicas=msg.replicas if msg.HasField("replicas") else 1,
        gpu_milli=msg.gpu_milli,
        gpu_memory_mib=msg.gpu_memory_mib,
        gpu_model=msg.gpu_model,
        cpu_milli=msg.cpu_milli,
        memory_mib=msg.memory_mib,
        on_node_lost=OnNodeLost.FAIL
        if msg.on_node_lost == jobs_pb2.ON_NODE_LOST_FAIL
        else OnNodeLost.REQUEUE,
        preemptible=msg.preemptible,
        target_tokens_per_s=msg.target_tokens_per_s,
        weights_gb=msg.weights_gb,
        restart_policy=RESTART_POLICY_FROM.get(msg.restart_policy),
        max_surge=msg.max_surge if msg.HasField("max_surge") else 1,
        max_unavailable=msg.max_unavailable,
        min_ready_s=msg.min_ready.seconds if msg.HasField("min_ready") else 10,
        progress_deadline_s=(
            msg.progress_deadline.seconds if msg.HasField("progress_deadline") else 600
        ),
        readiness_http=msg.readiness_http,
        readiness_tcp=msg.readiness_tcp,
        spread=SPREAD_FROM[msg.spread],
    )


def job_name(job_id: int) -> str:
    return f"jobs/{job_id}"


def parse_job_name(name: str, field: str = "name") -> int:
    """'jobs/42' or '42' -> 42; anything else is `InvalidArgument` on `field`."""
    raw = name.removeprefix("jobs/")
    # isascii: isdigit() is true for '²', which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) <= 0:
        raise InvalidArgument(
            [FieldViolation(field, f"{name!r} is not a job name like 'jobs/42' or '42'")]
        )
    return int(raw)


def event_to_pb(event: Event) -> events_pb2.Event:
    return events_pb2.Event(time=ts(event.time), type=event.type, message=event.message)


def job_to_pb(
    job: Job,
    *,
    events: tuple[Event, ...] = (),
    rank_env: dict[int, dict[str, str]] | None = None,
) -> jobs_pb2.Job:
    msg = jobs_pb2.Job(
        name=job_name(job.id),
        id=job.id,
        spec=spec_to_pb(job.spec),
        state=JOB_STATE[job.state],
        owner=job.spec.owner,
        reason=job.reason,
        attempt=job.attempt,
        revision=job.revision,
        request_id=job.request_id,
        events=[event_to_pb(e) for e in events],
    )
    if job.exit_code is not None:
        msg.exit_code = job.exit_code
    for field, value in (
        ("create_time", job.created_at),
        ("start_time", job.started_at),
        ("end_time", job.finished_at),
        ("update_time", job.updated_at),
    ):
        if value is not None:
            getattr(msg, field).CopyFrom(ts(value))
    if job.placement is not None:
        p = job.placement
        msg.generation = p.generation
        msg.rolling = services.rolling(job)
        msg.placement.CopyFrom(
            jobs_pb2.Placement(
                master_addr=p.master_addr, master_port=p.master_port, reason=p.reason
            )
        )
        for r in p.ranks:
            rs = msg.placement.ranks.add(
                rank=r.rank,
                node=r.node_id,
                gpu_indices=list(r.gpu_indices),
                gpu_milli=r.gpu_milli,
                state=RANK_STATE[r.state],
                message=r.message,
                env=(rank_env or {}).get(r.rank, {}),
                restarts=r.restarts,
                last_failure=r.last_failure,
                generation=r.generation,
                port=r.port,
                ready=r.ready or (r.state is RankState.RUNNING and not job.spec.probed),
            )
            if r.exit_code is not None:
                rs.exit_code = r.exit_code
            if r.started_at is not None:
                rs.start_time.CopyFrom(ts(r.started_at))
            if r.ended_at is not None:
                rs.end_time.CopyFrom(ts(r.ended_at))
    return msg


# -- nodes --------------------------------------------------------------------------------


def profile_to_pb(p: BandwidthProfile) -> nodes_pb2.BandwidthProfile:
    msg = nodes_pb2.BandwidthProfile(
        nvlink_domain_size=p.nvlink_domain_size,
        pcie_gen=p.pcie_gen,
        pcie_width=p.pcie_width,
        network=nodes_pb2.Network(
            kind=NET_KIND[p.network.kind],
            ports=p.network.ports,
            gbps_per_port=p.network.gbps_per_port,
        ),
        bf16_tflops=p.bf16_tflops,
        source=p.source,
        measure_time=ts(p.measured_at),
    )
    for g in p.gpus:
        gm = msg.gpus.add(
            index=g.index,
            uuid=g.uuid,
            model=g.model,
            memory_mib=g.memory_mib,
            hbm_gbps=g.hbm_gbps,
            nvlink_gbps=g.nvlink_gbps,
            mig_enabled=g.mig_enabled,
            pci_bus_id=g.pci_bus_id,
            nvlink_links_active=g.nvlink_links_active,
            nvlink_links_total=g.nvlink_links_total,
            nvlink_version=g.nvlink_version,
            nvlink_peers=list(g.nvlink_peers),
            pcie_gen=g.pcie_gen,
            pcie_width=g.pcie_width,
            pcie_max_gen=g.pcie_max_gen,
            pcie_max_width=g.pcie_max_width,
            numa_node=g.numa_node,
            cpu_affinity=g.cpu_affinity,
        )
        if g.measured_hbm_gbps is not None:
            gm.measured_hbm_gbps = g.measured_hbm_gbps
    for port in p.ib_ports:
        msg.ib_ports.add(
            device=port.device,
            port=port.port,
            rate_gbps=port.rate_gbps,
            state=port.state,
            phys_state=port.phys_state,
            link_layer=port.link_layer,
            guid=port.guid,
        )
    return msg


def profile_from_pb(msg: nodes_pb2.BandwidthProfile, prefix: str = "profile.") -> BandwidthProfile:
    """The model profile; only its time is checked here, the rest is
    `core.validation.profile_violations`'s."""
    return BandwidthProfile(
        gpus=tuple(
            Gpu(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                memory_mib=g.memory_mib,
                hbm_gbps=g.hbm_gbps,
                nvlink_gbps=g.nvlink_gbps,
                measured_hbm_gbps=g.measured_hbm_gbps if g.HasField("measured_hbm_gbps") else None,
                mig_enabled=g.mig_enabled,
                pci_bus_id=g.pci_bus_id,
                nvlink_links_active=g.nvlink_links_active,
                nvlink_links_total=g.nvlink_links_total,
                nvlink_version=g.nvlink_version,
                nvlink_peers=tuple(g.nvlink_peers),
                pcie_gen=g.pcie_gen,
                pcie_width=g.pcie_width,
                pcie_max_gen=g.pcie_max_gen,
                pcie_max_width=g.pcie_max_width,
                numa_node=g.numa_node,
                cpu_affinity=g.cpu_affinity,
            )
            for g in msg.gpus
        ),
        ib_ports=tuple(
            IbPort(
                device=p.device,
                port=p.port,
                rate_gbps=p.rate_gbps,
                state=p.state,
                phys_state=p.phys_state,
                link_layer=p.link_layer,
                guid=p.guid,
            )
            for p in msg.ib_ports
        ),
        nvlink_domain_size=msg.nvlink_domain_size,
        pcie_gen=msg.pcie_gen,
        pcie_width=msg.pcie_width,
        network=Network(
            kind=NET_KIND_FROM.get(msg.network.kind, NetKind.NONE),
            ports=msg.network.ports,
            gbps_per_port=msg.network.gbps_per_port,
        ),
        bf16_tflops=msg.bf16_tflops,
        source=msg.source,
        measured_at=from_ts(
            msg.measure_time, msg.HasField("measure_time"), field=prefix + "measure_time"
        ),
    )


def node_to_pb(
    node: Node,
    *,
    usage: dict[int, tuple[int, list[int]]] | None = None,
    events: tuple[Event, ...] = (),
) -> nodes_pb2.Node:
    """`usage`: GPU index -> (used milli, job ids), from the daemon's view of running jobs."""
    msg = nodes_pb2.Node(
        name=node.id,
        address=node.address,
        fabric=node.fabric,
        provider=node.provider,
        sku=node.sku,
        region=node.region,
        labels=dict(node.labels),
        cpu_milli=node.cpu_milli,
        memory_mib=node.memory_mib,
        profile=profile_to_pb(node.profile),
        price_per_hour=node.price_per_hour,
        state=NODE_STATE[node.state],
        state_reason=node.state_reason,
        health_issues=list(node.health_issues),
        lease=node.lease_id,
        register_time=ts(node.registered_at),
        last_heartbeat_time=ts(node.last_heartbeat),
        events=[event_to_pb(e) for e in events],
    )
    for index, (milli, job_ids) in sorted((usage or {}).items()):
        msg.usage.add(index=index, used_milli=milli, job_ids=job_ids)
    return msg


def node_from_pb(msg: nodes_pb2.Node, prefix: str = "node.") -> Node:
    """The model node; only its times are checked here, the rest is
    `core.validation.node_violations`'s."""
    return Node(
        id=msg.name,
        address=msg.address,
        fabric=msg.fabric,
        provider=msg.provider or "static",
        sku=msg.sku,
        region=msg.region,
        labels=tuple(sorted(msg.labels.items())),
        cpu_milli=msg.cpu_milli,
        memory_mib=msg.memory_mib,
        profile=profile_from_pb(msg.profile, prefix + "profile."),
        price_per_hour=msg.price_per_hour,
        state=NODE_STATE_FROM.get(msg.state, NodeState.READY),
        state_reason=msg.state_reason,
        health_issues=tuple(msg.health_issues),
        lease_id=msg.lease,
        registered_at=from_ts(
            msg.register_time, msg.HasField("register_time"), field=prefix + "register_time"
        ),
        last_heartbeat=from_ts(
            msg.last_heartbeat_time,
            msg.HasField("last_heartbeat_time"),
            field=prefix + "last_heartbeat_time",
        ),
    )


# -- leases -------------------------------------------------------------------------------


def lease_to_pb(lease: NodeLease, *, now: datetime, kept_for: str = "") -> leases_pb2.Lease:
    end = lease.released_at or now
    hours = max(0.0, (end - lease.acquired_at).total_seconds() / 3600) if lease.acquired_at else 0.0
    return leases_pb2.Lease(
        name=f"leases/{lease.id}",
        provider=lease.provider,
        provider_lease_id=lease.provider_lease_id,
        node=lease.node_id,
        sku=lease.sku,
        price_per_hour=lease.price_per_hour,
        acquire_time=ts(lease.acquired_at),
        expire_time=ts(lease.expires_at),
        release_time=ts(lease.released_at),
        for_job_id=lease.for_job_id or 0,
        state=LEASE_STATE[lease.state],
        cost_usd=round(hours * lease.price_per_hour, 4),
        kept_for=kept_for,
    )


def cost_by_from_pb(value: int) -> CostBy:
    try:
        return COST_BY_FROM[value]
    except KeyError:
        raise InvalidArgument(
            [FieldViolation("group_by", f"unknown grouping {value}; job, queue or user")]
        ) from None


def cost_to_pb(
    report: CostReport, *, by: CostBy, since: datetime | None, now: datetime
) -> leases_pb2.GetCostResponse:
    return leases_pb2.GetCostResponse(
        rows=[
            leases_pb2.CostRow(
                key=r.key, dollars=round(r.dollars, 6), gpu_hours=round(r.gpu_hours, 6), jobs=r.jobs
            )
            for r in report.rows
        ],
        charged_dollars=round(report.charged_dollars, 6),
        leased_dollars=round(report.leased_dollars, 6),
        idle_dollars=round(report.idle_dollars, 6),
        since=ts(since),
        as_of=ts(now),
        group_by=COST_BY[by],
    )


# -- agent --------------------------------------------------------------------------------


def rank_ref(job_id: int, rank: int, attempt: int) -> agent_pb2.RankRef:
    return agent_pb2.RankRef(job_id=job_id, rank=rank, attempt=attempt)


# -- tokens and audit ----------------------------------------------------------------------


def token_to_pb(token: ApiToken) -> auth_pb2.Token:
    msg = auth_pb2.Token(
        id=token.id,
        kind=token.kind.value,
        principal=token.principal,
        description=token.description,
        created_by=token.created_by,
    )
    for name, value in (
        ("create_time", token.created_at),
        ("expire_time", token.expires_at),
        ("revoke_time", token.revoked_at),
    ):
        if value is not None:
            getattr(msg, name).CopyFrom(ts(value))
    return msg


def audit_to_pb(entry: AuditEntry) -> auth_pb2.AuditEntry:
    msg = auth_pb2.AuditEntry(
        id=entry.id,
        principal=entry.principal,
        role=entry.role,
        via=entry.via,
        peer=entry.peer,
        action=entry.action,
        target=entry.target,
        outcome=entry.outcome,
        detail=entry.detail,
    )
    msg.time.CopyFrom(ts(entry.time))
    return msg
