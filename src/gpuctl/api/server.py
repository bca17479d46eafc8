"""Builds the gRPC server: the gpuctl services, standard health checking and reflection, on a
Unix socket for the head node and on TCP (TLS where configured)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

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
from gpuctl.api.forward import SERVED_HERE, Forwarder
from gpuctl.api.lanes import Lanes
from gpuctl.api.limits import BUSY, BUSY_RETRY_S
from gpuctl.api.servicers import (
    DEFAULT_PAGE_SIZE,
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

T = TypeVar("T")

MAX_MESSAGE_BYTES = 4 << 20  # a request's or reply's largest, less gRPC's framing
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
    # gpuctld's private socket for its API workers' calls (api.forward); None: no workers.
    internal: Path | None = None
    # Share `tcp`'s port with other processes of the same user (gpuctld and its API workers:
    # the kernel spreads connections over them).
    reuse_port: bool = False


class CallObserver(Protocol):
    """Told of every call answered (gpuctld's metrics): `method` as `JobService/CreateJob`,
    `code` as `OK` or `NOT_FOUND`."""

    def call(self, method: str, code: str, seconds: float) -> None:
        """A unary call answered after `seconds`."""

    def stream(self, method: str, code: str) -> None:
        """A streaming call ended."""


class _Aborted(Exception):
    """A handler ended its call (`SyncContext.abort`); the loop sends the status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class SyncContext:
    """The part of a sync `grpc.ServicerContext` the servicers use, over a `grpc.aio` call's
    context: the same servicers run on the loop's thread or on a lane's. `abort` raises; the
    loop then ends the call with that status (an aio context's abort is a coroutine)."""

    __slots__ = ("_code", "_ctx", "_details", "_over")

    def __init__(self, ctx: grpc.aio.ServicerContext) -> None:
        self._ctx = ctx
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._over = False  # the loop is done with the call (its caller may have gone)

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self._code = code
        raise _Aborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self._code = status.code
        raise _Aborted(status.code, status.details, tuple(status.trailing_metadata or ()))

    def set_code(self, code: grpc.StatusCode) -> None:  # the generated "unimplemented"
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def peer(self) -> str:
        return self._ctx.peer()

    def invocation_metadata(self):
        return self._ctx.invocation_metadata()

    def auth_context(self):
        return self._ctx.auth_context()

    def time_remaining(self) -> float | None:
        return self._ctx.time_remaining()

    def is_active(self) -> bool:
        # A caller that goes away cancels the loop's task; the context does not say so.
        return not (self._over or self._ctx.done() or self._ctx.cancelled())

    def over(self) -> None:
        self._over = True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._ctx.add_done_callback(lambda _ctx: callback())
        return True


class _Edge(grpc.aio.ServerInterceptor):
    """What every call meets before a servicer: a request that is not a valid message of its
    type gets INVALID_ARGUMENT (gRPC itself would answer INTERNAL), and reflection, which
    lists every method and message, needs credentials. Health stays open: load balancers and
    systemd checks carry none. Then each call goes where it runs (api.lanes): the loop's
    thread for the reads in `inline`, else a lane's thread."""

    def __init__(
        self,
        auth: Authenticator,
        lanes: Lanes,
        observer: CallObserver | None = None,
        inline: Mapping[str, Callable[[Any], bool]] | None = None,
        forward: Forwarder | None = None,
    ) -> None:
        self.auth = auth
        self.lanes = lanes
        self.observer = observer
        self.inline = inline or {}
        self.forward = forward  # in an API worker: where the calls it does not serve go

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.reflection."):
            try:
                self.auth.from_metadata(details.invocation_metadata)
            except GpuctlError as e:
                message = str(e)

                async def refuse(_requests, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

                return grpc.stream_stream_rpc_method_handler(refuse)
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # reflection's own (it runs on the loop)
        if (
            self.forward is not None
            and details.method not in SERVED_HERE
            and not details.method.startswith("/grpc.health.")
        ):
            return self.forward.handler(details.method, handler.response_streaming)
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = _refusing_malformed(getattr(handler, kind))
        people = not details.method.startswith(_OWN_LANE)
        method = details.method.rsplit(".", 1)[-1]
        if handler.response_streaming:
            wrapped = _stream(behavior, self.lanes, people, method, self.observer)
        else:
            inline = self.inline.get(details.method)
            wrapped = _unary(behavior, self.lanes, people, inline, method, self.observer)
        return handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer), **{kind: wrapped}
        )


# Agents' calls and health checks: never behind people's, never refused for them.
_OWN_LANE = ("/gpuctl.agent.v1.AgentService/", "/grpc.health.v1.Health/")
# Reads that only read the store (never the controller's lock, never the network) run on the
# loop's thread where the store is a local file: a handoff to a thread and back costs more
# than the read. The same GetJob work, 32 in flight from 4 client processes on 2 cores:
# 1,690 calls/s on the loop, 1,180 on a thread of the loop's, 990 on a sync server's threads.
# Which calls of them: a page of at most the default size (a page of 1,000 jobs would hold
# every other call's dispatch, heartbeats' too, for tens of milliseconds).
INLINE_READS: Mapping[str, Callable[[Any], bool]] = MappingProxyType(
    {
        "/gpuctl.v1.JobService/GetJob": lambda request: True,
        "/gpuctl.v1.JobService/ListJobs": lambda request: request.page_size <= DEFAULT_PAGE_SIZE,
    }
)
_END = object()


def _unary(
    behavior,
    lanes: Lanes,
    people: bool,
    inline: Callable[[Any], bool] | None,
    method: str,
    observer: CallObserver | None,
):
    async def unary(request, context):
        sync = SyncContext(context)
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            if inline is not None and (isinstance(request, _Malformed) or inline(request)):
                reply = behavior(request, sync)  # a malformed one is refused at once
            elif people and not lanes.admit():
                reply = _busy(request, sync)
            else:
                reply = await asyncio.wrap_future(lanes.call(people, behavior, request, sync))
            code = "OK"
            return reply
        except _Aborted as a:
            code = a.code.name
            await context.abort(a.code, a.details, a.trailing)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            failed = sync.code()
            if failed is None:
                raise  # gRPC logs it and answers UNKNOWN
            code = failed.name
            await context.abort(failed, sync.details())
        finally:
            if observer is not None:  # refusals for load are answers too
                observer.call(method, code, time.perf_counter() - started)

    return unary


def _stream(behavior, lanes: Lanes, people: bool, method: str, observer: CallObserver | None):
    """A streaming handler (a generator) steps on a lane's thread: each step may wait, for a
    change to watch or a log line; a people's call stays admitted from start to end."""

    async def stream(request, context):
        sync = SyncContext(context)
        if people and not lanes.admit():
            try:
                _busy(request, sync)
            except _Aborted as a:
                if observer is not None:
                    observer.stream(method, a.code.name)
                await context.abort(a.code, a.details, a.trailing)
        code = "UNKNOWN"
        steps = None
        step: futures.Future | None = None
        try:
            step = lanes.step(people, _open, behavior, request, sync)
            steps = await asyncio.wrap_future(step)
            while True:
                step = lanes.step(people, next, steps, _END)
                item = await asyncio.wrap_future(step)
                if item is _END:
                    break
                yield item
            # A stream that ends because its caller went away (cancelled, or past its
            # deadline) returns like one that is done.
            code = "OK" if sync.is_active() else "CANCELLED"
        except _Aborted as a:
            code = a.code.name
            await context.abort(a.code, a.details, a.trailing)
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away
            code = "CANCELLED"
            raise
        finally:
            # The generator is closed (its `finally` runs) once its last step is back: a step
            # waiting for a change sees the call over at its next look.
            sync.over()
            try:
                lanes.step(people, _close, step, steps, lanes if people else None)
            except RuntimeError:  # the server stopped: its threads take no more work
                if people:
                    lanes.done()
            if observer is not None:
                observer.stream(method, code)

    return stream


def _open(behavior, request, context):
    return iter(behavior(request, context))


def _close(step: futures.Future | None, steps, lanes: Lanes | None) -> None:
    try:
        if step is not None:
            futures.wait([step])
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    finally:
        if lanes is not None:
            lanes.done()


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
    """The daemon's gRPC server; `health` flips to NOT_SERVING when draining.

    A `grpc.aio` server on an event loop of its own thread: gRPC's work for every call and
    the reads in `INLINE_READS` (with `inline_reads`) run there, the other handlers on the
    threads of `lanes`. With a sync server each call crossed threads four times (gRPC's poller,
    a pool thread, back), most of what a GetJob cost. Reads run inline only where they cannot
    block: on a local store file, and with no OIDC keys to fetch while authenticating."""

    def __init__(
        self,
        controller: Controller,
        guard: Guard,
        listeners: Listeners,
        *,
        sessions: SessionBook | None = None,
        watch_poll_s: float = 0.5,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        observer: CallObserver | None = None,
        inline_reads: bool = True,
        forward: Forwarder | None = None,
    ) -> None:
        workers = guard.limits.settings.workers
        reserve = guard.limits.settings.agent_reserve
        self.lanes = Lanes(people=workers - reserve, others=reserve)
        # A handler waiting for its write to commit lets the next one run (api.lanes.Gate).
        controller.store.before_waiting(self.lanes.gate.leave)
        edge = _Edge(
            guard.auth, self.lanes, observer, INLINE_READS if inline_reads else None, forward
        )
        self.forward = forward
        servicers = (
            (jobs_pb2_grpc.add_JobServiceServicer_to_server, JobServicer(
                controller, guard, poll_s=watch_poll_s
            )),
            (nodes_pb2_grpc.add_NodeServiceServicer_to_server, NodeServicer(controller, guard)),
            (leases_pb2_grpc.add_LeaseServiceServicer_to_server, LeaseServicer(controller, guard)),
            (auth_pb2_grpc.add_AuthServiceServicer_to_server, AuthServicer(controller, guard)),
            (agent_pb2_grpc.add_AgentServiceServicer_to_server, AgentServicer(controller, guard)),
        )  # fmt: skip
        self.health = health.HealthServicer()
        self.socket = listeners.socket
        self.internal = listeners.internal
        self.issuer: PeerCredIssuer | None = None
        if listeners.socket is not None or listeners.internal is not None:
            paths = [listeners.internal] if listeners.internal is not None else []
            if listeners.socket is not None:
                paths += [listeners.socket, auth_socket_path(listeners.socket)]
            for p in paths:
                if len(str(p).encode()) > MAX_SOCKET_PATH:
                    raise OSError(f"socket path {p} is longer than {MAX_SOCKET_PATH} bytes")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )
        self._thread.start()

        async def build() -> grpc.aio.Server:
            server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", int(listeners.reuse_port)),
                    ("grpc.max_receive_message_length", max_message_bytes + (64 << 10)),
                    ("grpc.max_send_message_length", max_message_bytes + (64 << 10)),
                ],
                # Past this many calls queued or running, gRPC refuses at once
                # (RESOURCE_EXHAUSTED) instead of queueing without end; the lanes and the
                # guard's own limits answer first.
                maximum_concurrent_rpcs=workers * 4,
                interceptors=[edge],
            )
            for add, servicer in servicers:
                add(servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            return server

        try:
            self.server = self._on_loop(build())
            self.port = 0
            if listeners.tcp:
                tls = listeners.tls_cert and grpc.ssl_server_credentials(
                    [(listeners.tls_key, listeners.tls_cert)]
                )
                self.port = self._listen(listeners.tcp, tls or None)
            self.agent_port = 0
            if listeners.agent_tcp:
                creds = grpc.ssl_server_credentials(
                    [(listeners.tls_key, listeners.tls_cert)],
                    root_certificates=listeners.agent_ca,
                    require_client_auth=True,
                )
                self.agent_port = self._listen(listeners.agent_tcp, creds)
            if listeners.socket is not None:
                path = listeners.socket
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                self._listen(f"unix:{path}", None, what=f"the Unix socket {path}")
                if sessions is not None:
                    self.issuer = PeerCredIssuer(auth_socket_path(path), sessions, guard.auth.roles)
            if listeners.internal is not None:  # in the private state directory: ours alone
                listeners.internal.unlink(missing_ok=True)
                self._listen(
                    f"unix:{listeners.internal}", None, what=f"the socket {listeners.internal}"
                )
        except BaseException:
            self._stop_loop()
            raise

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _listen(self, address: str, creds, *, what: str = "") -> int:
        try:
            if creds is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, creds)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {what or address}: address in use or not valid")
        return port

    def start(self) -> None:
        self._on_loop(self.server.start())
        if self.socket is not None:
            os.chmod(self.socket, 0o666)  # anyone on the head node; the kernel says who
        if self.issuer is not None:
            self.issuer.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace_s: float) -> None:
        """Stop taking new RPCs, let in-flight ones finish within `grace_s`, then stop (once:
        a second drain does nothing)."""
        if self._loop.is_closed():
            return
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.issuer is not None:
            self.issuer.stop()
        try:
            self._on_loop(self.server.stop(grace_s), timeout=grace_s + 5)
            if self.forward is not None:
                self._on_loop(self.forward.close(), timeout=5)
        finally:
            self.lanes.shutdown()
            self._stop_loop()
        for path in (self.socket, self.internal):
            if path is not None:
                path.unlink(missing_ok=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        for name in SERVICE_NAMES:
            self.health.set(name, status)
