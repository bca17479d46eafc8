"""gpuctld's composition root: reads the config, opens the store, builds the controller and
the gRPC server, starts the periodic work, tells systemd it is ready, and drains on SIGTERM."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from gpuctl.api.auth import Authenticator, JwtVerifier, SessionBook
from gpuctl.api.limits import Limits, LimitSettings
from gpuctl.api.pki import Authority
from gpuctl.api.server import ApiServer, Listeners
from gpuctl.api.servicers import Guard
from gpuctl.core.errors import FieldViolation, GpuctlError, InvalidArgument
from gpuctl.core.leasing import Budget
from gpuctl.core.plugins import build_policy
from gpuctl.core.trust import Permission, QueueGrants, RolePolicy, RunAsPolicy
from gpuctl.runtime import logfmt
from gpuctl.runtime.apiworkers import ApiWorkers
from gpuctl.runtime.clock import SystemClock
from gpuctl.runtime.config import DaemonConfig, load_config, load_providers
from gpuctl.runtime.controller import Controller, ControllerSettings
from gpuctl.runtime.cycleproc import CycleProcess
from gpuctl.runtime.exposition import EndpointSettings, MetricsEndpoint, Refused, is_loopback
from gpuctl.runtime.leadership import Elector, ElectorSettings
from gpuctl.runtime.leadership import run as run_elector
from gpuctl.runtime.leases import LeaseKeeper, LeaseSettings, build_providers
from gpuctl.runtime.logstore import LogStore
from gpuctl.runtime.metrics import DaemonMetrics, Standing
from gpuctl.runtime.periodic import Periodic
from gpuctl.runtime.private import private_state_dir
from gpuctl.runtime.sdnotify import Notifier
from gpuctl.runtime.webui import SAMPLE_EVERY_S, History, Sources, WebUi
from gpuctl.store.base import Store
from gpuctl.store.sql import open_store

log = logging.getLogger("gpuctld")
RETENTION_INTERVAL_S = 60.0  # how often finished jobs and audit entries past retention go
# A submit, a finished rank or a new node wakes the cycle, but woken cycles come at most every
# 0.1 s (a job waits no longer than that to be considered), and after cycles of d seconds
# the next woken one waits 2d (d: the shorter of the last two, so that the one long first
# cycle after a start holds nothing back): under a storm of submits the cycle has at most a
# third of the daemon's time, and the calls the rest, however long the queue makes a cycle.
CYCLE_MIN_GAP_S = 0.1
CYCLE_REST = 2.0


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpuctld", description="The gpuctl daemon: API, store, scheduling loop."
    )
    p.add_argument("--config", help="TOML config file (see config/gpuctld.toml)")
    p.add_argument(
        "--listen", help="address to serve on, e.g. 127.0.0.1:50051 (port 0: any free port)"
    )
    p.add_argument("--state-dir", help="where the SQLite store and rank logs live")
    p.add_argument(
        "--socket", help="the Unix socket for users on this host (default: see server.socket)"
    )
    p.add_argument("--agent-listen", help="agents with certificates (mTLS), e.g. 0.0.0.0:50052")
    p.add_argument("--store-url", help="sqlite:///PATH or postgresql://USER@HOST/DB")
    p.add_argument(
        "--port-file", help="write the bound port here once serving (for tests and scripts)"
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-format", help="auto (plain on a terminal, else JSON), json or plain")
    p.add_argument(
        "--metrics-listen", help="serve Prometheus metrics here, e.g. 127.0.0.1:9750 (port 0: any)"
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        help="upgrade an older store's schema before serving (back it up first); without it "
        "gpuctld refuses to start on one",
    )
    return p.parse_args(argv)


def run_migrate(argv: list[str]) -> int:
    """`gpuctld migrate [--config F] [--store-url URL] [--state-dir D]`: upgrade the store's
    schema to this release's and exit. Safe to run twice, and beside running standbys of the
    same release; a store newer than this release is refused, never downgraded."""
    p = argparse.ArgumentParser(
        prog="gpuctld migrate", description="Upgrade the store's schema to this release's."
    )
    p.add_argument("--config", help="TOML config file (see config/gpuctld.toml)")
    p.add_argument("--state-dir", help="where the SQLite store lives")
    p.add_argument("--store-url", help="sqlite:///PATH or postgresql://USER@HOST/DB")
    args = p.parse_args(argv)
    env = dict(os.environ)
    try:
        config = load_config(args.config, _overrides(args))
        url = config.resolved_store_url(env)
        store = open_store(url, migrate=True)
    except GpuctlError as e:
        print(f"gpuctld migrate: {e}", file=sys.stderr)
        return 1
    found = store.schema
    store.close()
    if found.current is None:
        print(f"{_redact(url)}: new store created at schema revision {found.head}")
    elif found.behind:
        print(f"{_redact(url)}: schema upgraded from revision {found.current} to {found.head}")
    else:
        print(f"{_redact(url)}: schema already at revision {found.head}; nothing to do")
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = (
        "listen",
        "state_dir",
        "socket",
        "agent_listen",
        "store_url",
        "log_level",
        "log_format",
        "metrics_listen",
    )
    pairs = {name: getattr(args, name, None) for name in names}
    return {k: v for k, v in pairs.items() if v is not None}


def serve(
    config: DaemonConfig,
    env: dict[str, str],
    *,
    port_file: str | None = None,
    migrate: bool = False,
) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notifier = Notifier(env)

    state_dir = config.resolved_state_dir(env)
    private_state_dir(state_dir)
    _elector_settings(config, 0, 0)  # a bad [ha] table fails before anything starts
    store = open_store(config.resolved_store_url(env), migrate=migrate)
    store.fence(0)  # nothing is written until this gpuctld leads (see runtime/leadership)
    periodic = Periodic()
    controller = build_controller(config, store, state_dir, wake=lambda: periodic.wake("cycle"))
    metrics = DaemonMetrics(
        Standing(
            nodes=store.list_nodes,
            active=controller.active_jobs,
            leases=store.list_leases,
            now=controller.clock.now,
            leading=lambda: controller.leading,
            queues=config.queues,
        )
    )
    controller.observer = metrics
    history = History(
        Sources(
            nodes=store.list_nodes,
            active=controller.active_jobs,
            leases=store.list_leases,
            usage=controller.node_usage,
            events=lambda job_id: store.list_events("job", str(job_id)),
            now=controller.clock.now,
            kept=lambda: controller.leases.kept if controller.leases is not None else {},
        )
    )

    def lead(epoch: int) -> None:
        """Start deciding: the cycle, heartbeat expiry, time limits, leases."""
        controller.lead()
        if config.cycle_process:
            controller.cycles = CycleProcess(config.resolved_store_url(env), controller.policy)
            controller.cycles.start()
        tables, base_dir = load_providers(config)
        # The static and catalog providers keep their grants in memory: the store hands them
        # back, as they stand now (a standby taking over reads them only now).
        providers = build_providers(
            tables, base_dir=base_dir, leases=store.list_leases(include_released=True)
        )
        keep_leases = controller.keep_leases
        if providers:
            keeper = LeaseKeeper(
                controller,
                providers,
                LeaseSettings(
                    idle_grace_s=config.lease_idle_grace_s,
                    warm_nodes=config.lease_warm_nodes,
                    service_grace_s=config.lease_service_grace_s,
                    service_headroom=config.lease_service_headroom,
                    boot_timeout_s=config.lease_boot_timeout_s,
                    renew_before_s=config.lease_renew_before_s,
                    retry_after_s=config.lease_retry_after_s,
                    unknown=config.lease_unknown,
                    budgets={q: Budget(**b) for q, b in config.lease_budgets.items()},
                ),
                wake=lambda: periodic.wake("leases"),
            )
            controller.attach_leases(keeper)
            keep_leases = keeper.tick
            log.info("leasing from %s", ", ".join(p.name for p in providers))
        periodic.every(
            "cycle",
            config.cycle_interval_s,
            controller.run_cycle,
            min_gap_s=CYCLE_MIN_GAP_S,
            rest=CYCLE_REST,
        )
        periodic.every(
            "heartbeat-expiry",
            config.heartbeat_check_interval_s,
            lambda: metrics.nodes_lost(len(controller.expire_heartbeats())),
        )
        periodic.every(
            "time-limits", config.heartbeat_check_interval_s, controller.enforce_time_limits
        )
        periodic.every("leases", config.lease_interval_s, keep_leases)
        periodic.every("retention", RETENTION_INTERVAL_S, controller.purge_history)
        if config.ui and config.metrics_listen:
            periodic.every("ui-history", SAMPLE_EVERY_S, history.sample)
        periodic.start()
        if workers is not None:
            workers.start(epoch, server.port)
        notifier.status(f"leading (epoch {epoch})")

    lost: list[str] = []

    def lose(why: str) -> None:
        lost.append(why)
        stop.set()

    sessions = SessionBook(config.session_ttl_s)
    listeners, authority = build_listeners(config, env, state_dir)
    workers = None
    if config.api_workers and not config.listen:
        log.warning(
            "[server] api_workers = %d ignored: they serve `listen`, which is off",
            config.api_workers,
        )
    elif config.api_workers:
        workers = ApiWorkers(config, env, wake=lambda: periodic.wake("cycle"), observer=metrics)
        listeners = replace(listeners, internal=workers.socket, reuse_port=True)
    guard = build_guard(
        config,
        store,
        sessions=sessions,
        now=controller.clock.now,
        authority=authority,
        forward_secret=workers.secret if workers is not None else "",
    )
    server = ApiServer(
        controller,
        guard,
        listeners,
        sessions=sessions,
        observer=metrics,
        # Reads on the loop's thread only where they cannot wait on a network: a local store
        # file, and no OIDC keys to fetch (api.server.ApiServer).
        inline_reads=store.local and guard.auth.jwt is None,
    )
    endpoint = _metrics_endpoint(
        config, state_dir, metrics, guard.auth, history if config.ui else None, sessions
    )
    server.start()
    # What start-up made (modules, the schema, the policy, the servers) lives as long as the
    # daemon: out of the collector's sight, a full collection under load scans only what came
    # since, ~5 ms instead of 30-60 ms of every call waiting (each one there adds to p99).
    gc.freeze()
    host = config.listen.rsplit(":", 1)[0]
    tls = "TLS" if listeners.tls_cert else "plain TCP"
    agents = f", agents (mTLS) on port {server.agent_port}" if server.agent_port else ""
    served = ""
    if endpoint is not None:
        scheme = "https" if endpoint.tls else "http"
        base = f"{scheme}://{config.metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}"
        served = f", metrics at {base}/metrics" + (
            f" and the web page at {base}/ui" if config.ui else ""
        )
    log.info(
        "serving on %s (Unix socket)%s%s%s, store %s",
        server.socket,
        f" and {host}:{server.port} ({tls})" if config.listen else "",
        agents,
        served,
        _redact(config.resolved_store_url(env)),
    )
    if port_file:
        tmp = Path(port_file + ".tmp")
        # The API's port; then the agents' and the metrics' where either is served (0: none).
        ports = [server.port]
        if server.agent_port or endpoint is not None:
            ports.append(server.agent_port)
        if endpoint is not None:
            ports.append(endpoint.port)
        tmp.write_text("".join(f"{p}\n" for p in ports))
        tmp.replace(port_file)

    elector = Elector(
        store,
        _elector_settings(config, server.port, server.agent_port),
        monotonic=time.monotonic,
        on_lead=lead,
        on_lost=lose,
    )
    # Ready now: the port is bound and the store is open (a standby serves reads).
    notifier.ready(f"serving on {host}:{server.port}")
    electing = threading.Thread(
        target=run_elector, args=(elector, stop), name="leader-lease", daemon=True
    )
    electing.start()

    interval = notifier.watchdog_interval or 5.0
    while not stop.wait(interval):
        notifier.watchdog()

    if lost:
        log.error("stopping: lost the leader lease (%s); a restart serves as a standby", lost[0])
    else:
        log.info("SIGTERM: draining (grace %gs)", config.drain_grace_s)
    notifier.stopping()
    electing.join()
    if workers is not None:
        workers.stop(config.drain_grace_s)
    periodic.shutdown()
    if controller.cycles is not None:
        controller.cycles.close()
    elector.resign()
    server.drain(config.drain_grace_s)
    if endpoint is not None:
        endpoint.close()
    store.close()
    log.info("stopped")
    return 1 if lost else 0


def build_controller(
    config: DaemonConfig, store: Store, state_dir: Path, *, wake: Callable[[], None]
) -> Controller:
    return Controller(
        store,
        SystemClock(),
        build_policy(config.policy, config.policy_weights),
        LogStore(
            state_dir / "logs",
            max_bytes_per_rank=config.max_log_bytes_per_rank,
            max_bytes_per_job=config.max_log_bytes_per_job,
            max_bytes_total=config.max_log_bytes_total,
        ),
        ControllerSettings(
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            kill_grace_s=config.kill_grace_s,
            master_port_base=config.master_port_base,
            master_port_range=config.master_port_range,
            replica_port_base=config.replica_port_base,
            replica_port_range=config.replica_port_range,
            queues=config.queues,
            job_retention_s=config.retention_days * 86400.0,
            audit_retention_s=config.audit_retention_days * 86400.0,
        ),
        wake=wake,
    )


def build_guard(
    config: DaemonConfig,
    store: Store,
    *,
    sessions: SessionBook,
    now: Callable[[], datetime],
    authority: Authority | None,
    forward_secret: str = "",
) -> Guard:
    """What every call is checked against, as the config says."""
    limits = LimitSettings(
        workers=config.max_workers,
        agent_reserve=config.agent_reserve,
        max_streams=config.max_streams,
        streams_per_caller=config.streams_per_caller,
        calls_per_caller=config.calls_per_caller,
    )
    if limits.violations():
        raise InvalidArgument([FieldViolation("limits", v) for v in limits.violations()])
    return Guard(
        auth=Authenticator(
            store,
            roles=RolePolicy(
                admins=frozenset(config.admins),
                operators=frozenset(config.operators),
                admin_groups=frozenset(config.admin_groups),
                operator_groups=frozenset(config.operator_groups),
            ),
            sessions=sessions,
            now=now,
            jwt=_jwt_verifier(config),
        ),
        limits=Limits(limits),
        runas=RunAsPolicy(
            min_uid=config.run_as_min_uid,
            deny=frozenset(config.run_as_deny),
            allow=frozenset(config.run_as_allow),
            map=dict(config.run_as_map),
        ),
        queues=QueueGrants(
            members={q: frozenset(g.get("members", ())) for q, g in config.queue_grants.items()},
            groups={q: frozenset(g.get("groups", ())) for q, g in config.queue_grants.items()},
        ),
        max_spec_bytes=config.max_spec_bytes,
        max_pending_per_user=config.max_pending_per_user,
        default_token_ttl_s=config.token_ttl_s,
        authority=authority,
        forward_secret=forward_secret,
    )


def build_listeners(
    config: DaemonConfig, env: Mapping[str, str], state_dir: Path, *, quiet: bool = False
) -> tuple[Listeners, Authority | None]:
    """The Unix socket and TCP listeners, and gpuctld's own CA where they need it; refuses TCP
    that strangers could reach without TLS unless the config says `insecure = true`, and then
    says so at every start (unless `quiet`: an API worker's start)."""
    tls_cert = tls_key = b""
    authority = None
    if config.tls_self_signed or config.agent_listen:
        authority = Authority.load_or_create(state_dir / "pki")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise InvalidArgument(
            [FieldViolation("tls", "give both cert_file and key_file, or neither")]
        )
    try:
        if config.tls_cert_file:
            tls_cert = Path(config.tls_cert_file).read_bytes()
            tls_key = Path(config.tls_key_file).read_bytes()
    except OSError as e:
        raise InvalidArgument(
            [FieldViolation("tls", f"cannot read {e.filename}: {e.strerror}")]
        ) from None
    if config.tls_self_signed and not tls_cert:
        assert authority is not None
        names = config.tls_names or _default_names(config)
        own = authority.server_credentials(state_dir / "pki", names)
        tls_cert, tls_key = own.cert_pem, own.key_pem
    if config.agent_listen and not tls_cert:
        raise InvalidArgument(
            [
                FieldViolation(
                    "server.agent_listen",
                    "agents' certificates need TLS: give [tls] cert_file and key_file, or "
                    "self_signed = true",
                )
            ]
        )
    if config.listen and not tls_cert and not is_loopback(config.listen.rsplit(":", 1)[0]):
        if not config.insecure:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "server.listen",
                        f"{config.listen} is reachable from other hosts: give [tls] cert_file "
                        "and key_file, or set insecure = true to serve it without TLS",
                    )
                ]
            )
        if not quiet:
            log.warning(
                "INSECURE: serving %s without TLS (insecure = true): tokens cross the network in "
                "clear text; anyone on the path can act as any user who sends one",
                config.listen,
            )
    listeners = Listeners(
        tcp=config.listen,
        socket=config.resolved_socket(env),
        tls_cert=tls_cert,
        tls_key=tls_key,
        agent_tcp=config.agent_listen,
        agent_ca=authority.cert_pem if authority is not None else b"",
    )
    return listeners, authority


def _metrics_endpoint(
    config: DaemonConfig,
    state_dir: Path,
    metrics: DaemonMetrics,
    auth: Authenticator,
    history: History | None,
    sessions: SessionBook,
) -> MetricsEndpoint | None:
    """/metrics where `[metrics] listen` says: open plain HTTP on loopback; elsewhere over the
    API's TLS certificate, for a token whose holder may read the site's cost (operators,
    admins)."""
    if not config.metrics_listen:
        return None
    cert, key = config.tls_cert_file, config.tls_key_file
    if not cert and config.tls_self_signed:
        cert, key = str(state_dir / "pki" / "server.crt"), str(state_dir / "pki" / "server.key")
    if is_loopback(config.metrics_listen.rpartition(":")[0]):
        cert = key = ""  # plain HTTP on loopback, as the scrapers there expect

    def authorize(token: str) -> None:
        try:
            who = auth.principal_of(token)
        except GpuctlError as e:
            raise Refused(401, str(e)) from None
        if not who.can(Permission.COST_ALL):
            raise Refused(403, f"{who.name} may not read metrics (operators and admins may)")

    pages = None
    if history is not None:
        pages = WebUi(history.sources, history, auth=auth, sessions=sessions, secure=bool(cert))
    return MetricsEndpoint(
        EndpointSettings(listen=config.metrics_listen, tls_cert_file=cert, tls_key_file=key),
        metrics.registry,
        authorize=authorize,
        pages=pages,
    )


def _elector_settings(config: DaemonConfig, port: int, agent_port: int) -> ElectorSettings:
    """Who this gpuctld is among several, and the addresses a standby sends callers to."""
    host = socket.gethostname()

    def advertised(listen: str, bound: int) -> str:
        if not listen:
            return ""
        name = listen.rsplit(":", 1)[0].strip("[]")
        return f"{host if name in ('', '0.0.0.0', '::') else name}:{bound}"

    settings = ElectorSettings(
        name=config.ha_name or host,
        address=config.ha_address or advertised(config.listen, port),
        agent_address=config.ha_agent_address or advertised(config.agent_listen, agent_port),
        ttl_s=config.ha_lease_ttl_s,
        renew_s=config.ha_renew_interval_s,
        retry_s=config.ha_retry_interval_s,
    )
    if settings.violations():
        raise InvalidArgument([FieldViolation("ha", v) for v in settings.violations()])
    return settings


def _default_names(config: DaemonConfig) -> tuple[str, ...]:
    names = ["localhost", "127.0.0.1", socket.gethostname()]
    for listen in (config.listen, config.agent_listen):
        host = listen.rsplit(":", 1)[0].strip("[]")
        if host and host not in ("0.0.0.0", "::") and host not in names:
            names.append(host)
    return tuple(names)


def _jwt_verifier(config: DaemonConfig) -> JwtVerifier | None:
    oidc = (config.oidc_issuer, config.oidc_audience, config.oidc_jwks_url)
    if not any(oidc):
        return None
    if not all(oidc):
        raise InvalidArgument(
            [FieldViolation("auth", "oidc_issuer, oidc_audience and oidc_jwks_url go together")]
        )
    return JwtVerifier(
        issuer=config.oidc_issuer,
        audience=config.oidc_audience,
        jwks_url=config.oidc_jwks_url,
        username_claim=config.oidc_username_claim,
        groups_claim=config.oidc_groups_claim,
    )


def _redact(url: str) -> str:
    """Hide a password in a database URL before logging it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["migrate"]:
        return run_migrate((sys.argv[1:] if argv is None else argv)[1:])
    args = _args(argv)
    env = dict(os.environ)
    try:
        config = load_config(args.config, _overrides(args))
        tables, base_dir = load_providers(config)
        build_providers(tables, base_dir=base_dir)  # a bad provider is a bad config
    except GpuctlError as e:
        print(f"gpuctld: bad config: {e}", file=sys.stderr)
        return 2
    logfmt.setup(config.log_level, config.log_format)
    try:
        return serve(config, env, port_file=args.port_file, migrate=args.migrate)
    except (GpuctlError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
