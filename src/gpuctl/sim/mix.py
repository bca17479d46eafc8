"""Workload mixes built from one pod list, so a packing policy is judged on more than the
file it was developed on (BENCHMARKS.md §B1: the policy must not be tuned to the default).

A mix names target shares, e.g. `gpushare:0.8` or `cpu:0.3,gpuspec:0.2`:

- `cpu`: CPU-only pods as a share of all pods;
- `gpushare`: fractional-GPU pods as a share of the GPU pods;
- `multigpu`: multi-GPU pods as a share of the GPU pods;
- `gpuspec`: GPU pods that carry a GPU-model constraint, as a share of the GPU pods;
- `pinned`: the same, shaped as a heterogeneous fleet's constraints are: pinned demand is
  on the scarce models (the dominant model, the one with most GPUs, is never asked for
  alone), as lists of acceptable models.

The pod count stays that of the file. A class whose count rises keeps all its pods and adds
copies drawn with replacement (named `<pod>-mix-<k>`); one whose count falls keeps a sample
drawn without replacement; one left alone keeps its pods; whole single-GPU pods make up the
rest of the GPU pods. The file has no constrained pods, so `gpuspec` constrains a sample of
GPU pods: each gets one model, drawn with probability proportional to that model's GPUs on
nodes big enough for the pod, and one in three also allows a second model drawn the same
way (`A|B`). `pinned` gives half of its pods one scarce model (drawn in proportion to the
GPUs of the models other than the dominant one), a quarter that model and a sibling (the
scarce model nearest it by name, as `V100M16|V100M32`), and a quarter every model but one
scarce model (as `G2|P100|T4|V100M16|V100M32`). Draws come from `random.Random("mix:" +
the mix as written)`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpuctl.core.packing import Kind
from gpuctl.sim.alibaba import TraceNode, TracePod

MIX_KEYS = ("cpu", "gpushare", "multigpu", "gpuspec", "pinned")
DEFAULT_MIX = "default"
# The mixes `gpuctl simulate fgd --mixes` runs: each class raised well past the default
# file's share (cpu 13 %, gpushare 44 %, multigpu 1 %, gpuspec 0 %) and, for shares, lowered.
STANDARD_MIXES = (
    "default",
    "gpushare:0.2",
    "gpushare:0.8",
    "multigpu:0.05",
    "multigpu:0.1",
    "cpu:0.3",
    "cpu:0.5",
    "gpuspec:0.2",
    "gpuspec:0.5",
    "pinned:0.1",
    "pinned:0.2",
    "pinned:0.33",
)


class MixError(ValueError):
    """A mix that cannot be built; the message says which part."""


@dataclass(frozen=True, slots=True)
class Mix:
    text: str
    shares: tuple[tuple[str, float], ...] = ()

    def share(self, key: str) -> float | None:
        return dict(self.shares).get(key)


def parse_mix(text: str) -> Mix:
    """`default`, or `key:share[,key:share...]` with keys from MIX_KEYS and shares in 0..1."""
    text = text.strip()
    if text in ("", DEFAULT_MIX):
        return Mix(DEFAULT_MIX)
    shares: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition(":")
        if not sep or key not in MIX_KEYS:
            raise MixError(f"mix {text!r}: {part!r} is not key:share with key one of {MIX_KEYS}")
        try:
            share = float(value)
        except ValueError:
            raise MixError(f"mix {text!r}: share {value!r} is not a number") from None
        if not 0.0 <= share <= 1.0:
            raise MixError(f"mix {text!r}: share {share} is outside 0..1")
        if key in shares:
            raise MixError(f"mix {text!r}: {key} given twice")
        shares[key] = share
    return Mix(text, tuple(sorted(shares.items())))


def _resize(pods: list[TracePod], count: int, rng: random.Random, tag: str) -> list[TracePod]:
    if count == len(pods):
        return list(pods)
    if count < len(pods):
        return rng.sample(pods, count)
    if not pods:
        raise MixError(f"no {tag} pods in the file to draw from")
    extra = [rng.choice(pods) for _ in range(count - len(pods))]
    return list(pods) + [replace(p, name=f"{p.name}-mix-{k}") for k, p in enumerate(extra)]


def _constrain(pod: TracePod, nodes: Sequence[TraceNode], rng: random.Random) -> TracePod:
    gpus: Counter[str] = Counter()
    for n in nodes:
        if n.gpus >= pod.num_gpu:
            gpus[n.model] += n.gpus
    models = sorted(gpus)
    if not models:
        return pod
    first = rng.choices(models, weights=[gpus[m] for m in models])[0]
    spec = {first}
    if rng.random() < 1 / 3 and len(models) > 1:
        rest = [m for m in models if m != first]
        spec.add(rng.choices(rest, weights=[gpus[m] for m in rest])[0])
    return replace(pod, gpu_spec=tuple(sorted(spec)))


def _pin(pod: TracePod, nodes: Sequence[TraceNode], rng: random.Random) -> TracePod:
    gpus: Counter[str] = Counter()
    for n in nodes:
        if n.gpus >= pod.num_gpu:
            gpus[n.model] += n.gpus
    if len(gpus) < 2:
        return pod
    models = sorted(gpus)
    dominant = max(models, key=lambda m: (gpus[m], m))
    scarce = [m for m in models if m != dominant]
    first = rng.choices(scarce, weights=[gpus[m] for m in scarce])[0]
    draw = rng.random()
    if draw < 0.5 or len(scarce) == 1:
        spec = {first}
    elif draw < 0.75:
        others = [m for m in scarce if m != first]
        spec = {first, min(others, key=lambda m: (_distance(m, first), m))}
    else:
        others = [m for m in scarce if m != first]
        spec = set(models) - {rng.choices(others, weights=[gpus[m] for m in others])[0]}
    return replace(pod, gpu_spec=tuple(sorted(spec)))


def _distance(a: str, b: str) -> int:
    """How unlike two model names are: the characters after their common prefix."""
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return len(a) + len(b) - 2 * common


def apply_mix(
    pods: Sequence[TracePod], nodes: Sequence[TraceNode], mix: Mix
) -> tuple[TracePod, ...]:
    """The pod list reshaped to `mix` (the list itself for the default mix)."""
    if not mix.shares:
        return tuple(pods)
    rng = random.Random(f"mix:{mix.text}")
    by_kind: dict[Kind, list[TracePod]] = {k: [] for k in Kind}
    multi: list[TracePod] = []
    for p in sorted(pods, key=lambda p: p.name):
        if p.request.kind is Kind.WHOLE and p.num_gpu > 1:
            multi.append(p)
        else:
            by_kind[p.request.kind].append(p)
    total = len(pods)
    cpu_share = mix.share("cpu")
    n_cpu = round(cpu_share * total) if cpu_share is not None else len(by_kind[Kind.CPU])
    n_gpu = total - n_cpu
    gpu_pods = total - len(by_kind[Kind.CPU])

    def count(key: str, have: int) -> int:
        share = mix.share(key)
        if share is not None:
            return round(share * n_gpu)
        return round(have * n_gpu / gpu_pods) if gpu_pods else 0

    n_share = count("gpushare", len(by_kind[Kind.SHARE]))
    n_multi = count("multigpu", len(multi))
    n_whole = n_gpu - n_share - n_multi
    if n_whole < 0:
        raise MixError(f"mix {mix.text!r}: gpushare and multigpu add up to more than all GPU pods")
    out = (
        _resize(by_kind[Kind.CPU], n_cpu, rng, "CPU-only")
        + _resize(by_kind[Kind.SHARE], n_share, rng, "fractional-GPU")
        + _resize(by_kind[Kind.WHOLE], n_whole, rng, "whole single-GPU")
        + _resize(multi, n_multi, rng, "multi-GPU")
    )
    for key, constrain in (("gpuspec", _constrain), ("pinned", _pin)):
        spec_share = mix.share(key)
        if spec_share:
            gpu_index = [i for i, p in enumerate(out) if p.num_gpu and not p.gpu_spec]
            chosen = rng.sample(gpu_index, min(len(gpu_index), round(spec_share * n_gpu)))
            for i in sorted(chosen):
                out[i] = constrain(out[i], nodes, rng)
    return tuple(out)


def mix_summary(pods: Sequence[TracePod]) -> dict[str, float]:
    """The shares a mix is defined by, measured on a pod list."""
    gpu = [p for p in pods if p.num_gpu]
    n = len(gpu) or 1
    return {
        "cpu": (len(pods) - len(gpu)) / (len(pods) or 1),
        "gpushare": sum(p.request.kind is Kind.SHARE for p in gpu) / n,
        "multigpu": sum(p.num_gpu > 1 for p in gpu) / n,
        "gpuspec": sum(bool(p.gpu_spec) for p in gpu) / n,
    }
