"""The HTTP endpoint gpuctld and the agent serve their Prometheus metrics on (`/metrics`, in
the client library's own exposition, text or OpenMetrics as the scraper asks), and gpuctld its
web page (`/ui`, runtime.webui, which signs its people in itself).

On a loopback address it is open, like the API's Unix socket is to the head node's people:
the figures are counts and rates, never job ids, env or secrets. On any other address it
needs TLS and a bearer token (`authorization` in Prometheus' scrape config), checked by the
caller's `authorize`; it refuses to start without them.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from gpuctl.core.errors import FieldViolation, InvalidArgument

log = logging.getLogger(__name__)


class Refused(Exception):
    """`authorize` says no: the status (401 or 403) and why, for the scraper's log."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSettings:
    listen: str  # HOST:PORT; port 0 picks a free one
    tls_cert_file: str = ""
    tls_key_file: str = ""
    where: str = "metrics.listen"  # the config key, for errors
    # False: a loopback address is held to the rules of any other (tests of those rules)
    open_on_loopback: bool = True

    @property
    def is_open(self) -> bool:
        return self.open_on_loopback and is_loopback(self.listen.rpartition(":")[0])

    def violations(self, *, can_authorize: bool) -> list[str]:
        _, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            return [f"{self.listen!r} is not HOST:PORT"]
        if self.is_open:
            return []
        out = []
        if not (self.tls_cert_file and self.tls_key_file):
            out.append(
                f"{self.listen} is reachable from other hosts: metrics there need TLS "
                "(a certificate and key)"
            )
        if not can_authorize:
            out.append(f"{self.listen} is reachable from other hosts: metrics there need a token")
        return out


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, 0.0.0.0 and :: are reachable from elsewhere


class _Quiet(WSGIRequestHandler):
    timeout = 10  # seconds a connection may take to send its request (and its TLS handshake)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every 15 s is not news


class _Server(ThreadingWSGIServer):
    def handle_error(self, request: object, client_address: tuple) -> None:
        # A client that hung up, spoke plain HTTP to TLS, or sent garbage: one line, no
        # traceback (socketserver's own prints one to stderr).
        log.debug("metrics request from %s failed: %s", client_address[0], sys.exc_info()[1])


class MetricsEndpoint:
    """Serves `registry` at /metrics in a thread of its own until `close`."""

    def __init__(
        self,
        settings: EndpointSettings,
        registry: CollectorRegistry,
        *,
        authorize: Callable[[str], None] | None = None,
        pages: Callable[[dict, Callable], Iterable[bytes]] | None = None,
    ) -> None:
        host, _, port = settings.listen.rpartition(":")
        problems = settings.violations(can_authorize=authorize is not None)
        if problems:
            raise InvalidArgument([FieldViolation(settings.where, p) for p in problems])
        open_ = settings.is_open
        metrics = make_wsgi_app(registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            try:
                if pages is not None and (path == "/ui" or path.startswith("/ui/")):
                    return pages(environ, start_response)  # signs its people in itself
            except Exception:  # a bug of ours: logged as one line, the page fails
                log.exception("serving %s failed", path[:200])
                return _reply(start_response, "500 Internal Server Error", "failed\n")
            if path not in ("/metrics", "/metrics/"):
                return _reply(start_response, "404 Not Found", "not found: try /metrics\n")
            if not open_ and authorize is not None:
                header = environ.get("HTTP_AUTHORIZATION", "")
                scheme, _, token = header.partition(" ")
                try:
                    if scheme.lower() != "bearer" or not token.strip():
                        raise Refused(401, "send a bearer token (Authorization: Bearer ...)")
                    authorize(token.strip())
                except Refused as e:
                    status = "401 Unauthorized" if e.status == 401 else "403 Forbidden"
                    return _reply(start_response, status, f"{e}\n")
            try:
                return metrics(environ, start_response)
            except Exception:  # a bug of ours: logged as one line, the scrape fails
                log.exception("collecting metrics failed")
                return _reply(start_response, "500 Internal Server Error", "collecting failed\n")

        try:
            self._httpd = make_server(
                host.strip("[]"), int(port), app, _Server, handler_class=_Quiet
            )
        except OSError as e:
            raise OSError(f"cannot serve metrics on {settings.listen}: {e.strerror}") from None
        if settings.tls_cert_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(Path(settings.tls_cert_file), Path(settings.tls_key_file))
            # The handshake happens in the request's thread, under `_Quiet.timeout`: a client
            # that connects and says nothing holds up no one else.
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: int = self._httpd.server_address[1]
        self.tls = bool(settings.tls_cert_file)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _reply(start_response: Callable, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]
