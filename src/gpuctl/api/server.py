"""Builds the gRPC server: the gpuctl services, standard health checking and reflection, on a
Unix socket for the head node and on TCP (TLS where configured)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
from gpuctl.api.auth import Authenticator, PeerCredIssuer, SessionBook, auth_socket_path
from gpuctl.api.lanes import Gate, Lanes, PeopleCall
from gpuctl.api.limits import BUSY, BUSY_RETRY_S
from gpuctl.api.servicers import (
    AgentServicer,
    AuthServicer,
    Guard,
    JobServicer,
    LeaseServicer,
    NodeServicer,
)
from gpuctl.api.status import abort
from gpuctl.core.errors import GpuctlError, ResourceExhausted

if TYPE_CHECKING:
    from gpuctl.runtime.controller import Controller

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
SERVICE_NAMES = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    leases_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Listeners:
    """Where the API is served: a Unix socket on the head node (identity from the kernel) and
    TCP, with TLS where a certificate is given (plain TCP only on loopback, or by choice)."""

    tcp: str = ""  # HOST:PORT; "": none
    socket: Path | None = None
    tls_cert: bytes = b""  # PEM; empty: plain TCP
    tls_key: bytes = b""
    # Agents with certificates from gpuctld's CA: TLS that requires one (gRPC cannot ask for
    # a client certificate without requiring it, so this is a listener of its own).
    agent_tcp: str = ""
    agent_ca: bytes = b""


class CallObserver(Protocol):
    """Told of every call answered (gpuctld's metrics): `method` as `JobService/CreateJob`,
    `code` as `OK` or `NOT_FOUND`."""

    def call(self, method: str, code: str, seconds: float) -> None:
        """A unary call answered after `seconds`."""

    def stream(self, method: str, code: str) -> None:
        """A streaming call ended."""


class _Edge(grpc.ServerInterceptor):
    """What every call meets before a servicer: a request that is not a valid message of its
    type gets INVALID_ARGUMENT (gRPC itself would answer INTERNAL), and reflection, which
    lists every method and message, needs credentials. Health stays open: load balancers and
    systemd checks carry none."""

    def __init__(
        self, auth: Authenticator, gate: Gate | None = None, observer: CallObserver | None = None
    ) -> None:
        self.auth = auth
        self.gate = gate
        self.observer = observer

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.reflection."):
            try:
                self.auth.from_metadata(details.invocation_metadata)
            except GpuctlError as e:
                message = str(e)

                def refuse(_requests, context):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

                return grpc.stream_stream_rpc_method_handler(refuse)
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = _refusing_malformed(getattr(handler, kind))
        if not details.method.startswith(_OWN_LANE):  # a person's call (see api.lanes)
            behavior = PeopleCall(behavior, _busy, self.gate)
        if self.observer is not None:  # outermost: refusals for load are answers too
            method = details.method.rsplit(".", 1)[-1]
            observe = _observed_stream if handler.response_streaming else _observed
            behavior = observe(behavior, method, self.observer)
        return handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer), **{kind: behavior}
        )


# Agents' calls and health checks: never behind people's, never refused for them.
_OWN_LANE = ("/gpuctl.agent.v1.AgentService/", "/grpc.health.v1.Health/")


def _code(context, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name


def _observed(behavior, method: str, observer: CallObserver):
    def observed(request, context):
        started = time.perf_counter()
        failed = True
        try:
            reply = behavior(request, context)
            failed = False
            return reply
        finally:
            observer.call(method, _code(context, failed), time.perf_counter() - started)

    return observed


def _observed_stream(behavior, method: str, observer: CallObserver):
    def observed(request, context):
        code = ""
        try:
            yield from behavior(request, context)
            # A stream that ends because its caller went away (cancelled, or past its
            # deadline) returns like one that is done.
            code = _code(context, failed=False) if context.is_active() else "CANCELLED"
        except GeneratorExit:  # the caller went away while the stream waited to send
            code = "CANCELLED"
            raise
        finally:
            observer.stream(method, code or _code(context, failed=True))

    return observed


def _busy(_request, context):
    abort(context, ResourceExhausted(BUSY, retry_after_s=BUSY_RETRY_S))


@dataclass(frozen=True, slots=True)
class _Malformed:
    error: str


def _tolerant(parse):
    def tolerant(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError, and whatever a bad varint raises
            return _Malformed(str(e) or type(e).__name__)

    return tolerant


def _refusing_malformed(behavior):
    def refusing(request, context):
        if isinstance(request, _Malformed):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid message of its type: {request.error}",
            )
        return behavior(request, context)

    return refusing


class ApiServer:
    """The daemon's gRPC server; `health` flips to NOT_SERVING when draining."""

    def __init__(
        self,
        controller: Controller,
        guard: Guard,
        listeners: Listeners,
        *,
        sessions: SessionBook | None = None,
        watch_poll_s: float = 0.5,
        max_message_bytes: int = 4 << 20,
        observer: CallObserver | None = None,
    ) -> None:
        workers = guard.limits.settings.workers
        reserve = guard.limits.settings.agent_reserve
        self.lanes = Lanes(people=workers - reserve, others=reserve)
        # A handler waiting for its write to commit lets the next one run (api.lanes.Gate).
        controller.store.before_waiting(self.lanes.gate.leave)
        self.server = grpc.server(
            self.lanes,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", max_message_bytes + (64 << 10)),
                ("grpc.max_send_message_length", max_message_bytes + (64 << 10)),
            ],
            # Past this many calls queued or running, gRPC refuses at once (RESOURCE_EXHAUSTED)
            # instead of queueing without end; the guard's own limits answer first.
            maximum_concurrent_rpcs=workers * 4,
            interceptors=[_Edge(guard.auth, self.lanes.gate, observer)],
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(controller, guard, poll_s=watch_poll_s), self.server
        )
        nodes_pb2_grpc.add_NodeServiceServicer_to_server(
            NodeServicer(controller, guard), self.server
        )
        leases_pb2_grpc.add_LeaseServiceServicer_to_server(
            LeaseServicer(controller, guard), self.server
        )
        auth_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(controller, guard), self.server
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(controller, guard), self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self.socket = listeners.socket
        self.issuer: PeerCredIssuer | None = None
        if listeners.tcp:
            if listeners.tls_cert:
                creds = grpc.ssl_server_credentials([(listeners.tls_key, listeners.tls_cert)])
                self.port = self.server.add_secure_port(listeners.tcp, creds)
            else:
                self.port = self.server.add_insecure_port(listeners.tcp)
            if self.port == 0:
                raise OSError(f"cannot listen on {listeners.tcp}: address in use or not valid")
        self.agent_port = 0
        if listeners.agent_tcp:
            creds = grpc.ssl_server_credentials(
                [(listeners.tls_key, listeners.tls_cert)],
                root_certificates=listeners.agent_ca,
                require_client_auth=True,
            )
            self.agent_port = self.server.add_secure_port(listeners.agent_tcp, creds)
            if self.agent_port == 0:
                raise OSError(
                    f"cannot listen on {listeners.agent_tcp}: address in use or not valid"
                )
        if listeners.socket is not None:
            path = listeners.socket
            for p in (path, auth_socket_path(path)):
                if len(str(p).encode()) > MAX_SOCKET_PATH:
                    raise OSError(f"socket path {p} is longer than {MAX_SOCKET_PATH} bytes")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            if self.server.add_insecure_port(f"unix:{path}") == 0:
                raise OSError(f"cannot listen on the Unix socket {path}")
            if sessions is not None:
                self.issuer = PeerCredIssuer(auth_socket_path(path), sessions, guard.auth.roles)

    def start(self) -> None:
        self.server.start()
        if self.socket is not None:
            os.chmod(self.socket, 0o666)  # anyone on the head node; the kernel says who
        if self.issuer is not None:
            self.issuer.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace_s: float) -> None:
        """Stop taking new RPCs, let in-flight ones finish within `grace_s`, then stop."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.issuer is not None:
            self.issuer.stop()
        self.server.stop(grace_s).wait(grace_s + 1)
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        for name in SERVICE_NAMES:
            self.health.set(name, status)
