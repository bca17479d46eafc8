"""A policy's filters and scores for one job over every node of a snapshot at once: per node
the status code, which filter ruled it out and why, and the score, as numpy arrays.

The figures are those the per-node plugins give (the cycle compares them exactly: ties fall
to node ids), computed from the snapshot's `NodeTable` by the plugins' column forms. They are
cached on the table per job shape and brought up to date row by row: a placement changes a
node or two, so the next job of a shape seen before costs the rows that changed, not the
cluster. Reasons are worded once per (filter, key) and shared by every node alike in it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.model import Job, JobKind, JobSpec
from gpuctl.core.plugins import SUCCESS, Code, NodeReady, Policy, RankRequest, Status, plural
from gpuctl.core.snapshot import Snapshot
from gpuctl.core.topology import SCORE_DIGITS

# `first` of a node ruled out before any filter of the policy: it is not READY.
NOT_READY = -2
# Up to this many changed rows, cached filter results and scores are brought up to date by
# asking the per-node plugins.
_NODE_BY_NODE = 4
# Up to this many elements a figure is worked out in plain Python rather than numpy.
_FEW = 32
# A reason names at most this many groups of nodes, and this many nodes per group: enough to
# act on, short enough to read.
REASON_GROUPS = 4
REASON_IDS = 3


# What of a job spec placement never looks at: jobs alike in all the rest fit alike.
_UNREAD = frozenset(
    {
        "command",
        "name",
        "owner",
        "queue",
        "priority",
        "env",
        "working_dir",
        "time_limit_s",
        "on_node_lost",
        "preemptible",
    }
)
_SHAPE_FIELDS = tuple(f.name for f in fields(JobSpec) if f.name not in _UNREAD)
_shape_of = operator.attrgetter(*_SHAPE_FIELDS)
# A job's shape: the fields of its spec placement reads, as a tuple (a key for caches).
Shape = tuple[Any, ...]
# Filters and scores judge one rank on one node: how many ranks the job has is not theirs to
# read, so jobs differing only in it share every cached column.
_rank_of = operator.itemgetter(
    *(i for i, name in enumerate(_SHAPE_FIELDS) if name not in {"replicas", "num_nodes"})
)


def shape(spec: JobSpec) -> Shape:
    """What placement reads of `spec`: alike shapes fit alike."""
    return _shape_of(spec)


def columnar(policy: Policy) -> bool:
    """Every filter and score of `policy` declares a column form (`core.framework`)."""
    return all(f.column_form for f in policy.filters) and all(
        s.column_form for s, _ in policy.scores
    )


def _columnar(t: NodeTable, policy: Policy) -> bool:
    """`columnar`, asked once per policy and table."""
    key = (id(policy.filters), id(policy.scores))
    hit = t.memos.columnar.get(key)
    if hit is None or hit[0] is not policy.filters or hit[1] is not policy.scores:
        hit = t.memos.columnar[key] = (policy.filters, policy.scores, columnar(policy))
    return hit[2]


def check(policy: Policy, job: Job, request: RankRequest, node: Any) -> Status:
    """The status of one node: whatever filters a policy names, nothing new goes on a node
    that is not READY."""
    if not node.schedulable:
        return NodeReady().filter(job, request, node)
    return policy.check(job, request, node)


def recheck(policy: Policy, job: Job, request: RankRequest, node: Any) -> Status:
    """`check` of a node that passed every filter before it took more work: only the filters
    that read what is free can rule it out now."""
    kind = job.spec.kind
    for f in policy.filters[_first_reading_free(policy.filters, kind) :]:
        if kind in f.kinds:
            status = f.filter(job, request, node)
            if not status.ok:
                return status
    return SUCCESS


def score(policy: Policy, job: Job, request: RankRequest, node: Any) -> float:
    """The score of one node, rounded as the cycle compares scores."""
    return round(policy.score(job, request, node), SCORE_DIGITS)


def rounded(raw: np.ndarray) -> np.ndarray:
    """`round(x, SCORE_DIGITS)` of every element, exactly as Python rounds.

    numpy rounds x * 10^d, which can land on the other side of .5 than x's exact decimal
    value; those (within 1e-6 of a half) are rounded by Python instead.
    """
    if len(raw) <= _FEW:  # numpy's fixed cost a call outweighs Python's per element
        return np.array([round(x, SCORE_DIGITS) for x in raw.tolist()])
    scaled = raw * 10.0**SCORE_DIGITS
    near = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6
    out = np.rint(scaled) / 10.0**SCORE_DIGITS
    for i in np.flatnonzero(near):
        out[i] = round(float(raw[i]), SCORE_DIGITS)
    return out


@dataclass(frozen=True, slots=True)
class _Filtered:
    filters: tuple[Any, ...]  # the policy's own tuple: the entry is for it alone
    seen: int  # the table's clock when the entry was brought up to date
    code: np.ndarray  # int8 Code per row
    first: np.ndarray  # int16: the filter that ruled the row out, -1 none, NOT_READY
    key: np.ndarray  # int64: rows equal in (first, code, key) share a reason
    reasons: dict[tuple[int, int, int], str]


@dataclass(frozen=True, slots=True)
class _Scored:
    filters: tuple[Any, ...]
    scores: tuple[Any, ...]
    seen: int
    value: np.ndarray  # float64, rounded; -inf where the filters rule the row out


class ReasonBook:
    """Reason texts numbered as they are first seen, so nodes can be grouped by number."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._ids: dict[str, int] = {}

    def id_of(self, text: str) -> int:
        found = self._ids.get(text)
        if found is None:
            found = self._ids[text] = len(self.texts)
            self.texts.append(text)
        return found


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdicts:
    """The filters' and scores' answers for one job on every row of `table`."""

    table: NodeTable
    policy: Policy
    job: Job
    request: RankRequest
    code: np.ndarray
    first: np.ndarray
    key: np.ndarray
    score: np.ndarray  # -inf where not ok: the best row is its argmax
    reasons: dict[tuple[int, int, int], str]
    own: Mapping[int, Status]  # rows holding ranks of the job itself, asked node by node

    @property
    def ok(self) -> np.ndarray:
        return self.code == 0

    def reason(self, row: int) -> str:
        """Why `row` is ruled out ("" when it is not)."""
        if row in self.own:
            return self.own[row].reason
        if self.code[row] == 0:
            return ""
        group = (int(self.first[row]), int(self.code[row]), int(self.key[row]))
        text = self.reasons.get(group)
        if text is None:
            view = self.table.views[row]
            f = NodeReady() if group[0] == NOT_READY else self.policy.filters[group[0]]
            text = self.reasons[group] = f.filter(self.job, self.request, view).reason
        return text

    def reason_ids(self, rows: np.ndarray, book: ReasonBook) -> np.ndarray:
        """The reason of each of `rows` as a number in `book` (rows must be ruled out)."""
        out = np.empty(len(rows), dtype=np.int64)
        shared = np.ones(len(rows), dtype=bool)
        for i, row in enumerate(rows.tolist() if self.own else ()):
            if row in self.own:
                out[i] = book.id_of(self.own[row].reason)
                shared[i] = False
        alike = rows[shared]
        if len(alike):
            packed = (
                self.key[alike] * 64
                + (self.first[alike].astype(np.int64) + 2) * 4
                + self.code[alike].astype(np.int64)
            )
            _, first_at, inverse = np.unique(packed, return_index=True, return_inverse=True)
            ids = [book.id_of(self.reason(int(alike[i]))) for i in first_at]
            out[shared] = np.array(ids, dtype=np.int64)[inverse.reshape(-1)]
        return out


def verdicts(
    snapshot: Snapshot, policy: Policy, job: Job, request: RankRequest, job_shape: Shape
) -> Verdicts:
    """Every node's status and score for one rank of `job` (`job_shape`: `shape(job.spec)`)."""
    t = snapshot.table
    if _columnar(t, policy):
        job_shape = _rank_of(job_shape)
        # The job's own ranks: placed earlier, or a running service's (held under the negated
        # id while its replacements are placed: core.services.cycle_input).
        own_ranks = [
            r
            for held in (snapshot.placement_of(job.id), snapshot.placement_of(-job.id))
            if held is not None
            for r in held.ranks
        ]
        filtered = _filtered(t, policy, job, request, job_shape)
        scored = _scored(t, policy, job, request, job_shape, filtered, not own_ranks)
        code, first, key, value = filtered.code, filtered.first, filtered.key, scored.value
        reasons = filtered.reasons
        own_rows = t.rows(r.node_id for r in own_ranks) if own_ranks else ()
    else:  # a plugin without a column form: every node asked by itself
        code = np.zeros(len(t), dtype=np.int8)
        first = np.full(len(t), -1, dtype=np.int16)
        key = np.zeros(len(t), dtype=np.int64)
        value = np.full(len(t), -np.inf)
        reasons = {}
        own_rows = range(len(t))
    own: dict[int, Status] = {}
    if len(own_rows):
        code, value = code.copy(), value.copy()
        for row in own_rows:
            view = t.views[row]
            status = check(policy, job, request, view)
            own[int(row)] = status
            code[row] = status.code
            value[row] = score(policy, job, request, view) if status.ok else -np.inf
    return Verdicts(
        table=t,
        policy=policy,
        job=job,
        request=request,
        code=code,
        first=first,
        key=key,
        score=value,
        reasons=reasons,
        own=own,
    )


def filter_codes(
    snapshot: Snapshot, policy: Policy, job: Job, request: RankRequest, job_shape: Shape
) -> np.ndarray:
    """Only the status codes: what `verdicts` gives without scoring (for planning)."""
    if not _columnar(snapshot.table, policy):
        views = snapshot.table.views
        return np.array([check(policy, job, request, v).code for v in views], dtype=np.int8)
    return _filtered(snapshot.table, policy, job, request, _rank_of(job_shape)).code


def _reads_free(plugin: Any) -> bool:
    return bool(plugin.reads_free)


def _filtered(
    t: NodeTable, policy: Policy, job: Job, request: RankRequest, job_shape: Shape
) -> _Filtered:
    cache_key = (id(policy.filters), job_shape)
    entry = t.memos.filters.get(cache_key)
    if entry is not None and entry.filters is policy.filters:
        rows = t.changed_since(entry.seen)
        if not len(rows):
            return entry
        code, first, key, reasons = entry.code, entry.first, entry.key, entry.reasons
        # A changed row that a filter reading only what the node is ruled out, with only
        # such filters before it, is ruled out the same; one that passed them passes them
        # again, so only the filters from the first that reads what is free are asked.
        start = _first_reading_free(policy.filters, job.spec.kind)
        was = first[rows]
        rows = rows[(was == -1) | (was >= start)]
        if len(rows) <= _NODE_BY_NODE:
            # A few rows: asked node by node (numpy's fixed cost a call outweighs the per-node
            # plugins' microseconds), and only those ruled out asked again by columns, for
            # the filter and key their reason is grouped by.
            views = t.views
            out = [not check(policy, job, request, views[r]).ok for r in rows.tolist()]
            if not any(out) and (first[rows] == -1).all():  # passed, and still passes
                rows = rows[:0]
            elif any(out):
                passing = rows[[not o for o in out]]
                rows = rows[out]
                code, first, key = code.copy(), first.copy(), key.copy()
                code[passing], first[passing], key[passing] = 0, -1, 0
        if len(rows):
            if code is entry.code:
                code, first, key = code.copy(), first.copy(), key.copy()
            code[rows], first[rows], key[rows] = _check_rows(policy, job, request, t, rows, start)
    else:
        rows = np.arange(len(t))
        code = np.zeros(len(t), dtype=np.int8)
        first = np.full(len(t), -1, dtype=np.int16)
        key = np.zeros(len(t), dtype=np.int64)
        reasons = {}
        code[rows], first[rows], key[rows] = _check_rows(policy, job, request, t, rows)
    entry = _Filtered(policy.filters, t.now, code, first, key, reasons)
    t.memos.filters[cache_key] = entry
    return entry


@functools.cache
def _first_reading_free(filters: tuple[Any, ...], kind: JobKind) -> int:
    """The first of `filters` that applies to `kind` and reads what nodes have free."""
    return next(
        (i for i, f in enumerate(filters) if kind in f.kinds and _reads_free(f)), len(filters)
    )


def _check_rows(
    policy: Policy,
    job: Job,
    request: RankRequest,
    t: NodeTable,
    rows: np.ndarray,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`check` for each of `rows`: (code, first filter failing, its key); the filters before
    `start` are known to pass."""
    code = np.zeros(len(rows), dtype=np.int8)
    first = np.full(len(rows), -1, dtype=np.int16)
    key = np.zeros(len(rows), dtype=np.int64)
    for i, f in enumerate(policy.filters):
        if i < start or job.spec.kind not in f.kinds:
            continue
        open_ = np.flatnonzero(code == 0)
        if not len(open_):
            break
        c, k = f.codes(job, request, t, rows[open_])
        out = c != 0
        at = open_[out]
        code[at], first[at], key[at] = c[out], i, k[out]
    not_ready = ~t.ready[rows]
    if not_ready.any():
        code[not_ready] = Code.UNRESOLVABLE
        first[not_ready] = NOT_READY
        key[not_ready] = t.kind[rows[not_ready]]
    return code, first, key


def _scored(
    t: NodeTable,
    policy: Policy,
    job: Job,
    request: RankRequest,
    job_shape: Shape,
    filtered: _Filtered,
    node_by_node: bool = False,
) -> _Scored:
    """The scores of the rows `filtered` passes; with `node_by_node` (the job holds nothing
    anywhere, so a node's per-node score is its column's), a few changed rows are scored by
    the per-node plugins."""
    facets = tuple(s.facet(job) for s, _ in policy.scores)
    cache_key = (id(policy.filters), id(policy.scores), job_shape, facets)
    entry = t.memos.scores.get(cache_key)
    if entry is not None and entry.filters is policy.filters and entry.scores is policy.scores:
        rows = t.changed_since(entry.seen)
        if not len(rows):
            return entry
        value = entry.value.copy()
        value[rows] = -np.inf
        fit = rows[filtered.code[rows] == 0]
        if node_by_node and len(fit) <= _NODE_BY_NODE:
            views = t.views
            value[fit] = [score(policy, job, request, views[r]) for r in fit.tolist()]
        elif len(fit):
            value[fit] = _score_rows(policy, job, request, job_shape, t, fit)
    else:
        # Scores new to this table (a first look, or re-prepared for the queued gangs): the
        # weighted mean of each score's column, every column cached by itself, so a score
        # that came out of preparing unchanged is not computed again.
        fit = np.flatnonzero(filtered.code == 0)
        total = np.zeros(len(fit))
        weights = 0.0
        for s, weight in policy.scores:
            if job.spec.kind in s.kinds:
                if _reads_free(s):
                    column = _column(t, s, policy.filters, job, request, job_shape, filtered)
                else:
                    column = _fixed(t, s, job, request, job_shape)
                total = total + weight * column[fit]
                weights += weight
        value = np.full(len(t), -np.inf)
        value[fit] = rounded(total / weights) if weights else 0.0
    entry = _Scored(policy.filters, policy.scores, t.now, value)
    t.memos.scores[cache_key] = entry
    return entry


@dataclass(frozen=True, slots=True)
class _Column:
    score: Any  # the plugin instance: the entry is for it alone
    seen: int
    value: np.ndarray  # float64, raw; NaN where the filters rule the row out


def _column(
    t: NodeTable,
    s: Any,
    filters: tuple[Any, ...],
    job: Job,
    request: RankRequest,
    job_shape: Shape,
    filtered: _Filtered,
) -> np.ndarray:
    """One score's raw figures for the rows the filters pass."""
    facet = s.facet(job)
    cache_key = (id(s), id(filters), job_shape, facet)
    entry = t.memos.column.get(cache_key)
    if entry is not None and entry.score is s:
        rows = t.changed_since(entry.seen)
        if not len(rows):
            return entry.value
        value = entry.value.copy()
    else:
        rows = np.arange(len(t))
        value = np.full(len(t), np.nan)
    value[rows] = np.nan
    fit = rows[filtered.code[rows] == 0]
    if len(fit):
        value[fit] = s.scores(job, request, t, fit)
    t.memos.column[cache_key] = _Column(s, t.now, value)
    return value


def _fixed(t: NodeTable, s: Any, job: Job, request: RankRequest, job_shape: Shape) -> np.ndarray:
    """The raw figures of a score that reads only what nodes are, for every row, once."""
    facet = s.facet(job)
    cache_key = (id(s), job_shape, facet)
    entry = t.memos.fixed.get(cache_key)
    if entry is None or entry.score is not s:
        entry = t.memos.fixed[cache_key] = _Column(
            s, 0, s.scores(job, request, t, np.arange(len(t)))
        )
    return entry.value


def _score_rows(
    policy: Policy,
    job: Job,
    request: RankRequest,
    job_shape: Shape,
    t: NodeTable,
    rows: np.ndarray,
) -> np.ndarray:
    """`score` for each of `rows`: the weighted mean in the per-node order, then rounded."""
    total = np.zeros(len(rows))
    weights = 0.0
    for s, weight in policy.scores:
        if job.spec.kind in s.kinds:
            if _reads_free(s):
                figures = s.scores(job, request, t, rows)
            else:
                figures = _fixed(t, s, job, request, job_shape)[rows]
            total = total + weight * figures
            weights += weight
    return rounded(total / weights) if weights else np.zeros(len(rows))


# -- reasons ----------------------------------------------------------------------------------


def explain(t: NodeTable, rows: np.ndarray, ids: np.ndarray, book: ReasonBook) -> str:
    """Nodes grouped by why they were ruled out, groups in the order their first node comes:
    "node b draining, 2 nodes with 4 GPUs (c, d)". `rows` ascending, `ids` their reasons."""
    if not len(rows):
        return ""
    groups, first_at, counts = np.unique(ids, return_index=True, return_counts=True)
    order = np.argsort(first_at, kind="stable")
    parts = []
    for g in order[:REASON_GROUPS]:
        reason = book.texts[int(groups[g])]
        members = rows[ids == groups[g]][:REASON_IDS]
        names = [t.ids[r] for r in members.tolist()]
        count = int(counts[g])
        if count == 1:
            parts.append(f"node {names[0]} {reason}")
        else:
            shown = ", ".join(names) + (
                f" +{count - REASON_IDS} more" if count > REASON_IDS else ""
            )
            parts.append(f"{count} nodes {reason} ({shown})")
    rest = int(counts[order[REASON_GROUPS:]].sum())
    if rest:
        parts.append(f"{plural(rest, 'more node')}")
    return ", ".join(parts)
