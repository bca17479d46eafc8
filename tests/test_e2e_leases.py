"""End to end with leases: gpuctld with a static provider of two nodes and no agents. A 2-node
gang is submitted; the keeper leases both nodes, and the test boots an agent for each lease it
sees REQUESTED (as a cloud would boot the machine); the gang runs, and when it is done both
leases are RELEASED and the agents are stopped. `gpuctl leases` and `gpuctl cost` show it all.
"""

from __future__ import annotations

import json
import os
import pwd
import sys

import pytest

from gpuctl.testbed import FAST_CONFIG, AgentSpec, LocalCluster
from tests.test_e2e import job_json, wait_until

pytestmark = pytest.mark.e2e

PROVIDERS = """
[[provider]]
name = "lab"
kind = "static"
"""
NODE = """
[[provider.node]]
name = "{name}"
address = "127.0.0.1"
sku = "hgx-h100"
gpu_model = "H100 SXM"
gpu_count = 8
fabric = "ib-lab/spine-1/leaf-1"
network_kind = "infiniband"
network_gbps = 3200
price_per_hour = 36.0
"""
LEASES = """
[leases]
interval_s = 1.0
providers_file = "providers.toml"
boot_timeout_s = 120.0
"""


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "cluster")
    c.root.mkdir(parents=True)
    (c.root / "providers.toml").write_text(
        PROVIDERS + "".join(NODE.format(name=n) for n in ("lab-1", "lab-2"))
    )
    me = pwd.getpwuid(os.geteuid()).pw_name
    (c.root / "gpuctld.toml").write_text(FAST_CONFIG.replace("{user}", me) + LEASES)
    c.start_daemon()
    yield c
    c.stop_all()


def leases(cluster: LocalCluster) -> list[dict]:
    out = cluster.gpuctl("leases", "--all", "-o", "json", check=False)
    return json.loads(out.stdout or "[]") if out.returncode == 0 else []


def boot_requested(cluster: LocalCluster, booted: set[str]) -> bool:
    """Start an agent for each granted lease whose node is not up yet; True once both are."""
    for lease in leases(cluster):
        node = lease.get("node", "")
        if lease.get("state") == "LEASE_STATE_REQUESTED" and node and node not in booted:
            cluster.start_agent(
                AgentSpec(
                    name=node,
                    fake_gpus="h100-sxm:8",
                    fabric="ib-lab/spine-1/leaf-1",
                    net="infiniband:8x400",
                )
            )
            booted.add(node)
    return len(booted) == 2


def test_a_gang_leases_its_nodes_runs_and_gives_them_back(cluster):
    assert leases(cluster) == []  # nothing is leased before there is work
    job_id = cluster.gpuctl(
        "submit", "--parsable", "--kind", "training", "--nodes", "2", "--gpus-per-node", "8",
        "--name", "leased", "--", sys.executable, "-c", "import time; time.sleep(1); print('ok')",
    ).stdout.strip()  # fmt: skip

    booted: set[str] = set()
    wait_until(lambda: boot_requested(cluster, booted), timeout=60, what="two leases granted")
    assert booted == {"lab-1", "lab-2"}
    wait_until(
        lambda: job_json(cluster, job_id)["status"]["state"] == "succeeded",
        timeout=90,
        what="the gang to run and succeed",
    )

    def released() -> list[dict]:
        found = leases(cluster)
        done = [x for x in found if x["state"] == "LEASE_STATE_RELEASED"]
        return done if len(done) == 2 else []

    done = wait_until(released, timeout=60, what="both leases released")
    for name in booted:  # the machines go away with their leases
        cluster.stop(f"agent-{name}")
    assert {x["node"] for x in done} == {"lab-1", "lab-2"}
    assert {x["for_job_id"] for x in done} == {job_id}
    assert all(x["provider"] == "lab" and x["sku"] == "hgx-h100" for x in done)
    assert all(x["cost_usd"] > 0 for x in done)
    assert leases(cluster) and not json.loads(cluster.gpuctl("leases", "-o", "json").stdout)

    table = cluster.gpuctl("leases", "--all").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "NODE", "PROVIDER", "SKU", "STATE"]
    rows = [line.split() for line in table[1:]]
    assert sorted(r[1] for r in rows) == ["lab-1", "lab-2"]
    assert {(r[2], r[3], r[4], r[5], r[7]) for r in rows} == {
        ("lab", "hgx-h100", "released", "36.00", job_id)
    }

    (cost,) = json.loads(cluster.gpuctl("cost", "-o", "json").stdout)
    (row,) = cost["rows"]
    assert row["key"] == job_id and row["jobs"] == 1
    assert row["gpu_hours"] > 0 and row["dollars"] > 0  # 16 GPUs x $36/8 per GPU-hour
    assert cost["leased_dollars"] >= cost["charged_dollars"]
    text = cluster.gpuctl("cost", "--by", "user").stdout
    assert text.splitlines()[0].split() == ["USER", "JOBS", "GPU_HOURS", "COST_$"]
    assert "leased" in text.splitlines()[-1]

    events = cluster.gpuctl("describe", job_id).stdout
    assert "LeaseRequested" in events and "leasing 2x hgx-h100 from lab" in events
