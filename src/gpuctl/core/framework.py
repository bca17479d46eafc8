"""The scheduling framework's extension points, declared (the Kubernetes scheduler framework's
Filter, PreScore and Score). Every filter and score inherits one of the classes here, and the
cycle knows what a plugin can do from what it declares, never by probing for a method:

- `FilterPlugin.filter`, `ScorePlugin.score`: the per-node form, the reference;
- `column_form = True` (`ColumnFilter.codes`, `ColumnScore.scores`): the column form, exactly the
  per-node figures for many nodes at once (see `core.plugins` for the contract). The cycle
  runs by columns when every plugin of its policy declares them, node by node otherwise;
- `reads_free = False`: the plugin reads only what a node is, never what it has free, so its
  answer for a node holds all cycle;
- `facet(job)`: what of a job a score reads beyond its shape (`core.engine.verdicts.shape`); None,
  the default: nothing;
- `prepare(context)` (PreScore): the score as it will run in one cycle, having seen the whole
  of it; itself by default, None when it has nothing to say in this cycle.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from gpuctl.core.engine.nodetable import NodeTable
    from gpuctl.core.model import Job, JobKind
    from gpuctl.core.plugins import CycleContext, RankRequest, Status
    from gpuctl.core.snapshot import NodeView


class FilterPlugin:
    """Can one rank of `job` go on `node`? A status value, never an exception."""

    __slots__ = ()
    name: ClassVar[str]
    kinds: ClassVar[frozenset[JobKind]]
    column_form: ClassVar[bool] = False
    reads_free: ClassVar[bool] = True

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        raise NotImplementedError


class ColumnFilter(FilterPlugin):
    """A filter that also answers by columns."""

    __slots__ = ()
    column_form: ClassVar[bool] = True

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Code per row as int8, a key per row): rows this filter rules out with equal codes
        and keys get the same reason, so the reason is worded once per key (by `filter` on
        one of them)."""
        raise NotImplementedError


class ScorePlugin:
    """How good `node` is for one rank of `job`: 0 (worst) to 1 (best), so weights compare."""

    __slots__ = ()
    name: ClassVar[str]
    kinds: ClassVar[frozenset[JobKind]]
    column_form: ClassVar[bool] = False
    reads_free: ClassVar[bool] = True

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        raise NotImplementedError

    def facet(self, job: Job) -> Hashable:
        return None

    def prepare(self, context: CycleContext) -> ScorePlugin | None:
        return self


class ColumnScore(ScorePlugin):
    """A score that also answers by columns."""

    __slots__ = ()
    column_form: ClassVar[bool] = True

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        """The score of each row, as float64 (rows the filters pass; others may be asked)."""
        raise NotImplementedError
