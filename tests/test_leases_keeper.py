"""The lease keeper with the static provider and a fake clock: a job's lease is requested by
the cycle, acquired by the keeper, active when its node registers, and released when the job
is done; idle grace; failing over to the next-best offer; renewal; reconciling after a restart
(nothing leaked, nothing released twice). No network, no sleeping.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from gpuctl.core.cost import CostBy
from gpuctl.core.errors import FailedPrecondition
from gpuctl.core.leasing import Budget
from gpuctl.core.model import (
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    NodeLease,
    NodeState,
    RankState,
)
from gpuctl.providers.base import Acquired, Held
from gpuctl.providers.catalog import CatalogProvider
from gpuctl.runtime.controller import RankRef
from gpuctl.runtime.leases import LeaseSettings, build_providers
from tests.lease_rig import H100_SKU, NoCapacity, Recording, Rig, agent_node, lab, training

S = LeaseState


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, [Recording(lab())], LeaseSettings(idle_grace_s=300, boot_timeout_s=600))
    yield r
    r.store.close()


def provider(rig: Rig) -> Recording:
    return rig.keeper.providers["lab"]  # type: ignore[return-value]


def test_acquire_then_active_on_registration_then_released_on_completion(rig):
    job = rig.ctl.submit(training(nodes=1, queue="research", owner="ada"))
    result = rig.ctl.run_cycle()
    (request,) = result.lease_requests
    assert (request.provider, request.sku, request.count) == ("lab", "hgx-h100", 1)
    (lease,) = rig.lease_of(job.id)
    assert (lease.state, lease.provider_lease_id) == (S.REQUESTED, "")  # asked, not yet granted
    assert "leasing 1x hgx-h100 from lab at $24.00/h" in rig.store.get_job(job.id).reason

    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert lease.state is S.REQUESTED and lease.provider_lease_id.startswith("lab/hgx-1/")
    assert lease.node_id == "hgx-1"  # the static provider picks the first of the island
    rig.ctl.run_cycle()
    assert "waiting for 1 leased node (hgx-h100 from lab) to register" in (
        rig.store.get_job(job.id).reason
    )

    node = rig.ctl.register_node(agent_node("hgx-1"))
    (lease,) = rig.lease_of(job.id)
    assert lease.state is S.ACTIVE
    assert (node.lease_id, node.provider, node.price_per_hour) == (lease.id, "lab", 24.0)

    rig.ctl.run_cycle()
    assert rig.store.get_job(job.id).placement.node_ids == ("hgx-1",)
    rig.run(job.id, hours=0.5)

    result = rig.ctl.run_cycle()  # the exit wakes a cycle: nothing queued fits, so at once
    (release,) = result.lease_releases
    assert release.lease_id == lease.id
    assert rig.lease_of(job.id)[0].state is S.RELEASING
    assert rig.store.get_node("hgx-1").state is NodeState.DRAINING  # no new work meanwhile

    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert lease.state is S.RELEASED
    assert provider(rig).released() == [lease.provider_lease_id]
    assert rig.store.get_node("hgx-1").state is NodeState.RELEASED
    assert provider(rig).held() == ()  # nothing leaked

    # The job held all 8 GPUs of a $24/h node for 30 minutes: $12, 4 GPU-hours.
    (row,) = rig.ctl.cost(by=CostBy.JOB).rows
    assert (row.key, row.dollars, row.gpu_hours) == (str(job.id), pytest.approx(12.0), 4.0)

    rig.keeper.tick()
    assert provider(rig).released() == [lease.provider_lease_id]  # never twice
    with pytest.raises(FailedPrecondition, match="in provider lab's inventory and not leased now"):
        rig.ctl.register_node(agent_node("hgx-1"))  # lent and taken back: not ours to use


def test_a_static_node_joins_only_while_leased_and_others_join_by_themselves(rig):
    with pytest.raises(FailedPrecondition, match="it joins when gpuctl leases it"):
        rig.ctl.register_node(agent_node("hgx-2"))
    own = rig.ctl.register_node(agent_node("workstation", gpus=1))
    (lease,) = [x for x in rig.leases() if x.id == own.lease_id]
    assert (lease.provider, lease.provider_lease_id, lease.state) == ("static", "", S.ACTIVE)


def test_a_gang_leases_one_island_and_starts_when_all_its_nodes_are_up(rig):
    job = rig.ctl.submit(training(nodes=2, min_net_gbps=1600))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    leases = rig.lease_of(job.id)
    assert sorted(x.node_id for x in leases) == ["hgx-1", "hgx-2"]
    rig.ctl.register_node(agent_node("hgx-1"))  # the agent says no fabric: the provider's
    assert rig.store.get_node("hgx-1").fabric == "ib/s1/l1"
    assert rig.ctl.run_cycle().lease_releases == ()  # the first node waits for the second
    rig.ctl.register_node(agent_node("hgx-2"))
    rig.ctl.run_cycle()
    assert rig.store.get_job(job.id).state is JobState.RUNNING
    rig.run(job.id)
    assert len(rig.ctl.run_cycle().lease_releases) == 2


def test_idle_grace_keeps_a_node_for_the_queued_job_that_takes_it(rig):
    first = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    rig.ctl.run_cycle()
    second = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()  # second: a lease of its own (hgx-2)
    (own,) = rig.lease_of(second.id)
    rig.run(first.id)
    # The cycle after the exit: the second job takes hgx-1 at once, and its own lease, not yet
    # active, is let go.
    result = rig.ctl.run_cycle()
    assert [b.job_id for b in result.bindings] == [second.id]
    assert [r.lease_id for r in result.lease_releases] == [own.id]
    kept = next(x for x in rig.leases() if x.node_id == "hgx-1")
    assert (kept.state, kept.for_job_id) == (S.ACTIVE, second.id)  # it serves job 2 now
    rig.run(second.id)
    assert [r.lease_id for r in rig.ctl.run_cycle().lease_releases] == [kept.id]


def test_a_warm_node_outlives_its_job_and_the_next_job_starts_on_it_at_once(tmp_path):
    rig = Rig(tmp_path, [Recording(lab())], LeaseSettings(idle_grace_s=300, warm_nodes=1))
    first = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    rig.ctl.run_cycle()
    rig.run(first.id)
    # Nothing waits for hgx-1, past any grace: kept all the same, the pool's one warm node.
    rig.clock.advance(timedelta(hours=2))
    assert rig.ctl.run_cycle().lease_releases == ()
    second = rig.ctl.submit(training(nodes=1))
    result = rig.ctl.run_cycle()
    assert [b.job_id for b in result.bindings] == [second.id]
    assert result.lease_requests == ()  # no new lease, no boot to wait out
    assert rig.store.get_job(second.id).placement.node_ids == ("hgx-1",)


@pytest.mark.parametrize("back_after_min", [29, 31])
def test_a_node_a_service_scaled_down_from_waits_its_service_grace(tmp_path, back_after_min):
    rig = Rig(tmp_path, [Recording(lab())], LeaseSettings(service_grace_s=1800))
    spec = JobSpec(
        kind=JobKind.INFERENCE, command=("serve",), replicas=2, gpus_per_node=8,
        gpu_model="H100 SXM",
    )  # fmt: skip
    job = rig.ctl.submit(spec)
    rig.ctl.run_cycle()
    rig.keeper.tick()
    for name in ("hgx-1", "hgx-2"):
        rig.ctl.register_node(agent_node(name))
    rig.ctl.run_cycle()
    assert len(rig.store.get_job(job.id).placement.ranks) == 2
    rig.ctl.scale(job.id, 1)
    (gone,) = {"hgx-1", "hgx-2"} - set(rig.store.get_job(job.id).placement.node_ids)
    assert rig.ctl.run_cycle().lease_releases == ()  # kept for the service
    rig.clock.advance(timedelta(minutes=back_after_min))
    result = rig.ctl.run_cycle()
    if back_after_min < 30:
        assert result.lease_releases == ()
        (lease,) = [x for x in rig.leases() if x.node_id == gone]
        assert rig.keeper.kept == {  # what `gpuctl leases` shows
            lease.id: f"for service {job.id}'s next scale-up (service grace, 0:01:00 left)"
        }
        rig.ctl.scale(job.id, 2)
        result = rig.ctl.run_cycle()
        assert result.lease_requests == ()  # no new lease, no boot to wait out
        assert gone in rig.store.get_job(job.id).placement.node_ids
    else:
        (release,) = result.lease_releases
        assert release.node_id == gone
        assert f"service {job.id} has not scaled back onto it within the service grace" in (
            release.reason
        )


def test_service_headroom_leases_a_node_ahead_for_a_running_service(tmp_path):
    rig = Rig(tmp_path, [Recording(lab())], LeaseSettings(service_headroom=1))
    spec = JobSpec(
        kind=JobKind.INFERENCE, command=("serve",), replicas=1, gpus_per_node=8,
        gpu_model="H100 SXM",
    )  # fmt: skip
    job = rig.ctl.submit(spec)
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    result = rig.ctl.run_cycle()  # the replica starts on hgx-1; hgx-2 is leased as headroom
    assert rig.store.get_job(job.id).placement.node_ids == ("hgx-1",)
    (request,) = result.lease_requests
    assert (request.job_id, request.sku) == (job.id, "hgx-h100")
    assert request.reason.startswith(f"headroom for service {job.id} (1 replica more ready)")
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-2"))
    rig.clock.advance(timedelta(hours=3))  # idle, past every grace: kept all the same
    assert rig.ctl.run_cycle().lease_releases == ()
    rig.ctl.scale(job.id, 2)
    result = rig.ctl.run_cycle()  # the new replica starts at once on hgx-2...
    assert set(rig.store.get_job(job.id).placement.node_ids) == {"hgx-1", "hgx-2"}
    (request,) = result.lease_requests  # ...and the next headroom is asked for
    assert request.job_id == job.id and request.reason.startswith("headroom for service")


def test_idle_grace_holds_for_a_queued_job_that_would_use_the_node_then_ends(tmp_path):
    # The queue may lease nothing more, so the 2-node gang waits: it would use hgx-1, which is
    # kept for the grace (300 s) and no longer.
    settings = LeaseSettings(idle_grace_s=300, budgets={"small": Budget(dollars_per_hour=30)})
    rig = Rig(tmp_path, [Recording(lab())], settings)
    first = rig.ctl.submit(training(nodes=1, queue="small"))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    rig.ctl.run_cycle()
    gang = rig.ctl.submit(training(nodes=2, queue="small"))
    rig.ctl.run_cycle()
    assert "over budget: queue small leases $24.00/h of its $30.00/h" in (
        rig.store.get_job(gang.id).reason
    )
    rig.run(first.id)
    assert rig.ctl.run_cycle().lease_releases == ()
    rig.clock.advance(timedelta(seconds=299))
    assert rig.ctl.run_cycle().lease_releases == ()
    rig.clock.advance(timedelta(seconds=1))
    (release,) = rig.ctl.run_cycle().lease_releases
    assert "idle for 0:05:00 (idle grace 0:05:00)" in release.reason


def test_capacity_unavailable_fails_over_to_the_next_best_offer_and_says_so(tmp_path):
    cheap = replace(H100_SKU, provider="flaky", name="h100-cheap", price_per_hour=10.0)
    flaky = NoCapacity(cheap)
    rig = Rig(tmp_path, [flaky, Recording(lab())])
    job = rig.ctl.submit(training(nodes=1))
    (first,) = rig.ctl.run_cycle().lease_requests
    assert (first.provider, first.sku) == ("flaky", "h100-cheap")
    rig.keeper.tick()
    (failed,) = rig.lease_of(job.id)
    assert failed.state is S.FAILED
    reason = rig.store.get_job(job.id).reason
    assert "lease of 1x h100-cheap from flaky failed: provider flaky: sku h100-cheap: 0 of 1" in (
        reason
    )
    assert "the next cycle tries the next-best offer" in reason
    (second,) = rig.ctl.run_cycle().lease_requests
    assert (second.provider, second.sku) == ("lab", "hgx-h100")
    assert "1 offer failed for it lately" in rig.store.get_job(job.id).reason
    types = [e.type for e in rig.store.list_events("job", str(job.id))]
    assert types.count("LeaseFailed") == 1 and types.count("LeaseRequested") == 2
    # After the retry window, the cheap offer is tried again.
    rig.keeper.tick()
    rig.clock.advance(timedelta(seconds=LeaseSettings().retry_after_s + 1))
    rig.keeper.tick()  # hgx-1 never registered: given back, failed
    assert flaky.asked == 1
    (third,) = rig.ctl.run_cycle().lease_requests
    assert third.provider == "flaky"


def test_a_gpuctld_taking_over_counts_the_idle_grace_from_where_it_was(tmp_path):
    """Since when a leased node is idle is on its lease, in the store: a new leader (or a
    restart) does not give it a fresh grace."""
    settings = LeaseSettings(idle_grace_s=300, budgets={"small": Budget(dollars_per_hour=30)})
    provider = Recording(lab())
    rig = Rig(tmp_path, [provider], settings)
    first = rig.ctl.submit(training(nodes=1, queue="small"))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    rig.ctl.run_cycle()
    rig.ctl.submit(training(nodes=2, queue="small"))  # waits, over budget: hgx-1 is kept for it
    rig.ctl.run_cycle()
    rig.run(first.id)
    rig.ctl.run_cycle()  # hgx-1 idle from now
    idle_from = rig.clock.now()
    rig.clock.advance(timedelta(seconds=200))
    # Another gpuctld takes over: the same store, the same provider (a cloud outlives gpuctld).
    again = Rig(tmp_path, [provider], settings, store=rig.store, clock=rig.clock, prefix="R")
    (kept,) = [x for x in again.leases(everything=False) if x.node_id == "hgx-1"]
    assert kept.idle_since == idle_from
    assert again.ctl.run_cycle().lease_releases == ()
    again.clock.advance(timedelta(seconds=99))
    assert again.ctl.run_cycle().lease_releases == ()
    again.clock.advance(timedelta(seconds=1))
    (release,) = again.ctl.run_cycle().lease_releases
    assert release.lease_id == kept.id
    assert "idle for 0:05:00 (idle grace 0:05:00)" in release.reason


def test_a_gpuctld_taking_over_does_not_ask_an_offer_that_failed_lately(tmp_path):
    cheap = replace(H100_SKU, provider="flaky", name="h100-cheap", price_per_hour=10.0)
    flaky, provider = NoCapacity(cheap), Recording(lab())
    rig = Rig(tmp_path, [flaky, provider])
    job = rig.ctl.submit(training(nodes=1))
    (first,) = rig.ctl.run_cycle().lease_requests
    assert first.provider == "flaky"
    rig.keeper.tick()  # no capacity: the lease fails, and the offer is noted
    again = Rig(tmp_path, [flaky, provider], store=rig.store, clock=rig.clock, prefix="R")
    (second,) = again.ctl.run_cycle().lease_requests
    assert (second.job_id, second.provider) == (job.id, "lab")
    assert flaky.asked == 1


def test_a_node_that_never_registers_is_given_back_and_the_lease_fails(rig):
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    rig.clock.advance(timedelta(seconds=599))
    rig.keeper.tick()
    assert rig.lease_of(job.id)[0].state is S.REQUESTED
    rig.clock.advance(timedelta(seconds=1))
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert lease.state is S.FAILED
    assert provider(rig).released() == [lease.provider_lease_id]
    assert "node hgx-1 did not register within 0:10:00 (given back)" in (
        rig.store.get_job(job.id).reason
    )
    # The lab has nothing else with 8 GPUs: the job says so, naming the failure.
    rig.ctl.run_cycle()
    assert "no offer to lease fits (of 1 offer: 1 too few GPUs) (1 offer failed for it lately)" in (
        rig.store.get_job(job.id).reason
    )


def test_cancelling_a_job_releases_its_lease_before_its_node_is_up(rig):
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.cancel(job.id)
    (release,) = rig.ctl.run_cycle().lease_releases
    assert release.reason == f"job {job.id} no longer waits for it"
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert lease.state is S.RELEASED
    assert provider(rig).released() == [lease.provider_lease_id]


def test_a_lease_in_use_is_renewed_before_it_ends(tmp_path):
    catalog = Recording(CatalogProvider([H100_SKU], name="sim", max_lease=timedelta(hours=1)))
    rig = Rig(tmp_path, [catalog], LeaseSettings(renew_before_s=600))
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    rig.ctl.register_node(agent_node(lease.node_id))
    rig.ctl.run_cycle()
    first_end = rig.lease_of(job.id)[0].expires_at
    rig.clock.advance(timedelta(minutes=49))
    rig.keeper.tick()
    assert not [c for c in catalog.calls if c[0] == "renew"]  # 11 min left: not yet
    rig.clock.advance(timedelta(minutes=2))
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert [c[0] for c in catalog.calls].count("renew") == 1
    assert lease.state is S.ACTIVE
    assert lease.expires_at == first_end + timedelta(minutes=51)  # now + 1 h


# -- reconciling after a restart ----------------------------------------------------------------


def held(lease_id: str, node: str, sku: str = "hgx-h100") -> Held:
    return Held(lease_id=lease_id, sku=sku, node=node, price_per_hour=24.0)


def stored(lease_id: str, pid: str, node: str, state: S) -> NodeLease:
    return NodeLease(
        id=lease_id,
        provider="lab",
        provider_lease_id=pid,
        node_id=node,
        sku="hgx-h100",
        price_per_hour=24.0,
        state=state,
    )


@pytest.mark.parametrize("unknown", ["release", "adopt"])
def test_reconcile_leaks_nothing_and_releases_nothing_twice(tmp_path, unknown):
    # Before the restart: P1 was released (the provider still lists it), P2 is active, P4 was
    # active but the provider no longer holds it, L3 was asked for and never answered. The
    # provider also holds P9, which the store never recorded (granted as the daemon died).
    first = Rig(tmp_path, [lab()])
    now = first.clock.now()
    for lease in (
        replace(stored("A1", "P1", "hgx-1", S.RELEASED), released_at=now),
        stored("A2", "P2", "hgx-2", S.ACTIVE),
        stored("A4", "P4", "gone-1", S.ACTIVE),
        replace(stored("A3", "", "", S.REQUESTED), for_job_id=7),
    ):
        first.store.put_lease(lease)
    claims = (held("P1", "hgx-1"), held("P2", "hgx-2"), held("P9", "l40s-1", "l40s-4x"))
    restarted = Recording(lab(claimed=claims))
    rig = Rig(
        tmp_path,
        [restarted],
        LeaseSettings(unknown=unknown),
        store=first.store,
        clock=first.clock,
        prefix="R",
    )
    rig.keeper.tick()
    state = {x.provider_lease_id or x.id: x.state for x in rig.leases()}
    assert state["P1"] is S.RELEASED  # and not released again:
    assert "P1" not in restarted.released()
    assert state["P2"] is S.ACTIVE
    assert state["P4"] is S.EXPIRED  # the provider ended it
    assert state["A3"] is S.FAILED  # never answered
    if unknown == "release":
        assert restarted.released() == ["P9"]  # recorded, then given back
        assert state["P9"] is S.RELEASED
        assert {h.lease_id for h in restarted.held()} == {"P1", "P2"}
    else:
        assert restarted.released() == []
        assert state["P9"] is S.REQUESTED  # adopted: active once its agent registers
        rig.ctl.register_node(agent_node("l40s-1", gpus=4, model="L40S"))
        adopted = next(x for x in rig.leases() if x.provider_lease_id == "P9")
        assert adopted.state is S.ACTIVE
        # Nothing uses it: released like any idle node, with no grace to wait for.
        (release,) = rig.ctl.run_cycle().lease_releases
        assert release.lease_id == adopted.id
    rig.keeper.tick()
    assert restarted.released().count("P1") == 0


def test_a_restart_in_the_middle_keeps_every_lease_and_releases_each_once(tmp_path):
    tables = [
        {
            "name": "lab",
            "kind": "static",
            "node": [
                {"name": "hgx-1", "address": "10.0.1.1", "sku": "hgx-h100",
                 "gpu_model": "H100 SXM", "gpu_count": 8, "fabric": "ib/s1/l1",
                 "network_kind": "infiniband", "network_gbps": 3200, "price_per_hour": 24.0},
            ],
        }
    ]  # fmt: skip
    (before,) = build_providers(tables, base_dir=tmp_path)
    rig = Rig(tmp_path, [Recording(before)])
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    rig.ctl.run_cycle()
    # gpuctld restarts: the static provider has forgotten its claims; the store gives them back.
    (after,) = build_providers(tables, base_dir=tmp_path, leases=rig.leases())
    after = Recording(after)
    again = Rig(tmp_path, [after], store=rig.store, clock=rig.clock, prefix="R")
    again.keeper.tick()
    (lease,) = again.lease_of(job.id)
    assert lease.state is S.ACTIVE and after.released() == []
    again.run(job.id)
    again.ctl.run_cycle()
    again.keeper.tick()
    again.keeper.tick()
    assert after.released() == [lease.provider_lease_id]
    assert after.held() == ()


def test_a_provider_that_cannot_be_asked_is_reconciled_later_and_not_used_meanwhile(tmp_path):
    class Down(NoCapacity):
        up = False

        def held(self):
            if not self.up:
                from gpuctl.providers.base import ProviderMisbehaved

                raise ProviderMisbehaved(self.name, "list command timed out")
            return ()

    down = Down(replace(H100_SKU, provider="flaky", name="h100-cheap", price_per_hour=1.0))
    rig = Rig(tmp_path, [down])
    rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    assert down.asked == 0  # not reconciled: no acquire
    down.up = True
    rig.keeper.tick()
    assert down.asked == 1


def test_budget_caps_total_dollars_from_the_queues_charges(tmp_path):
    settings = LeaseSettings(budgets={"q": Budget(dollars=10)})
    rig = Rig(tmp_path, [Recording(lab())], settings)
    first = rig.ctl.submit(training(nodes=1, queue="q"))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.ctl.register_node(agent_node("hgx-1"))
    rig.ctl.run_cycle()
    rig.run(first.id, hours=0.5)  # $12 charged: over the $10
    rig.ctl.run_cycle()
    second = rig.ctl.submit(training(nodes=1, queue="q"))
    rig.ctl.run_cycle()
    job = rig.store.get_job(second.id)
    assert job.state is JobState.PENDING
    assert "over budget: queue q spent $12.00 of its $10.00" in job.reason


class Anonymous(NoCapacity):
    """A provider that knows a new node's address, not its name, until the node says it."""

    def acquire(self, sku, count, *, fabric=None, now):
        return tuple(
            Acquired(lease_id=f"anon-{i}", sku=sku, address=f"hgx-{i}.local", acquired_at=now,
                     price_per_hour=self.sku.price_per_hour)
            for i in range(1, count + 1)
        )  # fmt: skip


def test_a_node_the_provider_named_by_address_only_is_matched_by_it(tmp_path):
    rig = Rig(tmp_path, [Anonymous(replace(H100_SKU, provider="anon", name="h100"), name="anon")])
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert (lease.provider_lease_id, lease.node_id) == ("anon-1", "")
    rig.ctl.register_node(agent_node("hgx-1"))  # at hgx-1.local
    (lease,) = rig.lease_of(job.id)
    assert (lease.state, lease.node_id) == (S.ACTIVE, "hgx-1")


def test_a_provider_no_longer_configured_holds_no_job_back(tmp_path):
    rig = Rig(tmp_path, [Recording(lab())])
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()  # asked of lab, not yet acquired
    rig.keeper.tick()
    rig.store.put_lease(stored("X1", "", "", S.REQUESTED))  # and one of a provider now gone
    gone = replace(stored("X2", "P2", "", S.REQUESTED), provider="old", for_job_id=job.id)
    rig.store.put_lease(replace(stored("X3", "", "", S.REQUESTED), provider="old"))
    rig.store.put_lease(gone)
    again = Rig(tmp_path, [Recording(lab())], store=rig.store, clock=rig.clock, prefix="R")
    again.keeper.tick()
    state = {x.id: x.state for x in again.leases()}
    assert (state["X1"], state["X2"], state["X3"]) == (S.FAILED, S.EXPIRED, S.FAILED)
    events = again.store.list_events("lease", "X2")
    assert "release it there by hand" in events[-1].message


class Unlocked(Recording):
    """A provider that checks it is never called while the controller's lock is held (scripts
    can take a minute), and can have a node's agent register in the middle of a release."""

    def __init__(self, inner, rig_ref: list) -> None:
        super().__init__(inner)
        self.rig_ref = rig_ref
        self.during_release: list[str] = []

    def _check(self) -> None:
        assert not self.rig_ref[0].ctl._lock._is_owned(), "provider called under the lock"

    def acquire(self, sku, count, *, fabric=None, now):
        self._check()
        return super().acquire(sku, count, fabric=fabric, now=now)

    def release(self, lease_id, *, now):
        self._check()
        try:  # the machine boots just as it is being given back
            self.rig_ref[0].ctl.register_node(agent_node(lease_id.split("/")[1]))
        except FailedPrecondition as e:
            self.during_release.append(str(e))
        return super().release(lease_id, now=now)

    def held(self):
        self._check()
        return super().held()


def test_providers_are_called_outside_the_lock_and_a_late_node_is_refused(tmp_path):
    ref: list = []
    watched = Unlocked(lab(), ref)
    rig = Rig(tmp_path, [watched], LeaseSettings(boot_timeout_s=60))
    ref.append(rig)
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    rig.clock.advance(timedelta(seconds=60))
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert lease.state is S.FAILED
    (refused,) = watched.during_release
    assert "came up after its boot timeout" in refused
    assert watched.held() == ()


def test_without_a_service_grace_a_service_scaled_down_gives_back_the_node_it_empties(tmp_path):
    rig = Rig(tmp_path, [Recording(lab())], LeaseSettings(service_grace_s=0))
    serve = JobSpec(kind=JobKind.INFERENCE, command=("serve",), replicas=2, gpus_per_node=8)
    job = rig.ctl.submit(serve)
    (request,) = rig.ctl.run_cycle().lease_requests
    assert request.count == 2
    rig.keeper.tick()
    for name in ("hgx-1", "hgx-2"):
        rig.ctl.register_node(agent_node(name))
    (binding,) = rig.ctl.run_cycle().bindings
    for r in binding.placement.ranks:
        rig.ctl.report_rank(r.node_id, RankRef(job.id, r.rank, 0), RankState.RUNNING)

    scaled = rig.ctl.scale(job.id, 1)

    (kept,) = [r for r in scaled.placement.ranks if r.live]
    (stopped,) = [r for r in binding.placement.ranks if r.rank != kept.rank]
    rig.ctl.report_rank(stopped.node_id, RankRef(job.id, stopped.rank, 0), RankState.EXITED, -15)
    # As when a job ends: no queued job fits the emptied node, so it goes at once.
    (release,) = rig.ctl.run_cycle().lease_releases
    assert release.node_id == stopped.node_id
    rig.keeper.tick()
    assert [x.state for x in rig.leases() if x.node_id == stopped.node_id] == [S.RELEASED]
    assert [x.state for x in rig.leases() if x.node_id == kept.node_id] == [S.ACTIVE]
