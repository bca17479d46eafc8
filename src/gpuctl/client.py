"""The public home of the Python SDK: `from gpuctl.client import Client`.

Re-exports `gpuctl.api.client`, where the SDK lives next to the rest of the gRPC edge.
"""

from gpuctl.api.client import (
    DEFAULT_TARGET,
    FINISHED_STATES,
    AlreadyExistsError,
    ApiError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    events_pb2,
    jobs_pb2,
    leases_pb2,
    nodes_pb2,
)
from gpuctl.api.jobfile import (
    JobFileError,
    format_duration,
    format_size_mib,
    load_job_file,
    load_job_mapping,
    spec_from_mapping,
    spec_to_mapping,
)
from gpuctl.core.model import JobKind, JobSpec

__all__ = [
    "DEFAULT_TARGET",
    "FINISHED_STATES",
    "AlreadyExistsError",
    "ApiError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "JobFileError",
    "JobKind",
    "JobSpec",
    "NotFoundError",
    "PermissionDeniedError",
    "UnavailableError",
    "events_pb2",
    "format_duration",
    "format_size_mib",
    "jobs_pb2",
    "leases_pb2",
    "load_job_file",
    "load_job_mapping",
    "nodes_pb2",
    "spec_from_mapping",
    "spec_to_mapping",
]
