"""Hand-written in-memory fakes of gpuctld's user API, served by a real gRPC server on 127.0.0.1.

`serve_fake()` starts JobService, NodeService, LeaseService and grpc.health.v1 on a free port;
tests drive the SDK and the CLI against it and inject failures with `fail_next`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gpuctl.api import convert
from gpuctl.api._pb.v1 import (
    events_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.validation import spec_violations

FIXED_NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FINISHED = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def abort(
    context: grpc.ServicerContext, code: grpc.StatusCode, message: str, *details: pb_message.Message
):
    """End the call with a rich google.rpc.Status, as gpuctld does."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for d in details:
        status.details.add().Pack(d)
    context.abort_with_status(rpc_status.to_status(status))


def bad_request(*violations: tuple[str, str]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )


def not_found(context: grpc.ServicerContext, kind: str, name: str) -> None:
    abort(
        context,
        grpc.StatusCode.NOT_FOUND,
        f"{kind} {name} not found",
        error_details_pb2.ResourceInfo(resource_type=kind, resource_name=name),
    )


class Faults:
    """Failures to inject: the next calls of a method end with the given codes, in order."""

    def __init__(self) -> None:
        self._queued: dict[str, list[grpc.StatusCode]] = defaultdict(list)
        self._lock = threading.Lock()

    def fail_next(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        with self._lock:
            self._queued[method].extend([code] * times)

    def check(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            code = self._queued[method].pop(0) if self._queued[method] else None
        if code is not None:
            abort(context, code, f"injected {code.name} for {method}")


def _user(context: grpc.ServicerContext) -> str:
    """The fake takes a bearer token "token-of-NAME" for user NAME."""
    bearer = dict(context.invocation_metadata()).get("authorization", "")
    return bearer.removeprefix("Bearer ").removeprefix("token-of-")


def _page(items: list, request, default_size: int) -> tuple[list, str]:
    start = int(request.page_token or 0)
    size = request.page_size or default_size
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")


class FakeJobService(jobs_pb2_grpc.JobServiceServicer):
    """Jobs in a dict; validates specs with `core.validation` like the real server."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.jobs: dict[int, jobs_pb2.Job] = {}
        self.events: dict[int, list[events_pb2.Event]] = defaultdict(list)
        self.logs: dict[tuple[int, int], bytes] = {}
        self.log_chunk_size = 5  # small, so a log arrives in several chunks
        # rank: an event its log stream waits for before its first chunk (the order streams end)
        self.log_waits: dict[int, threading.Event] = {}
        self.log_ended: dict[int, threading.Event] = {}  # rank: set when its stream ends
        self.requests: list[tuple[str, pb_message.Message, str]] = []  # (method, request, user)
        self.watch_ends_early = 0  # the next N watches end after the current state, like a restart
        # Run, one per watch, after a watch has sent the current state: how a test makes a job
        # change while a client watches, without threads or sleeps.
        self.after_watch_start: list[Callable[[], object]] = []
        self.default_page_size = 100
        self._history: list[jobs_pb2.Job] = []
        self._by_request_id: dict[str, int] = {}
        self._revision = 0
        self._next_id = 1
        self._changed = threading.Condition()

    # -- for tests ------------------------------------------------------------------------

    def put(self, job: jobs_pb2.Job) -> jobs_pb2.Job:
        """Store (a copy of) `job` as its new state and wake the watchers."""
        with self._changed:
            self._revision += 1
            stored = jobs_pb2.Job()
            stored.CopyFrom(job)
            stored.revision = self._revision
            stored.name = convert.job_name(stored.id)
            stored.update_time.FromDatetime(FIXED_NOW)
            self.jobs[stored.id] = stored
            self._next_id = max(self._next_id, stored.id + 1)
            self._history.append(stored)
            self._changed.notify_all()
            return stored

    def set_state(self, job_id: int, state: int, **fields) -> jobs_pb2.Job:
        job = jobs_pb2.Job()
        job.CopyFrom(self.jobs[job_id])
        job.state = state
        for key, value in fields.items():
            if isinstance(value, pb_message.Message):
                getattr(job, key).CopyFrom(value)
            else:
                setattr(job, key, value)
        return self.put(job)

    def calls(self, method: str) -> list[pb_message.Message]:
        return [r for m, r, _ in self.requests if m == method]

    def _record(
        self, method: str, request: pb_message.Message, context: grpc.ServicerContext
    ) -> None:
        self.requests.append((method, request, _user(context)))
        self.faults.check(method, context)

    def _find(self, name: str, context: grpc.ServicerContext) -> jobs_pb2.Job:
        try:
            job_id = convert.parse_job_name(name)
        except InvalidArgument as e:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                str(e),
                bad_request(*((v.field, v.description) for v in e.violations)),
            )
        job = self.jobs.get(job_id)
        if job is None:
            not_found(context, "job", name)
        return job

    # -- JobService -----------------------------------------------------------------------

    def CreateJob(self, request, context):
        self._record("CreateJob", request, context)
        try:
            spec = convert.spec_from_pb(request.spec, owner=_user(context))
            violations = spec_violations(spec)
        except InvalidArgument as e:
            violations = list(e.violations)
        if violations:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "; ".join(str(v) for v in violations),
                bad_request(*((v.field, v.description) for v in violations)),
            )
        if request.validate_only:
            return jobs_pb2.Job(
                spec=convert.spec_to_pb(spec),
                state=jobs_pb2.JOB_STATE_PENDING,
                owner=spec.owner,
                reason="would queue now: 16 free GPUs on fabric-a",
            )
        with self._changed:
            if request.request_id in self._by_request_id:
                return self.jobs[self._by_request_id[request.request_id]]
            job = jobs_pb2.Job(
                id=self._next_id,
                spec=convert.spec_to_pb(spec),
                state=jobs_pb2.JOB_STATE_PENDING,
                owner=spec.owner,
                reason="waiting for the next scheduling cycle",
                request_id=request.request_id,
            )
            job.create_time.FromDatetime(FIXED_NOW)
            stored = self.put(job)
            if request.request_id:
                self._by_request_id[request.request_id] = stored.id
            self.events[stored.id].append(
                events_pb2.Event(type="Submitted", message=f"by {spec.owner}")
            )
            self.events[stored.id][-1].time.FromDatetime(FIXED_NOW)
            return stored

    def GetJob(self, request, context):
        self._record("GetJob", request, context)
        job = jobs_pb2.Job()
        job.CopyFrom(self._find(request.name, context))
        job.events.extend(self.events[job.id])
        return job

    def ListJobs(self, request, context):
        self._record("ListJobs", request, context)
        jobs = [
            j
            for _, j in sorted(self.jobs.items())
            if (not request.states or j.state in request.states)
            and (not request.queue or j.spec.queue == request.queue)
            and (not request.owner or j.owner == request.owner)
        ]
        page, token = _page(jobs, request, self.default_page_size)
        return jobs_pb2.ListJobsResponse(jobs=page, next_page_token=token)

    def CancelJob(self, request, context):
        self._record("CancelJob", request, context)
        job = self._find(request.name, context)
        if job.state in FINISHED:
            state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.id} is {state}: cannot cancel",
            )
        if job.state == jobs_pb2.JOB_STATE_RUNNING:
            return self.set_state(job.id, jobs_pb2.JOB_STATE_CANCELLING)
        return self.set_state(job.id, jobs_pb2.JOB_STATE_CANCELLED, reason="cancelled by the user")

    def WatchJobs(self, request, context):
        self._record("WatchJobs", request, context)
        job_id = convert.parse_job_name(request.name) if request.name else None

        def wanted(j: jobs_pb2.Job) -> bool:
            return job_id is None or j.id == job_id

        with self._changed:
            revision = request.since_revision
            first = [j for _, j in sorted(self.jobs.items()) if wanted(j)] if revision == 0 else []
            revision = max(revision, self._revision) if revision == 0 else revision
            end_early = self.watch_ends_early > 0
            self.watch_ends_early -= end_early
            hook = self.after_watch_start.pop(0) if self.after_watch_start else None
        for job in first:
            yield jobs_pb2.WatchJobsResponse(job=job)
        if hook is not None:
            hook()
        if end_early:
            return
        while context.is_active():
            with self._changed:
                changes = [j for j in self._history if j.revision > revision and wanted(j)]
                if not changes:
                    self._changed.wait(0.05)
                    continue
                revision = max(j.revision for j in changes)
            for job in changes:
                yield jobs_pb2.WatchJobsResponse(job=job)

    def StreamJobLogs(self, request, context):
        self._record("StreamJobLogs", request, context)
        job = self._find(request.name, context)
        data = self.logs.get((job.id, request.rank), b"")
        if request.rank in self.log_waits:
            self.log_waits[request.rank].wait(10)
        yield from self._chunks(request, data)
        self.log_ended.setdefault(request.rank, threading.Event()).set()

    def _chunks(self, request, data: bytes):
        for offset in range(request.offset, len(data), self.log_chunk_size):
            chunk = jobs_pb2.LogChunk(
                offset=offset, data=data[offset : offset + self.log_chunk_size]
            )
            if request.timestamps:  # as if each chunk arrived `offset` seconds after FIXED_NOW
                chunk.time.FromDatetime(FIXED_NOW + timedelta(seconds=offset))
            yield chunk


class FakeNodeService(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.nodes: dict[str, nodes_pb2.Node] = {}
        self.default_page_size = 100

    def add(self, node: nodes_pb2.Node) -> None:
        self.nodes[node.name] = node

    def _find(self, name: str, context) -> nodes_pb2.Node:
        node = self.nodes.get(name)
        if node is None:
            not_found(context, "node", name)
        return node

    def ListNodes(self, request, context):
        self.faults.check("ListNodes", context)
        nodes = []
        for name in sorted(self.nodes):
            node = nodes_pb2.Node()
            node.CopyFrom(self.nodes[name])
            del node.events[:]  # events travel with GetNode only
            nodes.append(node)
        page, token = _page(nodes, request, self.default_page_size)
        return nodes_pb2.ListNodesResponse(nodes=page, next_page_token=token)

    def GetNode(self, request, context):
        self.faults.check("GetNode", context)
        return self._find(request.name, context)

    def DrainNode(self, request, context):
        self.faults.check("DrainNode", context)
        node = self._find(request.name, context)
        node.state = nodes_pb2.NODE_STATE_DRAINING
        node.state_reason = request.reason or "drained by an admin"
        return node


class FakeLeaseService(leases_pb2_grpc.LeaseServiceServicer):
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.leases: list[leases_pb2.Lease] = []

    def ListLeases(self, request, context):
        self.faults.check("ListLeases", context)
        gone = (leases_pb2.LEASE_STATE_RELEASED, leases_pb2.LEASE_STATE_EXPIRED)
        leases = [x for x in self.leases if request.include_released or x.state not in gone]
        page, token = _page(leases, request, 100)
        return leases_pb2.ListLeasesResponse(leases=page, next_page_token=token)


@dataclass
class FakeApi:
    target: str
    port: int
    server: grpc.Server
    faults: Faults
    jobs: FakeJobService
    nodes: FakeNodeService
    leases: FakeLeaseService
    health: health.HealthServicer

    def fail_next(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        self.faults.fail_next(method, code, times)


@contextmanager
def serve_fake() -> Iterator[FakeApi]:
    """A real gRPC server on 127.0.0.1 (a free port) serving the fakes; stopped on exit."""
    faults = Faults()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    api_jobs, api_nodes, api_leases = (
        FakeJobService(faults),
        FakeNodeService(faults),
        FakeLeaseService(faults),
    )
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(api_jobs, server)
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(api_nodes, server)
    leases_pb2_grpc.add_LeaseServiceServicer_to_server(api_leases, server)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeApi(
            f"127.0.0.1:{port}", port, server, faults, api_jobs, api_nodes, api_leases, checker
        )
    finally:
        server.stop(None).wait()


# -- sample objects -----------------------------------------------------------------------


def h100_node(
    name: str,
    *,
    gpus: int = 8,
    fabric: str = "fabric-a/spine-1/leaf-1",
    measured: bool = True,
    used: dict[int, tuple[int, list[int]]] | None = None,
    state: int = nodes_pb2.NODE_STATE_READY,
    links_down: dict[int, int] | None = None,
    health_issues: tuple[str, ...] = (),
) -> nodes_pb2.Node:
    """An 8x H100 SXM node on 8x400G InfiniBand, profiled through NVML (PCIe, NVLink links,
    NUMA); `used`: GPU index -> (used milli, job ids); `links_down`: GPU index -> links down."""
    node = nodes_pb2.Node(
        name=name,
        address=f"10.0.0.{len(name)}",
        fabric=fabric,
        provider="static",
        sku="p5.48xlarge",
        region="us-east-1",
        labels={"rack": "r1"},
        cpu_milli=192_000,
        memory_mib=2_048 * 1024,
        price_per_hour=98.32,
        state=state,
        lease=f"leases/{name}",
        health_issues=health_issues,
        profile=nodes_pb2.BandwidthProfile(
            nvlink_domain_size=gpus,
            pcie_gen=5,
            pcie_width=16,
            network=nodes_pb2.Network(
                kind=nodes_pb2.NET_KIND_INFINIBAND, ports=8, gbps_per_port=400
            ),
            bf16_tflops=989.0 * gpus,
            source="fake",
        ),
    )
    buses = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")
    for i in range(gpus):
        active = 18 - (links_down or {}).get(i, 0)
        gpu = node.profile.gpus.add(
            index=i,
            uuid=f"GPU-{name}-{i}",
            model="H100 SXM",
            memory_mib=81_559,
            hbm_gbps=3352,
            nvlink_gbps=50.0 * active,  # 50 GB/s per NVLink 4 link
            pci_bus_id=f"0000:{buses[i % 8]}:00.0",
            nvlink_links_active=active,
            nvlink_links_total=18,
            nvlink_version=4,
            pcie_gen=5 if i else 1,  # GPU 0 idles at gen1, as power saving does
            pcie_width=16,
            pcie_max_gen=5,
            pcie_max_width=16,
            numa_node=0 if i < 4 else 1,
            cpu_affinity="0-55,112-167" if i < 4 else "56-111,168-223",
        )
        if measured:
            gpu.measured_hbm_gbps = 2980.5
    for port in range(8):
        node.profile.ib_ports.add(
            device=f"mlx5_{port}",
            port=1,
            rate_gbps=400,
            state="ACTIVE",
            phys_state="LinkUp",
            link_layer="InfiniBand",
            guid=f"0c42:a103:00f1:{port:04x}",
        )
    for index, (milli, job_ids) in sorted((used or {}).items()):
        node.usage.add(index=index, used_milli=milli, job_ids=job_ids)
    node.events.add(type="Registered", message="agent 0.1.0 registered").time.FromDatetime(
        FIXED_NOW
    )
    return node


def training_spec(**overrides) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(
        kind=jobs_pb2.JOB_KIND_TRAINING,
        name="llama-pretrain",
        queue="research",
        command=["torchrun", "train.py"],
        num_nodes=2,
        gpus_per_node=8,
        working_dir="/home/alice",
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def running_job(
    api: FakeApi,
    job_id: int,
    *,
    nodes: tuple[str, ...] = ("gpu-01", "gpu-02"),
    owner: str = "alice",
) -> jobs_pb2.Job:
    """A placed, running training gang across `nodes`, one rank per node."""
    job = jobs_pb2.Job(
        id=job_id,
        spec=training_spec(num_nodes=len(nodes)),
        state=jobs_pb2.JOB_STATE_RUNNING,
        owner=owner,
    )
    job.create_time.FromDatetime(FIXED_NOW)
    job.start_time.FromDatetime(FIXED_NOW)
    job.placement.master_addr = "10.0.0.6"
    job.placement.master_port = 29500
    job.placement.reason = "one leaf switch, NVLink 900 GB/s"
    for rank, node in enumerate(nodes):
        job.placement.ranks.add(
            rank=rank,
            node=node,
            gpu_indices=list(range(8)),
            gpu_milli=1000,
            state=jobs_pb2.RANK_STATE_RUNNING,
            env={
                "MASTER_ADDR": "10.0.0.6",
                "NODE_RANK": str(rank),
                "WORLD_SIZE": str(8 * len(nodes)),
            },
        )
    return api.jobs.put(job)
