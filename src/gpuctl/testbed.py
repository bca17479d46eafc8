"""A whole gpuctl cluster on one machine: gpuctld and agents with simulated GPUs as real
processes on loopback ports. `make demo` and the end-to-end tests are built on it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuctl.api.client import Client
from gpuctl.api.pki import write_private

FAST_CONFIG = """\
[run_as]
# A test bed is one person's: their own account runs the jobs, whatever its uid (root in CI).
allow = ["{user}"]

[nodes]
heartbeat_interval_s = 0.3
heartbeat_timeout_s = 10.0
check_interval_s = 1.0

[scheduler]
interval_s = 1.0

[jobs]
kill_grace_s = 2.0
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSpec:
    name: str
    fake_gpus: str
    fabric: str
    net: str
    sku: str = ""
    price_per_hour: float = 0.0
    cpus: int = 64
    memory: str = "512GiB"

    def args(self) -> list[str]:
        return [
            "--name", self.name,
            "--address", "127.0.0.1",
            "--fake-gpus", self.fake_gpus,
            "--fabric", self.fabric,
            "--net", self.net,
            "--sku", self.sku or self.fake_gpus,
            "--price-per-hour", str(self.price_per_hour),
            "--cpus", str(self.cpus),
            "--memory", self.memory,
        ]  # fmt: skip


@dataclass
class LocalCluster:
    """Starts and stops gpuctld and agents under `root`; every process logs to a file there."""

    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    # pki: gpuctld makes its own CA; its TCP listener speaks TLS, and agents join with a
    # one-time token for a certificate and use the agents' mTLS listener, as in production.
    # Otherwise agents use node tokens over plain loopback TCP.
    pki: bool = False
    agent_port: int = 0
    # Several clusters given one PostgreSQL store_url and their own ha_name are several gpuctld
    # of one control plane (one leads, the others stand by).
    store_url: str = ""
    ha_name: str = ""
    # metrics: gpuctld serves Prometheus metrics on a loopback port of its choosing
    metrics: bool = False
    metrics_port: int = 0
    # Unix socket paths hold 107 bytes: the socket lives in a short directory of its own.
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpuctl-")))

    @property
    def target(self) -> str:
        """The TCP listener (loopback, plain): agents use it, with their node tokens."""
        return f"127.0.0.1:{self.port}"

    @property
    def socket(self) -> Path:
        return self.run_dir / "gpuctld.sock"

    @property
    def local(self) -> str:
        """The head node's socket: the CLI and SDK use it, as whoever runs them."""
        return f"unix:{self.socket}"

    def client(self, **kwargs) -> Client:
        return Client(self.local, **kwargs)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_daemon(self, *, timeout: float = 20.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "gpuctld.toml"
        if not config.exists():
            text = FAST_CONFIG.replace("{user}", pwd.getpwuid(os.geteuid()).pw_name)
            text += "\n[tls]\nself_signed = true\n" if self.pki else ""
            text += f'\n[ha]\nname = "{self.ha_name}"\n' if self.ha_name else ""
            config.write_text(text)
        port_file = self.root / "gpuctld.port"
        port_file.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.port}"  # the same port again after a restart
        proc = self._spawn(
            "gpuctld",
            [
                sys.executable, "-m", "gpuctl.runtime.daemon",
                "--config", str(config),
                "--listen", listen,
                "--state-dir", str(self.root / "state"),
                "--socket", str(self.socket),
                *(["--agent-listen", f"127.0.0.1:{self.agent_port}"] if self.pki else []),
                *(["--store-url", self.store_url] if self.store_url else []),
                "--port-file", str(port_file),
                *(["--metrics-listen", "127.0.0.1:0"] if self.metrics else []),
            ],
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"gpuctld exited with {proc.returncode}; see {self.root / 'gpuctld.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"gpuctld did not start in {timeout}s; see {self.root / 'gpuctld.log'}"
                )
            time.sleep(0.05)
        ports = port_file.read_text().split()
        self.port = int(ports[0])
        self.agent_port = int(ports[1]) if self.pki else 0
        self.metrics_port = int(ports[2]) if self.metrics else 0
        self.wait_serving(timeout)

    def wait_serving(self, timeout: float) -> None:
        with grpc.insecure_channel(self.local) as channel:  # health is open to all
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True
            )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"gpuctld health is {reply.status}")

    def node_token(self, name: str) -> Path:
        """A credential for node `name`'s agent, made as an operator would (`gpuctl node
        token`), in a 0600 file."""
        path = self.root / "agents" / f"{name}.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, self.gpuctl("node", "token", name).stdout.strip().encode() + b"\n")
        return path

    @property
    def ca_file(self) -> Path:
        """gpuctld's own CA certificate (pki clusters)."""
        return self.root / "state" / "pki" / "ca.crt"

    def start_agent(
        self,
        spec: AgentSpec,
        *,
        token_file: Path | None = None,
        server: str = "",
        extra: Sequence[str] = (),
    ) -> None:
        """An agent of this cluster; `server` overrides the daemon address it is given (e.g.
        every head's address, for failover)."""
        state = self.root / "agents" / spec.name
        if self.pki and token_file is None and not (state / "credentials").exists():
            # As an operator would: a one-time join token, and the CA for the agent to pin.
            ca = self.root / "agents" / "ca.crt"
            ca.parent.mkdir(parents=True, exist_ok=True)
            join = self.gpuctl("node", "join-token", spec.name, "--ca-out", str(ca)).stdout
            credential = [
                "--join",
                join.strip(),
                "--join-server",
                self.target,
                "--ca-file",
                str(ca),
            ]
        elif self.pki and token_file is None:
            credential = []  # joined before: its certificate is under its state dir
        else:
            credential = ["--token-file", str(token_file or self.node_token(spec.name))]
        server = server or (
            f"127.0.0.1:{self.agent_port}" if self.pki and token_file is None else self.target
        )
        self._spawn(
            f"agent-{spec.name}",
            [
                sys.executable,
                "-m",
                "gpuctl.agent.main",
                "--server",
                server,
                "--state-dir",
                str(state),
                *credential,
                *spec.args(),
                *extra,
                # Jobs are submitted as the user running the test bed, and the agents refuse
                # to run root's jobs unless told: the whole cluster is that one user's.
                *(["--allow-root-jobs"] if os.geteuid() == 0 else []),
                # A test bed's agents take their ranks down with them: nothing outlives it.
                "--stop-ranks-on-exit",
            ],
        )

    def gpuctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the `gpuctl` CLI against this cluster."""
        return subprocess.run(
            [sys.executable, "-m", "gpuctl.cli.main", "--server", self.local, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def stop_all(self) -> None:
        # Agents first, so they stop their ranks and report while the daemon still listens.
        for name in sorted(self.procs, key=lambda n: n == "gpuctld"):
            self.stop(name)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        self.stop_all()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


class Partition:
    """A loopback TCP relay to `target` ("127.0.0.1:PORT") that can be cut, both ways and every
    connection at once, and mended: a network partition between an agent and gpuctld, for the
    end-to-end tests and `bench_nodeloss`. Listens on 127.0.0.1 only."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open = True
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name="partition", daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._open = False
            conns, self._conns = self._conns, []
        for c in conns:
            _shut(c)

    def mend(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        _shut(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                if not self._open:
                    _shut(client)
                    _shut(server)
                    continue
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    _shut(src)
    _shut(dst)


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
