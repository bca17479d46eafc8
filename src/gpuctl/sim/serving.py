"""Workloads W2 and W3 of benchmark B4. W2: a day of many inference services, 1B to 70B
parameters, whose load comes from the Azure LLM inference trace 2023
(`../shared/traces/azure-llm-2023`). W3 (`w3`): a training run, then serving what it trained.

- **Load.** The trace holds one hour (2023-11-16, 18:15-19:14) of requests to two services,
  `conv` and `code`. Per minute, the tokens they generated per second. A day repeats that
  hour's minute-by-minute shape, scaled by a diurnal curve: a raised cosine from 30 % of
  the peak at 02:00 to the peak at 14:00, normalised so that the trace's own hour
  (mid-point 18:45) keeps its measured level. The trace does not say its diurnal swing;
  ~3x from night to day is what published LLM-serving traces show, and it is an
  assumption here.
- **Services.** Each model takes a share of one trace's tokens (`share`). It is served in
  BF16 (2 bytes a parameter) by replicas that must each decode `tokens_per_s` (the HBM
  floor: tokens/s x weight GB). Models of 1B and 3B parameters take a share of one GPU.
- **Autoscaler.** The same for every fleet: every `step_s` (15 minutes), replicas = the
  peak minute's tokens/s of the next step over one replica's target, at least 1.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpuctl.core.model import JobKind, JobSpec
from gpuctl.sim.synthetic import SimJob
from gpuctl.sim.workload import DEFAULT_STEP_S, Service, training_spec

_HOUR = 3600.0
_DAY = 24 * _HOUR
NIGHT = 0.3  # the diurnal curve's low, as a share of its peak
PEAK_HOUR = 14.0
TRACE_HOUR = 18.75  # the trace's hour, 18:15-19:14, at its mid-point


class ServingTraceError(ValueError):
    """A trace file that cannot be read; the message names it."""


def per_minute(path: Path) -> tuple[float, ...]:
    """Generated tokens/s in each minute of the trace, from its first minute to its last
    (minutes without requests: 0)."""
    counts: Counter[int] = Counter()
    try:
        with path.open(newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    stamp = row["TIMESTAMP"]
                    minute = int(stamp[11:13]) * 60 + int(stamp[14:16])
                    counts[minute] += int(row["GeneratedTokens"])
                except (KeyError, ValueError, TypeError) as e:
                    raise ServingTraceError(f"{path}:{line}: {e}") from None
    except OSError as e:
        raise ServingTraceError(f"{path}: {e.strerror}") from None
    if not counts:
        raise ServingTraceError(f"{path}: no requests")
    first, last = min(counts), max(counts)
    return tuple(counts.get(m, 0) / 60.0 for m in range(first, last + 1))


def diurnal(t_s: float) -> float:
    """The day's curve at `t_s` seconds after midnight: NIGHT at 02:00, 1 at 14:00."""
    phase = 2 * math.pi * (t_s - PEAK_HOUR * _HOUR) / _DAY
    return NIGHT + (1 - NIGHT) * (1 + math.cos(phase)) / 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    """One service of W2: its model, what one replica takes and must decode, and its load."""

    name: str
    weights_gb: float  # BF16: 2 bytes a parameter
    gpus: int = 0  # whole GPUs a replica (0: a share)
    gpu_milli: int = 0  # a share of one GPU a replica
    tokens_per_s: float  # per replica
    trace: str  # "conv" or "code"
    share: float  # of that trace's generated tokens


# The models: chat from 1B to 70B on the conversation trace, code at 8B and 32B on the coding
# trace. A replica's target is what a user of that size of model expects at batch 1.
W2_MODELS = (
    Model(name="chat-1b", weights_gb=2.0, gpu_milli=250, tokens_per_s=60.0, trace="conv", share=0.15),
    Model(name="chat-3b", weights_gb=6.0, gpu_milli=500, tokens_per_s=50.0, trace="conv", share=0.15),
    Model(name="chat-8b", weights_gb=16.0, gpus=1, tokens_per_s=40.0, trace="conv", share=0.4),
    Model(name="chat-70b", weights_gb=140.0, gpus=2, tokens_per_s=20.0, trace="conv", share=0.3),
    Model(name="code-8b", weights_gb=16.0, gpus=1, tokens_per_s=40.0, trace="code", share=0.4),
    Model(name="code-32b", weights_gb=64.0, gpus=1, tokens_per_s=25.0, trace="code", share=0.6),
)  # fmt: skip


def load(rates: Sequence[float], t_s: float) -> float:
    """Tokens/s of a trace at `t_s` seconds after midnight: its minute's rate, scaled along
    the day from its own hour."""
    minute = int(t_s // 60) % len(rates)
    return rates[minute] * diurnal(t_s) / diurnal(TRACE_HOUR * _HOUR)


def services(
    traces: dict[str, Sequence[float]],
    *,
    window_s: float = _DAY,
    step_s: float = DEFAULT_STEP_S,
    models: Sequence[Model] = W2_MODELS,
) -> tuple[Service, ...]:
    """Each model as a service whose replica count the autoscaler sets from its load."""
    out = []
    steps = max(1, math.ceil(window_s / step_s))
    for m in models:
        rates = traces[m.trace]
        curve = []
        for i in range(steps):
            start = i * step_s
            minutes = range(int(start // 60), int(min(start + step_s, window_s) // 60) or 1)
            peak = max((load(rates, 60.0 * k) for k in minutes), default=0.0)
            curve.append(max(1, math.ceil(peak * m.share / m.tokens_per_s)))
        out.append(
            Service(
                name=m.name,
                weights_gb=m.weights_gb,
                gpus_per_replica=m.gpus,
                gpu_milli=m.gpu_milli,
                tokens_per_s=m.tokens_per_s,
                min_replicas=min(curve),
                max_replicas=max(curve),
                curve=tuple(curve),
                curve_step_s=step_s,
            )
        )
    return tuple(out)


# -- W3: train, then serve what was trained ---------------------------------------------------

W3_HOURS = 72.0
W3_RUN = (8, 8, 24 * _HOUR)  # the run: 8 nodes x 8 GPUs for 24 hours
W3_SERVICE = Model(
    name="trained-70b", weights_gb=140.0, gpus=2, tokens_per_s=20.0, trace="conv", share=0.3
)


def w3(
    background: Sequence[SimJob],
    traces: dict[str, Sequence[float]],
    *,
    window_s: float = W3_HOURS * _HOUR,
    step_s: float = DEFAULT_STEP_S,
) -> tuple[tuple[SimJob, ...], tuple[Service, ...]]:
    """Workload W3, the story gpuctl is for: a training run of `W3_RUN` on an interconnect
    island from the window's start; then the model it trained (70B, BF16) served from the
    run's end with W2's chat-70b load (its share of the conversation trace, on the same daily
    curve); and the one-node jobs of `background` (smaller training) arriving through the
    window. Returns the training (the run first) and the service, for `workload.build`."""
    nodes, gpus, run_s = W3_RUN
    spec = training_spec(
        JobSpec(
            kind=JobKind.TRAINING, command=("train", "70b"), name="run", num_nodes=nodes,
            gpus_per_node=gpus,
        )
    )  # fmt: skip
    run = SimJob(
        name="run",
        spec=replace(spec, time_limit_s=int(1.5 * run_s)),
        arrival_s=0.0,
        duration_s=run_s,
    )
    (served,) = services(traces, window_s=window_s, step_s=step_s, models=(W3_SERVICE,))
    starts = math.ceil(run_s / step_s)  # serving starts at the step the run ends in
    curve = tuple(0 if i < starts else n for i, n in enumerate(served.curve))
    served = replace(served, curve=curve, min_replicas=0)
    small = tuple(j for j in background if j.spec.num_nodes == 1)
    return (run, *small), (served,)
