"""Per-GPU datasheet figures (gpu_specs.csv), and SKUs filled in from them.

The catalog builder reads the file from the shared source; configured SKUs (static inventory,
command providers) name a GPU model and get its figures from the copy packaged with gpuctl.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    model: str  # the `gpu` column, e.g. "H100 SXM"
    memory_gb: float  # nominal vendor GB
    hbm_gbps: float
    nvlink_gbps: float  # per GPU, total bidirectional; 0 = none (MI300X: Infinity Fabric)
    bf16_tflops: float  # dense; 0 where the GPU has no BF16 (T4, V100)


def _number(raw: str | None) -> float:
    return float(raw) if raw and raw.strip() else 0.0


def parse_gpu_specs(text: str) -> dict[str, GpuSpec]:
    """gpu_specs.csv, keyed by its `gpu` column."""
    return {
        row["gpu"]: GpuSpec(
            model=row["gpu"],
            memory_gb=_number(row["memory_gib"]),
            hbm_gbps=_number(row["hbm_gbps"]),
            nvlink_gbps=_number(row["nvlink_gbps_per_gpu"]),
            bf16_tflops=_number(row["bf16_dense_tflops"]),
        )
        for row in csv.DictReader(text.splitlines())
    }


@functools.cache
def packaged_gpu_specs() -> dict[str, GpuSpec]:
    """The copy of gpu_specs.csv shipped in gpuctl/data."""
    return parse_gpu_specs(
        importlib.resources.files("gpuctl").joinpath("data/gpu_specs.csv").read_text()
    )
