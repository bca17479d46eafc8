"""`python -m gpuctl.bench_failover` (`make bench-failover`): kill -9 the leading gpuctld under a
submit storm, with a training gang running, and measure what callers and jobs see.

Two gpuctld ("head-a" leads, "head-b" stands by) share a fresh schema of one PostgreSQL; two
agents with simulated GPUs are given both addresses; a client given both addresses submits
small jobs (which run and finish) as fast as it can. Then head-a is killed with SIGKILL.
Reported per round:

- takeover_s: from the kill to the first write acknowledged by head-b (what a caller waits);
- leading_s: from the kill to head-b's "leading" log line;
- acked / lost: submissions acknowledged, and of those missing from the store (must be 0);
- bound_twice: jobs scheduled more often than they had attempts (must be 0);
- gang_restarted: the gang's ranks restarted or requeued (must be 0: its nodes were healthy);
- nodes_lost: nodes called lost during the takeover (must be 0).

Loopback only; every process is stopped at the end; bounded by `--storm-s` and timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gpuctl.api.client import Client, jobs_pb2
from gpuctl.testbed import AgentSpec, LocalCluster

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
GANG = {
    "kind": "training",
    "name": "gang",
    "nodes": 2,
    "gpus_per_node": 4,
    "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
}
SMALL = {"kind": "training", "name": "small", "nodes": 1, "gpus_per_node": 1, "command": ["true"]}


@dataclass
class Round:
    takeover_s: float
    leading_s: float
    acked: int
    lost: int
    bound_twice: int
    gang_restarted: int
    nodes_lost: int
    errors: int


def _schema_url(server: str) -> tuple[str, str]:
    schema = f"gpuctl_bench_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(server)
    query = [*parse_qsl(parts.query), ("options", f"-csearch_path={schema}")]
    return schema, urlunsplit(parts._replace(query=urlencode(query)))


def _libpq(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


def _node(name: str) -> AgentSpec:
    return AgentSpec(
        name=name, fake_gpus="h100-sxm:8", fabric="ib/spine-1/leaf-1", net="infiniband:8x400"
    )


class Storm(threading.Thread):
    """Submits SMALL jobs back to back through a client given every head's address."""

    def __init__(self, target: str, token: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(target, token=token, timeout=5.0)
        self.acked: list[tuple[float, str]] = []  # (monotonic, request_id)
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            request_id = str(uuid.uuid4())
            try:
                self.client.submit(SMALL, request_id=request_id)
            except Exception:  # counted: what a caller would have seen
                self.errors += 1
                time.sleep(0.05)
                continue
            self.acked.append((time.monotonic(), request_id))
        self.client.close()


def one_round(postgres: str, root: Path, storm_s: float = 4.0) -> Round:
    import psycopg
    from psycopg import sql

    schema, url = _schema_url(postgres)
    with psycopg.connect(_libpq(postgres), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    a = LocalCluster(root / "head-a", store_url=url, ha_name="head-a")
    b = LocalCluster(root / "head-b", store_url=url, ha_name="head-b")
    storm = None
    try:
        a.start_daemon()
        _wait(lambda: "leading (epoch" in a.log("gpuctld"), 20, "head-a to lead")
        b.start_daemon()
        _wait(lambda: "standby:" in b.log("gpuctld"), 20, "head-b to stand by")
        both = f"{a.target},{b.target}"
        for name in ("n1", "n2"):
            a.start_agent(_node(name), token_file=a.node_token(name), server=both)
        token = a.gpuctl("token", "create", "--description", "bench").stdout.strip().split()[-1]
        with a.client() as c:
            _wait(lambda: len(c.nodes()) == 2, 30, "two nodes")
            gang = c.submit(GANG)
            running = _wait(
                lambda: (j := c.get(gang.name)).state == jobs_pb2.JOB_STATE_RUNNING and j,
                60,
                "the gang to run",
            )
        storm = Storm(both, token)
        storm.start()
        time.sleep(storm_s / 2)
        killed = time.monotonic()
        os.killpg(a.procs["gpuctld"].pid, signal.SIGKILL)
        a.procs.pop("gpuctld").wait()
        _wait(lambda: "leading (epoch" in b.log("gpuctld"), 30, "head-b to lead")
        leading_s = time.monotonic() - killed
        _wait(lambda: any(t > killed for t, _ in storm.acked), 30, "a write after the kill")
        takeover_s = min(t for t, _ in storm.acked if t > killed) - killed
        time.sleep(storm_s / 2)
        storm.stop.set()
        storm.join(30)
        with Client(b.local) as c:
            after = c.get(gang.name)
        with psycopg.connect(_libpq(url)) as conn:
            stored = {r[0] for r in conn.execute("SELECT request_id FROM jobs")}
            bound_twice = conn.execute(
                "SELECT count(*) FROM jobs j WHERE (SELECT count(*) FROM events e WHERE "
                "e.object_kind = 'job' AND e.object_id = j.id::text AND e.type = 'Scheduled') "
                "> j.attempt + 1"
            ).fetchone()[0]
            nodes_lost = conn.execute(
                "SELECT count(*) FROM events WHERE object_kind = 'node' AND type = 'NodeLost'"
            ).fetchone()[0]
        restarted = after.attempt != running.attempt or after.state != running.state
        return Round(
            takeover_s=round(takeover_s, 2),
            leading_s=round(leading_s, 2),
            acked=len(storm.acked),
            lost=sum(1 for _, r in storm.acked if r not in stored),
            bound_twice=int(bound_twice),
            gang_restarted=int(restarted),
            nodes_lost=int(nodes_lost),
            errors=storm.errors,
        )
    finally:
        if storm is not None:
            storm.stop.set()
        b.stop_all()
        a.stop_all()
        with psycopg.connect(_libpq(postgres), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuctl.bench_failover", description=__doc__)
    p.add_argument(
        "--postgres", default=os.environ.get("GPUCTL_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--storm-s", type=float, default=6.0)
    p.add_argument("--json", help="write the rounds here")
    args = p.parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="gpuctl-failover-") as tmp:
        for i in range(args.rounds):
            r = one_round(args.postgres, Path(tmp) / f"round-{i}", args.storm_s)
            rounds.append(r)
            print(json.dumps(asdict(r)), flush=True)
    worst = max(r.takeover_s for r in rounds)
    bad = sum(r.lost + r.bound_twice + r.gang_restarted + r.nodes_lost for r in rounds)
    print(f"takeover: worst {worst:.2f}s over {len(rounds)} rounds; lost/double/restarted: {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rounds], indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
