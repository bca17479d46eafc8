"""A job that no node of the fleet nor any offer could ever run is refused at submission,
naming what cannot be met; one that cannot run only now is accepted and waits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpuctl.core.errors import FailedPrecondition
from gpuctl.core.leasing import Offer
from gpuctl.core.model import JobKind, JobSpec, JobState
from tests import test_controller
from tests.test_controller import h100_node, training

ctl = test_controller.ctl  # the fixture: a controller on SQLite with a fake clock


def serve(**kw) -> JobSpec:
    return JobSpec(kind=JobKind.INFERENCE, command=("serve",), gpus_per_node=1, **kw)


H200 = Offer(
    provider="cloud",
    sku="8x-h200",
    gpu_model="H200",
    gpu_count=8,
    gpu_memory_mib=143_000,
    hbm_gbps=4800,
    nvlink_gbps=900,
    network_gbps=3200,
    price_per_hour=50.0,
)


@pytest.fixture
def fleet(ctl):
    ctl.register_node(h100_node("a", fabric="ib-a/s1/l1"))
    ctl.register_node(h100_node("b", fabric="ib-a/s1/l2"))
    ctl.register_node(h100_node("c", fabric="ib-b/s1/l1"))
    return ctl


@pytest.mark.parametrize("validate_only", [False, True])
def test_a_gpu_model_the_fleet_has_none_of_is_refused_naming_it(fleet, validate_only):
    with pytest.raises(FailedPrecondition) as e:
        fleet.submit(serve(gpu_model="H200"), validate_only=validate_only)
    assert str(e.value) == (
        "this job could never run: it needs 1 GPU per replica, H200; no node fits (3 nodes "
        "with H100 SXM GPUs); no provider offers nodes to lease"
    )
    assert str(e.value).endswith("; no provider offers nodes to lease")
    assert fleet.store.list_jobs().jobs == ()


def test_a_gang_larger_than_any_fabric_is_refused(fleet):
    with pytest.raises(FailedPrecondition) as e:
        fleet.submit(training(nodes=3))
    assert str(e.value) == (
        "this job could never run: it needs 8 GPUs per node; a gang of 3 nodes needs them on "
        "one fabric; the largest fabric has 2 that fit; no provider offers nodes to lease"
    )
    assert fleet.submit(training(nodes=2)).state is JobState.PENDING  # fabric ib-a has 2


def test_more_replicas_than_the_fleet_holds_at_once_are_refused(fleet):
    with pytest.raises(FailedPrecondition, match="25 replicas start together and the whole "):
        fleet.submit(serve(replicas=25))
    assert fleet.submit(serve(replicas=24)).state is JobState.PENDING


def test_what_only_cannot_run_now_is_accepted_and_waits(fleet):
    for _ in range(3):
        fleet.submit(training(nodes=1))
    fleet.run_cycle()  # the fleet is full
    job = fleet.submit(training(nodes=1))
    fleet.run_cycle()
    job = fleet.store.get_job(job.id)
    assert job.state is JobState.PENDING and job.reason


def test_an_offer_that_fits_makes_it_possible(fleet):
    fleet.leases = SimpleNamespace(offers=(H200,))
    assert fleet.submit(serve(gpu_model="H200")).state is JobState.PENDING
    assert fleet.submit(training(nodes=3)).state is JobState.PENDING  # leased on one fabric
    with pytest.raises(FailedPrecondition) as e:
        fleet.submit(serve(gpu_model="B200"))
    assert str(e.value).endswith("; of 1 offers: 1 another GPU model")


def test_with_nothing_to_judge_by_everything_is_accepted(ctl):
    assert ctl.submit(training(nodes=64)).state is JobState.PENDING


def test_a_node_registering_is_counted_at_once(fleet):
    with pytest.raises(FailedPrecondition):
        fleet.submit(training(nodes=3))
    fleet.register_node(h100_node("d", fabric="ib-b/s2/l1"))
    fleet.register_node(h100_node("e", fabric="ib-b/s2/l2"))
    assert fleet.submit(training(nodes=3)).state is JobState.PENDING


def test_a_dry_run_says_where_the_job_would_land_or_why_it_would_wait(fleet):
    dry = fleet.submit(training(nodes=2), validate_only=True)
    assert dry.id == 0 and dry.reason.startswith("would start now: 0:a[GPU 0,1,2,3,4,5,6,7], ")
    for _ in range(3):
        fleet.submit(training(nodes=1))
    fleet.run_cycle()  # the fleet is full

    dry = fleet.submit(training(nodes=1), validate_only=True)

    assert dry.reason.startswith("would wait: ") and "GPUs free" in dry.reason
    assert len(fleet.store.list_jobs().jobs) == 3  # nothing stored


def test_with_queues_configured_an_unknown_queue_is_refused_naming_them(tmp_path):
    from gpuctl.core.errors import InvalidArgument
    from gpuctl.core.plugins import build_policy
    from gpuctl.runtime.clock import FakeClock
    from gpuctl.runtime.controller import Controller, ControllerSettings
    from gpuctl.runtime.logstore import LogStore
    from gpuctl.store.memory import MemoryStore

    store = MemoryStore()
    c = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
        ControllerSettings(queues=("default", "prod")),
    )
    with pytest.raises(InvalidArgument) as e:
        c.submit(training(queue="reserch"))
    assert [(v.field, v.description) for v in e.value.violations] == [
        ("spec.queue", "unknown queue 'reserch'; the queues: default, prod")
    ]
    assert c.submit(training(queue="prod")).state is JobState.PENDING
    store.close()
