"""Every field of a job spec is checked here, in one place; the API, the SDK and the CLI call it."""

from __future__ import annotations

import re

from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import MILLI_PER_GPU, JobKind, JobSpec

MAX_NODES = 1024
MAX_GPUS_PER_NODE = 16
MAX_REPLICAS = 10_000
MAX_GPU_MEMORY_MIB = 1024 * 1024  # 1 TiB per replica
MAX_CPU_MILLI = 1024 * 1000
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_PRIORITY = 1_000_000
MAX_TIME_LIMIT_S = 365 * 24 * 3600
MAX_ARGS = 4096
MAX_ARG_LEN = 64 * 1024
MAX_ENV = 1024
MAX_ENV_VALUE_LEN = 64 * 1024
MAX_BANDWIDTH_GBPS = 1_000_000.0
# A replica decoding a million tokens/s, or streaming 100 TB of weights, is a typo, not a model.
MAX_TOKENS_PER_S = 1_000_000.0
MAX_WEIGHTS_GB = 100_000.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
# Set by the agent for every rank (the launch contract); a user value would silently break it.
RESERVED_ENV = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "NODE_RANK",
        "NNODES",
        "NPROC_PER_NODE",
    }
)
RESERVED_ENV_PREFIXES = ("GPUCTL_", "PET_")


def _range(out: list[FieldViolation], name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        out.append(FieldViolation(name, f"must be between {lo:g} and {hi:g}, got {value:g}"))


def spec_violations(spec: JobSpec, prefix: str = "spec.") -> list[FieldViolation]:
    """All that is wrong with `spec`, one violation per field; empty when it is valid."""
    out: list[FieldViolation] = []
    f = lambda name: prefix + name  # noqa: E731
    if not isinstance(spec.kind, JobKind):
        out.append(FieldViolation(f("kind"), "must be 'training' or 'inference'"))
    if not spec.command:
        out.append(
            FieldViolation(f("command"), "is required: the program to run and its arguments")
        )
    elif len(spec.command) > MAX_ARGS:
        out.append(
            FieldViolation(f("command"), f"has {len(spec.command)} arguments, at most {MAX_ARGS}")
        )
    else:
        if not spec.command[0].strip():
            out.append(FieldViolation(f("command"), "the program name is empty"))
        for i, arg in enumerate(spec.command):
            if len(arg) > MAX_ARG_LEN or "\x00" in arg:
                out.append(
                    FieldViolation(f(f"command[{i}]"), f"longer than {MAX_ARG_LEN} or holds NUL")
                )
    for name, value in (("name", spec.name), ("queue", spec.queue), ("owner", spec.owner)):
        if value and not NAME_RE.match(value):
            out.append(
                FieldViolation(
                    f(name),
                    "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
                )
            )
    if not spec.queue:
        out.append(FieldViolation(f("queue"), "is required"))
    _range(out, f("priority"), spec.priority, -MAX_PRIORITY, MAX_PRIORITY)
    _range(out, f("time_limit_s"), spec.time_limit_s, 0, MAX_TIME_LIMIT_S)
    if len(spec.env) > MAX_ENV:
        out.append(FieldViolation(f("env"), f"has {len(spec.env)} entries, at most {MAX_ENV}"))
    seen: set[str] = set()
    for key, value in spec.env:
        if not ENV_KEY_RE.match(key):
            out.append(FieldViolation(f(f"env.{key}"), "is not a valid variable name"))
        elif key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
            out.append(
                FieldViolation(
                    f(f"env.{key}"), "is set by gpuctl for every rank and cannot be overridden"
                )
            )
        elif key in seen:
            out.append(FieldViolation(f(f"env.{key}"), "is given twice"))
        seen.add(key)
        if len(value) > MAX_ENV_VALUE_LEN or "\x00" in value:
            out.append(
                FieldViolation(
                    f(f"env.{key}"), f"value longer than {MAX_ENV_VALUE_LEN} or holds NUL"
                )
            )
    if len(spec.working_dir) > 4096 or "\x00" in spec.working_dir:
        out.append(FieldViolation(f("working_dir"), "longer than 4096 or holds NUL"))
    if spec.working_dir and not spec.working_dir.startswith("/"):
        out.append(FieldViolation(f("working_dir"), "must be an absolute path"))
    if len(spec.gpu_model) > 64:
        out.append(FieldViolation(f("gpu_model"), "longer than 64 characters"))
    _range(out, f("cpu_milli"), spec.cpu_milli, 0, MAX_CPU_MILLI)
    _range(out, f("memory_mib"), spec.memory_mib, 0, MAX_MEMORY_MIB)
    _range(out, f("gpu_memory_mib"), spec.gpu_memory_mib, 0, MAX_GPU_MEMORY_MIB)
    _range(out, f("min_nvlink_gbps"), spec.min_nvlink_gbps, 0, MAX_BANDWIDTH_GBPS)
    _range(out, f("min_net_gbps"), spec.min_net_gbps, 0, MAX_BANDWIDTH_GBPS)

    _range(out, f("target_tokens_per_s"), spec.target_tokens_per_s, 0, MAX_TOKENS_PER_S)
    _range(out, f("weights_gb"), spec.weights_gb, 0, MAX_WEIGHTS_GB)
    if spec.target_tokens_per_s > 0 and not spec.weights_gb > 0:
        out.append(
            FieldViolation(
                f("target_tokens_per_s"),
                "needs weights_gb: the HBM floor is tokens/s x weight GB streamed per token",
            )
        )
    weights_mib = spec.weights_gb * 1000**3 / 1024**2
    if spec.gpu_memory_mib and weights_mib > spec.gpu_memory_mib:
        out.append(
            FieldViolation(
                f("weights_gb"),
                f"{spec.weights_gb:g} GB of weights do not fit the replica's "
                f"gpu_memory_mib of {spec.gpu_memory_mib}",
            )
        )

    if spec.kind is JobKind.TRAINING:
        for name, value in (
            ("target_tokens_per_s", spec.target_tokens_per_s),
            ("weights_gb", spec.weights_gb),
        ):
            if value:
                out.append(
                    FieldViolation(f(name), "is for inference replicas; training has no decode")
                )
        _range(out, f("num_nodes"), spec.num_nodes, 1, MAX_NODES)
        _range(out, f("gpus_per_node"), spec.gpus_per_node, 1, MAX_GPUS_PER_NODE)
        if spec.gpu_milli:
            out.append(
                FieldViolation(
                    f("gpu_share"), "training ranks take whole GPUs; GPU shares are for inference"
                )
            )
        if spec.replicas != 1:
            out.append(
                FieldViolation(
                    f("replicas"), "is for inference; a training job is sized by num_nodes"
                )
            )
    elif spec.kind is JobKind.INFERENCE:
        _range(out, f("replicas"), spec.replicas, 1, MAX_REPLICAS)
        if spec.num_nodes != 1:
            out.append(
                FieldViolation(
                    f("num_nodes"), "is for training; an inference service is sized by replicas"
                )
            )
        _range(out, f("gpu_milli"), spec.gpu_milli, 0, MILLI_PER_GPU)
        if spec.gpu_milli == MILLI_PER_GPU:
            out.append(
                FieldViolation(
                    f("gpu_milli"), "a share of 1000 is a whole GPU: use gpus_per_node=1"
                )
            )
        elif spec.gpu_milli and spec.gpus_per_node > 1:
            out.append(
                FieldViolation(
                    f("gpu_milli"), "a GPU share is of one GPU: use it with gpus_per_node <= 1"
                )
            )
        elif not spec.gpu_milli:
            _range(out, f("gpus_per_node"), spec.gpus_per_node, 0, MAX_GPUS_PER_NODE)
    return out


def validate_spec(spec: JobSpec) -> JobSpec:
    """Return `spec` unchanged, or raise `InvalidArgument` naming every bad field."""
    violations = spec_violations(spec)
    if violations:
        raise InvalidArgument(violations)
    return spec
