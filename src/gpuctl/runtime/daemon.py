"""gpuctld's composition root: reads the config, opens the store, builds the controller and
the gRPC server, starts the periodic work, tells systemd it is ready, and drains on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from gpuctl.api.server import ApiServer
from gpuctl.core.errors import GpuctlError
from gpuctl.core.leasing import Budget
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import SystemClock
from gpuctl.runtime.config import DaemonConfig, load_config, load_providers
from gpuctl.runtime.controller import Controller, ControllerSettings
from gpuctl.runtime.leases import LeaseKeeper, LeaseSettings, build_providers
from gpuctl.runtime.logstore import LogStore
from gpuctl.runtime.periodic import Periodic
from gpuctl.runtime.sdnotify import Notifier
from gpuctl.store.sql import open_store

log = logging.getLogger("gpuctld")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpuctld", description="The gpuctl daemon: API, store, scheduling loop."
    )
    p.add_argument("--config", help="TOML config file (see config/gpuctld.toml)")
    p.add_argument(
        "--listen", help="address to serve on, e.g. 127.0.0.1:50051 (port 0: any free port)"
    )
    p.add_argument("--state-dir", help="where the SQLite store and rank logs live")
    p.add_argument("--store-url", help="sqlite:///PATH or postgresql://USER@HOST/DB")
    p.add_argument(
        "--port-file", help="write the bound port here once serving (for tests and scripts)"
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    pairs = {
        "listen": args.listen,
        "state_dir": args.state_dir,
        "store_url": args.store_url,
        "log_level": args.log_level,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def serve(config: DaemonConfig, env: dict[str, str], *, port_file: str | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notifier = Notifier(env)

    state_dir = config.resolved_state_dir(env)
    state_dir.mkdir(parents=True, exist_ok=True)
    tables, base_dir = load_providers(config)
    store = open_store(config.resolved_store_url(env))
    # The static and catalog providers keep their grants in memory: the store hands them back.
    providers = build_providers(
        tables, base_dir=base_dir, leases=store.list_leases(include_released=True)
    )
    periodic = Periodic()
    controller = Controller(
        store,
        SystemClock(),
        build_policy(config.policy, config.policy_weights),
        LogStore(state_dir / "logs", max_bytes_per_rank=config.max_log_bytes_per_rank),
        ControllerSettings(
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            kill_grace_s=config.kill_grace_s,
            master_port_base=config.master_port_base,
            master_port_range=config.master_port_range,
        ),
        wake=lambda: periodic.wake("cycle"),
    )
    keep_leases = controller.keep_leases
    if providers:
        keeper = LeaseKeeper(
            controller,
            providers,
            LeaseSettings(
                idle_grace_s=config.lease_idle_grace_s,
                boot_timeout_s=config.lease_boot_timeout_s,
                renew_before_s=config.lease_renew_before_s,
                retry_after_s=config.lease_retry_after_s,
                unknown=config.lease_unknown,
                budgets={q: Budget(**b) for q, b in config.lease_budgets.items()},
            ),
            wake=lambda: periodic.wake("leases"),
        )
        keep_leases = keeper.tick
        log.info("leasing from %s", ", ".join(p.name for p in providers))
    server = ApiServer(controller, config.listen, max_workers=config.max_workers)
    server.start()
    host = config.listen.rsplit(":", 1)[0]
    log.info(
        "serving on %s:%d, store %s", host, server.port, _redact(config.resolved_store_url(env))
    )
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(f"{server.port}\n")
        tmp.replace(port_file)

    periodic.every("cycle", config.cycle_interval_s, controller.run_cycle)
    periodic.every(
        "heartbeat-expiry", config.heartbeat_check_interval_s, controller.expire_heartbeats
    )
    periodic.every("time-limits", config.heartbeat_check_interval_s, controller.enforce_time_limits)
    periodic.every("leases", config.lease_interval_s, keep_leases)
    periodic.start()
    # Ready only now: the port is bound and the store is open.
    notifier.ready(f"serving on {host}:{server.port}")

    interval = notifier.watchdog_interval or 5.0
    while not stop.wait(interval):
        notifier.watchdog()

    log.info("SIGTERM: draining (grace %gs)", config.drain_grace_s)
    notifier.stopping()
    periodic.shutdown()
    server.drain(config.drain_grace_s)
    store.close()
    log.info("stopped")
    return 0


def _redact(url: str) -> str:
    """Hide a password in a database URL before logging it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    env = dict(os.environ)
    try:
        config = load_config(args.config, _overrides(args))
        tables, base_dir = load_providers(config)
        build_providers(tables, base_dir=base_dir)  # a bad provider is a bad config
    except GpuctlError as e:
        print(f"gpuctld: bad config: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    try:
        return serve(config, env, port_file=args.port_file)
    except (GpuctlError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
