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


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    listen: str = "127.0.0.1:50051"
    max_workers: int = 32
    drain_grace_s: float = 10.0
    state_dir: str = ""  # "": $STATE_DIRECTORY (systemd) or ~/.local/state/gpuctld
    store_url: str = ""  # "": SQLite at <state_dir>/gpuctld.db
    policy: str = "default"
    policy_weights: Mapping[str, float] = field(default_factory=dict)
    cycle_interval_s: float = 5.0
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    heartbeat_check_interval_s: float = 5.0
    lease_interval_s: float = 60.0
    kill_grace_s: float = 10.0
    master_port_base: int = 29500
    master_port_range: int = 1000
    max_log_bytes_per_rank: int = 64 * 1024 * 1024
    log_level: str = "INFO"

    def resolved_state_dir(self, env: Mapping[str, str]) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        if env.get("STATE_DIRECTORY"):  # systemd's StateDirectory=; first entry
            return Path(env["STATE_DIRECTORY"].split(":")[0])
        return Path("~/.local/state/gpuctld").expanduser()

    def resolved_store_url(self, env: Mapping[str, str]) -> str:
        return self.store_url or f"sqlite:///{self.resolved_state_dir(env) / 'gpuctld.db'}"


# TOML table.key -> DaemonConfig field
_KEYS: dict[str, str] = {
    "server.listen": "listen",
    "server.max_workers": "max_workers",
    "server.drain_grace_s": "drain_grace_s",
    "store.state_dir": "state_dir",
    "store.url": "store_url",
    "scheduler.policy": "policy",
    "scheduler.weights": "policy_weights",
    "scheduler.interval_s": "cycle_interval_s",
    "nodes.heartbeat_interval_s": "heartbeat_interval_s",
    "nodes.heartbeat_timeout_s": "heartbeat_timeout_s",
    "nodes.check_interval_s": "heartbeat_check_interval_s",
    "leases.interval_s": "lease_interval_s",
    "jobs.kill_grace_s": "kill_grace_s",
    "jobs.master_port_base": "master_port_base",
    "jobs.master_port_range": "master_port_range",
    "jobs.max_log_bytes_per_rank": "max_log_bytes_per_rank",
    "logging.level": "log_level",
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
        if f.name == "policy_weights":
            ok = isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values())
        else:
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if not ok:
            violations.append(
                FieldViolation(key_of.get(f.name, f.name), f"must be {want.__name__}")
            )
        elif want in (int, float) and f.name != "policy_weights" and value < 0:
            violations.append(FieldViolation(key_of.get(f.name, f.name), "must not be negative"))
    if violations:
        raise InvalidArgument(violations)
    return DaemonConfig(**values)
