"""API workers (`[server] api_workers`) as real processes: they share gpuctld's TCP port, serve
submits and job reads themselves, pass every other call on to gpuctld as it came (credentials,
status, the caller's address for the audit trail), wake its cycle, are started again when they
die and stop with gpuctld."""

from __future__ import annotations

import os
import pwd
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuctl.api._pb.v1 import auth_pb2, auth_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from gpuctl.api.auth import bearer
from gpuctl.api.forward import FORWARDED, peer_of
from gpuctl.core.errors import InvalidArgument
from gpuctl.runtime.config import load_config
from gpuctl.testbed import FAST_CONFIG, LocalCluster
from tests.test_e2e import wait_until

pytestmark = pytest.mark.e2e

ME = pwd.getpwuid(os.geteuid()).pw_name
WORKER_MODULE = "gpuctl.runtime.apiworkers"
# The periodic cycle a minute apart: a job told its reason sooner was woken by its submit.
CONFIG = FAST_CONFIG.replace("{user}", ME).replace("interval_s = 1.0", "interval_s = 60.0") + (
    "\n[server]\napi_workers = 2\n"
)


def start(
    root: Path, *, store_url: str = "", ha_name: str = "", leads: bool = True, tls: bool = False
):
    cluster = LocalCluster(root, metrics=True, store_url=store_url)
    root.mkdir(parents=True)
    text = CONFIG + (f'\n[ha]\nname = "{ha_name}"\n' if ha_name else "")
    (root / "gpuctld.toml").write_text(text + ("\n[tls]\nself_signed = true\n" if tls else ""))
    cluster.start_daemon()
    if leads:
        wait_until(lambda: len(workers(cluster)) == 2, what="two API workers")
    return cluster


def workers(cluster: LocalCluster) -> list[psutil.Process]:
    daemon = psutil.Process(cluster.procs["gpuctld"].pid)
    return [
        p for p in daemon.children() if WORKER_MODULE in " ".join(p.cmdline()) and p.is_running()
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start(tmp_path_factory.mktemp("apiworkers") / "cluster")
    try:
        yield c
    finally:
        c.remove()


SPEC = jobs_pb2.JobSpec(
    kind=jobs_pb2.JOB_KIND_INFERENCE, gpus_per_node=1, command=[sys.executable, "-c", "pass"]
)


class Connection:
    """One TCP connection of its own to gpuctld's port, and the process that serves it."""

    def __init__(self, cluster: LocalCluster, ca: bytes = b"") -> None:
        before = _our_ports(cluster.port)
        options = [("grpc.use_local_subchannel_pool", 1)]
        if ca:
            self.channel = grpc.secure_channel(
                f"localhost:{cluster.port}", grpc.ssl_channel_credentials(ca), options=options
            )
        else:
            self.channel = grpc.insecure_channel(cluster.target, options=options)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        (port,) = _our_ports(cluster.port) - before
        servers = [psutil.Process(cluster.procs["gpuctld"].pid), *workers(cluster)]
        self.pid = next(
            s.pid
            for s in servers
            for c in s.net_connections("tcp")
            if c.laddr.port == cluster.port and c.raddr and c.raddr.port == port
        )

    def close(self) -> None:
        self.channel.close()


def _our_ports(port: int) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def connection_to(cluster: LocalCluster, worker: bool, ca: bytes = b"") -> Connection:
    """A connection a worker serves (or gpuctld itself): the kernel picks, so try a few."""
    pids = {p.pid for p in workers(cluster)}
    for _ in range(60):
        conn = Connection(cluster, ca)
        if (conn.pid in pids) == worker:
            return conn
        conn.close()
    raise AssertionError("the kernel never gave a connection to the process wanted")


def user_token(cluster: LocalCluster, name: str = ME) -> tuple[tuple[str, str], ...]:
    return bearer(cluster.gpuctl("token", "create", "--user", name).stdout.strip())


def test_a_worker_serves_submits_and_reads_and_passes_the_rest_on(cluster):
    me = user_token(cluster)
    conn = connection_to(cluster, worker=True)
    try:
        job = conn.jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=me)
        assert conn.jobs.GetJob(jobs_pb2.GetJobRequest(name=job.name), metadata=me).name == job.name
        listed = conn.jobs.ListJobs(jobs_pb2.ListJobsRequest(), metadata=me).jobs
        assert job.name in [j.name for j in listed]
        # Passed on to gpuctld: a change, a refusal with its status and words, a stream.
        who = conn.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=me)
        assert (who.user, who.via) == (ME, "token")
        cancelled = conn.jobs.CancelJob(jobs_pb2.CancelJobRequest(name=job.name), metadata=me)
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED  # pending: cancelled at once
        with pytest.raises(grpc.RpcError) as missing:
            conn.jobs.CancelJob(jobs_pb2.CancelJobRequest(name="jobs/999999"), metadata=me)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert "999999" in missing.value.details()
        with pytest.raises(grpc.RpcError) as anonymous:
            conn.jobs.CancelJob(jobs_pb2.CancelJobRequest(name=job.name))
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
        watch = conn.jobs.WatchJobs(jobs_pb2.WatchJobsRequest(), metadata=me, timeout=10)
        first = next(iter(watch))
        assert first.job.name
        watch.cancel()
    finally:
        conn.close()
    # The trail names the caller's TCP address for the calls passed on, as for the others.
    with cluster.client() as admin:
        trail = [e for e in admin.audit(limit=100) if e.target == job.name]
    assert {e.action for e in trail} >= {"CreateJob", "CancelJob"}
    assert all(e.peer.startswith("ipv4:127.0.0.1:") for e in trail), [e.peer for e in trail]


def test_a_submit_through_a_worker_wakes_the_cycle(cluster):
    me = user_token(cluster)
    conn = connection_to(cluster, worker=True)
    try:
        job = conn.jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=me)
        # No node: the cycle tells the job why it waits. The periodic one is a minute away.
        wait_until(
            lambda: conn.jobs.GetJob(jobs_pb2.GetJobRequest(name=job.name), metadata=me).reason,
            timeout=20,
            what="the job's reason",
        )
    finally:
        conn.close()


def answered(cluster: LocalCluster, method: str, code: str) -> float:
    """gpuctld's count of `method` calls answered with `code`, from its /metrics."""
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "gpuctl_api_request_duration_seconds_count"
        and s.labels == {"method": method, "code": code}
    )


def test_gpuctlds_metrics_count_the_calls_its_workers_answer(cluster):
    me = user_token(cluster)
    conn = connection_to(cluster, worker=True)
    try:
        job = conn.jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=me)
        before = answered(cluster, "JobService/GetJob", "OK")
        missing = answered(cluster, "JobService/GetJob", "NOT_FOUND")
        for _ in range(5):
            conn.jobs.GetJob(jobs_pb2.GetJobRequest(name=job.name), metadata=me)
        with pytest.raises(grpc.RpcError):
            conn.jobs.GetJob(jobs_pb2.GetJobRequest(name="jobs/999999"), metadata=me)
        wait_until(
            lambda: (
                answered(cluster, "JobService/GetJob", "OK") == before + 5
                and answered(cluster, "JobService/GetJob", "NOT_FOUND") == missing + 1
            ),
            what="gpuctld to count the worker's calls",
        )
    finally:
        conn.close()


def test_a_forged_forwarding_header_is_not_believed(cluster):
    me = user_token(cluster)
    forged = (*me, (FORWARDED, "guess 10.9.8.7:1"))
    for target in (cluster.local, cluster.target):  # gpuctld's own socket, and TCP
        with grpc.insecure_channel(target) as channel:
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            job = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=forged)
        with cluster.client() as admin:
            (entry,) = [e for e in admin.audit(limit=100) if e.target == job.name]
        assert "10.9.8.7" not in entry.peer


def test_a_dead_worker_is_started_again(cluster):
    (first, second) = workers(cluster)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    wait_until(
        lambda: len(workers(cluster)) == 2 and first.pid not in {p.pid for p in workers(cluster)},
        timeout=30,
        what="the worker started again",
    )
    assert second.is_running()
    assert "exited with -9" in cluster.log("gpuctld")


def test_workers_stop_with_gpuctld_and_when_it_dies(tmp_path):
    for how in (signal.SIGTERM, signal.SIGKILL):
        cluster = start(tmp_path / how.name)
        running = workers(cluster)
        try:
            cluster.stop("gpuctld", how)
            _gone, alive = psutil.wait_procs(running, timeout=20)
            assert not alive, f"after {how.name}: workers {[p.pid for p in alive]} still run"
        finally:
            for p in running:
                if p.is_running():
                    p.kill()
            cluster.remove()


@pytest.mark.postgres
def test_only_the_leader_has_workers_and_a_new_leader_starts_its_own(postgres_url, tmp_path):
    a = start(tmp_path / "head-a", store_url=postgres_url, ha_name="head-a")
    b = None
    try:
        b = start(tmp_path / "head-b", store_url=postgres_url, ha_name="head-b", leads=False)
        assert workers(b) == []  # a standby serves reads and refuses writes itself
        old = workers(a)
        a.stop("gpuctld", signal.SIGKILL)
        _gone, alive = psutil.wait_procs(old, timeout=20)
        assert not alive, "the dead leader's workers outlived it"
        wait_until(lambda: len(workers(b)) == 2, what="the new leader's workers")
        me = user_token(b)
        conn = connection_to(b, worker=True)
        try:  # its writes carry the new leader's epoch
            job = conn.jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=me)
            assert job.state == jobs_pb2.JOB_STATE_PENDING
        finally:
            conn.close()
    finally:
        a.remove()
        if b is not None:
            b.remove()


def test_workers_speak_gpuctlds_tls(tmp_path):
    cluster = start(tmp_path / "tls", tls=True)
    try:
        ca = (cluster.root / "state" / "pki" / "ca.crt").read_bytes()
        me = user_token(cluster)
        for worker in (True, False):
            conn = connection_to(cluster, worker=worker, ca=ca)
            try:
                job = conn.jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=me)
                who = conn.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=me)  # passed on
                assert job.name and who.user == ME
            finally:
                conn.close()
    finally:
        cluster.remove()


# -- without processes -------------------------------------------------------------------


class _Context:
    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._peer, self._metadata = peer, metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return self._metadata


def test_the_callers_address_is_taken_from_a_worker_only_with_the_secret():
    vouched = ((FORWARDED, "s3cret ipv4:10.0.0.5:4242"),)
    assert peer_of(_Context("unix:", vouched), "s3cret") == "ipv4:10.0.0.5:4242"
    assert peer_of(_Context("unix:", ((FORWARDED, "wrong ipv4:10.0.0.5:1"),)), "s3cret") == "unix:"
    assert peer_of(_Context("unix:", vouched), "") == "unix:"  # no workers: no header believed
    # Only on a socket: over TCP the header is a caller's own.
    assert peer_of(_Context("ipv4:1.2.3.4:5", vouched), "s3cret") == "ipv4:1.2.3.4:5"


def test_the_number_of_workers_is_checked():
    assert load_config(None, {"api_workers": 4}).api_workers == 4
    for bad, words in ((-1, "must not be negative"), (65, "at most 64"), (True, "must be int")):
        with pytest.raises(InvalidArgument) as e:
            load_config(None, {"api_workers": bad})
        assert words in str(e.value)
