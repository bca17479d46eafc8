"""The trace simulator's cluster: free capacity of every node as numpy arrays (`ClusterState`),
the packing policies that place one pod at a time on it (`PackingPolicy`), and gpuctl's own
packing on that model (`GpuctlPacking`), whose figures the daemon's `frag-aware` score
computes node by node (`core.packing.ReplicaLoss`; a property test holds them together).
The published baselines are in `gpuctl.sim.baselines`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from gpuctl.core.model import MILLI_PER_GPU
from gpuctl.core.packing import Fragmentation, Kind, PodRequest, Stranding, Workload, contention

# The published BestFit normalises by these constants, not by the node's own capacity.
BESTFIT_CPU_SCALE = 128_000
BESTFIT_GPU_SCALE = 8_000


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeCapacity:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str = ""


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a request goes: a node (its index in the state) and (GPU index, milli) pairs."""

    node: int
    gpus: tuple[tuple[int, int], ...] = ()


class ClusterState:
    """Free capacity of every node as numpy arrays, nodes sorted by name.

    Row i is node `names[i]`; `gpu_free[i, j]` is the free milli of its GPU j, 0 for a GPU the
    node does not have (every GPU request asks for at least 1 milli, so an absent GPU never
    fits). `version[i]` is the bind count at which node i last changed, so a policy can cache
    per-node figures and recompute only the nodes that changed.
    """

    __slots__ = (
        "cpu_cap",
        "cpu_free",
        "epoch",
        "gpu_count",
        "gpu_free",
        "mem_cap",
        "mem_free",
        "model_of",
        "models",
        "names",
        "step",
        "version",
    )

    def __init__(self, nodes: Sequence[NodeCapacity]) -> None:
        ordered = sorted(nodes, key=lambda n: n.name)
        names = [n.name for n in ordered]
        if len(set(names)) != len(names):
            dup = next(a for a, b in itertools.pairwise(names) if a == b)
            raise ValueError(f"node {dup!r} given twice")
        width = max((n.gpus for n in ordered), default=0) or 1
        self.names: tuple[str, ...] = tuple(names)
        self.models: tuple[str, ...] = tuple(sorted({n.model for n in ordered}))
        index = {m: i for i, m in enumerate(self.models)}
        self.model_of = np.array([index[n.model] for n in ordered], dtype=np.int64)
        self.gpu_count = np.array([n.gpus for n in ordered], dtype=np.int64)
        self.gpu_free = np.zeros((len(ordered), width), dtype=np.int64)
        self.gpu_free[np.arange(width)[None, :] < self.gpu_count[:, None]] = MILLI_PER_GPU
        self.cpu_cap = np.array([n.cpu_milli for n in ordered], dtype=np.int64)
        self.mem_cap = np.array([n.memory_mib for n in ordered], dtype=np.int64)
        self.cpu_free = self.cpu_cap.copy()
        self.mem_free = self.mem_cap.copy()
        self.version = np.zeros(len(ordered), dtype=np.int64)
        self.step = 0
        self.epoch = object()  # identifies this state's history for caches

    def __len__(self) -> int:
        return len(self.names)

    @property
    def width(self) -> int:
        return self.gpu_free.shape[1]

    def copy(self) -> ClusterState:
        other = object.__new__(ClusterState)
        for slot in ClusterState.__slots__:
            value = getattr(self, slot)
            setattr(other, slot, value.copy() if isinstance(value, np.ndarray) else value)
        other.epoch = object()
        return other

    def set_free(
        self, node: int, *, gpu_free: Sequence[int], cpu_free: int, memory_free: int
    ) -> None:
        """Overwrite what node `node` has free (the daemon builds states from its snapshot)."""
        if len(gpu_free) != self.gpu_count[node]:
            raise ValueError(f"node {self.names[node]} has {self.gpu_count[node]} GPUs")
        row = np.zeros(self.width, dtype=np.int64)
        row[: len(gpu_free)] = gpu_free
        self.gpu_free[node] = row
        self.cpu_free[node] = cpu_free
        self.mem_free[node] = memory_free
        self._touch(node)

    def _touch(self, node: int) -> None:
        self.step += 1
        self.version[node] = self.step

    def model_allowed(self, models: tuple[str, ...]) -> np.ndarray:
        """Per node: its GPU model is one of `models` (all nodes when `models` is empty)."""
        if not models:
            return np.ones(len(self), dtype=bool)
        ok = np.array([m in models for m in self.models], dtype=bool)
        return ok[self.model_of] if len(self.models) else np.zeros(len(self), dtype=bool)

    def feasible(self, request: PodRequest, nodes: np.ndarray | None = None) -> np.ndarray:
        """Per node (or per node of `nodes`): the request fits there now."""
        sel = slice(None) if nodes is None else nodes
        ok = (self.cpu_free[sel] >= request.cpu_milli) & (self.mem_free[sel] >= request.memory_mib)
        if request.num_gpu:
            ok &= self.model_allowed(request.gpu_models)[sel]
            free = self.gpu_free[sel]
            if request.kind is Kind.SHARE:
                ok &= (free >= request.gpu_milli).any(axis=1)
            else:
                ok &= (free == MILLI_PER_GPU).sum(axis=1) >= request.num_gpu
        return ok

    def whole_gpus(self, node: int, count: int) -> tuple[int, ...]:
        """The `count` lowest-index fully free GPUs of `node`."""
        return tuple(int(g) for g in np.flatnonzero(self.gpu_free[node] == MILLI_PER_GPU)[:count])

    def tightest_gpu(self, node: int, milli: int) -> int:
        """The GPU of `node` with the least free milli that still fits `milli`, lowest index
        on ties; -1 when none fits."""
        row = self.gpu_free[node]
        fits = row >= milli
        if not fits.any():
            return -1
        return int(np.argmin(np.where(fits, row, np.iinfo(np.int64).max)))

    def bind(self, request: PodRequest, choice: Choice) -> None:
        """Take `request` on `choice`; ValueError (and no change) when it does not fit."""
        n = choice.node
        name = self.names[n]
        if request.cpu_milli > self.cpu_free[n] or request.memory_mib > self.mem_free[n]:
            raise ValueError(f"{request} does not fit the CPU/memory free on {name}")
        if request.num_gpu:
            if not self.model_allowed(request.gpu_models)[n]:
                raise ValueError(f"{name} has {self.models[self.model_of[n]]} GPUs, not {request}")
            gpus = [g for g, _ in choice.gpus]
            if len(set(gpus)) != request.num_gpu or any(
                m != request.gpu_milli for _, m in choice.gpus
            ):
                raise ValueError(f"{choice} does not match {request}")
            for g in gpus:
                if not 0 <= g < self.gpu_count[n] or self.gpu_free[n, g] < request.gpu_milli:
                    raise ValueError(f"GPU {g} of {name} cannot take {request.gpu_milli} milli")
            for g in gpus:
                self.gpu_free[n, g] -= request.gpu_milli
        elif choice.gpus:
            raise ValueError(f"a CPU request takes no GPU, got {choice}")
        self.cpu_free[n] -= request.cpu_milli
        self.mem_free[n] -= request.memory_mib
        self._touch(n)

    @property
    def used_gpu_milli(self) -> int:
        return int(self.gpu_count.sum() * MILLI_PER_GPU - self.gpu_free.sum())


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyContext:
    """What a policy is built with: the workload seen, and a seed for its own randomness."""

    workload: Workload = field(default_factory=Workload)
    seed: int = 0


class PackingPolicy(Protocol):
    """Places one request on a state: a `Choice`, or None when it fits nowhere."""

    name: ClassVar[str]

    def place(self, state: ClusterState, request: PodRequest) -> Choice | None: ...


def gpus_for(state: ClusterState, node: int, request: PodRequest, gpu: int) -> Choice:
    if request.kind is Kind.CPU:
        return Choice(node)
    if request.kind is Kind.SHARE:
        return Choice(node, ((gpu, request.gpu_milli),))
    return Choice(node, tuple((g, MILLI_PER_GPU) for g in state.whole_gpus(node, request.num_gpu)))


def bestfit_scores(state: ClusterState, request: PodRequest) -> np.ndarray:
    """The published BestFit score of every node (feasible or not), truncated to an int."""
    cpu_left = (state.cpu_free - request.cpu_milli).astype(np.float64)
    gpu_left = (state.gpu_free.sum(axis=1) - request.milli).astype(np.float64)
    # Evaluated in the published order, so float truncation lands where upstream's does.
    raw = 100.0 * (1.0 - 0.5 * cpu_left / BESTFIT_CPU_SCALE - 0.5 * gpu_left / BESTFIT_GPU_SCALE)
    return np.trunc(raw).astype(np.int64)


# -- FGD's fragmentation of a cluster state -------------------------------------------------


class StateFragmentation(Fragmentation):
    """`Fragmentation` of the nodes of one `ClusterState`, asked by node index."""

    def __init__(self, workload: Workload, state: ClusterState, *, foreign: bool = True) -> None:
        super().__init__(workload, foreign=foreign)
        # (N, M): the node's GPU model suits the type; fixed for the state's life.
        self.model_ok = self.models_ok(state.models)[state.model_of]

    def expected(self, gpu_free: np.ndarray, cpu_free: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Expected fragmentation of states (R, W) with CPU (R,) on `nodes` (R,) -> (R,)."""
        return self.expected_on(gpu_free, cpu_free, self.model_ok[nodes])

    def after(self, state: ClusterState, nodes: np.ndarray, request: PodRequest) -> np.ndarray:
        """Expected fragmentation of `nodes` after taking `request`, per candidate GPU
        (R, W) for a share, (R, 1) otherwise; the candidate's state may not be feasible."""
        free = state.gpu_free[nodes]
        cpu = state.cpu_free[nodes] - request.cpu_milli
        if request.kind is Kind.SHARE:
            w = free.shape[1]
            cand = np.repeat(free[:, None, :], w, axis=1)  # (R, W, W): candidate g takes from g
            cand[:, np.arange(w), np.arange(w)] -= request.gpu_milli
            flat = cand.reshape(-1, w)
            e = self.expected(flat, np.repeat(cpu, w), np.repeat(nodes, w))
            return e.reshape(len(nodes), w)
        if request.kind is Kind.WHOLE:
            whole = free == MILLI_PER_GPU
            take = whole & (np.cumsum(whole, axis=1) <= request.num_gpu)
            free = np.where(take, 0, free)
        return self.expected(free, cpu, nodes)[:, None]


@dataclass(slots=True)
class _Cached:
    seen: int  # the state's step when these figures were computed
    key: np.ndarray  # (N,) per node, lower is better; _NEVER where the request does not fit
    gpu: np.ndarray  # (N,) the GPU a share takes there, -1 otherwise


_NEVER = np.iinfo(np.int64).max


class KeyedPolicy:
    """Shared machinery of the fragmentation-aware policies: per request shape, an int64 key
    per node (lower is better) and the GPU a share would take there.

    A node's key depends on that node alone, so the keys of a shape are cached and only the
    nodes that changed since the shape was last placed are recomputed: one bind changes one
    node, and a trace has a few hundred shapes.
    """

    name: ClassVar[str]

    def __init__(self, context: PolicyContext) -> None:
        self._workload = context.workload
        self._epoch: object = None
        self._frag: StateFragmentation | None = None
        self._base: _Cached | None = None
        self._by_shape: dict[PodRequest, _Cached] = {}

    foreign: ClassVar[bool] = True  # see Fragmentation

    def _sync(self, state: ClusterState) -> StateFragmentation:
        if self._epoch is not state.epoch or self._frag is None:
            self._epoch = state.epoch
            self._frag = StateFragmentation(self._workload, state, foreign=self.foreign)
            self._base = None
            self._by_shape = {}
            self._prepare(state)
        return self._frag

    def _prepare(self, state: ClusterState) -> None:
        """Per-state figures a policy needs beyond the fragmentation (a new state began)."""

    @staticmethod
    def _dirty(state: ClusterState, cached: _Cached | None) -> np.ndarray:
        if cached is None:
            return np.arange(len(state))
        return np.flatnonzero(state.version > cached.seen)

    def fragmentation(self, state: ClusterState) -> np.ndarray:
        """Expected fragmentation of every node now."""
        frag = self._sync(state)
        cached = self._base
        nodes = self._dirty(state, cached)
        if cached is None:
            n = len(state)
            cached = self._base = _Cached(-1, np.zeros(n, dtype=np.int64), np.full(n, -1))
        if len(nodes):
            cached.key[nodes] = frag.expected(state.gpu_free[nodes], state.cpu_free[nodes], nodes)
        cached.seen = state.step
        return cached.key

    def keys(self, state: ClusterState, request: PodRequest) -> tuple[np.ndarray, np.ndarray]:
        """(key per node, GPU per node) for `request`; the key is _NEVER where it does not fit."""
        frag = self._sync(state)
        before = self.fragmentation(state)
        cached = self._by_shape.get(request)
        dirty = self._dirty(state, cached)
        if cached is None:
            n = len(state)
            cached = self._by_shape[request] = _Cached(
                -1, np.full(n, _NEVER, dtype=np.int64), np.full(n, -1)
            )
        if len(dirty):
            cached.key[dirty] = _NEVER
            nodes = dirty[state.feasible(request, dirty)]
            if len(nodes):
                growth = frag.after(state, nodes, request) - before[nodes, None]
                if request.kind is Kind.SHARE:
                    fits = state.gpu_free[nodes] >= request.gpu_milli
                else:
                    fits = np.ones(growth.shape, dtype=bool)
                key = np.where(fits, self._node_keys(state, nodes, request, growth), _NEVER)
                gpu = np.argmin(key, axis=1)  # lowest index among a node's best GPUs
                cached.key[nodes] = key[np.arange(len(nodes)), gpu]
                cached.gpu[nodes] = gpu if request.kind is Kind.SHARE else -1
        cached.seen = state.step
        return cached.key, cached.gpu

    def _node_keys(
        self, state: ClusterState, nodes: np.ndarray, request: PodRequest, growth: np.ndarray
    ) -> np.ndarray:
        """Keys (R, C) of the candidates of `nodes` from the growth of their expected
        fragmentation (R, C); C is the node's GPUs for a share, 1 otherwise."""
        raise NotImplementedError

    def _pick(self, best: np.ndarray) -> int:
        """The node among `best` (node indices with the lowest key, ascending)."""
        return int(best[0])  # the smallest name: rows are sorted by name

    def place(self, state: ClusterState, request: PodRequest) -> Choice | None:
        key, gpu = self.keys(state, request)
        lowest = key.min()
        if lowest == _NEVER:
            return None
        node = self._pick(np.flatnonzero(key == lowest))
        return gpus_for(state, node, request, int(gpu[node]))


class GpuctlPacking(KeyedPolicy):
    """gpuctl's default: FGD's fragmentation growth plus the GPU capacity the placement
    strands behind CPU or memory, then the tightest GPU, then best fit.

    Stranding (`core.packing.Stranding`): a node can use only as much of its free GPU as its
    free CPU and memory can feed at the ratios of the workload's GPU pods (CPU and memory
    asked per milli-GPU asked); the rest is stranded. One stranded milli-GPU counts as one
    milli of expected fragmentation: both are capacity the workload seen cannot use. FGD
    sees CPU only when a task type stops fitting outright, so it fills a GPU-dense node's
    CPU with CPU-only pods;
    this term sends those to CPU-rich nodes, and GPU-heavy pods to GPU-dense nodes. (Ratios
    over all pods, CPU-only ones too, call GPU-dense nodes stranded while still empty and
    reward breaking them up: measured, that drops the 8-GPU pods of a multi-GPU mix.)

    Unlike FGD, a node whose GPU model a constrained type does not allow counts no
    fragmentation for that type (`foreign = False`), so unconstrained pods are not pushed
    onto the scarce models that constrained pods need.
    """

    name: ClassVar[str] = "gpuctl"
    foreign: ClassVar[bool] = False

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self._stranding = Stranding(context.workload)
        self._pods = self._stranding.pods
        self._excess = np.zeros(0)

    def _prepare(self, state: ClusterState) -> None:
        capacity = np.zeros(len(state.models))
        np.add.at(capacity, state.model_of, state.gpu_count)
        self._excess = contention(self._workload, state.models, capacity)

    def excess(self, state: ClusterState) -> dict[str, float]:
        """Each GPU model's `contention` in `state`, by name."""
        self._sync(state)
        return dict(zip(state.models, self._excess.tolist(), strict=True))

    def lost(
        self, state: ClusterState, nodes: np.ndarray, request: PodRequest, growth: np.ndarray
    ) -> np.ndarray:
        """Milli-GPU of capacity the workload loses per candidate (R, C): fragmentation
        growth per pod of the workload, plus GPU newly stranded, plus the capacity taken from
        models that pinned demand needs more than the rest (`core.packing.contention`),
        rounded (1 milli apart is a true tie)."""
        gpu = state.gpu_free[nodes].sum(axis=1)
        cpu, mem = state.cpu_free[nodes], state.mem_free[nodes]
        stranding = self._stranding.stranded(
            gpu - request.milli, cpu - request.cpu_milli, mem - request.memory_mib
        ) - self._stranding.stranded(gpu, cpu, mem)
        lost = growth / self._pods + stranding[:, None]
        if self._excess.any():
            lost = lost + (request.milli * self._excess[state.model_of[nodes]])[:, None]
        return np.rint(lost).astype(np.int64)

    def _node_keys(
        self, state: ClusterState, nodes: np.ndarray, request: PodRequest, growth: np.ndarray
    ) -> np.ndarray:
        lost = self.lost(state, nodes, request, growth)
        if request.kind is Kind.SHARE:
            left = state.gpu_free[nodes] - request.gpu_milli  # tightest GPU first
        else:
            left = np.zeros(growth.shape, dtype=np.int64)
        fit = np.clip(bestfit_scores(state, request)[nodes], 0, 100)
        return (lost * (MILLI_PER_GPU + 1) + np.clip(left, 0, MILLI_PER_GPU)) * 101 + (100 - fit)[
            :, None
        ]

    def loss_on(
        self, state: ClusterState, node: int, request: PodRequest, gpu: int | None = None
    ) -> int | None:
        """The capacity lost by placing `request` on `node` (a share on GPU `gpu`, or on the
        GPU this policy would pick); None when it does not fit there."""
        nodes = np.array([node])
        if not state.feasible(request, nodes)[0]:
            return None
        frag = self._sync(state)
        growth = frag.after(state, nodes, request) - self.fragmentation(state)[nodes, None]
        lost = self.lost(state, nodes, request, growth)[0]
        if request.kind is not Kind.SHARE:
            return int(lost[0])
        if gpu is None:
            gpu = int(self.keys(state, request)[1][node])
        if not 0 <= gpu < state.gpu_count[node] or state.gpu_free[node, gpu] < request.gpu_milli:
            return None
        return int(lost[gpu])
