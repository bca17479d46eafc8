"""Cost accounting: each job is charged GPUs held / GPUs on the node x the node's price x the
time held; rows by job, queue or user; what the leases cost beyond that is idle. The pure
arithmetic first, then the controller with a fake clock."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from gpuctl.cli.main import cli
from gpuctl.client import Client
from gpuctl.core.cost import (
    CostBy,
    NodePrice,
    attempt_charge,
    charges,
    job_charge,
    lease_dollars,
    report,
)
from gpuctl.core.model import (
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    NodeLease,
    Placement,
    RankPlacement,
    RankState,
)
from gpuctl.runtime.controller import RankRef
from tests.auth_rig import Tokens, serve
from tests.lease_rig import Rig, agent_node, training

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICES = {
    "h100": NodePrice(gpu_count=8, price_per_hour=24.0),
    "h100-b": NodePrice(gpu_count=8, price_per_hour=24.0),
    "l4": NodePrice(gpu_count=1, price_per_hour=2.0),
}


def job(
    job_id: int,
    ranks: list[tuple[str, tuple[int, ...], int]],
    *,
    hours: float | None,
    queue: str = "default",
    owner: str = "ada",
    started: datetime = T0,
) -> Job:
    """A job that started at `started` with `ranks` (node, GPUs, milli each), finished after
    `hours` (None: still running)."""
    return Job(
        id=job_id,
        spec=JobSpec(kind=JobKind.INFERENCE, command=("x",), queue=queue, owner=owner),
        state=JobState.RUNNING if hours is None else JobState.SUCCEEDED,
        placement=Placement(
            ranks=tuple(
                RankPlacement(rank=i, node_id=n, gpu_indices=g, gpu_milli=m)
                for i, (n, g, m) in enumerate(ranks)
            )
        ),
        started_at=started,
        finished_at=None if hours is None else started + timedelta(hours=hours),
    )


@pytest.mark.parametrize(
    ("the_job", "dollars", "gpu_hours"),
    [
        # 2 of 8 GPUs x $24/h x 0.5 h = $3; 2 GPUs x 0.5 h = 1 GPU-hour.
        (job(1, [("h100", (0, 1), 1000)], hours=0.5), 3.0, 1.0),
        # A 250-milli share of the one-GPU $2/h node for 2 h: 0.25 x $2 x 2 = $1, 0.5 GPU-h.
        (job(2, [("l4", (0,), 250)], hours=2), 1.0, 0.5),
        # A gang of 2 x 8 GPUs for 1 h: 2 x $24 = $48, 16 GPU-h.
        (job(3, [("h100", tuple(range(8)), 1000), ("h100-b", tuple(range(8)), 1000)], hours=1),
         48.0, 16.0),
        # Still running at NOW = T0 + 3 h: 1/8 x $24 x 3 = $9.
        (job(4, [("h100", (5,), 1000)], hours=None), 9.0, 3.0),
    ],
    ids=["whole-gpus", "share", "gang", "running"],
)  # fmt: skip
def test_a_job_is_charged_its_share_of_each_node_for_the_time_it_held_it(
    the_job, dollars, gpu_hours
):
    charge = job_charge(the_job, PRICES, now=T0 + timedelta(hours=3))
    assert charge is not None
    assert (charge.dollars, charge.gpu_hours) == (pytest.approx(dollars), pytest.approx(gpu_hours))


def test_since_cuts_the_window_and_a_job_that_never_started_costs_nothing():
    whole = job(1, [("h100", tuple(range(8)), 1000)], hours=2)
    # Since T0 + 1.5 h: the last half hour, $12.
    late = job_charge(whole, PRICES, now=T0 + timedelta(hours=5), since=T0 + timedelta(hours=1.5))
    assert late is not None and late.dollars == pytest.approx(12.0)
    assert (
        job_charge(whole, PRICES, now=T0 + timedelta(hours=5), since=T0 + timedelta(hours=2))
        is None
    )
    never = Job(id=2, spec=whole.spec)
    assert job_charge(never, PRICES, now=T0) is None


def test_rows_by_queue_and_user_and_what_is_idle():
    jobs = [
        job(1, [("h100", (0, 1, 2, 3), 1000)], hours=1, queue="train", owner="ada"),  # $12
        job(2, [("h100", (4, 5), 1000)], hours=1, queue="serve", owner="ada"),  # $6
        job(3, [("l4", (0,), 500)], hours=1, queue="serve", owner="bob"),  # $1
    ]
    now = T0 + timedelta(hours=2)
    charged = charges(jobs, PRICES, now=now)
    lease = NodeLease(id="l", provider="p", price_per_hour=24.0, acquired_at=T0,
                      released_at=T0 + timedelta(hours=1), state=LeaseState.RELEASED)  # fmt: skip
    by_queue = report(charged, [lease], CostBy.QUEUE, now=now)
    assert [(r.key, r.dollars, r.jobs) for r in by_queue.rows] == [
        ("train", pytest.approx(12.0), 1),
        ("serve", pytest.approx(7.0), 2),
    ]
    by_user = report(charged, [lease], CostBy.USER, now=now)
    assert [(r.key, r.dollars) for r in by_user.rows] == [
        ("ada", pytest.approx(18.0)),
        ("bob", pytest.approx(1.0)),
    ]
    # The lease: $24 for its hour; $19 of it charged, $5 idle.
    assert by_user.leased_dollars == pytest.approx(24.0)
    assert by_user.idle_dollars == pytest.approx(5.0)


def test_an_attempt_that_ended_in_a_requeue_stays_charged():
    hour = timedelta(hours=1)
    first = job(1, [("h100", (0, 1), 1000)], hours=None)  # 2 of 8 GPUs at $24/h since T0
    # Requeued after 2 h: 2/8 x $24 x 2 h = $12, 4 GPU-hours, kept as attempt 0.
    ended = attempt_charge(first, PRICES, ended_at=T0 + 2 * hour)
    assert ended is not None
    assert (ended.attempt, ended.dollars, ended.gpu_hours) == (0, 12.0, 4.0)
    # Attempt 1 runs 1 h more: $6, 2 GPU-hours. The job is one row, one job, $18.
    again = replace(first, attempt=1, started_at=T0 + 3 * hour, finished_at=T0 + 4 * hour)
    charged = charges([again], PRICES, now=T0 + 5 * hour, ended=[ended])
    (row,) = report(charged, [], CostBy.JOB, now=T0 + 5 * hour).rows
    assert (row.key, row.dollars, row.gpu_hours, row.jobs) == ("1", 18.0, 6.0, 1)
    # Since T0 + 1 h: the second half of attempt 0 ($6) and all of attempt 1 ($6).
    since = charges([again], PRICES, now=T0 + 5 * hour, since=T0 + hour, ended=[ended])
    assert sum(c.dollars for c in since) == pytest.approx(12.0)
    # A record of the attempt a job is still on (its requeue not written yet) counts once.
    assert [c.dollars for c in charges([first], PRICES, now=T0 + 2 * hour, ended=[ended])] == [12.0]
    # An attempt that never started is no record.
    assert attempt_charge(replace(first, started_at=None), PRICES, ended_at=T0) is None


def test_the_controller_charges_the_attempt_a_lost_node_ended(tmp_path):
    rig = Rig(tmp_path, [])  # heartbeats time out after 1 h
    rig.ctl.register_node(replace(agent_node("a"), price_per_hour=16.0))
    job_id = rig.ctl.submit(training(nodes=1, gpus=4)).id
    rig.ctl.run_cycle()
    rig.ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.RUNNING)
    rig.clock.advance(timedelta(hours=2))
    assert rig.ctl.expire_heartbeats() == ["a"]  # requeued as attempt 1 after 2 h on a
    rig.ctl.register_node(replace(agent_node("b"), price_per_hour=16.0))
    rig.ctl.run_cycle()
    rig.ctl.report_rank("b", RankRef(job_id, 0, 1), RankState.RUNNING)
    rig.clock.advance(timedelta(hours=1))
    rig.ctl.report_rank("b", RankRef(job_id, 0, 1), RankState.EXITED, 0)
    # 4/8 x $16 x 2 h on a, then x 1 h on b: $16 + $8.
    (row,) = rig.ctl.cost(by=CostBy.JOB).rows
    assert (row.key, row.dollars, row.gpu_hours, row.jobs) == (
        str(job_id),
        pytest.approx(24.0),
        pytest.approx(12.0),
        1,
    )
    (kept,) = rig.store.list_charges()
    assert (kept.job_id, kept.attempt) == (job_id, 0)


def test_a_lease_accrues_by_the_second_until_it_ends():
    lease = NodeLease(id="l", provider="p", price_per_hour=36.0, acquired_at=T0)
    assert lease_dollars(lease, now=T0 + timedelta(seconds=1)) == pytest.approx(0.01)
    assert lease_dollars(NodeLease(id="r", provider="p", price_per_hour=36.0), now=T0) == 0.0


def test_the_controller_reports_cost_by_job_queue_and_user(tmp_path):
    rig = Rig(tmp_path, [])
    rig.ctl.register_node(replace(agent_node("a"), price_per_hour=16.0))  # by itself, at $16/h
    a = rig.ctl.submit(training(nodes=1, gpus=4, queue="train", owner="ada"))
    b = rig.ctl.submit(training(nodes=1, gpus=2, queue="serve", owner="bob"))
    rig.ctl.run_cycle()
    for job_id in (a.id, b.id):
        rig.ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.RUNNING)
    rig.clock.advance(timedelta(hours=1))
    rig.ctl.report_rank("a", RankRef(b.id, 0, 0), RankState.EXITED, 0)
    rig.clock.advance(timedelta(hours=1))
    # a: 4/8 x $16 x 2 h = $16; b: 2/8 x $16 x 1 h = $4.
    by_job = rig.ctl.cost(by=CostBy.JOB)
    assert [(r.key, r.dollars, r.gpu_hours) for r in by_job.rows] == [
        (str(a.id), pytest.approx(16.0), pytest.approx(8.0)),
        (str(b.id), pytest.approx(4.0), pytest.approx(2.0)),
    ]
    assert [r.key for r in rig.ctl.cost(by=CostBy.QUEUE).rows] == ["train", "serve"]
    assert [r.key for r in rig.ctl.cost(by=CostBy.USER).rows] == ["ada", "bob"]
    # Since the last hour: only a ran, $8.
    recent = rig.ctl.cost(since=rig.clock.now() - timedelta(hours=1))
    assert [(r.key, r.dollars) for r in recent.rows] == [(str(a.id), pytest.approx(8.0))]

    # The node's own lease accrued 2 h x $16 = $32: $20 charged, $12 idle.
    assert (recent.leased_dollars, by_job.leased_dollars) == (
        pytest.approx(16.0),
        pytest.approx(32.0),
    )
    assert by_job.idle_dollars == pytest.approx(12.0)


# -- the API, the SDK and `gpuctl cost` against the daemon's real servicers -----------------------


@pytest.fixture
def served(tmp_path):
    rig = Rig(tmp_path, [])
    server = serve(rig.ctl)
    yield rig, f"127.0.0.1:{server.port}"
    server.drain(0)
    rig.store.close()


def run_two_jobs(rig: Rig) -> tuple[int, int]:
    rig.ctl.register_node(replace(agent_node("a"), price_per_hour=16.0))
    a = rig.ctl.submit(training(nodes=1, gpus=4, queue="train", owner="ada"))
    b = rig.ctl.submit(training(nodes=1, gpus=2, queue="serve", owner="bob"))
    rig.ctl.run_cycle()
    for job_id in (a.id, b.id):
        rig.ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.RUNNING)
    rig.clock.advance(timedelta(hours=1))
    return a.id, b.id


def test_the_sdk_gets_cost_rows_and_totals(served):
    rig, target = served
    a, b = run_two_jobs(rig)  # a: 4/8 x $16 = $8, b: 2/8 x $16 = $4; the lease $16
    with Client(target, token=Tokens(rig.ctl).user("olga"), timeout=5) as client:
        cost = client.cost(by="job")
        assert [(r.key, r.dollars, r.gpu_hours, r.jobs) for r in cost.rows] == [
            (str(a), 8.0, 4.0, 1),
            (str(b), 4.0, 2.0, 1),
        ]
        assert (cost.charged_dollars, cost.leased_dollars, cost.idle_dollars) == (12.0, 16.0, 4.0)
        by_user = client.cost(by="user", since=rig.clock.now() - timedelta(minutes=30))
        assert [(r.key, r.dollars) for r in by_user.rows] == [("ada", 4.0), ("bob", 2.0)]
        with pytest.raises(ValueError, match="job, queue or user"):
            client.cost(by="team")
        assert client.cost(since=rig.clock.now() + timedelta(hours=1)).rows == []
        with pytest.raises(ValueError, match="timezone-aware"):
            client.cost(since=datetime(2026, 1, 1))


def test_gpuctl_cost_shows_the_table(served, monkeypatch):
    rig, target = served
    run_two_jobs(rig)
    runner = CliRunner()
    monkeypatch.setenv("GPUCTL_TOKEN", Tokens(rig.ctl).user("olga"))
    result = runner.invoke(cli, ["--server", target, "cost", "--by", "queue"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "JOBS", "GPU_HOURS", "COST_$"]
    assert lines[1].split() == ["train", "1", "4.00", "8.00"]
    assert lines[2].split() == ["serve", "1", "2.00", "4.00"]
    assert lines[3].startswith("charged $12.00 of $16.00 leased, $4.00 idle (all time)")
    since = (rig.clock.now() - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = runner.invoke(cli, ["--server", target, "cost", "--since", since, "-o", "json"])
    assert recent.exit_code == 0, recent.output
    (doc,) = json.loads(recent.stdout)
    assert doc["charged_dollars"] == 6.0 and doc["group_by"] == "COST_GROUP_BY_JOB"
    bad = runner.invoke(cli, ["--server", target, "cost", "--since", "yesterday"])
    assert bad.exit_code == 2 and "expected a duration such as 24h" in bad.output


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("90m", timedelta(minutes=90)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("2026-01-01T08:00:00Z", datetime(2026, 1, 1, 8, tzinfo=UTC)),
        ("2026-01-01T08:00:00", datetime(2026, 1, 1, 8, tzinfo=UTC)),  # UTC unless it says
    ],
)
def test_since_takes_a_duration_or_a_time(text, expect):
    from gpuctl.cli.main import _since

    assert _since(text) == expect
