"""Whether a job could ever run: on some node of the fleet as if it were empty and ready, or on
nodes the configured providers could lease. A job that could not is refused at submission
(Slurm: "Requested node configuration is not available") instead of waiting forever; one that
only cannot run now is accepted and waits with its reason.

The fleet is read as its kinds (`FleetKinds`): nodes alike in everything the filters read are
checked once, so a submit costs a few checks whatever the fleet's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpuctl.core.engine.verdicts import check
from gpuctl.core.leasing import Offer, floors, gang_options, offer_misfit
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, JobSpec, Node, NodeState
from gpuctl.core.plugins import Policy, RankRequest
from gpuctl.core.snapshot import empty_view

_SHOWN = 3  # reasons named in a refusal


def _kind(node: Node) -> Node:
    """What the filters read of a node, as if it were empty and ready: alike nodes compare equal."""
    return replace(
        node,
        id="",
        address="",
        fabric="",
        state=NodeState.READY,
        state_reason="",
        health_issues=(),
        lease_id="",
        registered_at=None,
        last_heartbeat=None,
        price_per_hour=0.0,
        provider="",
    )


@dataclass(frozen=True, slots=True)
class FleetKinds:
    """The fleet by kind: each kind with how many nodes of it each fabric has ("" for none)."""

    kinds: tuple[tuple[Node, tuple[tuple[str, int], ...]], ...]

    @classmethod
    def of(cls, nodes: Sequence[Node]) -> FleetKinds:
        counts: dict[Node, dict[str, int]] = {}
        for n in nodes:
            if n.state is NodeState.RELEASED:  # given back: only an offer brings it again
                continue
            fabrics = counts.setdefault(_kind(n), {})
            fabrics[n.fabric_name] = fabrics.get(n.fabric_name, 0) + 1
        return cls(tuple((k, tuple(sorted(f.items()))) for k, f in counts.items()))

    def __bool__(self) -> bool:
        return bool(self.kinds)


def shape(spec: JobSpec) -> tuple[object, ...]:
    """What `never_runs` reads of a spec: specs alike in it get the same verdict."""
    return (
        spec.kind,
        spec.num_nodes,
        spec.gpus_per_node,
        spec.replicas,
        spec.gpu_milli,
        spec.gpu_memory_mib,
        spec.gpu_model,
        spec.cpu_milli,
        spec.memory_mib,
        spec.min_nvlink_gbps,
        spec.min_net_gbps,
        spec.target_tokens_per_s,
        spec.weights_gb,
        spec.time_limit_s,  # an offer's lease may be too short for it
    )


def never_runs(spec: JobSpec, fleet: FleetKinds, offers: Sequence[Offer], policy: Policy) -> str:
    """Why no node of `fleet` (empty, ready) nor any offer could ever run the whole of `spec`,
    starting with what it needs; "" when something could, or when there is nothing to judge
    by (no node, no offer)."""
    if not fleet and not offers:
        return ""
    request = RankRequest.of(spec)
    why = _why_never(spec, request, fleet, offers, policy)
    return f"it needs {floors(spec, request)}; {why}" if why else ""


def _why_never(
    spec: JobSpec,
    request: RankRequest,
    fleet: FleetKinds,
    offers: Sequence[Offer],
    policy: Policy,
) -> str:
    job = Job(id=0, spec=spec)
    misses: dict[str, int] = {}
    per_fabric: dict[str, int] = {}  # nodes a rank fits, by fabric
    replicas = 0  # replicas the fleet holds at once
    for node, fabrics in fleet.kinds:
        view = empty_view(node)
        status = check(policy, job, request, view)
        if not status.ok:
            misses[status.reason] = misses.get(status.reason, 0) + sum(c for _, c in fabrics)
            continue
        for fabric, count in fabrics:
            per_fabric[fabric] = per_fabric.get(fabric, 0) + count
            replicas += count * _holds(request, node)
    offered = [o for o in offers if not offer_misfit(spec, request, o)]
    if spec.kind is JobKind.TRAINING:
        n = spec.num_nodes
        if n == 1 and per_fabric:
            return ""
        best = max((c for f, c in per_fabric.items() if f), default=0)
        if best >= n or gang_options(job, offers)[0]:
            return ""
        if per_fabric:
            why = (
                f"a gang of {n} nodes needs them on one fabric; the largest fabric has {best} "
                "that fit"
                if best
                else f"a gang of {n} nodes needs a fabric; the nodes that fit have none"
            )
            return why + _offers_line(spec, request, offers)
    elif offered or (per_fabric and replicas >= spec.replicas):
        return ""
    elif per_fabric:
        return (
            f"{spec.replicas} replicas start together and the whole fleet holds {replicas}"
            + _offers_line(spec, request, offers)
        )
    shown = sorted(misses.items(), key=lambda kv: (-kv[1], kv[0]))[:_SHOWN]
    nodes = "; ".join(f"{c} node{'s' * (c != 1)} {why}" for why, c in shown)
    head = f"no node fits ({nodes})" if nodes else "no node has registered"
    return head + _offers_line(spec, request, offers)


def _holds(request: RankRequest, node: Node) -> int:
    """Replicas an empty node of this kind holds by its GPUs, CPUs and memory (one passed every
    filter already; the count may be generous, never short)."""
    gpus = node.gpu_count
    if request.gpu_milli:
        count = gpus * (MILLI_PER_GPU // request.gpu_milli)
    elif request.gpus:
        count = gpus // request.gpus
    else:
        count = 1 << 30
    if request.cpu_milli:
        count = min(count, node.cpu_milli // request.cpu_milli)
    if request.memory_mib:
        count = min(count, node.memory_mib // request.memory_mib)
    return max(1, count)


def _offers_line(spec: JobSpec, request: RankRequest, offers: Sequence[Offer]) -> str:
    if not offers:
        return "; no provider offers nodes to lease"
    counts: dict[str, int] = {}
    for o in offers:
        why = offer_misfit(spec, request, o) or "too few for one gang"
        counts[why] = counts.get(why, 0) + 1
    shown = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_SHOWN]
    return f"; of {len(offers)} offers: " + ", ".join(f"{c} {why}" for why, c in shown)
