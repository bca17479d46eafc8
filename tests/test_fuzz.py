"""The RPC fuzzer (`gpuctl.fuzz`): its requests are reproducible and reach every method, and a
short run against a real gpuctld finds no crash, INTERNAL, UNKNOWN, hang, permission breach or
stored data that no longer reads back."""

from __future__ import annotations

import random

import pytest

from gpuctl import fuzz
from gpuctl.api._pb.v1 import auth_pb2, jobs_pb2, leases_pb2, nodes_pb2
from gpuctl.core.trust import Role

MAX_REQUEST_BYTES = (4 << 20) + (64 << 10)  # gpuctld's receive limit (api/server.py)


def _draws(seed: int, rounds: int) -> list[tuple[str, bytes, str]]:
    requests = fuzz.Requests(random.Random(seed))
    valid = fuzz.valid_requests(fuzz.Seeds())
    return [
        (m.key, payload, mode)
        for _ in range(rounds)
        for m in fuzz.methods()
        for _msg, payload, mode, _change in [requests.draw(m, valid.get(m.key))]
    ]


def test_the_same_seed_gives_the_same_requests():
    assert _draws(7, 5) == _draws(7, 5)
    assert _draws(7, 5) != _draws(8, 5)


def test_every_method_is_fuzzed_and_has_an_expected_permission():
    served = {
        f"{s.name}.{m.name}"
        for module in (jobs_pb2, nodes_pb2, leases_pb2, auth_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    keys = {m.key for m in fuzz.methods()}
    assert served <= keys
    assert {"AgentService.Heartbeat", "Health.Check"} <= keys
    assert keys == set(fuzz.PERMISSIONS), "a new RPC needs its permission in fuzz.PERMISSIONS"
    assert keys == set(fuzz.valid_requests(fuzz.Seeds())), "and a valid request to mutate"


def test_requests_come_in_every_mode_and_fit_the_daemons_limit():
    draws = _draws(3, 40)
    assert {mode for _, _, mode in draws} == {"random", "mutated", "raw"}
    assert max(len(payload) for _, payload, _ in draws) <= MAX_REQUEST_BYTES


def test_a_mutation_says_what_it_changed():
    requests = fuzz.Requests(random.Random(1))
    valid = fuzz.valid_requests(fuzz.Seeds())["AgentService.RegisterNode"]
    changes = [requests.mutate(valid(requests.rng))[1] for _ in range(20)]
    assert all(changes)
    assert any(c.startswith("node.") for c in changes)


@pytest.mark.parametrize(
    ("method", "role", "may"),
    [
        ("Health.Check", None, True),
        ("AuthService.WhoAmI", None, False),
        ("AuthService.WhoAmI", Role.NODE, True),
        ("JobService.CreateJob", Role.USER, True),
        ("JobService.CreateJob", Role.NODE, False),
        ("NodeService.DrainNode", Role.USER, False),
        ("NodeService.DrainNode", Role.OPERATOR, True),
        ("LeaseService.GetCost", Role.USER, False),
        ("AgentService.Heartbeat", Role.ADMIN, False),
        ("AgentService.Heartbeat", Role.NODE, True),
    ],
    ids=lambda v: getattr(v, "value", v),
)
def test_who_may_get_an_answer(method, role, may):
    assert fuzz.may_succeed(method, role) is may


@pytest.mark.e2e
def test_a_short_run_finds_nothing_wrong(tmp_path):
    # 300 requests: about a dozen per method, so each credential about twice per method; about
    # 8 s on 2 cores, daemon start included.
    report = fuzz.run(300, seed=20240501, check_every=100, root=tmp_path / "cluster")
    shown = fuzz.render(report)
    assert report.sent == 300, shown
    assert report.crashes == 0, shown
    assert report.internal == 0, shown
    assert report.unknown == 0, shown
    assert report.hangs == 0, shown
    assert report.breaches == 0, shown
    assert report.store_problems == [], shown
