"""Readers for the Alibaba GPU trace 2023 ("openb"): the node list and the pod lists.

Every column is read and checked; a bad row raises `TraceError` naming the file and line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpuctl.core.model import MILLI_PER_GPU
from gpuctl.core.packing import PodRequest
from gpuctl.sim.cluster import NodeCapacity

NODE_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")
POD_COLUMNS = (
    "name",
    "cpu_milli",
    "memory_mib",
    "num_gpu",
    "gpu_milli",
    "gpu_spec",
    "qos",
    "pod_phase",
    "creation_time",
    "deletion_time",
    "scheduled_time",
)
# Some of the trace's pod lists carry only these; the rest read as empty (no model
# constraint, no times: the protocol's arrival order does not use them).
REQUIRED_POD_COLUMNS = POD_COLUMNS[:5]
MAX_GPUS_PER_NODE = 8


class TraceError(ValueError):
    """A trace file that cannot be read as the format says; the message names file and line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceNode:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str

    def capacity(self) -> NodeCapacity:
        return NodeCapacity(
            name=self.name,
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
            gpus=self.gpus,
            model=self.model,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TracePod:
    """One row of a pod list; `gpu_milli` as written (see `request` for how it is read)."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...] = ()  # allowed GPU models; () = any; binds GPU pods only
    qos: str = ""
    pod_phase: str = ""
    creation_time: int | None = None
    deletion_time: int | None = None
    scheduled_time: int | None = None

    @property
    def request(self) -> PodRequest:
        """What the pod takes: per-GPU milli 0 without GPUs and 1000 with several; the model
        constraint applies to GPU pods only."""
        return PodRequest.normalised(
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
            num_gpu=self.num_gpu,
            gpu_milli=self.gpu_milli,
            gpu_models=self.gpu_spec,
        )

    @property
    def gpu_spec_text(self) -> str:
        return "|".join(self.gpu_spec)


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            missing = [c for c in columns if c not in header]
            if missing:
                raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)}")
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise TraceError(
                        f"{path}:{reader.line_num}: expected {len(header)} fields, "
                        f"got a row of a different length"
                    )
                yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise TraceError(f"{path}: {e}") from e


def _int(
    path: Path, line: int, row: dict[str, str], column: str, lo: int, hi: int | None = None
) -> int:
    text = row[column].strip()
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: {column} must be an integer, got {text!r}") from None
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise TraceError(f"{path}:{line}: {column} must be {bound}, got {value}")
    return value


def _time(path: Path, line: int, row: dict[str, str], column: str) -> int | None:
    return _int(path, line, row, column, lo=-(2**62)) if row[column].strip() else None


def read_nodes(path: str | Path) -> tuple[TraceNode, ...]:
    """The node list (`sn,cpu_milli,memory_mib,gpu,model`), in file order."""
    path = Path(path)
    nodes: list[TraceNode] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path, NODE_COLUMNS):
        name = row["sn"].strip()
        if not name:
            raise TraceError(f"{path}:{line}: sn (node name) is empty")
        if name in seen:
            raise TraceError(f"{path}:{line}: node {name!r} already on line {seen[name]}")
        seen[name] = line
        gpus = _int(path, line, row, "gpu", 0, MAX_GPUS_PER_NODE)
        model = row["model"].strip()
        if gpus and not model:
            raise TraceError(f"{path}:{line}: node {name!r} has {gpus} GPUs but no model")
        nodes.append(
            TraceNode(
                name=name,
                cpu_milli=_int(path, line, row, "cpu_milli", 0),
                memory_mib=_int(path, line, row, "memory_mib", 0),
                gpus=gpus,
                model=model,
            )
        )
    if not nodes:
        raise TraceError(f"{path}: no nodes")
    return tuple(nodes)


def read_pods(path: str | Path) -> tuple[TracePod, ...]:
    """A pod list (`name,cpu_milli,memory_mib,num_gpu,gpu_milli`, then optionally
    `gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time`), in file order."""
    path = Path(path)
    pods: list[TracePod] = []
    seen: dict[str, int] = {}
    for line, found in _rows(path, REQUIRED_POD_COLUMNS):
        row = {c: found.get(c, "") for c in POD_COLUMNS}
        name = row["name"].strip()
        if not name:
            raise TraceError(f"{path}:{line}: name is empty")
        if name in seen:
            raise TraceError(f"{path}:{line}: pod {name!r} already on line {seen[name]}")
        seen[name] = line
        num_gpu = _int(path, line, row, "num_gpu", 0, MAX_GPUS_PER_NODE)
        gpu_milli = _int(path, line, row, "gpu_milli", 0, MILLI_PER_GPU)
        if num_gpu == 1 and gpu_milli == 0:
            raise TraceError(f"{path}:{line}: a 1-GPU pod needs gpu_milli 1..1000, got 0")
        spec_text = row["gpu_spec"].strip()
        spec = tuple(m.strip() for m in spec_text.split("|")) if spec_text else ()
        if any(not m for m in spec):
            raise TraceError(f"{path}:{line}: gpu_spec {spec_text!r} has an empty model name")
        pods.append(
            TracePod(
                name=name,
                cpu_milli=_int(path, line, row, "cpu_milli", 0),
                memory_mib=_int(path, line, row, "memory_mib", 0),
                num_gpu=num_gpu,
                gpu_milli=gpu_milli,
                gpu_spec=spec,
                qos=row["qos"].strip(),
                pod_phase=row["pod_phase"].strip(),
                creation_time=_time(path, line, row, "creation_time"),
                deletion_time=_time(path, line, row, "deletion_time"),
                scheduled_time=_time(path, line, row, "scheduled_time"),
            )
        )
    if not pods:
        raise TraceError(f"{path}: no pods")
    return tuple(pods)
