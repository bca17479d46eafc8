"""Readiness probes of inference replicas, run by the agent against the replica's own port on
this node ($GPUCTL_PORT): an HTTP GET of a path (2xx or 3xx: ready) or a TCP connect. No user
code runs for a probe, and it only ever reaches this host."""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass

PROBE_TIMEOUT_S = 0.5  # per probe: a replica that is up answers a loopback call at once
HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Readiness:
    port: int
    http_path: str = ""  # "": a TCP connect
    tcp: bool = False

    @classmethod
    def of(cls, port: int, http_path: str, tcp: bool) -> Readiness | None:
        """The probe an assignment asks for; None when it asks for none."""
        if not 0 < port < 65536 or not (http_path or tcp):
            return None
        return cls(port=port, http_path=http_path, tcp=tcp and not http_path)

    def passes(self, *, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        if not self.http_path:
            try:
                socket.create_connection((HOST, self.port), timeout=timeout_s).close()
            except OSError:
                return False
            return True
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        try:
            conn.request("GET", self.http_path, headers={"User-Agent": "gpuctl-agent"})
            return 200 <= conn.getresponse().status < 400
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
