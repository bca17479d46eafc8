"""Gavel's Philly-derived traces (`../shared/traces/gavel/msr/seed=0/*.trace`) as gang
workloads: one training job per line, its run time from Gavel's measured throughputs.

A line has 7 tab-separated fields (the older Gavel format): job type, command, num-steps
argument, needs-data-dir, total steps, arrival time (s, from the start of the VC's trace),
scale factor (GPUs, 1-64). The trace has no run time: it is total steps over the job type's
isolated V100 throughput (steps/s, `simulation_throughputs.json`) at the largest measured scale
factor not above the job's GPUs (job types measured on one GPU only use that). Gavel derived
the steps from Philly run times with the same table, so this recovers them up to that reading.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpuctl.core.model import JobKind, JobSpec
from gpuctl.sim.synthetic import SimJob, gang_shape, with_limit

FIELDS = 7
WORKER = "v100"  # the GPU Gavel's msr traces were generated for


@dataclass(frozen=True, slots=True, kw_only=True)
class GavelJob:
    job_type: str  # e.g. "ResNet-50 (batch size 128)"
    command: str
    num_steps_arg: str
    needs_data_dir: bool
    total_steps: int
    arrival_s: float
    gpus: int  # Gavel's scale factor


class TraceError(ValueError):
    """A trace line that cannot be read; names the file and line."""


def read_trace(path: str | os.PathLike[str]) -> tuple[GavelJob, ...]:
    jobs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != FIELDS:
                raise TraceError(f"{path}:{number}: {len(parts)} fields, expected {FIELDS}")
            job_type, command, steps_arg, data_dir, steps, arrival, gpus = parts
            try:
                job = GavelJob(
                    job_type=job_type,
                    command=command,
                    num_steps_arg=steps_arg,
                    needs_data_dir=data_dir.strip() == "1",
                    total_steps=int(steps),
                    arrival_s=float(arrival),
                    gpus=int(gpus),
                )
            except ValueError as e:
                raise TraceError(f"{path}:{number}: {e}") from None
            if job.gpus < 1 or job.total_steps < 1 or job.arrival_s < 0:
                raise TraceError(f"{path}:{number}: {job.gpus} GPUs, {job.total_steps} steps")
            jobs.append(job)
    return tuple(jobs)


def default_throughputs(trace: str | os.PathLike[str]) -> Path:
    """`gavel/simulation_throughputs.json` for a trace at `gavel/msr/seed=N/x.trace`."""
    return Path(trace).resolve().parents[2] / "simulation_throughputs.json"


def read_throughputs(path: str | os.PathLike[str]) -> dict[tuple[str, int], float]:
    """(job type, scale factor) -> isolated steps/s on Gavel's V100."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)[WORKER]
    out = {}
    for key, value in table.items():
        job_type, scale = ast.literal_eval(key)  # keys are Python tuple reprs
        out[str(job_type), int(scale)] = float(value["null"])
    return out


def duration_s(job: GavelJob, throughputs: Mapping[tuple[str, int], float]) -> float:
    measured = [s for t, s in throughputs if t == job.job_type and s <= job.gpus]
    if not measured:
        raise TraceError(f"no throughput for {job.job_type!r}")
    return job.total_steps / throughputs[job.job_type, max(measured)]


def workload(
    jobs: Sequence[GavelJob],
    throughputs: Mapping[tuple[str, int], float],
    *,
    slack: float = 1.5,
    gpus_per_node: int = 8,
) -> tuple[SimJob, ...]:
    """Each trace job as a training gang of whole nodes (up to a node's worth on one node),
    with a time limit of `slack` x its run time."""
    out = []
    for i, job in enumerate(jobs):
        nodes, per_node = gang_shape(job.gpus, gpus_per_node)
        run = duration_s(job, throughputs)
        spec = JobSpec(
            kind=JobKind.TRAINING,
            command=("gavel", job.job_type),
            name=f"gavel-{i}",
            num_nodes=nodes,
            gpus_per_node=per_node,
        )
        out.append(
            SimJob(
                name=spec.name,
                spec=with_limit(spec, run, slack),
                arrival_s=job.arrival_s,
                duration_s=run,
            )
        )
    return tuple(out)
