"""`gpuctl-agent`, the agent's composition root: the only place that reads flags, the TOML
config and the environment; it builds the probe, runner and loop and runs them until SIGTERM.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import tomllib
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from gpuctl.agent.dcgm import JobMapping
from gpuctl.agent.failover import FailoverStub
from gpuctl.agent.fakenvml import FakeNvml, fake_nvml
from gpuctl.agent.health import DEFAULT_HEALTH_INTERVAL_S, DEFAULT_MIN_BANDWIDTH_FRACTION
from gpuctl.agent.loop import AgentLoop, AgentStatus, NodeIdentity, SystemClock
from gpuctl.agent.membench import HbmResult, load_backend, measure_hbm
from gpuctl.agent.metrics import AgentMetrics
from gpuctl.agent.nvml import NvmlProbe
from gpuctl.agent.probe import (
    FakeGpus,
    FakeProbe,
    Probe,
    PsutilProbe,
    SpecError,
    parse_cpus,
    parse_fake_gpus,
    parse_memory,
    parse_network,
    profile_dict,
    profile_table,
)
from gpuctl.agent.runner import (
    DEFAULT_FALLBACK_USER,
    DEFAULT_MAX_LOG_BYTES,
    DEFAULT_RANK_ENV_ALLOW,
    STATE_DIR_MODE,
    AccountPolicy,
    Runner,
    choose_containment,
)
from gpuctl.agent.shim import become_subreaper
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api.auth import bearer
from gpuctl.api.client import split_target
from gpuctl.api.pki import node_key_and_csr, write_private
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.model import Gpu, Network
from gpuctl.core.trust import DEFAULT_DENIED_ACCOUNTS, DEFAULT_MIN_UID, RunAsPolicy
from gpuctl.runtime import logfmt
from gpuctl.runtime.exposition import EndpointSettings, MetricsEndpoint, Refused, is_loopback
from gpuctl.runtime.private import private_state_dir
from gpuctl.runtime.sdnotify import Notifier

log = logging.getLogger("gpuctl.agent")

DEFAULT_SERVER = "127.0.0.1:50051"
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_USAGE = 2

# TOML key -> type it must have; the keys are the long flags with '_' for '-'.
_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "server": (str,),
    "name": (str,),
    "address": (str,),
    "fake_gpus": (str,),
    "fake_gpus_lost": (str,),
    "fabric": (str,),
    "net": (str,),
    "sku": (str,),
    "price_per_hour": (int, float),
    "labels": (dict,),
    "cpus": (int, float, str),
    "memory": (int, str),
    "state_dir": (str,),
    "log_level": (str,),
    "run_as_fallback_user": (str,),
    "allow_root_jobs": (bool,),
    "max_log_bytes": (int, str),
    "rank_env_allow": (list,),  # config only: a list belongs in the file
    "stop_ranks_on_exit": (bool,),
    "health_interval": (int, float),
    "min_bandwidth_fraction": (int, float),
    "token_file": (str,),
    "ca_file": (str,),
    "join_server": (str,),
    "run_as_min_uid": (int,),
    "run_as_deny": (list,),
    "run_as_allow": (list,),
    "log_format": (str,),
    "metrics_listen": (str,),
    "metrics_tls_cert_file": (str,),  # config only, as the two below
    "metrics_tls_key_file": (str,),
    "metrics_token_file": (str,),
    "dcgm_job_mapping_dir": (str,),
}
LOG_FORMATS = ("auto", "json", "plain")


class SettingsError(ValueError):
    """A bad flag, config key or value; the message is the one line the operator sees."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    server: str  # HOST:PORT, or several separated by commas (a leader and its standbys)
    identity: NodeIdentity
    fake_gpus: FakeGpus | None
    network: Network
    # --fake-gpus-lost: a file listing simulated GPUs that fell off the bus (its health check
    # then finds them gone, as on a real node)
    fake_gpus_lost: Path | None = None
    cpu_milli: int | None  # None: ask psutil
    memory_mib: int | None
    state_dir: Path
    log_level: str
    run_as_fallback_user: str = DEFAULT_FALLBACK_USER
    allow_root_jobs: bool = False
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    rank_env_allow: tuple[str, ...] = DEFAULT_RANK_ENV_ALLOW
    stop_ranks_on_exit: bool = False  # False: a stopped agent leaves its ranks to adopt
    network_set: bool = False  # --net (or net=) given: it overrides what sysfs finds
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    min_bandwidth_fraction: float = DEFAULT_MIN_BANDWIDTH_FRACTION
    run_as: RunAsPolicy = field(default_factory=RunAsPolicy)
    token_file: Path | None = None  # this node's credential (`gpuctl node token NAME`)
    join_token: str = ""  # --join: trade it for a certificate before starting
    join_server: str = ""  # where to join (gpuctld's main listener); "": --server
    ca_file: Path | None = None  # speak TLS to gpuctld, trusting only this CA
    log_format: str = "auto"
    # Prometheus metrics: where ("": none), and off loopback TLS and the scrapers' token
    metrics: EndpointSettings | None = None
    metrics_token_file: Path | None = None
    dcgm_job_mapping_dir: Path | None = None  # DCGM exporter's --hpc-job-mapping-dir

    @property
    def servers(self) -> tuple[str, ...]:
        return split_target(self.server)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gpuctl-agent",
        allow_abbrev=False,  # --serv is not --server: flags and config keys match exactly
        description="The gpuctl node agent: registers this node with gpuctld, heartbeats, "
        "and runs the ranks it is assigned. Flags override the --config file. "
        "`gpuctl-agent profile --help`: print the node's profile without a daemon.",
    )
    p.add_argument(
        "--server",
        metavar="HOST:PORT[,HOST:PORT...]",
        help=f"gpuctld's agent API (default {DEFAULT_SERVER}); where several gpuctld run (a "
        "leader and standbys), all of them: the agent follows the leader",
    )
    p.add_argument("--name", help="node name (default: the hostname)")
    p.add_argument(
        "--address",
        help="where other ranks reach this node, e.g. as MASTER_ADDR "
        "(default: 127.0.0.1 when the server is on loopback, else the hostname)",
    )
    p.add_argument("--fake-gpus", metavar="SKU[:N]", help="simulated GPUs, e.g. h100-sxm:8")
    p.add_argument(
        "--fake-gpus-lost",
        metavar="FILE",
        help="with --fake-gpus: the GPU indices listed in FILE (when it exists) have fallen off "
        "the bus, as the health check then finds (simulating a hardware fault)",
    )
    p.add_argument("--fabric", metavar="PATH", help="fabric path, e.g. ib-a/spine-1/leaf-1")
    p.add_argument(
        "--net", metavar="KIND:PORTSxGBPS", help="inter-node network, e.g. infiniband:8x400, none"
    )
    p.add_argument("--sku", help="the provider's name for this machine type")
    p.add_argument("--price-per-hour", metavar="USD", help="what the node costs per hour")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="node label (repeatable)")
    p.add_argument("--cpus", metavar="N", help="CPUs to offer (default: this process's CPUs)")
    p.add_argument("--memory", metavar="SIZE", help="memory to offer, e.g. 512GiB (default: all)")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="rank logs and work dirs (default: $STATE_DIRECTORY, else ~/.local/state/gpuctl-agent)",
    )
    p.add_argument("--config", metavar="FILE", help="agent.toml with the same keys as the flags")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="this node's credential, from `gpuctl node token NAME` (keep it mode 0600)",
    )
    p.add_argument(
        "--join",
        metavar="TOKEN",
        help="a one-time token from `gpuctl node join-token NAME`: get this node's certificate "
        "from gpuctld's CA (kept under the state dir) and use it from then on",
    )
    p.add_argument(
        "--join-server",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="gpuctld's main listener, where --join goes (default: --server); several "
        "separated by commas where several gpuctld run",
    )
    p.add_argument(
        "--ca-file",
        metavar="FILE",
        help="speak TLS to gpuctld and trust only this CA (pinned: a daemon with another "
        "certificate is refused); without it the agent speaks plain TCP, loopback only",
    )
    p.add_argument(
        "--run-as-fallback-user",
        metavar="USER",
        help="the account ranks run as when their owner has none on this node "
        f"(default {DEFAULT_FALLBACK_USER}; only when the agent runs as root)",
    )
    p.add_argument(
        "--allow-root-jobs",
        action="store_true",
        default=None,
        help="let ranks run as root (refused by default)",
    )
    p.add_argument(
        "--stop-ranks-on-exit",
        action="store_true",
        default=None,
        help="on SIGTERM stop every rank before exiting (default: leave them running; the "
        "agent adopts them when it starts again)",
    )
    p.add_argument(
        "--max-log-bytes",
        metavar="SIZE",
        help="cap on each rank's log, e.g. 64MiB (default); later output is dropped",
    )
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help="default: info")
    p.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        help="auto (default: plain on a terminal, JSON lines otherwise), json or plain",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here, e.g. 127.0.0.1:9751 (off loopback: TLS and a "
        "token, metrics_tls_cert_file, metrics_tls_key_file and metrics_token_file in the "
        "config)",
    )
    p.add_argument(
        "--dcgm-job-mapping-dir",
        metavar="DIR",
        help="keep DCGM exporter's job mapping files here (its --hpc-job-mapping-dir), so "
        "its per-GPU metrics carry gpuctl job ids",
    )
    p.add_argument(
        "--health-interval",
        metavar="SECONDS",
        help="re-profile the node this often to check its health, besides after every job "
        f"(default {DEFAULT_HEALTH_INTERVAL_S:g}; 0: after jobs only)",
    )
    p.add_argument(
        "--min-bandwidth-fraction",
        metavar="F",
        help="measured HBM bandwidth below F x the node's own baseline marks it degraded "
        f"(default {DEFAULT_MIN_BANDWIDTH_FRACTION:g})",
    )
    return p


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as e:
        raise SettingsError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"bad TOML in {path}: {e}") from None
    for key, value in config.items():
        if key not in _CONFIG_KEYS:
            known = ", ".join(_CONFIG_KEYS)
            raise SettingsError(f"unknown key {key!r} in {path}; known: {known}")
        allowed = _CONFIG_KEYS[key]
        # bool is an int to isinstance: `cpus = true` must not read as 1.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise SettingsError(f"bad value for {key!r} in {path}: {value!r}")
    for k, v in config.get("labels", {}).items():
        if not isinstance(v, str):
            raise SettingsError(f"bad value for label {k!r} in {path}: want a string")
    for key in ("run_as_deny", "run_as_allow"):
        if not all(isinstance(v, str) for v in config.get(key, ())):
            raise SettingsError(f"bad value for {key!r} in {path}: want a list of account names")
    for pattern in config.get("rank_env_allow", ()):
        if not isinstance(pattern, str) or not pattern or "=" in pattern or "\0" in pattern:
            raise SettingsError(
                f"bad value in 'rank_env_allow' in {path}: {pattern!r}; want variable names "
                'or glob patterns, e.g. ["PATH", "LC_*"]'
            )
    return config


def _split_server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"bad --server {server!r}: want HOST:PORT, e.g. {DEFAULT_SERVER}")
    return host.strip("[]"), int(port)


def _server_hosts(server: str) -> tuple[str, ...]:
    """The host of each address of --server, checked to be HOST:PORT."""
    addresses = split_target(server)
    if not addresses:
        raise SettingsError(f"bad --server {server!r}: want HOST:PORT, e.g. {DEFAULT_SERVER}")
    return tuple(_split_server(a)[0] for a in addresses)


def _labels(config: Mapping[str, str], flags: Sequence[str]) -> tuple[tuple[str, str], ...]:
    labels = dict(config)
    for item in flags:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"bad --label {item!r}: want KEY=VALUE")
        labels[key.strip()] = value
    return tuple(sorted(labels.items()))


def _default_state_dir(env: Mapping[str, str]) -> Path:
    if env.get("STATE_DIRECTORY"):  # systemd's StateDirectory=; ':'-separated when several
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/state")
    return Path(base) / "gpuctl-agent"


def load_settings(argv: Sequence[str], env: Mapping[str, str]) -> AgentSettings:
    """Flags over the config file over defaults; raises SettingsError (or SpecError) on bad
    input. Never touches the network."""
    args = _parser().parse_args(argv)
    config = _read_config(args.config) if args.config else {}

    def pick(key: str, default: Any = None) -> Any:
        flag = getattr(args, key)
        return flag if flag is not None else config.get(key, default)

    server = pick("server", DEFAULT_SERVER)
    loopback = all(is_loopback(host) for host in _server_hosts(server))
    hostname = socket.gethostname()
    name = pick("name") or hostname
    address = pick("address") or ("127.0.0.1" if loopback else hostname)
    price = pick("price_per_hour", 0.0)
    try:
        price = float(price)
    except ValueError:
        raise SettingsError(f"bad --price-per-hour {price!r}: want a number of USD") from None
    if price < 0:
        raise SettingsError(f"bad --price-per-hour {price!r}: must not be negative")
    fake = pick("fake_gpus")
    cpus, memory = pick("cpus"), pick("memory")
    if isinstance(memory, int):  # a bare number in TOML is MiB, as on the flag
        memory = str(memory)
    log_level = str(pick("log_level", "info")).lower()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"bad log_level {log_level!r}; known: {', '.join(LOG_LEVELS)}")
    log_format = str(pick("log_format", "auto")).lower()
    if log_format not in LOG_FORMATS:
        raise SettingsError(f"bad log_format {log_format!r}; known: {', '.join(LOG_FORMATS)}")
    metrics = None
    if listen := pick("metrics_listen", ""):
        metrics = EndpointSettings(
            listen=listen,
            tls_cert_file=config.get("metrics_tls_cert_file", ""),
            tls_key_file=config.get("metrics_tls_key_file", ""),
            where="--metrics-listen",
        )
        problems = metrics.violations(can_authorize=bool(config.get("metrics_token_file")))
        if problems:
            raise SettingsError(f"bad --metrics-listen: {'; '.join(problems)}")
    state_dir = pick("state_dir")
    fallback_user = str(pick("run_as_fallback_user", DEFAULT_FALLBACK_USER)).strip()
    if not fallback_user:
        raise SettingsError("bad --run-as-fallback-user '': want an account name")
    health_interval = _number(
        "--health-interval", pick("health_interval", DEFAULT_HEALTH_INTERVAL_S), 0, None
    )
    min_fraction = _number(
        "--min-bandwidth-fraction",
        pick("min_bandwidth_fraction", DEFAULT_MIN_BANDWIDTH_FRACTION),
        0,
        1,
    )
    return AgentSettings(
        server=server,
        identity=NodeIdentity(
            name=name,
            address=address,
            fabric=pick("fabric", ""),
            sku=pick("sku", ""),
            price_per_hour=price,
            labels=_labels(config.get("labels", {}), args.label or ()),
        ),
        fake_gpus=parse_fake_gpus(fake) if fake else None,
        fake_gpus_lost=Path(lost).absolute() if (lost := pick("fake_gpus_lost")) else None,
        network=parse_network(pick("net", "none")),
        cpu_milli=parse_cpus(cpus) if cpus is not None else None,
        memory_mib=parse_memory(memory) if memory is not None else None,
        # Absolute: the rank supervisor changes directory and must still find its files.
        state_dir=(
            Path(state_dir).expanduser() if state_dir else _default_state_dir(env)
        ).absolute(),
        log_level=log_level,
        run_as_fallback_user=fallback_user,
        allow_root_jobs=bool(pick("allow_root_jobs", False)),
        max_log_bytes=parse_bytes(pick("max_log_bytes", DEFAULT_MAX_LOG_BYTES)),
        rank_env_allow=tuple(config.get("rank_env_allow", DEFAULT_RANK_ENV_ALLOW)),
        stop_ranks_on_exit=bool(pick("stop_ranks_on_exit", False)),
        network_set=pick("net") is not None,
        health_interval_s=health_interval,
        min_bandwidth_fraction=min_fraction,
        run_as=RunAsPolicy(
            min_uid=config.get("run_as_min_uid", DEFAULT_MIN_UID),
            deny=frozenset(config.get("run_as_deny", DEFAULT_DENIED_ACCOUNTS)),
            allow=frozenset(config.get("run_as_allow", ())),
        ),
        token_file=Path(pick("token_file")).expanduser() if pick("token_file") else None,
        join_token=args.join or "",
        join_server=pick("join_server", ""),
        ca_file=Path(pick("ca_file")).expanduser() if pick("ca_file") else None,
        log_format=log_format,
        metrics=metrics,
        metrics_token_file=(
            Path(config["metrics_token_file"]).expanduser()
            if config.get("metrics_token_file")
            else None
        ),
        dcgm_job_mapping_dir=(
            Path(d).expanduser().absolute() if (d := pick("dcgm_job_mapping_dir")) else None
        ),
    )


_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])i?)?b?", re.IGNORECASE)
_SIZE_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_bytes(raw: int | str) -> int:
    """--max-log-bytes: a number of bytes, or one with a binary unit (64MiB, 64M, 1GiB)."""
    m = _SIZE.fullmatch(str(raw).strip())
    if m is None or int(m[1]) <= 0:
        raise SettingsError(f"bad --max-log-bytes {raw!r}: want a positive size, e.g. 64MiB")
    return int(m[1]) << _SIZE_SHIFT[m[2] and m[2].lower()]


def _number(flag: str, raw: object, low: float, high: float | None) -> float:
    """A flag's number, checked to lie in [low, high] (no upper bound where high is None)."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except ValueError:
        raise SettingsError(f"bad {flag} {raw!r}: want a number") from None
    if not low <= value <= (float("inf") if high is None else high):  # NaN fails too
        bounds = f"{low:g}..{high:g}" if high is not None else f"at least {low:g}"
        raise SettingsError(f"bad {flag} {raw!r}: want {bounds}")
    return value


def build_probe(
    settings: AgentSettings, *, measure: bool = False, nvml: FakeNvml | None = None
) -> Probe:
    """--fake-gpus: simulated GPUs; else NVML (a CPU node where there is no driver). The HBM
    benchmark runs only when `measure` asks for it: the agent itself re-profiles while ranks
    may hold the GPUs, so it does not (`gpuctl-agent profile --measure` does)."""
    host = PsutilProbe(
        network=settings.network, cpu_milli=settings.cpu_milli, memory_mib=settings.memory_mib
    )
    if settings.fake_gpus is not None:
        return FakeProbe(
            settings.fake_gpus,
            node_name=settings.identity.name,
            host=host,
            lost_file=settings.fake_gpus_lost,
        )

    def hbm(gpus: tuple[Gpu, ...]) -> HbmResult:
        return measure_hbm(gpus, load_backend())

    return NvmlProbe(
        host=host,
        nvml=nvml,
        network=settings.network if settings.network_set else None,
        hbm=hbm if measure else None,
    )


# -- `gpuctl-agent profile`: the probe's findings, printed, with no daemon involved ---------


def _profile_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gpuctl-agent profile",
        allow_abbrev=False,
        description="Print this node's bandwidth profile as the agent would register it, "
        "without contacting gpuctld. The agent's flags (--fake-gpus, --net, --config...) apply.",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also measure each GPU's HBM bandwidth with a copy benchmark (PyTorch or CuPy)",
    )
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument(
        "--fake-nvml",
        metavar="PART[:N]",
        help="probe a simulated board through the real NVML code path, e.g. h100-sxm:8",
    )
    return p


def profile(argv: Sequence[str], env: Mapping[str, str]) -> int:
    try:
        args, rest = _profile_parser().parse_known_args(argv)
        settings = load_settings(rest, env)
        if args.fake_nvml and settings.fake_gpus:
            raise SettingsError("--fake-nvml and --fake-gpus: give one or the other")
        nvml = fake_nvml(args.fake_nvml, node=settings.identity.name) if args.fake_nvml else None
    except (SettingsError, SpecError) as e:
        print(f"gpuctl-agent profile: {e}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    facts = build_probe(settings, measure=args.measure, nvml=nvml).probe()
    fabric = settings.identity.fabric
    if args.output == "json":
        print(json.dumps(profile_dict(facts, fabric=fabric), indent=2))
    else:
        print(profile_table(facts, fabric=fabric))
    return 0


def build_runner(settings: AgentSettings, clock: Callable[[], float]) -> Runner:
    containment = choose_containment()
    log.info("each rank runs in a %s of its own", containment.name)
    # Orphans of a rank whose supervisor died become the agent's, where the runner finds them.
    if not become_subreaper():
        log.warning("cannot become a child subreaper: orphans of a dead supervisor go to init")
    return Runner(
        settings.state_dir,
        base_env=os.environ,
        clock=clock,
        accounts=AccountPolicy(
            fallback_user=settings.run_as_fallback_user,
            allow_root=settings.allow_root_jobs,
            rules=settings.run_as,
        ),
        max_log_bytes=settings.max_log_bytes,
        containment=containment,
        env_allow=settings.rank_env_allow,
    )


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """Adds this node's credential to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer(token)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(
            _CallDetails(
                details.method,
                details.timeout,
                (*(details.metadata or ()), *self._metadata),
                details.credentials,
                details.wait_for_ready,
                details.compression,
            ),
            request,
        )


class _CallDetails(
    namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


CREDENTIALS = "credentials"  # under the state dir: node.key (0600), node.crt, ca.crt


def join(settings: AgentSettings, token: str) -> Path:
    """Trade a one-time join token for this node's certificate from gpuctld's CA (the key
    never leaves the node) and keep key, certificate and the pinned CA under the state dir."""
    if settings.ca_file is None:
        raise SettingsError(
            "--join needs --ca-file: gpuctld's CA certificate (`gpuctl node join-token "
            "--ca-out FILE` writes it), so that the token goes to the real gpuctld"
        )
    try:
        roots = settings.ca_file.read_bytes()
    except OSError as e:
        raise SettingsError(f"cannot read {e.filename}: {e.strerror}") from None
    target = settings.join_server or settings.server
    addresses = split_target(target)
    if not addresses:
        raise SettingsError(f"bad --join-server {target!r}: want HOST:PORT")
    key_pem, csr_pem = node_key_and_csr(settings.identity.name)
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    channels = {a: grpc.secure_channel(a, credentials) for a in addresses}
    try:
        reply = FailoverStub(
            {a: agent_pb2_grpc.AgentServiceStub(c) for a, c in channels.items()}
        ).JoinNode(
            agent_pb2.JoinNodeRequest(csr_pem=csr_pem),
            metadata=bearer(token),
            timeout=10,
            # One gpuctld that is starting: wait for it, a little. Of several, one that cannot
            # be reached is passed over at once.
            wait_for_ready=len(addresses) == 1,
        )
    except grpc.RpcError as e:
        raise SettingsError(
            f"joining through {target} failed: {e.code().name}: {e.details()}"
        ) from None
    finally:
        for channel in channels.values():
            channel.close()
    if reply.node_name != settings.identity.name:
        raise SettingsError(
            f"the join token is for node {reply.node_name!r}, not {settings.identity.name!r}"
        )
    where = settings.state_dir / CREDENTIALS
    where.mkdir(mode=0o700, exist_ok=True)
    write_private(where / "node.key", key_pem)
    (where / "node.crt").write_bytes(reply.certificate_pem)
    (where / "ca.crt").write_bytes(reply.ca_pem)
    log.info("joined as %s: certificate in %s", reply.node_name, where)
    return where


def open_channels(settings: AgentSettings) -> dict[str, grpc.Channel]:
    """A channel to each --server address: with this node's certificate where it joined (TLS
    both ways, gpuctld's CA pinned), else with its token over TLS pinned to `ca_file`, or
    plain TCP on loopback only."""
    where = settings.state_dir / CREDENTIALS
    if (where / "node.crt").exists():
        try:
            creds = grpc.ssl_channel_credentials(
                root_certificates=(where / "ca.crt").read_bytes(),
                private_key=(where / "node.key").read_bytes(),
                certificate_chain=(where / "node.crt").read_bytes(),
            )
        except OSError as e:
            raise SettingsError(f"cannot read {e.filename}: {e.strerror}") from None
        return {a: grpc.secure_channel(a, creds) for a in settings.servers}
    if settings.token_file is None:
        raise SettingsError(
            "no credential: --join TOKEN (from `gpuctl node join-token NAME`) or --token-file "
            "FILE (from `gpuctl node token NAME > FILE`)"
        )
    try:
        token = settings.token_file.read_text().strip()
        if settings.token_file.stat().st_mode & 0o077:
            log.warning("%s is readable by others: chmod 600 it", settings.token_file)
        roots = settings.ca_file.read_bytes() if settings.ca_file is not None else None
    except OSError as e:
        raise SettingsError(f"cannot read {e.filename}: {e.strerror}") from None
    if not token:
        raise SettingsError(f"{settings.token_file} is empty")
    if roots is None:
        for address in settings.servers:
            if not is_loopback(_split_server(address)[0]):
                raise SettingsError(
                    f"--server {address} is not on loopback: give --ca-file so that the node's "
                    "credential and its jobs' secrets cross the network encrypted, to the real "
                    "gpuctld"
                )
    creds = grpc.ssl_channel_credentials(root_certificates=roots) if roots is not None else None
    with_token = _Bearer(token)
    return {
        a: grpc.intercept_channel(
            grpc.secure_channel(a, creds) if creds is not None else grpc.insecure_channel(a),
            with_token,
        )
        for a in settings.servers
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["profile"]:
        return profile(args[1:], os.environ)
    # `gpuctl-agent join --join TOKEN ...`: get the node's certificate and exit, before the
    # service starts (systemctl enable --now gpuctl-agent) and finds it under its state dir.
    join_only = args[:1] == ["join"]
    if join_only:
        argv = args[1:]
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv, os.environ)
    except (SettingsError, SpecError) as e:
        print(f"gpuctl-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    logfmt.setup(settings.log_level, settings.log_format)
    try:
        # Listable by no one else: it holds rank logs and every job's environment.
        private_state_dir(settings.state_dir, STATE_DIR_MODE)
    except OSError as e:
        print(
            f"gpuctl-agent: cannot create --state-dir {settings.state_dir}: {e.strerror}",
            file=sys.stderr,
        )
        return EXIT_USAGE

    try:
        if join_only and not settings.join_token:
            raise SettingsError("join: give --join TOKEN (from `gpuctl node join-token NAME`)")
        if settings.join_token:
            where = join(settings, settings.join_token)
            if join_only:
                print(f"joined as {settings.identity.name}: key and certificate in {where}")
                return 0
        channels = open_channels(settings)
    except SettingsError as e:
        print(f"gpuctl-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    clock = SystemClock()
    status: list[AgentLoop] = []
    metrics = AgentMetrics(lambda: status[0].status if status else AgentStatus())
    try:
        endpoint = _metrics_endpoint(settings, metrics)
    except (SettingsError, InvalidArgument, OSError) as e:
        print(f"gpuctl-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    loop = AgentLoop(
        FailoverStub({a: agent_pb2_grpc.AgentServiceStub(c) for a, c in channels.items()}),
        build_runner(settings, clock.monotonic),
        build_probe(settings),
        settings.identity,
        clock=clock,
        notifier=Notifier(os.environ),
        health_interval_s=settings.health_interval_s,
        min_bandwidth_fraction=settings.min_bandwidth_fraction,
        observer=metrics,
        job_map=(
            JobMapping(settings.dcgm_job_mapping_dir) if settings.dcgm_job_mapping_dir else None
        ),
    )
    status.append(loop)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "gpuctl-agent %s: server %s, state dir %s",
        settings.identity.name,
        settings.server,
        settings.state_dir,
    )
    try:
        loop.run(stop)
        if settings.stop_ranks_on_exit:
            loop.shutdown()
        else:
            loop.detach()
    finally:
        for channel in channels.values():
            channel.close()
        if endpoint is not None:
            endpoint.close()
    return 0


def _metrics_endpoint(settings: AgentSettings, metrics: AgentMetrics) -> MetricsEndpoint | None:
    """/metrics where --metrics-listen says; off loopback, for the token in
    metrics_token_file (what Prometheus sends as its bearer credentials)."""
    if settings.metrics is None:
        return None
    authorize = None
    if settings.metrics_token_file is not None:
        try:
            expected = settings.metrics_token_file.read_text().strip().encode()
        except OSError as e:
            raise SettingsError(
                f"cannot read metrics_token_file {settings.metrics_token_file}: {e.strerror}"
            ) from None
        if not expected:
            raise SettingsError(f"metrics_token_file {settings.metrics_token_file} is empty")

        def authorize(token: str) -> None:
            if not hmac.compare_digest(token.encode(), expected):
                raise Refused(401, "not the metrics token")

    endpoint = MetricsEndpoint(settings.metrics, metrics.registry, authorize=authorize)
    log.info("metrics on port %d", endpoint.port)
    return endpoint


if __name__ == "__main__":
    sys.exit(main())
