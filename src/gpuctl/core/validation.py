"""Every field of a job spec, and of the node and profile an agent reports, is checked here, in
one place; the API, the SDK and the CLI call it. A value that passes fits the wire, the store and
the scheduler's arithmetic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import (
    MILLI_PER_GPU,
    BandwidthProfile,
    Gpu,
    IbPort,
    JobKind,
    JobSpec,
    NetKind,
    Node,
    NodeState,
    RestartPolicy,
    SpreadPolicy,
)
from gpuctl.core.text import plain_number

MAX_NODES = 1024
MAX_GPUS_PER_NODE = 16
MAX_REPLICAS = 10_000
MAX_GPU_MEMORY_MIB = 1024 * 1024  # 1 TiB per replica
MAX_CPU_MILLI = 1024 * 1000
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_PRIORITY = 1_000_000
MAX_TIME_LIMIT_S = 365 * 24 * 3600
MAX_GPU_MODELS = 8  # a job's list of acceptable GPU models
MAX_ARGS = 4096
MAX_ARG_LEN = 64 * 1024
MAX_ENV = 1024
MAX_ENV_VALUE_LEN = 64 * 1024
MAX_BANDWIDTH_GBPS = 1_000_000.0
# A replica decoding a million tokens/s, or streaming 100 TB of weights, is a typo, not a model.
MAX_TOKENS_PER_S = 1_000_000.0
MAX_WEIGHTS_GB = 100_000.0
# \Z, not $: `$` also matches before a final newline, so "alice\n" would pass `.match`.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
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


def _show(value: object) -> str:
    """A number as a violation shows it; never raises, even for an int no float can hold."""
    if not _is_number(value):
        return repr(value)[:64]
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"an integer of {value.bit_length()} bits"
    return plain_number(value)  # type: ignore[arg-type]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _range(out: list[FieldViolation], name: str, value: float, lo: float, hi: float) -> None:
    # `not lo <= x <= hi` rather than `x < lo or x > hi`: NaN compares false both ways.
    if not _is_number(value) or not lo <= value <= hi:
        out.append(
            FieldViolation(
                name,
                f"must be between {plain_number(lo)} and {plain_number(hi)}, got {_show(value)}",
            )
        )


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
    env_keys = {k for k, _ in spec.env}
    for i, key in enumerate(spec.secret_env):
        if key not in env_keys:
            out.append(FieldViolation(f(f"secret_env[{i}]"), f"{key!r} is not a key of env"))
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
    models = spec.gpu_model.split("|")
    if len(models) > MAX_GPU_MODELS:
        out.append(FieldViolation(f("gpu_model"), f"names more than {MAX_GPU_MODELS} models"))
    elif any(len(m) > 64 for m in models):
        out.append(FieldViolation(f("gpu_model"), "has a model name longer than 64 characters"))
    elif spec.gpu_model and any(not m.strip() for m in models):
        out.append(FieldViolation(f("gpu_model"), "has an empty model name in its list"))
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
    # Only a weight in range is converted: an int of 2**1100 GB overflows the division, and the
    # range check above has named it already.
    weights_in_range = _is_number(spec.weights_gb) and 0 <= spec.weights_gb <= MAX_WEIGHTS_GB
    weights_mib = spec.weights_gb * 1000**3 / 1024**2 if weights_in_range else 0.0
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
        if spec.readiness_http or spec.readiness_tcp:
            out.append(
                FieldViolation(
                    f("readiness_http" if spec.readiness_http else "readiness_tcp"),
                    "is for inference replicas",
                )
            )
        if spec.spread is not SpreadPolicy.NODE:
            out.append(FieldViolation(f("spread"), "is for inference replicas"))
        if spec.restart_policy not in (None, RestartPolicy.NEVER):
            out.append(
                FieldViolation(
                    f("restart_policy"),
                    "is for inference replicas; a gang is all or nothing (see on_node_lost)",
                )
            )
    elif spec.kind is JobKind.INFERENCE:
        _range(out, f("replicas"), spec.replicas, 1, MAX_REPLICAS)
        _range(out, f("max_surge"), spec.max_surge, 0, MAX_REPLICAS)
        _range(out, f("max_unavailable"), spec.max_unavailable, 0, MAX_REPLICAS)
        _range(out, f("min_ready_s"), spec.min_ready_s, 0, 86_400)
        _range(out, f("progress_deadline_s"), spec.progress_deadline_s, 1, 7 * 86_400)
        if (
            _is_number(spec.min_ready_s)
            and _is_number(spec.progress_deadline_s)
            and (spec.progress_deadline_s <= spec.min_ready_s)
        ):
            out.append(
                FieldViolation(
                    f("progress_deadline_s"),
                    "must be longer than min_ready_s: no new replica could be available in time",
                )
            )
        path = spec.readiness_http
        if path and (
            not path.startswith("/") or len(path) > 256 or not path.isprintable() or " " in path
        ):
            out.append(
                FieldViolation(
                    f("readiness_http"), "must be a path such as /health (at most 256 characters)"
                )
            )
        if path and spec.readiness_tcp:
            out.append(FieldViolation(f("readiness_tcp"), "give readiness_http or _tcp, not both"))
        if spec.max_surge == 0 and spec.max_unavailable == 0:
            out.append(
                FieldViolation(
                    f("max_surge"),
                    "max_surge and max_unavailable cannot both be 0: an update could not start",
                )
            )
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
        # Checked with a share too: -5 whole GPUs beside a share would pass the rules above.
        _range(out, f("gpus_per_node"), spec.gpus_per_node, 0, MAX_GPUS_PER_NODE)
    return out


def validate_spec(spec: JobSpec) -> JobSpec:
    """Return `spec` unchanged, or raise `InvalidArgument` naming every bad field."""
    violations = spec_violations(spec)
    if violations:
        raise InvalidArgument(violations)
    return spec


# -- nodes --------------------------------------------------------------------------------
#
# What an agent reports about its node. The bounds are the largest real hardware with room to
# spare; a value past them is a bug or an attack, and it would otherwise reach the store (where
# NaN breaks the JSON column and an int past 64 bits breaks BIGINT) and every scheduling cycle.

MAX_NODE_GPUS = 64  # 8 is usual; a 72-GPU NVL rack registers as 18 nodes of 4
MAX_NODE_CPU_MILLI = 4096 * 1000  # 4096 cores
MAX_NODE_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_PRICE_PER_HOUR = 10_000.0  # $/h; an 8-GPU node rents for $10-$100
MAX_NODE_TFLOPS = 1_000_000.0  # an exaflop: 64 GPUs at over 15 PFLOPS each
MAX_NVLINK_LINKS = 64  # 18 on Hopper and Blackwell
MAX_NVLINK_DOMAIN = 100_000  # NVLink domains span racks (NVL72, NVL576), not only one node
MAX_NUMA_NODE = 4095
MAX_PCIE_GEN = 32
MAX_PCIE_WIDTH = 64
MAX_NET_PORTS = 64
MAX_IB_PORTS = 64
MAX_IB_PORT_NUMBER = 255  # an 8-bit port number in the IB spec
MAX_LABELS = 64
MAX_LABEL_KEY_LEN = 253  # Kubernetes: a DNS prefix of 253, then a name
MAX_LABEL_VALUE_LEN = 1024
MAX_ADDRESS_LEN = 253  # a DNS name
MAX_FABRIC_LEN = 255
MAX_HEALTH_ISSUES = 256  # one per GPU, link and port of the largest node, with room to spare
MAX_HEALTH_ISSUE_LEN = 1024
MAX_REASON_LEN = 64 * 1024
MAX_CPU_AFFINITY_LEN = 16 * 1024  # "0,2,4,..." over 4096 CPUs, not collapsed into ranges
_SHORT = 64  # ids read from the driver or sysfs: PCI bus ids, port states, GUIDs, link layers
_MEDIUM = 128  # names people choose or vendors print: models, SKUs, regions, providers
# Times an agent reports: after any GPU this code knows of, before anything it will meet.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2201, 1, 1, tzinfo=UTC)  # exclusive: the year 2200 is the last allowed
# A hostile node can hold thousands of bad fields (64 GPUs of 20 each); the violations travel
# in the status message and its trailer, which gRPC clients cap at 8 KiB by default, and a
# reply past that reaches the agent as an error of its own instead of INVALID_ARGUMENT.
MAX_VIOLATIONS_SHOWN = 10


def _number(
    out: list[FieldViolation], name: str, value: object, lo: float, hi: float, *, integer: bool
) -> None:
    """`value` is an int (or, unless `integer`, a finite float) within lo..hi."""
    if not (_is_number(value) and (isinstance(value, int) or not integer)):
        what = "an integer" if integer else "a number"
        out.append(FieldViolation(name, f"must be {what}, got {_show(value)}"))
    elif isinstance(value, float) and not math.isfinite(value):
        out.append(FieldViolation(name, f"must be a finite number, got {value}"))
    else:
        _range(out, name, value, lo, hi)


def _text(
    out: list[FieldViolation],
    name: str,
    value: object,
    max_len: int,
    *,
    printable: bool = True,
    required: bool = False,
) -> None:
    """A string of at most `max_len` characters: printable (a name, shown in one table cell), or
    only free of NUL and unpaired surrogates (free text, which may hold newlines)."""
    if not isinstance(value, str):
        out.append(FieldViolation(name, f"must be a string, got {type(value).__name__}"))
    elif required and not value:
        out.append(FieldViolation(name, "is required"))
    elif len(value) > max_len:
        out.append(FieldViolation(name, f"has {len(value)} characters, at most {max_len}"))
    elif printable and not value.isprintable():
        # isprintable() is false for control, format and surrogate characters, and for every
        # space but ' ': what would break a table, a log line or the UTF-8 of the wire.
        out.append(FieldViolation(name, f"must be printable characters, got {value[:64]!r}"))
    elif not printable and ("\x00" in value or not _utf8(value)):
        out.append(FieldViolation(name, "holds NUL or a character UTF-8 cannot encode"))


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: protobuf and PostgreSQL both refuse it
        return False
    return True


def _count(out: list[FieldViolation], name: str, items: Sequence[object], most: int) -> bool:
    """False (and a violation) when `items` is longer than `most`; its entries go unchecked."""
    if len(items) > most:
        out.append(FieldViolation(name, f"has {len(items)} entries, at most {most}"))
        return False
    return True


def _time(out: list[FieldViolation], name: str, value: datetime | None) -> None:
    if value is None:
        return
    if not isinstance(value, datetime) or value.tzinfo is None:
        out.append(FieldViolation(name, "must be a time with a zone"))
    elif not EARLIEST <= value < LATEST:
        out.append(
            FieldViolation(
                name,
                f"must be between {EARLIEST.year} and {LATEST.year - 1}, got {value.isoformat()}",
            )
        )


def _gpu_violations(gpu: Gpu, f: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    _number(out, f + "index", gpu.index, 0, MAX_NODE_GPUS - 1, integer=True)
    _text(out, f + "uuid", gpu.uuid, _MEDIUM)
    _text(out, f + "model", gpu.model, _MEDIUM)
    _number(out, f + "memory_mib", gpu.memory_mib, 0, MAX_GPU_MEMORY_MIB, integer=True)
    _number(out, f + "hbm_gbps", gpu.hbm_gbps, 0, MAX_BANDWIDTH_GBPS, integer=False)
    _number(out, f + "nvlink_gbps", gpu.nvlink_gbps, 0, MAX_BANDWIDTH_GBPS, integer=False)
    if gpu.measured_hbm_gbps is not None:
        _number(
            out,
            f + "measured_hbm_gbps",
            gpu.measured_hbm_gbps,
            0,
            MAX_BANDWIDTH_GBPS,
            integer=False,
        )
    _text(out, f + "pci_bus_id", gpu.pci_bus_id, _SHORT)
    for field, value, hi in (
        ("nvlink_links_active", gpu.nvlink_links_active, MAX_NVLINK_LINKS),
        ("nvlink_links_total", gpu.nvlink_links_total, MAX_NVLINK_LINKS),
        ("nvlink_version", gpu.nvlink_version, 64),
        ("pcie_gen", gpu.pcie_gen, MAX_PCIE_GEN),
        ("pcie_width", gpu.pcie_width, MAX_PCIE_WIDTH),
        ("pcie_max_gen", gpu.pcie_max_gen, MAX_PCIE_GEN),
        ("pcie_max_width", gpu.pcie_max_width, MAX_PCIE_WIDTH),
    ):
        _number(out, f + field, value, 0, hi, integer=True)
    if _count(out, f + "nvlink_peers", gpu.nvlink_peers, MAX_NVLINK_LINKS):
        for j, peer in enumerate(gpu.nvlink_peers):
            _text(out, f"{f}nvlink_peers[{j}]", peer, _SHORT)
    _number(out, f + "numa_node", gpu.numa_node, -1, MAX_NUMA_NODE, integer=True)
    _text(out, f + "cpu_affinity", gpu.cpu_affinity, MAX_CPU_AFFINITY_LEN)
    return out


def _ib_port_violations(port: IbPort, f: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    _text(out, f + "device", port.device, _SHORT)
    _number(out, f + "port", port.port, 0, MAX_IB_PORT_NUMBER, integer=True)
    _number(out, f + "rate_gbps", port.rate_gbps, 0, MAX_BANDWIDTH_GBPS, integer=False)
    for field, value in (
        ("state", port.state),
        ("phys_state", port.phys_state),
        ("link_layer", port.link_layer),
        ("guid", port.guid),
    ):
        _text(out, f + field, value, _SHORT)
    return out


def profile_violations(profile: BandwidthProfile, prefix: str = "profile.") -> list[FieldViolation]:
    """All that is wrong with a reported bandwidth profile; empty when it is valid.

    GPUs are listed by ascending index, each index once. Gaps are allowed: an agent leaves out
    a GPU that fell off the bus and keeps the driver's indices of the rest, which placements
    name.
    """
    out: list[FieldViolation] = []
    f = prefix
    if _count(out, f + "gpus", profile.gpus, MAX_NODE_GPUS):
        last = -1
        uuids: set[str] = set()
        for i, gpu in enumerate(profile.gpus):
            g = f"{f}gpus[{i}]."
            found = _gpu_violations(gpu, g)
            out.extend(found)
            if not any(v.field == g + "index" for v in found) and gpu.index <= last:
                out.append(
                    FieldViolation(
                        g + "index",
                        f"must be above {last}, the index before it "
                        f"(GPUs are listed once each, by index), got {gpu.index}",
                    )
                )
            if isinstance(gpu.index, int):
                last = max(last, gpu.index)
            # Health checks match GPUs by UUID across re-probes: two alike would hide one.
            if isinstance(gpu.uuid, str) and gpu.uuid:
                if gpu.uuid in uuids:
                    out.append(FieldViolation(g + "uuid", f"{gpu.uuid[:64]!r} is given twice"))
                uuids.add(gpu.uuid)
    _number(
        out,
        f + "nvlink_domain_size",
        profile.nvlink_domain_size,
        0,
        MAX_NVLINK_DOMAIN,
        integer=True,
    )
    _number(out, f + "pcie_gen", profile.pcie_gen, 0, MAX_PCIE_GEN, integer=True)
    _number(out, f + "pcie_width", profile.pcie_width, 0, MAX_PCIE_WIDTH, integer=True)
    net = profile.network
    if not isinstance(net.kind, NetKind):
        out.append(FieldViolation(f + "network.kind", f"must be one of {', '.join(NetKind)}"))
    _number(out, f + "network.ports", net.ports, 0, MAX_NET_PORTS, integer=True)
    _number(
        out, f + "network.gbps_per_port", net.gbps_per_port, 0, MAX_BANDWIDTH_GBPS, integer=False
    )
    if _count(out, f + "ib_ports", profile.ib_ports, MAX_IB_PORTS):
        for i, port in enumerate(profile.ib_ports):
            out.extend(_ib_port_violations(port, f"{f}ib_ports[{i}]."))
    _number(out, f + "bf16_tflops", profile.bf16_tflops, 0, MAX_NODE_TFLOPS, integer=False)
    _text(out, f + "source", profile.source, _SHORT)
    # Field names here and in node_violations are the wire's where the model's differ
    # (measure_time, name, lease): the agent that reads the violation sees the wire.
    _time(out, f + "measure_time", profile.measured_at)
    return out


def health_issue_violations(
    issues: Sequence[str], field: str = "health_issues"
) -> list[FieldViolation]:
    """What is wrong with the issues an agent reports: too many, empty or too long ones."""
    out: list[FieldViolation] = []
    if _count(out, field, issues, MAX_HEALTH_ISSUES):
        for i, issue in enumerate(issues):
            if isinstance(issue, str) and not issue.strip():
                out.append(FieldViolation(f"{field}[{i}]", "is empty"))
            else:
                _text(out, f"{field}[{i}]", issue, MAX_HEALTH_ISSUE_LEN, printable=False)
    return out


def node_violations(node: Node, prefix: str = "node.") -> list[FieldViolation]:
    """All that is wrong with a node as an agent registers it; empty when it is valid."""
    out: list[FieldViolation] = []
    f = prefix
    if not isinstance(node.id, str) or not NAME_RE.match(node.id):
        out.append(
            FieldViolation(
                f + "name",
                "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                f"got {str(node.id)[:64]!r}",
            )
        )
    before = len(out)
    _text(out, f + "address", node.address, MAX_ADDRESS_LEN, required=True)
    if len(out) == before and " " in node.address:  # the other spaces are not printable
        out.append(FieldViolation(f + "address", "must not hold spaces"))
    before = len(out)
    _text(out, f + "fabric", node.fabric, MAX_FABRIC_LEN)
    if (
        len(out) == before
        and node.fabric
        and not all(NAME_RE.match(part) for part in node.fabric.split("/"))
    ):
        out.append(
            FieldViolation(
                f + "fabric",
                "must be a path like 'ib-a/spine-1/leaf-2': parts of 1-63 letters, digits, "
                f"'.', '_' or '-' joined by '/', got {node.fabric[:64]!r}",
            )
        )
    for field, value in (
        ("provider", node.provider),
        ("sku", node.sku),
        ("region", node.region),
    ):
        _text(out, f + field, value, _MEDIUM)
    if _count(out, f + "labels", node.labels, MAX_LABELS):
        keys: set[str] = set()
        for i, (key, value) in enumerate(node.labels):
            shown = isinstance(key, str) and key.isprintable() and 0 < len(key) <= _SHORT
            name = f"{f}labels.{key}" if shown else f"{f}labels[{i}]"
            _text(out, name, key, MAX_LABEL_KEY_LEN, required=True)
            _text(out, name, value, MAX_LABEL_VALUE_LEN)
            if isinstance(key, str):
                if key in keys:
                    out.append(FieldViolation(name, "is given twice"))
                keys.add(key)
    _number(out, f + "cpu_milli", node.cpu_milli, 0, MAX_NODE_CPU_MILLI, integer=True)
    _number(out, f + "memory_mib", node.memory_mib, 0, MAX_NODE_MEMORY_MIB, integer=True)
    out.extend(profile_violations(node.profile, f + "profile."))
    _number(out, f + "price_per_hour", node.price_per_hour, 0, MAX_PRICE_PER_HOUR, integer=False)
    # The rest is the daemon's to set, but a registration carries it and the store keeps it
    # until the daemon overwrites it: bounded all the same.
    if not isinstance(node.state, NodeState):
        out.append(FieldViolation(f + "state", f"must be one of {', '.join(NodeState)}"))
    _text(out, f + "state_reason", node.state_reason, MAX_REASON_LEN, printable=False)
    out.extend(health_issue_violations(node.health_issues, f + "health_issues"))
    _text(out, f + "lease", node.lease_id, _MEDIUM)
    _time(out, f + "register_time", node.registered_at)
    _time(out, f + "last_heartbeat_time", node.last_heartbeat)
    return out


def validate_node(node: Node) -> Node:
    """Return `node` unchanged, or raise `InvalidArgument` naming its first bad fields."""
    _raise_first(node_violations(node), "node")
    return node


def validate_profile(profile: BandwidthProfile, prefix: str = "profile.") -> BandwidthProfile:
    """Return `profile` unchanged, or raise `InvalidArgument` naming its first bad fields."""
    _raise_first(profile_violations(profile, prefix), prefix.rstrip("."))
    return profile


def _raise_first(violations: list[FieldViolation], field: str) -> None:
    if len(violations) > MAX_VIOLATIONS_SHOWN:
        more = len(violations) - MAX_VIOLATIONS_SHOWN
        violations = [
            *violations[:MAX_VIOLATIONS_SHOWN],
            FieldViolation(field, f"and {more} more problems"),
        ]
    if violations:
        raise InvalidArgument(violations)
