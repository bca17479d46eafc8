"""Fits(node) of one job for the reservation planner (`core.backfill`), read off the verdicts
where the node is one the cycle has, checked once per likeness where it is a what-if node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gpuctl.core.engine.verdicts import Shape, check, columnar, filter_codes
from gpuctl.core.model import Job
from gpuctl.core.plugins import Code, Policy, RankRequest

if TYPE_CHECKING:
    from gpuctl.core.leasing import LeaseBlocks
    from gpuctl.core.snapshot import NodeView, Snapshot


class PlanFits:
    """Fits(node) of one job for planning a reservation: True fits now, False once work there
    ends, None never (or not because of its lease).

    Nodes as the cycle has them are read off the verdicts; the what-if nodes the planner
    builds (a node with some jobs gone) are checked once per likeness, since the filters read
    nothing but the node's kind and what it has free (`core.plugins`)."""

    def __init__(
        self,
        work: Snapshot,
        policy: Policy,
        job: Job,
        job_shape: Shape,
        lease_blocks: LeaseBlocks | None,
    ) -> None:
        self.work = work
        self.policy = policy
        self.job = job
        self.job_shape = job_shape
        self.lease_blocks = lease_blocks
        self.codes: np.ndarray | None = None
        self.alike: dict[tuple[Any, ...], bool | None] = {}
        self.ready = False  # the rest is worked out on the first call: most holds make none

    def _get_ready(self) -> None:
        self.request = RankRequest.of(self.job.spec)
        # A node its lease rules out is no node to reserve either.
        blocks = self.lease_blocks
        self.leased_out = blocks.for_job(self.job) if blocks is not None else {}
        refused = blocks.refused(self.job, self.work.table) if blocks is not None else None
        self.refused = refused.rows if refused is not None else None
        self.columnar = columnar(self.policy)
        self.ready = True

    def __call__(self, view: NodeView) -> bool | None:
        if not self.ready:
            self._get_ready()
        if view.id in self.leased_out:
            return None
        t = self.work.table
        row = t.pos[view.id]
        if self.refused is not None and self.refused[row]:
            return None
        if self.columnar and t.views[row] is view:
            if self.codes is None:
                self.codes = filter_codes(
                    self.work, self.policy, self.job, self.request, self.job_shape
                )
            return _fit(int(self.codes[row]))
        if not self.columnar:
            return _fit(check(self.policy, self.job, self.request, view).code)
        key = (int(t.kind[row]), view.gpu_free_milli, view.cpu_free_milli, view.memory_free_mib)
        if key not in self.alike:
            self.alike[key] = _fit(check(self.policy, self.job, self.request, view).code)
        return self.alike[key]


def _fit(code: int) -> bool | None:
    return True if code == Code.SUCCESS else (None if code == Code.UNRESOLVABLE else False)
