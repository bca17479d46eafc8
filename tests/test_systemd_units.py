"""The systemd units under systemd/: `systemd-analyze verify` accepts them, and key lines hold."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNITS = ("gpuctld.service", "gpuctl-agent.service")
# systemd 252 says "Unknown key 'X' in section [S]" / "Unknown section 'S'"; older versions
# said "Unknown lvalue 'X'". Any of them means a typo systemd silently ignores at runtime.
UNKNOWN = re.compile(r"Unknown (key|section|lvalue)", re.IGNORECASE)

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Section → key → values in order (units repeat keys, so configparser will not do)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(unit: str) -> dict[str, list[str]]:
    return parse_unit((SYSTEMD_DIR / unit).read_text())["Service"]


def runnable_copy(unit: str, dest: Path) -> Path:
    """The unit with ExecStart's binary swapped for one that exists; verify checks it does."""
    true = shutil.which("true") or "/bin/true"
    text = re.sub(
        r"^(ExecStart=[-@:+!]*)\S+", rf"\g<1>{true}", (SYSTEMD_DIR / unit).read_text(), flags=re.M
    )
    path = dest / unit
    path.write_text(text)
    return path


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        # --recursive-errors=no: judge these units, not whatever the host's own units are like.
        [ANALYZE, "verify", "--man=no", "--recursive-errors=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def analyze_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip where systemd-analyze exists but cannot run here (some containers)."""
    probe = tmp_path_factory.mktemp("probe") / "probe.service"
    probe.write_text(f"[Service]\nExecStart={shutil.which('true') or '/bin/true'}\n")
    result = verify(probe)
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify cannot run here: {result.stderr.strip()[:200]}")


@needs_analyze
@pytest.mark.usefixtures("analyze_works")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    result = verify(runnable_copy(unit, tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"systemd-analyze verify {unit} failed:\n{output}"
    assert not UNKNOWN.search(output), f"{unit} has keys systemd does not know:\n{output}"


@needs_analyze
@pytest.mark.usefixtures("analyze_works")
def test_verify_catches_unknown_keys(tmp_path: Path) -> None:
    """The check above is only worth something if a typo makes it fail."""
    path = runnable_copy("gpuctld.service", tmp_path)
    path.write_text(path.read_text().replace("WatchdogSec=", "WatchDogSec="))
    result = verify(path)
    assert UNKNOWN.search(result.stdout + result.stderr)


@pytest.mark.parametrize(
    ("unit", "key", "expected"),
    [
        pytest.param("gpuctld.service", "Type", "notify", id="gpuctld-type"),
        pytest.param("gpuctld.service", "NotifyAccess", "main", id="gpuctld-notify-access"),
        pytest.param("gpuctld.service", "WatchdogSec", "30s", id="gpuctld-watchdog"),
        pytest.param("gpuctld.service", "Restart", "on-failure", id="gpuctld-restart"),
        pytest.param("gpuctld.service", "KillMode", "mixed", id="gpuctld-killmode"),
        pytest.param("gpuctld.service", "User", "gpuctl", id="gpuctld-user"),
        pytest.param("gpuctl-agent.service", "Type", "notify", id="agent-type"),
        pytest.param("gpuctl-agent.service", "Restart", "always", id="agent-restart"),
        # Job processes must outlive an agent that died; the restarted agent adopts them.
        pytest.param("gpuctl-agent.service", "KillMode", "process", id="agent-killmode"),
        pytest.param("gpuctl-agent.service", "Delegate", "yes", id="agent-delegate"),
    ],
)
def test_unit_settings(unit: str, key: str, expected: str) -> None:
    assert service(unit).get(key) == [expected]


def test_gpuctld_watchdog_is_set() -> None:
    (value,) = service("gpuctld.service")["WatchdogSec"]
    assert value not in ("", "0", "infinity")


def test_gpuctld_sandbox() -> None:
    svc = service("gpuctld.service")
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert "User" in svc or svc.get("DynamicUser") == ["yes"]


# fmt: off
HARDENING = [
    # id,                       unit,                   key,                        values
    ("gpuctld-state-0700",      "gpuctld.service",      "StateDirectoryMode",       ["0700"]),
    ("gpuctld-umask",           "gpuctld.service",      "UMask",                    ["0077"]),
    ("gpuctld-runtime-dir",     "gpuctld.service",      "RuntimeDirectory",         ["gpuctl"]),
    # The local API socket's directory: users must reach /run/gpuctl/gpuctld.sock.
    ("gpuctld-runtime-0755",    "gpuctld.service",      "RuntimeDirectoryMode",     ["0755"]),
    ("gpuctld-protect-proc",    "gpuctld.service",      "ProtectProc",              ["invisible"]),
    ("gpuctld-proc-subset",     "gpuctld.service",      "ProcSubset",               ["pid"]),
    ("gpuctld-private-tmp",     "gpuctld.service",      "PrivateTmp",               ["yes"]),
    ("gpuctld-private-devices", "gpuctld.service",      "PrivateDevices",           ["yes"]),
    ("gpuctld-protect-home",    "gpuctld.service",      "ProtectHome",              ["yes"]),
    ("gpuctld-mdwe",            "gpuctld.service",      "MemoryDenyWriteExecute",   ["yes"]),
    ("gpuctld-syscalls",        "gpuctld.service",      "SystemCallFilter",         ["@system-service", "~@privileged @resources"]),
    # OpenBLAS calls mbind(2) when numpy is imported: EPERM, which it ignores, not SIGSYS.
    ("gpuctld-syscall-errno",   "gpuctld.service",      "SystemCallErrorNumber",    ["EPERM"]),
    ("gpuctld-syscall-arch",    "gpuctld.service",      "SystemCallArchitectures",  ["native"]),
    ("gpuctld-families",        "gpuctld.service",      "RestrictAddressFamilies",  ["AF_UNIX AF_INET AF_INET6"]),
    ("gpuctld-namespaces",      "gpuctld.service",      "RestrictNamespaces",       ["yes"]),
    ("gpuctld-remove-ipc",      "gpuctld.service",      "RemoveIPC",                ["yes"]),
    # Others may pass through to their ranks' working directories, never list it.
    ("agent-state-0711",        "gpuctl-agent.service", "StateDirectoryMode",       ["0711"]),
    ("agent-capabilities",      "gpuctl-agent.service", "CapabilityBoundingSet",
     ["CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_SYS_ADMIN"]),
    ("agent-protect-system",    "gpuctl-agent.service", "ProtectSystem",            ["full"]),
    ("agent-tunables",          "gpuctl-agent.service", "ProtectKernelTunables",    ["yes"]),
    ("agent-modules",           "gpuctl-agent.service", "ProtectKernelModules",     ["yes"]),
    ("agent-kernel-logs",       "gpuctl-agent.service", "ProtectKernelLogs",        ["yes"]),
    ("agent-clock",             "gpuctl-agent.service", "ProtectClock",             ["yes"]),
    ("agent-hostname",          "gpuctl-agent.service", "ProtectHostname",          ["yes"]),
    ("agent-realtime",          "gpuctl-agent.service", "RestrictRealtime",         ["yes"]),
    ("agent-personality",       "gpuctl-agent.service", "LockPersonality",          ["yes"]),
    ("agent-syscall-arch",      "gpuctl-agent.service", "SystemCallArchitectures",  ["native"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("unit", "key", "values"), [c[1:] for c in HARDENING], ids=[c[0] for c in HARDENING]
)
def test_hardening(unit: str, key: str, values: list[str]) -> None:
    assert service(unit).get(key) == values


# Ranks inherit the agent's sandbox: these would break jobs, so each stays out of the agent's
# unit, and its comments say why (a "#  - " line that names it).
AGENT_LEFT_OUT = (
    "NoNewPrivileges",
    "RestrictSUIDSGID",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "DeviceAllow",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "RestrictNamespaces",
    "PrivateUsers",
    "PrivateMounts",
    "RestrictAddressFamilies",
    "PrivateNetwork",
    "IPAddressDeny",
    "SystemCallFilter",
    "MemoryDenyWriteExecute",
    "UMask",
)
GPUCTLD_LEFT_OUT = ("PrivateNetwork", "IPAddressDeny", "PrivateUsers", "RootDirectory")


@pytest.mark.parametrize(
    ("unit", "key"),
    [("gpuctl-agent.service", k) for k in AGENT_LEFT_OUT]
    + [("gpuctld.service", k) for k in GPUCTLD_LEFT_OUT],
    ids=[f"agent-{k}" for k in AGENT_LEFT_OUT] + [f"gpuctld-{k}" for k in GPUCTLD_LEFT_OUT],
)
def test_left_out_with_a_reason(unit: str, key: str) -> None:
    assert key not in service(unit)
    reasons = [
        line for line in (SYSTEMD_DIR / unit).read_text().splitlines() if line.startswith("#  - ")
    ]
    assert any(f"{key}=" in line for line in reasons), f"{unit}: no comment says why not {key}="


# `systemd-analyze security --offline=yes` exposure, 0 (locked down) to 10. Measured on systemd
# 252: gpuctld 1.2 (3.2 before its hardening), the agent 7.2 (8.4 before). The budgets leave 0.3
# for other systemd versions weighing a check differently; past them, a directive went missing.
EXPOSURE_BUDGET = {"gpuctld.service": 1.5, "gpuctl-agent.service": 7.5}


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_exposure_budget(unit: str) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(SYSTEMD_DIR / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if found is None:
        pytest.skip(f"systemd-analyze security --offline cannot run here: {result.stderr[:200]}")
    assert float(found[1]) <= EXPOSURE_BUDGET[unit], result.stdout


def test_agent_runs_as_root() -> None:
    """Starting jobs as other users and opening the GPUs needs root: no User= may creep in."""
    svc = service("gpuctl-agent.service")
    assert "User" not in svc
    assert "DynamicUser" not in svc


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_uses_config_flag(unit: str) -> None:
    (exec_start,) = service(unit)["ExecStart"]
    binary, _, args = exec_start.partition(" ")
    assert binary.startswith("/") and binary.rsplit("/", 1)[1] in ("gpuctld", "gpuctl-agent")
    assert re.fullmatch(r"--config /etc/gpuctl/\S+\.toml", args)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    result = subprocess.run(
        # --root at an empty tree and --dry-run: nothing on this host is read or written.
        [
            "systemd-sysusers",
            f"--root={tmp_path}",
            "--dry-run",
            str(SYSTEMD_DIR / "gpuctl.sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "user 'gpuctl'" in output, output
