"""gpuctld as a real process: systemd readiness and watchdog over a real notify socket, graceful
SIGTERM, and a bad config refused in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc


@pytest.fixture
def notify_socket():
    # A short directory: unix socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(30)
        yield path, sock
        sock.close()


def start(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "gpuctl.runtime.daemon",
            "--listen", "127.0.0.1:0",
            "--state-dir", str(tmp_path / "state"),
            "--port-file", str(tmp_path / "port"),
            *extra,
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def test_ready_only_when_serving_then_watchdog_then_graceful_stop(tmp_path, notify_socket):
    path, sock = notify_socket
    proc = start(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=serving on 127.0.0.1:")
        # READY promises a bound port and an open store: both hold the moment it arrives.
        port = int((tmp_path / "port").read_text())
        assert first.endswith(f":{port}")
        assert (tmp_path / "state" / "gpuctld.db").exists()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Then it leads (the only gpuctld on its store), and pings every WATCHDOG_USEC / 2.
        assert sock.recv(4096) == b"STATUS=leading (epoch 1)"
        assert sock.recv(4096) == b"WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        messages = []
        while (msg := sock.recv(4096)) != b"STOPPING=1":
            messages.append(msg)
        assert set(messages) <= {b"WATCHDOG=1"}
        assert proc.wait(30) == 0
        assert "draining" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_state_dir_open_to_others_is_tightened_once_with_a_warning(tmp_path, notify_socket):
    """Outside systemd too: the store and rank logs hold jobs' secrets, so the directory is the
    daemon's alone, and the database files are 0600 whatever the umask it was started with."""
    path, sock = notify_socket
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    old_umask = os.umask(0)  # inherited by the daemon: the modes must not come from it
    try:
        proc = start(tmp_path, {"NOTIFY_SOCKET": path})
    finally:
        os.umask(old_umask)
    try:
        assert sock.recv(4096).startswith(b"READY=1")
        assert oct(state.stat().st_mode & 0o777) == oct(0o700)
        db_files = {p.name: oct(p.stat().st_mode & 0o777) for p in state.glob("gpuctld.db*")}
        assert db_files == dict.fromkeys(
            ("gpuctld.db", "gpuctld.db-wal", "gpuctld.db-shm", "gpuctld.db-writer"), oct(0o600)
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        warnings = [line for line in proc.stdout.read().splitlines() if "tightened" in line]
        assert len(warnings) == 1 and f"state directory {state} was mode 0755" in warnings[0]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ("[server]\nlisten = 5\n", "server.listen: must be str"),
        ("[server]\nlisen = '127.0.0.1:0'\n", "server.lisen: unknown setting"),
        ("[server\n", "not valid TOML"),
    ],
    ids=["wrong-type", "unknown-key", "bad-toml"],
)
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, config, expect):
    cfg = tmp_path / "gpuctld.toml"
    cfg.write_text(config)
    proc = subprocess.run(
        [sys.executable, "-m", "gpuctl.runtime.daemon", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert expect in proc.stderr


def test_the_shipped_config_is_valid_and_complete():
    from dataclasses import fields

    from gpuctl.runtime.config import _KEYS, DaemonConfig, load_config

    shipped = Path(__file__).parents[1] / "config" / "gpuctld.toml"
    assert load_config(shipped) == DaemonConfig()  # documents the defaults exactly
    text = shipped.read_text()
    for key in _KEYS:
        assert f"{key.split('.')[1]} =" in text, f"{key} is not documented in config/gpuctld.toml"
    assert set(_KEYS.values()) == {f.name for f in fields(DaemonConfig)}
