"""The snapshot's nodes as numpy columns, one row per node in id order: what each node is
(fixed for the cycle) and what it has free (rewritten as the cycle assumes and forgets), so
filters and scores run over every node at once and a gang search reads fabrics and leaves as
arrays instead of walking the nodes rank by rank.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from gpuctl.core.model import MILLI_PER_GPU, Node, NodeState

if TYPE_CHECKING:
    from gpuctl.core.snapshot import NodeView

_STATIC = (
    "ids",
    "pos",
    "nodes",
    "ready",
    "gpu_count",
    "width",
    "model",
    "models",
    "hbm",
    "nvlink",
    "net",
    "tflops_per_gpu",
    "price",
    "cpu_cap",
    "mem_cap",
    "fabric",
    "fabrics",
    "leaf",
    "leaves",
    "_details",
)
_DYNAMIC = ("gpu_free", "whole", "most", "cpu_free", "mem_free", "idle", "version")


class _Details:
    """Per-GPU index and memory, and each node's kind: worked out the first time a cycle
    asks (a gang with no memory or model to match never does), then shared by every copy."""

    __slots__ = ("gpu_index", "gpu_mem", "kind", "mem_desc_cum")

    def __init__(self, nodes: Sequence[Node], table: NodeTable) -> None:
        kinds: dict[tuple[Any, ...], int] = {}
        index_rows, mem_rows, kind = [], [], []
        figures = zip(
            table.model.tolist(),
            table.hbm.tolist(),
            table.nvlink.tolist(),
            table.net.tolist(),
            table.tflops_per_gpu.tolist(),
            table.price.tolist(),
            table.cpu_cap.tolist(),
            table.mem_cap.tolist(),
            strict=True,
        )
        for node, figure in zip(nodes, figures, strict=True):
            gpus = node.profile.gpus
            index = tuple([g.index for g in gpus])
            memory = tuple([g.memory_mib for g in gpus])
            index_rows.append(index)
            mem_rows.append(memory)
            key = (node.state, node.state_reason, index, memory, figure)
            found = kinds.get(key)
            if found is None:
                found = kinds[key] = len(kinds)
            kind.append(found)
        self.gpu_index = table.matrix(index_rows, -1)
        self.gpu_mem = table.matrix(mem_rows, 0)
        self.mem_desc_cum = np.cumsum(-np.sort(-self.gpu_mem, axis=1), axis=1)
        self.kind = np.array(kind, dtype=np.int64)


@dataclass(slots=True)
class Memos:
    """Everything the cycle's machinery keeps on a table between questions, one map per kind
    of answer, each keyed as its owner says (`engine.verdicts`, `engine.islands`, the frag-aware
    score). Keys name policies and mappings by `id()`; each entry holds the objects its key
    names, so no id is reused while it lives, and records the table's clock when it was
    worked out, so a user brings it up to date from `changed_since` rather than trusting it.
    A copy of the table (a trial placement) starts with the same entries."""

    columnar: dict[tuple[int, int], Any] = field(default_factory=dict)
    filters: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    scores: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    column: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    fixed: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    islands: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    rows_of: dict[int, Any] = field(default_factory=dict)
    frag_aware: dict[int, Any] = field(default_factory=dict)

    def copy(self) -> Memos:
        return Memos(*(dict(getattr(self, f.name)) for f in fields(self)))


class NodeTable:
    """Every node of a snapshot as columns; row i is node `ids[i]` (ids sorted).

    Static columns (shared by copies): readiness, GPU count, GPU model, HBM, NVLink and
    network bandwidth, TFLOPS per GPU, price, CPU and memory capacity, fabric and leaf (ids
    into the sorted names, so comparing ids compares names); per-GPU index and memory (padded
    with -1 / 0 to the widest node), and `kind`: nodes alike in every one of those share a
    kind. Dynamic columns: free milli per GPU (0 for a GPU the node lacks, which never fits),
    whole free GPUs, the most milli free on one GPU, free CPU and memory, idle, and `version`,
    the clock reading when the row last changed (unique across copies, so a cache can tell
    which rows changed since it last looked).
    """

    __slots__ = (*_STATIC, *_DYNAMIC, "_clock", "_changes", "_changed_rows", "memos", "views")

    ids: tuple[str, ...]
    pos: dict[str, int]
    views: list[NodeView]
    memos: Memos

    @classmethod
    def of(cls, views: Sequence[NodeView]) -> NodeTable:
        """The table of `views`, which must be in id order."""
        # One pass of plain Python over the nodes (the figures as `BandwidthProfile` and
        # `Node` compute them), then one numpy conversion per column: ~3 us a node.
        t = object.__new__(cls)
        ready_state = NodeState.READY
        rows = []
        free_rows = []
        for v in views:
            node = v.node
            p = node.profile
            gpus = p.gpus
            k = len(gpus)
            if k:
                g0 = gpus[0]
                model = g0.model
                hbm = g0.measured_hbm_gbps if g0.measured_hbm_gbps is not None else g0.hbm_gbps
                nvlink = min([g.nvlink_gbps for g in gpus])
                tflops = p.bf16_tflops / k
            else:
                model, hbm, nvlink, tflops = "", 0.0, 0.0, 0.0
            network = p.network
            fabric = node.fabric
            rows.append(
                (
                    node.id,
                    node,
                    node.state is ready_state,
                    k,
                    model,
                    hbm,
                    nvlink,
                    network.ports * network.gbps_per_port,
                    tflops,
                    node.price_per_hour,
                    node.cpu_milli,
                    node.memory_mib,
                    fabric.split("/", 1)[0] if fabric else "",
                    fabric or f"node {node.id}",
                    v.gpu_free_milli.count(MILLI_PER_GPU),
                    v.cpu_free_milli,
                    v.memory_free_mib,
                    not v.ranks,
                )
            )
            free_rows.append(v.gpu_free_milli)
        (
            ids,
            nodes,
            ready,
            counts,
            model_names,
            hbm_gbps,
            nvlink_gbps,
            net,
            tflops_per_gpu,
            price,
            cpu_cap,
            mem_cap,
            fabric_names,
            leaf_names,
            whole,
            cpu_free,
            mem_free,
            idle,
        ) = list(zip(*rows, strict=True)) if rows else [()] * 18
        n = len(rows)
        t.ids = tuple(ids)
        t.pos = {node_id: i for i, node_id in enumerate(ids)}
        t.nodes = tuple(nodes)
        t.views = list(views)
        t.ready = np.array(ready, dtype=bool)
        t.gpu_count = np.array(counts, dtype=np.int64)
        t.width = int(t.gpu_count.max(initial=0)) or 1
        t.models = tuple(sorted(set(model_names)))
        t.model = _ids(model_names, t.models)
        t.hbm = np.array(hbm_gbps, dtype=np.float64)
        t.nvlink = np.array(nvlink_gbps, dtype=np.float64)
        t.net = np.array(net, dtype=np.float64)
        t.tflops_per_gpu = np.array(tflops_per_gpu, dtype=np.float64)
        t.price = np.array(price, dtype=np.float64)
        t.cpu_cap = np.array(cpu_cap, dtype=np.int64)
        t.mem_cap = np.array(mem_cap, dtype=np.int64)
        t.fabrics = tuple(sorted(set(fabric_names)))
        t.fabric = _ids(fabric_names, t.fabrics)
        t.leaves = tuple(sorted(set(leaf_names)))
        t.leaf = _ids(leaf_names, t.leaves)
        t._details = [None]  # one box, shared by copies
        t.gpu_free = t.matrix(free_rows, 0)
        t.whole = np.array(whole, dtype=np.int64)
        t.most = t.gpu_free.max(axis=1) if n else np.zeros(0, dtype=np.int64)
        t.cpu_free = np.array(cpu_free, dtype=np.int64)
        t.mem_free = np.array(mem_free, dtype=np.int64)
        t.idle = np.array(idle, dtype=bool)
        t._clock = itertools.count(1)
        t.version = np.zeros(n, dtype=np.int64)
        t._changes = []  # the version of every change, ascending ...
        t._changed_rows = []  # ... and the row it changed
        t.memos = Memos()
        return t

    def matrix(self, values: Sequence[tuple[int, ...]], pad: int) -> np.ndarray:
        """Per-GPU values of every row as (rows, width): GPU j of row i at [i, j], `pad`
        past the row's GPUs."""
        out = np.full((len(self.ids), self.width), pad, dtype=np.int64)
        present = np.arange(self.width)[None, :] < self.gpu_count[:, None]
        total = int(self.gpu_count.sum())
        out[present] = np.fromiter(itertools.chain.from_iterable(values), np.int64, total)
        return out

    def _detail(self) -> _Details:
        box = self._details
        if box[0] is None:
            box[0] = _Details(self.nodes, self)
        return box[0]

    @property
    def gpu_index(self) -> np.ndarray:
        """(rows, width): each GPU's index (-1 past the row's GPUs)."""
        return self._detail().gpu_index

    @property
    def gpu_mem(self) -> np.ndarray:
        """(rows, width): each GPU's memory in MiB (0 past the row's GPUs)."""
        return self._detail().gpu_mem

    @property
    def mem_desc_cum(self) -> np.ndarray:
        """(rows, width): the sum of each row's j + 1 largest GPU memories at [i, j]."""
        return self._detail().mem_desc_cum

    @property
    def kind(self) -> np.ndarray:
        """Per row: nodes alike in state, GPUs and every fixed figure share a kind."""
        return self._detail().kind

    def __len__(self) -> int:
        return len(self.ids)

    def copy(self) -> NodeTable:
        """A table to change independently: static columns shared, the rest copied."""
        other = object.__new__(NodeTable)
        for name in _STATIC:
            setattr(other, name, getattr(self, name))
        for name in _DYNAMIC:
            setattr(other, name, getattr(self, name).copy())
        other._clock = self._clock  # one clock: a version never means two states
        other._changes = list(self._changes)
        other._changed_rows = list(self._changed_rows)
        other.memos = self.memos.copy()
        other.views = list(self.views)
        return other

    @property
    def now(self) -> int:
        """A clock reading: every row changed after it has a higher version."""
        return next(self._clock)

    @property
    def last_change(self) -> int:
        """The version of the table's latest change (0: none): two readings alike, nothing
        changed in between."""
        return self._changes[-1] if self._changes else 0

    def set(self, row: int, view: NodeView) -> None:
        """Row `row` now holds `view` (the node after an assume or a forget)."""
        self.views[row] = view
        free = view.gpu_free_milli
        self.gpu_free[row, : len(free)] = free
        self.whole[row] = free.count(MILLI_PER_GPU)
        self.most[row] = max(free, default=0)
        self.cpu_free[row] = view.cpu_free_milli
        self.mem_free[row] = view.memory_free_mib
        self.idle[row] = view.idle
        self.version[row] = version = next(self._clock)
        self._changes.append(version)
        self._changed_rows.append(row)

    def changed_since(self, seen: int) -> np.ndarray:
        """The rows changed after clock reading `seen`, ascending: from the log of changes
        while few changed (a cycle changes a row or two at a time), else by version."""
        rows = self._changed_rows[bisect.bisect_right(self._changes, seen) :]
        if len(rows) * 8 > len(self.ids):
            return np.flatnonzero(self.version > seen)
        return np.array(sorted(set(rows)), dtype=np.int64)

    def rows(self, node_ids: Iterable[str]) -> np.ndarray:
        """The rows of `node_ids` (ids not in the table are left out), ascending."""
        pos = self.pos
        return np.array(sorted(pos[i] for i in node_ids if i in pos), dtype=np.int64)

    def whole_free(self, rows: np.ndarray | slice) -> np.ndarray:
        """Per GPU of `rows`: nothing on it."""
        return self.gpu_free[rows] == MILLI_PER_GPU


def _ids(names: Sequence[str], ordered: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(ordered)}
    return np.array([index[name] for name in names], dtype=np.int64)
