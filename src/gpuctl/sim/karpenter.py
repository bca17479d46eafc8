"""Benchmark B4's fleet (b'): a Kubernetes cluster whose nodes Karpenter provisions, as a team
would run this workload there today.

What it imitates, with its parameters:

- **Pods.** Each training gang is one pod a node (its `gpus_per_node` GPUs); each replica one
  pod. GPUs are whole integer resources, as the NVIDIA device plugin gives them: a share of a
  GPU asks for a whole one. Teams name the GPU model they train on (`TRAINING_GPU`) in every
  pod's node selector, serving included, and a NodePool's requirements carry a workload's
  floors (a gang's pods ask for the fabric it needs, a replica's for its memory).
- **Scheduling.** kube-scheduler binds a pending pod to the first node (oldest first) with
  free GPUs of the model it names, counting nodes Karpenter is still launching (it nominates
  pods to them). There is no gang scheduling and no topology: a gang's pods bind one by one
  as room appears and hold their GPUs while the rest wait; the job runs once all of them are
  bound and their nodes are up.
- **Provisioning.** Pending pods that fit nowhere are batched: a batch closes 1 s after the
  last pod joined it, or 10 s after the first (Karpenter's `batchIdleDuration` and
  `batchMaxDuration`). Its pods are packed first-fit decreasing (most GPUs first) onto new
  nodes, each the instance type of the catalog that fits the pod it opens with at the least
  price per GPU the batch can fill (`price / min(GPUs, GPUs still to place that fit it)`).
  A node is up `boot_s` after launch.
- **Consolidation.** A node with no pods for `consolidate_after_s` (the NodePool's
  `consolidateAfter`) is deleted. Moving running pods to pack nodes tighter or onto a cheaper
  type (Karpenter's underutilised consolidation) is not modelled: training pods carry
  `karpenter.sh/do-not-disrupt` as teams set it, and a replica moved restarts. Without it
  this baseline pays at least what Karpenter would; the README says so.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpuctl.core.leasing import Offer, offer_misfit
from gpuctl.core.model import JobSpec
from gpuctl.core.plugins import RankRequest, replica_share
from gpuctl.sim.lease_replay import Bill, Outcome, Served, tokens_per_s
from gpuctl.sim.workload import TRAINING_GPU, Demand, Workload

BATCH_IDLE_S = 1.0  # Karpenter's batchIdleDuration
BATCH_MAX_S = 10.0  # Karpenter's batchMaxDuration
DEFAULT_CONSOLIDATE_AFTER_S = 300.0  # as the idle timer of (b) and gpuctl's idle grace


@dataclass(slots=True)
class _Node:
    offer: Offer
    launched_s: float
    ready_s: float
    free: int
    pods: int = 0
    empty_since: float = 0.0


@dataclass(slots=True)
class _Pod:
    demand: Demand
    spec: JobSpec  # what the pod asks of a node: the demand's, naming the team's model
    kind: int  # pods alike in `spec` share one (`_Karpenter.kinds`)
    gpus: int
    node: _Node | None = None


def karpenter_fleet(
    workload: Workload,
    offers: Sequence[Offer],
    *,
    boot_s: float,
    consolidate_after_s: float = DEFAULT_CONSOLIDATE_AFTER_S,
    model: str = TRAINING_GPU,
) -> Outcome:
    """(b'): the workload's pods on nodes Karpenter launches from `offers` (see the module)."""
    return _Karpenter(workload, offers, boot_s, consolidate_after_s, model).run()


class _Karpenter:
    def __init__(
        self,
        workload: Workload,
        offers: Sequence[Offer],
        boot_s: float,
        consolidate_after_s: float,
        model: str,
    ) -> None:
        self.workload = workload
        self.offers = offers
        self.boot_s = boot_s
        self.consolidate_after_s = consolidate_after_s
        self.model = model
        self.nodes: list[_Node] = []  # oldest first
        self.pending: list[_Pod] = []
        self.pods: dict[int, list[_Pod]] = {}  # demand -> its pods, until it ends
        self.waiting: set[int] = set()  # demands not started yet
        self.events: list[tuple[float, int, str, object]] = []
        self.order = itertools.count()
        self.bills: list[Bill] = []
        self.served: list[Served] = []
        self.ended: dict[int, float] = {}
        self.batch: tuple[float, float] | None = None  # (first pod joined, last pod joined)
        self.kinds: dict[JobSpec, int] = {}
        self.fitting: dict[tuple[int, int, int], bool] = {}

    def at(self, t: float, kind: str, what: object = None) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, what))

    def run(self) -> Outcome:
        for d in self.workload.demands:
            self.at(d.arrival_s, "arrive", d)
            if not d.training:
                self.at(d.until_s, "end", d)
        while self.events:
            t, _, kind, what = heapq.heappop(self.events)
            if kind == "arrive":
                self._arrive(t, what)  # type: ignore[arg-type]
            elif kind == "end":
                self._end(t, what)  # type: ignore[arg-type]
            elif kind == "batch":
                if self.batch is not None and t >= self._batch_close() - 1e-9:
                    self._provision(t)
            elif kind == "empty":
                self._consolidate(t, what)  # type: ignore[arg-type]
            self._bind(t)
            self._start(t)
        end = self.workload.window_s
        self.bills.extend(self._bill(n, max(end, n.launched_s)) for n in self.nodes)
        return Outcome(bills=tuple(self.bills), served=tuple(self.served), ended=self.ended)

    # -- pods ------------------------------------------------------------------------------

    def _arrive(self, t: float, d: Demand) -> None:
        if d.training:
            count, gpus = d.spec.num_nodes, d.spec.gpus_per_node
        else:  # whole GPUs, as the device plugin counts them
            count, gpus = 1, math.ceil(replica_share(RankRequest.of(d.spec)))
        spec = replace(d.spec, name="", command=(), gpu_model=self.model)
        kind = self.kinds.setdefault(spec, len(self.kinds))
        pods = [_Pod(demand=d, spec=spec, kind=kind, gpus=gpus) for _ in range(count)]
        if not any(self._fits(pods[0], o) for o in self.offers):
            return  # no instance type fits it: it never runs
        self.pods[d.id] = pods
        self.waiting.add(d.id)
        self.pending.extend(pods)
        if self.batch is not None:
            self.batch = (self.batch[0], t)
            self.at(self._batch_close(), "batch")

    def _end(self, t: float, d: Demand) -> None:
        """A replica no longer wanted, or a gang done: its pods go, their GPUs free up."""
        self.waiting.discard(d.id)
        for pod in self.pods.pop(d.id, ()):
            node = pod.node
            if node is None:
                self.pending.remove(pod)
                continue
            node.free += pod.gpus
            node.pods -= 1
            if not node.pods:
                node.empty_since = t
                self.at(t + self.consolidate_after_s, "empty", node)

    def _bind(self, t: float) -> None:
        """kube-scheduler: each pending pod to the oldest node with room for it (counting the
        nodes still launching, to which Karpenter nominates pods)."""
        still = []
        for pod in self.pending:
            node = next(
                (n for n in self.nodes if n.free >= pod.gpus and self._fits(pod, n.offer)), None
            )
            if node is None:
                still.append(pod)
                continue
            pod.node = node
            node.free -= pod.gpus
            node.pods += 1
        self.pending = still
        if still and self.batch is None:
            self.batch = (t, t)
            self.at(self._batch_close(), "batch")

    def _start(self, t: float) -> None:
        """Start each demand whose pods are all bound, on nodes that are up."""
        for demand_id in sorted(self.waiting):
            pods = self.pods[demand_id]
            if any(p.node is None for p in pods):
                continue
            up = max(p.node.ready_s for p in pods if p.node is not None)
            if up > t:
                continue  # its node's "ready" comes at `up`
            self.waiting.discard(demand_id)
            d = pods[0].demand
            if d.training:
                end = t + d.duration_s
                self.ended[d.id] = end
                self.served.append(Served(demand_id=d.id, start_s=t, end_s=end, gpus=d.gpus))
                self.at(end, "end", d)
            elif t < d.until_s:
                node = pods[0].node
                assert node is not None
                rate = tokens_per_s(
                    d.spec.weights_gb, node.offer.hbm_gbps, replica_share(RankRequest.of(d.spec))
                )
                self.served.append(
                    Served(
                        demand_id=d.id, start_s=t, end_s=d.until_s, gpus=d.gpus, tokens_per_s=rate
                    )
                )

    # -- Karpenter ---------------------------------------------------------------------------

    def _batch_close(self) -> float:
        assert self.batch is not None
        first, last = self.batch
        return min(first + BATCH_MAX_S, last + BATCH_IDLE_S)

    def _provision(self, t: float) -> None:
        """The batch's pods, most GPUs first, onto new nodes: a pod that fits none opened in
        this batch opens one, of the type with the least price per GPU the batch can fill."""
        self.batch = None
        batch = sorted(self.pending, key=lambda p: (-p.gpus, p.demand.id))
        room: list[tuple[Offer, int]] = []  # the batch's new nodes, with what is left on each
        for i, pod in enumerate(batch):
            slot = next(
                (j for j, (o, free) in enumerate(room) if free >= pod.gpus and self._fits(pod, o)),
                None,
            )
            if slot is not None:
                offer, free = room[slot]
                room[slot] = (offer, free - pod.gpus)
                continue
            rest = batch[i:]

            def per_useful_gpu(o: Offer, rest: list[_Pod] = rest) -> tuple[float, str, str]:
                fill = sum(p.gpus for p in rest if self._fits(p, o))
                return (o.price_per_hour / min(o.gpu_count, fill), o.provider, o.sku)

            offer = min((o for o in self.offers if self._fits(pod, o)), key=per_useful_gpu)
            room.append((offer, offer.gpu_count - pod.gpus))
        for offer, _ in room:
            node = _Node(offer=offer, launched_s=t, ready_s=t + self.boot_s, free=offer.gpu_count)
            node.empty_since = t
            self.nodes.append(node)
            self.at(node.ready_s, "ready")
            self.at(t + self.consolidate_after_s, "empty", node)

    def _consolidate(self, t: float, node: _Node) -> None:
        """consolidateAfter: a node empty that long is deleted."""
        if node.pods or node not in self.nodes:
            return
        if t < node.empty_since + self.consolidate_after_s - 1e-9:
            return
        self.nodes.remove(node)
        self.bills.append(self._bill(node, t))

    def _fits(self, pod: _Pod, offer: Offer) -> bool:
        """The pod's node selector (the model teams name) and NodePool requirements (its
        floors: a gang's fabric, a replica's memory and bandwidth) on one instance type."""
        key = (pod.kind, pod.gpus, id(offer))  # the offers live as long as the run
        found = self.fitting.get(key)
        if found is None:
            spec = pod.spec
            found = (
                offer.gpu_count >= pod.gpus
                and not offer_misfit(spec, RankRequest.of(spec), offer)
                and (not spec.is_gang or offer.network_gbps > 0)
            )
            self.fitting[key] = found
        return found

    @staticmethod
    def _bill(node: _Node, end: float) -> Bill:
        return Bill(
            sku=node.offer.sku,
            gpus=node.offer.gpu_count,
            price_per_hour=node.offer.price_per_hour,
            start_s=node.launched_s,
            end_s=end,
        )
