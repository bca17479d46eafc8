"""The systemd notification protocol (sd_notify(3)), written out by hand: one datagram per call.

Tells the service manager when the daemon is ready, stopping, or still alive (watchdog). The
composition root passes the environment in; nothing here reads `os.environ` at import time.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping

__all__ = [
    "Notifier",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]


def _socket_address(raw: str) -> bytes | None:
    """The sockaddr for `$NOTIFY_SOCKET`: a path, or '@name' for the Linux abstract namespace."""
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    # systemd ≥ 254 also hands out `vsock:` addresses (for VMs); a daemon on a head node never
    # sees one, so it is refused on send rather than half-supported.
    return b""


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start another one of the caller's making.
    return " ".join(text.splitlines())


def watchdog_interval(env: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of `$WATCHDOG_USEC`), or None if none are wanted.

    `$WATCHDOG_PID`, when set, names the process the watchdog is meant for; any other process
    (a child that inherited the environment) must not ping.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    # Half the timeout, as sd_watchdog_enabled(3) advises: one late ping is not a restart.
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to the socket named in the environment it was built with."""

    def __init__(self, env: Mapping[str, str], *, pid: int | None = None) -> None:
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = watchdog_interval(env, pid=pid)

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (`$NOTIFY_SOCKET` was set)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog()` calls, or None when no watchdog is configured."""
        return self._watchdog_interval

    def notify(self, state: str) -> bool:
        """Send `state` (newline-separated `KEY=value` lines); False when no socket is set.

        Raises OSError when the socket is set but the datagram cannot be delivered.
        """
        if self._address is None:
            return False
        if not self._address:
            raise OSError(errno.EAFNOSUPPORT, "unsupported NOTIFY_SOCKET address")
        if not state:
            raise ValueError("empty notification state")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), self._address)
        return True

    def ready(self, status: str = "") -> bool:
        """Startup is complete: systemd marks the unit active (`Type=notify`)."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def stopping(self) -> bool:
        """Shutdown (graceful drain) has begun."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Still alive: resets the `WatchdogSec=` timer."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")


def _notifier(env: Mapping[str, str] | None) -> Notifier:
    # Read at call time, never at import: the composition root normally passes `env` itself.
    return Notifier(os.environ if env is None else env)


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` to `$NOTIFY_SOCKET`; False when it is unset (not run by systemd)."""
    return _notifier(env).notify(state)


def ready(status: str = "", *, env: Mapping[str, str] | None = None) -> bool:
    """Send `READY=1` (with `STATUS=` when given)."""
    return _notifier(env).ready(status)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    """Send `STOPPING=1`."""
    return _notifier(env).stopping()


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    """Send `WATCHDOG=1`."""
    return _notifier(env).watchdog()


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send `STATUS=text`."""
    return _notifier(env).status(text)
