"""How `gpuctl` shows things: squeue-like tables, kubectl-describe-like sections, JSON and YAML.

Pure functions from API messages (and the time now) to text; the commands print what they return.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

import click
import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from gpuctl.client import (
    auth_pb2,
    events_pb2,
    format_duration,
    format_size_mib,
    job_document,
    jobs_pb2,
    leases_pb2,
    nodes_pb2,
    spec_to_mapping,
)
from gpuctl.core import text

# squeue's compact state codes, which people already read at a glance
_SHORT_STATE = {
    jobs_pb2.JOB_STATE_PENDING: "PD",
    jobs_pb2.JOB_STATE_RUNNING: "R",
    jobs_pb2.JOB_STATE_CANCELLING: "CG",
    jobs_pb2.JOB_STATE_SUCCEEDED: "CD",
    jobs_pb2.JOB_STATE_FAILED: "F",
    jobs_pb2.JOB_STATE_CANCELLED: "CA",
    jobs_pb2.JOB_STATE_TIMEOUT: "TO",
    jobs_pb2.JOB_STATE_NODE_LOST: "NF",
}
_NET = {
    nodes_pb2.NET_KIND_INFINIBAND: "ib",
    nodes_pb2.NET_KIND_ROCE: "roce",
    nodes_pb2.NET_KIND_ETHERNET: "eth",
}


# -- small pieces -------------------------------------------------------------------------


def enum_name(enum_type, value: int, prefix: str) -> str:
    """JOB_STATE_RUNNING -> "running"; an unknown number shows as itself."""
    try:
        return enum_type.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def job_state(state: int) -> str:
    return enum_name(jobs_pb2.JobState, state, "JOB_STATE_")


def node_state(state: int) -> str:
    return enum_name(nodes_pb2.NodeState, state, "NODE_STATE_")


def _time(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def age(then: datetime, now: datetime) -> str:
    """kubectl's AGE: 45s, 12m, 3h5m, 2d4h."""
    return text.age((now - then).total_seconds())


def when(ts: Timestamp, now: datetime) -> str:
    t = _time(ts)
    if t is None:
        return "-"
    return f"{t.strftime('%Y-%m-%dT%H:%M:%SZ')} ({age(t, now)} ago)"


def number(value: float) -> str:
    return f"{value:g}" if value else "-"


def gib(mib: int) -> str:
    """GPU memory as people quote it: 81559 MiB -> "79.6GiB"."""
    return f"{mib / 1024:.1f}GiB" if mib else "-"


def index_ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 3, 6] -> "0-3,6"."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out) or "-"


Paint = Callable[[int, str], str]  # (column, padded cell) -> the cell with colour codes


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    width: int | None = None,
    paint: Callable[[Sequence[str]], Paint | None] | None = None,
    header: bool = True,
) -> str:
    """Plain columns padded to their widest cell, two spaces apart; the last is not padded.
    `width`: lines are cut to it (the last column, then the line, ends in "…"). `paint`: for
    a row (its cells), how to colour its cells (after padding, so columns stay aligned)."""
    body = [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    cells = [list(headers), *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells if header else body):
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        line = "  ".join(padded).rstrip()
        if width is not None and len(line) > width:
            line = line[: max(0, width - 1)] + "…"
        painter = paint(row) if paint is not None and (n > 0 or not header) else None
        if painter is not None:
            line = _painted(line, padded, painter)
        lines.append(line)
    return "\n".join(lines)


def _painted(line: str, padded: Sequence[str], painter: Paint) -> str:
    """`line` with each of its whole cells passed through `painter` (a cut cell stays plain)."""
    out, at = [], 0
    for column, cell in enumerate(padded):
        if at + len(cell) > len(line):
            out.append(line[at:])
            at = len(line)
            break
        out.append(painter(column, cell))
        at += len(cell)
        if at < len(line):
            out.append(line[at : at + 2])
            at += 2
    out.append(line[at:])
    return "".join(out)


def fields(pairs: Iterable[tuple[str, object]], indent: int = 0) -> str:
    """ "Key:  value" lines with the values lined up, like kubectl describe."""
    pairs = [(k, "-" if v is None or v == "" else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0) + 2
    pad = " " * indent
    return "\n".join(f"{pad}{(k + ':').ljust(width)}{v}" for k, v in pairs)


def _indent(text: str, by: int = 2) -> str:
    return "\n".join((" " * by + line) if line else line for line in text.splitlines())


def document(message: Message) -> dict:
    """What `-o json|yaml` shows of one resource: a job in the job-file schema
    (`job_document`), anything else as its API message, zero values included."""
    if isinstance(message, jobs_pb2.Job):
        return job_document(message)
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def dump(data: object, fmt: str) -> str:
    """`data` as JSON or YAML text."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False).rstrip()


# -- jobs ---------------------------------------------------------------------------------


def _num_nodes(spec: jobs_pb2.JobSpec) -> int:
    return spec.num_nodes if spec.HasField("num_nodes") else 1


def _replicas(spec: jobs_pb2.JobSpec) -> int:
    return spec.replicas if spec.HasField("replicas") else 1


def total_gpus(spec: jobs_pb2.JobSpec) -> float:
    if spec.kind == jobs_pb2.JOB_KIND_TRAINING:
        return _num_nodes(spec) * spec.gpus_per_node
    if spec.gpu_milli:
        return _replicas(spec) * spec.gpu_milli / 1000
    return _replicas(spec) * spec.gpus_per_node


_LIVE = (jobs_pb2.RANK_STATE_ASSIGNED, jobs_pb2.RANK_STATE_RUNNING)


def _live_ranks(job: jobs_pb2.Job) -> list[jobs_pb2.RankStatus]:
    """The ranks that run or are about to: a running service's ended replicas left out."""
    ranks = list(job.placement.ranks)
    if job.state == jobs_pb2.JOB_STATE_RUNNING and job.spec.kind == jobs_pb2.JOB_KIND_INFERENCE:
        return [r for r in ranks if r.state in _LIVE]
    return ranks


def job_nodes(job: jobs_pb2.Job) -> list[str]:
    """The distinct nodes of the placement (a service's live replicas), in rank order."""
    return list(dict.fromkeys(r.node for r in _live_ranks(job)))


def replicas(job: jobs_pb2.Job) -> str:
    """An inference job's "ready/desired" replicas ("-" for training, or before it runs)."""
    if job.spec.kind != jobs_pb2.JOB_KIND_INFERENCE or not job.placement.ranks:
        return "-"
    ready = sum(r.state == jobs_pb2.RANK_STATE_RUNNING and r.ready for r in job.placement.ranks)
    return f"{ready}/{_replicas(job.spec)}"


def _gpus_held(job: jobs_pb2.Job) -> str:
    """GPUs the job holds now (shares as fractions); what it asks for while it waits."""
    if job.state != jobs_pb2.JOB_STATE_RUNNING or not job.placement.ranks:
        return f"{total_gpus(job.spec):g}"
    milli = sum(len(r.gpu_indices) * r.gpu_milli for r in _live_ranks(job))
    return f"{milli / 1000:g}"


def _nodelist_or_reason(job: jobs_pb2.Job) -> str:
    nodes = job_nodes(job)
    if nodes and job.state != jobs_pb2.JOB_STATE_PENDING:
        return ",".join(nodes)
    return f"({job.reason or 'None'})"


def _elapsed(job: jobs_pb2.Job, now: datetime) -> str:
    """How long it has run (or ran): 45s, 3m, 2h5m; "-" before it starts."""
    start = _time(job.start_time)
    if start is None:
        return "-"
    return age(start, _time(job.end_time) or now)


def _age(ts: Timestamp, now: datetime) -> str:
    t = _time(ts)
    return age(t, now) if t is not None else "-"


def iso(ts: Timestamp) -> str:
    """A time with its zone, to the second: 2026-12-07T13:05:00Z."""
    t = _time(ts)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else "-"


# Colours of squeue's state codes on a terminal: running green, waiting yellow, failed red.
_STATE_COLOUR = {
    "R": "green",
    "PD": "yellow",
    "CG": "magenta",
    "CD": "cyan",
    "F": "red",
    "NF": "red",
    "TO": "red",
    "CA": "magenta",
}
_NODE_COLOUR = {"ready": "green", "draining": "yellow", "degraded": "red", "lost": "red"}


def _colour_column(column: int, colours: Mapping[str, str]) -> Callable[[Sequence[str]], Paint]:
    """A `table` paint that colours column `column` by its own text."""

    def paint(row: Sequence[str]) -> Paint:
        colour = colours.get(row[column].strip())

        def cell(index: int, text: str) -> str:
            if index != column or colour is None:
                return text
            return click.style(text, fg=colour, bold=colour == "red")

        return cell

    return paint


JOB_HEADERS = ["JOBID", "NAME", "KIND", "QUEUE", "USER", "ST", "AGE", "TIME", "NODES", "GPUS"]
JOB_HEADERS_WIDE = ["GPU_MODEL", "PRIO", "ATTEMPT", "RESTARTS", "SUBMITTED", "EXIT"]


def jobs_table(
    jobs: Iterable[jobs_pb2.Job],
    *,
    now: datetime,
    wide: bool = False,
    colour: bool = False,
    width: int | None = None,
    header: bool = True,
) -> str:
    """squeue's columns with kubectl's AGE (since submission) and TIME (running), as 3m or
    2h5m; `-o wide` adds the submission time with its zone. `colour`: states in colour (a
    terminal's); `width`: lines cut to the terminal's."""
    headers = [*JOB_HEADERS, "REPLICAS"]
    if wide:
        headers += JOB_HEADERS_WIDE
    headers.append("NODELIST(REASON)")
    paint = _colour_column(headers.index("ST"), _STATE_COLOUR) if colour else None
    return table(headers, _job_rows(jobs, now, wide), width=width, paint=paint, header=header)


def _job_rows(jobs: Iterable[jobs_pb2.Job], now: datetime, wide: bool) -> list[list[object]]:
    rows = []
    for job in jobs:
        spec = job.spec
        nodes = len(job_nodes(job)) or (
            _num_nodes(spec) if spec.kind == jobs_pb2.JOB_KIND_TRAINING else _replicas(spec)
        )
        row: list[object] = [
            job.id,
            spec.name,
            enum_name(jobs_pb2.JobKind, spec.kind, "JOB_KIND_"),
            spec.queue,
            job.owner,
            _SHORT_STATE.get(job.state, "?"),
            _age(job.create_time, now),
            _elapsed(job, now),
            nodes,
            _gpus_held(job),
            replicas(job),
        ]
        if wide:
            row += [
                spec.gpu_model.replace("|", ",") or "any",
                spec.priority,
                job.attempt,
                sum(r.restarts for r in _live_ranks(job)),
                iso(job.create_time),
                job.exit_code if job.HasField("exit_code") else "-",
            ]
        row.append(_nodelist_or_reason(job))
        rows.append(row)
    return rows


def spec_summary(spec: jobs_pb2.JobSpec) -> str:
    """What a spec asks for, in one line: "training: 2 nodes x 8 GPUs = 16 GPUs on one fabric"."""
    model = f" {spec.gpu_model.replace('|', ' or ')}" if spec.gpu_model else ""
    if spec.kind == jobs_pb2.JOB_KIND_TRAINING:
        n = _num_nodes(spec)
        what = f"training: {n} node{'s' * (n != 1)} x {spec.gpus_per_node}{model} GPUs = {total_gpus(spec):g} GPUs"
        if n > 1:
            what += " on one fabric"
        floors = []
        if spec.min_nvlink_gbps:
            floors.append(f"NVLink >= {spec.min_nvlink_gbps:g} GB/s")
        if spec.min_net_gbps:
            floors.append(f"network >= {spec.min_net_gbps:g} Gb/s")
        if floors:
            what += f" ({', '.join(floors)})"
    else:
        r = _replicas(spec)
        each = (
            f"{spec.gpu_milli / 1000:g} of a{model} GPU"
            if spec.gpu_milli
            else f"{spec.gpus_per_node}{model} GPU"
        )
        if not spec.gpu_milli and spec.gpus_per_node != 1:
            each += "s"
        what = f"inference: {r} replica{'s' * (r != 1)} x {each}"
        if spec.gpu_memory_mib:
            what += f", {format_size_mib(spec.gpu_memory_mib)} GPU memory each"
    extra = [f"queue {spec.queue or 'default'}", f"priority {spec.priority}"]
    if spec.HasField("time_limit") and spec.time_limit.seconds:
        extra.append(f"time limit {format_duration(spec.time_limit.seconds)}")
    if spec.preemptible:
        extra.append("preemptible")
    return f"{what}; {', '.join(extra)}"


def _events(events: Sequence[events_pb2.Event], now: datetime) -> str:
    if not events:
        return "Events:  <none>"
    rows = [(_age_or_dash(e.time, now), e.type, e.message) for e in events]
    return "Events:\n" + _indent(table(["AGE", "TYPE", "MESSAGE"], rows))


def _age_or_dash(ts: Timestamp, now: datetime) -> str:
    t = _time(ts)
    return age(t, now) if t else "-"


def describe_job(job: jobs_pb2.Job, *, now: datetime) -> str:
    spec = job.spec
    head = [
        ("Name", job.name),
        ("Job name", spec.name),
        ("Owner", job.owner),
        ("Kind", enum_name(jobs_pb2.JobKind, spec.kind, "JOB_KIND_")),
        ("Queue", spec.queue),
        ("Priority", spec.priority),
        ("State", job_state(job.state)),
    ]
    if job.reason:
        head.append(("Reason", job.reason))
    if job.HasField("exit_code"):
        head.append(("Exit code", job.exit_code))
    if spec.kind == jobs_pb2.JOB_KIND_INFERENCE and job.placement.ranks:
        live = _live_ranks(job)
        running = sum(r.state == jobs_pb2.RANK_STATE_RUNNING for r in live)
        assigned = len(live) - running
        restart = enum_name(jobs_pb2.RestartPolicy, spec.restart_policy, "RESTART_POLICY_")
        ready = sum(r.ready for r in live)
        line = f"{ready} ready, {running} running of {_replicas(spec)} desired"
        if assigned:
            line += f", {assigned} starting"
        line += f"; restart policy {restart if spec.restart_policy else 'on-failure'}"
        if spec.spread == jobs_pb2.SPREAD_NONE:
            line += "; packed (spread none)"
        elif spec.spread == jobs_pb2.SPREAD_FABRIC:
            line += "; spread over fabrics"
        head.append(("Replicas", line))
    head += [
        ("Asks for", spec_summary(spec)),
        ("Attempt", job.attempt),
        ("Submitted", when(job.create_time, now)),
        ("Started", when(job.start_time, now)),
        ("Ended", when(job.end_time, now)),
        ("Run time", _elapsed(job, now) if _time(job.start_time) else "-"),
        ("Request ID", job.request_id),
    ]
    parts = [fields(head)]
    mapping = spec_to_mapping(spec)
    if "command" in mapping:  # one shell-like line reads better than a YAML list
        mapping["command"] = shlex.join(mapping["command"])
    parts.append("Spec:\n" + _indent(yaml.safe_dump(mapping, sort_keys=False, width=1000).rstrip()))
    if job.placement.ranks:
        p = job.placement
        place = [("Master", f"{p.master_addr}:{p.master_port}" if p.master_addr else "-")]
        if p.reason:
            place.append(("Why here", p.reason))
        rows = []
        service = spec.kind == jobs_pb2.JOB_KIND_INFERENCE
        for r in p.ranks:
            share = f"{r.gpu_milli / 1000:g}" if 0 < r.gpu_milli < 1000 else "1"
            row: list[object] = [
                r.rank,
                r.node,
                index_ranges(r.gpu_indices),
                share if r.gpu_milli else "-",  # an ended replica that let go of its GPUs
                enum_name(jobs_pb2.RankState, r.state, "RANK_STATE_"),
                r.exit_code if r.HasField("exit_code") else "-",
            ]
            if service:
                row += [r.restarts, r.last_failure or "-"]
            rows.append((*row, r.message))
        headers = ["RANK", "NODE", "GPUS", "SHARE", "STATE", "EXIT"]
        if service:
            headers += ["RESTARTS", "LAST_FAILURE"]
        ranks = table([*headers, "MESSAGE"], rows)
        parts.append("Placement:\n" + fields(place, indent=2) + "\n" + _indent(ranks))
        envs = [r for r in p.ranks if r.env]
        if envs:
            lines = ["Launch environment:"]
            for r in envs:
                lines.append(f"  rank {r.rank} ({r.node}):")
                lines += [f"    {k}={v}" for k, v in sorted(r.env.items())]
            parts.append("\n".join(lines))
    else:
        parts.append("Placement:  <none>")
    parts.append(_events(job.events, now))
    return "\n".join(parts)


# -- nodes and leases ---------------------------------------------------------------------


def _model(node: nodes_pb2.Node) -> str:
    models = list(dict.fromkeys(g.model for g in node.profile.gpus))
    return models[0] if len(models) == 1 else ("mixed" if models else "-")


def _hbm(node: nodes_pb2.Node, measured_first: bool = True) -> float:
    gpus = node.profile.gpus
    if not gpus:
        return 0.0
    if measured_first and gpus[0].HasField("measured_hbm_gbps"):
        return gpus[0].measured_hbm_gbps
    return gpus[0].hbm_gbps


def _network(net: nodes_pb2.Network, long: bool = False) -> str:
    if net.kind in (nodes_pb2.NET_KIND_UNSPECIFIED, nodes_pb2.NET_KIND_NONE) or not net.ports:
        return "none" if long else "-"
    if long:
        kind = enum_name(nodes_pb2.NetKind, net.kind, "NET_KIND_")
        total = net.ports * net.gbps_per_port
        return f"{kind}, {net.ports} x {net.gbps_per_port:g} Gb/s ({total:g} Gb/s)"
    return f"{_NET.get(net.kind, '?')} {net.ports}x{net.gbps_per_port:g}G"


def _pcie(gen: int, width: int) -> str:
    """gen 5, width 16 -> "gen5x16"; an unknown link is "-"."""
    return f"gen{gen}x{width}" if gen else "-"


def free_gpus(node: nodes_pb2.Node) -> float:
    used = sum(min(u.used_milli, 1000) for u in node.usage)
    return (len(node.profile.gpus) * 1000 - used) / 1000


def nodes_table(
    nodes: Iterable[nodes_pb2.Node],
    *,
    wide: bool = False,
    colour: bool = False,
    width: int | None = None,
    header: bool = True,
) -> str:
    headers = [
        "NAME",
        "STATE",
        "GPUS",
        "MODEL",
        "HBM_GB/s",
        "NVLINK_GB/s",
        "NETWORK",
        "FABRIC",
        "LEASE",
        "$/HR",
    ]
    if wide:
        headers += ["SKU", "PROVIDER", "REGION", "ADDRESS", "PCIE", "TFLOPS", "HBM_SPEC"]
    headers.append("FREE(GPUs)")
    rows = []
    for n in nodes:
        p = n.profile
        nvlink = min((g.nvlink_gbps for g in p.gpus), default=0.0)
        row: list[object] = [
            n.name,
            enum_name(nodes_pb2.NodeState, n.state, "NODE_STATE_"),
            len(p.gpus),
            _model(n),
            number(_hbm(n)),
            number(nvlink),
            _network(p.network),
            n.fabric,
            n.lease,
            f"{n.price_per_hour:.2f}",
        ]
        if wide:
            row += [
                n.sku,
                n.provider,
                n.region,
                n.address,
                f"gen{p.pcie_gen} x{p.pcie_width}" if p.pcie_gen else "-",
                number(p.bf16_tflops),
                number(_hbm(n, measured_first=False)),
            ]
        row.append(f"{free_gpus(n):g}" if n.state == nodes_pb2.NODE_STATE_READY else "-")
        rows.append(row)
    paint = _colour_column(1, _NODE_COLOUR) if colour else None
    return table(headers, rows, width=width, paint=paint, header=header)


def describe_node(node: nodes_pb2.Node, *, now: datetime) -> str:
    p = node.profile
    state = enum_name(nodes_pb2.NodeState, node.state, "NODE_STATE_")
    head = [
        ("Name", node.name),
        ("Address", node.address),
        ("Fabric", node.fabric),
        ("Provider", node.provider),
        ("SKU", node.sku),
        ("Region", node.region),
        ("Labels", ",".join(f"{k}={v}" for k, v in sorted(node.labels.items()))),
        ("State", f"{state} ({node.state_reason})" if node.state_reason else state),
        ("Lease", node.lease),
        ("Price", f"${node.price_per_hour:.2f}/hr"),
        ("CPUs", f"{node.cpu_milli / 1000:g}" if node.cpu_milli else "-"),
        ("Memory", format_size_mib(node.memory_mib) if node.memory_mib else "-"),
        ("Registered", when(node.register_time, now)),
        ("Last heartbeat", when(node.last_heartbeat_time, now)),
    ]
    measured = _time(p.measure_time)
    profile = [
        (
            "Source",
            f"{p.source or '-'}, measured {when(p.measure_time, now)}" if measured else p.source,
        ),
        ("GPUs", f"{len(p.gpus)} x {_model(node)}" if p.gpus else "none"),
        ("NVLink domain", f"{p.nvlink_domain_size} GPUs" if p.nvlink_domain_size else "-"),
        ("PCIe", f"gen{p.pcie_gen} x{p.pcie_width}" if p.pcie_gen else "-"),
        ("Network", _network(p.network, long=True)),
        ("BF16 TFLOPS", f"{p.bf16_tflops:g} (dense, whole node)" if p.bf16_tflops else "-"),
    ]
    gpu_rows = [
        (
            g.index,
            g.model,
            gib(g.memory_mib),
            number(g.hbm_gbps),
            f"{g.measured_hbm_gbps:g}" if g.HasField("measured_hbm_gbps") else "not measured",
            number(g.nvlink_gbps),
            f"{g.nvlink_links_active}/{g.nvlink_links_total}" if g.nvlink_links_total else "-",
            g.nvlink_version or "-",
            f"{_pcie(g.pcie_gen, g.pcie_width)}/{_pcie(g.pcie_max_gen, g.pcie_max_width)}"
            if g.pcie_gen or g.pcie_max_gen
            else "-",
            g.numa_node if g.numa_node >= 0 else "-",
            g.cpu_affinity,
            "yes" if g.mig_enabled else "no",
            g.pci_bus_id,
            g.uuid,
        )
        for g in p.gpus
    ]
    parts = [fields(head)]
    if node.health_issues:
        parts.append("Health issues:\n" + "\n".join(f"  {i}" for i in node.health_issues))
    parts.append("Profile:\n" + fields(profile, indent=2))
    if gpu_rows:
        headers = [
            "INDEX",
            "MODEL",
            "MEMORY",
            "HBM_GB/s",
            "MEASURED_HBM_GB/s",
            "NVLINK_GB/s",
            "NVLINKS",
            "NVL_GEN",
            "PCIE(CUR/MAX)",
            "NUMA",
            "CPUS",
            "MIG",
            "PCI_BUS_ID",
            "UUID",
        ]
        parts.append(_indent(table(headers, gpu_rows)))
    if p.ib_ports:
        port_rows = [
            (x.device, x.port, x.state, x.phys_state, number(x.rate_gbps), x.link_layer, x.guid)
            for x in p.ib_ports
        ]
        headers = ["DEVICE", "PORT", "STATE", "PHYS_STATE", "RATE_Gb/s", "LINK_LAYER", "GUID"]
        parts.append("IB/RoCE ports:\n" + _indent(table(headers, port_rows)))
    usage = {u.index: u for u in node.usage}
    use_rows = []
    for g in p.gpus:
        u = usage.get(g.index)
        use_rows.append(
            (
                g.index,
                f"{u.used_milli / 1000:g}" if u else "0",
                ",".join(str(j) for j in u.job_ids) if u else "-",
            )
        )
    if use_rows:
        summary = f"{free_gpus(node):g} of {len(p.gpus)} GPUs free"
        parts.append(
            f"GPU usage:  {summary}\n" + _indent(table(["INDEX", "USED", "JOBS"], use_rows))
        )
    parts.append(_events(node.events, now))
    return "\n".join(parts)


def leases_table(leases: Iterable[leases_pb2.Lease], *, now: datetime) -> str:
    rows = [
        (
            x.name,
            x.node,
            x.provider,
            x.sku,
            enum_name(leases_pb2.LeaseState, x.state, "LEASE_STATE_"),
            f"{x.price_per_hour:.2f}",
            _age_or_dash(x.acquire_time, now),
            x.for_job_id or "-",
            f"{x.cost_usd:.2f}",
            x.kept_for or "-",
        )
        for x in leases
    ]
    return table(
        ["NAME", "NODE", "PROVIDER", "SKU", "STATE", "$/HR", "AGE", "FOR_JOB", "COST_$", "KEPT"],
        rows,
    )


def cost_table(cost: leases_pb2.GetCostResponse, *, now: datetime) -> str:
    """The cost rows, then what the leases cost over the same window and how much was idle."""
    by = enum_name(leases_pb2.CostGroupBy, cost.group_by, "COST_GROUP_BY_")
    by = "job" if by == "unspecified" else by
    rows = [(r.key, r.jobs, f"{r.gpu_hours:.2f}", f"{r.dollars:.2f}") for r in cost.rows]
    head = table([by.upper(), "JOBS", "GPU_HOURS", "COST_$"], rows)
    since = _time(cost.since)
    window = f"since {since:%Y-%m-%dT%H:%M:%SZ} ({age(since, now)} ago)" if since else "all time"
    return (
        f"{head}\n"
        f"charged ${cost.charged_dollars:.2f} of ${cost.leased_dollars:.2f} leased, "
        f"${cost.idle_dollars:.2f} idle ({window})"
    )


# -- identity and access -------------------------------------------------------------------


def whoami(me: auth_pb2.WhoAmIResponse) -> str:
    pairs = [("User", me.user), ("Role", me.role), ("Via", me.via)]
    if me.HasField("uid"):
        pairs.append(("Uid", me.uid))
    pairs.append(("Permissions", ", ".join(me.permissions)))
    return fields(pairs)


def tokens_table(tokens: Iterable[auth_pb2.Token], *, now: datetime) -> str:
    def state(t: auth_pb2.Token) -> str:
        if t.HasField("revoke_time"):
            return "revoked"
        expires = _time(t.expire_time) if t.HasField("expire_time") else None
        return "expired" if expires is not None and expires <= now else "active"

    def expiry(t: auth_pb2.Token) -> str:
        if not t.HasField("expire_time"):
            return "never"
        expires = _time(t.expire_time)
        return expires.strftime("%Y-%m-%d %H:%M") if expires else "-"

    rows = [
        (
            t.id,
            t.kind,
            t.principal,
            state(t),
            _age_or_dash(t.create_time, now),
            expiry(t),
            t.created_by,
            t.description,
        )
        for t in tokens
    ]
    return table(
        ["ID", "KIND", "FOR", "STATE", "AGE", "EXPIRES", "CREATED_BY", "DESCRIPTION"], rows
    )


def audit_table(entries: Iterable[auth_pb2.AuditEntry]) -> str:
    rows = [
        (
            (_time(e.time) or datetime.min).strftime("%Y-%m-%d %H:%M:%S"),
            e.principal,
            e.role,
            e.via,
            e.action,
            e.target or "-",
            e.outcome,
            e.peer,
            e.detail,
        )
        for e in entries
    ]
    return table(
        ["TIME", "WHO", "ROLE", "VIA", "ACTION", "TARGET", "OUTCOME", "FROM", "DETAIL"], rows
    )
