"""Running jobs safely, against real processes: ranks run as their owner or the fallback account
and never as root unless allowed; nothing a rank forks outlives it; logs stop at their cap
without stopping the rank; a restarted agent adopts running ranks and reports each exit once.

Time is a fake clock; the only waiting is for real processes, bounded by `until`. The account
tests need root and useradd, and skip (saying so) without them.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from gpuctl.agent.logship import LogShipper
from gpuctl.agent.runner import (
    EXIT_LOST,
    LOST_AFTER_RESTART,
    RANK_ID_ENV,
    ROOT_REFUSED,
    STATE_DIR_MODE,
    Account,
    AccountPolicy,
    Launch,
    ProcessGroups,
    RankExit,
    RankKey,
    Recovery,
    Refusal,
    Runner,
    SystemdScopes,
    choose_containment,
    resolve_account,
)
from gpuctl.agent.shim import LAUNCH_FILE, SHIM_FILE, read_json, truncation_marker
from gpuctl.core.trust import RunAsPolicy
from gpuctl.runtime.private import private_state_dir
from tests.agent_rig import FakeClock, until

KEY = RankKey(job_id=9, rank=1, attempt=2)
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
ME = pwd.getpwuid(os.geteuid()).pw_name
# This interpreter may not be runnable by other accounts (/root is 0700): the tests whose
# ranks are Python run as the tests' own account, root included.
AS_ME = AccountPolicy(fallback_user=ME, allow_root=True)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching accounts needs root: the agent runs ranks as itself"
)

# Ignores SIGTERM; forks a child, which forks a grandchild that leaves the group with setsid();
# all three wait (SIG_IGN survives fork), and the grandchild prints once it is out.
STUBBORN_TREE = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        print("escaped", os.getpid(), flush=True)
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""

# Daemonizes a SIGTERM-ignoring grandchild (fork, setsid, fork, the middle one exits), then exits
# 0 itself: the grandchild is nobody's child any more but the supervisor's (a subreaper).
DAEMONIZES = """
import os, signal, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, b"up")
        time.sleep(120)
    os._exit(0)
os.read(r, 2)
print("daemon started", flush=True)
"""

# Waits (bounded) for a file named "go" in its working directory, then exits 7.
WAITS_FOR_GO = """
import os, sys, time
print("ready", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.01)
print("bye", flush=True)
sys.exit(7)
"""


def marked(rank_id: str) -> list[psutil.Process]:
    """Every live process on the host that carries the rank's marker."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(RANK_ID_ENV) == rank_id:
                found.append(p)
        except psutil.Error:
            continue
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def launch(*command: str, key: RankKey = KEY, **kw: object) -> Launch:
    return Launch(key=key, command=command, **kw)  # type: ignore[arg-type]


def wait_exit(runner: Runner) -> RankExit:
    exits: list[RankExit] = []
    until(lambda: exits.extend(runner.poll()) or exits)
    assert len(exits) == 1
    return exits[0]


def wait_log(runner: Runner, needle: bytes, key: RankKey = KEY) -> bytes:
    path = runner.log_path(key)
    until(lambda: path.exists() and needle in path.read_bytes())
    return path.read_bytes()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def runners(tmp_path: Path, clock: FakeClock) -> Iterator[Callable[..., Runner]]:
    """Runners on one state dir (an agent and its restarts); whatever runs is reaped after."""
    made: list[Runner] = []

    def make(**kw: object) -> Runner:
        kw.setdefault("accounts", AS_ME)
        r = Runner(tmp_path / "state", base_env=BASE_ENV, clock=clock, **kw)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        r.reap(timeout_s=5)


# -- accounts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_user() -> Iterator[pwd.struct_passwd]:
    """A real unprivileged account (a person's: uid above min_uid), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating an account needs root")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if useradd is None or userdel is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"gpuctl-test-{secrets.token_hex(4)}"
    for _ in range(20):  # another test worker may hold the passwd lock for a moment
        done = subprocess.run([useradd, "--no-create-home", name], capture_output=True, check=False)
        if done.returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.skip(f"useradd failed: {done.stderr.decode().strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        for _ in range(20):
            if subprocess.run([userdel, name], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)


ID_SCRIPT = 'id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; touch made-here && echo wrote'


def ids_from_log(runner: Runner) -> tuple[int, int, list[int], str]:
    lines = runner.log_path(KEY).read_text().splitlines()
    assert lines[4] == "wrote", lines  # the default work dir is the user's to write in
    return int(lines[0]), int(lines[1]), [int(g) for g in lines[2].split()], lines[3]


@needs_root
def test_rank_runs_as_its_owner(runners: Callable[..., Runner], test_user) -> None:
    runner = runners(accounts=AccountPolicy())
    assert runner.start(launch("sh", "-c", ID_SCRIPT, owner=test_user.pw_name)) is None
    assert wait_exit(runner).exit_code == 0
    uid, gid, groups, env = ids_from_log(runner)
    assert (uid, gid) == (test_user.pw_uid, test_user.pw_gid)
    # initgroups-equivalent: the user's own groups, none of root's
    assert sorted(groups) == sorted(os.getgrouplist(test_user.pw_name, test_user.pw_gid))
    name = test_user.pw_name
    assert env == f"{test_user.pw_dir} {name} {name}"


@needs_root
def test_owner_without_an_account_runs_as_the_fallback(
    runners: Callable[..., Runner], test_user
) -> None:
    runner = runners(accounts=AccountPolicy(fallback_user=test_user.pw_name))
    runner.start(launch("sh", "-c", ID_SCRIPT, owner="gpuctl-no-such-user"))
    assert wait_exit(runner).exit_code == 0
    assert ids_from_log(runner)[0] == test_user.pw_uid


@needs_root
@pytest.mark.parametrize(
    ("owner", "policy", "message"),
    [
        ("root", AccountPolicy(), ROOT_REFUSED),
        ("gpuctl-no-such-user", AccountPolicy(fallback_user="root"), ROOT_REFUSED),
        ("", AccountPolicy(fallback_user="root"), ROOT_REFUSED),
        (
            "gpuctl-no-such-user",
            AccountPolicy(fallback_user="gpuctl-no-such-fallback"),
            "no account to run as: neither the owner 'gpuctl-no-such-user' nor "
            "run_as_fallback_user 'gpuctl-no-such-fallback' exists on this node",
        ),
    ],
    ids=["owner-root", "fallback-root", "no-owner-fallback-root", "no-account-at-all"],
)
def test_refused_accounts(
    runners: Callable[..., Runner], owner: str, policy: AccountPolicy, message: str
) -> None:
    runner = runners(accounts=policy)
    refused = runner.start(launch("id", "-u", owner=owner))
    assert refused == RankExit(key=KEY, exit_code=126, message=message)
    assert runner.running() == ()
    assert runner.log_path(KEY).read_text() == f"gpuctl-agent: {message}\n"


@needs_root
def test_root_runs_when_allowed(runners: Callable[..., Runner]) -> None:
    runner = runners(accounts=AccountPolicy(allow_root=True))
    runner.start(launch("id", "-u", owner="root"))
    assert wait_exit(runner).exit_code == 0
    assert runner.log_path(KEY).read_text() == "0\n"


@needs_root
def test_a_working_dir_the_user_cannot_reach_is_refused(
    runners: Callable[..., Runner], test_user, tmp_path: Path
) -> None:
    private = tmp_path / "private"  # under pytest's 0700 directory: root's alone
    private.mkdir()
    runner = runners(accounts=AccountPolicy())
    refused = runner.start(launch("pwd", owner=test_user.pw_name, working_dir=str(private)))
    assert refused is not None and refused.exit_code == 126
    assert refused.message == (
        f"working directory not accessible to {test_user.pw_name}: {private} (Permission denied)"
    )


# Run as the rank's account: what it can reach of the agent's state dir, one line per check.
REACH_SCRIPT = """
touch "$(pwd -P)/made-by-path" && echo cwd-by-absolute-path
ls {state} >/dev/null 2>&1 || echo state-unlisted
ls {state}/work >/dev/null 2>&1 || echo work-unlisted
cat {launch} >/dev/null 2>&1 || echo launch-unreadable
ls {logs} >/dev/null 2>&1 || echo logs-unlisted
"""


@pytest.fixture
def passable_tmp() -> Iterator[Path]:
    """A directory every account may pass through (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="gpuctl-agent-state-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_a_rank_reaches_its_work_dir_by_path_and_nothing_else(
    passable_tmp: Path, clock: FakeClock, test_user
) -> None:
    """The state dir as the agent makes it (0711): a rank's account walks to its own working
    directory by absolute path, and can list nothing and read no log or launch file."""
    state = private_state_dir(passable_tmp / "state", STATE_DIR_MODE)
    runner = Runner(state, base_env=BASE_ENV, clock=clock, accounts=AccountPolicy())
    script = REACH_SCRIPT.format(
        state=state, launch=runner.rank_dir(KEY) / LAUNCH_FILE, logs=state / "logs"
    )
    try:
        runner.start(launch("sh", "-c", script, owner=test_user.pw_name))
        assert wait_exit(runner).exit_code == 0
    finally:
        runner.reap(timeout_s=5)
    assert runner.log_path(KEY).read_text().split() == [
        "cwd-by-absolute-path",
        "state-unlisted",
        "work-unlisted",
        "launch-unreadable",
        "logs-unlisted",
    ]
    work = runner.work_dir(KEY)
    assert (work / "made-by-path").stat().st_uid == test_user.pw_uid
    assert (work.stat().st_uid, work.stat().st_mode & 0o777) == (test_user.pw_uid, 0o700)


class FakePasswd:
    """Two accounts and root; groups: the primary one plus 'video' (44) for alice."""

    ENTRIES = {
        "root": pwd.struct_passwd(("root", "x", 0, 0, "", "/root", "/bin/bash")),
        "alice": pwd.struct_passwd(("alice", "x", 1001, 1001, "", "/home/alice", "/bin/zsh")),
        "nobody": pwd.struct_passwd(("nobody", "x", 65534, 65534, "", "/nonexistent", "")),
        "postgres": pwd.struct_passwd(("postgres", "x", 101, 101, "", "/var/lib/pg", "")),
        "svc": pwd.struct_passwd(("svc", "x", 999, 999, "", "/srv", "")),
    }

    def getpwnam(self, name: str) -> pwd.struct_passwd:
        return self.ENTRIES[name]

    def getpwuid(self, uid: int) -> pwd.struct_passwd:
        return next(e for e in self.ENTRIES.values() if e.pw_uid == uid)

    def getgrouplist(self, user: str, gid: int) -> list[int]:
        return [gid, 44] if user == "alice" else [gid]


ALICE = Account(
    user="alice",
    uid=1001,
    gid=1001,
    groups=(1001, 44),
    home="/home/alice",
    shell="/bin/zsh",
    switch=True,
)
NOBODY = Account(
    user="nobody",
    uid=65534,
    gid=65534,
    groups=(65534,),
    home="/nonexistent",
    shell="/bin/sh",
    switch=True,
)


@pytest.mark.parametrize(
    ("owner", "policy", "euid", "expected"),
    [
        ("alice", AccountPolicy(), 0, ALICE),
        ("bob", AccountPolicy(), 0, NOBODY),  # no account here: the fallback
        ("", AccountPolicy(), 0, NOBODY),
        ("root", AccountPolicy(), 0, Refusal(code=126, message=ROOT_REFUSED)),
        ("bob", AccountPolicy(fallback_user="root"), 0, Refusal(code=126, message=ROOT_REFUSED)),
        (
            "root",
            AccountPolicy(allow_root=True),
            0,
            Account(
                user="root",
                uid=0,
                gid=0,
                groups=(0,),
                home="/root",
                shell="/bin/bash",
                switch=True,
            ),
        ),
        ("bob", AccountPolicy(fallback_user="carol"), 0, "no account to run as"),
        ("postgres", AccountPolicy(), 0, "refusing to run as account 'postgres' is a system"),
        ("svc", AccountPolicy(), 0, "refusing to run as account 'svc' has uid 999, below"),
        (
            "svc",
            AccountPolicy(rules=RunAsPolicy(allow=frozenset({"svc"}))),
            0,
            Account(
                user="svc",
                uid=999,
                gid=999,
                groups=(999,),
                home="/srv",
                shell="/bin/sh",
                switch=True,
            ),
        ),
        # not root: the agent's own account, whoever the owner, and no switching
        ("root", AccountPolicy(), 1001, dataclasses.replace(ALICE, switch=False)),
    ],
    ids=[
        "owner",
        "fallback",
        "no-owner",
        "owner-root",
        "fallback-root",
        "root-allowed",
        "no-fallback",
        "service-account",
        "low-uid",
        "allowed-by-name",
        "agent-not-root",
    ],
)
def test_resolve_account(
    owner: str, policy: AccountPolicy, euid: int, expected: Account | Refusal | str
) -> None:
    got = resolve_account(owner, policy, euid=euid, passwd=FakePasswd())
    if isinstance(expected, str):
        assert isinstance(got, Refusal) and got.message.startswith(expected)
    else:
        assert got == expected


# -- nothing outlives a rank ------------------------------------------------------------------


def test_stop_leaves_nothing_behind(runners: Callable[..., Runner], clock: FakeClock) -> None:
    runner = runners()
    runner.start(launch(sys.executable, "-c", STUBBORN_TREE))
    rank_id = runner.rank_id(KEY)
    wait_log(runner, b"escaped")
    assert len(marked(rank_id)) == 3  # leader, child, and the grandchild in its own session
    runner.stop(KEY, grace_s=0.2)
    clock.advance(0.1)
    assert runner.poll() == []  # all ignore SIGTERM, and the grace has not run out
    clock.advance(0.1)
    rank_exit = wait_exit(runner)
    assert rank_exit.exit_code == -signal.SIGKILL
    assert rank_exit.message == "killed by SIGKILL after the 0.2s stop grace"
    assert marked(rank_id) == []


def test_a_daemonized_grandchild_dies_with_its_rank(runners: Callable[..., Runner]) -> None:
    runner = runners()
    runner.start(launch(sys.executable, "-c", DAEMONIZES))
    rank_id = runner.rank_id(KEY)
    assert wait_exit(runner).exit_code == 0
    assert b"daemon started" in runner.log_path(KEY).read_bytes()
    assert marked(rank_id) == []


def test_containment_is_chosen_once_from_the_host(tmp_path: Path) -> None:
    comm, booted = tmp_path / "comm", tmp_path / "booted"
    comm.write_text("systemd\n")
    booted.mkdir()

    def choose(which: Callable[[str], str | None]) -> object:
        return choose_containment(which=which, pid1_comm=comm, systemd_booted=booted)

    scopes = choose(lambda _: "/usr/bin/systemd-run")
    assert isinstance(scopes, SystemdScopes)
    assert scopes.wrap(KEY, ("python", "-m", "shim")) == (
        "/usr/bin/systemd-run", "--scope", "--quiet", "--collect", "--unit=gpuctl-job-9-1-2",
        "--", "python", "-m", "shim",
    )  # fmt: skip
    assert isinstance(choose(lambda _: None), ProcessGroups)  # no systemd-run
    comm.write_text("tini\n")  # systemd-run installed, but systemd is not PID 1 (a container)
    assert isinstance(choose(lambda _: "/usr/bin/systemd-run"), ProcessGroups)
    assert ProcessGroups().wrap(KEY, ("a", "b")) == ("a", "b")


# -- log cap ----------------------------------------------------------------------------------


def test_a_rank_past_its_log_cap_keeps_running(
    runners: Callable[..., Runner], tmp_path: Path
) -> None:
    cap = 10_000
    # 1 MiB, far more than a pipe holds: a rank whose output were blocked would hang here.
    script = (
        "import sys\n"
        "for i in range(16384): sys.stdout.write(f'{i:063d}\\n')\n"
        "sys.stdout.flush()\n"
        "open('done', 'w').close()\n"
    )
    runner = runners(max_log_bytes=cap)
    runner.start(launch(sys.executable, "-c", script, working_dir=str(tmp_path)))
    assert wait_exit(runner).exit_code == 0
    assert (tmp_path / "done").exists()
    data = runner.log_path(KEY).read_bytes()
    expected = b"".join(f"{i:063d}\n".encode() for i in range(200))
    marker = truncation_marker(cap)
    assert data.endswith(b"\n" + marker)
    assert data[:cap] == expected[:cap]
    assert len(data) <= cap + 1 + len(marker)

    shipped = bytearray()

    def push(_key: RankKey, offset: int, chunk: bytes) -> int:
        if offset == len(shipped):
            shipped.extend(chunk)
        return len(shipped)

    assert LogShipper(push, chunk_bytes=4096).ship(KEY, runner.log_path(KEY))
    assert bytes(shipped) == data


# -- agent restart ----------------------------------------------------------------------------


def test_a_restarted_agent_adopts_a_running_rank_and_reports_its_exit_once(
    runners: Callable[..., Runner], tmp_path: Path
) -> None:
    first = runners()
    workdir = tmp_path / "wd"
    workdir.mkdir()
    first.start(launch(sys.executable, "-c", WAITS_FOR_GO, working_dir=str(workdir)))
    wait_log(first, b"ready")
    del first  # the agent dies; its rank runs on under its supervisor

    second = runners()
    assert second.recover() == Recovery(adopted=(KEY,))
    assert second.running() == (KEY,)
    (workdir / "go").touch()
    assert wait_exit(second) == RankExit(key=KEY, exit_code=7, message="exited with code 7")
    assert second.log_path(KEY).read_bytes() == b"ready\nbye\n"

    # Until the daemon acknowledged the report, a restart reports it again; after, never.
    again = RankExit(key=KEY, exit_code=7, message="exited with code 7")
    assert runners().recover() == Recovery(exits=(again,))
    second.mark_reported(KEY)
    assert runners().recover() == Recovery(reported=(KEY,))


def test_an_adopted_rank_can_be_stopped(runners: Callable[..., Runner], clock: FakeClock) -> None:
    first = runners()
    first.start(launch(sys.executable, "-c", STUBBORN_TREE))
    rank_id = first.rank_id(KEY)
    wait_log(first, b"escaped")
    del first

    second = runners()
    assert second.recover().adopted == (KEY,)
    assert second.stop(KEY, grace_s=0.2)
    clock.advance(0.2)
    rank_exit = wait_exit(second)
    assert (rank_exit.exit_code, rank_exit.message) == (
        -signal.SIGKILL,
        "killed by SIGKILL after the 0.2s stop grace",
    )
    assert marked(rank_id) == []


def test_a_rank_whose_supervisor_died_is_reported_lost_once(
    runners: Callable[..., Runner],
) -> None:
    first = runners()
    first.start(launch(sys.executable, "-c", WAITS_FOR_GO))
    rank_id = first.rank_id(KEY)
    wait_log(first, b"ready")
    shim = read_json(first.rank_dir(KEY) / SHIM_FILE)
    assert shim is not None
    del first
    os.kill(shim["pid"], signal.SIGKILL)
    until(lambda: gone(shim["pid"]))

    second = runners()
    lost = RankExit(key=KEY, exit_code=EXIT_LOST, message=LOST_AFTER_RESTART)
    assert second.recover() == Recovery(exits=(lost,))
    assert marked(rank_id) == []  # the unsupervised rank was found by its marker and killed
    assert second.recover() == Recovery()  # this agent reported it already
    assert runners().recover() == Recovery(exits=(lost,))  # not acknowledged yet
    second.mark_reported(KEY)
    assert runners().recover() == Recovery(reported=(KEY,))
