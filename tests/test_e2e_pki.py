"""Agents with certificates from gpuctld's own CA, as real processes: a one-time join token is
traded for a certificate naming the node (the key never leaves it), the agents' listener
requires such a certificate, and gpuctld's record of it can be revoked."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import trustme

from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api.pki import node_key_and_csr
from gpuctl.client import Client, jobs_pb2
from gpuctl.testbed import AgentSpec, LocalCluster
from tests.test_e2e import wait_until

pytestmark = pytest.mark.e2e

NODE = AgentSpec(name="pki-1", fake_gpus="l40s:2", fabric="eth/r1/t1", net="ethernet:1x100")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("pki") / "cluster", pki=True)
    try:
        c.start_daemon()
        c.start_agent(NODE)
        with c.client() as admin:
            wait_until(lambda: len(admin.nodes()) == 1, what="the agent to join and register")
        yield c
    finally:
        c.remove()


def credentials(cluster: LocalCluster, name: str) -> grpc.ChannelCredentials:
    where = cluster.root / "agents" / name / "credentials"
    return grpc.ssl_channel_credentials(
        root_certificates=(where / "ca.crt").read_bytes(),
        private_key=(where / "node.key").read_bytes(),
        certificate_chain=(where / "node.crt").read_bytes(),
    )


def test_a_joined_agent_runs_jobs_with_its_certificate(cluster):
    where = cluster.root / "agents" / NODE.name / "credentials"
    assert (where / "node.key").stat().st_mode & 0o777 == 0o600
    with cluster.client() as admin:
        job = admin.submit({"kind": "inference", "gpus_per_node": 1, "command": "true"})
        assert admin.wait(job, timeout=60).state == jobs_pb2.JOB_STATE_SUCCEEDED
    audit = json.loads(cluster.gpuctl("audit", "-o", "json").stdout)
    joined = [(e["action"], e["via"]) for e in audit if e["principal"] == NODE.name]
    assert ("JoinNode", "join-token") in joined and ("RegisterNode", "cert") in joined
    # The TCP listener speaks TLS with gpuctld's own certificate.
    secret = cluster.gpuctl("token", "create").stdout.strip()
    with Client(cluster.target, token=secret, ca_file=cluster.ca_file) as remote:
        assert remote.whoami().via == "token"


def test_a_join_token_works_once_and_only_for_its_node(cluster):
    token = cluster.gpuctl("node", "join-token", "pki-9").stdout.strip()
    _, csr = node_key_and_csr("pki-9")
    roots = grpc.ssl_channel_credentials(root_certificates=cluster.ca_file.read_bytes())
    with grpc.secure_channel(cluster.target, roots) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        bearer = (("authorization", f"Bearer {token}"),)
        reply = stub.JoinNode(agent_pb2.JoinNodeRequest(csr_pem=csr), metadata=bearer)
        assert reply.node_name == "pki-9" and b"BEGIN CERTIFICATE" in reply.certificate_pem
        with pytest.raises(grpc.RpcError) as e:
            stub.JoinNode(agent_pb2.JoinNodeRequest(csr_pem=csr), metadata=bearer)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # A join token is good for nothing else.
        other = cluster.gpuctl("node", "join-token", "pki-8").stdout.strip()
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(
                agent_pb2.HeartbeatRequest(node_name="pki-8"),
                metadata=(("authorization", f"Bearer {other}"),),
            )
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            stub.JoinNode(
                agent_pb2.JoinNodeRequest(csr_pem=b"not a csr"),
                metadata=(("authorization", f"Bearer {other}"),),
            )
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_an_agent_named_otherwise_than_its_token_refuses_to_start(cluster, tmp_path):
    token = cluster.gpuctl("node", "join-token", "pki-7").stdout.strip()
    run = subprocess.run(
        [sys.executable, "-m", "gpuctl.agent.main", "--name", "pki-6", "--fake-gpus", "l40s:1",
         "--state-dir", str(tmp_path / "state"), "--join", token, "--join-server", cluster.target,
         "--server", f"127.0.0.1:{cluster.agent_port}", "--ca-file", str(cluster.ca_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "the join token is for node 'pki-7', not 'pki-6'" in run.stderr


def test_the_agents_listener_takes_only_gpuctld_certificates_it_still_knows(cluster):
    heartbeat = agent_pb2.HeartbeatRequest(node_name=NODE.name)
    target = f"127.0.0.1:{cluster.agent_port}"
    # A certificate from another CA, naming the node: the handshake fails.
    forger = trustme.CA()
    fake = forger.issue_cert("pki-1.test", common_name="system:node:pki-1")
    forged = grpc.ssl_channel_credentials(
        root_certificates=cluster.ca_file.read_bytes(),
        private_key=fake.private_key_pem.bytes(),
        certificate_chain=fake.cert_chain_pems[0].bytes(),
    )
    with grpc.secure_channel(target, forged) as channel:
        with pytest.raises(grpc.RpcError) as e:
            agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(heartbeat, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    # No certificate at all: the same.
    plain = grpc.ssl_channel_credentials(root_certificates=cluster.ca_file.read_bytes())
    with grpc.secure_channel(target, plain) as channel:
        with pytest.raises(grpc.RpcError) as e:
            agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(heartbeat, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    # The real one works for its own node only, until revoked.
    with grpc.secure_channel(target, credentials(cluster, NODE.name)) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        stub.Heartbeat(heartbeat, timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(agent_pb2.HeartbeatRequest(node_name="pki-2"), timeout=5)
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
        listed = json.loads(
            cluster.gpuctl("token", "list", "--user", NODE.name, "-o", "json").stdout
        )
        (cert,) = [t for t in listed if t["kind"] == "cert" and "revokeTime" not in t]
        cluster.gpuctl("token", "revoke", cert["id"])
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(heartbeat, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_join_alone_stores_the_certificate_and_the_agent_then_starts_with_it(cluster, tmp_path):
    token = cluster.gpuctl("node", "join-token", "pki-5").stdout.strip()
    state = cluster.root / "agents" / "pki-5"
    run = subprocess.run(
        [sys.executable, "-m", "gpuctl.agent.main", "join", "--name", "pki-5",
         "--state-dir", str(state), "--join", token, "--join-server", cluster.target,
         "--server", f"127.0.0.1:{cluster.agent_port}", "--ca-file", str(cluster.ca_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "joined as pki-5" in run.stdout
    cluster.start_agent(
        AgentSpec(name="pki-5", fake_gpus="l40s:1", fabric="eth/r1/t1", net="ethernet:1x100")
    )  # no token given: it finds its certificate
    with cluster.client() as admin:
        wait_until(lambda: "pki-5" in {n.name for n in admin.nodes()}, what="pki-5")
