"""`gpuctl config`: named contexts (which gpuctld, which CA, which token), as kubectl's.

The file is YAML at $GPUCTL_CONFIG, else $XDG_CONFIG_HOME/gpuctl/config.yaml (~/.config/...):

    current_context: prod
    contexts:
      prod: {server: "head1:50051,head2:50051", ca_file: /etc/gpuctl/ca.crt,
             token_file: ~/.config/gpuctl/prod.token}
      lab: {server: "unix:/run/gpuctl/gpuctld.sock"}

A context names files, never holds a token itself; the file is written 0600 all the same.
Flags and their environment variables (--server, GPUCTL_SERVER, ...) win over the context.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from gpuctl.core.errors import FieldViolation, InvalidArgument

FIELDS = ("server", "ca_file", "token_file")


@dataclass(frozen=True, slots=True)
class Context:
    name: str
    server: str = ""
    ca_file: str = ""
    token_file: str = ""


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("GPUCTL_CONFIG"):
        return Path(env["GPUCTL_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "gpuctl" / "config.yaml"


def load(path: Path | None = None) -> tuple[str, dict[str, Context]]:
    """(the current context's name, every context); ("", {}) when there is no file."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", {}
    except OSError as e:
        raise InvalidArgument([FieldViolation(str(path), f"cannot read: {e.strerror}")]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InvalidArgument(
            [FieldViolation(str(path), f"is not valid YAML: {str(e).splitlines()[0]}")]
        ) from None
    problems: list[FieldViolation] = []
    if not isinstance(data, dict):
        raise InvalidArgument([FieldViolation(str(path), "must be a mapping")])
    current = data.get("current_context") or ""
    if not isinstance(current, str):
        problems.append(FieldViolation(f"{path}: current_context", "must be a name"))
    found: dict[str, Context] = {}
    raw = data.get("contexts") or {}
    if not isinstance(raw, dict):
        problems.append(FieldViolation(f"{path}: contexts", "must be a mapping of name: {...}"))
        raw = {}
    for name, fields in raw.items():
        where = f"{path}: contexts.{name}"
        if not isinstance(fields, dict):
            problems.append(FieldViolation(where, "must be a mapping of server, ca_file, ..."))
            continue
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            problems.append(
                FieldViolation(where, f"unknown key {unknown[0]!r} (known: {', '.join(FIELDS)})")
            )
        if not all(isinstance(v, str) for v in fields.values()):
            problems.append(FieldViolation(where, "values must be text"))
            continue
        found[str(name)] = Context(str(name), **{k: fields[k] for k in FIELDS if k in fields})
    if problems:
        raise InvalidArgument(problems)
    return (current if isinstance(current, str) else ""), found


def save(current: str, found: Mapping[str, Context], path: Path | None = None) -> Path:
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"current_context": current or None, "contexts": {}}
    for name in sorted(found):
        fields = {k: v for k, v in asdict(found[name]).items() if k != "name" and v}
        data["contexts"][name] = fields
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    tmp.replace(path)
    return path


def resolve(name: str | None) -> Context | None:
    """The context to use: `name` (an unknown one is an error), else the current one, else
    none."""
    current, found = load()
    wanted = name or current
    if not wanted:
        return None
    if wanted not in found:
        known = ", ".join(sorted(found)) or "none yet (gpuctl config set-context NAME ...)"
        why = "no such context" if name else "the current context does not exist"
        raise InvalidArgument([FieldViolation("context", f"{wanted!r}: {why}; contexts: {known}")])
    return found[wanted]
