"""The `Store` contract, run against every backend (SQLite file, PostgreSQL schema).

A new backend passes this file or it is not a store.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, fields, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from gpuctl.core.cost import AttemptCharge
from gpuctl.core.errors import InvalidArgument, NotFound, NotLeader
from gpuctl.core.model import (
    BandwidthProfile,
    Event,
    Gpu,
    IbPort,
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    NetKind,
    Network,
    Node,
    NodeLease,
    NodeState,
    OnNodeLost,
    Placement,
    RankPlacement,
    RankState,
    RestartPolicy,
    SpreadPolicy,
)
from gpuctl.core.trust import ApiToken, AuditEntry, TokenKind
from gpuctl.store import SqlStore, Store, open_store
from gpuctl.store.memory import MemoryStore

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
IST = timezone(timedelta(hours=5, minutes=30))  # a non-UTC zone: values must come back UTC


# -- builders -----------------------------------------------------------------------------------


def training(**changes: object) -> JobSpec:
    spec = JobSpec(
        kind=JobKind.TRAINING,
        command=("torchrun", "train.py"),
        owner="alice",
        queue="research",
        num_nodes=2,
        gpus_per_node=8,
    )
    return replace(spec, **changes)


def full_spec() -> JobSpec:
    """Every field away from its default, so a round trip that drops one fails."""
    return JobSpec(
        kind=JobKind.INFERENCE,
        command=("vllm", "serve", "llama-70b"),
        name="serve-llama",
        owner="bob",
        queue="prod",
        priority=7,
        env=(("HF_HOME", "/cache"), ("A", "b=c")),
        secret_env=("A",),
        working_dir="/srv",
        time_limit_s=3600,
        num_nodes=3,
        gpus_per_node=4,
        min_nvlink_gbps=450.5,
        min_net_gbps=400.0,
        replicas=5,
        gpu_milli=250,
        gpu_memory_mib=40_960,
        gpu_model="H100 SXM",
        cpu_milli=8000,
        memory_mib=65_536,
        on_node_lost=OnNodeLost.FAIL,
        preemptible=True,
        target_tokens_per_s=30.5,
        weights_gb=14.0,
        restart_policy=RestartPolicy.ALWAYS,
        max_surge=2,
        max_unavailable=1,
        min_ready_s=30,
        progress_deadline_s=120,
        readiness_http="/health",  # (validation takes one of the two; the store keeps both)
        readiness_tcp=True,
        spread=SpreadPolicy.NONE,
    )


def placement() -> Placement:
    return Placement(
        ranks=(
            RankPlacement(
                rank=0,
                node_id="n1",
                gpu_indices=(0, 1),
                gpu_milli=500,
                cpu_milli=4000,
                memory_mib=32_768,
                state=RankState.EXITED,
                exit_code=137,
                message="OOM-killed",
                restarts=2,
                last_failure="exited with 1",
                started_at=T0.astimezone(IST) + timedelta(minutes=1),
                ended_at=T0 + timedelta(minutes=2, microseconds=7),
                generation=3,
                port=31004,
                ready=True,
            ),
            RankPlacement(rank=1, node_id="n2", gpu_indices=(3,)),
        ),
        master_addr="10.0.0.1",
        master_port=29500,
        reason="one leaf, 2 nodes",
        next_rank=4,
        generation=3,
        previous_spec=training(),
        previous_generation=2,
    )


def h100_profile() -> BandwidthProfile:
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{i:04d}",
            model="H100 SXM",
            memory_mib=81_559,
            hbm_gbps=3352.0,
            nvlink_gbps=900.0,
            measured_hbm_gbps=2971.25 + i,
            mig_enabled=i == 0,
            pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
            nvlink_links_active=18 - (i == 3),
            nvlink_links_total=18,
            nvlink_version=4,
            nvlink_peers=tuple(f"00000000:{0x18 + j:02X}:00.0" for j in range(8) if j != i),
            pcie_gen=5,
            pcie_width=16,
            pcie_max_gen=5,
            pcie_max_width=16,
            numa_node=i // 4,
            cpu_affinity="0-47,96-143" if i < 4 else "48-95,144-191",
        )
        for i in range(8)
    )
    return BandwidthProfile(
        gpus=gpus,
        nvlink_domain_size=8,
        pcie_gen=5,
        pcie_width=16,
        network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400.0),
        ib_ports=tuple(
            IbPort(
                device=f"mlx5_{i}",
                port=1,
                rate_gbps=400.0,
                state="ACTIVE",
                phys_state="LinkUp",
                link_layer="InfiniBand",
                guid=f"0xb83fd203001a{i:04x}",
            )
            for i in range(8)
        ),
        bf16_tflops=7916.0,
        source="nvml",
        measured_at=datetime(2025, 3, 1, 17, 30, 0, 123456, tzinfo=IST),
    )


def node(node_id: str = "n1", **changes: object) -> Node:
    full = Node(
        id=node_id,
        address="10.0.0.1",
        fabric="ib0/spine1/leaf3",
        provider="lambda",
        sku="gpu_8x_h100_sxm5",
        region="us-east-1",
        labels=(("zone", "b"), ("tier", "gold")),
        cpu_milli=208_000,
        memory_mib=1_900_000,
        profile=h100_profile(),
        price_per_hour=23.92,
        state=NodeState.DRAINING,
        state_reason="maintenance",
        health_issues=("GPU 3: NVLink 17/18 links active",),
        lease_id="lease-1",
        registered_at=T0,
        last_heartbeat=T0.astimezone(IST) + timedelta(seconds=5),
    )
    return replace(full, **changes)


def lease(lease_id: str, state: LeaseState = LeaseState.ACTIVE, **changes: object) -> NodeLease:
    full = NodeLease(
        id=lease_id,
        provider="lambda",
        provider_lease_id=f"i-{lease_id}",
        node_id="n1",
        sku="gpu_8x_h100_sxm5",
        price_per_hour=23.92,
        acquired_at=T0,
        expires_at=T0 + timedelta(hours=4),
        released_at=T0.astimezone(IST) + timedelta(hours=1),
        for_job_id=42,
        state=state,
        idle_since=T0 + timedelta(minutes=30),
    )
    return replace(full, **changes)


def event(object_id: str, type_: str, minute: int, object_kind: str = "job") -> Event:
    return Event(
        object_kind=object_kind,
        object_id=object_id,
        time=T0 + timedelta(minutes=minute),
        type=type_,
        message=f"{type_} at minute {minute}",
    )


def assert_every_field_set(value: object) -> None:
    """Round-trip tests only prove what their values exercise: no field may sit at its default."""
    for f in fields(value):  # type: ignore[arg-type]
        if f.default is not MISSING:
            assert getattr(value, f.name) != f.default, f"{type(value).__name__}.{f.name}"
        elif f.default_factory is not MISSING:
            assert getattr(value, f.name) != f.default_factory(), f"{type(value).__name__}.{f.name}"


def token(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        # A directory that does not exist yet: opening the store creates it.
        return f"sqlite:///{tmp_path_factory.mktemp('store')}/state/gpuctl.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "memory"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """Each store the contract holds for: SQLite, PostgreSQL and in memory."""
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('store')}/state/gpuctl.db"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_store(url)
    yield opened
    opened.close()


def submit(store: Store, spec: JobSpec | None = None, *, request_id: str = "") -> Job:
    job, created = store.create_job(spec or training(), request_id=request_id, now=T0)
    assert created
    return job


def set_state(store: Store, job: Job, state: JobState) -> Job:
    if state is job.state:
        return job
    (written,) = store.update_jobs([replace(job, state=state)])
    return written


# -- jobs ---------------------------------------------------------------------------------------


def test_create_job_gives_increasing_ids_and_revisions(store: SqlStore) -> None:
    results = [
        store.create_job(training(name=f"j{i}"), request_id="", now=T0 + timedelta(seconds=i))
        for i in range(3)
    ]

    assert [created for _, created in results] == [True, True, True]
    jobs = [job for job, _ in results]
    assert jobs[0].id >= 1
    assert [j.id for j in jobs] == sorted({j.id for j in jobs})
    assert [j.revision for j in jobs] == sorted({j.revision for j in jobs})
    first = jobs[0]
    assert (first.state, first.attempt, first.placement) == (JobState.PENDING, 0, None)
    assert first.created_at == first.updated_at == T0
    assert store.get_job(first.id) == first


def test_create_job_with_a_seen_request_id_returns_the_first_job(store: SqlStore) -> None:
    first, created = store.create_job(training(name="a"), request_id="req-1", now=T0)
    again, created_again = store.create_job(
        training(name="b"), request_id="req-1", now=T0 + timedelta(minutes=1)
    )
    other, created_other = store.create_job(training(name="b"), request_id="req-2", now=T0)

    assert (created, created_again, created_other) == (True, False, True)
    assert again == first
    assert first.request_id == "req-1"
    assert other.id > first.id
    assert len(store.list_jobs().jobs) == 2


def test_racing_creates_with_one_request_id_make_one_job(store: SqlStore) -> None:
    callers = 8
    barrier = threading.Barrier(callers, timeout=10)

    def create(i: int) -> tuple[Job, bool]:
        barrier.wait()
        return store.create_job(training(name=f"c{i}"), request_id="race", now=T0)

    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(create, range(callers)))

    assert sum(created for _, created in results) == 1
    assert len({job for job, _ in results}) == 1
    assert len(store.list_jobs().jobs) == 1


def test_concurrent_writers_get_distinct_ids_and_revisions(store: SqlStore) -> None:
    def create_and_update(i: int) -> tuple[Job, Job]:
        job = submit(store, training(name=f"w{i}"))
        return job, set_state(store, job, JobState.RUNNING)

    with ThreadPoolExecutor(8) as pool:
        pairs = list(pool.map(create_and_update, range(24)))

    assert len({created.id for created, _ in pairs}) == 24
    revisions = [j.revision for pair in pairs for j in pair]
    assert len(set(revisions)) == 48
    assert all(created.revision < updated.revision for created, updated in pairs)


# (owner, queue, state) of the jobs `list_jobs` pages through, in id order.
LISTED = [
    ("alice", "research", JobState.PENDING),
    ("bob", "research", JobState.RUNNING),
    ("alice", "prod", JobState.RUNNING),
    ("alice", "research", JobState.SUCCEEDED),
    ("carol", "prod", JobState.PENDING),
    ("bob", "research", JobState.PENDING),
    ("alice", "research", JobState.RUNNING),
    ("alice", "prod", JobState.CANCELLED),
]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param({}, [0, 1, 2, 3, 4, 5, 6, 7], id="no-filter"),
        pytest.param({"states": [JobState.RUNNING]}, [1, 2, 6], id="one-state"),
        pytest.param(
            {"states": [JobState.PENDING, JobState.RUNNING]}, [0, 1, 2, 4, 5, 6], id="two-states"
        ),
        pytest.param({"queue": "research"}, [0, 1, 3, 5, 6], id="queue"),
        pytest.param({"owner": "alice"}, [0, 2, 3, 6, 7], id="owner"),
        pytest.param(
            {"owner": "alice", "queue": "research", "states": [JobState.PENDING, JobState.RUNNING]},
            [0, 6],
            id="owner-queue-states",
        ),
        pytest.param({"owner": "nobody"}, [], id="no-match"),
    ],
)
def test_list_jobs_pages_through_filtered_jobs_in_id_order(
    store: SqlStore, filters: dict[str, object], expected: list[int]
) -> None:
    ids = [
        set_state(store, submit(store, training(owner=owner, queue=queue)), state).id
        for owner, queue, state in LISTED
    ]
    page_size = 2

    pages = []
    page_token = ""
    while True:
        page = store.list_jobs(page_size=page_size, page_token=page_token, **filters)  # type: ignore[arg-type]
        pages.append([job.id for job in page.jobs])
        if not page.next_page_token:
            break
        page_token = page.next_page_token

    assert [i for page in pages for i in page] == [ids[i] for i in expected]
    # Full pages, then the rest; no empty page at the end.
    assert len(pages) == max(1, math.ceil(len(expected) / page_size))
    assert all(len(p) == page_size for p in pages[:-1])


@pytest.mark.parametrize(
    ("page_size", "expected_len"),
    [
        pytest.param(0, 5, id="zero-means-default"),
        pytest.param(3, 3, id="smaller"),
        pytest.param(5000, 5, id="cut-to-max"),
    ],
)
def test_list_jobs_page_size(store: SqlStore, page_size: int, expected_len: int) -> None:
    for _ in range(5):
        submit(store)

    assert len(store.list_jobs(page_size=page_size).jobs) == expected_len


def test_list_jobs_rejects_a_negative_page_size(store: SqlStore) -> None:
    with pytest.raises(InvalidArgument) as raised:
        store.list_jobs(page_size=-1)

    assert [v.field for v in raised.value.violations] == ["page_size"]


@pytest.mark.parametrize(
    "page_token",
    [
        pytest.param("not base64!", id="not-base64"),
        pytest.param("é", id="non-ascii"),
        pytest.param(token("hello"), id="foreign-payload"),
        pytest.param(token("jobs:"), id="no-id"),
        pytest.param(token("jobs:-3"), id="negative-id"),
        pytest.param(token("jobs:1 "), id="trailing-space"),
        pytest.param(base64.urlsafe_b64encode(b"\xff\xfe").decode(), id="not-text"),
    ],
)
def test_list_jobs_rejects_a_malformed_page_token(store: SqlStore, page_token: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        store.list_jobs(page_token=page_token)

    assert [v.field for v in raised.value.violations] == ["page_token"]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.get_job(404), id="get_job"),
        pytest.param(lambda s: s.get_node("nowhere"), id="get_node"),
        pytest.param(lambda s: s.update_jobs([Job(id=404, spec=training())]), id="update_jobs"),
    ],
)
def test_unknown_ids_raise_not_found(store: SqlStore, call: Callable[[Store], object]) -> None:
    with pytest.raises(NotFound):
        call(store)


def test_update_jobs_with_an_unknown_job_writes_nothing(store: SqlStore) -> None:
    job = submit(store)

    with pytest.raises(NotFound) as raised:
        store.update_jobs([replace(job, state=JobState.RUNNING), Job(id=404, spec=training())])

    assert raised.value.name == "404"
    assert store.get_job(job.id) == job
    assert store.jobs_since(job.revision) == ()


def test_update_jobs_assigns_growing_revisions_that_jobs_since_follows(store: SqlStore) -> None:
    a, b, c = (submit(store) for _ in range(3))

    updated = store.update_jobs(
        [replace(b, state=JobState.RUNNING), replace(a, state=JobState.RUNNING)]
    )

    assert [j.id for j in updated] == [b.id, a.id]
    assert c.revision < updated[0].revision < updated[1].revision
    assert store.jobs_since(c.revision) == updated
    assert store.jobs_since(0) == (c, *updated)  # revision order, not id order
    assert store.jobs_since(updated[-1].revision) == ()
    assert store.update_jobs([]) == ()


def test_respec_job_writes_the_new_spec_with_the_state_and_events(store: SqlStore) -> None:
    job = submit(store, full_spec())
    scaled = replace(job, spec=replace(job.spec, replicas=9), state=JobState.RUNNING)

    written = store.respec_job(scaled, [event(str(job.id), "Scaled", 1)])

    assert written == replace(scaled, revision=written.revision)
    assert written.revision > job.revision
    assert store.get_job(job.id) == written
    assert [e.type for e in store.list_events("job", str(job.id))] == ["Scaled"]
    # A later update_jobs keeps the new spec (it writes none).
    (again,) = store.update_jobs([replace(written, reason="x")])
    assert store.get_job(job.id).spec.replicas == 9 == again.spec.replicas


@pytest.mark.parametrize("field", ["owner", "queue", "name", "priority"])
def test_respec_job_refuses_to_change_what_the_row_repeats_of_the_spec(store, field) -> None:
    job = submit(store, full_spec())
    value = 1 if field == "priority" else "other"

    with pytest.raises(ValueError, match="only the spec's other fields"):
        store.respec_job(replace(job, spec=replace(job.spec, **{field: value})))

    assert store.get_job(job.id) == job
    with pytest.raises(NotFound):
        store.respec_job(replace(job, id=404))


def test_update_jobs_round_trips_every_field(store: SqlStore) -> None:
    created, _ = store.create_job(full_spec(), request_id="full", now=T0.astimezone(IST))
    changed = replace(
        created,
        state=JobState.FAILED,
        attempt=2,
        placement=placement(),
        reason="rank 0 exited 137",
        exit_code=137,
        end_state=JobState.TIMEOUT,
        started_at=T0.astimezone(IST) + timedelta(minutes=1),
        finished_at=T0 + timedelta(minutes=9, microseconds=1),
        updated_at=T0 + timedelta(minutes=9, microseconds=1),
    )
    assert_every_field_set(changed)
    assert_every_field_set(changed.spec)
    assert changed.placement is not None
    assert_every_field_set(changed.placement)
    assert_every_field_set(changed.placement.ranks[0])

    (written,) = store.update_jobs([changed])

    assert written == replace(changed, revision=written.revision)
    assert store.get_job(created.id) == written
    assert all(
        t is not None and t.tzinfo is UTC
        for t in (written.created_at, written.started_at, written.finished_at, written.updated_at)
    )


def test_naive_datetimes_are_refused(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.create_job(training(), request_id="", now=datetime(2025, 3, 1, 12, 0))

    assert store.list_jobs().jobs == ()


def test_active_jobs_are_the_unfinished_ones_in_id_order(store: SqlStore) -> None:
    jobs = {state: set_state(store, submit(store), state) for state in JobState}

    active = store.active_jobs()

    expected = [JobState.PENDING, JobState.RUNNING, JobState.CANCELLING]
    assert active == tuple(jobs[s] for s in expected)


# -- nodes and leases ---------------------------------------------------------------------------


def test_node_round_trips_with_its_full_bandwidth_profile(store: SqlStore) -> None:
    original = node()
    assert_every_field_set(original)
    assert_every_field_set(original.profile)
    assert_every_field_set(original.profile.network)
    assert_every_field_set(original.profile.gpus[0])

    stored = store.put_node(original)

    assert stored == original
    assert store.get_node("n1") == original
    got = store.get_node("n1")
    assert got.profile.measured_at is not None and got.profile.measured_at.tzinfo is UTC
    assert got.last_heartbeat is not None and got.last_heartbeat.tzinfo is UTC


def test_put_node_replaces_by_id_and_list_nodes_is_in_id_order(store: SqlStore) -> None:
    for node_id in ("n2", "n10", "n1"):
        store.put_node(node(node_id))
    lost = node("n2", state=NodeState.LOST, profile=BandwidthProfile(), labels=())

    assert store.put_node(lost) == lost

    assert store.list_nodes() == (node("n1"), node("n10"), lost)


def test_leases_round_trip_and_ended_ones_are_listed_on_request(store: SqlStore) -> None:
    leases = [
        lease("l1", LeaseState.ACTIVE),
        lease("l2", LeaseState.RELEASED),
        lease("l3", LeaseState.REQUESTED, for_job_id=None, acquired_at=None),
        lease("l4", LeaseState.EXPIRED),
        lease("l5", LeaseState.RELEASING),
        lease("l6", LeaseState.FAILED),
    ]
    assert_every_field_set(leases[0])
    for one in reversed(leases):
        assert store.put_lease(one) == one

    assert store.list_leases() == (leases[0], leases[2], leases[4])
    assert store.list_leases(include_released=True) == tuple(leases)

    released = replace(leases[0], state=LeaseState.RELEASED)
    store.put_lease(released)
    assert store.list_leases() == (leases[2], leases[4])


# -- events -------------------------------------------------------------------------------------


def test_events_are_listed_oldest_first_per_object(store: SqlStore) -> None:
    store.add_events([event("1", "Scheduled", 2), event("1", "Submitted", 0)])
    store.add_events([event("2", "Submitted", 1), event("1", "Started", 3)])
    store.add_events([event("n1", "Registered", 1, object_kind="node"), event("1", "Bound", 2)])
    store.add_events([])

    listed = store.list_events("job", "1")

    # By time; equal times keep the order they were added in.
    assert [e.type for e in listed] == ["Submitted", "Scheduled", "Bound", "Started"]
    assert listed[0] == event("1", "Submitted", 0)
    assert store.list_events("node", "n1") == (event("n1", "Registered", 1, object_kind="node"),)
    assert store.list_events("node", "1") == ()


@pytest.mark.parametrize(
    ("limit", "expected_minutes"),
    [
        pytest.param(2, [3, 4], id="latest-two"),
        pytest.param(5, [0, 1, 2, 3, 4], id="exactly-all"),
        pytest.param(100, [0, 1, 2, 3, 4], id="more-than-all"),
        pytest.param(0, [], id="zero"),
    ],
)
def test_list_events_limit_keeps_the_latest(
    store: SqlStore, limit: int, expected_minutes: list[int]
) -> None:
    store.add_events([event("7", f"E{m}", m) for m in range(5)])

    listed = store.list_events("job", "7", limit=limit)

    assert listed == tuple(event("7", f"E{m}", m) for m in expected_minutes)


def test_ended_attempts_charges_are_kept_once_each_and_listed_by_end(store: SqlStore) -> None:
    def ended(job_id: int, attempt: int, hours: int, dollars: float) -> AttemptCharge:
        return AttemptCharge(
            job_id=job_id,
            attempt=attempt,
            queue="train",
            owner="ada",
            started_at=T0,
            ended_at=T0 + timedelta(hours=hours),
            dollars=dollars,
            gpu_hours=8.0 * hours,
        )

    store.add_charges([ended(2, 0, 1, 24.0), ended(1, 1, 3, 72.0)])
    store.add_charges([ended(1, 0, 2, 48.0), ended(2, 0, 1, 24.0)])  # (2, 0) again: once
    store.add_charges([])

    assert store.list_charges() == (
        ended(1, 0, 2, 48.0),
        ended(1, 1, 3, 72.0),
        ended(2, 0, 1, 24.0),
    )
    # Those ending after `since` (a charge that ended before it holds nothing after it).
    since = T0 + timedelta(hours=1)
    assert [(c.job_id, c.attempt) for c in store.list_charges(since=since)] == [(1, 0), (1, 1)]


# -- durability and opening ---------------------------------------------------------------------


def test_data_survives_close_and_reopen(store_url: str) -> None:
    first = open_store(store_url)
    job, _ = first.create_job(full_spec(), request_id="keep", now=T0)
    (job,) = first.update_jobs([replace(job, state=JobState.RUNNING, placement=placement())])
    first.put_node(node())
    first.put_lease(lease("l1"))
    first.add_events([event(str(job.id), "Submitted", 0)])
    first.close()

    second = open_store(store_url)
    try:
        assert second.get_job(job.id) == job
        assert second.create_job(training(), request_id="keep", now=T0) == (job, False)
        later = submit(second)
        assert (later.id, later.revision) > (job.id, job.revision)
        assert second.list_nodes() == (node(),)
        assert second.list_leases() == (lease("l1"),)
        assert second.list_events("job", str(job.id)) == (event(str(job.id), "Submitted", 0),)
    finally:
        second.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("mysql://root@localhost/gpuctl", id="unknown-backend"),
        pytest.param("sqlite://", id="sqlite-in-memory"),
        pytest.param("not a url", id="not-a-url"),
    ],
)
def test_open_store_rejects_unsupported_urls(url: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        open_store(url)

    assert [v.field for v in raised.value.violations] == ["url"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param({}, 8, id="all"),
        pytest.param({"owner": "alice"}, 5, id="owner"),
        pytest.param({"states": (JobState.PENDING,), "owner": "alice"}, 1, id="pending-of-one"),
        pytest.param({"states": (JobState.PENDING, JobState.RUNNING)}, 6, id="states"),
    ],
)
def test_count_jobs(store: SqlStore, filters: dict[str, object], expected: int) -> None:
    for owner, queue, state in LISTED:
        set_state(store, submit(store, training(owner=owner, queue=queue)), state)
    assert store.count_jobs(**filters) == expected  # type: ignore[arg-type]


def test_tokens_round_trip_and_are_listed_by_principal(store: SqlStore) -> None:
    made = [
        ApiToken(
            id=f"t{i}",
            kind=kind,
            principal=who,
            secret_hash="ab" * 32,
            description="laptop",
            created_by="ada",
            created_at=T0 + timedelta(minutes=i),
            expires_at=T0 + timedelta(days=90) if i else None,
        )
        for i, (kind, who) in enumerate(
            [(TokenKind.USER, "alice"), (TokenKind.NODE, "gpu-1"), (TokenKind.USER, "alice")]
        )
    ]
    for token in made:
        store.put_token(token)
    assert store.get_token("t1") == made[1]
    assert [t.id for t in store.list_tokens(principal="alice")] == ["t0", "t2"]
    assert [t.id for t in store.list_tokens()] == ["t0", "t1", "t2"]
    revoked = dataclasses.replace(made[0], revoked_at=T0 + timedelta(hours=1))
    store.put_token(revoked)
    assert store.get_token("t0") == revoked
    with pytest.raises(NotFound):
        store.get_token("nope")


def test_audit_keeps_the_latest_entries_oldest_first(store: SqlStore) -> None:
    for i in range(5):
        store.add_audit(
            AuditEntry(
                time=T0 + timedelta(minutes=i),
                principal="alice" if i % 2 else "bob",
                role="user",
                via="token",
                peer="ipv4:127.0.0.1:5000",
                action="CancelJob",
                target=f"jobs/{i}",
                outcome="ok",
            )
        )
    assert [e.target for e in store.list_audit(limit=3)] == ["jobs/2", "jobs/3", "jobs/4"]
    assert [e.target for e in store.list_audit(principal="alice")] == ["jobs/1", "jobs/3"]
    since = store.list_audit(since=T0 + timedelta(minutes=2))
    assert [e.target for e in since] == ["jobs/3", "jobs/4"]
    assert all(e.id > 0 and e.time.tzinfo is not None for e in since)


def test_current_revision_is_the_last_handed_out(store: SqlStore) -> None:
    assert store.current_revision() == 0
    job = submit(store)
    assert store.current_revision() == job.revision
    (moved,) = store.update_jobs([dataclasses.replace(job, reason="waiting")])
    assert store.current_revision() == moved.revision > job.revision
    assert store.jobs_since(store.current_revision()) == ()


def test_purge_deletes_the_oldest_finished_jobs_with_their_events_only(store: SqlStore) -> None:
    def finished(state: JobState, at: datetime) -> Job:
        job = submit(store)
        (written,) = store.update_jobs([replace(job, state=state, finished_at=at)])
        store.add_events(
            [Event(object_kind="job", object_id=str(job.id), time=at, type="X", message="")]
        )
        return written

    old = [
        finished(s, T0 + timedelta(minutes=i))
        for i, s in enumerate((JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))
    ]
    recent = finished(JobState.SUCCEEDED, T0 + timedelta(days=2))
    running = set_state(store, submit(store), JobState.RUNNING)
    store.add_events(
        [Event(object_kind="node", object_id=str(old[0].id), time=T0, type="Y", message="")]
    )
    cutoff = T0 + timedelta(days=1)

    assert store.purge_finished_jobs(cutoff, limit=2) == (old[0].id, old[1].id)  # oldest first
    assert store.purge_finished_jobs(cutoff, limit=2) == (old[2].id,)
    assert store.purge_finished_jobs(cutoff, limit=2) == ()
    assert [j.id for j in store.list_jobs().jobs] == [recent.id, running.id]
    assert store.list_events("job", str(old[0].id)) == ()
    assert [e.type for e in store.list_events("job", str(recent.id))] == ["X"]
    assert [e.type for e in store.list_events("node", str(old[0].id))] == ["Y"]  # not a job's
    with pytest.raises(NotFound):
        store.get_job(old[0].id)
    job, created = store.create_job(training(), request_id="", now=T0)
    assert created and job.id > running.id  # an id is never handed out again


def test_purge_audit_deletes_entries_older_than_the_cutoff(store: SqlStore) -> None:
    for minutes in (0, 1, 2):
        store.add_audit(
            AuditEntry(
                time=T0 + timedelta(minutes=minutes),
                principal="alice",
                role="user",
                via="unix",
                peer="",
                action="CreateJob",
                target="jobs/1",
                outcome="ok",
            )
        )
    assert store.purge_audit(T0 + timedelta(minutes=2), limit=1) == 1
    assert store.purge_audit(T0 + timedelta(minutes=2), limit=10) == 1
    assert [a.time for a in store.list_audit()] == [T0 + timedelta(minutes=2)]


def test_load_jobs_keeps_their_ids_and_later_jobs_follow(store: SqlStore) -> None:
    loaded = [Job(id=i, spec=training(name=f"old{i}"), created_at=T0) for i in (5, 9)]
    event = Event(object_kind="job", object_id="9", time=T0, type="Submitted", message="old")
    before = store.current_revision()
    store.load_jobs(loaded, [event])
    assert [j.id for j in store.list_jobs().jobs] == [5, 9]
    assert store.get_job(9).spec.name == "old9"
    assert store.list_events("job", "9") == (event,)
    assert [j.id for j in store.jobs_since(before)] == [5, 9]  # new revisions: watchers see them
    assert submit(store).id == 10
    store.analyze()  # statistics after a bulk load: the rows stay as they were
    assert [j.id for j in store.list_jobs().jobs] == [5, 9, 10]


def test_failed_offers_are_kept_until_forgotten(store: SqlStore) -> None:
    store.note_failed_offer(7, "lambda", "gpu_8x_h100_sxm5", T0)
    store.note_failed_offer(7, "aws", "p5.48xlarge", T0 + timedelta(minutes=1))
    store.note_failed_offer(7, "lambda", "gpu_8x_h100_sxm5", T0 + timedelta(minutes=2))  # again
    assert store.failed_offers(since=T0 - timedelta(hours=1)) == (
        (7, "aws", "p5.48xlarge", T0 + timedelta(minutes=1)),
        (7, "lambda", "gpu_8x_h100_sxm5", T0 + timedelta(minutes=2)),
    )
    assert len(store.failed_offers(since=T0 + timedelta(minutes=1))) == 1
    store.forget_failed_offers(before=T0 + timedelta(minutes=1))
    assert [f[1] for f in store.failed_offers(since=T0 - timedelta(hours=1))] == ["lambda"]


def test_purge_events_deletes_the_old_events_of_the_kinds_asked(store: SqlStore) -> None:
    store.add_events(
        [event("n1", "Registered", 0, "node"), event("n1", "Drain", 5, "node"),
         event("L1", "Granted", 0, "lease"), event("1", "Submitted", 0)]
    )  # fmt: skip
    cutoff = T0 + timedelta(minutes=3)
    assert store.purge_events(("node", "lease"), cutoff, limit=1) == 1
    assert store.purge_events(("node", "lease"), cutoff, limit=10) == 1
    assert store.purge_events(("node", "lease"), cutoff, limit=10) == 0
    assert [e.type for e in store.list_events("node", "n1")] == ["Drain"]
    assert store.list_events("lease", "L1") == ()
    assert [e.type for e in store.list_events("job", "1")] == ["Submitted"]  # not asked


def test_touch_node_moves_only_the_last_heartbeat(store: SqlStore) -> None:
    stored = store.put_node(node("n1"))
    later = T0.astimezone(IST) + timedelta(minutes=3)

    store.touch_node("n1", later)

    assert store.get_node("n1") == replace(stored, last_heartbeat=later)
    with pytest.raises(NotFound):
        store.touch_node("n404", later)
    with pytest.raises(ValueError, match="naive"):
        store.touch_node("n1", datetime(2025, 3, 1, 12, 0))


def test_list_nodes_of_some_ids(store: SqlStore) -> None:
    for name in ("n3", "n1", "n2"):
        store.put_node(node(name))
    assert [n.id for n in store.list_nodes(["n3", "n1", "n9", "n1"])] == ["n1", "n3"]
    assert store.list_nodes([]) == ()
    assert [n.id for n in store.list_nodes()] == ["n1", "n2", "n3"]


def test_the_memory_store_fences_writes_to_the_leases_epoch() -> None:
    # What test_leadership checks of two SQL stores on one database, on the one object a
    # MemoryStore is: a write under a lapsed epoch is refused and names the new leader.
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    mine = store.claim_leadership("a", address="a:1", agent_address="a:2", ttl_s=4)
    store.fence(mine.epoch)
    submit(store)  # ours to write
    now[0] += 5  # our lease lapsed, and b claims it
    theirs = store.claim_leadership("b", address="b:1", agent_address="b:2", ttl_s=4)
    assert theirs.holder == "b" and theirs.epoch == mine.epoch + 1
    assert not store.renew_leadership("a", mine.epoch, 4)
    with pytest.raises(NotLeader) as refused:
        submit(store)
    assert (refused.value.leader, refused.value.leader_agent) == ("b:1", "b:2")
    assert len(store.list_jobs().jobs) == 1
    store.fence(None)  # no check: a single gpuctld
    submit(store)
