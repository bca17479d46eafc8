"""gpuctl-agent's composition root: flags over config over defaults, one-line errors with exit
code 2, and the real program against a fake daemon: READY=1, a rank run, a clean SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from gpuctl.agent.main import load_settings, main
from gpuctl.agent.runner import DEFAULT_RANK_ENV_ALLOW
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import jobs_pb2
from gpuctl.api.convert import duration, rank_ref
from gpuctl.core.model import NetKind, Network

REPO = Path(__file__).resolve().parents[1]
HOSTNAME = socket.gethostname()


def test_defaults(tmp_path: Path) -> None:
    s = load_settings([], {"HOME": str(tmp_path)})
    assert s.server == "127.0.0.1:50051"
    assert (s.identity.name, s.identity.address) == (HOSTNAME, "127.0.0.1")
    assert (s.fake_gpus, s.network, s.cpu_milli, s.memory_mib) == (None, Network(), None, None)
    assert s.state_dir == tmp_path / ".local/state/gpuctl-agent"
    assert s.log_level == "info"
    assert (s.run_as_fallback_user, s.allow_root_jobs, s.max_log_bytes) == ("nobody", False, 2**26)


def test_job_safety_settings(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'run_as_fallback_user = "gpuctl-jobs"\nallow_root_jobs = true\nmax_log_bytes = "1GiB"\n'
    )
    s = load_settings(["--config", str(config)], {})
    assert (s.run_as_fallback_user, s.allow_root_jobs, s.max_log_bytes) == (
        "gpuctl-jobs",
        True,
        2**30,
    )
    s = load_settings(["--config", str(config), "--max-log-bytes", "4096"], {})
    assert s.max_log_bytes == 4096
    s = load_settings(["--allow-root-jobs", "--run-as-fallback-user", "jobs"], {})
    assert (s.run_as_fallback_user, s.allow_root_jobs) == ("jobs", True)
    # SIGTERM leaves the ranks to adopt unless told otherwise (file or flag)
    assert load_settings([], {}).stop_ranks_on_exit is False
    config.write_text("stop_ranks_on_exit = true\n")
    assert load_settings(["--config", str(config)], {}).stop_ranks_on_exit is True
    assert load_settings(["--stop-ranks-on-exit"], {}).stop_ranks_on_exit is True
    # What ranks keep of the agent's environment: the file's list, else the default.
    assert load_settings([], {}).rank_env_allow == ("PATH", "LANG", "LC_*", "TZ")
    config.write_text('rank_env_allow = ["PATH", "NCCL_*"]\n')
    assert load_settings(["--config", str(config)], {}).rank_env_allow == ("PATH", "NCCL_*")
    config.write_text("rank_env_allow = []\n")
    assert load_settings(["--config", str(config)], {}).rank_env_allow == ()


@pytest.mark.parametrize(
    ("server", "address"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("localhost:1", "127.0.0.1"),
        ("[::1]:50051", "127.0.0.1"),
        ("head-1.example.internal:50051", HOSTNAME),
        ("10.0.0.5:50051", HOSTNAME),
    ],
)
def test_address_follows_the_server(server: str, address: str) -> None:
    assert load_settings(["--server", server], {}).identity.address == address


def test_several_servers_are_one_list() -> None:
    s = load_settings(["--server", "10.0.0.5:50061, 10.0.0.6:50061"], {})
    assert s.servers == ("10.0.0.5:50061", "10.0.0.6:50061")
    assert s.identity.address == HOSTNAME
    both = load_settings(["--server", "127.0.0.1:50061,[::1]:50062"], {})
    assert both.identity.address == "127.0.0.1"  # every one on loopback


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/gpuctl-agent"}, "/var/lib/gpuctl-agent"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a"),
        ({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, "/x/state/gpuctl-agent"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/gpuctl-agent"),
    ],
    ids=["systemd", "systemd-several", "xdg", "home"],
)
def test_state_dir_default(env: dict[str, str], expected: str) -> None:
    assert load_settings([], env).state_dir == Path(expected)


def test_flags_override_the_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "head:6000"\nname = "from-config"\nfake_gpus = "l4:2"\nnet = "roce:2x200"\n'
        'cpus = 16\nmemory = 65536\nprice_per_hour = 3\nlog_level = "DEBUG"\n'
        '[labels]\nzone = "a"\ntier = "spot"\n'
    )
    s = load_settings(
        ["--config", str(config), "--name", "from-flag", "--memory", "1TiB", "--label", "zone=b"],
        {},
    )
    assert s.server == "head:6000"
    assert s.identity.name == "from-flag"
    assert s.identity.address == HOSTNAME
    assert s.fake_gpus is not None and (s.fake_gpus.sku.model, s.fake_gpus.count) == ("L4", 2)
    assert s.network == Network(kind=NetKind.ROCE, ports=2, gbps_per_port=200)
    assert (s.cpu_milli, s.memory_mib) == (16_000, 1024 * 1024)
    assert s.identity.price_per_hour == 3.0
    assert s.identity.labels == (("tier", "spot"), ("zone", "b"))
    assert s.log_level == "debug"


def test_the_shipped_config_loads() -> None:
    s = load_settings(["--config", str(REPO / "config" / "agent.toml")], {"HOME": "/h"})
    assert s.server == "127.0.0.1:50051" and s.fake_gpus is None and s.identity.labels == ()
    assert s.rank_env_allow == DEFAULT_RANK_ENV_ALLOW  # the file documents the default


@pytest.mark.parametrize(
    ("argv", "config", "needle"),
    [
        (["--bogus"], None, "unrecognized arguments: --bogus"),
        (["--fake-gpus", "x100:8"], None, "unknown GPU 'x100'"),
        (["--net", "infiniband"], None, "want KIND:PORTSxGBPS"),
        (["--memory", "lots"], None, "bad memory size 'lots'"),
        (["--cpus", "0"], None, "bad CPU count '0'"),
        (["--server", "nohost"], None, "bad --server 'nohost'"),
        (["--server", "h:99999"], None, "bad --server 'h:99999'"),
        (["--server", "head1:50061,nohost"], None, "bad --server 'nohost'"),
        (["--server", ","], None, "bad --server ','"),
        (["--label", "novalue"], None, "bad --label 'novalue'"),
        (["--price-per-hour", "-1"], None, "must not be negative"),
        (["--price-per-hour", "cheap"], None, "want a number of USD"),
        (["--log-level", "loud"], None, "invalid choice: 'loud'"),
        (["--config", "/nonexistent/agent.toml"], None, "cannot read config"),
        ([], "fake_gpu = 'h100'\n", "unknown key 'fake_gpu'"),
        ([], "cpus = true\n", "bad value for 'cpus'"),
        ([], "labels = 3\n", "bad value for 'labels'"),
        ([], "[labels]\nzone = 1\n", "bad value for label 'zone'"),
        ([], "server = \n", "bad TOML"),
        ([], "log_level = 'loud'\n", "bad log_level 'loud'"),
        (["--max-log-bytes", "lots"], None, "bad --max-log-bytes 'lots'"),
        ([], "max_log_bytes = 0\n", "bad --max-log-bytes 0"),
        ([], "allow_root_jobs = 'yes'\n", "bad value for 'allow_root_jobs'"),
        ([], "run_as_fallback_user = ''\n", "bad --run-as-fallback-user"),
        ([], "rank_env_allow = 'PATH'\n", "bad value for 'rank_env_allow'"),
        ([], "rank_env_allow = ['PATH', 3]\n", "bad value in 'rank_env_allow'"),
        ([], "rank_env_allow = ['']\n", "bad value in 'rank_env_allow'"),
        ([], "rank_env_allow = ['AWS_KEY=x']\n", "bad value in 'rank_env_allow'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    config: str | None,
    needle: str,
) -> None:
    if config is not None:
        (tmp_path / "agent.toml").write_text(config)
        argv = [*argv, "--config", str(tmp_path / "agent.toml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpuctl-agent: ")
    assert needle in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--fake-gpus" in capsys.readouterr().out


# -- the program -----------------------------------------------------------------------------


class Daemon(agent_pb2_grpc.AgentServiceServicer):
    """Assigns one rank to whoever registers; records the reports."""

    def __init__(self) -> None:
        self.registered = threading.Event()
        self.reports: list[agent_pb2.ReportRankStatusRequest] = []
        self.assignment = agent_pb2.Assignment(
            ref=rank_ref(1, 0, 0), command=["sleep", "60"], kill_grace=duration(5)
        )

    def RegisterNode(self, request, context):
        self.authorization = dict(context.invocation_metadata()).get("authorization")
        self.node = request.node
        self.running = tuple(request.running)
        self.registered.set()
        return agent_pb2.RegisterNodeResponse(
            node_name=request.node.name, heartbeat_interval=duration(0.2)
        )

    def Heartbeat(self, request, context):
        return agent_pb2.HeartbeatResponse(assignments=[self.assignment])

    def ReportRankStatus(self, request, context):
        self.reports.append(request)
        return agent_pb2.ReportRankStatusResponse()

    def PushLogs(self, request, context):
        return agent_pb2.PushLogsResponse(next_offset=request.offset + len(request.data))


@pytest.fixture
def daemon() -> Iterator[tuple[Daemon, int]]:
    fake = Daemon()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, port
    server.stop(grace=None)


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.token"
    path.write_text("gpuctl.node9.secret\n")
    path.chmod(0o600)
    return path


def until(condition: Callable[[], object], proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the agent exited with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_agent_registers_runs_and_stops_its_ranks_on_sigterm_when_told(
    daemon: tuple[Daemon, int], tmp_path: Path
) -> None:
    fake, port = daemon
    # sun_path is 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="agt-") as short:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"{short}/notify")
        notify.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": f"{short}/notify"}
        with socket.socket() as s:  # the first of the two gpuctld is down: the agent goes on
            s.bind(("127.0.0.1", 0))
            down = f"127.0.0.1:{s.getsockname()[1]}"
        argv = [
            sys.executable, "-m", "gpuctl.agent.main",
            "--server", f"{down},127.0.0.1:{port}", "--name", "gpu-9", "--fake-gpus", "l40s:4",
            "--net", "ethernet:2x100", "--state-dir", str(tmp_path / "state"),
            "--cpus", "8", "--memory", "64GiB", "--label", "pool=test", "--stop-ranks-on-exit",
            "--token-file", str(token_file(tmp_path)),
        ]  # fmt: skip
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        try:
            # Ready once it runs, then its status once gpuctld (the second address) knows it.
            assert notify.recv(4096) == b"READY=1\nSTATUS=registering with gpuctld"
            assert notify.recv(4096) == b"STATUS=registered as gpu-9"
            assert fake.registered.is_set()
            assert fake.authorization == "Bearer gpuctl.node9.secret"  # on every call
            assert (fake.node.name, len(fake.node.profile.gpus)) == ("gpu-9", 4)
            assert (fake.node.cpu_milli, fake.node.memory_mib) == (8000, 65536)
            until(lambda: fake.reports, proc)
            assert fake.reports[0].state == jobs_pb2.RANK_STATE_RUNNING
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()
    assert proc.returncode == 0, stderr
    last = fake.reports[-1]
    assert (last.state, last.exit_code) == (jobs_pb2.RANK_STATE_EXITED, -signal.SIGTERM)


def test_a_restarted_agent_keeps_its_ranks_running_and_adopts_them(
    daemon: tuple[Daemon, int], tmp_path: Path
) -> None:
    # The default: SIGTERM (systemctl restart) leaves the rank to its supervisor; the next agent
    # on the same state dir registers it as running, and reports its exit when it ends.
    fake, port = daemon
    # The rank may run as another account (nobody, under a root agent): a place it can see.
    shared = Path(tempfile.mkdtemp(prefix="agt-"))
    shared.chmod(0o755)
    done = shared / "done"
    fake.assignment = agent_pb2.Assignment(
        ref=rank_ref(1, 0, 0),
        command=["sh", "-c", f"until [ -e {done} ]; do sleep 0.05; done"],
        kill_grace=duration(5),
    )
    argv = [
        sys.executable, "-m", "gpuctl.agent.main", "--server", f"127.0.0.1:{port}",
        "--name", "gpu-9", "--fake-gpus", "l40s:1", "--state-dir", str(tmp_path / "state"),
        "--token-file", str(token_file(tmp_path)),
    ]  # fmt: skip
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: fake.reports, first)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=20)
        assert first.returncode == 0, stderr
        assert "leaving 1 rank(s) running" in stderr
        assert [r.state for r in fake.reports] == [jobs_pb2.RANK_STATE_RUNNING]

        fake.registered.clear()
        second = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            until(fake.registered.is_set, second)
            assert [(r.job_id, r.rank, r.attempt) for r in fake.running] == [(1, 0, 0)]
            done.touch()
            until(lambda: fake.reports[-1].state == jobs_pb2.RANK_STATE_EXITED, second)
            assert fake.reports[-1].exit_code == 0
        finally:
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=20)
    finally:
        done.touch()  # whatever happened above, the rank ends
        if first.poll() is None:
            first.kill()
            first.wait()
        shutil.rmtree(shared, ignore_errors=True)


def test_the_agents_secrets_stay_out_of_its_ranks(
    daemon: tuple[Daemon, int], tmp_path: Path
) -> None:
    """The program as deployed: its environment holds a credential, agent.toml allows a glob;
    the rank sees what is allowed and its launch contract, not the credential."""
    fake, port = daemon
    fake.assignment = agent_pb2.Assignment(
        ref=rank_ref(1, 0, 0), command=["env"], env={"JOB_VAR": "mine"}, kill_grace=duration(5)
    )
    config = tmp_path / "agent.toml"
    config.write_text('rank_env_allow = ["PATH", "KEEP_*"]\n')
    token = tmp_path / "node.token"
    token.write_text("node-token\n")  # the fake daemon takes any
    token.chmod(0o600)
    state = tmp_path / "state"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "KEEP_ME": "1"}
    argv = [
        sys.executable, "-m", "gpuctl.agent.main", "--config", str(config),
        "--server", f"127.0.0.1:{port}", "--fake-gpus", "l40s:1", "--state-dir", str(state),
        "--token-file", str(token), "--stop-ranks-on-exit",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: any(r.state == jobs_pb2.RANK_STATE_EXITED for r in fake.reports), proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    seen = dict(
        line.split("=", 1)
        for line in (state / "logs" / "1" / "0" / "rank-0.log").read_text().splitlines()
        if "=" in line
    )
    assert (seen.get("KEEP_ME"), seen.get("JOB_VAR")) == ("1", "mine")
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert stat.S_IMODE(state.stat().st_mode) == 0o711


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param([], "no credential: --join TOKEN", id="no-credential"),
        pytest.param(["--token-file", "/nonexistent/t"], "cannot read", id="unreadable-token"),
        pytest.param(
            ["--token-file", "TOKEN", "--server", "10.1.2.3:50051"],
            "is not on loopback: give --ca-file",
            id="plain-tcp-off-loopback",
        ),
        pytest.param(
            ["--token-file", "TOKEN", "--server", "127.0.0.1:50051,10.1.2.3:50051"],
            "--server 10.1.2.3:50051 is not on loopback: give --ca-file",
            id="one-of-several-off-loopback",
        ),
    ],
)
def test_the_agent_refuses_to_start_without_a_safe_credential(tmp_path, extra, message):
    argv = [a if a != "TOKEN" else str(token_file(tmp_path)) for a in extra]
    proc = subprocess.run(
        [sys.executable, "-m", "gpuctl.agent.main", "--name", "gpu-9", "--fake-gpus", "l40s:1",
         "--state-dir", str(tmp_path / "state"), *argv],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_relative_state_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(["--state-dir", "agent-state", "--fake-gpus", "l40s:1"], {})
    assert settings.state_dir == tmp_path / "agent-state"
