"""How figures read to people, everywhere gpuctl prints them (CLI, web page, violations)."""

from __future__ import annotations

from gpuctl.core.model import JobKind, JobSpec


def plain_number(value: float) -> str:
    """A number as people write it: 1000000, not 1e+06; 0.5; 1e+20 only past 15 digits."""
    if isinstance(value, int):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def age(seconds: float) -> str:
    """A span as kubectl's AGE reads: 45s, 12m, 3h5m, 2d4h (never negative)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def job_size(spec: JobSpec) -> str:
    """What a job asks for: "2 node(s) x 8 GPU(s)", "3 replica(s) x 500m of a GPU"."""
    if spec.kind is JobKind.TRAINING:
        return f"{spec.num_nodes} node(s) x {spec.gpus_per_node} GPU(s)"
    each = f"{spec.gpu_milli}m of a GPU" if spec.gpu_milli else f"{spec.gpus_per_node} GPU(s)"
    return f"{spec.replicas} replica(s) x {each}"
