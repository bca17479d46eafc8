"""sd_notify against real unix datagram sockets: the exact bytes systemd would receive."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpuctl.runtime import sdnotify
from gpuctl.runtime.sdnotify import Notifier, watchdog_interval


class Listener:
    """Plays the service manager's end of `$NOTIFY_SOCKET`."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # as written in NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(5)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096)


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    # Not tmp_path: sun_path holds 108 bytes, and pytest's per-test directories can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp:
        path = str(Path(tmp) / "notify")
        listener = Listener(path, path)
        yield listener
        listener.sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"gpuctl-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    listener = Listener("@" + name, "\0" + name)
    yield listener
    listener.sock.close()


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        pytest.param(lambda n: n.ready(), b"READY=1", id="ready"),
        pytest.param(
            lambda n: n.ready("serving on :50051"),
            b"READY=1\nSTATUS=serving on :50051",
            id="ready-with-status",
        ),
        pytest.param(lambda n: n.stopping(), b"STOPPING=1", id="stopping"),
        pytest.param(lambda n: n.watchdog(), b"WATCHDOG=1", id="watchdog"),
        pytest.param(lambda n: n.status("3 jobs running"), b"STATUS=3 jobs running", id="status"),
        # A newline in the text must not smuggle in a second assignment (here: READY=1).
        pytest.param(
            lambda n: n.status("draining\nREADY=1"), b"STATUS=draining READY=1", id="one-line"
        ),
        pytest.param(lambda n: n.status("GPU ✓"), "STATUS=GPU ✓".encode(), id="utf-8"),
        pytest.param(
            lambda n: n.notify("RELOADING=1\nMONOTONIC_USEC=1"),
            b"RELOADING=1\nMONOTONIC_USEC=1",
            id="raw",
        ),
    ],
)
def test_notifier_sends_exact_bytes(
    path_listener: Listener, send: Callable[[Notifier], bool], expected: bytes
) -> None:
    assert send(Notifier(path_listener.env)) is True
    assert path_listener.recv() == expected


def test_abstract_namespace_socket(abstract_listener: Listener) -> None:
    assert sdnotify.ready("up", env=abstract_listener.env) is True
    assert abstract_listener.recv() == b"READY=1\nSTATUS=up"


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        pytest.param(lambda env: sdnotify.notify("READY=1", env=env), b"READY=1", id="notify"),
        pytest.param(lambda env: sdnotify.ready("ok", env=env), b"READY=1\nSTATUS=ok", id="ready"),
        pytest.param(lambda env: sdnotify.stopping(env=env), b"STOPPING=1", id="stopping"),
        pytest.param(lambda env: sdnotify.watchdog(env=env), b"WATCHDOG=1", id="watchdog"),
        pytest.param(lambda env: sdnotify.status("x", env=env), b"STATUS=x", id="status"),
    ],
)
def test_module_functions(
    path_listener: Listener, send: Callable[[dict[str, str]], bool], expected: bytes
) -> None:
    assert send(path_listener.env) is True
    assert path_listener.recv() == expected


def test_datagrams_arrive_in_order(path_listener: Listener) -> None:
    notifier = Notifier(path_listener.env)
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    assert [path_listener.recv() for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_no_socket_is_not_an_error(path_listener: Listener, env: dict[str, str]) -> None:
    notifier = Notifier(env)
    assert notifier.enabled is False
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert sdnotify.notify("READY=1", env=env) is False
    path_listener.assert_empty()


def test_none_env_reads_the_environment_at_call_time(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.address)
    assert sdnotify.ready() is True
    assert path_listener.recv() == b"READY=1"


def test_missing_socket_raises() -> None:
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp:
        notifier = Notifier({"NOTIFY_SOCKET": str(Path(tmp) / "gone")})
        assert notifier.enabled is True
        with pytest.raises(OSError):
            notifier.ready()


def test_unsupported_address_raises() -> None:
    with pytest.raises(OSError, match="unsupported"):
        Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).ready()


def test_empty_state_is_refused(path_listener: Listener) -> None:
    with pytest.raises(ValueError):
        Notifier(path_listener.env).notify("")


OUR_PID = 4242


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": ""}, None, id="empty"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "-5"}, None, id="negative"),
        pytest.param({"WATCHDOG_USEC": "30s"}, None, id="not-a-number"),
        # WatchdogSec=30s → WATCHDOG_USEC=30000000 → ping every 30 s / 2 = 15 s.
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="30s-no-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0, id="empty-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0, id="our-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None, id="bad-pid"),
        # 1 ms → 0.5 ms: sub-second timeouts keep their precision.
        pytest.param({"WATCHDOG_USEC": "1000"}, 0.0005, id="1ms"),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=OUR_PID) == expected
    assert Notifier(env, pid=OUR_PID).watchdog_interval == expected


def test_watchdog_interval_defaults_to_our_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
