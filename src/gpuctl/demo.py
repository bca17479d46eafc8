"""`make demo`: gpuctld on a temporary SQLite store, four agents with simulated GPUs, a 2-node
training gang and a 3-replica inference service placed and run, and what happened shown."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

from gpuctl.client import Client, jobs_pb2
from gpuctl.testbed import AgentSpec, LocalCluster

TRAINING_NODES = [
    AgentSpec(
        name=f"train-{i}",
        fake_gpus="h100-sxm:8",
        fabric="ib-demo/spine-1/leaf-1",
        net="infiniband:8x400",
        sku="8x H100 SXM bare metal",
        price_per_hour=23.92,
        cpus=208,
        memory="1800GiB",
    )
    for i in (1, 2)
]
INFERENCE_NODES = [
    AgentSpec(
        name=f"infer-{i}",
        fake_gpus="l40s:4",
        fabric="eth-demo/rack-1/tor-1",
        net="ethernet:1x100",
        sku="4x L40S",
        price_per_hour=7.32,
        cpus=48,
        memory="384GiB",
    )
    for i in (1, 2)
]

TRAIN_PY = """\
# A stand-in for `torchrun train.py`: shows the rendezvous environment each node was given.
import os, time
e = os.environ
print(f"node rank {e['NODE_RANK']} of {e['NNODES']} on {e['GPUCTL_NODE']}: "
      f"CUDA_VISIBLE_DEVICES={e['CUDA_VISIBLE_DEVICES']}")
print(f"  MASTER_ADDR={e['MASTER_ADDR']} MASTER_PORT={e['MASTER_PORT']} WORLD_SIZE={e['WORLD_SIZE']} "
      f"NPROC_PER_NODE={e['NPROC_PER_NODE']}")
for step in range(3):
    time.sleep(0.5)
    print(f"  step {step}: loss {2.0 / (step + 1):.3f}", flush=True)
"""

SERVE_PY = """\
# A stand-in for an inference server replica: runs until it is stopped.
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
e = os.environ
with open(f"replica-{e['GPUCTL_REPLICA_INDEX']}.pid", "w") as f:
    f.write(str(os.getpid()))
print(f"replica {e['GPUCTL_REPLICA_INDEX']} of {e['GPUCTL_NUM_REPLICAS']} on {e['GPUCTL_NODE']} "
      f"GPU {e['CUDA_VISIBLE_DEVICES']}", flush=True)
while True:
    time.sleep(1)
"""


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def explain(text: str) -> None:
    print(textwrap.fill(text, 92), flush=True)


def run(cluster: LocalCluster, *args: str) -> str:
    print(f"$ gpuctl {' '.join(args)}", flush=True)
    out = cluster.gpuctl(*args)
    print(out.stdout.rstrip(), flush=True)
    return out.stdout


def print_placements(client: Client, job_ids: tuple[str, ...]) -> None:
    """One row per rank: where it runs, on what hardware, at what price, and why there."""
    nodes = {n.name: n for n in client.nodes()}
    rows = [("JOB", "RANK", "NODE", "GPUS", "GPU MODEL", "HBM GB/s", "NETWORK", "$/HR", "WHY")]
    for job_id in job_ids:
        job = client.get(job_id)
        for r in job.placement.ranks:
            n = nodes[r.node]
            net = n.profile.network
            rows.append(
                (
                    f"{job.id} {job.spec.name}",
                    str(r.rank),
                    r.node,
                    ",".join(str(i) for i in r.gpu_indices),
                    n.profile.gpus[0].model if n.profile.gpus else "-",
                    f"{n.profile.gpus[0].hbm_gbps:g}" if n.profile.gpus else "-",
                    f"{net.ports}x{net.gbps_per_port:g}G",
                    f"{n.price_per_hour:.2f}",
                    job.placement.reason,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


SHOWN_METRICS = (
    "gpuctl_jobs_running",
    "gpuctl_gpus",
    "gpuctl_fragmented_gpus",
    "gpuctl_lease_cost_dollars_per_hour",
    "gpuctl_charged_dollars_per_hour",
    "gpuctl_scheduling_placements_total",
    "gpuctl_leader",
)


def show_metrics(cluster: LocalCluster) -> None:
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
    print(f"$ curl -s {url} | grep ...", flush=True)
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0] in SHOWN_METRICS:
            print(line)


def wait_for(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="gpuctl-demo-"))
    cluster = LocalCluster(root, pki=True, metrics=True)
    try:
        say("Starting gpuctld on a temporary SQLite store")
        cluster.start_daemon()
        explain(
            f"gpuctld serves people on this host on {cluster.socket} (the kernel tells it who "
            f"they are: no token needed), TLS on {cluster.target} with a certificate from its "
            f"own CA (made on first start), and agents on 127.0.0.1:{cluster.agent_port}, where "
            f"each must show a certificate from that CA naming its node. State in {root / 'state'}."
        )
        run(cluster, "whoami")

        say("Starting four agents with simulated GPUs (profiles from the GPU datasheets)")
        explain(
            "Two training-class nodes: 8x H100 SXM each, NVLink, 8x400G InfiniBand, one fabric. "
            "Two inference-class nodes: 4x L40S each, 100G Ethernet, cheaper per hour."
        )
        explain(
            "Each agent joins with a one-time token (`gpuctl node join-token NAME`): it makes "
            "its own key, gpuctld's CA signs a certificate naming the node, and from then on it "
            "can register, heartbeat and report only for that node."
        )
        for spec in TRAINING_NODES + INFERENCE_NODES:
            cluster.start_agent(spec)
        with cluster.client() as client:
            wait_for("4 nodes", lambda: len(client.nodes()) == 4)
        run(cluster, "nodes")

        (root / "train.py").write_text(TRAIN_PY)
        (root / "serve.py").write_text(SERVE_PY)
        say("Submitting a 2-node training gang and a 3-replica inference service")
        train_id = run(
            cluster,
            "submit", "--parsable", "--kind", "training", "--name", "pretrain-demo",
            "--nodes", "2", "--gpus-per-node", "8", "--min-net-gbps", "1600",
            "--workdir", str(root), "--", sys.executable, "train.py",
        ).strip()  # fmt: skip
        serve_id = run(
            cluster,
            "submit", "--parsable", "--kind", "inference", "--name", "chat-serve",
            "--replicas", "3", "--gpus-per-node", "1", "--gpu-memory", "40GiB",
            "--workdir", str(root), "--", sys.executable, "serve.py",
        ).strip()  # fmt: skip

        with cluster.client() as client:
            wait_for(
                "both jobs to start",
                lambda: all(
                    client.get(j).state != jobs_pb2.JOB_STATE_PENDING for j in (train_id, serve_id)
                ),
            )
        say("Where each job landed, and why")
        explain(
            "The gang needs 1600 Gb/s between nodes, so only the InfiniBand fabric qualifies: it is "
            "placed all-or-nothing on both H100 nodes, node rank 0 giving MASTER_ADDR. The replicas "
            "are bin-packed onto the L40S nodes."
        )
        run(cluster, "jobs", "-o", "wide")
        with cluster.client() as client:
            print_placements(client, (train_id, serve_id))
        run(cluster, "describe", train_id)

        say("What Prometheus sees (a few of gpuctld's metrics)")
        show_metrics(cluster)

        say("Waiting for the training job to finish")
        with cluster.client() as client:
            job = client.wait(train_id, timeout=60)
        run(cluster, "jobs", "--all")
        for rank in (0, 1):
            say(f"Logs of training rank {rank}")
            run(cluster, "logs", train_id, "--rank", str(rank))
        say("Logs of inference replica 0")
        run(cluster, "logs", serve_id, "--rank", "0")

        say("Replica 1 crashes (kill -9): the service replaces it, the others run on")
        os.kill(int((root / "replica-1.pid").read_text()), signal.SIGKILL)
        wait_for("the replacement replica", lambda: (root / "replica-3.pid").exists())
        explain(
            "The replacement is a new replica (rank 3) placed by the scheduler like any other; "
            "replicas 0 and 2 were never stopped."
        )
        run(cluster, "jobs")
        say("Scaling the service down to 2 replicas")
        run(cluster, "scale", serve_id, "--replicas", "2")
        with cluster.client() as client:
            wait_for(
                "a replica to stop",
                lambda: (
                    sum(
                        r.state == jobs_pb2.RANK_STATE_RUNNING
                        for r in client.get(serve_id).placement.ranks
                    )
                    == 2
                ),
            )
        run(cluster, "describe", serve_id)

        say("Cancelling the inference service; its replicas get SIGTERM")
        run(cluster, "cancel", serve_id)
        with cluster.client() as client:
            client.wait(serve_id, timeout=30)
        run(cluster, "leases")
        say("What each job cost: its share of each node's price for the time it held GPUs")
        run(cluster, "cost", "--by", "job")
        run(cluster, "jobs", "--all")
        ok = job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        say("Shutting down agents and gpuctld (SIGTERM: graceful drain)")
        cluster.stop_all()
        print("done." if ok else "the training job did not succeed: see the logs above")
        return 0 if ok else 1
    except Exception as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        for name in sorted(cluster.procs):
            print(f"--- {name}.log (last lines) ---\n{cluster.log(name)[-2000:]}", file=sys.stderr)
        return 1
    finally:
        cluster.remove()


if __name__ == "__main__":
    sys.exit(main())
