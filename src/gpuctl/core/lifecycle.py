"""Job, node and lease state machines as transition tables: a missing entry is an illegal
transition."""

from __future__ import annotations

import enum
import signal
from dataclasses import replace
from datetime import datetime

from gpuctl.core.errors import IllegalTransition
from gpuctl.core.model import Job, JobState, LeaseState, NodeState, RankState


class JobEvent(enum.StrEnum):
    BIND = "bind"  # the cycle placed it
    CANCEL = "cancel"  # the user asked; a running job goes through CANCELLING
    ALL_EXITED_OK = "all-exited-ok"
    RANK_FAILED = "rank-failed"
    STOPPED = "stopped"  # every rank of a cancelling job has exited
    STOPPED_AT_LIMIT = "stopped-at-limit"  # ... of a job stopped for its time limit
    NODE_LOST_REQUEUE = "node-lost-requeue"
    PREEMPT = "preempt"  # higher-priority work takes its GPUs: requeued as a new attempt
    NODE_LOST_FAIL = "node-lost-fail"
    TIME_LIMIT = "time-limit"


J = JobState
JOB_TRANSITIONS: dict[JobState, dict[JobEvent, JobState]] = {
    J.PENDING: {JobEvent.BIND: J.RUNNING, JobEvent.CANCEL: J.CANCELLED},
    J.RUNNING: {
        JobEvent.CANCEL: J.CANCELLING,
        JobEvent.ALL_EXITED_OK: J.SUCCEEDED,
        JobEvent.RANK_FAILED: J.FAILED,
        JobEvent.NODE_LOST_REQUEUE: J.PENDING,
        JobEvent.PREEMPT: J.PENDING,
        JobEvent.NODE_LOST_FAIL: J.NODE_LOST,
        JobEvent.TIME_LIMIT: J.CANCELLING,
    },
    J.CANCELLING: {
        JobEvent.STOPPED: J.CANCELLED,
        JobEvent.STOPPED_AT_LIMIT: J.TIMEOUT,
        JobEvent.CANCEL: J.CANCELLING,
        JobEvent.NODE_LOST_REQUEUE: J.CANCELLED,
        JobEvent.NODE_LOST_FAIL: J.CANCELLED,
        JobEvent.TIME_LIMIT: J.CANCELLING,
    },
    J.SUCCEEDED: {},
    J.FAILED: {},
    J.CANCELLED: {},
    J.TIMEOUT: {},
    J.NODE_LOST: {},
}


class NodeEvent(enum.StrEnum):
    REGISTER = "register"
    DRAIN = "drain"
    HEARTBEAT_MISSED = "heartbeat-missed"
    RELEASE = "release"
    DEGRADE = "degrade"  # the agent reports health issues
    RECOVER = "recover"  # the agent reports none again
    UNDRAIN = "undrain"  # an operator lifts a drain


N = NodeState
NODE_TRANSITIONS: dict[NodeState, dict[NodeEvent, NodeState]] = {
    N.READY: {
        NodeEvent.REGISTER: N.READY,
        NodeEvent.DRAIN: N.DRAINING,
        NodeEvent.HEARTBEAT_MISSED: N.LOST,
        NodeEvent.RELEASE: N.RELEASED,
        NodeEvent.DEGRADE: N.DEGRADED,
        NodeEvent.RECOVER: N.READY,
    },
    N.DRAINING: {
        NodeEvent.REGISTER: N.DRAINING,
        NodeEvent.DRAIN: N.DRAINING,
        NodeEvent.HEARTBEAT_MISSED: N.LOST,
        NodeEvent.RELEASE: N.RELEASED,
        # An operator's drain outlives a hardware problem: it is lifted by hand, not by health.
        NodeEvent.DEGRADE: N.DRAINING,
        NodeEvent.RECOVER: N.DRAINING,
        NodeEvent.UNDRAIN: N.READY,
    },
    N.DEGRADED: {
        NodeEvent.REGISTER: N.DEGRADED,
        NodeEvent.DRAIN: N.DRAINING,
        NodeEvent.HEARTBEAT_MISSED: N.LOST,
        NodeEvent.RELEASE: N.RELEASED,
        NodeEvent.DEGRADE: N.DEGRADED,
        NodeEvent.RECOVER: N.READY,
    },
    N.LOST: {NodeEvent.REGISTER: N.READY, NodeEvent.DRAIN: N.LOST, NodeEvent.RELEASE: N.RELEASED},
    N.RELEASED: {NodeEvent.REGISTER: N.READY},
}


def next_job_state(job_id: int, state: JobState, event: JobEvent) -> JobState:
    try:
        return JOB_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition("job", str(job_id), state.value, event.value) from None


def end_ranks(job: Job, now: datetime) -> Job:
    """A finished job with every rank in a final state: one never started is EXITED with no
    exit code; one still running is being stopped by its agent, EXITED too, and its exit code
    is recorded if its agent reports one."""
    if not job.state.finished or job.placement is None:
        return job
    if not any(r.live for r in job.placement.ranks):
        return job
    ranks = tuple(
        replace(
            r,
            state=RankState.EXITED,
            ended_at=now,
            message=f"{'never started' if r.state is RankState.ASSIGNED else 'stopped'}: the "
            f"job is {job.state.value}",
        )
        if r.live
        else r
        for r in job.placement.ranks
    )
    return replace(job, placement=replace(job.placement, ranks=ranks))


def exit_text(code: int | None, message: str = "") -> str:
    """How a process ended, from its exit code (negative: killed by that signal) and what its
    agent said (which, for a signal, says it already: "killed by SIGKILL after the stop
    grace")."""
    if message and code is not None and code < 0:
        return message
    if message:
        return f"{exit_text(code)}: {message}"
    if code is None:
        return "ended (exit code unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"was killed by signal {-code}"
        return f"was killed by {name} (signal {-code})"
    return f"exited with {code}"


def next_node_state(node_id: str, state: NodeState, event: NodeEvent) -> NodeState:
    try:
        return NODE_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition("node", node_id, state.value, event.value) from None


class LeaseEvent(enum.StrEnum):
    GRANTED = "granted"  # the provider answered the acquire: a lease id, maybe a node name
    REGISTERED = "registered"  # the node's agent registered
    RENEWED = "renewed"
    RELEASE = "release"  # the job it served is done (or gone), or nothing uses its node
    RELEASED = "released"  # the provider confirmed the release
    EXPIRED = "expired"  # past the provider's time limit, or the provider no longer holds it
    # The acquire was refused or failed, or the node never registered (and was given back):
    # the provider holds nothing; the cycle tries the next-best offer.
    FAILED = "failed"


LS = LeaseState
LEASE_TRANSITIONS: dict[LeaseState, dict[LeaseEvent, LeaseState]] = {
    LS.REQUESTED: {
        LeaseEvent.GRANTED: LS.REQUESTED,
        LeaseEvent.REGISTERED: LS.ACTIVE,
        LeaseEvent.RELEASE: LS.RELEASING,
        LeaseEvent.EXPIRED: LS.EXPIRED,
        LeaseEvent.FAILED: LS.FAILED,
    },
    LS.ACTIVE: {
        LeaseEvent.REGISTERED: LS.ACTIVE,
        LeaseEvent.RENEWED: LS.ACTIVE,
        LeaseEvent.RELEASE: LS.RELEASING,
        LeaseEvent.EXPIRED: LS.EXPIRED,
    },
    LS.RELEASING: {
        LeaseEvent.RELEASE: LS.RELEASING,
        LeaseEvent.RELEASED: LS.RELEASED,
        # The provider let go of it first: nothing is left to release.
        LeaseEvent.EXPIRED: LS.RELEASED,
    },
    # Ended: nothing moves a lease out of these, so nothing is released twice.
    LS.RELEASED: {},
    LS.EXPIRED: {},
    LS.FAILED: {},
}


def next_lease_state(lease_id: str, state: LeaseState, event: LeaseEvent) -> LeaseState:
    try:
        return LEASE_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition("lease", lease_id, state.value, event.value) from None
