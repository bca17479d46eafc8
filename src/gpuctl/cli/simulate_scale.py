"""`gpuctl simulate scale`: benchmark B2, the scheduling core on synthetic clusters of
thousands of nodes with queues of thousands of jobs; each size in a fresh process, so its peak
memory is its own. Prints a table and optionally writes the figures as JSON.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click

from gpuctl.cli.figures import json_option, write_figures
from gpuctl.core.plugins import DEFAULT_POLICY, POLICIES

DEFAULT_NODES = (1_000, 10_000)
DEFAULT_PENDING = (10_000, 100_000)


@click.command("scale")
@click.option(
    "--nodes",
    "node_counts",
    type=click.IntRange(1),
    multiple=True,
    help=f"Cluster size in 8-GPU nodes; repeat for several [default: {', '.join(map(str, DEFAULT_NODES))}].",
)
@click.option(
    "--pending",
    "pending_counts",
    type=click.IntRange(1),
    multiple=True,
    help="Pending jobs; repeat for several; every size runs with every queue "
    f"[default: {', '.join(map(str, DEFAULT_PENDING))}].",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Runs of each timed call (the gang: at least 5); figures are medians.",
)
@click.option(
    "--steady-cycles",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Cycles timed after the burst, each with 1 % of the running jobs done and the queue "
    "topped up.",
)
@click.option(
    "--inference-jobs",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Inference replica sets in the throughput run.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--policy",
    type=click.Choice(sorted(POLICIES)),
    default=DEFAULT_POLICY,
    show_default=True,
)
@json_option
def scale_command(
    node_counts: tuple[int, ...],
    pending_counts: tuple[int, ...],
    repeats: int,
    steady_cycles: int,
    inference_jobs: int,
    seed: int,
    policy: str,
    json_out: Path | None,
) -> None:
    """Benchmark B2: placements/s, cycle latency, 512-GPU gang latency and peak memory."""
    from gpuctl.sim import scale

    sizes = [
        (n, m) for n in node_counts or DEFAULT_NODES for m in pending_counts or DEFAULT_PENDING
    ]
    options = {
        "seed": seed,
        "repeats": repeats,
        "steady_cycles": steady_cycles,
        "inference_count": inference_jobs,
        "policy_name": policy,
    }
    machine = describe_machine()
    click.echo(f"B2 on {machine['cpu']} ({machine['cpus']} CPUs), Python {machine['python']}")
    reports = []
    started = time.perf_counter()
    for nodes, pending in sizes:
        click.echo(f"{nodes} nodes, {pending} pending ...", nl=False)
        began = time.perf_counter()
        # A fresh process per size: its peak RSS is this size's alone.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            report = pool.submit(scale.measure_as_dict, nodes, pending, options).result()
        click.echo(f" {time.perf_counter() - began:.0f} s")
        reports.append(report)
    click.echo(table(reports))
    click.echo(f"wall {time.perf_counter() - started:.0f} s")
    if json_out is not None:
        figures = {"benchmark": "B2", "machine": machine, "options": options, "sizes": reports}
        write_figures(json_out, figures)


def describe_machine() -> dict[str, object]:
    """The CPU model (from /proc/cpuinfo where there is one), CPU count and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "host": platform.node(),
    }


def table(reports: Sequence[dict]) -> str:
    """One row per size: medians (the steady cycle: p50 and p99 over its cycles)."""
    header = (
        "nodes",
        "pending",
        "replicas/s",
        "gang ms",
        "burst s (placed)",
        "leased burst s",
        "steady p50 s",
        "steady p99 s",
        "build s",
        "peak RSS MiB",
    )
    rows = [
        (
            f"{r['nodes']:,}",
            f"{r['pending']:,}",
            f"{r['inference_replicas_per_s']:,.0f}",
            f"{1000 * r['gang']['median_s']:.1f}",
            f"{r['burst_cycle']['median_s']:.2f} ({r['burst_cycle']['bound_jobs']:,})",
            f"{r['leased_burst_cycle']['median_s']:.2f}",
            f"{r['steady_cycle']['median_s']:.3f}",
            f"{r['steady_cycle']['p99_s']:.3f}",
            f"{r['snapshot_build']['median_s']:.3f}",
            f"{r['peak_rss_mib']:.0f}",
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    return "\n".join(lines)
