"""Runs assigned ranks as real processes, one process group each: their environment, working
directory and log file, SIGTERM then SIGKILL on stop, and the reaping of whatever a rank leaves
behind in its group. Knows nothing of gRPC; the agent loop translates assignments into `Launch`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KILL_GRACE_S = 30.0  # Slurm's KillWait and Kubernetes' termination grace alike
EXIT_NOT_FOUND = 127  # the shell's codes, so a rank reads the same as `sh -c` would report it
EXIT_CANNOT_EXECUTE = 126

# The agent's own systemd and config variables: a rank that inherited NOTIFY_SOCKET could tell
# systemd the agent is ready or alive, and WATCHDOG_* would make it think it owes pings.
_STRIPPED_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)
_STRIPPED_ENV_PREFIX = "GPUCTL_AGENT_"


@dataclass(frozen=True, slots=True, order=True)
class RankKey:
    """One rank of one attempt of a job: what assignments, stops and reports are keyed by."""

    job_id: int
    rank: int
    attempt: int

    def __str__(self) -> str:
        return f"job {self.job_id} rank {self.rank} attempt {self.attempt}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """How to start one rank: the agent loop builds it from the daemon's assignment."""

    key: RankKey
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # the launch contract and the user's env
    working_dir: str = ""  # "" = a fresh directory of the rank's under the state dir
    kill_grace_s: float = DEFAULT_KILL_GRACE_S


@dataclass(frozen=True, slots=True, kw_only=True)
class RankExit:
    key: RankKey
    exit_code: int  # negative: killed by that signal, as Popen reports it
    message: str = ""


@dataclass(slots=True)
class _Running:
    launch: Launch
    proc: subprocess.Popen[bytes]
    kill_at: float | None = None  # monotonic time of the SIGKILL, once a stop was asked
    grace_s: float = 0.0
    terminated: bool = False  # we sent SIGTERM
    killed: bool = False  # we sent SIGKILL after the grace


def child_env(base: Mapping[str, str], launch: Launch) -> dict[str, str]:
    """The agent's environment minus its own systemd/config variables, plus the assignment's."""
    env = {
        k: v
        for k, v in base.items()
        if k not in _STRIPPED_ENV and not k.startswith(_STRIPPED_ENV_PREFIX)
    }
    env.update(launch.env)
    return env


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Runner:
    """The ranks this agent started and has not yet reaped."""

    def __init__(
        self,
        state_dir: Path,
        *,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._base_env = dict(base_env)
        self._clock = clock
        self._running: dict[RankKey, _Running] = {}

    def log_path(self, key: RankKey) -> Path:
        return (
            self._state_dir / "logs" / str(key.job_id) / str(key.attempt) / f"rank-{key.rank}.log"
        )

    def work_dir(self, key: RankKey) -> Path:
        return self._state_dir / "work" / str(key.job_id) / str(key.attempt) / f"rank-{key.rank}"

    def running(self) -> tuple[RankKey, ...]:
        return tuple(sorted(self._running))

    def start(self, launch: Launch) -> RankExit | None:
        """Start the rank; None when it runs, else why it could not start (as an exit).

        A launch that cannot start is the job's failure, not the agent's: it is reported like
        an exit (127 for a missing command, 126 for one that cannot be executed) and written
        to the rank's log, where `gpuctl logs` shows it.
        """
        key = launch.key
        if key in self._running:
            raise ValueError(f"{key} is already running")
        log_path = self.log_path(key)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not launch.command or not launch.command[0]:
            return self._refused(key, EXIT_NOT_FOUND, "empty command")
        cwd = launch.working_dir
        if not cwd:
            cwd = str(self.work_dir(key))
            os.makedirs(cwd, exist_ok=True)
        elif not os.path.isdir(cwd):
            return self._refused(key, EXIT_NOT_FOUND, f"working directory not found: {cwd}")
        with open(log_path, "ab") as log_file:
            try:
                proc = subprocess.Popen(
                    launch.command,
                    cwd=cwd,
                    env=child_env(self._base_env, launch),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    # Its own process group (and session), so a stop reaches everything the
                    # rank forked, and a Ctrl-C at the agent's terminal reaches none of it.
                    start_new_session=True,
                )
            except FileNotFoundError as e:
                if e.filename == cwd:  # vanished between the check and the fork
                    return self._refused(key, EXIT_NOT_FOUND, f"working directory not found: {cwd}")
                return self._refused(key, EXIT_NOT_FOUND, f"command not found: {launch.command[0]}")
            except PermissionError:
                return self._refused(
                    key, EXIT_CANNOT_EXECUTE, f"permission denied: {launch.command[0]}"
                )
            except OSError as e:
                return self._refused(
                    key, EXIT_CANNOT_EXECUTE, f"cannot execute {launch.command[0]}: {e.strerror}"
                )
        self._running[key] = _Running(launch=launch, proc=proc)
        log.info("started %s as pid %d: %s", key, proc.pid, " ".join(launch.command))
        return None

    def _refused(self, key: RankKey, code: int, message: str) -> RankExit:
        log.warning("%s not started: %s", key, message)
        with open(self.log_path(key), "ab") as f:
            f.write(f"gpuctl-agent: {message}\n".encode())
        return RankExit(key=key, exit_code=code, message=message)

    def stop(self, key: RankKey, grace_s: float | None = None) -> bool:
        """SIGTERM the rank's group now and SIGKILL it once `grace_s` has passed (checked in
        `poll`). False when the rank is not running. A second stop never extends the grace."""
        r = self._running.get(key)
        if r is None:
            return False
        grace = r.launch.kill_grace_s if grace_s is None else grace_s
        kill_at = self._clock() + max(0.0, grace)
        if r.kill_at is not None and r.kill_at <= kill_at:
            return True
        r.kill_at, r.grace_s = kill_at, grace
        if not r.terminated:
            r.terminated = True
            log.info("stopping %s (pid %d): SIGTERM, SIGKILL in %.1fs", key, r.proc.pid, grace)
            self._signal_group(r, signal.SIGTERM)
        return True

    def stop_all(self, grace_s: float | None = None) -> None:
        for key in list(self._running):
            self.stop(key, grace_s)

    def next_deadline(self) -> float | None:
        """The earliest pending SIGKILL (monotonic), so the loop knows when to wake up."""
        pending = [
            r.kill_at for r in self._running.values() if r.kill_at is not None and not r.killed
        ]
        return min(pending, default=None)

    def poll(self) -> list[RankExit]:
        """SIGKILL the groups whose grace ran out; reap and return the ranks that exited."""
        now = self._clock()
        exits: list[RankExit] = []
        for key, r in list(self._running.items()):
            if r.kill_at is not None and not r.killed and now >= r.kill_at:
                r.killed = True
                log.warning("%s outlived its %.1fs stop grace: SIGKILL", key, r.grace_s)
                self._signal_group(r, signal.SIGKILL)
            if not self._leader_exited(r):
                continue
            # The leader is a zombie until reaped, which keeps its pid (our group id) from
            # being reused: kill the rest of the group now, so nothing it forked is orphaned.
            self._signal_group(r, signal.SIGKILL)
            code = r.proc.wait()
            del self._running[key]
            exits.append(RankExit(key=key, exit_code=code, message=self._exit_message(r, code)))
            log.info("%s exited: %s", key, exits[-1].message)
        return exits

    def reap(self, timeout_s: float = 5.0) -> list[RankExit]:
        """SIGKILL every rank still running and wait for it: the agent is about to exit."""
        exits: list[RankExit] = []
        for key, r in list(self._running.items()):
            r.terminated = r.killed = True
            self._signal_group(r, signal.SIGKILL)
            try:
                code = r.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:  # stuck in the kernel (D state): nothing to do
                log.error("%s (pid %d) survived SIGKILL for %.0fs", key, r.proc.pid, timeout_s)
                continue
            del self._running[key]
            exits.append(RankExit(key=key, exit_code=code, message=self._exit_message(r, code)))
        return exits

    @staticmethod
    def _leader_exited(r: _Running) -> bool:
        try:
            # WNOWAIT: look without reaping, so the group id stays ours until we killed it.
            return os.waitid(os.P_PID, r.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # already reaped (Popen.wait elsewhere): nothing to hold
            return True

    @staticmethod
    def _exit_message(r: _Running, code: int) -> str:
        if code >= 0:
            return f"exited with code {code}"
        name = _signal_name(-code)
        if r.killed and code == -signal.SIGKILL:
            return f"killed by SIGKILL after the {r.grace_s:g}s stop grace"
        if r.terminated:
            return f"stopped by {name}"
        return f"killed by {name}"

    @staticmethod
    def _signal_group(r: _Running, sig: signal.Signals) -> None:
        try:
            os.killpg(r.proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already
        except PermissionError:
            # killpg fails only when no member could be signalled: all of them changed user.
            log.warning(
                "%s: not allowed to send %s to group %d", r.launch.key, sig.name, r.proc.pid
            )
