"""Authentication and authorization in-process: the role table, every RPC's owner, tokens,
sessions from the Unix socket, OIDC JWTs checked against a provider's keys, run-as rules,
call limits and what env a viewer may see."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gpuctl.api import servicers
from gpuctl.api._pb.agent.v1 import agent_pb2
from gpuctl.api._pb.v1 import auth_pb2, jobs_pb2, jobs_pb2_grpc, leases_pb2, nodes_pb2
from gpuctl.api.auth import (
    TOKEN_CACHE_TTL,
    Authenticator,
    JwtVerifier,
    SessionBook,
    mint_token,
)
from gpuctl.api.limits import Limits, LimitSettings
from gpuctl.core.errors import ResourceExhausted
from gpuctl.core.plugins import build_policy
from gpuctl.core.trust import (
    HIDDEN_SHOWN_AS,
    ROLE_PERMISSIONS,
    SECRET_SHOWN_AS,
    Permission,
    Principal,
    QueueGrants,
    Role,
    RunAsPolicy,
    TokenKind,
    Unauthenticated,
    visible_env,
)
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.sql import open_store
from tests.auth_rig import ROLES, Tokens, serve

SERVICES = {
    "gpuctl.v1.JobService": (servicers.JobServicer, jobs_pb2),
    "gpuctl.v1.NodeService": (servicers.NodeServicer, nodes_pb2),
    "gpuctl.v1.LeaseService": (servicers.LeaseServicer, leases_pb2),
    "gpuctl.v1.AuthService": (servicers.AuthServicer, auth_pb2),
    "gpuctl.agent.v1.AgentService": (servicers.AgentServicer, agent_pb2),
}


def methods():
    for service, (_, module) in SERVICES.items():
        for m in module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods:
            yield service, m


@pytest.fixture
def controller(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    c = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1 << 20),
    )
    yield c
    store.close()


@pytest.fixture
def api(controller):
    server = serve(controller)
    yield server, Tokens(controller)
    server.drain(0)


def call(server, method: str, token: str | None, request: bytes = b"", timeout: float = 5):
    """A raw call: the request as bytes, so every method can be reached the same way."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        stub = channel.unary_unary(method, lambda b: b, lambda b: b)
        stream = channel.unary_stream(method, lambda b: b, lambda b: b)
        try:
            if method.endswith(("WatchJobs", "StreamJobLogs")):
                for _ in stream(request, timeout=timeout, metadata=metadata):
                    break
            else:
                stub(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK


def test_roles_nest_and_nodes_can_use_the_agent_api_only():
    assert ROLE_PERMISSIONS[Role.USER] < ROLE_PERMISSIONS[Role.OPERATOR]
    assert ROLE_PERMISSIONS[Role.OPERATOR] < ROLE_PERMISSIONS[Role.ADMIN]
    assert ROLE_PERMISSIONS[Role.NODE] == {Permission.AGENT}
    assert not any(Permission.AGENT in ROLE_PERMISSIONS[r] for r in (Role.USER, Role.ADMIN))


@pytest.mark.parametrize(
    ("service", "method"), list(methods()), ids=lambda x: getattr(x, "name", x)
)
def test_every_rpc_declares_who_may_call_it(service, method):
    servicer = SERVICES[service][0]
    handler = getattr(servicer, method.name)
    assert hasattr(handler, "permission"), f"{method.name} is not wrapped by servicers.rpc"
    if method.name != "WhoAmI":  # any authenticated caller may ask who they are
        assert isinstance(handler.permission, Permission)


@pytest.mark.parametrize(
    ("service", "method"), list(methods()), ids=lambda x: getattr(x, "name", x)
)
def test_every_rpc_refuses_calls_without_credentials(api, service, method):
    server, _ = api
    path = f"/{service}/{method.name}"
    assert call(server, path, None) is grpc.StatusCode.UNAUTHENTICATED
    assert call(server, path, "gpuctl.abc.def") is grpc.StatusCode.UNAUTHENTICATED
    assert call(server, path, "not a token at all") is grpc.StatusCode.UNAUTHENTICATED


MATRIX = [
    # method, request, who: code (OK where the request reaches the handler and it answers)
    ("/gpuctl.v1.NodeService/DrainNode", nodes_pb2.DrainNodeRequest(name="n"),
     {"alice": "PERMISSION_DENIED", "olga": "NOT_FOUND", "ada": "NOT_FOUND", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.v1.LeaseService/ListLeases", leases_pb2.ListLeasesRequest(),
     {"alice": "PERMISSION_DENIED", "olga": "OK", "ada": "OK", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.v1.LeaseService/GetCost", leases_pb2.GetCostRequest(),
     {"alice": "PERMISSION_DENIED", "olga": "OK", "ada": "OK", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.v1.AuthService/ListAudit", auth_pb2.ListAuditRequest(),
     {"alice": "PERMISSION_DENIED", "olga": "OK", "ada": "OK", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.v1.AuthService/CreateToken", auth_pb2.CreateTokenRequest(user="bob"),
     {"alice": "PERMISSION_DENIED", "olga": "PERMISSION_DENIED", "ada": "OK", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.v1.AuthService/CreateNodeToken", auth_pb2.CreateNodeTokenRequest(node="n2"),
     {"alice": "PERMISSION_DENIED", "olga": "OK", "ada": "OK", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.v1.JobService/ListJobs", jobs_pb2.ListJobsRequest(owner="bob"),
     {"alice": "PERMISSION_DENIED", "olga": "OK", "ada": "OK", "node:n": "PERMISSION_DENIED"}),
    ("/gpuctl.agent.v1.AgentService/Heartbeat", agent_pb2.HeartbeatRequest(node_name="n"),
     {"alice": "PERMISSION_DENIED", "olga": "PERMISSION_DENIED", "ada": "PERMISSION_DENIED", "node:n": "OK", "node:m": "PERMISSION_DENIED"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "request_msg", "expected"), MATRIX, ids=[m[0].rsplit("/", 1)[1] for m in MATRIX]
)
def test_each_role_may_do_what_its_permissions_say(api, method, request_msg, expected):
    server, tokens = api
    for who, code in expected.items():
        kind, _, name = who.rpartition(":")
        token = tokens.node(name) if kind == "node" else tokens.user(name)
        got = call(server, method, token, request_msg.SerializeToString())
        assert got.name == code, f"{who} calling {method}"


def test_a_revoked_or_expired_token_stops_working_at_once(controller):
    clock = controller.clock
    auth = Authenticator(controller.store, roles=ROLES, sessions=SessionBook(), now=clock.now)
    secret, record = mint_token(
        TokenKind.USER, "alice", now=clock.now(), created_by="alice", ttl=timedelta(hours=1)
    )
    controller.store.put_token(record)
    assert auth.principal_of(secret).name == "alice"
    kept = controller.store.get_token(record.id)  # only a hash of the secret is kept
    assert secret.rsplit(".", 1)[1] not in repr(kept)
    assert kept.secret_hash == hashlib.sha256(secret.rsplit(".", 1)[1].encode()).hexdigest()
    clock.advance(timedelta(hours=1))
    with pytest.raises(Unauthenticated):
        auth.principal_of(secret)
    secret2, record2 = mint_token(TokenKind.USER, "alice", now=clock.now(), created_by="alice")
    controller.store.put_token(record2)
    assert auth.principal_of(secret2).role is Role.USER
    controller.store.put_token(dataclasses.replace(record2, revoked_at=clock.now()))
    with pytest.raises(Unauthenticated):
        auth.principal_of(secret2)
    with pytest.raises(Unauthenticated):
        auth.principal_of(secret2[:-1] + ("A" if secret2[-1] != "A" else "B"))


def test_another_gpuctlds_revocation_takes_effect_within_the_token_cache_ttl(controller, tmp_path):
    """Token records are kept a second: a revocation through this store ends the token at once
    (above), one through another gpuctld's store (a standby, `gpuctl token revoke` there)
    within TOKEN_CACHE_TTL."""
    clock = controller.clock
    auth = Authenticator(controller.store, roles=ROLES, sessions=SessionBook(), now=clock.now)
    secret, record = mint_token(TokenKind.USER, "alice", now=clock.now(), created_by="alice")
    controller.store.put_token(record)
    assert auth.principal_of(secret).name == "alice"
    other = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        other.put_token(dataclasses.replace(record, revoked_at=clock.now()))
    finally:
        other.close()
    assert auth.principal_of(secret).name == "alice"  # from the cache
    clock.advance(TOKEN_CACHE_TTL)
    with pytest.raises(Unauthenticated):
        auth.principal_of(secret)


def test_sessions_lapse_and_each_uid_keeps_only_its_newest():
    now = [0.0]
    book = SessionBook(ttl_s=60, clock=lambda: now[0])
    who = Principal(name="alice", role=Role.USER, via="unix", uid=1001)
    first = book.issue(who)
    assert book.lookup(first) == who
    now[0] = 61
    assert book.lookup(first) is None
    tokens = [book.issue(who) for _ in range(70)]
    assert book.lookup(tokens[0]) is None  # pushed out by the 64 newer ones
    assert book.lookup(tokens[-1]) == who
    assert book.lookup("gpuctl-session.forged") is None


@pytest.mark.parametrize(
    ("policy", "account", "uid", "refused"),
    [
        pytest.param(RunAsPolicy(), "alice", 1001, "", id="a-person"),
        pytest.param(RunAsPolicy(), "alice", None, "", id="no-account-on-the-head-node"),
        pytest.param(RunAsPolicy(), "root", 0, "system account", id="root"),
        pytest.param(RunAsPolicy(), "toor", 0, "below min_uid", id="root-by-another-name"),
        pytest.param(RunAsPolicy(), "postgres", 101, "system account", id="a-service"),
        pytest.param(RunAsPolicy(), "svc", 999, "below min_uid", id="a-low-uid"),
        pytest.param(RunAsPolicy(allow=frozenset({"root"})), "root", 0, "", id="demo-allows-its-user"),
    ],
)  # fmt: skip
def test_run_as_rules(policy, account, uid, refused):
    why = policy.refusal(account, uid)
    assert (refused in why) if refused else why == ""


def test_run_as_map_sends_a_person_to_their_account():
    assert RunAsPolicy(map={"alice@corp": "alice"}).account_for("alice@corp") == "alice"


@pytest.mark.parametrize(
    ("owner", "shown"),
    [
        pytest.param(True, {"A": "1", "TOKEN": SECRET_SHOWN_AS, "GPUCTL_JOB_ID": "7"}, id="owner"),
        pytest.param(False, {"A": HIDDEN_SHOWN_AS, "TOKEN": SECRET_SHOWN_AS, "GPUCTL_JOB_ID": "7"}, id="other"),
    ],
)  # fmt: skip
def test_env_a_viewer_sees(owner, shown):
    env = {"A": "1", "TOKEN": "s3cret", "GPUCTL_JOB_ID": "7"}
    assert visible_env(env, frozenset({"A", "TOKEN"}), frozenset({"TOKEN"}), owner=owner) == shown


def test_limits_cap_streams_per_caller_and_overall_and_keep_threads_for_agents():
    limits = Limits(LimitSettings(workers=12, agent_reserve=2, max_streams=5, streams_per_caller=2))
    alice, bob = (Principal(name=n, role=Role.USER, via="token") for n in ("alice", "bob"))
    node = Principal(name="n1", role=Role.NODE, via="node-token")
    limits.acquire(alice, stream=True)
    limits.acquire(alice, stream=True)
    with pytest.raises(ResourceExhausted) as e:
        limits.acquire(alice, stream=True)
    assert e.value.retry_after_s == 5.0
    for _ in range(3):
        limits.acquire(Principal(name=f"u{_}", role=Role.USER, via="token"), stream=True)
    with pytest.raises(ResourceExhausted):
        limits.acquire(bob, stream=True)  # 5 streams open: the most
    for _ in range(5):
        limits.acquire(bob, stream=False)  # 10 of 12 threads: people's share is full
    with pytest.raises(ResourceExhausted):
        limits.acquire(bob, stream=False)
    limits.acquire(node, stream=False)  # agents still get through
    limits.release(alice, stream=True)
    limits.acquire(bob, stream=False)
    assert LimitSettings(workers=8, agent_reserve=4, max_streams=8).violations()


class _Jwks(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def provider():
    """An identity provider on loopback: its signing key and where its JWKS is served."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    _Jwks.body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield key, f"http://127.0.0.1:{server.server_port}/jwks"
    server.shutdown()


def _jwt(key, **claims):
    now = int(time.time())
    base = {"iss": "https://idp.test", "aud": "gpuctl", "exp": now + 300, "iat": now,
            "preferred_username": "carol", "groups": ["ml-ops"]}  # fmt: skip
    return jwt.encode({**base, **claims}, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        pytest.param({}, True, id="valid"),
        pytest.param({"aud": "someone-else"}, False, id="wrong-audience"),
        pytest.param({"iss": "https://evil.test"}, False, id="wrong-issuer"),
        pytest.param({"exp": int(time.time()) - 10}, False, id="expired"),
        pytest.param({"preferred_username": None}, False, id="no-user-claim"),
    ],
)
def test_oidc_tokens_are_checked_against_the_providers_keys(controller, provider, claims, ok):
    key, url = provider
    verifier = JwtVerifier(issuer="https://idp.test", audience="gpuctl", jwks_url=url)
    roles = ROLES.__class__(operator_groups=frozenset({"ml-ops"}))
    auth = Authenticator(
        controller.store, roles=roles, sessions=SessionBook(), now=lambda: datetime.now(UTC),
        jwt=verifier,
    )  # fmt: skip
    token = _jwt(key, **{k: v for k, v in claims.items() if v is not None})
    if claims.get("preferred_username", "") is None:
        payload = jwt.decode(token, options={"verify_signature": False})
        payload.pop("preferred_username")
        token = jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})
    if ok:
        who = auth.principal_of(token)
        assert (who.name, who.role, who.via) == ("carol", Role.OPERATOR, "oidc")
    else:
        with pytest.raises(Unauthenticated):
            auth.principal_of(token)


def test_a_jwt_signed_by_another_key_is_refused(controller, provider):
    _, url = provider
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = JwtVerifier(issuer="https://idp.test", audience="gpuctl", jwks_url=url)
    auth = Authenticator(
        controller.store, roles=ROLES, sessions=SessionBook(), now=lambda: datetime.now(UTC),
        jwt=verifier,
    )  # fmt: skip
    with pytest.raises(Unauthenticated):
        auth.principal_of(_jwt(forger))


def test_a_team_queue_lets_its_members_act_on_its_jobs_but_not_see_their_env(controller):
    server = serve(controller, queues=QueueGrants(members={"research": frozenset({"bob"})}))
    tokens = Tokens(controller)
    alice, bob = (tokens.metadata(tokens.user(n)) for n in ("alice", "bob"))
    spec = dict(kind=jobs_pb2.JOB_KIND_TRAINING, command=["train"], gpus_per_node=8)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            team = jobs.CreateJob(
                jobs_pb2.CreateJobRequest(
                    spec=jobs_pb2.JobSpec(**spec, queue="research", env={"K": "v"})
                ),
                metadata=alice,
            )
            own = jobs.CreateJob(
                jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(**spec)), metadata=alice
            )
            seen = jobs.GetJob(jobs_pb2.GetJobRequest(name=team.name), metadata=bob)
            assert seen.spec.env["K"] == HIDDEN_SHOWN_AS
            with pytest.raises(grpc.RpcError) as e:
                jobs.GetJob(jobs_pb2.GetJobRequest(name=own.name), metadata=bob)
            assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
            listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(queue="research"), metadata=bob)
            assert [j.id for j in listed.jobs] == [team.id]
            assert list(jobs.ListJobs(jobs_pb2.ListJobsRequest(), metadata=bob).jobs) == []
            other_queue = jobs.ListJobs(jobs_pb2.ListJobsRequest(queue="default"), metadata=bob)
            assert list(other_queue.jobs) == []  # his own there: none
            cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(name=team.name), metadata=bob)
            assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    finally:
        server.drain(0)


@pytest.mark.parametrize(
    ("method", "request_msg", "field"),
    [
        pytest.param("ListTokens", auth_pb2.ListTokensRequest(user="x" * 5000), "user", id="tokens"),
        pytest.param("ListAudit", auth_pb2.ListAuditRequest(principal="a b"), "principal", id="audit"),
        pytest.param("RevokeToken", auth_pb2.RevokeTokenRequest(id="x" * 65), "id", id="revoke"),
        pytest.param("CreateToken", auth_pb2.CreateTokenRequest(description="d" * 300), "description", id="description"),
    ],
)  # fmt: skip
def test_auth_requests_out_of_bounds_are_invalid_argument_naming_the_field(
    api, method, request_msg, field
):
    server, tokens = api
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = channel.unary_unary(f"/gpuctl.v1.AuthService/{method}", lambda b: b, lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            stub(request_msg.SerializeToString(), metadata=tokens.metadata(tokens.user("ada")))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
