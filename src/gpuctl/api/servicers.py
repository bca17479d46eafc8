"""gRPC servicers: decode the request, call the controller, encode the answer, map errors.

Thin by design: every decision lives in the controller and the core.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from gpuctl.api import convert
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from gpuctl.api.auth import Authenticator, account_groups, mint_token
from gpuctl.api.auth import account as account_of
from gpuctl.api.forward import peer_of
from gpuctl.api.limits import Limits
from gpuctl.api.pki import NODE_DAYS, Authority
from gpuctl.api.status import abort, to_status
from gpuctl.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    GpuctlError,
    InvalidArgument,
    NotFound,
    NotLeader,
    ResourceExhausted,
)
from gpuctl.core.model import Job, JobSpec, JobState, RankState
from gpuctl.core.trust import (
    ROLE_PERMISSIONS,
    ApiToken,
    AuditEntry,
    Permission,
    PermissionDenied,
    Principal,
    QueueGrants,
    Role,
    RunAsPolicy,
    TokenKind,
    Unauthenticated,
    visible_env,
)
from gpuctl.core.validation import (
    NAME_RE,
    health_issue_violations,
    validate_node,
    validate_profile,
)

if TYPE_CHECKING:
    from gpuctl.runtime.controller import Controller

log = logging.getLogger(__name__)
try:
    SERVER_VERSION = importlib.metadata.version("gpuctl")  # as `gpuctl --version` reads it
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    SERVER_VERSION = "unknown"
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_LOG_PUSH = 4 << 20
MAX_RUNNING_REFS = 4096  # ranks one node reports: far above GPUs x shares of any machine
# Replies stay under gRPC's 4 MiB default whatever the jobs hold: a page or a heartbeat stops
# short of this, and the rest comes with the next page or heartbeat.
MAX_REPLY_BYTES = 3 << 20
# Job views kept built for ListJobs (see JobServicer._listed), ~0.5 KB each: room for a long
# queue listed again and again. Emptied when full, so a queue longer than this is built anew
# at every listing (with 30,000 active jobs and 20,000 here, `gpuctl jobs` listed in ~1.9 s
# instead of ~0.5 s).
LISTED_VIEWS = 50_000
PENDING_RECOUNT = timedelta(seconds=1)  # see PendingCounts
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class Call:
    """One authenticated call: who makes it, from where, and what to audit it as."""

    who: Principal
    peer: str
    action: str
    target: str = ""
    detail: str = ""
    written: bool = False  # its audit entry went in with the call's own write


@dataclass(frozen=True, slots=True, kw_only=True)
class Guard:
    """What every servicer checks a call against: identity, limits, the audit trail, and the
    rules for specs and run-as accounts."""

    auth: Authenticator
    limits: Limits
    runas: RunAsPolicy = field(default_factory=RunAsPolicy)
    max_spec_bytes: int = 256 * 1024
    max_pending_per_user: int = 10_000
    default_token_ttl_s: float = 90 * 24 * 3600.0
    max_token_ttl_s: float = 365 * 24 * 3600.0
    join_token_ttl_s: float = 3600.0
    authority: Authority | None = None  # gpuctld's own CA: node certificates for joins
    queues: QueueGrants = field(default_factory=QueueGrants)
    # What gpuctld's API workers show to vouch for a caller's address (api.forward); "": none.
    forward_secret: str = ""

    def granted(self, who: Principal) -> frozenset[str]:
        """The queues whose jobs `who` may act on besides their own."""
        if not self.queues or who.role is Role.NODE:
            return frozenset()
        return self.queues.queues_of(who.name, account_groups(who.name))


def rpc(permission: Permission | None, *, audited: bool = False) -> Callable[[F], F]:
    """Authenticate the call, check `permission` (None: any authenticated caller), hold a
    slot of the limits while it runs, record it when `audited`, and map errors to statuses.

    The method gets the `Call` as a third argument. Streams are wrapped as generators, so an
    error raised while streaming gets its status too.
    """

    def deco(method: F) -> F:
        action = method.__name__
        stream = inspect.isgeneratorfunction(method)

        def begin(self, context) -> Call:
            who = self.guard.auth.authenticate(context)
            call = Call(who=who, peer=peer_of(context, self.guard.forward_secret), action=action)
            if permission is not None:
                try:
                    who.require(permission)
                except PermissionDenied as e:
                    _audit(self, call, audited, e)
                    raise
            self.guard.limits.acquire(who, stream=stream)
            return call

        def fail(self, context, call: Call | None, e: BaseException) -> None:
            if isinstance(e, GpuctlError):
                if call is not None:
                    _audit(self, call, audited, e)
                # One line, never a traceback: a bad request is the caller's, not a bug.
                log.info(
                    "%s by %s from %s refused: %s: %s",
                    action,
                    call.who.name if call is not None else "(unauthenticated)",
                    (call.peer if call is not None else context.peer()) or "-",
                    to_status(e).code.name,
                    str(e)[:300],
                )
                abort(context, e)
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise e  # context.abort() already ended the call
            log.exception("internal error in %s", action)
            context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {action}; see the gpuctld log"
            )

        if stream:

            @functools.wraps(method)
            def streaming(self, request, context):
                call = None
                try:
                    call = begin(self, context)
                except Exception as e:
                    fail(self, context, None, e)
                try:
                    yield from method(self, request, context, call)
                except Exception as e:
                    fail(self, context, call, e)
                finally:
                    self.guard.limits.release(call.who, stream=True)

            streaming.permission = permission  # type: ignore[attr-defined]
            return streaming  # type: ignore[return-value]

        @functools.wraps(method)
        def unary(self, request, context):
            call = None
            try:
                call = begin(self, context)
            except Exception as e:
                fail(self, context, None, e)
            try:
                reply = method(self, request, context, call)
                _audit(self, call, audited, None)
                return reply
            except Exception as e:
                fail(self, context, call, e)
            finally:
                self.guard.limits.release(call.who, stream=False)

        unary.permission = permission  # type: ignore[attr-defined]
        return unary  # type: ignore[return-value]

    return deco


class PendingCounts:
    """Each user's pending jobs for the cap on them, counted in the store at most once per
    PENDING_RECOUNT (a count reads every pending job of the user) and counted up by the
    submits in between. Jobs that started since make the count high, never low, and a count at
    the cap is taken again before a submit is refused on it."""

    def __init__(self, count: Callable[[str], int], now: Callable[[], datetime]) -> None:
        self._count = count
        self._now = now
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, datetime]] = {}

    def at_least(self, owner: str, cap: int) -> bool:
        now = self._now()
        with self._lock:
            count, at = self._counts.get(owner, (0, None))
        if at is None or now >= at + PENDING_RECOUNT or count >= cap:
            count = self._count(owner)
            with self._lock:
                if len(self._counts) >= 10_000:  # one entry per user who submitted lately
                    self._counts.clear()
                self._counts[owner] = (count, now)
        return count >= cap

    def add(self, owner: str) -> None:
        with self._lock:
            if owner in self._counts:
                count, at = self._counts[owner]
                self._counts[owner] = (count + 1, at)


def _audit(servicer, call: Call, audited: bool, error: BaseException | None) -> None:
    if not audited and not isinstance(error, PermissionDenied):
        return
    if isinstance(error, NotLeader) or (call.written and error is None):
        return  # a standby did nothing (the leader audits the retry), or written already
    try:
        servicer.c.store.add_audit(_audit_entry(servicer, call, error))
    except GpuctlError as e:  # the store is down: the call's own error says so, or will
        log.warning("audit of %s by %s not written: %s", call.action, call.who.name, e)


def _audit_entry(servicer, call: Call, error: BaseException | None) -> AuditEntry:
    outcome = "ok" if error is None else to_status(error).code.name
    return AuditEntry(
        time=servicer.c.clock.now(),
        principal=call.who.name,
        role=call.who.role.value,
        via=call.who.via,
        peer=call.peer[:256],
        action=call.action,
        target=call.target[:256],
        outcome=outcome,
        detail=(call.detail or (str(error) if error is not None else ""))[:1024],
    )


def _job_view(job: Job, who: Principal, rank_env: dict[int, dict[str, str]] | None = None):
    """The job as `who` may see it: secret env values for no one, others' values hidden."""
    owner = job.spec.owner == who.name
    user_keys = frozenset(k for k, _ in job.spec.env)
    secret = frozenset(job.spec.secret_env)
    if owner and not secret:
        return convert.job_to_pb(job, rank_env=rank_env)
    env = visible_env(dict(job.spec.env), user_keys, secret, owner=owner)
    shown = replace(job, spec=replace(job.spec, env=tuple(env.items())))
    ranks = {r: visible_env(e, user_keys, secret, owner=owner) for r, e in (rank_env or {}).items()}
    return convert.job_to_pb(shown, rank_env=ranks)


def _own_node(call: Call, node_name: str, field_name: str) -> None:
    """An agent acts for its own node only (as Kubernetes' node authorizer has it)."""
    if node_name != call.who.name:
        raise PermissionDenied(
            f"{field_name} {node_name!r}: this agent's credential is for node {call.who.name!r}",
            permission=Permission.AGENT.value,
        )


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


def _fill(field, messages: Iterable[Any], budget: int = MAX_REPLY_BYTES) -> int:
    """Append messages to the repeated `field` until the next would pass `budget` bytes (one
    always goes in); returns how many went in, so the page token can resume after them."""
    used = taken = 0
    for msg in messages:
        used += msg.ByteSize() + 8  # the field's tag and length, generously
        if used > budget and taken:
            break
        field.append(msg)
        taken += 1
    return taken


def _token(offset: int, total: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode() if offset < total else ""


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, controller: Controller, guard: Guard, *, poll_s: float = 0.5) -> None:
        self.c = controller
        self.guard = guard
        self.poll_s = poll_s
        self._views: dict[tuple[int, int, bool], jobs_pb2.Job] = {}  # see `_listed`
        self._pending = PendingCounts(
            lambda owner: controller.store.count_jobs(states=(JobState.PENDING,), owner=owner),
            controller.clock.now,
        )

    def _spec(self, msg: jobs_pb2.JobSpec, *, owner: str) -> JobSpec:
        """The spec of a request, within the size a spec may have."""
        size = msg.ByteSize()
        if size > self.guard.max_spec_bytes:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "spec",
                        f"is {size} bytes, at most {self.guard.max_spec_bytes}: keep data in "
                        "files the job reads, not in its command or env",
                    )
                ]
            )
        return convert.spec_from_pb(msg, owner=owner)

    def _listed(self, job: Job, who: Principal) -> jobs_pb2.Job:
        """`_job_view` of a listed job, built once per version of the job and kind of viewer
        (its owner or not): pages listed again are copied, not built. Never changed after."""
        key = (job.id, job.revision, job.spec.owner == who.name)
        msg = self._views.get(key)
        if msg is None:
            if len(self._views) >= LISTED_VIEWS:
                self._views.clear()
            msg = self._views[key] = _job_view(job, who)
        return msg

    def _job(self, call: Call, job_id: int, granted: frozenset[str] | None = None) -> Job:
        """The job, if the caller may act on it: theirs, everyone's, or one in a granted
        queue (`granted`: worked out here unless the caller has it already)."""
        job = self.c.store.get_job(job_id)
        if granted is None:
            granted = self.guard.granted(call.who)
        if not call.who.owns(job.spec.owner) and job.spec.queue not in granted:
            raise PermissionDenied(
                f"job {job_id} is not yours; acting on others' jobs needs "
                f"{Permission.JOBS_ALL.value}",
                permission=Permission.JOBS_ALL.value,
            )
        return job

    @rpc(Permission.JOBS_SUBMIT, audited=True)
    def CreateJob(self, request, context, call: Call):
        if len(request.request_id) > 128:
            raise InvalidArgument([FieldViolation("request_id", "longer than 128 characters")])
        spec = self._spec(request.spec, owner=call.who.name)
        self._check_run_as(call.who)
        if not request.validate_only:
            self._check_pending_cap(call.who.name)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The caller gave up: a job stored now would be one nobody was told about.
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the commit")

        def audit(job: Job) -> AuditEntry:  # written with the job, in its transaction
            call.target, call.written = convert.job_name(job.id), True
            return _audit_entry(self, call, None)

        job = self.c.submit(
            spec, request_id=request.request_id, validate_only=request.validate_only, audit=audit
        )
        if job.id and not request.validate_only:
            self._pending.add(call.who.name)
        call.target = convert.job_name(job.id) if job.id else "jobs/-"
        call.detail = "validate only" if request.validate_only else ""
        if job.spec.owner != call.who.name:  # a request_id another user chose first
            raise AlreadyExists("request_id", request.request_id)
        if job.spec != spec:  # a retry returns the job; another job under the same id is refused
            name = convert.job_name(job.id)
            raise AlreadyExists(
                "request_id",
                request.request_id,
                f"request_id {request.request_id!r} was used for {name} with a different spec; "
                "submit with a new request_id",
            )
        return _job_view(job, call.who)

    def _check_run_as(self, who: Principal) -> None:
        account = self.guard.runas.account_for(who.name)
        uid = who.uid if account == who.name else None
        if uid is None:
            uid = account_of(account).uid  # None: no account here; the agents check theirs
        why = self.guard.runas.refusal(account, uid)
        if why:
            raise PermissionDenied(f"jobs of {who.name!r} cannot run: {why}", permission="run-as")

    def _check_pending_cap(self, owner: str) -> None:
        cap = self.guard.max_pending_per_user
        if self._pending.at_least(owner, cap):
            raise ResourceExhausted(
                f"{owner} has {cap} pending jobs, the most one user may queue; "
                "wait for some to start or cancel some",
                retry_after_s=30.0,
            )

    @rpc(Permission.JOBS_OWN)
    def GetJob(self, request, context, call: Call):
        job_id = convert.parse_job_name(request.name)
        job, events, env = self.c.get(job_id, job=self._job(call, job_id))
        msg = _job_view(job, call.who, env)
        msg.events.extend(convert.event_to_pb(e) for e in events)
        return msg

    @rpc(Permission.JOBS_OWN)
    def ListJobs(self, request, context, call: Call):
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
        owner = request.owner
        team = request.queue and request.queue in self.guard.granted(call.who)
        if not call.who.can(Permission.JOBS_ALL) and not (team and not owner):
            if owner not in ("", call.who.name):
                raise PermissionDenied(
                    f"listing {owner}'s jobs needs {Permission.JOBS_ALL.value}",
                    permission=Permission.JOBS_ALL.value,
                )
            owner = call.who.name
        page = self.c.store.list_jobs(
            states=states,
            queue=request.queue,
            owner=owner,
            page_size=size,
            page_token=request.page_token,
        )
        reply = jobs_pb2.ListJobsResponse(next_page_token=page.next_page_token)
        taken = _fill(reply.jobs, (self._listed(job, call.who) for job in page.jobs))
        if taken < len(page.jobs):
            reply.next_page_token = self.c.store.page_token_after(reply.jobs[-1].id)
        return reply

    @rpc(Permission.JOBS_OWN, audited=True)
    def CancelJob(self, request, context, call: Call):
        job_id = convert.parse_job_name(request.name)
        call.target = convert.job_name(job_id)
        self._job(call, job_id)
        return _job_view(self.c.cancel(job_id, by=call.who.name), call.who)

    @rpc(Permission.JOBS_OWN, audited=True)
    def ScaleJob(self, request, context, call: Call):
        job_id = convert.parse_job_name(request.name)
        call.target = convert.job_name(job_id)
        self._job(call, job_id)
        job = self.c.scale(job_id, request.replicas, by=call.who.name)
        return _job_view(job, call.who)

    @rpc(Permission.JOBS_OWN, audited=True)
    def UpdateJob(self, request, context, call: Call):
        job_id = convert.parse_job_name(request.name)
        call.target = convert.job_name(job_id)
        job = self._job(call, job_id)
        if job.spec.owner != call.who.name:
            # The new command would run as the owner's account: nobody else may choose it
            # (a team member or an operator may cancel or scale it, not reprogram it).
            raise PermissionDenied(
                f"job {job_id} is {job.spec.owner}'s: only its owner may update it",
                permission=Permission.JOBS_SUBMIT.value,
            )
        self._check_run_as(call.who)
        spec = self._spec(request.spec, owner=job.spec.owner)
        return _job_view(self.c.update(job_id, spec, by=call.who.name), call.who)

    @rpc(Permission.JOBS_OWN)
    def WatchJobs(self, request, context, call: Call) -> Iterator[jobs_pb2.WatchJobsResponse]:
        only = convert.parse_job_name(request.name) if request.name else None
        granted = self.guard.granted(call.who)
        if only is not None:
            self._job(call, only, granted)  # NOT_FOUND now rather than silence forever
        everyone = call.who.can(Permission.JOBS_ALL)
        seen = request.since_revision
        while context.is_active():
            for job in self.c.store.jobs_since(seen):
                seen = max(seen, job.revision)
                if only is not None and job.id != only:
                    continue
                if everyone or job.spec.owner == call.who.name or job.spec.queue in granted:
                    yield jobs_pb2.WatchJobsResponse(job=_job_view(job, call.who))
            self.c.feed.wait(seen, timeout=self.poll_s)

    @rpc(Permission.JOBS_OWN)
    def StreamJobLogs(self, request, context, call: Call) -> Iterator[jobs_pb2.LogChunk]:
        job_id = convert.parse_job_name(request.name)
        job = self._job(call, job_id)
        if job.placement is not None and request.rank not in {r.rank for r in job.placement.ranks}:
            raise NotFound("rank", f"{request.rank} of job {job_id}")
        offset = max(0, request.offset)
        while context.is_active():
            when = None
            if request.timestamps:
                data, when = self.c.logs.read_stamped(job_id, job.attempt, request.rank, offset)
            else:
                data = self.c.logs.read(job_id, job.attempt, request.rank, offset)
            if data:
                chunk = jobs_pb2.LogChunk(offset=offset, data=data)
                if when is not None:
                    chunk.time.FromDatetime(when)
                yield chunk
                offset += len(data)
                continue
            if not request.follow or job.state.finished:
                return
            time.sleep(self.poll_s)
            job = self.c.store.get_job(job_id)


class NodeServicer(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self, controller: Controller, guard: Guard) -> None:
        self.c = controller
        self.guard = guard

    @rpc(Permission.NODES_READ)
    def ListNodes(self, request, context, call: Call):
        nodes = self.c.store.list_nodes()
        offset, size = _page(request)
        usage = self.c.node_usage()
        reply = nodes_pb2.ListNodesResponse()
        taken = _fill(
            reply.nodes,
            (
                convert.node_to_pb(n, usage=usage.get(n.id, {}))
                for n in nodes[offset : offset + size]
            ),
        )
        reply.next_page_token = _token(offset + taken, len(nodes))
        return reply

    @rpc(Permission.NODES_READ)
    def GetNode(self, request, context, call: Call):
        name = request.name.removeprefix("nodes/")
        node = self.c.store.get_node(name)
        events = self.c.store.list_events("node", name)
        return convert.node_to_pb(node, usage=self.c.node_usage().get(name, {}), events=events)

    @rpc(Permission.NODES_MANAGE, audited=True)
    def DrainNode(self, request, context, call: Call):
        call.target = request.name[:256]
        if len(request.reason) > 1024:
            raise InvalidArgument([FieldViolation("reason", "longer than 1024 characters")])
        why = request.reason or f"drained by {call.who.name}"
        node = self.c.drain(request.name.removeprefix("nodes/"), why)
        return convert.node_to_pb(node, usage=self.c.node_usage().get(node.id, {}))

    @rpc(Permission.NODES_MANAGE, audited=True)
    def UndrainNode(self, request, context, call: Call):
        call.target = request.name[:256]
        node = self.c.undrain(request.name.removeprefix("nodes/"), by=call.who.name)
        return convert.node_to_pb(node, usage=self.c.node_usage().get(node.id, {}))


class LeaseServicer(leases_pb2_grpc.LeaseServiceServicer):
    def __init__(self, controller: Controller, guard: Guard) -> None:
        self.c = controller
        self.guard = guard

    @rpc(Permission.LEASES_READ)
    def ListLeases(self, request, context, call: Call):
        leases = self.c.store.list_leases(include_released=request.include_released)
        offset, size = _page(request)
        now = self.c.clock.now()
        reply = leases_pb2.ListLeasesResponse()
        kept = self.c.leases.kept if self.c.leases is not None else {}
        taken = _fill(
            reply.leases,
            (
                convert.lease_to_pb(x, now=now, kept_for=kept.get(x.id, ""))
                for x in leases[offset : offset + size]
            ),
        )
        reply.next_page_token = _token(offset + taken, len(leases))
        return reply

    @rpc(Permission.COST_ALL)
    def GetCost(self, request, context, call: Call):
        by = convert.cost_by_from_pb(request.group_by)
        since = convert.from_ts(request.since, request.HasField("since"), field="since")
        # A `since` ahead of the daemon's clock (a client's clock skewed) just finds nothing.
        now = self.c.clock.now()
        report = self.c.cost(since=since, by=by)
        return convert.cost_to_pb(report, by=by, since=since, now=now)


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, controller: Controller, guard: Guard) -> None:
        self.c = controller
        self.guard = guard

    @rpc(None)
    def WhoAmI(self, request, context, call: Call):
        who = call.who
        reply = auth_pb2.WhoAmIResponse(
            user=who.name,
            role=who.role.value,
            via=who.via,
            permissions=sorted(p.value for p in ROLE_PERMISSIONS[who.role]),
            server_version=SERVER_VERSION,
        )
        if who.uid is not None:
            reply.uid = who.uid
        return reply

    def _ttl(self, msg, present: bool, default: float | None) -> timedelta | None:
        if not present:
            return timedelta(seconds=default) if default else None
        seconds = msg.seconds + msg.nanos / 1e9
        if not 0 < seconds <= self.guard.max_token_ttl_s:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "ttl",
                        f"must be more than 0 and at most {self.guard.max_token_ttl_s:g} seconds",
                    )
                ]
            )
        return timedelta(seconds=seconds)

    @rpc(Permission.TOKENS_OWN, audited=True)
    def CreateToken(self, request, context, call: Call):
        user = request.user or call.who.name
        call.target = f"users/{user}"[:256]
        if user != call.who.name:
            call.who.require(Permission.TOKENS_ALL)
        if not NAME_RE.match(user):
            raise InvalidArgument([FieldViolation("user", f"{user!r} is not a valid user name")])
        if len(request.description) > 256:
            raise InvalidArgument([FieldViolation("description", "longer than 256 characters")])
        ttl = self._ttl(request.ttl, request.HasField("ttl"), self.guard.default_token_ttl_s)
        return self._issue(call, TokenKind.USER, user, ttl, description=request.description)

    def _issue(
        self,
        call: Call,
        kind: TokenKind,
        principal: str,
        ttl: timedelta | None,
        description: str = "",
    ) -> auth_pb2.CreateTokenResponse:
        """Mint a token, keep its record (the hash only), and answer with the secret, once."""
        secret, token = mint_token(
            kind,
            principal,
            now=self.c.clock.now(),
            created_by=call.who.name,
            description=description,
            ttl=ttl,
        )
        self.c.store.put_token(token)
        call.detail = f"{kind.value} token {token.id}"
        return auth_pb2.CreateTokenResponse(token=convert.token_to_pb(token), secret=secret)

    @staticmethod
    def _node(request, call: Call) -> str:
        node = request.node.removeprefix("nodes/")
        call.target = f"nodes/{node}"[:256]
        if not NAME_RE.match(node):
            raise InvalidArgument([FieldViolation("node", f"{node!r} is not a valid node name")])
        return node

    @rpc(Permission.TOKENS_OWN)
    def ListTokens(self, request, context, call: Call):
        user = request.user or call.who.name
        if user != "*" and not NAME_RE.match(user):
            raise InvalidArgument([FieldViolation("user", "a user or node name, or '*'")])
        if user != call.who.name:
            call.who.require(Permission.TOKENS_ALL)
        tokens = self.c.store.list_tokens(principal="" if user == "*" else user)
        return auth_pb2.ListTokensResponse(tokens=[convert.token_to_pb(t) for t in tokens[-1000:]])

    @rpc(Permission.TOKENS_OWN, audited=True)
    def RevokeToken(self, request, context, call: Call):
        call.target = f"tokens/{request.id}"[:256]
        if not request.id or len(request.id) > 64:
            raise InvalidArgument([FieldViolation("id", "is required: a token id")])
        token = self.c.store.get_token(request.id)
        mine = token.kind is TokenKind.USER and token.principal == call.who.name
        if not mine:
            call.who.require(
                Permission.TOKENS_ALL if token.kind is TokenKind.USER else Permission.NODES_MANAGE
            )
        if token.revoked_at is None:
            token = self.c.store.put_token(replace(token, revoked_at=self.c.clock.now()))
        return convert.token_to_pb(token)

    @rpc(Permission.NODES_MANAGE, audited=True)
    def CreateNodeToken(self, request, context, call: Call):
        node = self._node(request, call)
        ttl = self._ttl(request.ttl, request.HasField("ttl"), None)
        _retire_node_credentials(self.c, node, self.c.clock.now())
        return self._issue(call, TokenKind.NODE, node, ttl)

    @rpc(Permission.NODES_MANAGE, audited=True)
    def CreateJoinToken(self, request, context, call: Call):
        node = self._node(request, call)
        if self.guard.authority is None:
            raise FailedPrecondition(
                "gpuctld issues no node certificates: set [server] agent_listen (agents then "
                "join with certificates), or give the node a token with `gpuctl node token`"
            )
        ttl = self._ttl(request.ttl, request.HasField("ttl"), self.guard.join_token_ttl_s)
        reply = self._issue(call, TokenKind.JOIN, node, ttl)
        reply.ca_pem = self.guard.authority.cert_pem
        return reply

    @rpc(Permission.AUDIT_READ)
    def ListAudit(self, request, context, call: Call):
        limit = request.limit or 100
        if not 0 < limit <= 1000:
            raise InvalidArgument([FieldViolation("limit", "must be between 1 and 1000")])
        if request.principal and not NAME_RE.match(request.principal):
            raise InvalidArgument([FieldViolation("principal", "a user or node name")])
        since = convert.from_ts(request.since, request.HasField("since"), field="since")
        entries = self.c.store.list_audit(since=since, principal=request.principal, limit=limit)
        return auth_pb2.ListAuditResponse(entries=[convert.audit_to_pb(e) for e in entries])


def _retire_node_credentials(c: Controller, node: str, now: datetime) -> None:
    """A node has one credential at a time: a new token or certificate ends the old ones."""
    for old in c.store.list_tokens(principal=node):
        if old.kind in (TokenKind.NODE, TokenKind.CERT) and old.revoked_at is None:
            c.store.put_token(replace(old, revoked_at=now))


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, controller: Controller, guard: Guard) -> None:
        self.c = controller
        self.guard = guard

    @staticmethod
    def _ref(msg: agent_pb2.RankRef):
        from gpuctl.runtime.controller import RankRef

        return RankRef(msg.job_id, msg.rank, msg.attempt)

    @rpc(Permission.JOIN, audited=True)
    def JoinNode(self, request, context, call: Call):
        node = call.who.name
        call.target = f"nodes/{node}"[:256]
        authority = self.guard.authority
        if authority is None:
            raise FailedPrecondition("gpuctld issues no node certificates")
        if not request.csr_pem or len(request.csr_pem) > 16384:
            raise InvalidArgument([FieldViolation("csr_pem", "a PEM CSR of at most 16 KiB")])
        with self.c.writing():  # one use: two joins racing with one token get one certificate
            token = self.c.store.get_token(call.who.credential)
            if token.revoked_at is not None:
                raise Unauthenticated("join token already used")
            try:
                cert_pem, serial = authority.issue_node(node, bytes(request.csr_pem))
            except ValueError as e:
                raise InvalidArgument([FieldViolation("csr_pem", str(e))]) from None
            now = self.c.clock.now()
            self.c.store.put_token(replace(token, revoked_at=now))
            _retire_node_credentials(self.c, node, now)
            self.c.store.put_token(
                ApiToken(
                    id=serial,
                    kind=TokenKind.CERT,
                    principal=node,
                    secret_hash="",
                    description="node certificate",
                    created_by=token.created_by,
                    created_at=now,
                    expires_at=now + timedelta(days=NODE_DAYS),
                )
            )
        call.detail = f"certificate {serial}"
        return agent_pb2.JoinNodeResponse(
            node_name=node, certificate_pem=cert_pem, ca_pem=authority.cert_pem
        )

    @rpc(Permission.AGENT, audited=True)
    def RegisterNode(self, request, context, call: Call):
        call.target = f"nodes/{request.node.name}"[:256]
        _own_node(call, request.node.name, "node.name")
        node = self.c.register_node(validate_node(convert.node_from_pb(request.node)))
        return agent_pb2.RegisterNodeResponse(
            node_name=node.id,
            heartbeat_interval=convert.duration(self.c.settings.heartbeat_interval_s),
            heartbeat_timeout=convert.duration(self.c.settings.heartbeat_timeout_s),
        )

    @rpc(Permission.AGENT)
    def Heartbeat(self, request, context, call: Call):
        _own_node(call, request.node_name, "node_name")
        issues = tuple(request.health_issues)
        violations = health_issue_violations(issues)
        if violations:
            raise InvalidArgument(violations)
        for name in ("running", "ready"):
            if len(getattr(request, name)) > MAX_RUNNING_REFS:
                raise InvalidArgument([FieldViolation(name, f"at most {MAX_RUNNING_REFS} ranks")])
        result = self.c.heartbeat(
            request.node_name,
            [self._ref(r) for r in request.running],
            ready=[self._ref(r) for r in request.ready],
            health_issues=issues,
            profile=validate_profile(convert.profile_from_pb(request.profile))
            if request.HasField("profile")
            else None,
        )
        reply = agent_pb2.HeartbeatResponse(
            stop=[convert.rank_ref(r.job_id, r.rank, r.attempt) for r in result.stop],
            reregister=result.reregister,
        )
        assignments = (
            agent_pb2.Assignment(
                ref=convert.rank_ref(a.ref.job_id, a.ref.rank, a.ref.attempt),
                job_name=a.job.spec.name or f"job-{a.job.id}",
                command=list(a.job.spec.command),
                env=a.env,
                working_dir=a.job.spec.working_dir,
                gpu_indices=list(a.rank.gpu_indices),
                kill_grace=convert.duration(a.kill_grace_s),
                owner=self.guard.runas.account_for(a.job.spec.owner),
                port=a.rank.port,
                readiness_http=a.job.spec.readiness_http,
                readiness_tcp=a.job.spec.readiness_tcp,
            )
            for a in result.assignments
        )
        # What does not fit comes with the next heartbeat: the protocol is level-triggered.
        _fill(reply.assignments, assignments, MAX_REPLY_BYTES - reply.ByteSize())
        return reply

    @rpc(Permission.AGENT)
    def ReportRankStatus(self, request, context, call: Call):
        _own_node(call, request.node_name, "node_name")
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

    @rpc(Permission.AGENT)
    def PushLogs(self, request, context, call: Call):
        _own_node(call, request.node_name, "node_name")
        if len(request.data) > MAX_LOG_PUSH or request.offset < 0:
            raise InvalidArgument(
                [FieldViolation("data", f"at most {MAX_LOG_PUSH} bytes at a non-negative offset")]
            )
        next_offset = self.c.push_logs(
            request.node_name, self._ref(request.ref), request.offset, request.data
        )
        return agent_pb2.PushLogsResponse(next_offset=next_offset)
