"""GPU-share packing figures, pure (the standard library and numpy): the requests and workload
a packing is judged for, FGD's expected fragmentation (ATC'23), the GPU capacity stranded
behind CPU and memory, and gpuctl's packing loss, which the daemon's `frag-aware` score asks
of thousands of node states a cycle.

The trace simulator's cluster model and policies (`gpuctl.sim.cluster`: gpuctl's packing on
that model; `gpuctl.sim.baselines`: BestFit, RandomFit, FGD) are built on these figures, so
what is measured is what schedules.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gpuctl.core.model import MILLI_PER_GPU


class Kind(enum.Enum):
    CPU = "cpu"  # no GPU
    SHARE = "share"  # a share (< 1000 milli) of one GPU
    WHOLE = "whole"  # one or more whole GPUs on one node


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRequest:
    """What one pod (or inference replica) takes on its node.

    `gpu_milli` is per GPU and normalised as the trace protocol reads it: 0 for a CPU pod,
    1000 for a multi-GPU pod. `gpu_models` are the allowed GPU models (empty = any); they bind
    GPU pods only.
    """

    cpu_milli: int = 0
    memory_mib: int = 0
    num_gpu: int = 0
    gpu_milli: int = 0
    gpu_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.cpu_milli < 0 or self.memory_mib < 0 or self.num_gpu < 0:
            raise ValueError(f"negative request: {self}")
        if self.num_gpu and not 0 < self.gpu_milli <= MILLI_PER_GPU:
            raise ValueError(f"gpu_milli must be 1..1000 for a GPU request, got {self.gpu_milli}")
        if self.num_gpu > 1 and self.gpu_milli != MILLI_PER_GPU:
            raise ValueError(f"a {self.num_gpu}-GPU request takes whole GPUs, not {self.gpu_milli}")
        if not self.num_gpu and self.gpu_milli:
            raise ValueError(f"a CPU request takes no GPU milli, got {self.gpu_milli}")

    @classmethod
    def normalised(
        cls,
        *,
        cpu_milli: int,
        memory_mib: int,
        num_gpu: int,
        gpu_milli: int,
        gpu_models: Iterable[str] = (),
    ) -> PodRequest:
        """The request as the protocol reads a trace row: per-GPU milli 0 without GPUs, 1000
        with several, and no model constraint on a CPU pod."""
        if num_gpu == 0:
            gpu_milli, gpu_models = 0, ()
        elif num_gpu > 1:
            gpu_milli = MILLI_PER_GPU
        return cls(
            cpu_milli=cpu_milli,
            memory_mib=memory_mib,
            num_gpu=num_gpu,
            gpu_milli=gpu_milli,
            gpu_models=tuple(sorted(set(gpu_models))),
        )

    @property
    def kind(self) -> Kind:
        if not self.num_gpu:
            return Kind.CPU
        return Kind.SHARE if self.gpu_milli < MILLI_PER_GPU else Kind.WHOLE

    @property
    def milli(self) -> int:
        """GPU capacity taken in all, in milli-GPU."""
        return self.num_gpu * self.gpu_milli


# -- the workload a policy packs for -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """Task types and their popularity (pod counts) in the workload seen.

    A type is a request told apart by CPU, GPU count, per-GPU milli and allowed models (as
    FGD's "typical pods"); its memory is the mean over the type's pods (rounded).
    """

    types: tuple[tuple[PodRequest, int], ...] = ()

    @classmethod
    def of(cls, requests: Iterable[PodRequest]) -> Workload:
        return cls.counted((r, 1) for r in requests)

    @classmethod
    def counted(cls, requests: Iterable[tuple[PodRequest, int]]) -> Workload:
        """`of` for requests given with how many pods make each."""
        counts: Counter[tuple[int, int, int, tuple[str, ...]]] = Counter()
        memory: Counter[tuple[int, int, int, tuple[str, ...]]] = Counter()
        for r, n in requests:
            key = (r.num_gpu, r.gpu_milli, r.cpu_milli, r.gpu_models)
            counts[key] += n
            memory[key] += r.memory_mib * n
        types = []
        for (gpus, milli, cpu, models), n in counts.items():
            mean_memory = round(memory[(gpus, milli, cpu, models)] / n)
            shape = PodRequest(
                cpu_milli=cpu,
                memory_mib=mean_memory,
                num_gpu=gpus,
                gpu_milli=milli,
                gpu_models=models,
            )
            types.append((shape, n))
        types.sort(
            key=lambda tw: (
                -tw[1],
                tw[0].num_gpu,
                tw[0].gpu_milli,
                tw[0].cpu_milli,
                tw[0].gpu_models,
            )
        )
        return cls(tuple(types))


# -- fragmentation (FGD, ATC'23) -----------------------------------------------------------


class Fragmentation:
    """FGD's expected fragmentation of nodes for a workload, in milli-GPU x pod count.

    For one task type m, a node's fragmentation F(m) is the free GPU milli that m cannot use:
    all of it when m cannot run there at all (CPU, GPU model, too few GPUs with room, or m
    needs no GPU), else the free milli of the GPUs with less room than m's per-GPU share.
    The expected fragmentation is the sum of F(m) weighted by m's popularity (pod count, so
    the figures are exact integers and ties are true ties).

    With `foreign=False` a type whose allowed GPU models the node does not have counts
    nothing there instead of all of the node's free milli: such a node is not fragmented
    for that type, it is simply not its node. (FGD's rule rewards putting any pod on nodes
    many constrained types cannot use, which starves the types that can only use them.)
    """

    def __init__(self, workload: Workload, *, foreign: bool = True) -> None:
        self.foreign = foreign
        gpu_types = [(t, w) for t, w in workload.types if t.num_gpu]
        cpu_weight = sum(w for t, w in workload.types if not t.num_gpu)
        self.cpu_weight = np.int64(cpu_weight)
        thresholds = sorted({t.gpu_milli for t, _ in gpu_types})
        self.thresholds = np.array(thresholds, dtype=np.int64)  # (K,)
        where = {d: i for i, d in enumerate(thresholds)}
        self.type_threshold = np.array([where[t.gpu_milli] for t, _ in gpu_types], dtype=np.int64)
        self.type_gpus = np.array([t.num_gpu for t, _ in gpu_types], dtype=np.int64)  # (M,)
        self.type_cpu = np.array([t.cpu_milli for t, _ in gpu_types], dtype=np.int64)
        self.weights = np.array([w for _, w in gpu_types], dtype=np.int64)
        self.total_weight = int(self.weights.sum()) + cpu_weight
        # The same as plain Python numbers, for one state at a time (`expected_one`).
        self._cpu_weight = cpu_weight
        self._thresholds = thresholds
        self._types = list(
            zip(
                self.type_threshold.tolist(),
                self.type_gpus.tolist(),
                self.type_cpu.tolist(),
                self.weights.tolist(),
                strict=True,
            )
        )
        self._type_models = [t.gpu_models for t, _ in gpu_types]

    def models_ok(self, models: Sequence[str]) -> np.ndarray:
        """(len(models), M): GPU model i suits type m."""
        return np.array(
            [[not allowed or m in allowed for allowed in self._type_models] for m in models],
            dtype=bool,
        ).reshape(len(models), len(self._type_models))

    def expected_one(self, gpu_free: Sequence[int], cpu_free: int, model_ok: Sequence[bool]) -> int:
        """`expected_on` of one state in plain Python."""
        total = sum(gpu_free)
        out = total * self._cpu_weight
        if not self._types:
            return out
        stuck = [sum([f for f in gpu_free if f < t]) for t in self._thresholds]
        room = [sum([1 for f in gpu_free if f >= t]) for t in self._thresholds]
        for (k, gpus, cpu, weight), ok in zip(self._types, model_ok, strict=True):
            if ok:
                out += weight * (stuck[k] if room[k] >= gpus and cpu_free >= cpu else total)
            elif self.foreign:
                out += weight * total
        return out

    def expected_on(
        self, gpu_free: np.ndarray, cpu_free: np.ndarray, model_ok: np.ndarray
    ) -> np.ndarray:
        """Expected fragmentation of states (R, W) with CPU (R,) on nodes whose GPU model suits
        the types as `model_ok` (R, M) -> (R,)."""
        total = gpu_free.sum(axis=1)
        out = total * self.cpu_weight
        if not len(self.weights):
            return out
        below = gpu_free[:, None, :] < self.thresholds[None, :, None]  # (R, K, W)
        stuck = (gpu_free[:, None, :] * below).sum(axis=2)  # (R, K): milli on too-full GPUs
        room = (~below).sum(axis=2)  # (R, K): GPUs with room (an absent GPU has 0 free)
        runs = (
            (room[:, self.type_threshold] >= self.type_gpus[None, :])
            & (cpu_free[:, None] >= self.type_cpu[None, :])
            & model_ok
        )  # (R, M)
        frag = np.where(runs, stuck[:, self.type_threshold], total[:, None])
        if not self.foreign:
            frag = np.where(model_ok, frag, 0)
        return out + frag @ self.weights


class Stranding:
    """Free GPU capacity that free CPU and memory cannot feed, at the ratios of the
    workload's GPU pods (CPU and memory asked per milli-GPU asked): gpuctl's packing counts
    one stranded milli-GPU as one milli of expected fragmentation, both being capacity the
    workload seen cannot use (`ReplicaLoss`; the simulator's `GpuctlPacking`)."""

    def __init__(self, workload: Workload) -> None:
        self.pods = max(1, sum(w for _, w in workload.types))
        types = [(t, w) for t, w in workload.types if t.num_gpu]
        milli = sum(t.milli * w for t, w in types)
        # CPU milli and memory MiB the GPU pods ask per milli-GPU they ask (0: no limit).
        self._cpu_per_milli = sum(t.cpu_milli * w for t, w in types) / milli if milli else 0.0
        self._mem_per_milli = sum(t.memory_mib * w for t, w in types) / milli if milli else 0.0

    def stranded(
        self, gpu_free: np.ndarray, cpu_free: np.ndarray, mem_free: np.ndarray
    ) -> np.ndarray:
        """Free GPU milli that free CPU and memory cannot feed, at the workload's ratios."""
        usable = np.full(gpu_free.shape, np.inf)
        if self._cpu_per_milli > 0:
            usable = np.minimum(usable, np.maximum(cpu_free, 0) / self._cpu_per_milli)
        if self._mem_per_milli > 0:
            usable = np.minimum(usable, np.maximum(mem_free, 0) / self._mem_per_milli)
        return np.maximum(0.0, gpu_free - usable)

    def stranded_one(self, gpu_free: int, cpu_free: int, mem_free: int) -> float:
        """`stranded` of one node in plain Python."""
        usable = math.inf
        if self._cpu_per_milli > 0:
            usable = min(usable, max(cpu_free, 0) / self._cpu_per_milli)
        if self._mem_per_milli > 0:
            usable = min(usable, max(mem_free, 0) / self._mem_per_milli)
        return max(0.0, gpu_free - usable)


def contention(workload: Workload, models: Sequence[str], capacity: Sequence[float]) -> np.ndarray:
    """Per GPU model (`models`, with `capacity` in GPUs each): how much more of it the
    workload's model-constrained demand wants than the fleet's average model, as a share of
    what the model has.

    Each constrained type's GPU demand (milli x pods) is spread over the models it allows in
    proportion to their capacity; a model's pressure is its share of all GPU demand over its
    share of the capacity. Capacity a flexible request takes on a model whose pressure is
    above the average is capacity the pinned demand cannot get anywhere else, so the packing
    loss counts `milli x excess` for it (`Stranding`'s unit: a milli-GPU of capacity the
    workload cannot use). Demand pinned in proportion to capacity gives no excess anywhere,
    and a workload without constraints none at all."""
    caps = np.asarray(capacity, dtype=np.float64)
    out = np.zeros(len(caps))
    if not len(caps) or caps.sum() <= 0:
        return out
    demand = np.zeros(len(caps))
    total = 0.0
    for t, weight in workload.types:
        if not t.num_gpu:
            continue
        total += weight * t.milli
        if t.gpu_models:
            allowed = np.array([m in t.gpu_models for m in models], dtype=bool)
            room = caps[allowed].sum()
            if room > 0:
                demand[allowed] += weight * t.milli * caps[allowed] / room
    if total <= 0 or not demand.any():
        return out
    share = caps / caps.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        pressure = np.where(share > 0, (demand / total) / share, 0.0)
    return np.maximum(0.0, pressure - float((share * pressure).sum()))


def replica_workload(request: PodRequest) -> Workload:
    """What the daemon packs an inference replica for when it knows no trace: more replicas
    like this one, and requests of 1, 2, 4 and 8 whole GPUs (keep whole GPUs whole)."""
    whole = [PodRequest(num_gpu=n, gpu_milli=MILLI_PER_GPU) for n in (1, 2, 4, 8)]
    return Workload.of([request, request, *whole])


class ReplicaLoss:
    """gpuctl's packing loss (milli-GPU of capacity lost, lower is better) for one request on
    node states given as plain columns: what the daemon's frag-aware score asks of thousands
    of node states a cycle, without building a `ClusterState` for each question. The figures
    are the simulator's `GpuctlPacking`'s, node by node (a property test compares them)."""

    def __init__(
        self,
        request: PodRequest,
        workload: Workload | None = None,
        excess: Mapping[str, float] | None = None,
    ) -> None:
        self.request = request
        workload = workload or replica_workload(request)
        self._stranding = Stranding(workload)
        self._frag = Fragmentation(workload, foreign=False)
        self._excess = dict(excess or {})  # GPU model -> its `contention`
        self._models: dict[tuple[str, ...], np.ndarray] = {}
        self._rows: dict[str, tuple[bool, ...]] = {}

    def loss(
        self,
        gpu_free: Sequence[int],
        cpu_free: int,
        mem_free: int,
        model: str,
        gpu: int | None = None,
    ) -> int | None:
        """`losses` of one node state in plain Python (no numpy call's fixed cost): None
        when the request does not fit there."""
        r = self.request
        if cpu_free < r.cpu_milli or mem_free < r.memory_mib:
            return None
        after = list(gpu_free)
        if r.kind is Kind.SHARE:
            if gpu is None:
                raise ValueError("a share's loss needs the GPU it takes on the node")
            if not 0 <= gpu < len(after) or after[gpu] < r.gpu_milli:
                return None
            after[gpu] -= r.gpu_milli
        elif r.kind is Kind.WHOLE:
            whole = [i for i, m in enumerate(after) if m == MILLI_PER_GPU][: r.num_gpu]
            if len(whole) < r.num_gpu:
                return None
            for i in whole:
                after[i] = 0
        ok = self._model_row(model)
        frag = self._frag
        growth = frag.expected_one(after, cpu_free - r.cpu_milli, ok) - frag.expected_one(
            gpu_free, cpu_free, ok
        )
        total = sum(gpu_free)
        stranded = self._stranding.stranded_one
        stranding = stranded(
            total - r.milli, cpu_free - r.cpu_milli, mem_free - r.memory_mib
        ) - stranded(total, cpu_free, mem_free)
        pinned = r.milli * self._excess.get(model, 0.0)
        return round(growth / self._stranding.pods + stranding + pinned)

    def _model_row(self, model: str) -> tuple[bool, ...]:
        found = self._rows.get(model)
        if found is None:
            found = self._rows[model] = tuple(self._frag.models_ok((model,))[0].tolist())
        return found

    def model_ok(self, models: tuple[str, ...]) -> np.ndarray:
        """(len(models), M): which of the workload's types GPU model i suits."""
        found = self._models.get(models)
        if found is None:
            found = self._models[models] = self._frag.models_ok(models)
        return found

    def losses(
        self,
        gpu_free: np.ndarray,
        cpu_free: np.ndarray,
        mem_free: np.ndarray,
        model_ok: np.ndarray,
        gpu: np.ndarray | None = None,
        excess: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(fits, loss) per node state: free milli per GPU (R, W), free CPU and memory (R,),
        the types its model suits (R, M); for a share, the GPU it takes there (R,); the
        `contention` of its model (R,; None: none)."""
        r = self.request
        fits = (cpu_free >= r.cpu_milli) & (mem_free >= r.memory_mib)
        after = gpu_free
        if r.kind is Kind.SHARE:
            if gpu is None:
                raise ValueError("a share's loss needs the GPU it takes on each node")
            width = gpu_free.shape[1]
            g = np.clip(gpu, 0, max(0, width - 1))
            rows = np.arange(len(gpu_free))
            fits &= (gpu >= 0) & (gpu < width)
            if width:
                fits &= gpu_free[rows, g] >= r.gpu_milli
                after = gpu_free.copy()
                after[rows, g] -= r.gpu_milli
        elif r.kind is Kind.WHOLE:
            whole = gpu_free == MILLI_PER_GPU
            fits &= whole.sum(axis=1) >= r.num_gpu
            after = np.where(whole & (np.cumsum(whole, axis=1) <= r.num_gpu), 0, gpu_free)
        # after and before as one stack of 2R states: half the numpy calls
        n = len(gpu_free)
        cpu = np.concatenate((cpu_free - r.cpu_milli, cpu_free))
        expected = self._frag.expected_on(
            np.concatenate((after, gpu_free)), cpu, np.concatenate((model_ok, model_ok))
        )
        gpu_total = gpu_free.sum(axis=1)
        stranded = self._stranding.stranded(
            np.concatenate((gpu_total - r.milli, gpu_total)),
            cpu,
            np.concatenate((mem_free - r.memory_mib, mem_free)),
        )
        lost = (expected[:n] - expected[n:]) / self._stranding.pods + (stranded[:n] - stranded[n:])
        if excess is not None:
            lost = lost + r.milli * excess
        return fits, np.rint(lost).astype(np.int64)
