"""The daemon's configuration: one TOML file (`config/gpuctld.toml` documents every key).

The only place the daemon reads files or the environment for settings.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.trust import DEFAULT_DENIED_ACCOUNTS, DEFAULT_MIN_UID

LOG_FORMATS = ("auto", "json", "plain")
MAX_API_WORKERS = 64
MAX_SERVICE_HEADROOM = 64  # replicas a service keeps ready; more is a typo, not a plan


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    listen: str = "127.0.0.1:50051"  # "": no TCP listener (the Unix socket only)
    socket: str = ""  # "": $RUNTIME_DIRECTORY/gpuctld.sock (systemd), else <state_dir>/gpuctld.sock
    insecure: bool = False  # serve a non-loopback TCP address without TLS
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_self_signed: bool = False  # a server certificate from gpuctld's own CA
    tls_names: tuple[str, ...] = ()  # its names; empty: localhost, 127.0.0.1, the host name
    agent_listen: str = ""  # agents with certificates from gpuctld's CA (mTLS)
    max_workers: int = 64
    api_workers: int = 0  # processes that serve the TCP listener beside gpuctld's own
    drain_grace_s: float = 10.0
    state_dir: str = ""  # "": $STATE_DIRECTORY (systemd) or ~/.local/state/gpuctld
    store_url: str = ""  # "": SQLite at <state_dir>/gpuctld.db
    policy: str = "default"
    policy_weights: Mapping[str, float] = field(default_factory=dict)
    cycle_interval_s: float = 5.0
    queues: tuple[str, ...] = ()  # the queues jobs may name; empty: any
    cycle_process: bool = True  # decide cycles in a worker process (runtime.cycleproc)
    heartbeat_interval_s: float = 3.0
    heartbeat_timeout_s: float = 12.0  # 4 missed heartbeats; see config/gpuctld.toml
    heartbeat_check_interval_s: float = 1.0
    lease_interval_s: float = 60.0
    providers_file: str = ""  # "": no providers; nodes only register by themselves
    lease_idle_grace_s: float = 300.0
    lease_warm_nodes: int = 0
    lease_service_grace_s: float = 1800.0
    lease_service_headroom: int = 0
    lease_boot_timeout_s: float = 600.0
    lease_renew_before_s: float = 600.0
    lease_retry_after_s: float = 900.0
    lease_unknown: str = "release"
    lease_budgets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    kill_grace_s: float = 10.0
    master_port_base: int = 29500
    master_port_range: int = 1000
    replica_port_base: int = 31000
    replica_port_range: int = 9000
    max_log_bytes_per_rank: int = 64 * 1024 * 1024
    max_log_bytes_per_job: int = 1024 * 1024 * 1024
    max_log_bytes_total: int = 50 * 1024 * 1024 * 1024
    retention_days: float = 30.0
    audit_retention_days: float = 365.0
    log_level: str = "INFO"
    log_format: str = "auto"  # auto: JSON lines unless stderr is a terminal; json; plain
    metrics_listen: str = ""  # Prometheus /metrics, e.g. 127.0.0.1:9750; "": none
    ui: bool = True  # the read-only web page /ui on the metrics listener
    admins: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    operator_groups: tuple[str, ...] = ()
    # queue -> {"members": [names], "groups": [groups]}: they act on its jobs as on their own
    queue_grants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    session_ttl_s: float = 3600.0
    token_ttl_s: float = 90 * 24 * 3600.0
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_jwks_url: str = ""
    oidc_username_claim: str = "preferred_username"
    oidc_groups_claim: str = "groups"
    run_as_min_uid: int = DEFAULT_MIN_UID
    run_as_deny: tuple[str, ...] = tuple(sorted(DEFAULT_DENIED_ACCOUNTS))
    run_as_allow: tuple[str, ...] = ()
    run_as_map: Mapping[str, str] = field(default_factory=dict)
    max_spec_bytes: int = 256 * 1024
    max_pending_per_user: int = 10_000
    max_streams: int = 16
    streams_per_caller: int = 4
    calls_per_caller: int = 16
    agent_reserve: int = 8
    # High availability: several gpuctld on one PostgreSQL, one leads (see runtime/leadership)
    ha_name: str = ""  # "": this host's name; a gpuctld restarted under its name leads at once
    ha_address: str = ""  # where people reach this gpuctld; "": from server.listen
    ha_agent_address: str = ""  # where agents reach it; "": from server.agent_listen
    ha_lease_ttl_s: float = 4.0
    ha_renew_interval_s: float = 1.0
    ha_retry_interval_s: float = 0.5

    def resolved_state_dir(self, env: Mapping[str, str]) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        if env.get("STATE_DIRECTORY"):  # systemd's StateDirectory=; first entry
            return Path(env["STATE_DIRECTORY"].split(":")[0])
        return Path("~/.local/state/gpuctld").expanduser()

    def resolved_socket(self, env: Mapping[str, str]) -> Path:
        if self.socket:
            return Path(self.socket).expanduser()
        if env.get("RUNTIME_DIRECTORY"):  # systemd's RuntimeDirectory=; first entry
            return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "gpuctld.sock"
        return self.resolved_state_dir(env) / "gpuctld.sock"

    def resolved_store_url(self, env: Mapping[str, str]) -> str:
        return self.store_url or f"sqlite:///{self.resolved_state_dir(env) / 'gpuctld.db'}"


# TOML table.key -> DaemonConfig field
_KEYS: dict[str, str] = {
    "server.listen": "listen",
    "server.socket": "socket",
    "server.insecure": "insecure",
    "server.max_workers": "max_workers",
    "server.api_workers": "api_workers",
    "tls.cert_file": "tls_cert_file",
    "tls.key_file": "tls_key_file",
    "tls.self_signed": "tls_self_signed",
    "tls.names": "tls_names",
    "server.agent_listen": "agent_listen",
    "auth.admins": "admins",
    "auth.operators": "operators",
    "auth.admin_groups": "admin_groups",
    "auth.operator_groups": "operator_groups",
    "auth.queues": "queue_grants",
    "auth.session_ttl_s": "session_ttl_s",
    "auth.token_ttl_s": "token_ttl_s",
    "auth.oidc_issuer": "oidc_issuer",
    "auth.oidc_audience": "oidc_audience",
    "auth.oidc_jwks_url": "oidc_jwks_url",
    "auth.oidc_username_claim": "oidc_username_claim",
    "auth.oidc_groups_claim": "oidc_groups_claim",
    "run_as.min_uid": "run_as_min_uid",
    "run_as.deny": "run_as_deny",
    "run_as.allow": "run_as_allow",
    "run_as.map": "run_as_map",
    "limits.max_spec_bytes": "max_spec_bytes",
    "limits.max_pending_per_user": "max_pending_per_user",
    "limits.max_streams": "max_streams",
    "limits.streams_per_caller": "streams_per_caller",
    "limits.calls_per_caller": "calls_per_caller",
    "limits.agent_reserve": "agent_reserve",
    "server.drain_grace_s": "drain_grace_s",
    "store.state_dir": "state_dir",
    "store.url": "store_url",
    "scheduler.policy": "policy",
    "scheduler.weights": "policy_weights",
    "scheduler.interval_s": "cycle_interval_s",
    "scheduler.queues": "queues",
    "scheduler.separate_process": "cycle_process",
    "nodes.heartbeat_interval_s": "heartbeat_interval_s",
    "nodes.heartbeat_timeout_s": "heartbeat_timeout_s",
    "nodes.check_interval_s": "heartbeat_check_interval_s",
    "leases.interval_s": "lease_interval_s",
    "leases.providers_file": "providers_file",
    "leases.idle_grace_s": "lease_idle_grace_s",
    "leases.warm_nodes": "lease_warm_nodes",
    "leases.service_grace_s": "lease_service_grace_s",
    "leases.service_headroom": "lease_service_headroom",
    "leases.boot_timeout_s": "lease_boot_timeout_s",
    "leases.renew_before_s": "lease_renew_before_s",
    "leases.retry_after_s": "lease_retry_after_s",
    "leases.unknown": "lease_unknown",
    "leases.budgets": "lease_budgets",
    "jobs.kill_grace_s": "kill_grace_s",
    "jobs.master_port_base": "master_port_base",
    "jobs.master_port_range": "master_port_range",
    "jobs.replica_port_base": "replica_port_base",
    "jobs.replica_port_range": "replica_port_range",
    "jobs.max_log_bytes_per_rank": "max_log_bytes_per_rank",
    "jobs.max_log_bytes_per_job": "max_log_bytes_per_job",
    "jobs.max_log_bytes_total": "max_log_bytes_total",
    "jobs.retention_days": "retention_days",
    "auth.audit_retention_days": "audit_retention_days",
    "logging.level": "log_level",
    "logging.format": "log_format",
    "metrics.listen": "metrics_listen",
    "metrics.ui": "ui",
    "ha.name": "ha_name",
    "ha.address": "ha_address",
    "ha.agent_address": "ha_agent_address",
    "ha.lease_ttl_s": "ha_lease_ttl_s",
    "ha.renew_interval_s": "ha_renew_interval_s",
    "ha.retry_interval_s": "ha_retry_interval_s",
}


def load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> DaemonConfig:
    """Read the TOML file (None: defaults), apply `overrides` (field -> value), check types."""
    values: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument([FieldViolation(str(path), "config file not found")]) from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument([FieldViolation(str(path), f"not valid TOML: {e}")]) from None
        for table, body in data.items():
            if not isinstance(body, dict):
                violations.append(FieldViolation(table, "must be a table like [server]"))
                continue
            for key, value in body.items():
                name = _KEYS.get(f"{table}.{key}")
                if name is None:
                    violations.append(
                        FieldViolation(
                            f"{table}.{key}", "unknown setting (see config/gpuctld.toml)"
                        )
                    )
                else:
                    values[name] = value
    values.update(overrides or {})
    defaults = DaemonConfig()
    key_of = {v: k for k, v in _KEYS.items()}
    for f in fields(DaemonConfig):
        if f.name not in values:
            continue
        want = type(getattr(defaults, f.name))
        value = values[f.name]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[f.name] = value = float(value)
        if want is tuple and isinstance(value, list | tuple):
            values[f.name] = value = tuple(value)
            ok = all(isinstance(v, str) for v in value)
            want = list  # for the message: a TOML array of strings
        elif f.name == "run_as_map":
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        elif f.name == "policy_weights":
            ok = isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values())
        elif f.name == "lease_budgets":
            ok = isinstance(value, dict)
            if ok:
                violations.extend(_budget_violations(value))
                continue
        elif f.name == "queue_grants":
            ok = isinstance(value, dict)
            if ok:
                violations.extend(_grant_violations(value))
                continue
        else:
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if not ok:
            violations.append(
                FieldViolation(key_of.get(f.name, f.name), f"must be {want.__name__}")
            )
        elif want in (int, float) and f.name != "policy_weights" and value < 0:
            violations.append(FieldViolation(key_of.get(f.name, f.name), "must not be negative"))
    base = values.get("replica_port_base", DaemonConfig.replica_port_base)
    size = values.get("replica_port_range", DaemonConfig.replica_port_range)
    if (
        isinstance(base, int)
        and isinstance(size, int)
        and not (base >= 1024 and size >= 1 and base + size <= 65536)
    ):
        violations.append(
            FieldViolation(
                "jobs.replica_port_range",
                f"ports {base}..{base + size - 1} must lie within 1024..65535",
            )
        )
    workers = values.get("api_workers", 0)
    if isinstance(workers, int) and workers > MAX_API_WORKERS:
        violations.append(
            FieldViolation("server.api_workers", f"at most {MAX_API_WORKERS} (0: none)")
        )
    headroom = values.get("lease_service_headroom", 0)
    if isinstance(headroom, int) and headroom > MAX_SERVICE_HEADROOM:
        violations.append(
            FieldViolation("leases.service_headroom", f"at most {MAX_SERVICE_HEADROOM} (0: none)")
        )
    if values.get("log_format", "auto") not in LOG_FORMATS:
        violations.append(FieldViolation("logging.format", 'must be "auto", "json" or "plain"'))
    if values.get("lease_unknown", "release") not in ("release", "adopt"):
        violations.append(FieldViolation("leases.unknown", 'must be "release" or "adopt"'))
    if violations:
        raise InvalidArgument(violations)
    providers_file = values.get("providers_file", "")
    if providers_file and path is not None:
        # Relative to the config file that names it, not to wherever gpuctld was started.
        values["providers_file"] = str(Path(path).parent / Path(providers_file).expanduser())
    return DaemonConfig(**values)


_BUDGET_KEYS = ("dollars_per_hour", "dollars")


def _budget_violations(budgets: Mapping[str, Any]) -> list[FieldViolation]:
    out = []
    for queue, budget in budgets.items():
        where = f"leases.budgets.{queue}"
        if not isinstance(budget, dict):
            out.append(FieldViolation(where, "must be a table like { dollars_per_hour = 100.0 }"))
            continue
        for key, value in budget.items():
            if key not in _BUDGET_KEYS:
                out.append(
                    FieldViolation(f"{where}.{key}", f"unknown; known: {', '.join(_BUDGET_KEYS)}")
                )
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                out.append(FieldViolation(f"{where}.{key}", "must be a number >= 0 (0: no cap)"))
    return out


def _grant_violations(grants: Mapping[str, Any]) -> list[FieldViolation]:
    out = []
    for queue, grant in grants.items():
        where = f"auth.queues.{queue}"
        if not isinstance(grant, dict):
            out.append(FieldViolation(where, 'must be a table like { members = ["alice"] }'))
            continue
        for key, value in grant.items():
            if key not in ("members", "groups"):
                out.append(FieldViolation(f"{where}.{key}", "unknown; known: members, groups"))
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                out.append(FieldViolation(f"{where}.{key}", "must be a list of names"))
    return out


def load_providers(config: DaemonConfig) -> tuple[tuple[Mapping[str, Any], ...], Path]:
    """The `[[provider]]` tables of `config.providers_file` (none without one), and the
    directory their relative paths (a catalog's) are taken from."""
    if not config.providers_file:
        return (), Path(".")
    path = Path(config.providers_file).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(
            [FieldViolation("leases.providers_file", f"{path} not found")]
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(
            [FieldViolation("leases.providers_file", f"{path} is not valid TOML: {e}")]
        ) from None
    unknown = sorted(set(data) - {"provider"})
    if unknown:
        raise InvalidArgument(
            [FieldViolation(f"{path}: {k}", "unknown; only [[provider]] tables") for k in unknown]
        )
    tables = data.get("provider", [])
    if not isinstance(tables, list):
        raise InvalidArgument([FieldViolation(f"{path}: provider", "must be [[provider]] tables")])
    return tuple(tables), path.parent
