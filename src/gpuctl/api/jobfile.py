"""The user-facing job spec format: YAML job files, SDK mappings and `gpuctl submit` flags.

One parser for all three, so a field means the same thing everywhere. It converts shapes and
units only; ranges and cross-field rules are `core.validation`'s (run by the server).

===================  ======================================  ===============================================
field                type                                    meaning
===================  ======================================  ===============================================
kind                 ``training`` | ``inference``            required; a gang of whole nodes, or replicas
name                 string                                  a label for people (1-63 of ``A-Za-z0-9._-``)
queue                string                                  the queue to wait in (default ``default``)
priority             int                                     higher goes first; may preempt preemptible work
command              list of strings, or one string          the program and its arguments; a string is
                                                             split like a shell would (``shlex``)
env                  mapping                                 extra environment; values become strings
secret_env           mapping                                 environment whose values are secret: they
                                                             reach the ranks and are shown to no one
working_dir          string                                  absolute path the ranks start in
time_limit           int seconds, or ``90s`` ``30m`` ``2h``  stop the job after this long; ``0``: no limit
                     ``1d`` ``1h30m`` ``1:30:00`` ``2-00:00:00``
nodes                int                                     training: nodes in the gang (default 1)
gpus_per_node        int                                     training: GPUs on each node; inference: whole
                                                             GPUs per replica (tensor-parallel in one node)
replicas             int                                     inference: independent replicas (default 1)
gpu_share            float, 0 < x < 1                        inference: a share of one GPU per replica
                                                             (stored as ``gpu_milli = round(x * 1000)``)
gpu_milli            int, 1..999                             the same share in thousandths; give one of the two
gpu_memory           ``40GiB`` ``80G`` ``512MiB`` or int MiB GPU memory each replica needs (weights + KV cache)
gpu_model            string, or a list of strings            only GPUs of this model, e.g. ``H100 SXM``; a list
                                                             (or ``A,B``, ``A|B``): any of those models
cpus                 number, or ``500m``                     CPU cores per rank/replica (``cpu_milli``)
memory               ``64GiB`` ``64G`` or int MiB            host memory per rank/replica
min_nvlink_gbps      number                                  training: NVLink floor per GPU, GB/s
min_net_gbps         number                                  training: inter-node network floor, Gb/s
on_node_lost         ``requeue`` | ``fail``                  what a lost node does to the job (default requeue)
max_surge            int                                     inference, rolling update: new replicas started
                                                             beyond the desired count at once (default 1)
max_unavailable      int                                     inference, rolling update: replicas that may be
                                                             short of available meanwhile (default 0)
min_ready            duration, as time_limit                 inference, rolling update: how long a new
                                                             replica runs to count as available (10s)
progress_deadline    duration, as time_limit                 inference, rolling update: a new replica not
                                                             available this long rolls it back (10m)
readiness_http       string, a path such as ``/health``      inference: the agent GETs it on the replica's
                                                             $GPUCTL_PORT; 2xx/3xx is ready
readiness_tcp        bool                                    inference: ready once $GPUCTL_PORT accepts
restart_policy       ``always`` | ``on-failure`` | ``never`` inference: what replaces a replica that ends
                                                             (default on-failure: a non-zero exit, a lost or
                                                             degraded node; never: one failure fails the job)
preemptible          bool                                    higher-priority work may stop and requeue it
spread               ``node`` | ``fabric`` | ``none``        inference: one replica to a node where the
                                                             cheapest fitting nodes allow (default), one
                                                             to a fabric first, or packed (fewer nodes
                                                             busy, more lost with one)
target_tokens_per_s  number                                  inference: decode tokens/s each replica must
                                                             reach; needs ``weights_gb`` (HBM floor = the two
                                                             multiplied, GB/s)
weights_gb           number                                  inference: GB of weights a replica streams per
                                                             token (must fit ``gpu_memory``)
===================  ======================================  ===============================================

Sizes follow Kubernetes: ``Ki Mi Gi Ti`` (optionally with ``B``) are powers of 1024, ``K M G T``
(or ``KB MB GB TB``) powers of 1000, rounded up to whole MiB; so ``80G`` fits an "80 GB" GPU,
whose memory is about 79.6 GiB.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any

import yaml

from gpuctl.api import convert
from gpuctl.api._pb.v1 import jobs_pb2
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import (
    MILLI_PER_GPU,
    JobKind,
    JobSpec,
    OnNodeLost,
    RestartPolicy,
    SpreadPolicy,
)
from gpuctl.core.text import plain_number
from gpuctl.core.validation import spec_violations

MIB = 1024 * 1024
_SIZE_UNITS = {
    "": MIB,  # a bare number is MiB, like an int
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(
    r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$"
)
# Slurm's --time forms: M:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS (but a bare number is seconds
# here, as everywhere else in gpuctl, not Slurm's minutes).
_CLOCK_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class JobFileError(InvalidArgument):
    """A job file or mapping that cannot be read as a job spec; names the source."""

    def __init__(self, violations: list[FieldViolation], *, source: str = "") -> None:
        super().__init__(violations)
        self.source = source
        if source:
            self.args = (f"{source}: {self.args[0]}",)


class _Problem(ValueError):
    """Raised by a field parser; becomes one FieldViolation on that field."""


def _int(value: Any) -> int:
    # bool is an int in Python, but `nodes: true` is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(f"must be an integer, got {_show(value)}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Problem(f"must be a number, got {_show(value)}")
    try:
        number = float(value)  # an int past 1e308 has no float: OverflowError
    except OverflowError:
        raise _Problem(
            f"must be a finite number, got an integer of {value.bit_length()} bits"
        ) from None
    if not math.isfinite(number):
        raise _Problem(f"must be a finite number, got {value}")
    return number


def _digits(text: str) -> int:
    """An ASCII decimal: isdigit() is true for '²', which int() refuses, and int() refuses
    more than 4300 digits; no count of anything needs 30."""
    if not (text.isascii() and text.isdigit()) or len(text) > 30:
        raise _Problem(f"must be a whole number of at most 30 digits, got {text[:40]!r}")
    return int(text)


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise _Problem(f"is too large a {what}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Problem(f"must be a string, got {_show(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Problem(f"must be true or false, got {_show(value)}")
    return value


def _scalar_text(value: Any) -> str:
    """A YAML scalar as the string a process would see (`3` -> "3", `true` -> "true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise _Problem(f"must be a string, got {_show(value)}")


def _show(value: Any) -> str:
    """How a value reads in an error: "a string ('2')", "a list", "nothing (null)"."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    for cls, kind in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
    ):
        if isinstance(value, cls):
            return f"{kind} ({value!r})"
    return type(value).__name__


def _kind(value: Any) -> JobKind:
    text = _str(value).strip().lower()
    try:
        return JobKind(text)
    except ValueError:
        raise _Problem(f"must be 'training' or 'inference', got {value!r}") from None


def _gpu_models(value: Any) -> str:
    """One model, or several as a list or joined by "," or "|": stored "|"-joined."""
    items = value if isinstance(value, list) else [value]
    names = [n.strip() for item in items for n in _str(item).replace(",", "|").split("|")]
    if any(not n for n in names) and names != [""]:
        raise _Problem(f"names an empty model in {value!r}")
    return "|".join(names)


def _restart_policy(value: Any) -> RestartPolicy:
    text = _str(value).strip().lower().replace("_", "-")
    try:
        return RestartPolicy(text)
    except ValueError:
        raise _Problem(f"must be 'always', 'on-failure' or 'never', got {value!r}") from None


def _spread(value: Any) -> SpreadPolicy:
    text = _str(value).strip().lower()
    try:
        return SpreadPolicy(text)
    except ValueError:
        raise _Problem(f"must be 'node', 'fabric' or 'none', got {value!r}") from None


def _on_node_lost(value: Any) -> OnNodeLost:
    text = _str(value).strip().lower()
    try:
        return OnNodeLost(text)
    except ValueError:
        raise _Problem(f"must be 'requeue' or 'fail', got {value!r}") from None


def _command(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as e:  # an unclosed quote
            raise _Problem(f"cannot be split like a shell command: {e}") from None
    if not isinstance(value, list | tuple):
        raise _Problem(f"must be a list of strings or one string, got {_show(value)}")
    out = []
    for i, arg in enumerate(value):
        try:
            out.append(_scalar_text(arg))
        except _Problem as e:
            raise _Problem(f"argument {i} {e}") from None
    return tuple(out)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise _Problem(f"must be a mapping of NAME: value, got {_show(value)}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _Problem(f"names must be strings, got {_show(key)}")
        if item is None:
            raise _Problem(f'{key} has no value (write {key}: "" for an empty string)')
        try:
            out[key] = _scalar_text(item)
        except _Problem as e:
            raise _Problem(f"{key} {e}") from None
    return tuple(sorted(out.items()))


def parse_duration(value: Any) -> int:
    """Seconds from an int, "90s", "30m", "2h", "1d", "1h30m", "1:30:00" or "2-00:00:00"."""
    if isinstance(value, bool):
        raise _Problem(f"must be seconds or a duration like '2h' or '1h30m', got {_show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise _Problem(f"must be seconds or a duration like '2h' or '1h30m', got {_show(value)}")
    text = value.strip().lower()
    if text.isdigit():
        return _digits(text)
    if (":" in text or "-" in text) and (m := _CLOCK_RE.match(text)):
        days, first, *rest = (_digits(g) if g else None for g in m.groups())
        parts = [first, *(p for p in rest if p is not None)]
        if days is None and len(parts) == 2:  # M:SS
            parts = [0, *parts]
        hours, minutes, seconds = (*parts, 0, 0)[:3]
        return (days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    m = _DURATION_RE.match(text)
    if not text or m is None:
        raise _Problem(
            f"must be seconds or a duration like '90s', '30m', '2h', '1d' or '1h30m', got {value!r}"
        )
    total = sum(
        float(g) * s for g, s in zip(m.groups(), _DURATION_UNITS.values(), strict=True) if g
    )
    return round(_finite(total, "duration"))


def format_duration(seconds: int) -> str:
    """The inverse of `parse_duration` for whole seconds: 5400 -> "1h30m"."""
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in _DURATION_UNITS.items():
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


def parse_size_mib(value: Any) -> int:
    """MiB from an int (MiB) or a size like "40GiB", "80G" or "512MiB", rounded up."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Problem(f"must be a size like '40GiB' or an integer of MiB, got {_show(value)}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    factor = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or factor is None:
        raise _Problem(f"must be a size like '40GiB', '80G' or '512MiB', got {value!r}")
    return math.ceil(_finite(float(m.group(1)) * factor / MIB, "size"))


def format_size_mib(mib: int) -> str:
    """The largest binary unit that states `mib` exactly: 65536 -> "64GiB"."""
    for unit, size in (("TiB", 1024**2), ("GiB", 1024), ("MiB", 1)):
        if mib and mib % size == 0:
            return f"{mib // size}{unit}"
    return f"{mib}MiB"


def _cpu_milli(value: Any) -> int:
    if isinstance(value, str) and value.strip().endswith("m") and value.strip()[:-1].isdigit():
        return _digits(value.strip()[:-1])  # Kubernetes millicores, "500m"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Problem(
                f"must be a number of cores or millicores like '500m', got {value!r}"
            ) from None
    return round(_finite(_number(value) * 1000, "number of cores"))


def _gpu_share(value: Any) -> int:
    share = _number(value)
    if not 0 < share < 1:
        raise _Problem(f"must be between 0 and 1 (a share of one GPU), got {share:g}")
    return max(1, round(share * MILLI_PER_GPU))


# File field -> (JobSpec attribute, parser). The order is the order of the docs and of
# `spec_to_mapping`.
FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "kind": ("kind", _kind),
    "name": ("name", _str),
    "queue": ("queue", _str),
    "priority": ("priority", _int),
    "command": ("command", _command),
    "env": ("env", _env),
    "secret_env": ("secret_env", _env),
    "working_dir": ("working_dir", _str),
    "time_limit": ("time_limit_s", parse_duration),
    "nodes": ("num_nodes", _int),
    "gpus_per_node": ("gpus_per_node", _int),
    "replicas": ("replicas", _int),
    "gpu_share": ("gpu_milli", _gpu_share),
    "gpu_milli": ("gpu_milli", _int),
    "gpu_memory": ("gpu_memory_mib", parse_size_mib),
    "gpu_model": ("gpu_model", _gpu_models),
    "cpus": ("cpu_milli", _cpu_milli),
    "memory": ("memory_mib", parse_size_mib),
    "min_nvlink_gbps": ("min_nvlink_gbps", _number),
    "min_net_gbps": ("min_net_gbps", _number),
    "on_node_lost": ("on_node_lost", _on_node_lost),
    "restart_policy": ("restart_policy", _restart_policy),
    "spread": ("spread", _spread),
    "max_surge": ("max_surge", _int),
    "max_unavailable": ("max_unavailable", _int),
    "min_ready": ("min_ready_s", parse_duration),
    "progress_deadline": ("progress_deadline_s", parse_duration),
    "readiness_http": ("readiness_http", _str),
    "readiness_tcp": ("readiness_tcp", _bool),
    "preemptible": ("preemptible", _bool),
    "target_tokens_per_s": ("target_tokens_per_s", _number),
    "weights_gb": ("weights_gb", _number),
}


# Names people bring from Slurm, Kubernetes or the JobSpec attributes; only hints, not aliases,
# so a file has one spelling for each field.
_HINTS = {
    "gpus": "gpus_per_node",
    "gpu": "gpus_per_node",
    "num_nodes": "nodes",
    "workdir": "working_dir",
    "time": "time_limit",
    "time_limit_s": "time_limit",
    "mem": "memory",
    "memory_mib": "memory",
    "gpu_memory_mib": "gpu_memory",
    "cpu": "cpus",
    "cpu_milli": "cpus",
    "args": "command",
    "environment": "env",
    "type": "kind",
}


def _unknown_field(key: Any) -> FieldViolation:
    known = ", ".join(FIELDS)
    close = [_HINTS[key]] if key in _HINTS else difflib.get_close_matches(str(key), FIELDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return FieldViolation(str(key), f"unknown field; {hint}the fields are: {known}")


_NO_GPUS = (
    "an inference replica needs GPUs: give gpus_per_node or gpu_share (or gpus_per_node: 0 "
    "for a replica that needs none)"
)


def spec_from_mapping(data: Mapping[str, Any], *, source: str = "", check: bool = False) -> JobSpec:
    """A JobSpec from a job-file mapping; every problem at once as `JobFileError`. With
    `check`, also every rule the server holds a spec to, named in the file's words (the
    key, and numbers in its units), so a whole job file fails before it is sent."""
    if not isinstance(data, Mapping):
        raise JobFileError(
            [FieldViolation("(document)", f"must be a mapping of field: value, got {_show(data)}")],
            source=source,
        )
    violations: list[FieldViolation] = []
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in FIELDS:
            violations.append(_unknown_field(key))
            continue
        if raw is None:  # `name:` with nothing after it: the default, as if left out
            continue
        attr, parse = FIELDS[key]
        try:
            values[attr] = parse(raw)
        except _Problem as e:
            violations.append(FieldViolation(key, str(e)))
    if (
        "gpu_share" in data
        and "gpu_milli" in data
        and data["gpu_share"] is not None
        and data["gpu_milli"] is not None
    ):
        violations.append(FieldViolation("gpu_share", "give gpu_share or gpu_milli, not both"))
    if "kind" not in values and not any(v.field == "kind" for v in violations):
        violations.append(FieldViolation("kind", "is required: 'training' or 'inference'"))
    gpus_asked = any(data.get(k) is not None for k in ("gpus_per_node", "gpu_share", "gpu_milli"))
    if values.get("kind") is JobKind.INFERENCE and not gpus_asked:
        violations.append(FieldViolation("gpus_per_node", _NO_GPUS))
    if violations:
        raise JobFileError(violations, source=source)
    values.setdefault("command", ())
    secret = values.pop("secret_env", ())
    if secret:
        # Secret values travel in env like any other; only their keys are marked.
        values["env"] = tuple(sorted({**dict(values.get("env", ())), **dict(secret)}.items()))
        values["secret_env"] = tuple(sorted(k for k, _ in secret))
    spec = JobSpec(**values)
    if check:
        # "cpus: must be between 0 and 1024, got -2", not "spec.cpu_milli: ... -2000" from
        # the server. (The owner is the caller's, set by the server.)
        found = [v for v in spec_violations(spec, prefix="") if v.field != "owner"]
        if found:
            raise JobFileError([_in_file_terms(v, data) for v in found], source=source)
    return spec


# How a spec attribute's numbers read in a job file, where its unit is not the spec's.
_FILE_UNITS: dict[str, Callable[[float], str]] = {
    "cpu_milli": lambda v: plain_number(v / 1000),
    "memory_mib": lambda v: format_size_mib(int(v)) if v > 0 else plain_number(v),
    "gpu_memory_mib": lambda v: format_size_mib(int(v)) if v > 0 else plain_number(v),
    "gpu_milli": lambda v: plain_number(v / MILLI_PER_GPU),
    "time_limit_s": lambda v: format_duration(int(v)) if v > 0 else plain_number(v),
    "min_ready_s": lambda v: format_duration(int(v)) if v > 0 else plain_number(v),
    "progress_deadline_s": lambda v: format_duration(int(v)) if v > 0 else plain_number(v),
}
_BETWEEN = re.compile(r"must be between (\S+) and (\S+), got (\S+)$")


def _in_file_terms(violation: FieldViolation, data: Mapping[str, Any]) -> FieldViolation:
    """`violation` (of a spec attribute) named by the job-file key the value came from, its
    numbers in that key's unit."""
    head, dot, rest = violation.field.partition(".")
    head, bracket, index = head.partition("[")
    attr = head
    keys = [k for k, (a, _) in FIELDS.items() if a == attr]
    key = next((k for k in keys if k in data), keys[0] if keys else attr)
    field = key + (bracket + index if bracket else "") + (dot + rest if dot else "")
    description = violation.description
    m = _BETWEEN.match(description)
    if m is not None and not (dot or bracket):
        unit = _FILE_UNITS.get(attr) if key != "gpu_milli" else None
        try:
            lo, hi = (unit(float(x)) if unit else x for x in m.groups()[:2])
        except ValueError:
            lo, hi = m.groups()[:2]
        raw = data.get(key)
        # the value as it was written (a flag's text, a file's scalar), else the spec's
        scalar = isinstance(raw, str | int | float) and not isinstance(raw, bool)
        got = str(raw)[:64] if scalar else m[3]
        description = f"must be between {lo} and {hi}, got {got}"
    return FieldViolation(field, description)


def load_job_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML job file ("-": standard input), before field parsing."""
    source = os.fspath(path)
    if source == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        with open(source, encoding="utf-8") as f:
            try:
                text = f.read()
            except UnicodeDecodeError:
                raise JobFileError(
                    [FieldViolation("(document)", "is not UTF-8 text")], source=source
                ) from None
    try:
        data = yaml.safe_load(text)
    except ValueError as e:
        # PyYAML's int() of a literal past Python's 4300-digit limit, or its datetime() of a
        # date such as 2024-13-45: a value, not the syntax, is wrong.
        problem = str(e).split(";")[0]
        raise JobFileError(
            [FieldViolation("(document)", f"holds a value that cannot be read: {problem}")],
            source=source,
        ) from None
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JobFileError(
            [FieldViolation("(document)", f"is not valid YAML{where}: {problem}")], source=source
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise JobFileError(
            [FieldViolation("(document)", f"must be a mapping of field: value, got {_show(data)}")],
            source=source,
        )
    if "kind" not in data and isinstance(data.get("spec"), Mapping):
        # A job as `gpuctl get job 7 -o yaml` shows it: its spec is the job file (its id and
        # status are what happened to it, not what to run).
        data = data["spec"]
    return dict(data)


def load_job_file(path: str | os.PathLike[str]) -> JobSpec:
    """The JobSpec in a YAML job file; `JobFileError` names the file and every bad field."""
    source = "<stdin>" if os.fspath(path) == "-" else os.fspath(path)
    return spec_from_mapping(load_job_mapping(path), source=source, check=True)


def spec_to_mapping(spec: JobSpec | jobs_pb2.JobSpec, *, complete: bool = False) -> dict[str, Any]:
    """The job-file mapping of `spec`; the inverse of `spec_from_mapping`. Fields left at
    their default are left out, or with `complete` given as null (which a job file reads as
    the default), so that every field shows."""
    out = _spec_mapping(spec)
    if complete:
        given = "gpu_milli" if "gpu_milli" in out else "gpu_share"
        shown = {  # defaults that read better as themselves than as null
            "priority": 0,
            "env": {},
            "secret_env": {},
            "preemptible": False,
            "on_node_lost": str(JobSpec(kind=JobKind.TRAINING, command=()).on_node_lost),
        }
        for key in FIELDS:
            if key not in out and key != ("gpu_share" if given == "gpu_milli" else "gpu_milli"):
                out[key] = shown.get(key)
        out = {key: out[key] for key in FIELDS if key in out}  # the file's order
    return out


def job_document(job: jobs_pb2.Job) -> dict[str, Any]:
    """A job as `gpuctl get job -o json|yaml` shows it: its id, owner, spec (the job file, every
    field; `gpuctl submit -f` takes the whole document and runs the spec again) and status.
    Enums are the words the CLI and job files use; times are UTC, ISO 8601; nothing is left
    out for being zero."""
    placement = job.placement
    return {
        "id": job.id,
        "name": job.name,
        "owner": job.owner,
        "spec": spec_to_mapping(job.spec, complete=True),
        "status": {
            "state": _word(jobs_pb2.JobState, job.state, "JOB_STATE_"),
            "reason": job.reason,
            "exit_code": job.exit_code if job.HasField("exit_code") else None,
            "attempt": job.attempt,
            "generation": job.generation,
            "rolling": job.rolling,
            "submitted": _iso(job.create_time),
            "started": _iso(job.start_time),
            "ended": _iso(job.end_time),
            "updated": _iso(job.update_time),
            "request_id": job.request_id,
            "placement": (
                {
                    "reason": placement.reason,
                    "master_addr": placement.master_addr,
                    "master_port": placement.master_port,
                    "ranks": [_rank_document(r) for r in placement.ranks],
                }
                if job.HasField("placement")
                else None
            ),
            "events": [
                {
                    "time": _iso(e.time),
                    "type": e.type,
                    "message": e.message,
                }
                for e in job.events
            ],
        },
    }


def _rank_document(r: jobs_pb2.RankStatus) -> dict[str, Any]:
    return {
        "rank": r.rank,
        "node": r.node,
        "gpus": list(r.gpu_indices),
        "gpu_share": r.gpu_milli / MILLI_PER_GPU,
        "state": _word(jobs_pb2.RankState, r.state, "RANK_STATE_"),
        "exit_code": r.exit_code if r.HasField("exit_code") else None,
        "message": r.message,
        "restarts": r.restarts,
        "last_failure": r.last_failure,
        "started": _iso(r.start_time),
        "ended": _iso(r.end_time),
        "generation": r.generation,
        "port": r.port,
        "ready": r.ready,
        "env": dict(sorted(r.env.items())),
    }


def _word(enum_type: Any, value: int, prefix: str) -> str:
    """JOB_STATE_NODE_LOST -> "node-lost", as `gpuctl jobs --state` takes it."""
    try:
        return enum_type.Name(value).removeprefix(prefix).lower().replace("_", "-")
    except ValueError:
        return str(value)


def _iso(ts: Any) -> str | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _spec_mapping(spec: JobSpec | jobs_pb2.JobSpec) -> dict[str, Any]:
    if isinstance(spec, jobs_pb2.JobSpec):
        spec = convert.spec_from_pb(spec)
    default = JobSpec(kind=spec.kind, command=())
    out: dict[str, Any] = {"kind": str(spec.kind)}
    if spec.name:
        out["name"] = spec.name
    out["queue"] = spec.queue
    if spec.priority != default.priority:
        out["priority"] = spec.priority
    out["command"] = list(spec.command)
    secret = set(spec.secret_env)
    if plain := {k: v for k, v in spec.env if k not in secret}:
        out["env"] = plain
    if hidden := {k: v for k, v in spec.env if k in secret}:
        out["secret_env"] = hidden  # stays secret when the mapping is submitted again
    if spec.working_dir:
        out["working_dir"] = spec.working_dir
    if spec.time_limit_s:
        out["time_limit"] = format_duration(spec.time_limit_s)
    if spec.num_nodes != default.num_nodes:
        out["nodes"] = spec.num_nodes
    if spec.gpus_per_node:
        out["gpus_per_node"] = spec.gpus_per_node
    if spec.replicas != default.replicas:
        out["replicas"] = spec.replicas
    if spec.gpu_milli:
        if 0 < spec.gpu_milli < MILLI_PER_GPU:
            out["gpu_share"] = spec.gpu_milli / MILLI_PER_GPU
        else:  # not a share the file could state: keep it exact
            out["gpu_milli"] = spec.gpu_milli
    if spec.gpu_memory_mib:
        out["gpu_memory"] = format_size_mib(spec.gpu_memory_mib)
    if spec.gpu_model:
        models = spec.gpu_models
        out["gpu_model"] = models[0] if len(models) == 1 else list(models)
    if spec.cpu_milli:
        out["cpus"] = (
            spec.cpu_milli // 1000 if spec.cpu_milli % 1000 == 0 else spec.cpu_milli / 1000
        )
    if spec.memory_mib:
        out["memory"] = format_size_mib(spec.memory_mib)
    if spec.min_nvlink_gbps:
        out["min_nvlink_gbps"] = spec.min_nvlink_gbps
    if spec.min_net_gbps:
        out["min_net_gbps"] = spec.min_net_gbps
    if spec.on_node_lost != default.on_node_lost:
        out["on_node_lost"] = str(spec.on_node_lost)
    if spec.restart_policy is not None:
        out["restart_policy"] = str(spec.restart_policy)
    if spec.spread != default.spread:
        out["spread"] = str(spec.spread)
    for key, attr in (
        ("max_surge", "max_surge"),
        ("max_unavailable", "max_unavailable"),
        ("min_ready", "min_ready_s"),
        ("progress_deadline", "progress_deadline_s"),
        ("readiness_http", "readiness_http"),
        ("readiness_tcp", "readiness_tcp"),
    ):
        if getattr(spec, attr) != getattr(default, attr):
            out[key] = getattr(spec, attr)
    if spec.preemptible:
        out["preemptible"] = True
    if spec.target_tokens_per_s:
        out["target_tokens_per_s"] = spec.target_tokens_per_s
    if spec.weights_gb:
        out["weights_gb"] = spec.weights_gb
    return out
