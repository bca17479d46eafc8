"""gpuctld's Prometheus metrics: the figures and what they count (core.fleetstats,
runtime.metrics), the API's call timings, and the HTTP endpoint with its loopback, TLS and
token rules (runtime.exposition), on real sockets."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from gpuctl.api._pb.v1 import jobs_pb2, jobs_pb2_grpc
from gpuctl.core.backfill import Barrier
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.fleetstats import fragmented_gpus, gpu_states, reason_class
from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    Job,
    JobKind,
    JobSpec,
    JobState,
    Node,
    NodeState,
)
from gpuctl.core.plugins import build_policy
from gpuctl.core.snapshot import Snapshot
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller
from gpuctl.runtime.exposition import EndpointSettings, MetricsEndpoint, Refused
from gpuctl.runtime.logstore import LogStore
from gpuctl.runtime.metrics import MAX_QUEUES, DaemonMetrics, Standing
from gpuctl.store.memory import MemoryStore
from tests.auth_rig import AsCaller, Tokens, serve
from tests.test_controller import h100_node, training
from tests.test_e2e import wait_until


def l40s_node(name: str, gpus: int = 4) -> Node:
    return Node(
        id=name,
        address="10.1.0.1",
        fabric="eth/r1/t1",
        cpu_milli=48_000,
        memory_mib=384_000,
        price_per_hour=7.32,
        profile=BandwidthProfile(
            gpus=tuple(
                Gpu(index=i, uuid=f"{name}-{i}", model="L40S", memory_mib=46_068, hbm_gbps=864)
                for i in range(gpus)
            )
        ),
    )


def inference(replicas: int = 1, gpus: int = 1, milli: int = 0, model: str = "") -> JobSpec:
    return JobSpec(
        kind=JobKind.INFERENCE,
        command=("serve",),
        replicas=replicas,
        gpus_per_node=gpus,
        gpu_milli=milli,
        gpu_model=model,
    )


def pending(job_id: int, spec: JobSpec, reason: str = "") -> Job:
    return Job(id=job_id, spec=spec, reason=reason)


# -- the pure figures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        ("", "new"),
        (Barrier(job_id=7).waiting(pending(9, training()), None), "queue_order"),
        ("waiting behind job 7's reservation (nodes a, b from 14:05 UTC)", "queue_order"),
        ("reserved: starts by 14:05 UTC when job 12 reaches its time limit", "reserved"),
        ("needs 2 nodes; waiting for 2 leased nodes (8x H100 from static) to register", "leasing"),
        ("needs 2 nodes; no offer to lease fits (none has 8 GPUs)", "leasing"),
        ("needs 2 nodes; over budget: queue research leases $200.00/h of its $200.00/h", "leasing"),
        ("2 nodes with 8 free GPUs needed, 1 has them (fabric ib-a)", "resources"),
    ],
)
def test_a_pending_reason_falls_in_one_bounded_class(reason, cls):
    assert reason_class(reason) == cls


def test_gpus_are_counted_once_each_allocated_by_share_the_rest_by_node_state():
    views = Snapshot.build(
        [
            h100_node("a"),
            replace(h100_node("b"), state=NodeState.DRAINING),
            replace(h100_node("c"), state=NodeState.LOST),
            replace(h100_node("d"), state=NodeState.RELEASED),  # not ours any more
            l40s_node("e"),
        ],
        [
            Job(
                id=1,
                spec=training(nodes=1, gpus=4),
                state=JobState.RUNNING,
                placement=_placement("a", [0, 1, 2, 3]),
            ),
            Job(
                id=2,
                spec=training(nodes=1, gpus=2),
                state=JobState.RUNNING,
                placement=_placement("b", [0, 1]),
            ),
            Job(
                id=3,
                spec=inference(milli=250),
                state=JobState.RUNNING,
                placement=_placement("e", [0], milli=250),
            ),
        ],
    ).nodes
    assert gpu_states(views) == {
        ("H100 SXM", "allocated"): 6,  # 4 on a, 2 on b (draining or not, they are held)
        ("H100 SXM", "free"): 4,
        ("H100 SXM", "draining"): 6,
        ("H100 SXM", "lost"): 8,
        ("L40S", "allocated"): 0.25,
        ("L40S", "free"): 3.75,
    }


def _placement(node: str, gpus: list[int], milli: int = 1000):
    from gpuctl.core.model import Placement, RankPlacement

    return Placement(
        ranks=(RankPlacement(rank=0, node_id=node, gpu_indices=tuple(gpus), gpu_milli=milli),)
    )


def test_fragmented_gpus_are_the_free_ones_no_queued_shape_can_use():
    a = h100_node("a")
    # a: 5 GPUs held by a 5-GPU rank, 3 whole GPUs free.
    running = [
        Job(
            id=1,
            spec=training(nodes=1, gpus=5),
            state=JobState.RUNNING,
            placement=_placement("a", [0, 1, 2, 3, 4]),
        ),
        # e: GPU 0 has 700 of 1000 milli held, GPUs 1-3 free
        Job(
            id=2,
            spec=inference(milli=700),
            state=JobState.RUNNING,
            placement=_placement("e", [0], milli=700),
        ),
    ]
    views = Snapshot.build([a, l40s_node("e")], running).nodes
    # Nothing queued: nothing is fragmented (idle is not fragmented).
    assert fragmented_gpus(views, []) == 0
    # A queued 4-GPU rank fits neither node (a has 3 whole, e has 3 whole): all 3 + 3.3 free
    # GPUs are fragmented.
    assert fragmented_gpus(views, [pending(5, training(nodes=1, gpus=4))]) == pytest.approx(6.3)
    # Add a queued half-GPU replica: it could use any GPU with 500 milli free: every whole free
    # GPU of both nodes, not e's GPU 0 (300 free): 0.3 stuck.
    queue = [pending(5, training(nodes=1, gpus=4)), pending(6, inference(milli=500))]
    assert fragmented_gpus(views, queue) == pytest.approx(0.3)
    # The same replica pinned to H100s cannot use e: e's 3.3 free are stuck again.
    queue = [
        pending(5, training(nodes=1, gpus=4)),
        pending(6, inference(milli=500, model="h100 sxm")),
    ]
    assert fragmented_gpus(views, queue) == pytest.approx(3.3)
    # A drained node's free GPUs are not fragmented: nothing may use them anyway.
    views = Snapshot.build([replace(a, state=NodeState.DRAINING), l40s_node("e")], running).nodes
    assert fragmented_gpus(views, [pending(5, training(nodes=1, gpus=4))]) == pytest.approx(3.3)


# -- the daemon's registry -----------------------------------------------------------------


@pytest.fixture
def ctl(tmp_path):
    store = MemoryStore()
    c = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
    )
    yield c
    store.close()


def metrics_of(ctl: Controller, **kwargs) -> DaemonMetrics:
    metrics = DaemonMetrics(
        Standing(
            nodes=ctl.store.list_nodes,
            active=ctl.active_jobs,
            leases=ctl.store.list_leases,
            now=ctl.clock.now,
            leading=lambda: ctl.leading,
            **kwargs,
        )
    )
    ctl.observer = metrics
    return metrics


def value(metrics: DaemonMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_cycles_count_placements_and_the_wait_from_submit(ctl):
    metrics = metrics_of(ctl)
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    first = ctl.submit(training())
    ctl.submit(training())  # waits behind the first: the fleet has room for one gang
    ctl.clock.advance(timedelta(seconds=42))
    ctl.run_cycle()
    assert value(metrics, "gpuctl_scheduling_placements_total", kind="training") == 1
    assert value(metrics, "gpuctl_scheduling_placements_total", kind="inference") == 0
    assert value(metrics, "gpuctl_job_wait_seconds_count", kind="training") == 1
    assert value(metrics, "gpuctl_job_wait_seconds_sum", kind="training") == 42
    assert value(metrics, "gpuctl_job_wait_seconds_bucket", kind="training", le="60.0") == 1
    assert value(metrics, "gpuctl_job_wait_seconds_bucket", kind="training", le="30.0") == 0
    assert value(metrics, "gpuctl_scheduling_cycle_duration_seconds_count") == 1
    # the standing figures, read at the scrape
    assert value(metrics, "gpuctl_leader") == 0  # this controller was never told to lead
    ctl.lead()
    assert value(metrics, "gpuctl_leader") == 1
    assert value(metrics, "gpuctl_jobs_running", kind="training", queue="default") == 1
    assert (
        value(metrics, "gpuctl_jobs_pending", kind="training", queue="default", reason="resources")
        == 1
    )
    assert value(metrics, "gpuctl_gpus", model="H100 SXM", state="allocated") == 16
    assert value(metrics, "gpuctl_gpus", model="H100 SXM", state="free") is None
    assert value(metrics, "gpuctl_nodes", state="ready") == 2
    assert value(metrics, "gpuctl_node_heartbeat_age_seconds", node="a") == 42
    assert value(metrics, "gpuctl_node_bandwidth_bytes_per_second", node="a", link="hbm") == 3.35e12
    assert value(metrics, "gpuctl_node_bandwidth_bytes_per_second", node="a", link="network") == (
        8 * 400e9 / 8
    )
    # Registered nodes hold static leases at their price: 2 x $24/h paid, the gang charged the
    # whole of both once it starts.
    assert value(metrics, "gpuctl_lease_cost_dollars_per_hour", provider="static") == 48
    assert value(metrics, "gpuctl_charged_dollars_per_hour", queue="default") is None  # not started
    job = ctl.store.get_job(first.id)
    ctl.write_jobs([replace(job, state=JobState.RUNNING, started_at=ctl.clock.now())], [])
    assert value(metrics, "gpuctl_charged_dollars_per_hour", queue="default") == 48


def test_queue_labels_are_bounded(ctl):
    metrics = metrics_of(ctl)
    for i in range(MAX_QUEUES + 8):
        ctl.submit(replace(inference(), queue=f"q{i:02d}"))
    ctl.submit(replace(inference(), queue="q00"))  # the busiest: named
    exposed = metrics.registry.collect()
    queues = {
        s.labels["queue"] for m in exposed if m.name == "gpuctl_jobs_pending" for s in m.samples
    }
    assert len(queues) == MAX_QUEUES + 1 and "other" in queues and "q00" in queues
    assert value(metrics, "gpuctl_jobs_pending", kind="inference", queue="other", reason="new") == 8
    # Configured queues are the labels, whatever the counts.
    configured = metrics_of(ctl, queues=("q00", "q01"))
    assert value(
        configured, "gpuctl_jobs_pending", kind="inference", queue="other", reason="new"
    ) == (MAX_QUEUES + 8 - 2)


def test_api_calls_are_timed_by_method_and_code_and_streams_counted(tmp_path):
    from gpuctl.store.sql import open_store

    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    controller = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
    )
    metrics = DaemonMetrics()
    server = serve(controller, observer=metrics)
    channel = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{server.port}"), AsCaller(Tokens(controller), "alice")
    )
    try:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            jobs.GetJob(jobs_pb2.GetJobRequest(name="jobs/999"), timeout=5)
        with pytest.raises(grpc.RpcError):
            jobs.GetJob(jobs_pb2.GetJobRequest(name="not a name"), timeout=5)
        jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5)
        controller.submit(replace(training(), owner="alice"))  # for the watch to show
        stream = jobs.WatchJobs(jobs_pb2.WatchJobsRequest(), timeout=5)
        next(stream)  # the stream is up
        stream.cancel()
        get = {"method": "JobService/GetJob"}
        assert (
            value(metrics, "gpuctl_api_request_duration_seconds_count", **get, code="NOT_FOUND")
            == 1
        )
        assert (
            value(
                metrics, "gpuctl_api_request_duration_seconds_count", **get, code="INVALID_ARGUMENT"
            )
            == 1
        )
        listed = {"method": "JobService/ListJobs", "code": "OK"}
        assert value(metrics, "gpuctl_api_request_duration_seconds_count", **listed) == 1
        assert value(metrics, "gpuctl_api_request_duration_seconds_sum", **listed) > 0
        wait_until(
            lambda: (
                value(
                    metrics,
                    "gpuctl_api_streams_total",
                    method="JobService/WatchJobs",
                    code="CANCELLED",
                )
                == 1
            )
        )
    finally:
        channel.close()
        server.drain(0)
        store.close()


# -- the endpoint ---------------------------------------------------------------------------


def scrape(url: str, token: str = "", context: ssl.SSLContext | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_loopback_metrics_are_open_and_parse_as_prometheus_text(ctl):
    metrics = metrics_of(ctl)
    ctl.register_node(h100_node("a"))
    endpoint = MetricsEndpoint(EndpointSettings(listen="127.0.0.1:0"), metrics.registry)
    try:
        status, text = scrape(f"http://127.0.0.1:{endpoint.port}/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["gpuctl_gpus"].samples[0].labels == {"model": "H100 SXM", "state": "free"}
        assert families["gpuctl_gpus"].samples[0].value == 8
        assert scrape(f"http://127.0.0.1:{endpoint.port}/jobs")[0] == 404
    finally:
        endpoint.close()


@pytest.mark.parametrize(
    ("settings", "wrong"),
    [
        (EndpointSettings(listen="0.0.0.0:9750"), "need TLS"),
        (EndpointSettings(listen="9750"), "not HOST:PORT"),
        (EndpointSettings(listen="127.0.0.1:99999"), "not HOST:PORT"),
    ],
)
def test_metrics_off_loopback_need_tls_and_a_token(settings, wrong):
    with pytest.raises(InvalidArgument) as e:
        MetricsEndpoint(settings, DaemonMetrics().registry, authorize=lambda _: None)
    assert wrong in str(e.value) and "metrics.listen" in str(e.value)
    off = EndpointSettings(listen="0.0.0.0:0", tls_cert_file="c", tls_key_file="k")
    assert off.violations(can_authorize=False) == [
        "0.0.0.0:0 is reachable from other hosts: metrics there need a token"
    ]


def test_metrics_behind_tls_take_only_a_token_that_may_read_them(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)

    def authorize(token: str) -> None:
        if token == "user":
            raise Refused(403, "alice may not read metrics")
        if token != "operator":
            raise Refused(401, "unknown token")

    endpoint = MetricsEndpoint(
        EndpointSettings(
            listen="127.0.0.1:0",
            tls_cert_file=str(tmp_path / "server.pem"),
            tls_key_file=str(tmp_path / "server.pem"),
            open_on_loopback=False,  # as on a routable address, but without leaving loopback
        ),
        DaemonMetrics().registry,
        authorize=authorize,
    )
    url = f"https://127.0.0.1:{endpoint.port}/metrics"
    try:
        assert scrape(url, context=client)[0] == 401
        assert scrape(url, "nonsense", context=client) == (401, "unknown token\n")
        assert scrape(url, "user", context=client) == (403, "alice may not read metrics\n")
        status, text = scrape(url, "operator", context=client)
        assert status == 200 and "gpuctl_scheduling_cycle_duration_seconds" in text
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP here
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)
    finally:
        endpoint.close()


def test_a_running_gpuctld_serves_its_metrics_and_logs_json_lines_with_ids(tmp_path):
    from gpuctl.demo import INFERENCE_NODES
    from gpuctl.testbed import LocalCluster

    cluster = LocalCluster(tmp_path / "cluster", metrics=True)
    try:
        cluster.start_daemon()
        cluster.start_agent(INFERENCE_NODES[0])
        url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"

        def families() -> dict:
            return {f.name: f for f in text_string_to_metric_families(scrape(url)[1])}

        def sample(name: str, **labels: str) -> float | None:
            found = [
                s.value
                for f in families().values()
                for s in f.samples
                if s.name == name and s.labels == labels
            ]
            return found[0] if found else None

        wait_until(lambda: sample("gpuctl_nodes", state="ready") == 1, what="the node")
        cluster.gpuctl("submit", "--kind", "inference", "--gpus-per-node", "1", "--", "sleep", "60")
        wait_until(
            lambda: sample("gpuctl_gpus", model="L40S", state="allocated") == 1, what="a placement"
        )
        assert sample("gpuctl_leader") == 1
        assert sample("gpuctl_gpus", model="L40S", state="free") == 3
        assert sample("gpuctl_scheduling_placements_total", kind="inference") == 1
        calls = families()["gpuctl_api_request_duration_seconds"].samples
        created = [
            s
            for s in calls
            if s.name.endswith("_count") and s.labels["method"] == "JobService/CreateJob"
        ]
        assert [(s.labels["code"], s.value) for s in created] == [("OK", 1.0)]
        heartbeats = sample(
            "gpuctl_api_request_duration_seconds_count", method="AgentService/Heartbeat", code="OK"
        )
        assert heartbeats and heartbeats >= 1
        # Its log is a file: JSON lines, the placement with its job's id as a field.
        lines = [json.loads(x) for x in cluster.log("gpuctld").splitlines() if x.startswith("{")]
        placed = [x for x in lines if x["message"].startswith("job 1 placed")]
        assert placed and placed[0]["job_id"] == 1 and placed[0]["level"] == "info"
        assert any("metrics at http://127.0.0.1:" in x["message"] for x in lines)
    finally:
        cluster.stop_all()


def test_the_grafana_dashboard_asks_only_for_series_gpuctld_serves(ctl):
    """Every metric and label the shipped dashboard queries is one gpuctld exposes (a renamed
    metric fails here, not on an operator's blank panel)."""
    import re
    from pathlib import Path

    metrics = metrics_of(ctl)
    ctl.register_node(h100_node("a"))
    ctl.submit(training(nodes=1, gpus=6))
    ctl.submit(training(nodes=1, gpus=4))  # waits: 2 GPUs are left
    [placed] = ctl.run_cycle().bindings
    job = ctl.store.get_job(placed.job_id)
    ctl.write_jobs([replace(job, state=JobState.RUNNING, started_at=ctl.clock.now())], [])
    exposed: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            exposed.setdefault(s.name, set()).update(s.labels)
    # Counters and histograms of nothing yet still name their series.
    exposed.setdefault("gpuctl_api_request_duration_seconds_bucket", {"method", "code", "le"})
    exposed.setdefault("gpuctl_api_request_duration_seconds_count", {"method", "code"})
    board = json.loads(
        (Path(__file__).parent.parent / "config/grafana/gpuctl-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    for expr in exprs:
        for name, matchers in re.findall(r"(gpuctl_[a-z_]+)(?:\{([^}]*)\})?", expr):
            assert name in exposed, f"{name} in {expr!r}"
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|=)", matchers):
                assert label == "job" or label in exposed[name], f"{label} of {name} in {expr!r}"
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            names = re.findall(r"(gpuctl_[a-z_]+)", expr)
            for label in (x.strip() for x in grouping.split(",")):
                assert any(label in exposed[n] for n in names), f"{label} in {expr!r}"


def test_the_alert_rules_ask_only_for_series_gpuctl_serves(ctl):
    """Every series the shipped Prometheus rules use is one gpuctld or an agent exposes, and
    every rule says how bad it is and what it means."""
    import re
    from pathlib import Path

    import yaml

    from gpuctl.agent.loop import AgentStatus
    from gpuctl.agent.metrics import AgentMetrics

    metrics = metrics_of(ctl)
    ctl.register_node(h100_node("a"))
    ctl.submit(training(nodes=1, gpus=4))
    ctl.run_cycle()
    ctl.write_jobs(
        [replace(j, state=JobState.RUNNING, started_at=ctl.clock.now()) for j in ctl.active_jobs()],
        [],
    )
    ctl.submit(training(nodes=1, gpus=8))  # waits: 4 of a's GPUs are taken
    exposed: set[str] = set()
    for registry in (metrics.registry, AgentMetrics(AgentStatus).registry):
        exposed |= {s.name for family in registry.collect() for s in family.samples}
    exposed |= {"gpuctl_api_request_duration_seconds_count"}  # no call made here
    rules = yaml.safe_load(
        (Path(__file__).parent.parent / "config/prometheus/gpuctl-alerts.yml").read_text()
    )
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        for name in re.findall(r"gpuctl_[a-z_]+", rule["expr"]):
            assert name in exposed, f"{name} in {rule['alert']}"
