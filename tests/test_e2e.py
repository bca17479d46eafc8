"""End to end: gpuctld and two agents as real processes on loopback ports, driven by the CLI.

A 2-node gang runs and both ranks see one consistent torch.distributed world; the job and
everything acknowledged survive the daemon being killed with SIGKILL and restarted.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import sys
import time

import pytest

from gpuctl.testbed import FAST_CONFIG, AgentSpec, LocalCluster, Partition

pytestmark = pytest.mark.e2e

PRINT_ENV = (
    "import json, os; keys = ['MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'NODE_RANK', 'NNODES', "
    "'NPROC_PER_NODE', 'PET_NNODES', 'PET_NODE_RANK', 'PET_MASTER_ADDR', 'PET_MASTER_PORT', "
    "'CUDA_VISIBLE_DEVICES', 'GPUCTL_JOB_ID', 'GPUCTL_NODE_RANK', 'GPUCTL_NUM_NODES', 'GPUCTL_NODELIST', "
    "'NOTIFY_SOCKET']; print('ENV ' + json.dumps({k: os.environ.get(k) for k in keys}))"
)


def node(name: str) -> AgentSpec:
    return AgentSpec(
        name=name,
        fake_gpus="h100-sxm:8",
        fabric="ib-test/spine-1/leaf-1",
        net="infiniband:8x400",
        price_per_hour=20.0,
    )


def wait_until(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "cluster")
    c.start_daemon()
    yield c
    c.stop_all()


def nodes_ready(cluster: LocalCluster, n: int) -> bool:
    out = cluster.gpuctl("nodes", "-o", "json", check=False)
    return out.returncode == 0 and len(json.loads(out.stdout or "[]")) == n


def job_json(cluster: LocalCluster, job_id: str) -> dict:
    out = cluster.gpuctl("jobs", "--all", "-o", "json")
    return next(j for j in json.loads(out.stdout) if str(j["id"]) == job_id)


def test_two_node_gang_runs_with_one_consistent_world_and_survives_a_restart(cluster, tmp_path):
    cluster.start_agent(node("gpu-1"))
    cluster.start_agent(node("gpu-2"))
    wait_until(lambda: nodes_ready(cluster, 2), what="two nodes to register")

    out = cluster.gpuctl(
        "submit", "--kind", "training", "--nodes", "2", "--gpus-per-node", "8", "--name", "gang",
        "--wait", "--", sys.executable, "-c", PRINT_ENV,
    )  # fmt: skip
    assert out.stdout.startswith("Submitted job ")
    job_id = out.stdout.split()[2]
    job = job_json(cluster, job_id)
    assert job["status"]["state"] == "succeeded", job

    envs = []
    for rank in (0, 1):
        log = cluster.gpuctl("logs", job_id, "--rank", str(rank)).stdout
        line = next(x for x in log.splitlines() if x.startswith("ENV "))
        envs.append(json.loads(line[4:]))
    assert [e["NODE_RANK"] for e in envs] == ["0", "1"]
    assert [e["PET_NODE_RANK"] for e in envs] == ["0", "1"]
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1
    for e in envs:
        assert e["WORLD_SIZE"] == "16"
        assert (e["NNODES"], e["PET_NNODES"], e["NPROC_PER_NODE"]) == ("2", "2", "8")
        assert e["MASTER_PORT"] == e["PET_MASTER_PORT"]
        assert e["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        assert e["GPUCTL_JOB_ID"] == job_id
        assert e["GPUCTL_NUM_NODES"] == "2"
        assert e["GPUCTL_NODELIST"] == "gpu-1,gpu-2"
        assert e["NOTIFY_SOCKET"] is None

    # The daemon dies hard and comes back on the same store: the job is still there.
    cluster.stop("gpuctld", signal.SIGKILL)
    cluster.start_daemon()
    assert job_json(cluster, job_id)["status"]["state"] == "succeeded"
    described = cluster.gpuctl("describe", job_id).stdout
    assert "gpu-1" in described and "gpu-2" in described


def test_acknowledged_submission_survives_sigkill(cluster):
    # No agents: the job stays pending, with a reason.
    out = cluster.gpuctl(
        "submit", "--parsable", "--kind", "training", "--gpus-per-node", "8", "--", "true"
    )
    job_id = out.stdout.strip()
    cluster.stop("gpuctld", signal.SIGKILL)
    cluster.start_daemon()
    job = job_json(cluster, job_id)
    assert job["status"]["state"] == "pending"
    wait_until(lambda: job_json(cluster, job_id)["status"]["reason"], what="a pending reason")


def test_cancel_stops_a_running_rank_and_bad_input_is_one_line(cluster):
    cluster.start_agent(node("gpu-1"))
    wait_until(lambda: nodes_ready(cluster, 1), what="the node to register")
    job_id = cluster.gpuctl(
        "submit", "--parsable", "--kind", "inference", "--gpus-per-node", "1", "--",
        sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)",
    ).stdout.strip()  # fmt: skip
    wait_until(
        lambda: job_json(cluster, job_id)["status"]["state"] == "running", what="the job to run"
    )
    wait_until(lambda: "up" in cluster.gpuctl("logs", job_id).stdout, what="the replica's output")
    cluster.gpuctl("cancel", job_id)
    wait_until(
        lambda: job_json(cluster, job_id)["status"]["state"] == "cancelled",
        what="the job to be cancelled",
    )

    bad = cluster.gpuctl(
        "submit", "--kind", "training", "--gpus-per-node", "0", "--", "true", check=False
    )
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "--gpus-per-node" in bad.stderr


# Each writes its pid beside the directory, then renames it in: a reader never sees it empty.
REPLICA = (
    "import os, pathlib, sys, time; "
    "p = pathlib.Path(sys.argv[1], os.environ['GPUCTL_REPLICA_INDEX']); "
    "t = p.parent.with_name(p.parent.name + '.' + p.name); t.write_text(str(os.getpid())); t.rename(p); "
    "time.sleep(600)"
)


# A rank that marks its attempt's start with its pid.
RANK_MARK = (
    "import os, pathlib, sys, time; "
    "p = pathlib.Path(sys.argv[1], os.environ['GPUCTL_ATTEMPT']); "
    "t = p.parent.with_name(p.parent.name + '.' + p.name); t.write_text(str(os.getpid())); t.rename(p); "
    "time.sleep(600)"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_replica_is_replaced_the_others_keep_running_and_it_scales(cluster, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    cluster.start_agent(node("gpu-1"))
    wait_until(lambda: nodes_ready(cluster, 1), what="the node to register")
    job_id = cluster.gpuctl(
        "submit", "--parsable", "--kind", "inference", "--replicas", "3", "--gpus-per-node", "1",
        "--", sys.executable, "-c", REPLICA, str(pids),
    ).stdout.strip()  # fmt: skip
    wait_until(lambda: len(list(pids.iterdir())) == 3, what="three replicas to start")
    first = {p.name: int(p.read_text()) for p in pids.iterdir()}

    os.kill(first["1"], signal.SIGKILL)

    wait_until(lambda: (pids / "3").exists(), what="a replacement replica")
    job = job_json(cluster, job_id)
    assert job["status"]["state"] == "running" and job["status"]["attempt"] == 0
    assert alive(first["0"]) and alive(first["2"])  # never stopped
    wait_until(
        lambda: "3/3" in cluster.gpuctl("jobs").stdout.splitlines()[1].split(),
        what="gpuctl jobs to show 3 of 3 replicas running",
    )
    ranks = {r["rank"]: r for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]}
    assert sorted(ranks) == [0, 2, 3]  # the killed one is replaced
    assert ranks[3]["restarts"] == 1 and "killed by SIGKILL" in ranks[3]["last_failure"]

    # Scaled 3 -> 6, three more start; scaled down to 2, four stop and two run on.
    out = cluster.gpuctl("scale", job_id, "--replicas", "6").stdout
    assert out.startswith(f"job {job_id} scaled to 6 replicas")
    wait_until(lambda: all((pids / str(r)).exists() for r in (4, 5, 6)), what="three replicas more")
    everyone = {p.name: int(p.read_text()) for p in pids.iterdir() if p.name != "1"}
    assert len(everyone) == 6
    cluster.gpuctl("scale", job_id, "--replicas", "2")
    wait_until(
        lambda: sum(alive(pid) for pid in everyone.values()) == 2, what="four replicas to stop"
    )
    assert "2/2" in cluster.gpuctl("jobs").stdout.splitlines()[1].split()
    cluster.gpuctl("cancel", job_id)
    wait_until(
        lambda: job_json(cluster, job_id)["status"]["state"] == "cancelled",
        what="the service to be cancelled",
    )


def test_a_killed_agent_loses_only_its_replicas_which_are_replaced_on_another_node(
    cluster, tmp_path
):
    pids = tmp_path / "pids"
    pids.mkdir()
    for name in ("gpu-1", "gpu-2"):
        cluster.start_agent(node(name))
    wait_until(lambda: nodes_ready(cluster, 2), what="two nodes to register")
    job_id = cluster.gpuctl(
        "submit", "--parsable", "--kind", "inference", "--replicas", "2", "--gpus-per-node", "8",
        "--", sys.executable, "-c", REPLICA, str(pids),
    ).stdout.strip()  # fmt: skip
    wait_until(lambda: len(list(pids.iterdir())) == 2, what="two replicas to start")
    ranks = {
        r["rank"]: r["node"] for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]
    }
    on_1 = next(str(rank) for rank, n in ranks.items() if n == "gpu-1")
    on_2 = next(str(rank) for rank, n in ranks.items() if n == "gpu-2")
    survivor, orphan = int((pids / on_1).read_text()), int((pids / on_2).read_text())
    cluster.start_agent(node("gpu-3"))  # spare capacity
    wait_until(lambda: nodes_ready(cluster, 3), what="the spare node to register")

    cluster.stop("agent-gpu-2", signal.SIGKILL)

    # Lost after the heartbeat timeout (10 s here); its replica goes to gpu-3, gpu-1's runs on.
    wait_until(lambda: (pids / "2").exists(), timeout=40, what="the lost replica's replacement")
    # With nobody left to stop it, the replica on gpu-2 stopped itself when the node's lease ran
    # out (9.7 s here, before the node was called lost): it never runs beside its replacement.
    wait_until(lambda: not alive(orphan), timeout=5, what="the lost node's replica to stop")
    job = job_json(cluster, job_id)
    placed = {r["rank"]: r for r in job["status"]["placement"]["ranks"]}
    assert sorted(placed) == sorted([int(on_1), 2]) and placed[2]["node"] == "gpu-3"
    assert placed[2]["last_failure"] == "node gpu-2 lost"
    assert job["status"]["state"] == "running" and alive(survivor)
    cluster.gpuctl("cancel", job_id)


def test_a_rolling_update_moves_a_service_over_and_a_failing_one_rolls_back(cluster, tmp_path):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    cluster.start_agent(node("gpu-1"))
    wait_until(lambda: nodes_ready(cluster, 1), what="the node to register")
    service = {
        "kind": "inference",
        "replicas": 2,
        "gpus_per_node": 1,
        "min_ready": 1,
        "working_dir": str(tmp_path),
    }
    spec_file = tmp_path / "serve.yaml"
    spec_file.write_text(
        json.dumps({**service, "command": [sys.executable, "-c", REPLICA, str(v1)]})
    )
    job_id = cluster.gpuctl("submit", "--parsable", "-f", str(spec_file)).stdout.strip()
    wait_until(lambda: len(list(v1.iterdir())) == 2, what="two v1 replicas")
    old = [int(p.read_text()) for p in v1.iterdir()]

    spec_file.write_text(
        json.dumps({**service, "command": [sys.executable, "-c", REPLICA, str(v2)]})
    )
    out = cluster.gpuctl("update", job_id, "-f", str(spec_file)).stdout
    assert out.startswith(f"job {job_id} updated: updating to generation 1")

    wait_until(lambda: not any(alive(pid) for pid in old), timeout=40, what="v1 to stop")
    job = job_json(cluster, job_id)
    assert len(list(v2.iterdir())) == 2 and job["status"]["generation"] == 1
    assert not job["status"]["rolling"]
    new = [int(p.read_text()) for p in v2.iterdir()]

    # A new spec whose replicas exit at once: rolled back, the running ones never stopped.
    spec_file.write_text(json.dumps({**service, "command": [sys.executable, "-c", "exit(3)"]}))
    cluster.gpuctl("update", job_id, "-f", str(spec_file))
    wait_until(
        lambda: job_json(cluster, job_id)["status"]["reason"].startswith("rolled back"),
        timeout=60,
        what="the update to roll back",
    )
    assert all(alive(pid) for pid in new)
    assert job_json(cluster, job_id)["status"]["generation"] == 1
    cluster.gpuctl("cancel", job_id)


# Serves on its port once the test creates `go` in the working directory: until then its
# readiness probe fails, whatever the machine's speed.
SERVER = """
import http.server, os, pathlib, time
while not pathlib.Path("go").exists():
    time.sleep(0.05)
http.server.ThreadingHTTPServer(
    ("127.0.0.1", int(os.environ["GPUCTL_PORT"])), http.server.SimpleHTTPRequestHandler
).serve_forever()
"""


def test_a_replica_is_ready_once_its_probe_passes_and_an_update_never_ready_rolls_back(
    cluster, tmp_path
):
    cluster.start_agent(node("gpu-1"))
    wait_until(lambda: nodes_ready(cluster, 1), what="the node to register")
    spec = tmp_path / "serve.yaml"
    spec.write_text(
        json.dumps(
            {
                "kind": "inference",
                "replicas": 2,
                "gpus_per_node": 1,
                "readiness_http": "/",
                "working_dir": str(tmp_path),
                "command": [sys.executable, "-c", SERVER],
            }
        )
    )
    job_id = cluster.gpuctl("submit", "--parsable", "-f", str(spec)).stdout.strip()
    wait_until(
        lambda: (
            {
                r["state"]
                for r in (job_json(cluster, job_id)["status"]["placement"] or {}).get("ranks", [])
            }
            == {"running"}
        ),
        what="both replicas to run",
    )
    assert "0/2" in cluster.gpuctl("jobs").stdout.splitlines()[1].split()  # not serving yet
    (tmp_path / "go").touch()
    wait_until(
        lambda: "2/2" in cluster.gpuctl("jobs").stdout.splitlines()[1].split(),
        what="both replicas to answer their probe",
    )
    ports = {r["port"] for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]}
    assert len(ports) == 2  # one node, a port each

    # An update whose replicas never answer their probe is rolled back at its deadline; the
    # serving replicas are never stopped.
    serving = {r["rank"] for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]}
    spec.write_text(
        json.dumps(
            {
                "kind": "inference",
                "replicas": 2,
                "gpus_per_node": 1,
                "readiness_http": "/",
                "min_ready": 1,
                "progress_deadline": 3,
                "working_dir": str(tmp_path),
                "command": [sys.executable, "-c", "import time; time.sleep(600)"],
            }
        )
    )
    cluster.gpuctl("update", job_id, "-f", str(spec))
    wait_until(
        lambda: "was not ready 3 s" in job_json(cluster, job_id)["status"]["reason"],
        timeout=30,
        what="the update to roll back at its deadline",
    )
    wait_until(
        lambda: (
            {r["rank"] for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]}
            == serving
        ),
        what="the never-ready replica to stop",
    )
    assert "2/2" in cluster.gpuctl("jobs").stdout.splitlines()[1].split()
    cluster.gpuctl("cancel", job_id)


def test_a_degraded_node_moves_its_replica_elsewhere_and_the_other_runs_on(cluster, tmp_path):
    pids, lost = tmp_path / "pids", tmp_path / "gpu-2.lost"
    pids.mkdir()
    cluster.start_agent(node("gpu-1"))
    cluster.start_agent(
        node("gpu-2"), extra=["--fake-gpus-lost", str(lost), "--health-interval", "1"]
    )
    wait_until(lambda: nodes_ready(cluster, 2), what="two nodes to register")
    job_id = cluster.gpuctl(
        "submit", "--parsable", "--kind", "inference", "--replicas", "2", "--gpus-per-node", "8",
        "--", sys.executable, "-c", REPLICA, str(pids),
    ).stdout.strip()  # fmt: skip
    wait_until(lambda: len(list(pids.iterdir())) == 2, what="two replicas to start")
    ranks = {
        r["node"]: r["rank"] for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]
    }
    on_1, on_2 = (
        int((pids / str(ranks["gpu-1"])).read_text()),
        int((pids / str(ranks["gpu-2"])).read_text()),
    )
    cluster.start_agent(node("gpu-3"))
    wait_until(lambda: nodes_ready(cluster, 3), what="the spare node to register")

    lost.write_text("3\n")  # GPU 3 of gpu-2 falls off the bus

    wait_until(lambda: (pids / "2").exists(), timeout=30, what="the moved replica's replacement")
    wait_until(lambda: not alive(on_2), what="the replica on the degraded node to stop")
    node2 = json.loads(cluster.gpuctl("nodes", "-o", "json").stdout)
    assert {n["name"]: n["state"] for n in node2}["gpu-2"] == "NODE_STATE_DEGRADED"
    placed = {r["rank"]: r for r in job_json(cluster, job_id)["status"]["placement"]["ranks"]}
    assert placed[2]["node"] == "gpu-3" and "degraded" in placed[2]["last_failure"]
    assert alive(on_1) and job_json(cluster, job_id)["status"]["state"] == "running"
    cluster.gpuctl("cancel", job_id)


def test_a_partitioned_agent_stops_its_rank_before_it_runs_elsewhere(tmp_path):
    # A short timeout, so the test is short: heartbeats every 0.3 s, lost after 3 s; the agent
    # cut off stops its rank after 2.7 s, before gpuctld calls its node lost.
    c = LocalCluster(tmp_path / "cluster")
    c.root.mkdir(parents=True)
    me = pwd.getpwuid(os.geteuid()).pw_name
    (c.root / "gpuctld.toml").write_text(
        FAST_CONFIG.replace("{user}", me).replace(
            "heartbeat_timeout_s = 10.0", "heartbeat_timeout_s = 3.0"
        )
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    relays: dict[str, Partition] = {}
    try:
        c.start_daemon()
        relays = {name: Partition(c.target) for name in ("gpu-1", "gpu-2")}
        c.start_agent(node("gpu-1"), server=relays["gpu-1"].address)
        wait_until(lambda: nodes_ready(c, 1), what="gpu-1 to register")
        job_id = c.gpuctl(
            "submit", "--parsable", "--kind", "training", "--gpus-per-node", "8", "--",
            sys.executable, "-c", RANK_MARK, str(marks),
        ).stdout.strip()  # fmt: skip
        (before,) = wait_until(lambda: list(marks.iterdir()), what="the rank to start on gpu-1")
        first = int(before.read_text())
        c.start_agent(node("gpu-2"), server=relays["gpu-2"].address)
        wait_until(lambda: nodes_ready(c, 2), what="gpu-2 to register")

        relays["gpu-1"].cut()

        wait_until(lambda: len(list(marks.iterdir())) == 2, what="the next attempt on gpu-2")
        assert not alive(first)  # stopped by its own agent, which gpuctld could not reach
        assert "no word from gpuctld" in c.log("agent-gpu-1")
        job = job_json(c, job_id)
        assert job["status"]["placement"]["ranks"][0]["node"] == "gpu-2"
        relays["gpu-1"].mend()  # back: nothing of attempt 1 starts again there
        wait_until(lambda: "registered as gpu-1" in c.log("agent-gpu-1").split("no word")[-1])
        assert job_json(c, job_id)["status"]["state"] == "running"
        assert len(list(marks.iterdir())) == 2
    finally:
        c.stop_all()
        for relay in relays.values():
            relay.close()
