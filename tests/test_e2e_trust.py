"""The attacks of the trust issue, against gpuctld and an agent as real processes: every one is
refused with the right status and leaves the store as it was.

People come through the Unix socket (the kernel says who they are) or with API tokens; the
agent with a token bound to its node name.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
from datetime import timedelta

import grpc
import pytest

from gpuctl.api import convert
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2
from gpuctl.api.auth import auth_socket_path, fetch_session
from gpuctl.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from gpuctl.core.model import BandwidthProfile, Gpu, Node
from gpuctl.testbed import AgentSpec, LocalCluster
from tests.test_e2e import wait_until

pytestmark = pytest.mark.e2e

SECRET = "hf_s3cr3t-value-never-shown"
NODE = AgentSpec(
    name="train-1",
    fake_gpus="h100-sxm:8",
    fabric="ib-test/spine-1/leaf-1",
    net="infiniband:8x400",
    price_per_hour=20.0,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("trust") / "cluster")
    try:
        c.start_daemon()
        c.start_agent(NODE)
        with c.client() as admin:
            wait_until(lambda: len(admin.nodes()) == 1, what="the agent to register")
        yield c
    finally:
        c.remove()


def token(cluster: LocalCluster, *args: str) -> str:
    return cluster.gpuctl("token", "create", *args).stdout.strip()


def agent_stub(cluster: LocalCluster, node_token: str):
    channel = grpc.insecure_channel(cluster.target)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    return stub, (("authorization", f"Bearer {node_token}"),)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def long_job(client: Client, **extra) -> jobs_pb2.Job:
    spec = {
        "kind": "inference",
        "gpus_per_node": 1,
        "command": [sys.executable, "-c", "import time; time.sleep(60)"],
        **extra,
    }
    return client.submit(spec)


def running(client: Client, job_id: int) -> jobs_pb2.Job:
    return wait_until(
        lambda: (j := client.get(job_id)).state == jobs_pb2.JOB_STATE_RUNNING and j,
        what=f"job {job_id} to run",
    )


def test_identity_comes_from_the_socket_or_a_token_never_from_a_header(cluster):
    me = pwd.getpwuid(os.geteuid()).pw_name
    with cluster.client() as admin:
        who = admin.whoami()
        assert (who.user, who.role, who.via, who.uid) == (me, "admin", "unix", os.geteuid())
    # The old way: a header naming any user. Now it names no one.
    with grpc.insecure_channel(cluster.target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        request = jobs_pb2.CreateJobRequest(
            spec=jobs_pb2.JobSpec(kind=jobs_pb2.JOB_KIND_INFERENCE, command=["id"])
        )
        assert (
            code_of(lambda: stub.CreateJob(request, metadata=[("x-gpuctl-user", "postgres")]))
            is grpc.StatusCode.UNAUTHENTICATED
        )
    with (
        Client(cluster.target, token="gpuctl.0000000000000000.forged") as forged,
        pytest.raises(UnauthenticatedError),
    ):
        list(forged.list())
    with Client(cluster.target, token=token(cluster, "--user", "bob")) as bob:
        assert (bob.whoami().user, bob.whoami().role) == ("bob", "user")


def test_a_token_works_until_it_is_revoked_then_at_once_not(cluster):
    secret = token(cluster, "--description", "laptop", "--ttl", "1h")
    with Client(cluster.target, token=secret) as laptop:
        assert laptop.whoami().via == "token"
        (mine,) = [t for t in laptop.tokens() if t.description == "laptop"]
        assert secret not in json.dumps(cluster.gpuctl("token", "list", "-o", "json").stdout)
        laptop.revoke_token(mine.id)
        with pytest.raises(UnauthenticatedError):
            laptop.whoami()


def test_system_accounts_never_run_jobs(cluster):
    with Client(cluster.target, token=token(cluster, "--user", "postgres")) as pg:
        with pytest.raises(PermissionDeniedError) as e:
            pg.submit({"kind": "inference", "gpus_per_node": 1, "command": "id"})
        assert "system account" in str(e.value)
        assert e.value.permission == "run-as"
    with cluster.client() as admin:
        assert not [j for j in admin.list() if j.owner == "postgres"]


def test_users_act_on_their_own_jobs_only_and_never_see_others_env(cluster):
    with cluster.client() as admin:
        job = long_job(admin, env={"WANDB_KEY": "mine"}, secret_env={"HF_TOKEN": SECRET})
        running(admin, job.id)
        own = admin.get(job.id)
        assert own.spec.env["WANDB_KEY"] == "mine"
        assert own.spec.env["HF_TOKEN"] == "<secret>"  # even to its owner
        assert own.placement.ranks[0].env["HF_TOKEN"] == "<secret>"
    bob_token = token(cluster, "--user", "bob")
    with Client(cluster.target, token=bob_token) as bob:
        for act in (bob.get, bob.cancel, lambda j: list(bob.logs(j))):
            with pytest.raises(PermissionDeniedError) as e:
                act(job.id)
            assert e.value.permission == "jobs.all"
        assert [j.id for j in bob.list()] == []  # his own: none
        with pytest.raises(PermissionDeniedError):
            list(bob.list(owner=pwd.getpwuid(os.geteuid()).pw_name))
        with pytest.raises(PermissionDeniedError) as e:
            bob.drain(NODE.name)
        assert e.value.permission == "nodes.manage"
    with cluster.client() as admin:
        assert admin.get(job.id).state == jobs_pb2.JOB_STATE_RUNNING  # untouched
        shown = cluster.gpuctl("describe", str(job.id), "-o", "json").stdout
        assert SECRET not in shown
        admin.cancel(job.id)
    assert SECRET not in cluster.log("gpuctld")
    audit = cluster.gpuctl("audit", "-o", "json").stdout
    denied = [e for e in json.loads(audit) if e["principal"] == "bob"]
    assert {(e["action"], e["outcome"]) for e in denied} >= {
        ("CancelJob", "PERMISSION_DENIED"),
        ("DrainNode", "PERMISSION_DENIED"),
    }


def test_an_impostor_node_can_act_for_no_other_node(cluster):
    with cluster.client() as admin:
        job = long_job(admin)
        rank = running(admin, job.id).placement.ranks[0]
        before = admin.node(NODE.name)
    impostor = cluster.gpuctl("node", "token", "node-x").stdout.strip()
    stub, creds = agent_stub(cluster, impostor)
    fake = Node(
        id=NODE.name,
        address="10.6.6.6",
        fabric=NODE.fabric,
        profile=BandwidthProfile(
            gpus=tuple(
                Gpu(index=i, uuid=f"GPU-{i}", model="H100", memory_mib=81920, hbm_gbps=3350)
                for i in range(16)
            )
        ),
    )
    register = agent_pb2.RegisterNodeRequest(node=convert.node_to_pb(fake))
    ref = agent_pb2.RankRef(job_id=job.id, rank=rank.rank, attempt=0)
    attacks = {
        "re-register a real node with 16 GPUs": lambda: stub.RegisterNode(register, metadata=creds),
        "heartbeat for it with a made-up issue": lambda: stub.Heartbeat(
            agent_pb2.HeartbeatRequest(node_name=NODE.name, health_issues=["gpu 0: fell off"]),
            metadata=creds,
        ),
        "report its rank succeeded": lambda: stub.ReportRankStatus(
            agent_pb2.ReportRankStatusRequest(
                node_name=NODE.name, ref=ref, state=jobs_pb2.RANK_STATE_EXITED, exit_code=0
            ),
            metadata=creds,
        ),
        "push lines into its log": lambda: stub.PushLogs(
            agent_pb2.PushLogsRequest(node_name=NODE.name, ref=ref, data=b"pwned\n"),
            metadata=creds,
        ),
        "push them as itself": lambda: stub.PushLogs(
            agent_pb2.PushLogsRequest(node_name="node-x", ref=ref, data=b"pwned\n"),
            metadata=creds,
        ),
        "use the user API": lambda: jobs_pb2_grpc.JobServiceStub(
            grpc.insecure_channel(cluster.target)
        ).ListJobs(jobs_pb2.ListJobsRequest(), metadata=creds),
    }
    codes = {what: code_of(attack) for what, attack in attacks.items()}
    assert codes == {what: grpc.StatusCode.PERMISSION_DENIED for what in attacks}
    with cluster.client() as admin:
        after = admin.node(NODE.name)
        assert (after.address, len(after.profile.gpus), after.state) == (
            before.address,
            8,
            nodes_pb2.NODE_STATE_READY,
        )
        assert admin.get(job.id).state == jobs_pb2.JOB_STATE_RUNNING
        assert b"pwned" not in b"".join(admin.logs(job.id))
        admin.cancel(job.id)


def test_a_replaced_node_token_stops_working(cluster):
    first = cluster.gpuctl("node", "token", "node-y").stdout.strip()
    stub, creds = agent_stub(cluster, first)
    heartbeat = agent_pb2.HeartbeatRequest(node_name="node-y")
    assert stub.Heartbeat(heartbeat, metadata=creds).reregister  # known token, unknown node
    cluster.gpuctl("node", "token", "node-y")
    assert code_of(lambda: stub.Heartbeat(heartbeat, metadata=creds)) is (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_operators_drain_and_undrain(cluster):
    with cluster.client() as admin:
        assert admin.drain(NODE.name, "fan").state == nodes_pb2.NODE_STATE_DRAINING
        assert admin.undrain(NODE.name).state == nodes_pb2.NODE_STATE_READY


def test_oversized_specs_and_too_many_streams_are_refused_and_others_go_on(cluster):
    with Client(cluster.target, token=token(cluster, "--user", "mallory")) as mallory:
        with pytest.raises(InvalidArgumentError) as e:
            mallory.submit(
                {"kind": "inference", "gpus_per_node": 0, "command": "true", "env": {"BLOB": "x" * 60_000} | {
                    f"K{i}": "y" * 60_000 for i in range(60)
                }}
            )  # fmt: skip
        assert "spec: is" in str(e.value) and "at most 262144" in str(e.value)
        job = mallory.submit({"kind": "inference", "gpus_per_node": 0, "command": "true"})
        streams = [mallory.watch(job, timeout=30) for _ in range(4)]
        for s in streams:
            next(s)  # its first message: the stream holds a slot while it runs
        with pytest.raises(ResourceExhaustedError) as e:
            next(mallory.watch(timeout=30))
        assert e.value.retry_delay == 5.0
        for s in streams:
            s.close()
    with cluster.client() as admin:
        assert admin.health() == "SERVING"
        assert admin.nodes()[0].state == nodes_pb2.NODE_STATE_READY


def test_a_user_on_the_socket_is_who_the_kernel_says(cluster):
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another account")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no account 'nobody' here")
    cluster.run_dir.chmod(0o755)  # let the other account reach the socket
    # A child that becomes `nobody` asks the auth socket who it is: the kernel answers.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            answer = fetch_session(auth_socket_path(cluster.socket))
            os.write(write, json.dumps(dict(answer)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    assert (answer["user"], answer["role"]) == ("nobody", "user")
    with Client(cluster.target, token=answer["token"]) as as_nobody:
        me = as_nobody.whoami()
        assert (me.user, me.via, me.uid) == ("nobody", "unix", nobody.pw_uid)
        with pytest.raises(PermissionDeniedError) as e:
            as_nobody.submit({"kind": "inference", "gpus_per_node": 1, "command": "id"})
        assert "system account" in str(e.value)


def test_unknown_objects_and_bad_ttls_are_plain_errors(cluster):
    with cluster.client() as admin:
        with pytest.raises(NotFoundError):
            admin.revoke_token("feedfacefeedface")
        with pytest.raises(InvalidArgumentError):
            admin.create_token(ttl=timedelta(days=10_000))
