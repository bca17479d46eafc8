"""`gpuctl simulate`: replay traces through the scheduling core on this machine, no daemon.

`fgd` runs benchmark B1 (BENCHMARKS.md): the FGD protocol on the Alibaba GPU trace 2023.
The simulator and numpy are imported when a command runs, so other `gpuctl` commands do not
pay for them at startup.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import click

_SEEDS = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_seeds(text: str) -> tuple[int, ...]:
    """`42-51`, `42,45` or `42-44,50` -> the seeds, in order, each once."""
    text = text.replace(" ", "")
    if not _SEEDS.match(text):
        raise click.BadParameter(f"{text!r}: expected seeds such as 42-51 or 42,45")
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise click.BadParameter(f"{part!r}: range runs backwards")
        seeds.extend(s for s in range(first, last + 1) if s not in seeds)
    return tuple(seeds)


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(1)


def _per_run_path(path: Path, policy: str, mix: str, *, several: bool) -> Path:
    if not several:
        return path
    tag = policy if not mix else f"{mix.replace(':', '-').replace(',', '_')}.{policy}"
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def results_table(results: Sequence, columns: Sequence[int]) -> str:
    """Unallocated GPU % (median over seeds) per arrived column, a row per mix and policy."""
    with_mix = any(r.mix for r in results)
    head = (["mix"] if with_mix else []) + ["policy"] + [f"{c}%" for c in columns] + ["s/seed"]
    rows = []
    for r in results:
        per_seed = sum(x.wall_s for x in r.runs) / len(r.runs)
        rows.append(
            ([r.mix] if with_mix else [])
            + [r.policy]
            + [f"{r.unallocated(c):.2f}" for c in columns]
            + [f"{per_seed:.1f}"]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    text_cols = 2 if with_mix else 1

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < text_cols else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(head), *(line(row) for row in rows)])


@click.group()
def simulate() -> None:
    """Replay traces through the scheduling core and report the figures (BENCHMARKS.md)."""


@simulate.command("fgd")
@click.option(
    "--nodes",
    "nodes_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Node list CSV (sn,cpu_milli,memory_mib,gpu,model).",
)
@click.option(
    "--pods",
    "pods_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Pod list CSV (name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,...).",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    help="Packing policy; repeat to compare side by side (default: the daemon's default). "
    "'daemon': every pod through the daemon's scheduling core (slower).",
)
@click.option("--seeds", default="42-51", show_default=True, help="Seeds, e.g. 42-51 or 42,45.")
@click.option(
    "--mix",
    "mixes",
    multiple=True,
    help="Reshape the pod list first, e.g. gpushare:0.8 or cpu:0.3,gpuspec:0.2; repeat for "
    "several (see gpuctl.sim.mix).",
)
@click.option("--mixes", "standard_mixes", is_flag=True, help="Run the standard set of mixes.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the figures as JSON: one object, or a list for several policies or mixes.",
)
@click.option(
    "--placements",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every arrival's placement as CSV; with several policies or mixes, one file "
    "each, named OUT.<mix>.<policy>.csv.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes across seeds (default: the CPUs this process may use).",
)
@click.pass_context
def fgd(
    ctx: click.Context,
    nodes_path: Path,
    pods_path: Path,
    policies: tuple[str, ...],
    seeds: str,
    mixes: tuple[str, ...],
    standard_mixes: bool,
    json_path: Path | None,
    placements: Path | None,
    jobs: int | None,
) -> None:
    """Benchmark B1: unallocated GPU % by arrived workload, FGD protocol, median over seeds."""
    from gpuctl.sim import fgd as b1
    from gpuctl.sim.alibaba import TraceError, read_nodes, read_pods
    from gpuctl.sim.baselines import DEFAULT_PACKING_POLICY, PACKING_POLICIES
    from gpuctl.sim.fgd_core import DAEMON
    from gpuctl.sim.mix import STANDARD_MIXES, MixError, apply_mix, parse_mix

    chosen = policies or (DEFAULT_PACKING_POLICY,)
    unknown = [p for p in chosen if p not in PACKING_POLICIES and p != DAEMON]
    if unknown:
        known = ", ".join(sorted([*PACKING_POLICIES, DAEMON]))
        raise click.BadParameter(
            f"unknown policy {unknown[0]!r}; known: {known}", param_hint="--policy"
        )
    seed_list = parse_seeds(seeds)
    mix_texts = list(mixes) + (
        [m for m in STANDARD_MIXES if m not in mixes] if standard_mixes else []
    )
    try:
        nodes = read_nodes(nodes_path)
        pods = read_pods(pods_path)
        parsed = [parse_mix(m) for m in mix_texts]
    except (TraceError, MixError) as e:
        _fail(ctx, str(e))
        return
    started = time.perf_counter()
    results = []
    for mix in parsed or [None]:
        workload = apply_mix(pods, nodes, mix) if mix is not None else pods
        runs = b1.run(
            nodes,
            workload,
            chosen,
            seed_list,
            jobs=jobs or b1.default_jobs(),
            keep_placements=placements is not None,
            mix=mix.text if mix is not None else "",
        )
        results.extend(runs)
    click.echo(
        f"unallocated GPU % at arrived workload (median of {len(seed_list)} seeds; "
        f"{len(nodes)} nodes, {b1.cluster_gpus(nodes)} GPUs, {len(pods)} pods)"
    )
    click.echo(results_table(results, b1.REPORT_COLUMNS))
    click.echo(f"wall {time.perf_counter() - started:.1f} s")
    if json_path is not None:
        b1.write_json(results, json_path)
    if placements is not None:
        several = len(results) > 1
        for r in results:
            b1.write_placements(r, _per_run_path(placements, r.policy, r.mix, several=several))


# Registered here, not imported at the top: the gang replay lives in its own module.
from gpuctl.cli.simulate_gang import gang  # noqa: E402

simulate.add_command(gang)

# Benchmark B2, the core at scale, likewise in its own module.
from gpuctl.cli.simulate_scale import scale_command  # noqa: E402

simulate.add_command(scale_command)

# Benchmark B4, the cost of a fleet, likewise in its own module.
from gpuctl.cli.simulate_cost import cost_command  # noqa: E402

simulate.add_command(cost_command)
