"""What a job may not use because of a node's lease: it ends before the job's time limit and
cannot be renewed, it is being released, it was leased for another waiting job, or keeping
it up for the job costs more than leasing the job a node of its own (thrift). The cycle asks
these while it places (`core.cycle`); they are constraints on placement, not a phase."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.leasing.offers import (
    BudgetBook,
    Option,
    gang_options,
    grant_limits,
    offer_key,
    replica_options,
)
from gpuctl.core.leasing.terms import Leasing, duration, managed
from gpuctl.core.model import Job, JobKind, LeaseState

# -- lease expiry and reserved nodes: what a job may not use ----------------------------------


class LeaseBlocks:
    """Nodes a job may not use because of their lease: it ends before the job's time limit
    and cannot be renewed, it is being released, or it was leased for another waiting job
    (`for_job`: few nodes, by id); or keeping it for the job costs more than leasing the job a
    node of its own (`refused`, thrift: possibly most of a leased fleet, as a row mask).

    Each rule refuses a node from some time limit on, so jobs share the mapping (the same
    rows) of their time limit's place among those thresholds: a cycle over thousands of jobs
    and leases does not look at every pair."""

    def __init__(
        self,
        leasing: Leasing,
        waiting: frozenset[int],
        now: datetime,
        *,
        busy_s: Mapping[str, float] | None = None,
    ) -> None:
        """`busy_s`: per node, the seconds from `now` until the last job on it reaches its time
        limit (inf: a job there has none); a node not in it is idle."""
        self.releasing: set[str] = set()
        self.reserved: dict[str, int] = {}
        ending: list[tuple[float, str, str]] = []  # (seconds left, node, why)
        self.priced: dict[str, tuple[float, float, int | None]] = {}  # node -> ($/h, busy, for)
        self.offers = leasing.offers
        self.limits = grant_limits(leasing.offers)
        self.failed = leasing.failed
        self.budgets = BudgetBook(leasing)  # what the queues may lease (this cycle's asks aside)
        busy_s = busy_s or {}
        for lease in leasing.leases:
            if not lease.node_id:
                continue
            if lease.state is LeaseState.RELEASING:
                self.releasing.add(lease.node_id)
            elif lease.state is not LeaseState.ACTIVE:
                continue
            if lease.expires_at is not None and lease.provider not in leasing.renewable:
                left = max(0.0, (lease.expires_at - now).total_seconds())
                why = (
                    f"with {duration(left)} of lease left and no renewal from {lease.provider} "
                    "(its time limit is longer, or it has none)"
                )
                ending.append((left, lease.node_id, why))
            if managed(lease) and lease.for_job_id in waiting:
                self.reserved[lease.node_id] = lease.for_job_id
            if managed(lease) and lease.state is LeaseState.ACTIVE and lease.price_per_hour > 0:
                self.priced[lease.node_id] = (
                    lease.price_per_hour,
                    busy_s.get(lease.node_id, 0.0),
                    lease.for_job_id,
                )
        self.ending = _Prefixes(ending)
        self.owners = {owner for *_, owner in self.priced.values()}
        self.reserved_for = set(self.reserved.values())
        self.own: dict[tuple[object, ...], Option | None] = {}
        self.alike: dict[tuple[object, ...], dict[str, str]] = {}
        self.columns: tuple[object, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.thresholds: dict[int, tuple[Option, np.ndarray]] = {}  # id(own) -> per row

    def __bool__(self) -> bool:
        return bool(self.ending or self.releasing or self.reserved or self.priced)

    def for_job(self, job: Job) -> Mapping[str, str]:
        """Node -> why `job` may not use it (the mapping is shared: do not change it)."""
        limit = float(job.spec.time_limit_s) or math.inf
        key = (self.ending.count(limit), job.id if job.id in self.reserved_for else None)
        if key not in self.alike:
            out = {n: f"leased for job {o}" for n, o in self.reserved.items() if o != job.id}
            out.update(self.ending.first(limit))
            out.update((n, "with its lease being released") for n in self.releasing)
            self.alike[key] = out
        return self.alike[key]

    def refused(self, job: Job, table: NodeTable) -> Refused | None:
        """Thrift: the rows of `table` (leased nodes) that placing `job` would keep up past
        their other work at more than its own lease would cost for its time limit T: price x
        (T - busy) > own $/h x T, which holds from T > price x busy / (price - own $/h) on
        (no time limit: always). Never a node leased for the job itself, nor one whose work has
        no time limit; nothing when the job is a gang or it could lease nothing instead (no
        offer fits it, or its queue's budget allows none). None: none refused."""
        if not self.priced or job.spec.is_gang:
            return None
        own = self._own(job)
        if own is None:
            return None
        owner = self._columns(table)[3]
        threshold = self._thresholds(own, table)
        mask = threshold < (float(job.spec.time_limit_s) or math.inf)
        if job.id in self.owners:
            mask &= owner != job.id
        count = int(mask.sum())
        if not count:
            return None
        why = (
            f"kept up for it: dearer than its own {own.offer.sku} from {own.offer.provider} "
            f"at ${own.dollars_per_hour:.2f}/h"
        )
        key = (id(own), count, job.id if job.id in self.owners else None)
        return Refused(rows=mask, why=why, key=key)

    def _columns(self, table: NodeTable) -> tuple[object, np.ndarray, np.ndarray, np.ndarray]:
        """Per row of `table`: lease price ($/h, 0: none), busy seconds, owner job (-1: none).
        Tables of one cycle share their rows (copies keep them), so this is worked out once."""
        if self.columns is None or self.columns[0] is not table.ids:
            price = np.zeros(len(table))
            busy = np.zeros(len(table))
            owner = np.full(len(table), -1, dtype=np.int64)
            for node_id, (p, b, o) in self.priced.items():
                row = table.pos.get(node_id)
                if row is not None:
                    price[row], busy[row], owner[row] = p, b, -1 if o is None else o
            self.columns = (table.ids, price, busy, owner)
            self.thresholds = {}
        return self.columns

    def _thresholds(self, own: Option, table: NodeTable) -> np.ndarray:
        """Per row: the time limit past which a job whose own lease is `own` is refused there
        (inf: never)."""
        _, price, busy, _ = self._columns(table)
        hit = self.thresholds.get(id(own))
        if hit is None or hit[0] is not own:
            rate = own.dollars_per_hour
            dearer = (price > rate) & np.isfinite(busy)
            with np.errstate(divide="ignore", invalid="ignore"):
                at = np.where(dearer, price * busy / (price - rate), math.inf)
            hit = self.thresholds[id(own)] = (own, at)
        return hit[1]

    def _own(self, job: Job) -> Option | None:
        """The node `job` would lease for itself (one replica, or its one node); None when no
        offer fits it or its queue's budget allows none."""
        excluded = self.failed.get(job.id, frozenset())
        queue = job.spec.queue if job.spec.queue in self.budgets.budgets else ""
        key = (offer_key(job.spec, self.limits), excluded, queue)
        if key not in self.own:
            offers = [o for o in self.offers if (o.provider, o.sku) not in excluded]
            if job.spec.kind is JobKind.TRAINING:
                options, _ = gang_options(job, offers)
            else:
                options, _ = replica_options(job, 1, offers)
            affordable = (o for o in options if not self.budgets.over(job, o))
            self.own[key] = next(affordable, None)
        return self.own[key]


@dataclass(frozen=True, slots=True)
class Refused:
    """Rows of a node table a job may not use (`LeaseBlocks.refused`), all for one reason;
    `key` tells refusals apart (the same key: the same rows)."""

    rows: np.ndarray  # bool per row
    why: str
    key: tuple[object, ...]


class _Prefixes:
    """Nodes each refused from a threshold on: a job with time limit T (inf: none) is refused
    those whose threshold is below T, a prefix of them sorted by threshold."""

    def __init__(self, entries: Sequence[tuple[float, str, str]]) -> None:
        ordered = sorted(entries)
        self.thresholds = [t for t, _, _ in ordered]
        self.items = [(node_id, why) for _, node_id, why in ordered]

    def __bool__(self) -> bool:
        return bool(self.items)

    def count(self, limit: float) -> int:
        return bisect.bisect_left(self.thresholds, limit)

    def first(self, limit: float) -> dict[str, str]:
        return dict(self.items[: self.count(limit)])


def busy_seconds(jobs: Sequence[Job], now: datetime) -> dict[str, float]:
    """Per node holding work: seconds from `now` until the last job there reaches its time
    limit (inf when one has none); what `LeaseBlocks` weighs the cost of keeping a node by."""
    out: dict[str, float] = {}
    for job in jobs:
        if job.placement is None:
            continue
        limit = job.spec.time_limit_s
        if not limit:
            left = math.inf
        else:
            started = job.started_at or now
            left = max(0.0, limit - (now - started).total_seconds())
        for node_id in job.placement.node_ids:
            out[node_id] = max(out.get(node_id, 0.0), left)
    return out
