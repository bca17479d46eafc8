"""The leader lease in the store and the fencing of writes by its epoch, on every backend.

Two `SqlStore`s on one database stand for two gpuctld: each has its own engine and pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from gpuctl.core.errors import NotLeader, Unavailable
from gpuctl.core.model import JobKind, JobSpec
from gpuctl.runtime.leadership import Elector, ElectorSettings
from gpuctl.store import SqlStore, open_store

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SPEC = JobSpec(kind=JobKind.TRAINING, command=("true",), owner="alice", queue="q")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('store')}/gpuctl.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def pair(url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    a, b = open_store(url), open_store(url)
    yield a, b
    a.close()
    b.close()


def claim(store: SqlStore, name: str, ttl_s: float = 60.0):
    return store.claim_leadership(
        name, address=f"{name}:50051", agent_address=f"{name}:50052", ttl_s=ttl_s
    )


def test_the_first_claim_leads_and_the_second_waits(pair: tuple[SqlStore, SqlStore]) -> None:
    a, b = pair
    assert not a.leader().live  # a new store: nobody leads
    won = claim(a, "a")
    assert (won.holder, won.epoch, won.address, won.agent_address) == ("a", 1, "a:50051", "a:50052")
    assert 59 < won.expires_in_s <= 60
    seen = claim(b, "b")
    assert (seen.holder, seen.epoch) == ("a", 1) and seen.live
    assert (b.leader().holder, b.leader().epoch) == ("a", 1)


def test_a_restart_under_the_same_name_takes_over_at_once_with_a_new_epoch(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, again = pair
    assert claim(a, "head1").epoch == 1
    assert claim(again, "head1").epoch == 2
    assert not a.renew_leadership("head1", 1, 60.0)  # the old process lost it
    assert again.renew_leadership("head1", 2, 60.0)


def test_a_resigned_or_lapsed_lease_goes_to_the_next_claim(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, b = pair
    claim(a, "a")
    a.resign_leadership("a", 1)
    assert not b.leader().live
    assert (claim(b, "b").holder, b.leader().epoch) == ("b", 2)
    assert not a.renew_leadership("a", 1, 60.0)
    a.resign_leadership("a", 1)  # not ours any more: no effect
    assert b.leader().live
    claim(b, "b", ttl_s=0.0)  # b renews with no time left: lapsed at once
    assert (claim(a, "a").holder, a.leader().epoch) == ("a", 4)


def test_writes_commit_only_under_the_current_epoch(pair: tuple[SqlStore, SqlStore]) -> None:
    a, b = pair
    a.fence(claim(a, "a").epoch)
    b.fence(0)  # a standby writes nothing
    job, _ = a.create_job(SPEC, request_id="", now=T0)
    with pytest.raises(NotLeader) as refused:
        b.create_job(SPEC, request_id="", now=T0)
    assert (refused.value.leader, refused.value.leader_agent) == ("a:50051", "a:50052")
    assert b.get_job(job.id) == job  # reads are served

    a.resign_leadership("a", 1)
    b.fence(claim(b, "b").epoch)
    with pytest.raises(NotLeader, match="the leader is at b:50051"):
        a.update_jobs([job])  # the old leader, paused over the takeover, binds nothing
    with pytest.raises(NotLeader):
        a.create_job(SPEC, request_id="late", now=T0)
    assert a.count_jobs() == 1  # rolled back: nothing of the refused writes stayed
    (written,) = b.update_jobs([job])
    assert written.revision > job.revision


def test_a_lapsed_leader_names_no_one(pair: tuple[SqlStore, SqlStore]) -> None:
    a, b = pair
    a.fence(claim(a, "a", ttl_s=0.0).epoch)
    b.fence(0)
    with pytest.raises(NotLeader, match="no leader right now") as refused:
        b.create_job(SPEC, request_id="", now=T0)
    assert refused.value.leader == ""
    a.create_job(SPEC, request_id="", now=T0)  # still a's epoch: its writes are safe


def test_racing_claims_make_one_leader_per_epoch(url: str) -> None:
    stores = [open_store(url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            results = list(pool.map(lambda i: claim(stores[i], f"h{i}"), range(len(stores))))
        holders = {r.holder for r in results}
        assert len(holders) == 1 and {r.epoch for r in results} == {1}
    finally:
        for s in stores:
            s.close()


# -- the elector ----------------------------------------------------------------------------


class Ticking:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Flaky:
    """A store whose renewals fail while `down` (the database unreachable)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def renew_leadership(self, *args, **kwargs):
        if self.down:
            raise Unavailable("store: connection refused")
        return self.store.renew_leadership(*args, **kwargs)


def elector(store, name: str, clock: Ticking, events: list[str]) -> Elector:
    return Elector(
        store,
        ElectorSettings(name=name, address=f"{name}:1", agent_address=f"{name}:2", ttl_s=4.0),
        monotonic=clock,
        on_lead=lambda epoch: events.append(f"{name} leads {epoch}"),
        on_lost=lambda why: events.append(f"{name} lost: {why}"),
    )


def test_one_elector_leads_the_other_stands_by_then_takes_over_when_it_resigns(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, b = pair
    b.fence(0)  # as gpuctld does before it serves
    clock, events = Ticking(), []
    ea, eb = elector(a, "a", clock, events), elector(b, "b", clock, events)
    assert ea.tick() == 1.0 and ea.leading  # renews every second
    assert eb.tick() == 0.5 and not eb.leading  # claims every half second
    a.create_job(SPEC, request_id="", now=T0)  # fenced at a's epoch: it writes
    with pytest.raises(NotLeader, match="a:1"):
        b.create_job(SPEC, request_id="", now=T0)  # fenced shut: the standby does not
    assert ea.tick() == 1.0  # renewed
    ea.resign()
    assert not ea.leading
    with pytest.raises(NotLeader):
        a.create_job(SPEC, request_id="", now=T0)
    eb.tick()
    assert eb.leading and events == ["a leads 1", "b leads 2"]
    b.create_job(SPEC, request_id="", now=T0)


def test_a_leader_that_cannot_renew_for_its_ttl_stops_leading(url: str) -> None:
    store = Flaky(open_store(url))
    try:
        clock, events = Ticking(), []
        e = elector(store, "a", clock, events)
        e.tick()
        store.down = True
        clock.t += 3.9
        assert e.tick() == 1.0 and e.leading  # a blip: it keeps leading, and retries
        clock.t += 0.2
        assert e.tick() == 0.0 and not e.leading and e.lost
        assert events[-1].startswith("a lost: the store was unreachable for 4.1s")
        store.down = False
        with pytest.raises(NotLeader):  # fenced shut, though its epoch is still current
            store.create_job(SPEC, request_id="", now=T0)
        assert e.tick() == 0.0 and events[-1].startswith("a lost")  # once
    finally:
        store.store.close()


def test_a_leader_whose_epoch_was_taken_stops_at_its_next_renewal(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, again = pair
    clock, events = Ticking(), []
    first = elector(a, "head", clock, events)
    first.tick()
    elector(again, "head", clock, events).tick()  # the same name, restarted: leads at once
    assert first.tick() == 0.0 and not first.leading
    assert events == [
        "head leads 1",
        "head leads 2",
        "head lost: another gpuctld claimed the lease",
    ]


def test_a_leader_that_cannot_start_leading_resigns_and_stops(
    pair: tuple[SqlStore, SqlStore],
) -> None:
    a, b = pair
    clock, events = Ticking(), []

    def broken(epoch: int) -> None:
        raise OSError("providers.toml: no such file")

    e = Elector(
        a,
        ElectorSettings(name="a", address="a:1", agent_address="a:2"),
        monotonic=clock,
        on_lead=broken,
        on_lost=events.append,
    )
    assert e.tick() == 0.0 and e.lost and not e.leading
    assert events == ["could not start leading: providers.toml: no such file"]
    assert not b.leader().live  # resigned: a standby takes over at once
    with pytest.raises(NotLeader):
        a.create_job(SPEC, request_id="", now=T0)
