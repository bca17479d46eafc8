"""The runner against real processes: exit codes, the environment contract, log files, stops
that escalate to SIGKILL for a whole process group, and launches that cannot start.

Time is a fake clock: a stop's grace runs out when the test advances it, not by sleeping. The
only waiting is for real processes to start or die, bounded by `until`.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gpuctl.agent.runner import (
    DEFAULT_RANK_PATH,
    Account,
    AccountPolicy,
    Launch,
    RankExit,
    RankKey,
    Runner,
    child_env,
)
from gpuctl.agent.shim import LAUNCH_FILE, LEASE_FILE, lease_action
from tests.agent_rig import FakeClock, until

KEY = RankKey(job_id=7, rank=0, attempt=1)
BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "LANG": "C.UTF-8",
    "KEEP_ME": "1",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000",
    "WATCHDOG_PID": "1234",
    "GPUCTL_AGENT_TOKEN": "secret",
    "GPUCTL_JOB_ID": "stale",
}
# The tests' own account, root included: their commands are this interpreter, which another
# account may not be able to run. tests/test_agent_safety.py covers switching accounts.
AS_ME = AccountPolicy(fallback_user=pwd.getpwuid(os.geteuid()).pw_name, allow_root=True)

# Ignores SIGTERM, forks a child that inherits the SIG_IGN, prints both pids, then waits.
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print("pids", os.getpid(), child, flush=True)
time.sleep(60)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def runner(tmp_path: Path, clock: FakeClock) -> Iterator[Runner]:
    r = Runner(tmp_path / "state", base_env=BASE_ENV, clock=clock, accounts=AS_ME)
    yield r
    r.reap(timeout_s=5)


def launch(*command: str, key: RankKey = KEY, **kw: object) -> Launch:
    return Launch(key=key, command=command, **kw)  # type: ignore[arg-type]


def wait_exit(runner: Runner) -> RankExit:
    exits: list[RankExit] = []
    until(lambda: exits.extend(runner.poll()) or exits)
    assert len(exits) == 1
    return exits[0]


def pids_from_log(runner: Runner, key: RankKey = KEY) -> list[int]:
    path = runner.log_path(key)
    until(lambda: b"pids" in path.read_bytes())
    return [int(p) for p in path.read_text().split()[1:3]]


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        (("sh", "-c", "exit 0"), 0, "exited with code 0"),
        (("sh", "-c", "exit 3"), 3, "exited with code 3"),
        (("sh", "-c", "kill -SEGV $$"), -signal.SIGSEGV, "killed by SIGSEGV"),
    ],
    ids=["zero", "three", "segv"],
)
def test_exit_codes(runner: Runner, command: tuple[str, ...], code: int, message: str) -> None:
    assert runner.start(launch(*command)) is None
    assert runner.running() == (KEY,)
    assert wait_exit(runner) == RankExit(key=KEY, exit_code=code, message=message)
    assert runner.running() == ()


def dump_env(runner: Runner, env: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """The environment a real rank started by `runner` sees."""
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    runner.start(launch(sys.executable, "-c", dump, env=env))
    assert wait_exit(runner).exit_code == 0
    return json.loads(runner.log_path(KEY).read_text())


def test_env_contract_passed_and_agent_variables_stripped(runner: Runner) -> None:
    env = (("CUDA_VISIBLE_DEVICES", "2,3"), ("MASTER_ADDR", "10.0.0.1"), ("GPUCTL_JOB_ID", "7"))
    seen = dump_env(runner, env)
    assert seen["CUDA_VISIBLE_DEVICES"] == "2,3"  # the assignment wins over the agent's own
    assert seen["MASTER_ADDR"] == "10.0.0.1"
    assert seen["GPUCTL_JOB_ID"] == "7"
    assert (seen["PATH"], seen["LANG"]) == (BASE_ENV["PATH"], "C.UTF-8")  # allow-listed
    for stripped in (
        "AWS_SECRET_ACCESS_KEY",  # not allow-listed: the agent's credentials stay the agent's
        "KEEP_ME",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "GPUCTL_AGENT_TOKEN",
    ):
        assert stripped not in seen


@pytest.mark.parametrize(
    ("allow", "passed", "kept_out"),
    [
        (("PATH", "KEEP_*"), {"KEEP_ME": "1"}, ("AWS_SECRET_ACCESS_KEY", "LANG")),
        # Even "everything" keeps the agent's systemd and gpuctl variables to itself.
        (("*",), {"KEEP_ME": "1", "AWS_SECRET_ACCESS_KEY": BASE_ENV["AWS_SECRET_ACCESS_KEY"]},
         ("NOTIFY_SOCKET", "GPUCTL_AGENT_TOKEN")),
    ],
    ids=["glob", "everything"],
)  # fmt: skip
def test_the_allow_list_is_the_runners(
    tmp_path: Path,
    clock: FakeClock,
    allow: tuple[str, ...],
    passed: dict[str, str],
    kept_out: tuple[str, ...],
) -> None:
    r = Runner(tmp_path / "state", base_env=BASE_ENV, clock=clock, accounts=AS_ME, env_allow=allow)
    try:
        seen = dump_env(r)
    finally:
        r.reap(timeout_s=5)
    assert {k: seen.get(k) for k in passed} == passed
    assert not set(kept_out) & set(seen)


SECRET = "AWS_SECRET_ACCESS_KEY"
ALICE = Account(
    user="alice", uid=1001, gid=1001, groups=(1001,), home="/home/alice", shell="/bin/zsh",
    switch=True,
)  # fmt: skip
ALICE_ENV = {"HOME": "/home/alice", "USER": "alice", "LOGNAME": "alice", "SHELL": "/bin/zsh"}

# fmt: off
CHILD_ENV_CASES = [
    # id,                  agent's env,                                           allow,                  job's env,                      expected rank env (plus the account's)
    ("defaults",           {"PATH": "/a", "LANG": "C", "LC_ALL": "C", "LC_TIME": "x",
                            "TZ": "UTC", SECRET: "k", "TERM": "xterm", "LD_PRELOAD": "x"},
                                                                                  None,                   {},                             {"PATH": "/a", "LANG": "C", "LC_ALL": "C", "LC_TIME": "x", "TZ": "UTC"}),
    ("no-path-default",    {"LANG": "C"},                                         None,                   {},                             {"PATH": DEFAULT_RANK_PATH, "LANG": "C"}),
    ("path-not-allowed",   {"PATH": "/opt/agent/bin"},                            ("LANG",),              {},                             {"PATH": DEFAULT_RANK_PATH}),
    ("glob",               {"NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "WARN", "NCCLX": "1"},
                                                                                  ("NCCL_*",),            {},                             {"PATH": DEFAULT_RANK_PATH, "NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "WARN"}),
    ("glob-class",         {"LC_ALL": "C", "LANG": "C", "LANGUAGE": "en"},        ("LAN[G]",),            {},                             {"PATH": DEFAULT_RANK_PATH, "LANG": "C"}),
    ("case-sensitive",     {"LC_ALL": "C", "path": "/x"},                         ("lc_*", "PATH"),       {},                             {"PATH": DEFAULT_RANK_PATH}),
    ("nothing-allowed",    {"PATH": "/a", SECRET: "k"},                           (),                     {},                             {"PATH": DEFAULT_RANK_PATH}),
    ("star-keeps-agent's", {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1", "LISTEN_FDS": "3",
                            "GPUCTL_TOKEN": "t", "GPUCTL_AGENT_X": "x", "GPUCTL_JOB_ID": "stale", "A": "b"},
                                                                                  ("*",),                 {},                             {"PATH": DEFAULT_RANK_PATH, "A": "b"}),
    ("account-over-agent", {"HOME": "/root", "USER": "root"},                     ("*",),                 {},                             {"PATH": DEFAULT_RANK_PATH}),
    ("job-over-all",       {"PATH": "/a", "LANG": "C"},                           None,                   {"PATH": "/job", "HOME": "/j", SECRET: "mine"},
                                                                                                                                          {"PATH": "/job", "LANG": "C", "HOME": "/j", SECRET: "mine"}),
]
# fmt: on


@pytest.mark.parametrize(
    ("base", "allow", "job", "expected"),
    [c[1:] for c in CHILD_ENV_CASES],
    ids=[c[0] for c in CHILD_ENV_CASES],
)
def test_child_env(
    base: dict[str, str],
    allow: tuple[str, ...] | None,
    job: dict[str, str],
    expected: dict[str, str],
) -> None:
    kw = {} if allow is None else {"allow": allow}
    env = child_env(base, launch("true", env=tuple(job.items())), ALICE, **kw)
    assert env == {**ALICE_ENV, **expected}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask: the modes below must come from the code, not from the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_rank_files_are_private(runner: Runner, tmp_path: Path) -> None:
    """Logs and launch files hold what the job prints and its environment: owner only."""
    runner.start(launch("sh", "-c", "echo hi", env=(("WANDB_API_KEY", "secret"),)))
    wait_exit(runner)
    state = tmp_path / "state"
    files = (runner.log_path(KEY), runner.rank_dir(KEY) / LAUNCH_FILE)
    assert "WANDB_API_KEY" in files[1].read_text()
    assert {f.name: mode(f) for f in files} == {"rank-0.log": 0o600, LAUNCH_FILE: 0o600}
    dirs = {
        str(d.relative_to(state)): mode(d)
        for top in ("logs", "ranks", "work")
        for d in (state / top, *(state / top).rglob("*"))
        if d.is_dir()
    }
    assert dirs == {
        "logs": 0o700,
        "logs/7": 0o700,
        "logs/7/1": 0o700,
        "ranks": 0o700,
        "ranks/7.0.1": 0o700,
        # Passed through, never listed, on the way to the rank's own (STATE_DIR_MODE).
        "work": 0o711,
        "work/7": 0o711,
        "work/7/1": 0o711,
        "work/7/1/rank-0": 0o700,
    }
    assert all(mode(f) == 0o600 for f in runner.rank_dir(KEY).iterdir())


def test_log_file_has_stdout_and_stderr_and_the_layout(runner: Runner, tmp_path: Path) -> None:
    key = RankKey(job_id=42, rank=3, attempt=2)
    runner.start(launch("sh", "-c", "echo out; echo err >&2; pwd", key=key))
    wait_exit(runner)
    path = tmp_path / "state" / "logs" / "42" / "2" / "rank-3.log"
    assert runner.log_path(key) == path
    lines = path.read_text().splitlines()
    assert lines[:2] == ["out", "err"]
    # no working_dir: a directory of the rank's own
    assert Path(lines[2]) == (tmp_path / "state" / "work" / "42" / "2" / "rank-3").resolve()


def test_working_dir(runner: Runner, tmp_path: Path) -> None:
    runner.start(launch("pwd", working_dir=str(tmp_path)))
    wait_exit(runner)
    assert Path(runner.log_path(KEY).read_text().strip()) == tmp_path.resolve()


def test_stop_escalates_to_sigkill_for_the_whole_group(runner: Runner, clock: FakeClock) -> None:
    runner.start(launch(sys.executable, "-c", STUBBORN))
    leader, child = pids_from_log(runner)
    assert runner.stop(KEY, grace_s=0.2)
    assert runner.next_deadline() == clock.t + 0.2
    clock.advance(0.1)
    assert runner.poll() == []  # both ignore SIGTERM and the grace has not run out
    assert not gone(leader) and not gone(child)
    clock.advance(0.1)
    rank_exit = wait_exit(runner)
    assert rank_exit.exit_code == -signal.SIGKILL
    assert rank_exit.message == "killed by SIGKILL after the 0.2s stop grace"
    until(lambda: gone(leader) and gone(child))


def test_stop_uses_the_launch_grace_by_default(runner: Runner, clock: FakeClock) -> None:
    runner.start(launch(sys.executable, "-c", STUBBORN, kill_grace_s=5.0))
    pids_from_log(runner)
    runner.stop(KEY)
    assert runner.next_deadline() == clock.t + 5.0
    runner.stop(KEY, grace_s=60)  # a second stop never extends the grace
    assert runner.next_deadline() == clock.t + 5.0


def test_stop_of_a_well_behaved_rank(runner: Runner) -> None:
    runner.start(launch("sleep", "60"))
    assert runner.stop(KEY, grace_s=30)
    assert wait_exit(runner) == RankExit(
        key=KEY, exit_code=-signal.SIGTERM, message="stopped by SIGTERM"
    )


def test_stop_of_an_unknown_rank(runner: Runner) -> None:
    assert not runner.stop(RankKey(job_id=1, rank=0, attempt=0), grace_s=0)


def test_leftovers_in_the_group_are_killed_when_the_leader_exits(runner: Runner) -> None:
    runner.start(launch("sh", "-c", 'sleep 60 & echo "pids $$ $!"'))
    _leader, background = pids_from_log(runner)
    assert wait_exit(runner).exit_code == 0
    until(lambda: gone(background))


@pytest.mark.parametrize(
    ("command", "working_dir", "code", "message"),
    [
        (("gpuctl-no-such-command-x",), "", 127, "command not found: gpuctl-no-such-command-x"),
        (("/nonexistent/bin/train",), "", 127, "command not found: /nonexistent/bin/train"),
        ((), "", 127, "empty command"),
        (("",), "", 127, "empty command"),
        (("true",), "/nonexistent-dir", 127, "working directory not found: /nonexistent-dir"),
        (("{tmp}/data.txt",), "", 126, "permission denied: {tmp}/data.txt"),
        (("{tmp}/garbage",), "", 126, "cannot execute {tmp}/garbage: Exec format error"),
    ],
    ids=["missing", "missing-path", "empty", "empty-word", "no-cwd", "no-x-bit", "not-a-program"],
)
def test_launches_that_cannot_start(
    runner: Runner,
    tmp_path: Path,
    command: tuple[str, ...],
    working_dir: str,
    code: int,
    message: str,
) -> None:
    (tmp_path / "data.txt").write_text("not a program\n")
    (tmp_path / "garbage").write_bytes(b"\x00\x01\x02\x03")
    (tmp_path / "garbage").chmod(0o755)
    command = tuple(word.format(tmp=tmp_path) for word in command)
    message = message.format(tmp=tmp_path)
    refused = runner.start(launch(*command, working_dir=working_dir))
    assert refused == RankExit(key=KEY, exit_code=code, message=message)
    assert runner.running() == ()
    assert runner.log_path(KEY).read_text() == f"gpuctl-agent: {message}\n"


def test_starting_a_running_rank_twice_is_a_bug(runner: Runner) -> None:
    runner.start(launch("sleep", "60"))
    with pytest.raises(ValueError, match="already running"):
        runner.start(launch("sleep", "60"))


def test_reap_kills_everything(runner: Runner) -> None:
    runner.start(launch(sys.executable, "-c", STUBBORN))
    leader, child = pids_from_log(runner)
    [rank_exit] = runner.reap(timeout_s=5)
    assert rank_exit.exit_code == -signal.SIGKILL
    assert runner.running() == ()
    until(lambda: gone(leader) and gone(child))


# -- fencing by the supervisor: the node's lease ------------------------------------------


@pytest.mark.parametrize(
    ("lease", "now", "action"),
    [
        (None, 5.0, None),  # no lease written: no limit
        ({"stop_at": "soon"}, 5.0, None),  # unreadable: no limit, never a stop by accident
        ({"stop_at": 10.0, "kill_at": 12.0}, 9.9, None),
        ({"stop_at": 10.0, "kill_at": 12.0}, 10.0, signal.SIGTERM),
        ({"stop_at": 10.0, "kill_at": 12.0}, 12.0, signal.SIGKILL),
    ],
)
def test_what_the_lease_asks_of_a_rank(lease, now, action) -> None:
    assert lease_action(lease, now) == action


def test_a_rank_whose_lease_ran_out_is_stopped_by_its_supervisor_alone(runner: Runner) -> None:
    # Nobody asks this rank to stop: its supervisor does, once the lease the agent stopped
    # renewing (here: the agent is as good as dead) runs out.
    runner.lease(60.0)
    sleeper = "import time; print('pids 0 0', flush=True); time.sleep(60)"
    assert runner.start(launch(sys.executable, "-c", sleeper)) is None
    pids_from_log(runner)
    runner.lease(0.0, 60.0)
    done = wait_exit(runner)
    assert done.exit_code == -signal.SIGTERM
    assert "fenced: no word from gpuctld" in done.message


def test_a_fenced_rank_that_ignores_sigterm_is_killed_at_the_leases_end(
    runner: Runner, tmp_path: Path
) -> None:
    # A stop grace far longer than the lease: the lease's end wins, so the rank is gone
    # before gpuctld can call the node lost and start it elsewhere.
    assert runner.start(launch(sys.executable, "-c", STUBBORN, kill_grace_s=600.0)) is None
    rank, child = pids_from_log(runner)
    runner.lease(0.0, 0.5)
    done = wait_exit(runner)
    assert done.exit_code == -signal.SIGKILL
    assert "fenced" in done.message
    assert gone(rank) and gone(child)
    runner.lease(None)  # no timeout: no limit
    assert not (tmp_path / "state" / LEASE_FILE).exists()
