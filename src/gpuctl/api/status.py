"""Maps gpuctl's errors to gRPC status codes with rich `google.rpc.Status` details, in one place."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gpuctl.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    GpuctlError,
    InvalidArgument,
    NotFound,
    NotLeader,
    ResourceExhausted,
    Unavailable,
)
from gpuctl.core.trust import PermissionDenied, Unauthenticated

_CODES: tuple[tuple[type[GpuctlError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


# Error messages echo what the caller sent; a client at gRPC's default header limits (8 KiB)
# would get a transport error instead of the answer, so each part is cut to these.
MAX_MESSAGE = 2048
# ErrorInfo.reason of a write sent to a standby; metadata "leader"/"leader_agent" say where to go.
NOT_LEADER = "NOT_LEADER"
MAX_DETAIL = 512


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_status(error: GpuctlError) -> grpc.Status:
    code = next((c for t, c in _CODES if isinstance(error, t)), grpc.StatusCode.INTERNAL)
    details = []
    if isinstance(error, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=_cut(v.field, MAX_DETAIL),
                            description=_cut(v.description, MAX_DETAIL),
                        )
                        for v in error.violations[:10]
                    ]
                )
            )
        )
    elif isinstance(error, NotFound | AlreadyExists):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=error.kind, resource_name=_cut(error.name, MAX_DETAIL)
                )
            )
        )
    elif isinstance(error, NotLeader):
        details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=NOT_LEADER,
                    domain="gpuctl",
                    metadata={"leader": error.leader, "leader_agent": error.leader_agent},
                )
            )
        )
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay={"nanos": 500_000_000})))
    elif isinstance(error, Unavailable):
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay={"seconds": 1})))
    elif isinstance(error, ResourceExhausted):
        delay = error_details_pb2.RetryInfo()
        delay.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(delay))
    elif isinstance(error, PermissionDenied) and error.permission:
        details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="MISSING_PERMISSION",
                    domain="gpuctl",
                    metadata={"permission": error.permission},
                )
            )
        )
    status = rpc_status.to_status(
        status_pb2.Status(
            code=getattr(code_pb2, code.name),
            message=_cut(str(error), MAX_MESSAGE),
            details=details,
        )
    )
    if isinstance(error, NotLeader):
        # gRPC's own retries would ask this standby again (and again): tell them not to, so
        # the client goes on to the leader at once.
        pushback = (("grpc-retry-pushback-ms", "-1"),)
        status = status._replace(trailing_metadata=(*status.trailing_metadata, *pushback))
    return status


def abort(context: grpc.ServicerContext, error: GpuctlError) -> None:
    """Ends the RPC with `error`'s status (raises, as `context.abort` does)."""
    context.abort_with_status(to_status(error))
