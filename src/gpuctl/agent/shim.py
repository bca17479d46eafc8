"""The supervisor ("shim") of one rank, started by the agent as root in a session of its own:
starts the rank as its account, relays its output into the size-capped log, kills what it leaves
behind and records its exit, so the agent need not be its parent and can adopt it after a restart.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from gpuctl.runtime.private import private_opener

# `python -m gpuctl.agent.shim RANK_DIR STATUS_FD`. The files in RANK_DIR, each written whole
# (tmp + rename), are the protocol with the runner:
#   launch.json  runner -> shim: argv, env (the job's secrets too: 0600), cwd, account, log cap
#   shim.json    shim: its pid and start time, by which a restarted agent knows it is the same
#   exit         shim: {"code", "terminated", "killed", "fenced"}, plus "message" when the rank
#                never ran
#   reported     runner: the daemon acknowledged the rank's EXITED report
# and one file for the whole node, in the agent's state dir (launch.json names it):
#   lease.json   agent: {"stop_at", "kill_at"}, CLOCK_MONOTONIC seconds, renewed with every word
#                from gpuctld. Past stop_at the shim SIGTERMs its rank by itself, past kill_at it
#                SIGKILLs it: the agent may be dead, and gpuctld is about to call the node lost
#                and run the rank elsewhere (fencing). No file: no limit.
# STATUS_FD gets one JSON line once the rank runs ({"pid"}) or cannot start ({"code",
# "message"}). SIGTERM is forwarded to the rank; SIGUSR1 SIGKILLs everything of the rank.
LAUNCH_FILE = "launch.json"
SHIM_FILE = "shim.json"
EXIT_FILE = "exit"
REPORTED_FILE = "reported"
LEASE_FILE = "lease.json"
RANK_ID_ENV = "GPUCTL_RANK_ID"  # the marker by which a rank's processes are found
KILL_SIGNAL = signal.SIGUSR1  # agent -> shim: SIGKILL the rank now (the stop grace ran out)

EXIT_NOT_FOUND = 127  # the shell's codes, so a rank reads the same as `sh -c` would report it
EXIT_CANNOT_EXECUTE = 126

_AGENT_SIGNALS = frozenset({signal.SIGTERM, KILL_SIGNAL})
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_READ_BYTES = 1 << 16
_REAP_TIMEOUT_S = 10.0  # a descendant stuck in the kernel (D state) is not waited for longer
_RELAY_DRAIN_S = 5.0  # for the last output once every process of the rank is gone
LEASE_POLL_S = 0.5  # how often the lease is read: a fenced rank stops within this of stop_at


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children (Linux), instead of init's, so that
    a rank's process that escaped with setsid() and double fork can still be found and killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux, or no prctl
        return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a reader never sees half of it, even after a crash.
    The file is 0600: launch.json holds the job's environment, its secrets included."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb", opener=private_opener) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(value).encode())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def truncation_marker(cap: int) -> bytes:
    """The log's last line once the rank's output reached `cap` bytes."""
    return f"gpuctl-agent: log truncated at {cap} bytes (max_log_bytes); output dropped\n".encode()


class _LogRelay(threading.Thread):
    """Copies the rank's output into the log until the cap, then drops it: the pipe is always
    drained, so a chatty rank never blocks on a full log."""

    def __init__(self, src: int, dst: int, cap: int) -> None:
        super().__init__(name="log-relay", daemon=True)
        self._src, self._dst, self._cap = src, dst, cap
        self._written = os.fstat(dst).st_size
        self._last = b"\n"
        self._full = self._written >= cap

    def run(self) -> None:
        while data := os.read(self._src, _READ_BYTES):
            if self._full:
                continue
            room = self._cap - self._written
            if len(data) > room:
                self._write(data[:room])
                # The marker starts a line of its own, so it reads as the agent's, not the rank's.
                self._write((b"" if self._last == b"\n" else b"\n") + truncation_marker(self._cap))
                self._full = True
            else:
                self._write(data)
        os.close(self._src)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._dst, view)
            except OSError:  # a full disk loses output, never the rank
                return
            self._written += n
            view = view[n:]
        if data:
            self._last = data[-1:]


def lease_action(lease: dict[str, Any] | None, now: float) -> signal.Signals | None:
    """What the node's lease (`LEASE_FILE`, None when absent or unreadable) asks of a rank at
    CLOCK_MONOTONIC `now`: SIGKILL past kill_at, SIGTERM past stop_at, else nothing."""
    if lease is None:
        return None
    try:
        stop_at, kill_at = float(lease["stop_at"]), float(lease["kill_at"])
    except (KeyError, TypeError, ValueError):
        return None
    if now >= kill_at:
        return signal.SIGKILL
    if now >= stop_at:
        return signal.SIGTERM
    return None


class _Fence(threading.Thread):
    """Stops the rank once the node's lease runs out, by signalling this process as the agent
    would (so the stop takes the one path a stop takes): SIGTERM, then SIGKILL."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="fence", daemon=True)
        self._path = path
        self.done = threading.Event()  # the rank is gone
        self.fenced = False

    def run(self) -> None:
        sent: signal.Signals | None = None
        while not self.done.wait(LEASE_POLL_S):
            action = lease_action(read_json(self._path), time.monotonic())
            if action is None or action == sent:
                continue
            self.fenced, sent = True, action
            os.kill(os.getpid(), KILL_SIGNAL if action == signal.SIGKILL else signal.SIGTERM)
            if action == signal.SIGKILL:
                return


class _Shim:
    def __init__(self, rank_dir: Path, spec: dict[str, Any]) -> None:
        self.rank_dir = rank_dir
        self.spec = spec
        self.pid: int | None = None  # the rank's leader, also its process group
        self.reaped = False  # the leader is reaped: its pid (and group id) may be reused
        self.terminated = False  # the agent asked for SIGTERM
        self.killed = False  # the agent asked for SIGKILL

    # -- signals from the agent ---------------------------------------------------------

    def on_term(self, _signum: int, _frame: object) -> None:
        if self.terminated:  # asked twice (the agent and the lease): a second SIGTERM reads
            return  # as "force quit" to some programs
        self.terminated = True
        if self.pid is not None:
            self.signal_all(signal.SIGTERM)

    def on_kill(self, _signum: int, _frame: object) -> None:
        self.killed = True
        if self.pid is not None:
            self.signal_all(signal.SIGKILL)

    def signal_all(self, sig: signal.Signals) -> None:
        """The rank's process group, then every other descendant (the ones that left the group
        with setsid(), and the orphans this subreaper inherited)."""
        assert self.pid is not None
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        for p in _descendants():
            try:
                # Members of the group got it already; a second SIGTERM reads as "force quit"
                # to some programs.
                if sig != signal.SIGKILL and not self.reaped and os.getpgid(p.pid) == self.pid:
                    continue
                p.send_signal(sig)
            except (psutil.Error, OSError):
                pass

    # -- the rank -----------------------------------------------------------------------

    def run(self, status_fd: int) -> int:
        spec = self.spec
        uid, gid = spec.get("uid"), spec.get("gid")
        try:
            self._enter_cwd()
        except FileNotFoundError:
            return self._refuse(
                status_fd, EXIT_NOT_FOUND, f"working directory not found: {spec['cwd']}"
            )
        except OSError as e:
            return self._refuse(
                status_fd,
                EXIT_CANNOT_EXECUTE,
                f"working directory not accessible to {spec['user']}: {spec['cwd']} ({e.strerror})",
            )
        argv = spec["argv"]
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                argv,
                env=spec["env"],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                # Its own session and process group: a stop reaches everything it forked.
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=spec.get("groups") if uid is not None else None,
            )
        except OSError as e:
            os.close(read_end)
            return self._refuse(status_fd, *_cannot_start(argv[0], e))
        finally:
            os.close(write_end)
        self.pid = proc.pid
        relay = _LogRelay(read_end, sys.stdout.fileno(), int(spec["max_log_bytes"]))
        fence = _Fence(Path(spec["lease_file"])) if spec.get("lease_file") else None
        # The threads block the agent's signals (a thread inherits its creator's mask): one
        # delivered to them would run its handler only once the main thread's wait returned.
        signal.pthread_sigmask(signal.SIG_BLOCK, _AGENT_SIGNALS)
        relay.start()
        if fence is not None:
            fence.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _AGENT_SIGNALS)
        _report(status_fd, {"pid": proc.pid})
        if self.killed:  # asked before the rank existed
            self.signal_all(signal.SIGKILL)
        elif self.terminated:
            self.signal_all(signal.SIGTERM)
        code = self._wait()
        proc.returncode = code  # reaped here, not by Popen
        if fence is not None:
            fence.done.set()
        relay.join(_RELAY_DRAIN_S)
        write_json(
            self.rank_dir / EXIT_FILE,
            {
                "code": code,
                "terminated": self.terminated,
                "killed": self.killed,
                "fenced": fence is not None and fence.fenced,
            },
        )
        return 0

    def _enter_cwd(self) -> None:
        """chdir into the rank's directory: a directory the user named is entered with the
        user's own permissions, so a rank never gets a directory it could not reach itself."""
        spec = self.spec
        if not spec.get("cwd_as_user") or spec.get("uid") is None:
            os.chdir(spec["cwd"])
            return
        groups, egid, euid = os.getgroups(), os.getegid(), os.geteuid()
        os.setgroups(spec["groups"])
        os.setegid(spec["gid"])
        os.seteuid(spec["uid"])
        try:
            os.chdir(spec["cwd"])
        finally:
            os.seteuid(euid)
            os.setegid(egid)
            os.setgroups(groups)

    def _wait(self) -> int:
        """Wait for the leader; then kill and reap everything it leaves behind; its exit code
        (negative: the signal that killed it, as Popen reports it)."""
        assert self.pid is not None
        # WNOWAIT: the leader stays a zombie, which keeps its pid (the group id) from being
        # reused until the rest of the group is killed.
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        self.signal_all(signal.SIGKILL)
        self.reaped = True  # before the reap: a signal handler may run right after it
        _, status = os.waitpid(self.pid, 0)
        deadline = time.monotonic() + _REAP_TIMEOUT_S
        while True:
            for p in _descendants():
                with contextlib.suppress(psutil.Error):
                    p.kill()
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # nothing of the rank is left
            if pid == 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        return os.waitstatus_to_exitcode(status)

    def _refuse(self, status_fd: int, code: int, message: str) -> int:
        os.write(sys.stdout.fileno(), f"gpuctl-agent: {message}\n".encode())
        write_json(
            self.rank_dir / EXIT_FILE,
            {"code": code, "message": message, "terminated": False, "killed": False},
        )
        _report(status_fd, {"code": code, "message": message})
        return 0


def _cannot_start(command: str, e: OSError) -> tuple[int, str]:
    if isinstance(e, FileNotFoundError):
        return EXIT_NOT_FOUND, f"command not found: {command}"
    if isinstance(e, PermissionError):
        return EXIT_CANNOT_EXECUTE, f"permission denied: {command}"
    return EXIT_CANNOT_EXECUTE, f"cannot execute {command}: {e.strerror}"


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _report(status_fd: int, message: dict[str, Any]) -> None:
    try:
        os.write(status_fd, json.dumps(message).encode() + b"\n")
        os.close(status_fd)
    except OSError:
        pass  # the agent is gone: it will read shim.json and the exit file instead


def main(argv: list[str]) -> int:
    rank_dir, status_fd = Path(argv[0]), int(argv[1])
    spec = read_json(rank_dir / LAUNCH_FILE)
    if spec is None:
        print(f"gpuctl-agent: no readable {LAUNCH_FILE} in {rank_dir}", file=sys.stderr)
        return 2
    become_subreaper()
    shim = _Shim(rank_dir, spec)
    signal.signal(signal.SIGTERM, shim.on_term)
    signal.signal(KILL_SIGNAL, shim.on_kill)
    me = psutil.Process()
    write_json(rank_dir / SHIM_FILE, {"pid": me.pid, "create_time": me.create_time()})
    return shim.run(status_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
