"""Readiness probes: the agent's HTTP and TCP checks against a real loopback server, and the
daemon's use of what the agents report."""

from __future__ import annotations

import http.server
import socket
import threading
from dataclasses import replace
from datetime import timedelta

import pytest

from gpuctl.agent.readiness import Readiness
from gpuctl.core import services
from gpuctl.core.model import RankState
from gpuctl.runtime.controller import RankRef
from tests import test_controller
from tests.test_services import run_new, service, start

ctl = test_controller.ctl  # the fixture: a controller on SQLite with a fake clock


@pytest.fixture
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_and_tcp_probes_against_a_real_server(server):
    assert Readiness(port=server, http_path="/health").passes()
    assert not Readiness(port=server, http_path="/starting").passes()  # 503
    assert Readiness(port=server, tcp=True).passes()
    port = closed_port()
    assert not Readiness(port=port, tcp=True).passes()
    assert not Readiness(port=port, http_path="/health").passes()


def test_an_assignment_asks_for_a_probe_only_with_a_port_and_a_check():
    assert Readiness.of(0, "/health", False) is None
    assert Readiness.of(31000, "", False) is None
    assert Readiness.of(31000, "/h", True) == Readiness(port=31000, http_path="/h")


def test_a_probed_replica_is_ready_once_its_agent_says_so_and_gates_a_rolling_update(ctl):
    job = start(ctl, service(1, readiness_http="/health"))
    ref = RankRef(job.id, 0, 0)
    assert not ctl.store.get_job(job.id).placement.ranks[0].ready

    ctl.heartbeat("a", [ref], ready=[ref])

    job = ctl.store.get_job(job.id)
    assert job.placement.ranks[0].ready
    assert "Ready" in [e.type for e in ctl.store.list_events("job", str(job.id))]

    job = ctl.update(job.id, replace(job.spec, command=("v2",)))
    ctl.run_cycle()
    job = run_new(ctl, job)
    ctl.clock.advance(timedelta(seconds=job.spec.min_ready_s * 10))
    ctl.run_cycle()  # running long enough, but not ready: the old one stays
    job = ctl.store.get_job(job.id)
    assert [r.rank for r in job.placement.ranks if r.live] == [0, 1] and services.rolling(job)
    new = RankRef(job.id, 1, 0)
    ctl.heartbeat("a", [ref, new], ready=[ref, new])
    ctl.run_cycle()
    job = ctl.store.get_job(job.id)
    assert [r.rank for r in job.placement.ranks if r.state is RankState.RUNNING] == [1]
    assert not services.rolling(job)


def test_a_ready_report_for_a_rank_not_running_is_ignored(ctl):
    job = start(ctl, service(1, readiness_tcp=True))
    ctl.heartbeat("a", [], ready=[RankRef(job.id, 0, 0)])
    assert not ctl.store.get_job(job.id).placement.ranks[0].ready


def test_a_new_replica_never_ready_by_the_progress_deadline_rolls_the_update_back(ctl):
    job = start(ctl, service(1, readiness_tcp=True, progress_deadline_s=60))
    ref = RankRef(job.id, 0, 0)
    ctl.heartbeat("a", [ref], ready=[ref])
    job = ctl.update(ctl.store.get_job(job.id).id, replace(job.spec, command=("v2",)))
    ctl.run_cycle()
    run_new(ctl, job)
    ctl.clock.advance(timedelta(seconds=59))
    ctl.run_cycle()
    assert services.rolling(ctl.store.get_job(job.id))  # not yet

    ctl.clock.advance(timedelta(seconds=1))
    ctl.run_cycle()

    job = ctl.store.get_job(job.id)
    assert job.reason == (
        "rolled back to generation 0: a replica of generation 1 was not ready 60 s after it "
        "started (replica 1)"
    )
    assert job.spec.command == ("vllm", "serve")
    ctl.run_cycle()  # the next step stops the one that never became ready; 0 never stopped
    job = ctl.store.get_job(job.id)
    assert [r.rank for r in job.placement.ranks if r.live] == [0] and not services.rolling(job)
