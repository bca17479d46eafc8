"""An API worker's calls for gpuctld itself: the ones a worker does not serve go, as they came
(the caller's credentials, deadline and bytes), to gpuctld's main process over its private
socket, and the answer comes back as gpuctld gave it (status, details, RetryInfo). gpuctld
authenticates and authorizes the caller as on any call; the worker adds only where the call
came from, for the audit trail, under a secret gpuctld handed it (a local user on the people's
socket cannot pose as another address)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc

# Metadata a worker adds to a call it passes on: "<secret> <the caller's address>".
FORWARDED = "x-gpuctl-forwarded"
# The calls an API worker serves itself: they read the store or only insert into it, and take
# nothing the cycle holds. Everything else (changes to jobs, nodes, tokens, the agents' calls,
# watches and logs) goes to gpuctld.
SERVED_HERE = frozenset(
    {
        "/gpuctl.v1.JobService/CreateJob",
        "/gpuctl.v1.JobService/GetJob",
        "/gpuctl.v1.JobService/ListJobs",
    }
)
# gRPC's own headers, which a call sets by itself.
_TRANSPORT = frozenset({"user-agent", "te", "content-type"})


def peer_of(context: Any, secret: str) -> str:
    """Where a call came from: the address a worker vouches for with `secret` when the call
    came through one, else the call's own peer."""
    peer = context.peer() or ""
    if not secret or not peer.startswith("unix:"):
        return peer
    for key, value in context.invocation_metadata() or ():
        if key == FORWARDED and isinstance(value, str):
            given, _, origin = value.partition(" ")
            if hmac.compare_digest(given.encode(), secret.encode()):
                return origin[:256]
    return peer


def _passed_on(metadata: Iterable[tuple[str, Any]] | None, secret: str, peer: str) -> list:
    kept = [
        (k, v)
        for k, v in metadata or ()
        if k not in _TRANSPORT and k != FORWARDED and not k.startswith((":", "grpc-"))
    ]
    kept.append((FORWARDED, f"{secret} {peer}"))
    return kept


class Forwarder:
    """Handlers that pass a call on to gpuctld, on the worker's event loop (no thread: the
    worker only waits)."""

    def __init__(self, socket: Path, secret: str, *, max_message_bytes: int) -> None:
        self.target = f"unix:{socket}"
        self.secret = secret
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes + (64 << 10)),
            ("grpc.max_send_message_length", max_message_bytes + (64 << 10)),
        ]
        self._channel: grpc.aio.Channel | None = None

    def _chan(self) -> grpc.aio.Channel:
        if self._channel is None:  # made on the loop that uses it
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        return self._channel

    def handler(self, method: str, streaming: bool) -> grpc.RpcMethodHandler:
        """A handler of raw bytes for `method`, unary or answering with a stream."""

        def call_args(context) -> dict[str, Any]:
            return {
                "metadata": _passed_on(context.invocation_metadata(), self.secret, context.peer()),
                "timeout": context.time_remaining(),
            }

        if streaming:

            async def stream(request: bytes, context) -> AsyncIterator[bytes]:
                call = self._chan().unary_stream(method)(request, **call_args(context))
                try:
                    async for item in call:
                        yield item
                except grpc.aio.AioRpcError as e:
                    await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context) -> bytes:
            try:
                return await self._chan().unary_unary(method)(request, **call_args(context))
            except grpc.aio.AioRpcError as e:
                await _abort(context, e)
                raise  # not reached: abort raises

        return grpc.unary_unary_rpc_method_handler(unary)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


async def _abort(context, error: grpc.aio.AioRpcError) -> None:
    trailing = tuple((k, v) for k, v in error.trailing_metadata() or () if k != FORWARDED)
    await context.abort(error.code(), error.details() or "", trailing)
