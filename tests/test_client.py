"""The SDK against a real gRPC server serving the in-memory fakes of `fakes_api`."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2

from gpuctl.api._pb.v1 import jobs_pb2_grpc
from gpuctl.client import (
    AlreadyExistsError,
    ApiError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobKind,
    JobSpec,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    jobs_pb2,
    leases_pb2,
    nodes_pb2,
)
from tests.fakes_api import FIXED_NOW, h100_node, running_job, serve_fake, training_spec

TRAINING = {
    "kind": "training",
    "nodes": 2,
    "gpus_per_node": 8,
    "command": "torchrun train.py",
    "queue": "research",
}


@pytest.fixture
def api():
    with serve_fake() as fake:
        yield fake


@pytest.fixture
def client(api):
    with Client(api.target, token="token-of-alice", timeout=5) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- submit -------------------------------------------------------------------------------


def test_submit_mapping_queues_a_job_owned_by_the_user(api, client):
    job = client.submit(TRAINING)

    assert (job.id, job.name, job.owner, job.state) == (
        1,
        "jobs/1",
        "alice",
        jobs_pb2.JOB_STATE_PENDING,
    )
    assert list(job.spec.command) == ["torchrun", "train.py"]
    [request] = api.jobs.calls("CreateJob")
    assert len(request.request_id) == 36  # a fresh uuid4
    assert api.jobs.requests[0][2] == "alice"  # x-gpuctl-user metadata


def test_submit_accepts_a_model_spec_a_proto_spec_and_a_yaml_file(api, client, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("kind: inference\nreplicas: 3\ngpu_share: 0.25\ncommand: [vllm, serve]\n")

    a = client.submit(JobSpec(kind=JobKind.TRAINING, command=("python", "x.py"), gpus_per_node=1))
    b = client.submit(training_spec())
    c = client.submit(path)
    d = client.submit(str(path))

    assert [j.id for j in (a, b, c, d)] == [1, 2, 3, 4]
    assert (c.spec.kind, c.spec.replicas, c.spec.gpu_milli) == (jobs_pb2.JOB_KIND_INFERENCE, 3, 250)


def test_submit_with_the_same_request_id_returns_the_first_job(api, client):
    first = client.submit(TRAINING, request_id="req-1")
    again = client.submit(TRAINING, request_id="req-1")

    assert first.id == again.id == 1
    assert len(api.jobs.jobs) == 1


def test_submit_validate_only_stores_nothing(api, client):
    job = client.submit(TRAINING, validate_only=True)

    assert job.id == 0 and job.reason.startswith("would queue")
    assert api.jobs.jobs == {}


def test_submit_invalid_spec_raises_invalid_argument_naming_the_field(client):
    # A JobSpec goes to the server as it is; the server names the API's field.
    with pytest.raises(InvalidArgumentError) as caught:
        client.submit(
            JobSpec(kind=JobKind.TRAINING, command=("python",), num_nodes=2, gpus_per_node=0)
        )

    err = caught.value
    assert isinstance(err, ValueError) and isinstance(err, ApiError)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.violations] == ["spec.gpus_per_node"]
    assert str(err) == "spec.gpus_per_node: must be between 1 and 16, got 0"
    assert any(isinstance(d, error_details_pb2.BadRequest) for d in err.details)
    # A job-file mapping is checked here, in its own words.
    with pytest.raises(InvalidArgumentError) as caught:
        client.submit({**TRAINING, "gpus_per_node": 0})
    assert str(caught.value) == "gpus_per_node: must be between 1 and 16, got 0"


def test_submit_bad_job_file_raises_the_same_error_type_without_a_call(api, client, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: training\ngpus: 8\n")

    with pytest.raises(InvalidArgumentError) as caught:
        client.submit(path)

    assert [v.field for v in caught.value.violations] == ["gpus"]
    assert str(path) in str(caught.value) and "gpus_per_node" in str(caught.value)
    assert api.jobs.calls("CreateJob") == []


# -- retries ------------------------------------------------------------------------------


def test_submit_retried_after_unavailable_carries_the_same_request_id(api, client):
    api.fail_next("CreateJob", grpc.StatusCode.UNAVAILABLE)

    job = client.submit(TRAINING)

    first, second = api.jobs.calls("CreateJob")
    assert first.request_id == second.request_id == job.request_id != ""
    assert len(api.jobs.jobs) == 1


def test_reads_are_retried_on_unavailable_but_not_on_other_codes(api, client):
    client.submit(TRAINING)
    api.fail_next("GetJob", grpc.StatusCode.UNAVAILABLE, times=2)
    assert client.get(1).id == 1
    assert len(api.jobs.calls("GetJob")) == 3

    api.fail_next("GetJob", grpc.StatusCode.INTERNAL)
    with pytest.raises(ApiError) as caught:
        client.get(1)
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert len(api.jobs.calls("GetJob")) == 4


def test_connection_refused_raises_unavailable_quickly():
    target = f"127.0.0.1:{free_port()}"
    start = time.monotonic()

    with (
        Client(target, token="token-of-alice", timeout=10) as c,
        pytest.raises(UnavailableError) as caught,
    ):
        c.get(1)

    # gRPC retries 5 times, backing off 0.1s doubling (with jitter): about 1.5s at most
    assert time.monotonic() - start < 5
    assert isinstance(caught.value, ConnectionError)
    assert str(caught.value) == f"cannot reach gpuctld at {target} (is it running?)"


def test_retries_ride_out_a_server_that_starts_late():
    """Proves gRPC's retry policy covers connection refused, not only UNAVAILABLE replies."""
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    served = []

    class Jobs(jobs_pb2_grpc.JobServiceServicer):
        def GetJob(self, request, context):
            served.append(request.name)
            return jobs_pb2.Job(id=7, name="jobs/7")

    jobs_pb2_grpc.add_JobServiceServicer_to_server(Jobs(), server)

    def start_late():
        time.sleep(0.2)  # the first attempts find the port closed
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", token="token-of-alice", timeout=10) as c:
            assert c.get(7).id == 7
    finally:
        starter.join()
        server.stop(None)
    assert served == ["jobs/7"]


# -- get / list / cancel ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", [1, "1", "jobs/1", " jobs/1 "], ids=["int", "digits", "name", "spaces"]
)
def test_get_accepts_every_job_reference(api, client, ref):
    client.submit(TRAINING)

    job = client.get(ref)

    assert job.id == 1
    assert [e.type for e in job.events] == ["Submitted"]


def test_get_accepts_a_job_message(client):
    job = client.submit(TRAINING)
    assert client.get(job).id == job.id


def test_get_missing_job_raises_not_found_with_resource_info(client):
    with pytest.raises(NotFoundError) as caught:
        client.get(99)

    assert isinstance(caught.value, LookupError)
    assert str(caught.value) == "job jobs/99 not found"
    [info] = caught.value.details
    assert (info.resource_type, info.resource_name) == ("job", "jobs/99")


@pytest.mark.parametrize("ref", ["abc", "jobs/x", 0, -3, "", True], ids=str)
def test_bad_job_reference_fails_locally(api, client, ref):
    with pytest.raises(InvalidArgumentError) as caught:
        client.get(ref)
    assert caught.value.violations[0].field == "job"
    assert api.jobs.requests == []


def test_list_walks_every_page(api, client):
    for _ in range(7):
        client.submit(TRAINING)

    jobs = list(client.list(page_size=3))

    assert [j.id for j in jobs] == [1, 2, 3, 4, 5, 6, 7]
    pages = api.jobs.calls("ListJobs")
    assert [p.page_token for p in pages] == ["", "3", "6"]
    assert all(p.page_size == 3 for p in pages)


def test_list_filters_by_state_queue_and_owner(api, client):
    client.submit(TRAINING)
    running_job(api, 2)
    client.submit({**TRAINING, "queue": "prod"})

    assert [j.id for j in client.list(states=["running"])] == [2]
    assert [j.id for j in client.list(states=[jobs_pb2.JOB_STATE_PENDING], queue="prod")] == [3]
    assert [j.id for j in client.list(owner="bob")] == []


def test_cancel_pending_ends_it_and_running_goes_through_cancelling(api, client):
    client.submit(TRAINING)
    running_job(api, 2)

    assert client.cancel(1).state == jobs_pb2.JOB_STATE_CANCELLED
    assert client.cancel("jobs/2").state == jobs_pb2.JOB_STATE_CANCELLING


def test_cancel_finished_job_raises_failed_precondition(api, client):
    client.submit(TRAINING)
    client.cancel(1)

    with pytest.raises(FailedPreconditionError, match="job 1 is cancelled: cannot cancel"):
        client.cancel(1)


@pytest.mark.parametrize(
    ("code", "cls", "builtin"),
    [
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError, Exception),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError, PermissionError),
        (grpc.StatusCode.UNAUTHENTICATED, PermissionDeniedError, PermissionError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError, TimeoutError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError, LookupError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ApiError, Exception),
    ],
    ids=lambda v: getattr(v, "name", None) or getattr(v, "__name__", str(v)),
)
def test_status_codes_map_to_typed_errors(api, client, code, cls, builtin):
    api.fail_next("ListJobs", code)

    with pytest.raises(cls) as caught:
        list(client.list())

    assert isinstance(caught.value, builtin)
    assert caught.value.code is code
    assert str(caught.value) == f"injected {code.name} for ListJobs"


# -- watch / wait / logs ------------------------------------------------------------------


def test_watch_yields_the_current_state_then_each_change(api, client):
    client.submit(TRAINING)
    api.jobs.after_watch_start.append(lambda: api.jobs.set_state(1, jobs_pb2.JOB_STATE_RUNNING))

    updates = client.watch(1)
    first, second = next(updates), next(updates)
    updates.close()  # cancels the stream on the server

    assert (first.state, second.state) == (jobs_pb2.JOB_STATE_PENDING, jobs_pb2.JOB_STATE_RUNNING)
    assert second.revision > first.revision
    assert api.jobs.calls("WatchJobs")[0].name == "jobs/1"


def test_wait_returns_the_finished_job(api, client):
    client.submit(TRAINING)
    api.jobs.after_watch_start.append(
        lambda: api.jobs.set_state(1, jobs_pb2.JOB_STATE_SUCCEEDED, exit_code=0)
    )

    job = client.wait(1, timeout=5)

    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.exit_code == 0


def test_wait_watches_again_when_the_stream_ends(api, client):
    running_job(api, 1)
    api.jobs.watch_ends_early = 1  # the daemon restarts after sending the current state
    api.jobs.after_watch_start.append(
        lambda: api.jobs.set_state(1, jobs_pb2.JOB_STATE_FAILED, reason="rank 1 exited 3")
    )

    job = client.wait("jobs/1", timeout=5)

    assert (job.state, job.reason) == (jobs_pb2.JOB_STATE_FAILED, "rank 1 exited 3")
    assert len(api.jobs.calls("WatchJobs")) == 2


def test_wait_times_out_with_a_timeout_error(api, client):
    client.submit(TRAINING)

    with pytest.raises(
        DeadlineExceededError, match=r"jobs/1 did not finish within 0\.2s"
    ) as caught:
        client.wait(1, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)


def test_logs_streams_the_ranks_output_in_chunks(api, client):
    running_job(api, 1)
    api.jobs.logs[(1, 0)] = b"step 1 loss 2.31\nstep 2 loss 2.12\n"
    api.jobs.logs[(1, 1)] = b"rank one\n"

    chunks = list(client.logs(1))

    assert len(chunks) > 1  # the fake sends 5 bytes at a time
    assert b"".join(chunks) == b"step 1 loss 2.31\nstep 2 loss 2.12\n"
    assert b"".join(client.logs(1, rank=1)) == b"rank one\n"
    assert b"".join(client.logs(1, offset=7)) == b"loss 2.31\nstep 2 loss 2.12\n"


def test_logs_of_missing_job_raises_not_found(client):
    with pytest.raises(NotFoundError):
        list(client.logs(5))


# -- nodes, leases, health ----------------------------------------------------------------


def test_nodes_walks_every_page_and_node_has_events(api, client):
    api.nodes.default_page_size = 2
    for name in ("gpu-03", "gpu-01", "gpu-02"):
        api.nodes.add(h100_node(name))

    assert [n.name for n in client.nodes()] == ["gpu-01", "gpu-02", "gpu-03"]
    node = client.node("gpu-02")
    assert node.profile.gpus[0].model == "H100 SXM"
    assert [e.type for e in node.events] == ["Registered"]


def test_drain_marks_the_node_draining(api, client):
    api.nodes.add(h100_node("gpu-01"))

    node = client.drain("gpu-01", reason="bad DIMM")

    assert (node.state, node.state_reason) == (nodes_pb2.NODE_STATE_DRAINING, "bad DIMM")
    with pytest.raises(NotFoundError, match="node gpu-09 not found"):
        client.drain("gpu-09")


def test_leases_leaves_out_released_unless_asked(api, client):
    active = leases_pb2.Lease(name="leases/a", node="gpu-01", state=leases_pb2.LEASE_STATE_ACTIVE)
    released = leases_pb2.Lease(
        name="leases/b", node="gpu-02", state=leases_pb2.LEASE_STATE_RELEASED
    )
    active.acquire_time.FromDatetime(FIXED_NOW)
    api.leases.leases.extend([active, released])

    assert [x.name for x in client.leases()] == ["leases/a"]
    assert [x.name for x in client.leases(include_released=True)] == ["leases/a", "leases/b"]


def test_health_reports_serving(client):
    assert client.health() == "SERVING"


def test_wait_rides_out_a_refused_watch(api, client):
    running_job(api, 1)
    api.fail_next("WatchJobs", grpc.StatusCode.RESOURCE_EXHAUSTED)
    api.jobs.after_watch_start.append(lambda: api.jobs.set_state(1, jobs_pb2.JOB_STATE_SUCCEEDED))
    assert client.wait(1, timeout=5).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert len(api.jobs.calls("WatchJobs")) == 2


def test_the_default_server_is_the_env_then_a_socket_on_this_host_then_loopback(
    tmp_path, monkeypatch
):
    from gpuctl.api import client as sdk

    monkeypatch.delenv("GPUCTL_SERVER", raising=False)
    monkeypatch.setattr(sdk, "DEFAULT_SOCKET", str(tmp_path / "run" / "gpuctld.sock"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sdk.default_target() == sdk.DEFAULT_TARGET
    personal = tmp_path / "home" / ".local" / "state" / "gpuctld" / "gpuctld.sock"
    personal.parent.mkdir(parents=True)
    personal.touch()
    assert sdk.default_target() == f"unix:{personal}"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "gpuctld.sock").touch()
    assert sdk.default_target() == f"unix:{tmp_path / 'run' / 'gpuctld.sock'}"
    monkeypatch.setenv("GPUCTL_SERVER", "head:50051")
    assert sdk.default_target() == "head:50051"


@pytest.mark.parametrize(
    ("call", "field", "says"),
    [
        (lambda c: c.scale(1, "3"), "replicas", "must be an integer, got '3'"),
        (lambda c: c.drain(5), "name", "must be text, got 5"),
        (lambda c: c.node(None), "name", "must be text, got None"),
        (lambda c: c.undrain(["a"]), "name", "must be text, got ['a']"),
        (lambda c: list(c.list(states=["sleeping"])), "states", "'sleeping' is not a job state"),
        (lambda c: list(c.list(states=5)), "states", "must be a list of job states, got 5"),
        (lambda c: list(c.list(states=[99])), "states", "99 is not a job state"),
        (lambda c: list(c.list(page_size="10")), "page_size", "must be an integer"),
        (lambda c: list(c.logs(1, rank="0")), "rank", "must be an integer, got '0'"),
        (lambda c: c.audit(limit=2.5), "limit", "must be an integer, got 2.5"),
        (lambda c: c.revoke_token(7), "id", "must be text, got 7"),
        (lambda c: c.submit({"kind": "training", "cpus": -2}), "cpus", "between 0 and 1024"),
        (lambda c: c.submit(123), "spec", "must be a JobSpec, a job-file mapping"),
        (lambda c: c.submit(None), "spec", "got None"),
        (lambda c: c.update(1, ["x"]), "spec", "got ['x']"),
        (lambda c: c.cost(by=5), "by", "must be job, queue or user, got 5"),
        (lambda c: c.cost(since="yesterday"), "since", "timezone-aware datetime"),
        (lambda c: c.audit(since="x"), "since", "timezone-aware datetime"),
        (lambda c: c.create_token(ttl=5), "ttl", "must be a timedelta, got 5"),
        (lambda c: c.create_node_token("n", ttl="1d"), "ttl", "must be a timedelta"),
        (lambda c: c.wait(1, timeout="5"), "timeout", "must be seconds"),
        (lambda c: list(c.watch(since_revision="x")), "since_revision", "must be an integer"),
    ],
)
def test_wrong_argument_types_are_invalid_argument_errors_naming_the_argument(call, field, says):
    # Nothing listens at this address: a call that were sent would fail UNAVAILABLE instead.
    with (
        Client(f"127.0.0.1:{free_port()}", token="t", timeout=2) as nowhere,
        pytest.raises(InvalidArgumentError) as e,
    ):
        call(nowhere)
    assert field in {v.field for v in e.value.violations}
    assert says in str(e.value)


def test_states_are_taken_as_the_cli_writes_them(api, client):
    running_job(api, 1)
    assert [j.id for j in client.list(states=["node-lost", "RUNNING"])] == [1]
