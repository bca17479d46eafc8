"""`gpuctl simulate cost`: benchmark B4. Replay one mixed workload (training gangs from a Gavel
trace, inference services on a diurnal curve) against the provider catalog on four fleets —
one training-shaped fleet, the cheapest instance per job with an idle timer, a cluster
Karpenter provisions, gpuctl leasing through the core — and print dollars, GPU-hours paid and used, JCT and SLO attainment.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import click

from gpuctl.cli.figures import json_option, write_figures
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.leasing import Offer
from gpuctl.core.plugins import DEFAULT_POLICY, POLICIES, build_policy
from gpuctl.providers.base import Sku
from gpuctl.providers.catalog import load_catalog
from gpuctl.sim import cost, gavel, serving, workload
from gpuctl.sim.cost import Comparison
from gpuctl.sim.karpenter import DEFAULT_CONSOLIDATE_AFTER_S
from gpuctl.sim.workload import TRAINING_GPU

_ROOT = Path(__file__).resolve().parents[3]  # the checkout: config/ and ../shared beside it
DEFAULT_CATALOG = _ROOT / "config" / "catalog.csv"
DEFAULT_TRACE = _ROOT.parent / "shared" / "traces" / "gavel" / "msr" / "seed=0" / "ee9e8c.trace"
# The trace's VC starts slowly (12 jobs in its first 10 days): the window starts on day 10.
DEFAULT_START_H = 240.0
DEFAULT_HOURS = {"w1": 168.0, "w2": 24.0, "w3": 72.0}
DEFAULT_AZURE = _ROOT.parent / "shared" / "traces" / "azure-llm-2023"
PROVIDER = "catalog"  # the one configured provider every catalog SKU is leased from
_HOUR = 3600.0


def offer_of(sku: Sku) -> Offer:
    """A catalog SKU as the core ranks it, leased from the catalog provider (renewable)."""
    return sku.offer(provider=PROVIDER, renewable=True)


@click.command("cost")
@click.option(
    "--workload",
    "which",
    type=click.Choice(["w1", "w2", "w3"]),
    default="w1",
    show_default=True,
    help="w1: a week of the Gavel trace's training plus three services on a cosine; w2: a day "
    "of six services, 1B to 70B, loaded by the Azure LLM trace; w3: a 64-GPU training run, "
    "then serving the model it trained, with the Gavel trace's one-node jobs around it "
    "(gpuctl.sim.serving).",
)
@click.option(
    "--azure",
    "azure_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_AZURE,
    show_default="../shared/traces/azure-llm-2023",
    help="w2, w3: the Azure LLM inference trace 2023 (its conv and code CSV files).",
)
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_TRACE,
    show_default="../shared/traces/gavel/msr/seed=0/ee9e8c.trace",
    help="A Gavel msr trace: the training gangs.",
)
@click.option(
    "--throughputs",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Gavel's simulation_throughputs.json [default: the one beside the trace's msr folder].",
)
@click.option(
    "--catalog",
    "catalog_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CATALOG,
    show_default="config/catalog.csv",
    help="The provider catalog: SKUs and on-demand prices.",
)
@click.option(
    "--seller",
    "sellers",
    multiple=True,
    help="Lease only from these catalog sellers (repeat; default: all of them).",
)
@click.option(
    "--start-h",
    type=click.FloatRange(0),
    default=DEFAULT_START_H,
    show_default=True,
    help="Where the window starts in the trace, hours.",
)
@click.option(
    "--hours",
    type=click.FloatRange(0, min_open=True),
    default=None,
    show_default="168 for w1, 24 for w2, 72 for w3",
    help="The window: training arriving in it, services running through it, dollars in it.",
)
@click.option(
    "--limit", type=click.IntRange(0), default=0, help="Only the first N training jobs (0: all)."
)
@click.option(
    "--step-min",
    type=click.FloatRange(0, min_open=True),
    default=workload.DEFAULT_STEP_S / 60,
    show_default=True,
    help="How often the services' autoscaler reads the diurnal curve, minutes.",
)
@click.option(
    "--no-services", is_flag=True, help="Training only: leave the inference services out."
)
@click.option(
    "--boot-s",
    type=click.FloatRange(0),
    default=cost.DEFAULT_BOOT_S,
    show_default=True,
    help="Seconds from lease to node registered, for (b) and (c) alike; billed.",
)
@click.option(
    "--idle-timer-s",
    type=click.FloatRange(0),
    default=cost.DEFAULT_IDLE_TIMER_S,
    show_default=True,
    help="(b): idle seconds before a node is released (SkyPilot autostop).",
)
@click.option(
    "--idle-grace-s",
    type=click.FloatRange(0),
    default=cost.DEFAULT_IDLE_GRACE_S,
    show_default=True,
    help="(c): gpuctl's idle grace for a node a queued job fits (leases.idle_grace_s).",
)
@click.option(
    "--warm-nodes",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="(c): idle leased nodes gpuctl keeps warm beyond those (leases.warm_nodes).",
)
@click.option(
    "--service-grace-s",
    type=click.FloatRange(0),
    default=cost.DEFAULT_SERVICE_GRACE_S,
    show_default=True,
    help="(c): how long an idle node a running service scaled down from is kept for its next "
    "scale-up (leases.service_grace_s).",
)
@click.option(
    "--service-headroom",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="(c): replicas of each running service kept ready on leased nodes, leased ahead "
    "(leases.service_headroom).",
)
@click.option(
    "--fleet-sku", default="", help="(a)'s node [default: the cheapest 8-GPU training SKU]."
)
@click.option(
    "--fleet-nodes",
    type=click.IntRange(0),
    default=0,
    help="(a)'s size [default: the peak of GPUs held at once, in nodes].",
)
@click.option(
    "--policy",
    default=DEFAULT_POLICY,
    show_default=True,
    help=f"The core's policy preset for (a) and (c); one of {', '.join(sorted(POLICIES))}.",
)
@json_option
def cost_command(
    which: str,
    azure_dir: Path,
    trace_path: Path,
    throughputs: Path | None,
    catalog_path: Path,
    sellers: tuple[str, ...],
    start_h: float,
    hours: float | None,
    limit: int,
    step_min: float,
    no_services: bool,
    boot_s: float,
    idle_timer_s: float,
    idle_grace_s: float,
    warm_nodes: int,
    service_grace_s: float,
    service_headroom: int,
    fleet_sku: str,
    fleet_nodes: int,
    policy: str,
    json_out: Path | None,
) -> None:
    """Compare what one mixed workload costs on four fleets (benchmark B4)."""
    started = time.perf_counter()
    try:
        chosen = build_policy(policy)
    except InvalidArgument as e:
        raise click.BadParameter(e.violations[0].description, param_hint="--policy") from None
    if which != "w2" and not trace_path.is_file():
        raise click.BadParameter(f"{trace_path} not found", param_hint="--trace")
    if not catalog_path.is_file():
        raise click.BadParameter(f"{catalog_path} not found", param_hint="--catalog")
    table = throughputs or gavel.default_throughputs(trace_path)
    if which != "w2" and not table.is_file():
        raise click.BadParameter(f"{table} not found", param_hint="--throughputs")
    try:
        skus = load_catalog(catalog_path)
    except InvalidArgument as e:
        raise click.ClickException(f"{catalog_path}: {e.violations[0].description}") from None
    if sellers:
        unknown = sorted(set(sellers) - {s.provider for s in skus})
        if unknown:
            raise click.BadParameter(
                f"not in the catalog: {', '.join(unknown)}", param_hint="--seller"
            )
        skus = tuple(s for s in skus if s.provider in sellers)
    offers = tuple(offer_of(s) for s in skus)
    shape = None
    if fleet_sku:
        shape = next((o for o in offers if o.sku == fleet_sku), None)
        if shape is None:
            raise click.BadParameter(f"{fleet_sku} is not a catalog SKU", param_hint="--fleet-sku")
    window_s = (hours or DEFAULT_HOURS[which]) * _HOUR
    traces: dict[str, tuple[float, ...]] = {}
    if which != "w1":
        try:
            traces = {
                name: serving.per_minute(azure_dir / f"AzureLLMInferenceTrace_{name}.csv")
                for name in ("conv", "code")
            }
        except serving.ServingTraceError as e:
            raise click.ClickException(str(e)) from None
    if which == "w2":
        services = serving.services(traces, window_s=window_s, step_s=step_min * 60)
        work = workload.build([], services, window_s=window_s, step_s=step_min * 60)
        click.echo(f"w2 from {azure_dir}: " + _describe(work, len(offers), sellers))
    else:
        try:
            jobs = gavel.workload(gavel.read_trace(trace_path), gavel.read_throughputs(table))
        except gavel.TraceError as e:
            raise click.ClickException(str(e)) from None
        training = workload.training_window(
            jobs, start_s=start_h * _HOUR, window_s=window_s, limit=limit
        )
        services = () if no_services else workload.DEFAULT_SERVICES
        if which == "w3":
            training, services = serving.w3(
                training, traces, window_s=window_s, step_s=step_min * 60
            )
        work = workload.build(
            training, services, window_s=window_s, step_s=step_min * 60, source=str(trace_path)
        )
        click.echo(
            f"{trace_path.name} from hour {start_h:g}: " + _describe(work, len(offers), sellers)
        )
    try:
        result = cost.compare(
            work,
            offers,
            chosen,
            boot_s=boot_s,
            idle_timer_s=idle_timer_s,
            idle_grace_s=idle_grace_s,
            warm_nodes=warm_nodes,
            service_grace_s=service_grace_s,
            service_headroom=service_headroom,
            fleet_offer=shape,
            fleet_nodes=fleet_nodes,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"(a) {result.fleet_nodes} x {result.fleet_sku}; (b) idle timer {idle_timer_s:g} s; "
        f"(b') Karpenter, pods naming {TRAINING_GPU}, consolidateAfter "
        f"{DEFAULT_CONSOLIDATE_AFTER_S:g} s; (c) idle grace {idle_grace_s:g} s, "
        f"service grace {service_grace_s:g} s, headroom {service_headroom}, "
        f"{warm_nodes} warm nodes; "
        f"boot {boot_s:g} s for (b), (b') and (c)"
    )
    click.echo(_table(result))
    for r in result.reports:
        click.echo(f"{r.fleet} dollars by SKU: {_by_sku(r)}")
    click.echo(
        f"floor: ${result.floor_dollars:,.0f} (every demand at the lowest $/GPU-hour meeting its "
        "floors, no boot, no idle GPU)"
    )
    for t in result.targets:
        click.echo(f"{t.name}: {t.value:.3f} (limit {t.limit:g}) {'met' if t.met else 'MISSED'}")
    wall = time.perf_counter() - started
    click.echo(f"wall {wall:.1f} s")
    if json_out is not None:
        figures = {
            **result.as_dict(),
            "workload": {
                "name": which,
                **_workload_dict(
                    work,
                    azure_dir if which == "w2" else trace_path,
                    table,
                    start_h,
                    limit,
                    step_min,
                ),
            },
            "catalog": {
                "path": str(catalog_path),
                "sellers": list(sellers) or "all",
                "offers": len(offers),
            },
            "boot_s": boot_s,
            "idle_timer_s": idle_timer_s,
            "idle_grace_s": idle_grace_s,
            "warm_nodes": warm_nodes,
            "service_grace_s": service_grace_s,
            "service_headroom": service_headroom,
            "policy": policy,
            "machine": platform.node(),
            "python": platform.python_version(),
            "wall_s": round(wall, 3),
        }
        write_figures(json_out, figures)


def _describe(work: workload.Workload, offers: int, sellers: tuple[str, ...]) -> str:
    training = work.training
    gpu_hours = sum(d.gpus * d.duration_s for d in training) / _HOUR
    services = ", ".join(
        f"{s.name} ({s.weights_gb:g} GB on "
        f"{f'{s.gpu_milli} milli of a' if s.gpu_milli else s.gpus_per_replica} GPU, "
        f"{s.tokens_per_s:g} tok/s, {s.min_replicas}-{s.max_replicas} replicas"
        f"{'' if s.curve else f' peaking {s.peak_hour:g}h'})"
        for s in work.services
    )
    return (
        f"{len(training)} training jobs "
        f"({gpu_hours:.0f} GPU-hours) over {work.window_s / _HOUR:g} h; "
        f"{len(work.replicas)} replica stretches of {services or 'no services'}; "
        f"{offers} catalog offers ({', '.join(sellers) or 'all sellers'})"
    )


def _workload_dict(
    work: workload.Workload,
    trace: Path,
    throughputs: Path,
    start_h: float,
    limit: int,
    step_min: float,
) -> dict[str, object]:
    return {
        "trace": str(trace),
        "throughputs": str(throughputs),
        "start_h": start_h,
        "hours": work.window_s / _HOUR,
        "limit": limit,
        "training_jobs": len(work.training),
        "training_floors": {
            "gpu_model": workload.TRAINING_GPU,
            "min_nvlink_gbps": workload.TRAINING_NVLINK_GBPS,
            "min_net_gbps": workload.TRAINING_NET_GBPS,
        },
        "replica_stretches": len(work.replicas),
        "step_min": step_min,
        "services": [
            {
                "name": s.name,
                "weights_gb": s.weights_gb,
                "gpus_per_replica": s.gpus_per_replica,
                "gpu_milli": s.gpu_milli,
                "tokens_per_s": s.tokens_per_s,
                "min_replicas": s.min_replicas,
                "max_replicas": s.max_replicas,
                "peak_hour": s.peak_hour,
            }
            for s in work.services
        ],
    }


def _by_sku(report: cost.FleetReport, most: int = 3) -> str:
    """ "62 % vast/2x-A100, 23 % vast/1x-L40S, 15 % in 4 more" for a fleet's dollars."""
    total = report.dollars or 1.0
    items = list(report.dollars_by_sku.items())
    parts = [f"{100 * d / total:.0f} % {sku}" for sku, d in items[:most]]
    if len(items) > most:
        rest = sum(d for _, d in items[most:])
        parts.append(f"{100 * rest / total:.0f} % in {len(items) - most} more")
    return ", ".join(parts) or "nothing"


def _table(result: Comparison) -> str:
    header = (
        "fleet",
        "dollars",
        "GPU-h paid",
        "GPU-h used",
        "used %",
        "avg JCT h",
        "done",
        "SLO %",
        "nodes",
        "peak",
        "wall s",
    )
    rows = [
        (
            r.fleet,
            f"{r.dollars:,.0f}",
            f"{r.gpu_hours_paid:,.0f}",
            f"{r.gpu_hours_used:,.0f}",
            f"{100 * r.used_share:.1f}",
            f"{r.avg_jct_s / _HOUR:.2f}",
            f"{r.completed}/{r.training_jobs}",
            f"{100 * r.slo_attainment:.2f}",
            str(r.nodes_paid),
            str(r.peak_nodes),
            f"{result.wall_s[r.fleet]:.1f}",
        )
        for r in result.reports
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    ]
    return "\n".join(line.rstrip() for line in lines)
