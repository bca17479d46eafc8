"""Runs assigned ranks as real processes, each under its supervisor (`gpuctl.agent.shim`) and as
the rank's account, never root unless allowed; stops them (SIGTERM, then SIGKILL after the
grace) and, after an agent restart, adopts or reports the ranks its previous run started.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from gpuctl.agent.readiness import Readiness
from gpuctl.agent.shim import (
    EXIT_CANNOT_EXECUTE,
    EXIT_FILE,
    EXIT_NOT_FOUND,
    KILL_SIGNAL,
    LAUNCH_FILE,
    LEASE_FILE,
    RANK_ID_ENV,
    REPORTED_FILE,
    SHIM_FILE,
    read_json,
    write_json,
)
from gpuctl.core.trust import RunAsPolicy
from gpuctl.runtime.private import TRAVERSE_ONLY_DIR_MODE, make_private_dirs, private_opener

log = logging.getLogger(__name__)

DEFAULT_KILL_GRACE_S = 30.0  # Slurm's KillWait and Kubernetes' termination grace alike
# Dedicated accounts are better (files owned by "nobody" are shared with NFS root squash), but
# "nobody" exists on every node, so an owner without an account here still runs, unprivileged.
DEFAULT_FALLBACK_USER = "nobody"
DEFAULT_MAX_LOG_BYTES = 64 << 20  # 64 MiB: days of a training loop's progress lines
# The state dir, and the work/ directories down to each rank's own: a rank's account reaches
# its working directory by absolute path (os.path.abspath, Path.cwd() / "ckpt") but can list
# none of them. logs/ and ranks/ (the job's output and environment) are 0700 below it.
STATE_DIR_MODE = TRAVERSE_ONLY_DIR_MODE
# Outside 0..255, so no status a process can exit with reads as "lost"; positive, so it is not
# taken for a signal.
EXIT_LOST = 256
LOST_AFTER_RESTART = "lost: the agent restarted and the rank's supervisor is gone"
ROOT_REFUSED = "refusing to run as root: set allow_root_jobs in agent.toml"
SHIM_START_TIMEOUT_S = 10.0  # a Python start on a loaded node; well inside the 30 s watchdog
SHIM_KILL_GRACE_S = 10.0  # after the kill signal, before the supervisor itself gets SIGKILL

# What a rank keeps of the agent's own environment (agent.toml rank_env_allow): names or
# fnmatch patterns. The rest (cloud credentials, tokens, proxies the agent was started with)
# stays with the agent; a rank gets the job's env and the launch contract besides.
DEFAULT_RANK_ENV_ALLOW = ("PATH", "LANG", "LC_*", "TZ")
# A rank always has a PATH, so `sh` or `python3` resolve as in a login shell; a job's own
# PATH, or the agent's where allowed, replaces it.
DEFAULT_RANK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Never passed on, whatever the allow-list says: a rank that inherited NOTIFY_SOCKET could tell
# systemd the agent is ready or alive, WATCHDOG_* would make it think it owes pings, and
# GPUCTL_* names are the launch contract's to set (core.validation reserves them), not stale
# ones or the agent's own (GPUCTL_AGENT_*, GPUCTL_TOKEN) to leak.
_STRIPPED_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)
_STRIPPED_ENV_PREFIX = "GPUCTL_"
# Where `gpuctl` is imported from, so the supervisor finds it whatever the install.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True, slots=True, order=True)
class RankKey:
    """One rank of one attempt of a job: what assignments, stops and reports are keyed by."""

    job_id: int
    rank: int
    attempt: int

    def __str__(self) -> str:
        return f"job {self.job_id} rank {self.rank} attempt {self.attempt}"

    @property
    def dirname(self) -> str:
        return f"{self.job_id}.{self.rank}.{self.attempt}"

    @classmethod
    def from_dirname(cls, name: str) -> RankKey | None:
        parts = name.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return cls(job_id=int(parts[0]), rank=int(parts[1]), attempt=int(parts[2]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """How to start one rank: the agent loop builds it from the daemon's assignment."""

    key: RankKey
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # the launch contract and the user's env
    working_dir: str = ""  # "" = a fresh directory of the rank's under the state dir
    kill_grace_s: float = DEFAULT_KILL_GRACE_S
    owner: str = ""  # the submitting user: the account the rank runs as, where it exists
    readiness: Readiness | None = None  # an inference replica's probe


@dataclass(frozen=True, slots=True, kw_only=True)
class RankExit:
    key: RankKey
    exit_code: int  # negative: killed by that signal, as Popen reports it
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """What `Runner.recover` found of the agent's previous run."""

    adopted: tuple[RankKey, ...] = ()  # still running: stoppable, and reported by `poll`
    exits: tuple[RankExit, ...] = ()  # ended (or lost) with no acknowledged report: report once
    reported: tuple[RankKey, ...] = ()  # done and acknowledged: never to be started again


# -- accounts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountPolicy:
    """The operator's rules for whom ranks run as (agent.toml)."""

    fallback_user: str = DEFAULT_FALLBACK_USER  # for owners with no account on this node
    allow_root: bool = False  # allow_root_jobs
    # gpuctld checks these at submission; the agent checks again against its own accounts,
    # so a daemon that is wrong, or not gpuctld, cannot make it run a service account's job
    rules: RunAsPolicy = field(default_factory=RunAsPolicy)


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """The account a rank runs as."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, as initgroups(3) would set them
    home: str
    shell: str
    switch: bool  # False: the agent is not root and runs ranks as itself

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "SHELL": self.shell}


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a rank is not started, as the exit code and message it is reported with."""

    code: int
    message: str


class Passwd(Protocol):
    """The account database: `pwd` and getgrouplist(3); tests pass a fake."""

    def getpwnam(self, name: str) -> pwd.struct_passwd: ...

    def getpwuid(self, uid: int) -> pwd.struct_passwd: ...

    def getgrouplist(self, user: str, gid: int) -> list[int]: ...


class SystemPasswd:
    def getpwnam(self, name: str) -> pwd.struct_passwd:
        return pwd.getpwnam(name)

    def getpwuid(self, uid: int) -> pwd.struct_passwd:
        return pwd.getpwuid(uid)

    def getgrouplist(self, user: str, gid: int) -> list[int]:
        return os.getgrouplist(user, gid)


def resolve_account(
    owner: str, policy: AccountPolicy, *, euid: int, passwd: Passwd
) -> Account | Refusal:
    """The owner's account if it exists here, else the fallback; never root unless allowed. An
    agent that is not root cannot switch: its ranks run as itself, whoever owns them."""
    if euid != 0:
        return _account(passwd.getpwuid(euid), passwd, switch=False)
    entry = None
    for name in (owner, policy.fallback_user):
        if not name:
            continue
        try:
            entry = passwd.getpwnam(name)
            break
        except KeyError:
            continue
    if entry is None:
        return Refusal(
            code=EXIT_CANNOT_EXECUTE,
            message=f"no account to run as: neither the owner {owner!r} nor run_as_fallback_user "
            f"{policy.fallback_user!r} exists on this node",
        )
    if entry.pw_uid == 0 and not policy.allow_root:
        return Refusal(code=EXIT_CANNOT_EXECUTE, message=ROOT_REFUSED)
    is_owner = entry.pw_name == owner and owner != policy.fallback_user
    if is_owner and not (entry.pw_uid == 0 and policy.allow_root):
        why = policy.rules.refusal(entry.pw_name, entry.pw_uid)
        if why:
            return Refusal(code=EXIT_CANNOT_EXECUTE, message=f"refusing to run as {why}")
    return _account(entry, passwd, switch=True)


def _account(entry: pwd.struct_passwd, passwd: Passwd, *, switch: bool) -> Account:
    return Account(
        user=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(passwd.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
        switch=switch,
    )


def child_env(
    base: Mapping[str, str],
    launch: Launch,
    account: Account | None = None,
    *,
    allow: Iterable[str] = DEFAULT_RANK_ENV_ALLOW,
) -> dict[str, str]:
    """The allow-listed part of the agent's environment (with a default PATH where it has
    none), then the account's HOME, USER, LOGNAME and SHELL, then the assignment's variables."""
    patterns = tuple(allow)
    env = {
        k: v
        for k, v in _without_agent_vars(base).items()
        if any(fnmatch.fnmatchcase(k, p) for p in patterns)
    }
    env.setdefault("PATH", DEFAULT_RANK_PATH)
    if account is not None:
        env.update(account.env())
    env.update(launch.env)
    return env


def _without_agent_vars(base: Mapping[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in base.items()
        if k not in _STRIPPED_ENV and not k.startswith(_STRIPPED_ENV_PREFIX)
    }


# -- containment --------------------------------------------------------------------------


class Containment(Protocol):
    """Where a rank's supervisor (and so the rank) runs: chosen once when the agent starts."""

    name: str

    def wrap(self, key: RankKey, argv: Iterable[str]) -> tuple[str, ...]: ...


class ProcessGroups:
    """A session and process group per rank (the supervisor's and the rank's own); escapees
    are found by the supervisor, which is a child subreaper."""

    name = "process-group"

    def wrap(self, key: RankKey, argv: Iterable[str]) -> tuple[str, ...]:
        return tuple(argv)


class SystemdScopes:
    """A transient systemd scope per rank, around its supervisor: the rank's processes are one
    cgroup that systemd accounts for and that stopping the agent's own unit leaves alone."""

    name = "systemd-scope"

    def __init__(self, systemd_run: str) -> None:
        self._systemd_run = systemd_run

    @staticmethod
    def unit(key: RankKey) -> str:
        return f"gpuctl-job-{key.job_id}-{key.rank}-{key.attempt}"

    def wrap(self, key: RankKey, argv: Iterable[str]) -> tuple[str, ...]:
        # --scope execs the command in place (same pid, same fds); --collect unloads a failed
        # scope too, so a later attempt's name is free.
        return (
            self._systemd_run, "--scope", "--quiet", "--collect", f"--unit={self.unit(key)}",
            "--", *argv,
        )  # fmt: skip


def choose_containment(
    *,
    which: Callable[[str], str | None] = shutil.which,
    pid1_comm: Path = Path("/proc/1/comm"),
    systemd_booted: Path = Path("/run/systemd/system"),
) -> Containment:
    """Systemd scopes when systemd-run exists and systemd is PID 1 (sd_booted(3)'s test),
    else process groups: a container's systemd-run would only fail at every start."""
    systemd_run = which("systemd-run")
    try:
        pid1 = pid1_comm.read_text().strip()
    except OSError:
        pid1 = ""
    if systemd_run and pid1 == "systemd" and systemd_booted.is_dir():
        return SystemdScopes(systemd_run)
    return ProcessGroups()


# -- finding processes by their marker ----------------------------------------------------


def _marked(procs: Iterable[psutil.Process], rank_id: str) -> list[psutil.Process]:
    found = []
    for p in procs:
        try:
            if p.pid != os.getpid() and p.environ().get(RANK_ID_ENV) == rank_id:
                found.append(p)
        except psutil.Error:  # gone, a zombie, or another user's (the agent is not root)
            continue
    return found


def sweep(rank_id: str, *, everywhere: bool = False) -> int:
    """SIGKILL every process that carries the rank's marker: among the agent's descendants
    (where a subreaper agent finds them), or among all processes when the supervisor is gone
    and so its orphans are not ours. Returns how many there were."""
    if everywhere:
        procs: Iterable[psutil.Process] = psutil.process_iter()
    else:
        procs = psutil.Process().children(recursive=True)
    victims = _marked(procs, rank_id)
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=5)  # also reaps the ones that are our children
    return len(victims)


# -- the runner ---------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Running:
    key: RankKey
    rank_id: str  # the marker its processes carry
    shim_pid: int
    shim_started: float  # psutil create_time: tells the supervisor from a later owner of its pid
    kill_grace_s: float
    proc: subprocess.Popen[bytes] | None = None  # None: adopted from the agent's previous run
    kill_at: float | None = None  # monotonic time of the SIGKILL, once a stop was asked
    grace_s: float | None = None
    terminated: bool = False  # we asked for SIGTERM
    killed: bool = False  # we asked for SIGKILL after the grace
    shim_killed: bool = False  # the supervisor itself did not finish in time: SIGKILLed


class Runner:
    """The ranks this agent runs (started or adopted) and has not yet seen exit."""

    def __init__(
        self,
        state_dir: Path,
        *,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        accounts: AccountPolicy | None = None,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        containment: Containment | None = None,
        passwd: Passwd | None = None,
        env_allow: Iterable[str] = DEFAULT_RANK_ENV_ALLOW,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._base_env = dict(base_env)
        self._env_allow = tuple(env_allow)
        self._clock = clock
        self._accounts = accounts or AccountPolicy()
        self._max_log_bytes = max_log_bytes
        self._containment = containment or ProcessGroups()
        self._passwd = passwd or SystemPasswd()
        self._euid = os.geteuid()
        self._running: dict[RankKey, _Running] = {}
        self._recovered: set[RankKey] = set()  # what `recover` returned: never returned again
        shim_env = _without_agent_vars(self._base_env)
        shim_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, shim_env.get("PYTHONPATH", "")) if p
        )
        self._shim_env = shim_env
        if self._euid != 0:
            me = resolve_account("", self._accounts, euid=self._euid, passwd=self._passwd)
            assert isinstance(me, Account)
            log.warning(
                "the agent is not root: ranks run as its own user %s (uid %d), whoever owns them",
                me.user,
                me.uid,
            )

    # -- where things are -----------------------------------------------------------------

    def log_path(self, key: RankKey) -> Path:
        return (
            self._state_dir / "logs" / str(key.job_id) / str(key.attempt) / f"rank-{key.rank}.log"
        )

    def work_dir(self, key: RankKey) -> Path:
        return self._state_dir / "work" / str(key.job_id) / str(key.attempt) / f"rank-{key.rank}"

    def rank_dir(self, key: RankKey) -> Path:
        return self._state_dir / "ranks" / key.dirname

    def running(self) -> tuple[RankKey, ...]:
        return tuple(sorted(self._running))

    def rank_id(self, key: RankKey) -> str:
        """The marker (env GPUCTL_RANK_ID) every process of the running rank carries."""
        return self._running[key].rank_id

    # -- start ----------------------------------------------------------------------------

    def start(self, launch: Launch) -> RankExit | None:
        """Start the rank; None when it runs, else why it could not start (as an exit).

        A launch that cannot start is the job's failure, not the agent's: it is reported like
        an exit (127 for a missing command, 126 for one that cannot be executed or may not run
        as root) and written to the rank's log, where `gpuctl logs` shows it.
        """
        key = launch.key
        if key in self._running:
            raise ValueError(f"{key} is already running")
        log_path = self.log_path(key)
        # 0700 directories, 0600 files: ranks print their secrets, and the log holds them.
        make_private_dirs(log_path.parent)
        if not launch.command or not launch.command[0]:
            return self._refused(key, EXIT_NOT_FOUND, "empty command")
        account = resolve_account(
            launch.owner, self._accounts, euid=self._euid, passwd=self._passwd
        )
        if isinstance(account, Refusal):
            return self._refused(key, account.code, account.message)
        cwd = launch.working_dir
        if not cwd:
            cwd = str(self.work_dir(key))
            make_private_dirs(Path(cwd).parent, TRAVERSE_ONLY_DIR_MODE)
            make_private_dirs(Path(cwd))  # 0700, and the rank's account's
            if account.switch:
                # Entered by the supervisor as root; owned by the user, who also reaches it by
                # absolute path through the 0711 directories above (STATE_DIR_MODE).
                os.chown(cwd, account.uid, account.gid)
        elif not os.path.isdir(cwd):
            return self._refused(key, EXIT_NOT_FOUND, f"working directory not found: {cwd}")
        rank_dir = self.rank_dir(key)
        make_private_dirs(rank_dir)  # launch.json in it holds the job's environment
        for stale in (EXIT_FILE, SHIM_FILE, REPORTED_FILE):
            (rank_dir / stale).unlink(missing_ok=True)
        # Unique per launch: agents and tests sharing a host never match each other's ranks.
        rank_id = f"{key.dirname}@{secrets.token_hex(4)}"
        env = child_env(self._base_env, launch, account, allow=self._env_allow)
        env[RANK_ID_ENV] = rank_id
        write_json(
            rank_dir / LAUNCH_FILE,
            {
                "argv": list(launch.command),
                "env": env,
                "cwd": cwd,
                "cwd_as_user": bool(launch.working_dir),
                "user": account.user,
                "uid": account.uid if account.switch else None,
                "gid": account.gid if account.switch else None,
                "groups": list(account.groups),
                "max_log_bytes": self._max_log_bytes,
                "rank_id": rank_id,
                "kill_grace_s": launch.kill_grace_s,
                "lease_file": str(self._state_dir / LEASE_FILE),
                # for the agent alone (the supervisor ignores it): a restarted agent probes on
                "readiness": None if launch.readiness is None else asdict(launch.readiness),
            },
        )
        return self._start_shim(key, rank_id, launch.kill_grace_s, launch.command[0])

    def _start_shim(
        self, key: RankKey, rank_id: str, kill_grace_s: float, command: str
    ) -> RankExit | None:
        status_read, status_write = os.pipe()
        argv = self._containment.wrap(
            key,
            (sys.executable, "-m", "gpuctl.agent.shim", str(self.rank_dir(key)), str(status_write)),
        )
        try:
            # The agent opens the log: the rank's account needs no access to the state dir.
            with open(self.log_path(key), "ab", opener=private_opener) as log_file:
                proc = subprocess.Popen(
                    argv,
                    env=self._shim_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=(status_write,),
                    # Its own session: a Ctrl-C at the agent's terminal reaches no rank.
                    start_new_session=True,
                )
        except OSError as e:
            os.close(status_read)
            return self._refused(
                key, EXIT_CANNOT_EXECUTE, f"cannot start the rank's supervisor: {e.strerror}"
            )
        finally:
            os.close(status_write)
        status = _read_status(status_read, SHIM_START_TIMEOUT_S)
        if status is not None and "pid" in status:
            shim = read_json(self.rank_dir(key) / SHIM_FILE) or {}
            self._running[key] = _Running(
                key=key,
                rank_id=rank_id,
                shim_pid=proc.pid,
                shim_started=float(shim.get("create_time", 0.0)),
                kill_grace_s=kill_grace_s,
                proc=proc,
            )
            log.info("started %s as pid %d under supervisor %d", key, status["pid"], proc.pid)
            return None
        if status is not None and "code" in status:  # the supervisor wrote log and exit file
            proc.wait()
            message = str(status.get("message", ""))
            log.warning("%s not started: %s", key, message)
            return RankExit(key=key, exit_code=int(status["code"]), message=message)
        _kill_group(proc.pid)
        code = proc.wait()
        sweep(rank_id)
        return self._refused(
            key,
            EXIT_CANNOT_EXECUTE,
            f"the rank's supervisor failed to start {command} (exit {code}); see the log above",
        )

    def _refused(self, key: RankKey, code: int, message: str) -> RankExit:
        log.warning("%s not started: %s", key, message)
        with open(self.log_path(key), "ab", opener=private_opener) as f:
            f.write(f"gpuctl-agent: {message}\n".encode())
        return RankExit(key=key, exit_code=code, message=message)

    # -- stop -----------------------------------------------------------------------------

    def stop(self, key: RankKey, grace_s: float | None = None) -> bool:
        """SIGTERM the rank now and SIGKILL it once `grace_s` has passed (checked in `poll`).
        False when the rank is not running. A second stop never extends the grace."""
        r = self._running.get(key)
        if r is None:
            return False
        grace = r.kill_grace_s if grace_s is None else grace_s
        kill_at = self._clock() + max(0.0, grace)
        if r.kill_at is not None and r.kill_at <= kill_at:
            return True
        r.kill_at, r.grace_s = kill_at, grace
        if not r.terminated:
            r.terminated = True
            log.info("stopping %s: SIGTERM, SIGKILL in %.1fs", key, grace)
            self._signal_shim(r, signal.SIGTERM)
        return True

    def stop_all(self, grace_s: float | None = None) -> None:
        for key in list(self._running):
            self.stop(key, grace_s)

    def lease(self, stop_in: float | None, kill_in: float | None = None) -> None:
        """Let the ranks run `stop_in` seconds more without another lease: then each rank's
        supervisor SIGTERMs it by itself, and SIGKILLs it after `kill_in`, whether or not this
        agent still runs (fencing). None: no limit. The times are CLOCK_MONOTONIC, the clock
        every process of this boot shares, whatever clock the agent was given."""
        path = self._state_dir / LEASE_FILE
        if stop_in is None:
            path.unlink(missing_ok=True)
            return
        now = time.monotonic()
        kill_in = stop_in if kill_in is None else max(stop_in, kill_in)
        make_private_dirs(self._state_dir)
        write_json(path, {"stop_at": now + stop_in, "kill_at": now + kill_in})

    def next_deadline(self) -> float | None:
        """The earliest pending SIGKILL (monotonic), so the loop knows when to wake up."""
        pending = [
            r.kill_at for r in self._running.values() if r.kill_at is not None and not r.killed
        ]
        return min(pending, default=None)

    # -- exits ----------------------------------------------------------------------------

    def poll(self) -> list[RankExit]:
        """SIGKILL the ranks whose grace ran out; return the ranks that exited."""
        now = self._clock()
        exits: list[RankExit] = []
        for key, r in list(self._running.items()):
            if r.kill_at is not None and not r.killed and now >= r.kill_at:
                r.killed = True
                log.warning("%s outlived its %.1fs stop grace: SIGKILL", key, r.grace_s or 0.0)
                self._signal_shim(r, KILL_SIGNAL)
            if r.killed and not r.shim_killed and now >= (r.kill_at or now) + SHIM_KILL_GRACE_S:
                log.error("%s: the supervisor did not finish the kill: SIGKILL to it", key)
                self._kill_shim(r)
            if self._shim_alive(r):
                continue
            del self._running[key]
            exits.append(self._finished(r))
        return exits

    def reap(self, timeout_s: float = 5.0) -> list[RankExit]:
        """SIGKILL every rank still running and wait for it: the agent is about to exit."""
        for r in self._running.values():
            r.terminated = r.killed = True
            self._signal_shim(r, KILL_SIGNAL)
        deadline = time.monotonic() + timeout_s  # real time: this waits for real processes
        exits: list[RankExit] = []
        for key, r in list(self._running.items()):
            while self._shim_alive(r) and time.monotonic() < deadline:
                time.sleep(0.01)
            if self._shim_alive(r):
                log.error("%s: the supervisor survived %.0fs: SIGKILL to it", key, timeout_s)
                self._kill_shim(r)
                if r.proc is not None:
                    try:
                        r.proc.wait(1.0)
                    except subprocess.TimeoutExpired:  # stuck in the kernel (D state)
                        continue
            del self._running[key]
            exits.append(self._finished(r))
        return exits

    def readiness(self, key: RankKey) -> Readiness | None:
        """The readiness probe the rank was started with (kept in its launch file)."""
        data = (read_json(self.rank_dir(key) / LAUNCH_FILE) or {}).get("readiness")
        if not isinstance(data, dict):
            return None
        try:
            return Readiness.of(
                int(data.get("port", 0)), str(data.get("http_path", "")), bool(data.get("tcp"))
            )
        except (TypeError, ValueError):
            return None

    def mark_reported(self, key: RankKey) -> None:
        """The daemon acknowledged the rank's EXITED report: a restarted agent must not
        report it again."""
        rank_dir = self.rank_dir(key)
        if rank_dir.is_dir():
            (rank_dir / REPORTED_FILE).touch()

    # -- restart --------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Adopt the ranks whose supervisor still runs; return those that ended with no
        acknowledged report, and as lost those whose supervisor is gone without recording an
        exit. A rank is returned once per Runner; a restarted agent sees it again until
        `mark_reported`."""
        adopted: list[RankKey] = []
        exits: list[RankExit] = []
        reported: list[RankKey] = []
        ranks = self._state_dir / "ranks"
        for rank_dir in sorted(ranks.iterdir()) if ranks.is_dir() else ():
            key = RankKey.from_dirname(rank_dir.name)
            if key is None or key in self._running or key in self._recovered:
                continue
            self._recovered.add(key)
            if (rank_dir / REPORTED_FILE).exists():
                reported.append(key)
                continue
            spec = read_json(rank_dir / LAUNCH_FILE) or {}
            shim = read_json(rank_dir / SHIM_FILE) or {}
            r = _Running(
                key=key,
                rank_id=str(spec.get("rank_id", "")),
                shim_pid=int(shim.get("pid", 0)),
                shim_started=float(shim.get("create_time", 0.0)),
                kill_grace_s=float(spec.get("kill_grace_s", DEFAULT_KILL_GRACE_S)),
            )
            if not (rank_dir / EXIT_FILE).exists() and self._shim_alive(r):
                self._running[key] = r
                adopted.append(key)
                log.info("adopted %s: its supervisor (pid %d) still runs", key, r.shim_pid)
                continue
            exits.append(self._finished(r, lost=LOST_AFTER_RESTART))
        return Recovery(adopted=tuple(adopted), exits=tuple(exits), reported=tuple(reported))

    # -- helpers --------------------------------------------------------------------------

    def _finished(self, r: _Running, lost: str = "") -> RankExit:
        """The exit the supervisor recorded; lost (and its processes killed) when there is none."""
        exit_path = self.rank_dir(r.key) / EXIT_FILE
        recorded = read_json(exit_path)
        if recorded is None:
            message = (
                lost
                or f"lost: the rank's supervisor (pid {r.shim_pid}) died without recording its exit"
            )
            if r.shim_killed:
                message = f"killed by SIGKILL after the {r.grace_s or 0.0:g}s stop grace"
            code = -signal.SIGKILL if r.shim_killed else EXIT_LOST
            if r.rank_id and (n := sweep(r.rank_id, everywhere=True)):
                log.warning("%s: killed %d leftover process(es) of the rank", r.key, n)
            if self.rank_dir(r.key).is_dir():
                write_json(exit_path, {"code": code, "message": message})
            result = RankExit(key=r.key, exit_code=code, message=message)
        else:
            if r.rank_id:
                # Anything the supervisor could not reap is now the agent's (a subreaper).
                sweep(r.rank_id)
            code = int(recorded["code"])
            message = str(recorded.get("message") or "") or _exit_message(
                code,
                terminated=r.terminated or bool(recorded.get("terminated")),
                killed=r.killed or bool(recorded.get("killed")),
                grace_s=r.grace_s,
            )
            if recorded.get("fenced"):
                message += " (fenced: no word from gpuctld before the node's lease ran out)"
            result = RankExit(key=r.key, exit_code=code, message=message)
        log.info("%s exited: %s", r.key, result.message)
        return result

    def _shim_alive(self, r: _Running) -> bool:
        if r.proc is not None:
            return r.proc.poll() is None
        return _same_process(r.shim_pid, r.shim_started)

    def _signal_shim(self, r: _Running, sig: signal.Signals) -> None:
        if not self._shim_alive(r):
            return  # gone (and for an adopted one, its pid may be someone else's by now)
        with contextlib.suppress(ProcessLookupError):
            os.kill(r.shim_pid, sig)

    def _kill_shim(self, r: _Running) -> None:
        r.shim_killed = True
        if self._shim_alive(r):
            _kill_group(r.shim_pid)
        if r.rank_id:
            sweep(r.rank_id, everywhere=True)


def _exit_message(code: int, *, terminated: bool, killed: bool, grace_s: float | None) -> str:
    if code >= 0:
        return f"exited with code {code}"
    name = _signal_name(-code)
    if killed and code == -signal.SIGKILL:
        if grace_s is None:  # adopted: the grace was asked of the previous agent run
            return "killed by SIGKILL after the stop grace"
        return f"killed by SIGKILL after the {grace_s:g}s stop grace"
    if terminated:
        return f"stopped by {name}"
    return f"killed by {name}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _same_process(pid: int, create_time: float) -> bool:
    """`pid` runs and is the process that started at `create_time`, not a later reuse."""
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_status(fd: int, timeout_s: float) -> dict[str, Any] | None:
    """The supervisor's one status line, or None when it closed the pipe (died) or was slow."""
    data = b""
    deadline = time.monotonic() + timeout_s
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        value = json.loads(data.split(b"\n", 1)[0] or b"null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
