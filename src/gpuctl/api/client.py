"""The Python SDK for gpuctld: `Client` and the typed errors its calls raise.

Methods return the API's protobuf messages, as Google's Python clients do. Every unary call has
a deadline, and gRPC itself retries UNAVAILABLE for the calls that are safe to repeat. Given
several gpuctld (one leader, standbys), a call goes on to the next when one cannot be reached
or is a standby, and the client keeps to the one that answered.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gpuctl.api import convert, jobfile
from gpuctl.api._pb.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    events_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from gpuctl.api.auth import auth_socket_path, bearer, fetch_session
from gpuctl.api.status import NOT_LEADER
from gpuctl.core.errors import FieldViolation, GpuctlError, InvalidArgument
from gpuctl.core.model import JobSpec, JobState

__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_TARGET",
    "FINISHED_STATES",
    "AlreadyExistsError",
    "ApiError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "auth_pb2",
    "default_target",
    "events_pb2",
    "jobs_pb2",
    "leases_pb2",
    "nodes_pb2",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_SOCKET = "/run/gpuctl/gpuctld.sock"  # where the systemd unit puts gpuctld's socket
FINISHED_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_TIMEOUT,
        jobs_pb2.JOB_STATE_NODE_LOST,
    }
)

# The calls gRPC may repeat on UNAVAILABLE: reads, CreateJob (idempotent through request_id),
# CancelJob (cancelling twice is the same as once) and ScaleJob (it sets a count). DrainNode is
# left out: a retry after a lost reply would report "already draining" for a drain that worked.
# Streams are retried only until their first message, which gRPC guarantees.
_RETRYABLE = {
    "gpuctl.v1.JobService": (
        "CreateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "ScaleJob",
        "WatchJobs",
        "StreamJobLogs",
    ),
    "gpuctl.v1.NodeService": ("ListNodes", "GetNode"),
    "gpuctl.v1.LeaseService": ("ListLeases", "GetCost"),
    "gpuctl.v1.AuthService": ("WhoAmI", "ListTokens", "ListAudit"),
    "grpc.health.v1.Health": ("Check",),
}
# 5 attempts, 0.1s doubling to at most 2s: a daemon restarting (a few seconds) or a leader
# change is ridden out, while a daemon that is down fails the call in about 1.5s. A standby's
# NOT_LEADER is UNAVAILABLE too, but carries grpc-retry-pushback-ms -1, which stops gRPC's
# retries: the client goes on to the leader at once.
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": s, "method": m} for s, methods in _RETRYABLE.items() for m in methods
            ],
            "retryPolicy": _RETRY_POLICY,
        }
    ]
}

# -- several gpuctld (one leader, standbys): which address a call goes to -----------------
# The SDK and the agent both follow these rules.

# What gRPC core says when no connection could be made, as opposed to a server that answered
# UNAVAILABLE itself (store down, not the leader).
_CONNECT_FAILURES = (
    "failed to connect to all addresses",
    "DNS resolution failed",
    "Connection refused",
    "connections to all backends failing",
    "No address added out of total",
)


def split_target(target: str) -> tuple[str, ...]:
    """The addresses of "head1:50051,head2:50051", in order, each once; a `unix:` target is one
    address whatever it contains."""
    if target.startswith("unix:"):
        return (target,)
    return tuple(dict.fromkeys(a.strip() for a in target.split(",") if a.strip()))


def _status(err: grpc.RpcError) -> status_pb2.Status | None:
    if not isinstance(err, grpc.Call):
        return None
    try:
        return rpc_status.from_call(err)
    except ValueError:  # a Status whose code or message disagrees with the call's: ignore it
        return None


def could_not_connect(err: grpc.RpcError) -> bool:
    """True when no connection could be made: nothing was sent, so any call may go elsewhere."""
    return (
        isinstance(err, grpc.Call)
        and err.code() is grpc.StatusCode.UNAVAILABLE
        and any(s in (err.details() or "") for s in _CONNECT_FAILURES)
        and _status(err) is None
    )


def not_leader(err: grpc.RpcError) -> Mapping[str, str] | None:
    """The hints ("leader", "leader_agent") of a standby's NOT_LEADER answer, or None when
    `err` is something else. A standby did nothing, so any call may go to the leader."""
    status = _status(err)
    if status is None or status.code != grpc.StatusCode.UNAVAILABLE.value[0]:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason == NOT_LEADER:
            return dict(info.metadata)
    return None


def next_address(
    addresses: Sequence[str], current: int, hints: Iterable[str] = (), tried: Collection[int] = ()
) -> int | None:
    """The index to send a call to after `addresses[current]` refused it: the first hint that
    is exactly one of `addresses`, else the next one in the list (wrapping around); never
    `current` nor one in `tried`. None when there is none left."""
    skip = {current, *tried}
    for hint in hints:
        if hint in addresses and addresses.index(hint) not in skip:
            return addresses.index(hint)
    n = len(addresses)
    return next((i for i in ((current + s) % n for s in range(1, n)) if i not in skip), None)


_DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.DebugInfo,
)


# -- errors -------------------------------------------------------------------------------


class ApiError(GpuctlError):
    """A call to gpuctld failed; `code` is the gRPC status, `violations` the bad fields."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        details: Iterable[Any] = (),
    ) -> None:
        self.code = code
        self.message = message
        self.violations = tuple(violations)
        self.details = tuple(details)
        super().__init__(self._line())

    def _line(self) -> str:
        # The server's message usually is the violations already; add only the ones it left out.
        text = self.message or self.code.name.lower().replace("_", " ")
        missing = [str(v) for v in self.violations if v.field not in text]
        return f"{text}: {'; '.join(missing)}" if missing else text

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asked to wait before retrying (RetryInfo), if it said."""
        for d in self.details:
            if isinstance(d, error_details_pb2.RetryInfo):
                return d.retry_delay.ToTimedelta().total_seconds()
        return None

    @property
    def reason(self) -> str:
        """Why, in the server's ErrorInfo ("NOT_LEADER", "MISSING_PERMISSION"...); "" if none."""
        info = self._error_info()
        return info.reason if info is not None else ""

    @property
    def metadata(self) -> dict[str, str]:
        """What the server's ErrorInfo adds to its reason, e.g. {"leader": "head2:50051"}."""
        info = self._error_info()
        return dict(info.metadata) if info is not None else {}

    def _error_info(self) -> error_details_pb2.ErrorInfo | None:
        return next((d for d in self.details if isinstance(d, error_details_pb2.ErrorInfo)), None)


class InvalidArgumentError(ApiError, ValueError):
    """The request (usually the job spec) is malformed; `violations` names each bad field."""


class NotFoundError(ApiError, LookupError):
    pass


class AlreadyExistsError(ApiError):
    pass


class FailedPreconditionError(ApiError):
    """Well formed, but the object's state forbids it (e.g. cancelling a finished job)."""


class PermissionDeniedError(ApiError, PermissionError):
    """Not allowed, or not authenticated (the code says which)."""

    @property
    def permission(self) -> str:
        """The permission the caller lacks, where the server named it."""
        return self.metadata.get("permission", "")


class UnauthenticatedError(PermissionDeniedError):
    """No credentials, or ones the server does not accept (unknown, expired, revoked)."""


class ResourceExhaustedError(ApiError):
    """A limit was reached; `retry_delay` says when to try again."""


class UnavailableError(ApiError, ConnectionError):
    """gpuctld cannot be reached, or cannot serve now; retrying later may help."""

    @property
    def leader(self) -> str:
        """Where the leader serves, when a standby answered NOT_LEADER; "" when it named none
        (a takeover is under way) or this is another failure."""
        return self.metadata.get("leader", "") if self.reason == NOT_LEADER else ""


class DeadlineExceededError(ApiError, TimeoutError):
    pass


_ERROR_TYPES: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _unpack(detail: any_pb2.Any) -> Any:
    for cls in _DETAIL_TYPES:
        if detail.Is(cls.DESCRIPTOR):
            msg = cls()
            detail.Unpack(msg)
            return msg
    return detail


def error_from_rpc(
    err: grpc.RpcError, *, target: str = "", timeout: float | None = None
) -> ApiError:
    """The typed error for a failed call, with the rich status details unpacked."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
    status = _status(err)
    details = [_unpack(d) for d in status.details] if status is not None else []
    violations = [
        FieldViolation(v.field, v.description)
        for d in details
        if isinstance(d, error_details_pb2.BadRequest)
        for v in d.field_violations
    ]
    if could_not_connect(err):
        message = f"cannot reach gpuctld at {target} (is it running?)"
    elif status is None and code is grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        message = f"gpuctld at {target} did not answer within {timeout:g}s"
    cls = _ERROR_TYPES.get(code, ApiError)
    return cls(code, message, violations=violations, details=details)


def _invalid(err: InvalidArgument) -> InvalidArgumentError:
    """A local parse error, as the same type the server's INVALID_ARGUMENT raises."""
    return InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT, str(err), violations=err.violations
    )


# -- the client ---------------------------------------------------------------------------

JobRef = int | str | jobs_pb2.Job


def job_name(job: JobRef) -> str:
    """ "jobs/42" for 42, "42", "jobs/42" or a Job; `InvalidArgumentError` for anything else."""
    if isinstance(job, jobs_pb2.Job):
        return job.name or convert.job_name(job.id)
    if isinstance(job, bool) or not isinstance(job, int | str):
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"job: {job!r} is not a job id like 42 or 'jobs/42'",
            violations=[FieldViolation("job", f"{job!r} is not a job id like 42 or 'jobs/42'")],
        )
    try:
        return convert.job_name(convert.parse_job_name(str(job).strip(), field="job"))
    except InvalidArgument as e:
        raise _invalid(e) from None


def _state_value(state: int | str | JobState) -> int:
    if isinstance(state, str):  # "running", JobState.RUNNING or "JOB_STATE_RUNNING"
        name = state.upper().replace("-", "_")
        try:
            return jobs_pb2.JobState.Value(
                name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
            )
        except ValueError:
            pass
    elif (
        isinstance(state, int)
        and not isinstance(state, bool)
        and state in jobs_pb2.JobState.values()
    ):
        return state
    known = ", ".join(
        n.removeprefix("JOB_STATE_").lower().replace("_", "-") for n in jobs_pb2.JobState.keys()[1:]
    )
    raise _bad_argument("states", f"{state!r:.64} is not a job state ({known})")


def _aware(name: str, value: Any) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _bad_argument(name, f"must be a timezone-aware datetime, got {value!r:.64}")
    return value


def _span(name: str, value: Any) -> timedelta:
    if not isinstance(value, timedelta):
        raise _bad_argument(name, f"must be a timedelta, got {value!r:.64}")
    return value


def _bad_argument(name: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {why}", violations=[FieldViolation(name, why)]
    )


M = TypeVar("M", bound=Message)
_WHAT = {  # a protobuf field's type, as a violation says what it must be
    FieldDescriptor.TYPE_STRING: "text",
    FieldDescriptor.TYPE_BOOL: "True or False",
    FieldDescriptor.TYPE_INT32: "an integer",
    FieldDescriptor.TYPE_INT64: "an integer",
    FieldDescriptor.TYPE_UINT32: "an integer",
    FieldDescriptor.TYPE_UINT64: "an integer",
    FieldDescriptor.TYPE_DOUBLE: "a number",
    FieldDescriptor.TYPE_FLOAT: "a number",
}


def _request(message: type[M], **fields: Any) -> M:
    """`message(**fields)`, or `InvalidArgumentError` naming each argument of the wrong type
    (protobuf's own TypeError names neither), before anything is sent."""
    bad = []
    for name, value in fields.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        what = _WHAT.get(field.type, "a value of its type")
        if value is None:
            bad.append(FieldViolation(name, f"must be {what}, got None"))
            continue
        try:
            message(**{name: value})
        except (TypeError, ValueError):
            bad.append(FieldViolation(name, f"must be {what}, got {value!r:.64}"))
    if bad:
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT, "; ".join(map(str, bad)), violations=bad
        )
    return message(**fields)


# Where a gpuctld started by hand (not by systemd) keeps its socket: in its state dir.
PERSONAL_SOCKET = "~/.local/state/gpuctld/gpuctld.sock"


def default_target() -> str:
    """$GPUCTL_SERVER, else gpuctld's Unix socket where this host has one (the service's, then
    one this account started by hand), else loopback TCP."""
    target = os.environ.get("GPUCTL_SERVER")
    if target:
        return target
    for path in (DEFAULT_SOCKET, os.path.expanduser(PERSONAL_SOCKET)):
        if os.path.exists(path):
            return f"unix:{path}"
    return DEFAULT_TARGET


class _Credential:
    """The bearer token calls carry: a fixed one (an API token), or a session the daemon's
    auth socket hands out for whoever we are to the kernel, fetched again when it lapses."""

    def __init__(self, token: str | None, auth_socket: str | None) -> None:
        self._fixed = token
        self._socket = auth_socket
        self._session: str | None = None
        self._expires = 0.0

    @property
    def renewable(self) -> bool:
        return self._fixed is None and self._socket is not None

    def metadata(self, target: str) -> tuple[tuple[str, str], ...]:
        token = self._fixed
        if token is None and self._socket is not None:
            if self._session is None or time.monotonic() >= self._expires:
                try:
                    answer = fetch_session(self._socket)
                except (OSError, ValueError) as e:
                    reason = getattr(e, "strerror", None) or str(e)
                    raise UnavailableError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"cannot reach gpuctld at {target}: its auth socket {self._socket}: "
                        f"{reason} (is it running?)",
                    ) from None
                self._session = str(answer["token"])
                # Renewed a minute early, so a call never carries one that lapses on the way.
                self._expires = time.monotonic() + max(0.0, float(answer["expires_in"]) - 60)
            token = self._session
        return bearer(token) if token else ()

    def forget(self) -> None:
        self._session = None


@dataclass(frozen=True, slots=True)
class _Stubs:
    """One address's channel and the service stubs on it."""

    channel: grpc.Channel
    jobs: jobs_pb2_grpc.JobServiceStub
    nodes: nodes_pb2_grpc.NodeServiceStub
    leases: leases_pb2_grpc.LeaseServiceStub
    auth: auth_pb2_grpc.AuthServiceStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def on(cls, channel: grpc.Channel) -> _Stubs:
        return cls(
            channel,
            jobs_pb2_grpc.JobServiceStub(channel),
            nodes_pb2_grpc.NodeServiceStub(channel),
            leases_pb2_grpc.LeaseServiceStub(channel),
            auth_pb2_grpc.AuthServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


# A method picked from an address's stubs, e.g. `lambda s: s.jobs.GetJob`.
_Method = Callable[[_Stubs], Any]


class Client:
    """A connection to gpuctld. Close it, or use it as a context manager.

    On the head node it talks to gpuctld's Unix socket and the kernel vouches for who you are;
    elsewhere give a `token` (or set GPUCTL_TOKEN) and, for TLS, a `ca_file` or `tls=True`.
    Where several gpuctld run, give them all, "head1:50051,head2:50051": a call the one in use
    cannot take (unreachable, or a standby) goes on to the next, the leader it names first.

    >>> with Client() as c:
    ...     job = c.submit({"kind": "training", "nodes": 2, "gpus_per_node": 8, "command": "torchrun train.py"})
    ...     c.wait(job)
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        tls: bool = False,
        timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        self._addresses = split_target(self.target)
        if not self._addresses:
            raise ValueError(f"no gpuctld address in {self.target!r}: want HOST:PORT[,HOST:PORT]")
        self._options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ]
        auth_socket = None
        if self.target.startswith("unix:"):
            path = self.target.removeprefix("unix:").removeprefix("//")
            auth_socket = str(auth_socket_path(path))
            self._unix = f"unix:{path}"
            credentials = None
        elif credentials is None and (ca_file is not None or tls):
            roots = Path(ca_file).read_bytes() if ca_file is not None else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        self._credentials = credentials
        token = token if token is not None else os.environ.get("GPUCTL_TOKEN") or None
        self._credential = _Credential(token, None if token else auth_socket)
        self._stubs: dict[int, _Stubs] = {}  # by index in _addresses, opened on first use
        self._opening = threading.Lock()
        self._current = 0  # the address that answered last: calls go there first

    def _on(self, index: int) -> _Stubs:
        """The stubs of `_addresses[index]`, opening its channel the first time."""
        with self._opening:
            stubs = self._stubs.get(index)
            if stubs is None:
                if self._addresses[index].startswith("unix:"):
                    channel = grpc.insecure_channel(self._unix, options=self._options)
                elif self._credentials is not None:
                    channel = grpc.secure_channel(
                        self._addresses[index], self._credentials, options=self._options
                    )
                else:
                    channel = grpc.insecure_channel(self._addresses[index], options=self._options)
                stubs = self._stubs[index] = _Stubs.on(channel)
            return stubs

    def close(self) -> None:
        with self._opening:
            for stubs in self._stubs.values():
                stubs.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _unary(self, method: _Method, request: Any) -> Any:
        renewed = waited = False
        while True:
            try:
                return self._failover(
                    lambda stubs: method(stubs)(
                        request,
                        timeout=self.timeout,
                        metadata=self._credential.metadata(self.target),
                    )
                )
            except UnauthenticatedError:
                if renewed or not self._credential.renewable:
                    raise
                renewed = True  # the daemon restarted and forgot our session
                self._credential.forget()
            except (ResourceExhaustedError, UnavailableError) as error:
                # A limit, or standbys only (a takeover under way): the server said when. Once,
                # within our deadline; a standby did nothing, so any call may be sent again.
                delay = error.retry_delay
                said = isinstance(error, ResourceExhaustedError) or error.reason == NOT_LEADER
                if waited or not said or delay is None or delay * 1.5 > self.timeout / 2:
                    raise
                waited = True
                # Jitter: callers turned away together do not all come back together.
                time.sleep(delay * random.uniform(1.0, 1.5))

    def _failover(self, call: Callable[[_Stubs], Any]) -> Any:
        """`call` on the address that answered last; where that one cannot be reached or is a
        standby, on the next: the leader it names if it is one of ours, else the next in the
        list, each address once. Safe for every call: neither failure did anything."""
        index, tried, reached = self._current, set(), False
        while True:
            tried.add(index)
            try:
                result = call(self._on(index))
            except grpc.RpcError as e:
                unreachable, hints = could_not_connect(e), not_leader(e)
                if not unreachable and hints is None:
                    # It answered: the error is the call's own. But a head whose machine died
                    # lets connections hang: a call that timed out is not sent again (it may
                    # have been done), yet the next call goes to the next address, as the
                    # agent's do.
                    timed_out = e.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                    following = next_address(self._addresses, index) if timed_out else None
                    self._current = index if following is None else following
                    raise error_from_rpc(
                        e, target=self._addresses[index], timeout=self.timeout
                    ) from e
                reached = reached or not unreachable
                leader = (hints or {}).get("leader", "")
                following = next_address(self._addresses, index, (leader,), tried)
                if following is None:
                    # "cannot reach gpuctld at head1:50051,head2:50051" when none could be
                    target = self.target if not reached else self._addresses[index]
                    raise error_from_rpc(e, target=target, timeout=self.timeout) from e
                index = following
                continue
            self._current = index
            return result

    def _stream(self, method: _Method, request: Any, timeout: float | None = None) -> Iterator[Any]:
        """A server stream, going on to the next address only while it has sent nothing."""
        index, tried = self._current, set()
        while True:
            tried.add(index)
            metadata = self._credential.metadata(self.target)
            call = method(self._on(index))(request, timeout=timeout, metadata=metadata)
            started = False
            try:
                for message in call:
                    if not started:
                        started, self._current = True, index
                    yield message
                self._current = index
                return
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.UNAUTHENTICATED:
                    self._credential.forget()  # a daemon that restarted: the next call asks anew
                hints = not_leader(e)
                following = None
                if not started and (hints is not None or could_not_connect(e)):
                    leader = (hints or {}).get("leader", "")
                    following = next_address(self._addresses, index, (leader,), tried)
                if following is None:
                    # a stream's deadline is the caller's own, not "did not answer"
                    raise error_from_rpc(e, target=self._addresses[index]) from e
                index = following
            finally:
                call.cancel()  # the caller stopped iterating early: end the stream on the server

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec | jobs_pb2.JobSpec | Mapping[str, Any] | str | os.PathLike[str],
        *,
        request_id: str | None = None,
        validate_only: bool = False,
    ) -> jobs_pb2.Job:
        """Queue a job: a JobSpec, a job-file mapping, or the path of a YAML job file.

        With `validate_only` the server checks the spec and stores nothing. The request id
        (a fresh UUID when None) makes the call safe to retry: the server returns the first
        call's job.
        """
        request = jobs_pb2.CreateJobRequest(
            spec=_spec_msg(spec),
            request_id=request_id or str(uuid.uuid4()),
            validate_only=validate_only,
        )
        return self._unary(lambda s: s.jobs.CreateJob, request)

    def get(self, job: JobRef) -> jobs_pb2.Job:
        """The job with its events; `job` is 42, "42", "jobs/42" or a Job."""
        return self._unary(lambda s: s.jobs.GetJob, jobs_pb2.GetJobRequest(name=job_name(job)))

    def list(
        self,
        states: Iterable[int | str | JobState] = (),
        queue: str = "",
        owner: str = "",
        page_size: int = 100,
    ) -> Iterator[jobs_pb2.Job]:
        """Every job matching the filters (all when empty), fetching page after page."""
        if isinstance(states, str | int) or not isinstance(states, Iterable):
            raise _bad_argument("states", f"must be a list of job states, got {states!r:.64}")
        request = _request(
            jobs_pb2.ListJobsRequest,
            page_size=page_size,
            states=[_state_value(s) for s in states],
            queue=queue,
            owner=owner,
        )
        while True:
            page = self._unary(lambda s: s.jobs.ListJobs, request)
            yield from page.jobs
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def cancel(self, job: JobRef) -> jobs_pb2.Job:
        """Cancel a job: a pending one ends at once, a running one goes through CANCELLING."""
        return self._unary(
            lambda s: s.jobs.CancelJob, jobs_pb2.CancelJobRequest(name=job_name(job))
        )

    def update(
        self,
        job: JobRef,
        spec: JobSpec | jobs_pb2.JobSpec | Mapping[str, Any] | str | os.PathLike[str],
    ) -> jobs_pb2.Job:
        """Roll an inference service to `spec` (as `submit` takes it): new replicas start
        beside the old, which stop as the new become available; kind, queue, name and
        priority cannot change."""
        request = jobs_pb2.UpdateJobRequest(name=job_name(job), spec=_spec_msg(spec))
        return self._unary(lambda s: s.jobs.UpdateJob, request)

    def scale(self, job: JobRef, replicas: int) -> jobs_pb2.Job:
        """Set an inference job's desired replicas (the same call twice is the same as once)."""
        return self._unary(
            lambda s: s.jobs.ScaleJob,
            _request(jobs_pb2.ScaleJobRequest, name=job_name(job), replicas=replicas),
        )

    def watch(
        self, job: JobRef | None = None, since_revision: int = 0, *, timeout: float | None = None
    ) -> Iterator[jobs_pb2.Job]:
        """Every change to one job (or to all), the current state first when since_revision is 0.

        Runs until the server ends the stream, `timeout` passes, or the caller stops iterating.
        """
        request = _request(
            jobs_pb2.WatchJobsRequest,
            since_revision=since_revision,
            name=job_name(job) if job is not None else "",
        )
        for response in self._stream(lambda s: s.jobs.WatchJobs, request, timeout):
            yield response.job

    def wait(
        self,
        job: JobRef,
        timeout: float | None = None,
        *,
        on_change: Callable[[jobs_pb2.Job], None] | None = None,
    ) -> jobs_pb2.Job:
        """Block until the job has finished (any of `FINISHED_STATES`) and return it;
        `on_change` is called with each state the job passes through on the way.

        Rides out a restarting daemon by watching again; raises `DeadlineExceededError` when
        `timeout` seconds pass first.
        """
        name = job_name(job)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float)
        ):
            raise _bad_argument("timeout", f"must be seconds (a number), got {timeout!r:.64}")
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0.1
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} did not finish within {timeout:g}s"
                )
            try:
                # since_revision 0: the current state first, so a job that finished while
                # we were away is seen at once
                for update in self.watch(name, 0, timeout=remaining):
                    if update.state in FINISHED_STATES:
                        return update
                    if on_change is not None:
                        on_change(update)
            except DeadlineExceededError:
                continue  # the loop head reports it with the job's name
            except UnavailableError:
                time.sleep(backoff if remaining is None else min(backoff, remaining))
                backoff = min(backoff * 2, 2.0)
                continue
            except ResourceExhaustedError as e:  # too many watches open: when the server says
                delay = e.retry_delay or backoff
                time.sleep(delay if remaining is None else min(delay, remaining))
                continue
            backoff = 0.1  # the stream ended cleanly (server shutting down): watch again

    def logs(
        self, job: JobRef, rank: int = 0, follow: bool = False, *, offset: int = 0
    ) -> Iterator[bytes]:
        """The combined stdout/stderr of one rank, chunk by chunk; with `follow`, until it ends."""
        for chunk in self.log_chunks(job, rank, follow, offset=offset):
            yield chunk.data

    def log_chunks(
        self,
        job: JobRef,
        rank: int = 0,
        follow: bool = False,
        *,
        offset: int = 0,
        timestamps: bool = False,
    ) -> Iterator[jobs_pb2.LogChunk]:
        """`logs` as the server's chunks: each with its offset and, with `timestamps`, cut where
        gpuctld received the output and stamped with that time (`chunk.time`; unset for
        output older than gpuctld's record of it)."""
        request = _request(
            jobs_pb2.StreamJobLogsRequest,
            name=job_name(job),
            rank=rank,
            offset=offset,
            follow=follow,
            timestamps=timestamps,
        )
        yield from self._stream(lambda s: s.jobs.StreamJobLogs, request)

    # -- nodes and leases ------------------------------------------------------------------

    def nodes(self) -> builtins.list[nodes_pb2.Node]:
        """Every node gpuctld knows, with its profile and GPU usage."""
        out: builtins.list[nodes_pb2.Node] = []
        request = nodes_pb2.ListNodesRequest()
        while True:
            page = self._unary(lambda s: s.nodes.ListNodes, request)
            out.extend(page.nodes)
            if not page.next_page_token:
                return out
            request.page_token = page.next_page_token

    def node(self, name: str) -> nodes_pb2.Node:
        """One node with its events."""
        return self._unary(lambda s: s.nodes.GetNode, _request(nodes_pb2.GetNodeRequest, name=name))

    def drain(self, name: str, reason: str = "") -> nodes_pb2.Node:
        """Stop new work landing on the node; what runs there finishes."""
        return self._unary(
            lambda s: s.nodes.DrainNode,
            _request(nodes_pb2.DrainNodeRequest, name=name, reason=reason),
        )

    def undrain(self, name: str) -> nodes_pb2.Node:
        """Let new work land on a drained node again."""
        return self._unary(
            lambda s: s.nodes.UndrainNode, _request(nodes_pb2.UndrainNodeRequest, name=name)
        )

    # -- identity and access ---------------------------------------------------------------

    def whoami(self) -> auth_pb2.WhoAmIResponse:
        """Who gpuctld takes this client for, with the role and its permissions."""
        return self._unary(lambda s: s.auth.WhoAmI, auth_pb2.WhoAmIRequest())

    def create_token(
        self, *, user: str = "", description: str = "", ttl: timedelta | None = None
    ) -> auth_pb2.CreateTokenResponse:
        """A new API token (for yourself; admins may name a `user`); its `secret` is in this
        reply only."""
        request = _request(auth_pb2.CreateTokenRequest, user=user, description=description)
        if ttl is not None:
            request.ttl.FromTimedelta(_span("ttl", ttl))
        return self._unary(lambda s: s.auth.CreateToken, request)

    def tokens(self, user: str = "") -> builtins.list[auth_pb2.Token]:
        """Your tokens (admins: a `user`'s, or "*" for everyone's), revoked ones too."""
        return list(
            self._unary(
                lambda s: s.auth.ListTokens, _request(auth_pb2.ListTokensRequest, user=user)
            ).tokens
        )

    def revoke_token(self, token_id: str) -> auth_pb2.Token:
        """Revoke a token by id: it stops working at once."""
        return self._unary(
            lambda s: s.auth.RevokeToken, _request(auth_pb2.RevokeTokenRequest, id=token_id)
        )

    def create_node_token(
        self, node: str, *, ttl: timedelta | None = None
    ) -> auth_pb2.CreateTokenResponse:
        """The credential of one node's agent (operators); earlier ones of the node stop working."""
        return self._node_credential(lambda s: s.auth.CreateNodeToken, node, ttl)

    def create_join_token(
        self, node: str, *, ttl: timedelta | None = None
    ) -> auth_pb2.CreateTokenResponse:
        """A one-time token for `node`'s agent to get its certificate (`--join`), with
        gpuctld's CA (`ca_pem`) for it to pin (operators)."""
        return self._node_credential(lambda s: s.auth.CreateJoinToken, node, ttl)

    def _node_credential(
        self, method: _Method, node: str, ttl: timedelta | None
    ) -> auth_pb2.CreateTokenResponse:
        request = _request(auth_pb2.CreateNodeTokenRequest, node=node)
        if ttl is not None:
            request.ttl.FromTimedelta(_span("ttl", ttl))
        return self._unary(method, request)

    def audit(
        self, *, since: datetime | None = None, principal: str = "", limit: int = 100
    ) -> builtins.list[auth_pb2.AuditEntry]:
        """The latest mutating calls, oldest first (operators)."""
        request = _request(auth_pb2.ListAuditRequest, principal=principal, limit=limit)
        if since is not None:
            request.since.FromDatetime(_aware("since", since).astimezone(UTC))
        return list(self._unary(lambda s: s.auth.ListAudit, request).entries)

    def leases(self, include_released: bool = False) -> builtins.list[leases_pb2.Lease]:
        """The leases gpuctl holds (with `include_released`, also the ones it gave back)."""
        out: builtins.list[leases_pb2.Lease] = []
        request = _request(leases_pb2.ListLeasesRequest, include_released=include_released)
        while True:
            page = self._unary(lambda s: s.leases.ListLeases, request)
            out.extend(page.leases)
            if not page.next_page_token:
                return out
            request.page_token = page.next_page_token

    def cost(
        self, *, since: datetime | timedelta | None = None, by: str = "job"
    ) -> leases_pb2.GetCostResponse:
        """What each job (`by` "job", "queue" or "user") was charged since `since` (a time, or
        how long ago; None: since the beginning), with what the leases cost and what was idle."""
        if by not in ("job", "queue", "user"):
            raise _bad_argument("by", f"must be job, queue or user, got {by!r:.64}")
        group = leases_pb2.CostGroupBy.Value(f"COST_GROUP_BY_{by.upper()}")
        request = leases_pb2.GetCostRequest(group_by=group)
        if isinstance(since, timedelta):
            since = datetime.now(UTC) - since
        if since is not None:
            request.since.FromDatetime(_aware("since", since).astimezone(UTC))
        return self._unary(lambda s: s.leases.GetCost, request)

    def health(self) -> str:
        """The whole server's grpc.health.v1 status: "SERVING", "NOT_SERVING", ..."""
        response = self._unary(lambda s: s.health.Check, health_pb2.HealthCheckRequest(service=""))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _spec_msg(
    spec: JobSpec | jobs_pb2.JobSpec | Mapping[str, Any] | str | os.PathLike[str],
) -> jobs_pb2.JobSpec:
    """The wire form of a spec given as a JobSpec, a message, a job-file mapping or path."""
    if isinstance(spec, jobs_pb2.JobSpec):
        return spec
    if not isinstance(spec, JobSpec | Mapping | str | os.PathLike):
        raise _bad_argument(
            "spec", f"must be a JobSpec, a job-file mapping or a file's path, got {spec!r:.64}"
        )
    try:
        if isinstance(spec, str | os.PathLike):
            spec = jobfile.load_job_file(spec)
        elif isinstance(spec, Mapping):
            spec = jobfile.spec_from_mapping(spec, check=True)
        return convert.spec_to_pb(spec)
    except InvalidArgument as e:
        raise _invalid(e) from None
