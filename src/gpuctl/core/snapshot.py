"""The per-cycle view of the cluster: free GPU milli, CPU and memory on every node, and the
jobs holding them (for time limits, priorities and fair share).

Built from the nodes and the jobs that hold resources; `assume` reserves a placement the
cycle has just made so later jobs see it, and `forget` is its idempotent undo (`hold` undoes
a forget). The same nodes as numpy columns (`table`, a `NodeTable`) are built on first use
and kept in step by all three.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.model import MILLI_PER_GPU, Gpu, Job, Node, NodeState, Placement, RankPlacement

_INDEX = operator.attrgetter("index")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeView:
    """One node as the cycle sees it: what is free now, and whose ranks it holds."""

    node: Node
    gpu_free_milli: tuple[int, ...]  # aligned with node.profile.gpus; 1000 = whole GPU free
    cpu_free_milli: int
    memory_free_mib: int
    ranks: tuple[tuple[int, int], ...] = ()  # (job id, ranks of that job here), by job id
    # Derived on first use, then kept: filters ask for it for every rank of every job they
    # try, while most views a cycle makes are never asked.
    _whole: tuple[Gpu, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.gpu_free_milli) != len(self.node.profile.gpus):
            raise ValueError(
                f"node {self.node.id}: {len(self.gpu_free_milli)} free figures for "
                f"{len(self.node.profile.gpus)} GPUs"
            )

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def schedulable(self) -> bool:
        return self.node.state is NodeState.READY

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        return self.node.profile.gpus

    @property
    def gpu_count(self) -> int:
        return len(self.node.profile.gpus)

    @property
    def free_gpu_milli(self) -> int:
        return sum(self.gpu_free_milli)

    @property
    def whole_free_gpus(self) -> tuple[Gpu, ...]:
        """GPUs with nothing on them, lowest index first."""
        whole = self._whole
        if whole is None:
            free = [g for g, m in zip(self.gpus, self.gpu_free_milli) if m == MILLI_PER_GPU]  # noqa: B905 (lengths checked)
            whole = tuple(sorted(free, key=_INDEX))
            object.__setattr__(self, "_whole", whole)
        return whole

    @property
    def idle(self) -> bool:
        """No job holds anything here."""
        return not self.ranks

    def ranks_of(self, job_id: int) -> int:
        return next((n for j, n in self.ranks if j == job_id), 0)

    def take(self, job_id: int, ranks: Sequence[RankPlacement]) -> NodeView:
        """This node with `ranks` of `job_id` added; ValueError when they do not fit."""
        free = list(self.gpu_free_milli)
        gpus = self.gpus
        position: dict[int, int] | None = None
        cpu, memory = self.cpu_free_milli, self.memory_free_mib
        for r in ranks:
            if r.node_id != self.id:
                raise ValueError(
                    f"job {job_id}: rank {r.rank} is for node {r.node_id}, not {self.id}"
                )
            indices = r.gpu_indices
            if indices:
                if len(indices) > 1 and len(set(indices)) != len(indices):
                    raise ValueError(f"job {job_id}: rank {r.rank} names a GPU twice: {indices}")
                if not 0 < r.gpu_milli <= MILLI_PER_GPU:
                    raise ValueError(
                        f"job {job_id}: rank {r.rank} takes {r.gpu_milli} milli per GPU"
                    )
            for index in indices:
                if 0 <= index < len(gpus) and gpus[index].index == index:
                    at = index  # GPUs listed in index order, as agents report them
                else:
                    if position is None:
                        position = {g.index: i for i, g in enumerate(gpus)}
                    if index not in position:
                        raise ValueError(f"job {job_id}: node {self.id} has no GPU {index}")
                    at = position[index]
                if free[at] < r.gpu_milli:
                    raise ValueError(
                        f"job {job_id}: GPU {index} of node {self.id} has "
                        f"{free[at]} milli free, rank {r.rank} needs {r.gpu_milli}"
                    )
                free[at] -= r.gpu_milli
            # A dimension the rank does not ask for is not checked: a node a running job
            # already oversubscribes (it re-registered smaller) can still take a rank that
            # needs none of that resource.
            if r.cpu_milli > cpu or r.memory_mib > memory:
                raise ValueError(
                    f"job {job_id}: node {self.id} has {cpu} cpu-milli and {memory} MiB free, "
                    f"rank {r.rank} needs {r.cpu_milli} and {r.memory_mib}"
                )
            cpu -= r.cpu_milli
            memory -= r.memory_mib
        held = self.ranks
        if not held or held[-1][0] < job_id:  # ids ascending: the new job goes last
            held = (*held, (job_id, len(ranks)))
        else:
            counts = dict(held)
            counts[job_id] = counts.get(job_id, 0) + len(ranks)
            held = tuple(sorted(counts.items()))
        return NodeView(
            node=self.node,
            gpu_free_milli=tuple(free),
            cpu_free_milli=cpu,
            memory_free_mib=memory,
            ranks=held,
        )


def empty_view(node: Node) -> NodeView:
    """`node` with nothing on it."""
    return _view(node, {})


def _view(node: Node, held: Mapping[int, Sequence[RankPlacement]]) -> NodeView:
    """`node` with the ranks in `held` subtracted, never below zero."""
    gpus = node.profile.gpus
    if not held:
        return NodeView(
            node=node,
            gpu_free_milli=(MILLI_PER_GPU,) * len(gpus),
            cpu_free_milli=max(0, node.cpu_milli),
            memory_free_mib=max(0, node.memory_mib),
        )
    free = [MILLI_PER_GPU] * len(gpus)
    position = {g.index: i for i, g in enumerate(gpus)}
    cpu, memory = node.cpu_milli, node.memory_mib
    for ranks in held.values():
        for r in ranks:
            for index in r.gpu_indices:
                if index in position:  # a GPU the node no longer reports holds nothing we place on
                    free[position[index]] -= r.gpu_milli
            cpu -= r.cpu_milli
            memory -= r.memory_mib
    return NodeView(
        node=node,
        gpu_free_milli=tuple([m if m > 0 else 0 for m in free]),
        cpu_free_milli=max(0, cpu),
        memory_free_mib=max(0, memory),
        ranks=tuple(sorted([(j, len(rs)) for j, rs in held.items()])),
    )


def _by_node(placement: Placement) -> dict[str, tuple[RankPlacement, ...]]:
    out: dict[str, list[RankPlacement]] = {}
    for r in placement.ranks:
        out.setdefault(r.node_id, []).append(r)
    return {node_id: tuple(ranks) for node_id, ranks in out.items()}


class Snapshot:
    """What is free where, for one cycle.

    The one mutable object of a cycle (like the framework's per-cycle snapshot): `assume`
    and `forget` change it, the `NodeView`s it hands out never change.
    """

    __slots__ = ("_held", "_jobs", "_on_node", "_order", "_staged", "_table", "_views")

    def __init__(
        self,
        views: dict[str, NodeView],
        on_node: dict[str, dict[int, tuple[RankPlacement, ...]]],
        held: dict[int, Placement],
        jobs: dict[int, Job] | None = None,
        *,
        order: tuple[str, ...] | None = None,
        table: NodeTable | None = None,
    ) -> None:
        self._views = views
        # Each node's dict is replaced, never changed in place, so copies can share them.
        self._on_node = on_node
        self._held = held
        self._jobs = jobs if jobs is not None else {}
        self._order = order if order is not None else tuple(sorted(views))
        self._table = table
        self._staged: tuple[Placement, Mapping[str, NodeView]] | None = None

    @property
    def table(self) -> NodeTable:
        """The nodes as columns (built on first use, then kept in step by assume and forget)."""
        if self._table is None:
            self._table = NodeTable.of(self.nodes)
        return self._table

    @classmethod
    def build(cls, nodes: Sequence[Node], running: Sequence[Job]) -> Snapshot:
        """The cluster as `nodes` with every job that holds resources taking its placement."""
        on_node: dict[str, dict[int, tuple[RankPlacement, ...]]] = {}
        for n in nodes:
            if n.id in on_node:
                raise ValueError(f"node {n.id} given twice")
            on_node[n.id] = {}
        held: dict[int, Placement] = {}
        jobs: dict[int, Job] = {}
        for job in running:
            if not job.state.holds_resources or job.placement is None:
                continue
            if job.id in held:
                raise ValueError(f"job {job.id} given twice")
            held[job.id] = job.placement
            jobs[job.id] = job
            for node_id, ranks in _by_node(job.placement).items():
                if node_id in on_node:  # ranks on a node that is gone hold nothing we place on
                    on_node[node_id][job.id] = ranks
        views = {n.id: _view(n, on_node[n.id]) for n in nodes}
        return cls(views, on_node, held, jobs)

    @property
    def nodes(self) -> tuple[NodeView, ...]:
        """Every node, schedulable or not, by id."""
        return tuple(self._views[i] for i in self._order)

    @property
    def schedulable(self) -> tuple[NodeView, ...]:
        return tuple(v for v in self.nodes if v.schedulable)

    def node(self, node_id: str) -> NodeView:
        return self._views[node_id]

    def placement_of(self, job_id: int) -> Placement | None:
        return self._held.get(job_id)

    def job(self, job_id: int) -> Job | None:
        """The job holding resources under `job_id` (None when only its placement is known)."""
        return self._jobs.get(job_id)

    def jobs(self) -> tuple[Job, ...]:
        """Every job holding resources whose job is known, by id."""
        return tuple(self._jobs[j] for j in sorted(self._jobs))

    def without(self, node_id: str, job_ids: Iterable[int]) -> NodeView:
        """Node `node_id` as it would be once `job_ids` let go of it (a what-if; nothing changes)."""
        gone = set(job_ids)
        held = {j: ranks for j, ranks in self._on_node[node_id].items() if j not in gone}
        return _view(self._views[node_id].node, held)

    def assume(self, job_id: int, placement: Placement, job: Job | None = None) -> None:
        """Reserve `placement` for `job_id` (`job`: the job itself, for time limits and fair
        share); ValueError if it does not fit (a bug in the caller)."""
        if job_id in self._held:
            raise ValueError(f"job {job_id} already holds resources; forget it first")
        staged, self._staged = self._staged, None
        by_node = _by_node(placement)
        if staged is not None and staged[0] is placement:
            taken = dict(staged[1])
        else:
            taken = {}
            for node_id, ranks in by_node.items():
                if node_id not in self._views:
                    raise ValueError(f"job {job_id}: node {node_id} is not in the snapshot")
                taken[node_id] = self._views[node_id].take(job_id, ranks)
        # Checked in full above before anything changes, so a failed assume leaves no trace.
        for node_id, ranks in by_node.items():
            self._on_node[node_id] = {**self._on_node[node_id], job_id: ranks}
        self._views.update(taken)
        if self._table is not None:
            for node_id, view in taken.items():
                self._table.set(self._table.pos[node_id], view)
        self._held[job_id] = placement
        if job is not None:
            self._jobs[job_id] = job

    def stage(self, placement: Placement, taken: Mapping[str, NodeView]) -> None:
        """What `placement` leaves of each of its nodes, as the caller has worked it out
        (the node here taking exactly its ranks there, by `NodeView.take`): the next `assume`,
        if it is of this very placement, uses it rather than taking every rank again."""
        self._staged = (placement, taken)

    def forget(self, job_id: int) -> None:
        """Undo `assume` (or a running job's hold); forgetting an unknown job does nothing."""
        self.forget_all((job_id,))

    def forget_all(self, job_ids: Iterable[int]) -> None:
        """`forget` each of `job_ids`; a node several of them share is recomputed once."""
        touched: set[str] = set()
        for job_id in job_ids:
            placement = self._held.pop(job_id, None)
            self._jobs.pop(job_id, None)
            if placement is None:
                continue
            for node_id in _by_node(placement):
                if node_id in self._on_node:
                    held = {j: r for j, r in self._on_node[node_id].items() if j != job_id}
                    self._on_node[node_id] = held
                    touched.add(node_id)
        # Recomputed from what is still held rather than added back, so a node that running
        # jobs oversubscribe (clamped at zero) comes back exactly.
        self._recompute(touched)

    def hold(self, job_id: int, placement: Placement, job: Job | None = None) -> None:
        """Undo `forget`: `job_id` holds `placement` again, every node it is on as `build`
        makes it (no fit check: it held all this before it was forgotten)."""
        if job_id in self._held:
            raise ValueError(f"job {job_id} already holds resources; forget it first")
        self._held[job_id] = placement
        if job is not None:
            self._jobs[job_id] = job
        touched = set()
        for node_id, ranks in _by_node(placement).items():
            if node_id in self._on_node:  # ranks on a node that is gone hold nothing
                self._on_node[node_id] = {**self._on_node[node_id], job_id: ranks}
                touched.add(node_id)
        self._recompute(touched)

    def _recompute(self, node_ids: Iterable[str]) -> None:
        for node_id in sorted(node_ids):
            view = self._views[node_id] = _view(self._views[node_id].node, self._on_node[node_id])
            if self._table is not None:
                self._table.set(self._table.pos[node_id], view)

    def copy(self) -> Snapshot:
        """An independent snapshot to assume into; views are shared, they never change."""
        return Snapshot(
            dict(self._views),
            dict(self._on_node),
            dict(self._held),
            dict(self._jobs),
            order=self._order,
            table=self._table.copy() if self._table is not None else None,
        )

    def held(self) -> tuple[tuple[int, Placement], ...]:
        """Every (job id, placement) holding resources, by job id."""
        return tuple(sorted(self._held.items()))
