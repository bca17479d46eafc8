"""The error hierarchy of gpuctl, rooted in one base class; `api/status.py` maps it to gRPC codes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str  # dotted path, e.g. "spec.gpus_per_node"
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class GpuctlError(Exception):
    """Base of every error gpuctl raises on purpose."""


class InvalidArgument(GpuctlError, ValueError):
    """A request is malformed; carries one violation per bad field."""

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations) or "invalid argument")


class NotFound(GpuctlError, LookupError):
    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name} not found")


class AlreadyExists(GpuctlError):
    def __init__(self, kind: str, name: str, message: str = "") -> None:
        self.kind, self.name = kind, name
        super().__init__(message or f"{kind} {name} already exists")


class FailedPrecondition(GpuctlError):
    """The request is well formed but the object's state forbids it."""


class IllegalTransition(FailedPrecondition):
    def __init__(self, kind: str, name: str, state: str, event: str) -> None:
        self.kind, self.name, self.state, self.event = kind, name, state, event
        super().__init__(f"{kind} {name} is {state}: cannot {event}")


class Unavailable(GpuctlError):
    """A dependency (store, provider) cannot be reached now; retrying may help."""


class NotLeader(Unavailable):
    """This gpuctld is a standby (or was the leader and lost the lease): only the leader
    writes. `leader` and `leader_agent` are where the leader serves people and agents, as it
    advertised them ("" when no daemon holds the lease right now)."""

    def __init__(self, leader: str = "", leader_agent: str = "") -> None:
        self.leader = leader
        self.leader_agent = leader_agent
        where = f"the leader is at {leader}" if leader else "no leader right now; retry soon"
        super().__init__(f"this gpuctld is not the leader: {where}")


class ResourceExhausted(GpuctlError):
    """A limit was reached (calls in flight, pending jobs, a quota); retrying later may help."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)
