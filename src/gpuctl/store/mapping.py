"""Conversion between store rows (`store.tables`) and the domain model (`core.model`).

Nested dataclasses travel as JSON. Decoding keeps only the fields the model knows, so a row
written by a newer gpuctld (during a rolling upgrade of an HA pair) still reads.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Row

from gpuctl.core.cost import AttemptCharge
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
    Placement,
    RankPlacement,
    RankState,
    RestartPolicy,
    SpreadPolicy,
)
from gpuctl.core.trust import ApiToken, AuditEntry, TokenKind
from gpuctl.store.base import utc
from gpuctl.store.tables import (
    AuditRow,
    ChargeRow,
    EventRow,
    JobRow,
    LeaseRow,
    NodeRow,
    TokenRow,
)

_T = TypeVar("_T")

# -- jobs ---------------------------------------------------------------------------------------


# The columns a job's submission fixes: its spec (and what the row repeats of it for filters),
# its request id and creation time. Updates write the rest.
FIXED_AT_CREATION = frozenset(
    {"request_id", "created_at", "owner", "queue", "name", "kind", "priority", "spec"}
)


def job_values(job: Job) -> dict[str, Any]:
    """Column values of a job's row; `id` is left out (the database assigns it)."""
    spec = job.spec
    return {
        "request_id": job.request_id or None,
        "owner": spec.owner,
        "queue": spec.queue,
        "name": spec.name,
        "kind": spec.kind.value,
        "priority": spec.priority,
        "spec": _dumps(spec),
        "created_at": utc(job.created_at),
        **job_state_values(job),
    }


def job_state_values(job: Job) -> dict[str, Any]:
    """The columns an update writes: all but FIXED_AT_CREATION (a spec is never re-encoded)."""
    return {
        "state": job.state.value,
        "attempt": job.attempt,
        "revision": job.revision,
        "placement": None if job.placement is None else _dumps(job.placement),
        "reason": job.reason,
        "exit_code": job.exit_code,
        "end_state": None if job.end_state is None else job.end_state.value,
        "started_at": utc(job.started_at),
        "finished_at": utc(job.finished_at),
        "updated_at": utc(job.updated_at),
    }


def as_stored(job: Job) -> Job:
    """`job` as reading it back would give it: its times in UTC."""
    return replace(
        job,
        created_at=utc(job.created_at),
        started_at=utc(job.started_at),
        finished_at=utc(job.finished_at),
        updated_at=utc(job.updated_at),
    )


def job_from_row(row: JobRow | Row[Any]) -> Job:
    """A job from its row: an ORM object, or a Core row of the jobs table (the same names)."""
    assert row.id is not None, "a job row is read after the database gave it an id"
    return Job(
        id=row.id,
        spec=spec_from_text(row.spec),
        state=JobState(row.state),
        request_id=row.request_id or "",
        attempt=row.attempt,
        placement=None if row.placement is None else _placement_from(json.loads(row.placement)),
        reason=row.reason,
        exit_code=row.exit_code,
        end_state=None if row.end_state is None else JobState(row.end_state),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        updated_at=row.updated_at,
        revision=row.revision,
    )


# Specs decoded, by their stored text: the jobs of an array, or a queue of alike submissions,
# share one (frozen) spec instead of decoding and holding one each. Bounded: emptied when full.
_SPECS: dict[str, JobSpec] = {}
_SPECS_MAX = 4096


def spec_from_text(text: str) -> JobSpec:
    """The spec stored as `text` (a JSON object)."""
    spec = _SPECS.get(text)
    if spec is None:
        if len(_SPECS) >= _SPECS_MAX:
            _SPECS.clear()
        spec = _SPECS[text] = _spec_from(json.loads(text))
    return spec


def _spec_from(data: dict[str, Any]) -> JobSpec:
    known = _known(JobSpec, data)
    return JobSpec(
        **{
            **known,
            "kind": JobKind(known["kind"]),
            "command": tuple(known.get("command", ())),
            "env": _pairs(known.get("env", ())),
            "secret_env": tuple(known.get("secret_env", ())),
            "on_node_lost": OnNodeLost(known.get("on_node_lost", OnNodeLost.REQUEUE)),
            "restart_policy": _maybe(RestartPolicy, known.get("restart_policy")),
            "spread": SpreadPolicy(known.get("spread", SpreadPolicy.NODE)),
        }
    )


def _placement_from(data: dict[str, Any]) -> Placement:
    known = _known(Placement, data)
    return Placement(
        **{
            **known,
            "ranks": tuple(_rank_from(r) for r in known.get("ranks", ())),
            "previous_spec": _maybe(_spec_from, known.get("previous_spec")),
        }
    )


def _rank_from(data: dict[str, Any]) -> RankPlacement:
    known = _known(RankPlacement, data)
    return RankPlacement(
        **{
            **known,
            "gpu_indices": tuple(known.get("gpu_indices", ())),
            "state": RankState(known.get("state", RankState.ASSIGNED)),
            "started_at": _maybe(_time_from, known.get("started_at")),
            "ended_at": _maybe(_time_from, known.get("ended_at")),
        }
    )


def _time_from(text: str) -> datetime:
    return utc(datetime.fromisoformat(text))


def _maybe(parse: Callable[[Any], _T], value: Any) -> _T | None:
    return None if value is None else parse(value)


# -- nodes and leases ---------------------------------------------------------------------------


def node_values(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "address": node.address,
        "fabric": node.fabric,
        "provider": node.provider,
        "sku": node.sku,
        "region": node.region,
        "labels": _dumps(node.labels),
        "cpu_milli": node.cpu_milli,
        "memory_mib": node.memory_mib,
        "profile": _dumps(node.profile),
        "price_per_hour": node.price_per_hour,
        "state": node.state.value,
        "state_reason": node.state_reason,
        "health_issues": _dumps(node.health_issues),
        "lease_id": node.lease_id,
        "registered_at": utc(node.registered_at),
        "last_heartbeat": utc(node.last_heartbeat),
    }


def node_from_row(row: NodeRow) -> Node:
    return Node(
        id=row.id,
        address=row.address,
        fabric=row.fabric,
        provider=row.provider,
        sku=row.sku,
        region=row.region,
        labels=_pairs(json.loads(row.labels)),
        cpu_milli=row.cpu_milli,
        memory_mib=row.memory_mib,
        profile=_profile_from(json.loads(row.profile)),
        price_per_hour=float(row.price_per_hour),  # SQLite's RETURNING can hand back 0 for 0.0
        state=NodeState(row.state),
        state_reason=row.state_reason,
        health_issues=tuple(json.loads(row.health_issues or "[]")),
        lease_id=row.lease_id,
        registered_at=row.registered_at,
        last_heartbeat=row.last_heartbeat,
    )


def _profile_from(data: dict[str, Any]) -> BandwidthProfile:
    known = _known(BandwidthProfile, data)
    measured_at = known.get("measured_at")
    return BandwidthProfile(
        **{
            **known,
            "gpus": tuple(_gpu_from(g) for g in known.get("gpus", ())),
            "ib_ports": tuple(IbPort(**_known(IbPort, p)) for p in known.get("ib_ports", ())),
            "network": _network_from(known.get("network", {})),
            "measured_at": _maybe(_time_from, measured_at),
        }
    )


def _gpu_from(data: dict[str, Any]) -> Gpu:
    known = _known(Gpu, data)
    return Gpu(**{**known, "nvlink_peers": tuple(known.get("nvlink_peers", ()))})


def _network_from(data: dict[str, Any]) -> Network:
    known = _known(Network, data)
    return Network(**{**known, "kind": NetKind(known.get("kind", NetKind.NONE))})


def lease_values(lease: NodeLease) -> dict[str, Any]:
    return {
        "id": lease.id,
        "provider": lease.provider,
        "provider_lease_id": lease.provider_lease_id,
        "node_id": lease.node_id,
        "sku": lease.sku,
        "price_per_hour": lease.price_per_hour,
        "acquired_at": utc(lease.acquired_at),
        "expires_at": utc(lease.expires_at),
        "released_at": utc(lease.released_at),
        "for_job_id": lease.for_job_id,
        "state": lease.state.value,
        "idle_since": utc(lease.idle_since),
    }


def lease_from_row(row: LeaseRow) -> NodeLease:
    return NodeLease(
        id=row.id,
        provider=row.provider,
        provider_lease_id=row.provider_lease_id,
        node_id=row.node_id,
        sku=row.sku,
        price_per_hour=float(row.price_per_hour),  # SQLite's RETURNING can hand back 0 for 0.0
        acquired_at=row.acquired_at,
        expires_at=row.expires_at,
        released_at=row.released_at,
        for_job_id=row.for_job_id,
        state=LeaseState(row.state),
        idle_since=row.idle_since,
    )


# -- events -------------------------------------------------------------------------------------


def event_values(event: Event) -> dict[str, Any]:
    return {
        "object_kind": event.object_kind,
        "object_id": event.object_id,
        "time": utc(event.time),
        "type": event.type,
        "message": event.message,
    }


def event_from_row(row: EventRow | Row[Any]) -> Event:
    return Event(
        object_kind=row.object_kind,
        object_id=row.object_id,
        time=row.time,
        type=row.type,
        message=row.message,
    )


def charge_row(charge: AttemptCharge) -> ChargeRow:
    values = {f.name: getattr(charge, f.name) for f in fields(charge)}
    values.update(started_at=utc(charge.started_at), ended_at=utc(charge.ended_at))
    return ChargeRow(**values)


def charge_from_row(row: ChargeRow) -> AttemptCharge:
    return AttemptCharge(**_known(AttemptCharge, row.model_dump()))


def token_row(token: ApiToken) -> TokenRow:
    values = {f.name: getattr(token, f.name) for f in fields(token)}
    for name in ("created_at", "expires_at", "revoked_at"):
        values[name] = utc(values[name])
    values["kind"] = token.kind.value
    return TokenRow(**values)


def token_from_row(row: TokenRow) -> ApiToken:
    values = _known(ApiToken, row.model_dump())
    values["kind"] = TokenKind(values["kind"])
    return ApiToken(**values)


def audit_values(entry: AuditEntry) -> dict[str, Any]:
    values = {f.name: getattr(entry, f.name) for f in fields(entry) if f.name != "id"}
    values["time"] = utc(entry.time)
    return values


def audit_from_row(row: AuditRow) -> AuditEntry:
    return AuditEntry(**_known(AuditEntry, row.model_dump()))


# -- JSON ---------------------------------------------------------------------------------------


def _dumps(value: object) -> str:
    return json.dumps(_plain(value), separators=(",", ":"), allow_nan=False)


def _plain(value: object) -> Any:
    """The JSON shape of a model value: dataclasses as objects, tuples as arrays, enums as values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return utc(value).isoformat()
    return value


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = _field_names(cls)
    return {k: v for k, v in data.items() if k in names}


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _pairs(items: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in items)
