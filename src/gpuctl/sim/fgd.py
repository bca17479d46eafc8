"""Benchmark B1 (BENCHMARKS.md): the FGD protocol on the Alibaba GPU trace 2023.

Builds each seed's canonical arrival sequence, places the pods one at a time with a packing
policy on the simulator's cluster model (`gpuctl.sim.cluster`), and reports the GPU allocation curve as published
(unallocated GPU % by arrived workload, median over seeds). `check_placements` replays a
placement log independently of the packing code.
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpuctl.core.model import MILLI_PER_GPU
from gpuctl.core.packing import PodRequest, Workload
from gpuctl.sim.alibaba import TraceNode, TracePod
from gpuctl.sim.baselines import make_policy
from gpuctl.sim.cluster import ClusterState, PolicyContext
from gpuctl.sim.fgd_core import DAEMON, DaemonPacking

TUNE = 1.3  # the workload is inflated to 130 % of the cluster's GPU capacity
DEFAULT_SEEDS = tuple(range(42, 52))
REPORT_COLUMNS = (90, 95, 100, 110, 130)
PLACEMENT_COLUMNS = (
    "seed",
    "index",
    "pod_name",
    "num_gpu",
    "gpu_milli",
    "cpu_milli",
    "memory_mib",
    "gpu_spec",
    "node",
    "gpu_alloc",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Arrival:
    index: int
    name: str  # the pod's name, or f"{name}-tuned-{i}" for a resampled copy
    pod: TracePod
    request: PodRequest


def cluster_gpus(nodes: Sequence[TraceNode]) -> int:
    return sum(n.gpus for n in nodes)


def canonical_arrivals(
    pods: Sequence[TracePod], seed: int, *, total_gpus: int
) -> tuple[Arrival, ...]:
    """The seed's arrival sequence, exactly as BENCHMARKS.md §B1 writes it."""
    rng = random.Random(seed)
    base = sorted(pods, key=lambda p: p.name)
    requests = {p.name: p.request for p in base}
    seq: list[tuple[str, TracePod]] = [(p.name, p) for p in base]
    rng.shuffle(seq)
    total = sum(requests[p.name].milli for _, p in seq)
    target = TUNE * total_gpus * MILLI_PER_GPU
    while total > target:
        _, popped = seq.pop(rng.randrange(len(seq)))
        total -= requests[popped.name].milli
    i = 0
    while total < target:
        p = base[rng.randrange(len(base))]
        # sic: the per-GPU milli, not the request, as upstream; normalised as the request reads it.
        if total + requests[p.name].gpu_milli > target:
            break
        seq.append((f"{p.name}-tuned-{i}", p))
        total += requests[p.name].milli
        i += 1
    return tuple(
        Arrival(index=k, name=name, pod=p, request=requests[p.name])
        for k, (name, p) in enumerate(seq)
    )


def column_of(arrived_milli: int, total_gpus: int) -> int:
    """The arrived-workload column (% of GPU capacity) of one event, as published."""
    return round(arrived_milli / total_gpus / 10)


def value_of(used_milli: int, total_gpus: int) -> float:
    """The allocation (% of GPU capacity) recorded for one event, as published."""
    return round(used_milli / total_gpus / 10, 2)


def column_means(events: Iterable[tuple[int, float]]) -> tuple[float, ...]:
    """Per column 0..last, the mean of the events' values in it.

    An empty column takes the values of the nearest non-empty columns on either side
    (both sides' values pooled; one side at the ends).
    """
    by_column: dict[int, list[float]] = {}
    for column, value in events:
        by_column.setdefault(column, []).append(value)
    if not by_column:
        return ()
    last = max(by_column)
    means: list[float] = []
    for c in range(last + 1):
        values = by_column.get(c)
        if not values:
            left = next((by_column[k] for k in range(c - 1, -1, -1) if k in by_column), [])
            right = next((by_column[k] for k in range(c + 1, last + 1) if k in by_column), [])
            values = left + right
        means.append(sum(values) / len(values))
    return tuple(means)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placed:
    arrival: Arrival
    node: str  # "" when dropped
    gpus: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SeedRun:
    policy: str
    seed: int
    alloc: tuple[float, ...]  # allocation % per arrived column 0..last
    wall_s: float
    placed: tuple[Placed, ...] = ()

    def unallocated(self, column: int) -> float:
        return 100.0 - self.alloc[min(column, len(self.alloc) - 1)]


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyResult:
    """One policy over several seeds: the median allocation curve."""

    policy: str
    runs: tuple[SeedRun, ...]
    mix: str = ""

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.seed for r in self.runs)

    def unallocated(self, column: int) -> float:
        """Unallocated GPU % at `column` % arrived: 100 - the median over seeds."""
        return 100.0 - statistics.median(r.alloc[min(column, len(r.alloc) - 1)] for r in self.runs)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"policy": self.policy}
        if self.mix:
            out["mix"] = self.mix
        out["seeds"] = list(self.seeds)
        out["unallocated_pct"] = {str(c): round(self.unallocated(c), 3) for c in REPORT_COLUMNS}
        out["per_seed_unallocated_at_100"] = [round(r.unallocated(100), 3) for r in self.runs]
        out["wall_s_per_seed"] = [round(r.wall_s, 2) for r in self.runs]
        return out


def workload_of(pods: Sequence[TracePod]) -> Workload:
    """The popularity a fragmentation-aware policy packs for: the task types of the pod list."""
    return Workload.of(p.request for p in pods)


def run_seed(
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    policy: str,
    seed: int,
    *,
    keep_placements: bool = False,
) -> SeedRun:
    """One seed of one policy: every arrival placed or dropped, the metric after each."""
    started = time.perf_counter()
    total_gpus = cluster_gpus(nodes)
    state = ClusterState([n.capacity() for n in nodes])
    chooser = (
        DaemonPacking(nodes)
        if policy == DAEMON
        else make_policy(policy, PolicyContext(workload=workload_of(pods), seed=seed))
    )
    arrived = used = 0
    events: list[tuple[int, float]] = []
    placed: list[Placed] = []
    for arrival in canonical_arrivals(pods, seed, total_gpus=total_gpus):
        request = arrival.request
        choice = chooser.place(state, request)
        if choice is not None:
            state.bind(request, choice)
            used += request.milli
        arrived += request.milli
        events.append((column_of(arrived, total_gpus), value_of(used, total_gpus)))
        if keep_placements:
            node = state.names[choice.node] if choice is not None else ""
            placed.append(Placed(arrival=arrival, node=node, gpus=choice.gpus if choice else ()))
    return SeedRun(
        policy=policy,
        seed=seed,
        alloc=column_means(events),
        wall_s=time.perf_counter() - started,
        placed=tuple(placed),
    )


def _run_seed_args(args: tuple) -> SeedRun:
    nodes, pods, policy, seed, keep = args
    return run_seed(nodes, pods, policy, seed, keep_placements=keep)


def run(
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    policies: Sequence[str],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    *,
    jobs: int = 1,
    keep_placements: bool = False,
    mix: str = "",
) -> tuple[PolicyResult, ...]:
    """Every policy on every seed, on the same arrivals; `jobs` processes across seeds."""
    for name in policies:
        if name != DAEMON:
            make_policy(name)  # an unknown name fails before any work starts
    tasks = [(tuple(nodes), tuple(pods), p, s, keep_placements) for p in policies for s in seeds]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
            runs = list(pool.map(_run_seed_args, tasks))
    else:
        runs = [_run_seed_args(t) for t in tasks]
    return tuple(
        PolicyResult(policy=p, mix=mix, runs=tuple(r for r in runs if r.policy == p))
        for p in policies
    )


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


# -- output --------------------------------------------------------------------------------


def write_json(results: Sequence[PolicyResult], path: str | Path) -> None:
    """One object for one policy, a list of them for several (or for mixes)."""
    body = [r.to_json() for r in results]
    Path(path).write_text(json.dumps(body[0] if len(body) == 1 else body, indent=2) + "\n")


def placement_rows(result: PolicyResult) -> Iterable[dict[str, object]]:
    for run_ in result.runs:
        for p in run_.placed:
            r = p.arrival.request
            yield {
                "seed": run_.seed,
                "index": p.arrival.index,
                "pod_name": p.arrival.name,
                "num_gpu": r.num_gpu,
                "gpu_milli": r.gpu_milli,
                "cpu_milli": r.cpu_milli,
                "memory_mib": r.memory_mib,
                "gpu_spec": "|".join(r.gpu_models),
                "node": p.node,
                "gpu_alloc": ";".join(f"{g}:{m}" for g, m in p.gpus),
            }


def write_placements(result: PolicyResult, path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLACEMENT_COLUMNS)
        writer.writeheader()
        writer.writerows(placement_rows(result))


# -- the independent checker ---------------------------------------------------------------


class PlacementLogError(ValueError):
    """A placement log that does not replay: the message lists what is wrong, by CSV line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    seeds: tuple[int, ...]
    rows: int
    placed: int
    dropped: int
    alloc: dict[int, tuple[float, ...]]  # per seed, allocation % per column

    def unallocated(self, column: int) -> float:
        return 100.0 - statistics.median(a[min(column, len(a) - 1)] for a in self.alloc.values())


def check_placements(
    path: str | Path,
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    *,
    check_drops: bool = True,
    max_errors: int = 20,
) -> CheckReport:
    """Replay a placement log with plain Python (no numpy, no packing code): every
    placement fits (no GPU over 1000 milli, CPU and memory within the node, gpu_spec
    respected), each seed's rows are its canonical arrivals in order, a dropped pod fitted
    nowhere (with `check_drops`), and the metric is recomputed from the rows.
    """
    path = Path(path)
    total_gpus = cluster_gpus(nodes)
    by_name = {n.name: n for n in nodes}
    errors: list[str] = []
    by_seed: dict[int, list[tuple[int, dict[str, str]]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PLACEMENT_COLUMNS:
            raise PlacementLogError(f"{path}:1: columns must be {','.join(PLACEMENT_COLUMNS)}")
        for row in reader:
            by_seed.setdefault(int(row["seed"]), []).append((reader.line_num, row))

    def fail(line: int, message: str) -> None:
        errors.append(f"{path}:{line}: {message}")

    alloc: dict[int, tuple[float, ...]] = {}
    placed = dropped = 0
    for seed, rows in by_seed.items():
        arrivals = canonical_arrivals(pods, seed, total_gpus=total_gpus)
        if len(rows) != len(arrivals):
            fail(
                rows[0][0],
                f"seed {seed}: {len(rows)} rows, the canonical sequence has {len(arrivals)}",
            )
        gpu_free = {n.name: [MILLI_PER_GPU] * n.gpus for n in nodes}
        cpu_free = {n.name: n.cpu_milli for n in nodes}
        mem_free = {n.name: n.memory_mib for n in nodes}
        arrived = used = 0
        events: list[tuple[int, float]] = []
        for (line, row), arrival in zip(rows, arrivals, strict=False):
            r = arrival.request
            expected = (
                str(arrival.index),
                arrival.name,
                str(r.num_gpu),
                str(r.gpu_milli),
                str(r.cpu_milli),
                str(r.memory_mib),
                "|".join(r.gpu_models),
            )
            got = tuple(
                row[c]
                for c in (
                    "index",
                    "pod_name",
                    "num_gpu",
                    "gpu_milli",
                    "cpu_milli",
                    "memory_mib",
                    "gpu_spec",
                )
            )
            if got != expected:
                fail(line, f"seed {seed}: arrival {got} is not the canonical {expected}")
            node = row["node"]
            alloc_text = row["gpu_alloc"]
            if node:
                n = by_name.get(node)
                if n is None:
                    fail(line, f"unknown node {node!r}")
                    continue
                gpus = []
                for part in alloc_text.split(";") if alloc_text else []:
                    g, _, m = part.partition(":")
                    gpus.append((int(g), int(m)))
                if len(gpus) != r.num_gpu or len({g for g, _ in gpus}) != len(gpus):
                    fail(line, f"gpu_alloc {alloc_text!r} does not give {r.num_gpu} distinct GPUs")
                for g, m in gpus:
                    if m != r.gpu_milli:
                        fail(line, f"GPU {g} gets {m} milli, the pod asks {r.gpu_milli}")
                    elif not 0 <= g < n.gpus:
                        fail(line, f"node {node} has no GPU {g}")
                    elif gpu_free[node][g] < m:
                        fail(
                            line,
                            f"GPU {g} of {node} would hold {MILLI_PER_GPU - gpu_free[node][g] + m} milli",
                        )
                    else:
                        gpu_free[node][g] -= m
                if r.num_gpu and r.gpu_models and n.model not in r.gpu_models:
                    fail(
                        line,
                        f"node {node} has {n.model} GPUs; gpu_spec allows {'|'.join(r.gpu_models)}",
                    )
                cpu_free[node] -= r.cpu_milli
                mem_free[node] -= r.memory_mib
                if cpu_free[node] < 0 or mem_free[node] < 0:
                    fail(
                        line,
                        f"node {node} oversubscribed: {cpu_free[node]} cpu-milli, {mem_free[node]} MiB free",
                    )
                used += r.milli
                placed += 1
            else:
                if alloc_text:
                    fail(line, "a dropped pod has a gpu_alloc")
                if check_drops and _fits_somewhere(r, nodes, gpu_free, cpu_free, mem_free):
                    fail(line, f"seed {seed}: {arrival.name} was dropped but fits a node")
                dropped += 1
            arrived += r.milli
            events.append((column_of(arrived, total_gpus), value_of(used, total_gpus)))
            if len(errors) >= max_errors:
                break
        alloc[seed] = column_means(events)
        if len(errors) >= max_errors:
            break
    if errors:
        raise PlacementLogError("\n".join(errors))
    return CheckReport(
        seeds=tuple(sorted(by_seed)),
        rows=placed + dropped,
        placed=placed,
        dropped=dropped,
        alloc=alloc,
    )


def _fits_somewhere(
    r: PodRequest,
    nodes: Sequence[TraceNode],
    gpu_free: dict[str, list[int]],
    cpu_free: dict[str, int],
    mem_free: dict[str, int],
) -> bool:
    for n in nodes:
        if cpu_free[n.name] < r.cpu_milli or mem_free[n.name] < r.memory_mib:
            continue
        if not r.num_gpu:
            return True
        if r.gpu_models and n.model not in r.gpu_models:
            continue
        free = gpu_free[n.name]
        if r.gpu_milli < MILLI_PER_GPU:
            if any(f >= r.gpu_milli for f in free):
                return True
        elif sum(f == MILLI_PER_GPU for f in free) >= r.num_gpu:
            return True
    return False
