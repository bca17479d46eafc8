"""An in-process API server with real authentication, and tokens for the people and nodes of a
test: alice and bob are users, olga an operator, ada an admin; every node name gets its own
node token on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from gpuctl.api.auth import AUTH_METADATA, Authenticator, SessionBook, bearer, mint_token
from gpuctl.api.limits import Limits, LimitSettings
from gpuctl.api.server import ApiServer, Listeners
from gpuctl.api.servicers import Guard
from gpuctl.core.trust import RolePolicy, RunAsPolicy, TokenKind
from gpuctl.runtime.controller import Controller

ROLES = RolePolicy(operators=frozenset({"olga"}), admins=frozenset({"ada"}))
# Test users have no accounts on this host; the run-as rules let them through by name.
RUN_AS = RunAsPolicy(allow=frozenset({"alice", "bob", "olga", "ada"}))


def guard_for(controller: Controller, *, limits: LimitSettings | None = None, **kwargs) -> Guard:
    return Guard(
        auth=Authenticator(
            controller.store, roles=ROLES, sessions=SessionBook(), now=controller.clock.now
        ),
        limits=Limits(limits or LimitSettings(workers=32, agent_reserve=4, max_streams=8)),
        runas=kwargs.pop("runas", RUN_AS),
        **kwargs,
    )


@dataclass
class Tokens:
    """Bearer tokens minted straight into the store, one per principal."""

    controller: Controller
    minted: dict[tuple[str, str], str] = field(default_factory=dict)

    def user(self, name: str) -> str:
        return self._get(TokenKind.USER, name)

    def node(self, name: str) -> str:
        return self._get(TokenKind.NODE, name)

    def _get(self, kind: TokenKind, name: str) -> str:
        key = (kind.value, name)
        if key not in self.minted:
            secret, record = mint_token(kind, name, now=datetime.now(UTC), created_by="test")
            self.controller.store.put_token(record)
            self.minted[key] = secret
        return self.minted[key]

    def metadata(self, token: str) -> tuple[tuple[str, str], ...]:
        return bearer(token)


def serve(controller: Controller, **kwargs) -> ApiServer:
    server = ApiServer(
        controller,
        guard_for(
            controller,
            **{
                k: v
                for k, v in kwargs.items()
                if k not in ("watch_poll_s", "observer", "inline_reads")
            },
        ),
        Listeners(tcp="127.0.0.1:0"),
        watch_poll_s=kwargs.get("watch_poll_s", 0.05),
        observer=kwargs.get("observer"),
        inline_reads=kwargs.get("inline_reads", True),
    )
    server.start()
    return server


class AsCaller(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a bearer token to every call: a node's own for the agent API (the node named in
    the request), `user`'s for the rest."""

    def __init__(self, tokens: Tokens, user: str) -> None:
        self.tokens, self.user = tokens, user

    def _details(self, details, request):
        if any(k == AUTH_METADATA for k, _ in details.metadata or ()):
            return details  # the test chose whom to call as
        if details.method.startswith("/gpuctl.agent.v1."):
            name = getattr(request, "node_name", "") or request.node.name
            token = self.tokens.node(name)
        else:
            token = self.tokens.user(self.user)
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self.tokens.metadata(token)),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details, request), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details, request), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details, None), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
