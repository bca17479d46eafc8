"""gRPC servicers: decode the request, call the controller, encode the answer, map errors.

Thin by design: every decision lives in the controller and the core.
"""

from __future__ import annotations

import base64
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from gpuctl.api import convert
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from gpuctl.api.status import abort
from gpuctl.core.errors import FieldViolation, GpuctlError, InvalidArgument, NotFound
from gpuctl.core.model import RankState
from gpuctl.core.validation import NAME_RE

if TYPE_CHECKING:
    from gpuctl.runtime.controller import Controller

log = logging.getLogger(__name__)
USER_METADATA = "x-gpuctl-user"
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_LOG_PUSH = 4 << 20
MAX_HEALTH_ISSUES = 256  # one per GPU, link and port of the largest node, with room to spare
MAX_HEALTH_ISSUE_LEN = 1024
F = TypeVar("F", bound=Callable[..., Any])


def _errors(method: F) -> F:
    """Map gpuctl's errors to their status; anything else is a bug, logged with its traceback."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except GpuctlError as e:
            abort(context, e)
        except grpc.RpcError:
            raise
        except Exception:
            if context.code() is not None:  # context.abort() already ended the call
                raise
            log.exception("internal error in %s", method.__name__)
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error in {method.__name__}; see the gpuctld log",
            )

    return wrapper  # type: ignore[return-value]


def _user(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == USER_METADATA:
            if not NAME_RE.match(value):
                raise InvalidArgument(
                    [FieldViolation(USER_METADATA, f"{value!r} is not a valid user name")]
                )
            return value
    return ""


def _page(request) -> tuple[int, int]:
    """(offset, size) from a page token that encodes an offset."""
    size = request.page_size or DEFAULT_PAGE_SIZE
    if not 0 < size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            [FieldViolation("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")]
        )
    offset = 0
    if request.page_token:
        try:
            offset = int(base64.urlsafe_b64decode(request.page_token.encode()).decode())
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument(
                [FieldViolation("page_token", "is not a token this server gave")]
            ) from None
    return offset, size


def _token(offset: int, total: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode() if offset < total else ""


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, controller: Controller, *, poll_s: float = 0.5) -> None:
        self.c = controller
        self.poll_s = poll_s

    @_errors
    def CreateJob(self, request, context):
        if len(request.request_id) > 128:
            raise InvalidArgument([FieldViolation("request_id", "longer than 128 characters")])
        spec = convert.spec_from_pb(request.spec, owner=_user(context))
        job = self.c.submit(
            spec, request_id=request.request_id, validate_only=request.validate_only
        )
        return convert.job_to_pb(job)

    @_errors
    def GetJob(self, request, context):
        job, events, env = self.c.get(convert.parse_job_name(request.name))
        return convert.job_to_pb(job, events=events, rank_env=env)

    @_errors
    def ListJobs(self, request, context):
        states = []
        for s in request.states:
            if s not in convert.JOB_STATE_FROM:
                raise InvalidArgument([FieldViolation("states", f"unknown job state {s}")])
            states.append(convert.JOB_STATE_FROM[s])
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                [FieldViolation("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")]
            )
        page = self.c.store.list_jobs(
            states=states,
            queue=request.queue,
            owner=request.owner,
            page_size=size,
            page_token=request.page_token,
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[convert.job_to_pb(j) for j in page.jobs], next_page_token=page.next_page_token
        )

    @_errors
    def CancelJob(self, request, context):
        return convert.job_to_pb(self.c.cancel(convert.parse_job_name(request.name)))

    @_errors
    def WatchJobs(self, request, context) -> Iterator[jobs_pb2.WatchJobsResponse]:
        only = convert.parse_job_name(request.name) if request.name else None
        if only is not None:
            self.c.store.get_job(only)  # NOT_FOUND now rather than silence forever
        seen = request.since_revision
        while context.is_active():
            for job in self.c.store.jobs_since(seen):
                seen = max(seen, job.revision)
                if only is None or job.id == only:
                    yield jobs_pb2.WatchJobsResponse(job=convert.job_to_pb(job))
            self.c.feed.wait(seen, timeout=self.poll_s)

    @_errors
    def StreamJobLogs(self, request, context) -> Iterator[jobs_pb2.LogChunk]:
        job_id = convert.parse_job_name(request.name)
        job = self.c.store.get_job(job_id)
        if job.placement is not None and request.rank not in {r.rank for r in job.placement.ranks}:
            raise NotFound("rank", f"{request.rank} of job {job_id}")
        offset = max(0, request.offset)
        while context.is_active():
            data = self.c.logs.read(job_id, job.attempt, request.rank, offset)
            if data:
                yield jobs_pb2.LogChunk(offset=offset, data=data)
                offset += len(data)
                continue
            if not request.follow or job.state.finished:
                return
            time.sleep(self.poll_s)
            job = self.c.store.get_job(job_id)


class NodeServicer(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    @_errors
    def ListNodes(self, request, context):
        nodes = self.c.store.list_nodes()
        offset, size = _page(request)
        usage = self.c.node_usage()
        page = nodes[offset : offset + size]
        return nodes_pb2.ListNodesResponse(
            nodes=[convert.node_to_pb(n, usage=usage.get(n.id, {})) for n in page],
            next_page_token=_token(offset + size, len(nodes)),
        )

    @_errors
    def GetNode(self, request, context):
        name = request.name.removeprefix("nodes/")
        node = self.c.store.get_node(name)
        events = self.c.store.list_events("node", name)
        return convert.node_to_pb(node, usage=self.c.node_usage().get(name, {}), events=events)

    @_errors
    def DrainNode(self, request, context):
        if len(request.reason) > 1024:
            raise InvalidArgument([FieldViolation("reason", "longer than 1024 characters")])
        node = self.c.drain(request.name.removeprefix("nodes/"), request.reason)
        return convert.node_to_pb(node, usage=self.c.node_usage().get(node.id, {}))


class LeaseServicer(leases_pb2_grpc.LeaseServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    @_errors
    def ListLeases(self, request, context):
        leases = self.c.store.list_leases(include_released=request.include_released)
        offset, size = _page(request)
        now = self.c.clock.now()
        return leases_pb2.ListLeasesResponse(
            leases=[
                convert.lease_to_pb(lease, now=now) for lease in leases[offset : offset + size]
            ],
            next_page_token=_token(offset + size, len(leases)),
        )

    @_errors
    def GetCost(self, request, context):
        by = convert.cost_by_from_pb(request.group_by)
        since = convert.from_ts(request.since, request.HasField("since"))
        # A `since` ahead of the daemon's clock (a client's clock skewed) just finds nothing.
        now = self.c.clock.now()
        report = self.c.cost(since=since, by=by)
        return convert.cost_to_pb(report, by=by, since=since, now=now)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    @staticmethod
    def _ref(msg: agent_pb2.RankRef):
        from gpuctl.runtime.controller import RankRef

        return RankRef(msg.job_id, msg.rank, msg.attempt)

    @_errors
    def RegisterNode(self, request, context):
        node = convert.node_from_pb(request.node)
        if not node.id or not NAME_RE.match(node.id):
            raise InvalidArgument(
                [FieldViolation("node.name", f"{node.id!r} is not a valid node name")]
            )
        if not node.address:
            raise InvalidArgument(
                [FieldViolation("node.address", "is required: where other ranks reach this node")]
            )
        node = self.c.register_node(node)
        return agent_pb2.RegisterNodeResponse(
            node_name=node.id,
            heartbeat_interval=convert.duration(self.c.settings.heartbeat_interval_s),
        )

    @_errors
    def Heartbeat(self, request, context):
        issues = tuple(request.health_issues)
        if len(issues) > MAX_HEALTH_ISSUES or any(
            not i.strip() or len(i) > MAX_HEALTH_ISSUE_LEN for i in issues
        ):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "health_issues",
                        f"at most {MAX_HEALTH_ISSUES} non-empty issues "
                        f"of at most {MAX_HEALTH_ISSUE_LEN} characters",
                    )
                ]
            )
        result = self.c.heartbeat(
            request.node_name,
            [self._ref(r) for r in request.running],
            health_issues=issues,
            profile=convert.profile_from_pb(request.profile)
            if request.HasField("profile")
            else None,
        )
        return agent_pb2.HeartbeatResponse(
            assignments=[
                agent_pb2.Assignment(
                    ref=convert.rank_ref(a.ref.job_id, a.ref.rank, a.ref.attempt),
                    job_name=a.job.spec.name or f"job-{a.job.id}",
                    command=list(a.job.spec.command),
                    env=a.env,
                    working_dir=a.job.spec.working_dir,
                    gpu_indices=list(a.rank.gpu_indices),
                    kill_grace=convert.duration(a.kill_grace_s),
                    owner=a.job.spec.owner,
                )
                for a in result.assignments
            ],
            stop=[convert.rank_ref(r.job_id, r.rank, r.attempt) for r in result.stop],
            reregister=result.reregister,
        )

    @_errors
    def ReportRankStatus(self, request, context):
        state = convert.RANK_STATE_FROM.get(request.state)
        if state not in (RankState.RUNNING, RankState.EXITED):
            raise InvalidArgument([FieldViolation("state", "must be RUNNING or EXITED")])
        if state is RankState.EXITED and not request.HasField("exit_code"):
            raise InvalidArgument([FieldViolation("exit_code", "is required with EXITED")])
        self.c.report_rank(
            request.node_name,
            self._ref(request.ref),
            state,
            request.exit_code if request.HasField("exit_code") else None,
            request.message[:4096],
        )
        return agent_pb2.ReportRankStatusResponse()

    @_errors
    def PushLogs(self, request, context):
        if len(request.data) > MAX_LOG_PUSH or request.offset < 0:
            raise InvalidArgument(
                [FieldViolation("data", f"at most {MAX_LOG_PUSH} bytes at a non-negative offset")]
            )
        next_offset = self.c.push_logs(
            request.node_name, self._ref(request.ref), request.offset, request.data
        )
        return agent_pb2.PushLogsResponse(next_offset=next_offset)
