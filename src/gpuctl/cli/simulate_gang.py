"""`gpuctl simulate gang`: replay a Gavel (Philly-derived) trace of training gangs on a
synthetic multi-fabric cluster under several policies, in one run, through the same
`core.schedule` the daemon runs; print a table and optionally write the figures as JSON.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import click

from gpuctl.cli.figures import json_option, write_figures
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.plugins import POLICIES, build_policy
from gpuctl.sim import gavel
from gpuctl.sim.replay import ReplayReport, replay
from gpuctl.sim.synthetic import SKUS, Pod, cluster

DEFAULT_POLICIES = ("fifo", "fifo-backfill", "default")
_HOUR = 3600


@click.command("gang")
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Gavel msr trace, e.g. ../shared/traces/gavel/msr/seed=0/ee9e8c.trace.",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    default=DEFAULT_POLICIES,
    show_default=True,
    help=f"Policy preset to replay (repeat to compare); one of {', '.join(sorted(POLICIES))}.",
)
@click.option(
    "--throughputs",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Gavel's simulation_throughputs.json [default: the one beside the trace's msr folder].",
)
@click.option("--sku", type=click.Choice(sorted(SKUS)), default="v100-sxm2-ib", show_default=True)
@click.option("--fabrics", type=click.IntRange(1), default=2, show_default=True)
@click.option("--leaves", type=click.IntRange(1), default=2, show_default=True, help="Per fabric.")
@click.option("--nodes-per-leaf", type=click.IntRange(1), default=4, show_default=True)
@click.option(
    "--slack",
    type=click.FloatRange(1.0),
    default=1.5,
    show_default=True,
    help="Time limit = run time x this (what backfilling plans with).",
)
@click.option("--limit", type=click.IntRange(0), default=0, help="Replay the first N jobs only.")
@json_option
def gang(
    trace_path: Path,
    policies: tuple[str, ...],
    throughputs: Path | None,
    sku: str,
    fabrics: int,
    leaves: int,
    nodes_per_leaf: int,
    slack: float,
    limit: int,
    json_out: Path | None,
) -> None:
    """Compare queueing policies on a Gavel trace of training gangs."""
    try:
        chosen = [build_policy(name) for name in dict.fromkeys(policies)]
    except InvalidArgument as e:
        raise click.BadParameter(e.violations[0].description, param_hint="--policy") from None
    table = throughputs or gavel.default_throughputs(trace_path)
    if not table.is_file():
        raise click.BadParameter(f"{table} not found", param_hint="--throughputs")
    try:
        jobs = gavel.read_trace(trace_path)
        workload = gavel.workload(
            jobs[:limit] if limit else jobs, gavel.read_throughputs(table), slack=slack
        )
    except gavel.TraceError as e:
        raise click.ClickException(str(e)) from None
    pods = [Pod(sku=sku, fabrics=fabrics, leaves=leaves, nodes_per_leaf=nodes_per_leaf)]
    nodes = cluster(pods)
    gpus = sum(n.gpu_count for n in nodes)
    click.echo(
        f"{trace_path.name}: {len(workload)} jobs; {len(nodes)} x {sku} nodes ({gpus} GPUs), "
        f"{fabrics} fabric(s) x {leaves} leaf switch(es) x {nodes_per_leaf} nodes; "
        f"time limits {slack:g} x run time"
    )
    results: list[tuple[ReplayReport, float]] = []
    for policy in chosen:
        started = time.perf_counter()
        report, _ = replay(nodes, workload, policy)
        results.append((report, time.perf_counter() - started))
    click.echo(_table(results))
    if json_out is not None:
        figures = {
            "trace": str(trace_path),
            "throughputs": str(table),
            "jobs": len(workload),
            "cluster": {
                "sku": sku,
                "fabrics": fabrics,
                "leaves_per_fabric": leaves,
                "nodes_per_leaf": nodes_per_leaf,
                "nodes": len(nodes),
                "gpus": gpus,
            },
            "slack": slack,
            "machine": platform.node(),
            "python": platform.python_version(),
            "policies": [{**r.as_dict(), "wall_s": round(w, 3)} for r, w in results],
        }
        write_figures(json_out, figures)


def _table(results: list[tuple[ReplayReport, float]]) -> str:
    header = (
        "policy",
        "done",
        "avg JCT h",
        "p50 JCT h",
        "avg queue h",
        "p99 queue h",
        "GPU util %",
        "makespan h",
        "preempted",
        "wall s",
    )
    rows = [
        (
            r.policy,
            f"{r.completed}/{r.jobs}",
            f"{r.avg_jct_s / _HOUR:.2f}",
            f"{r.p50_jct_s / _HOUR:.2f}",
            f"{r.avg_queue_s / _HOUR:.2f}",
            f"{r.p99_queue_s / _HOUR:.2f}",
            f"{100 * r.gpu_utilisation:.1f}",
            f"{r.makespan_s / _HOUR:.1f}",
            str(r.preemptions),
            f"{wall:.1f}",
        )
        for r, wall in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    return "\n".join(line.rstrip() for line in lines)
