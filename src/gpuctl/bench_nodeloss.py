"""`python -m gpuctl.bench_nodeloss` (`make bench-nodeloss`, benchmark B5): one node of a running
2-node gang drops out, at gpuctld's and the agent's default timings, and what follows is timed.
Two cases: `kill` (its agent is killed with SIGKILL) and `partition` (the loopback relay
between its agent and gpuctld is cut: the agent runs on, cut off).

One gpuctld (SQLite, the shipped defaults: heartbeats every 3 s, a node lost after 12 s,
checked every second, a cycle every 5 s or when woken) and three agents with simulated GPUs
(8 each), each reaching gpuctld through a relay of its own (`testbed.Partition`); the gang
takes two whole nodes, so the third is its spare. Reported per round, in seconds from the
kill or the cut:

- fenced_s: the node's rank is gone (stopped by its supervisor when the agent is dead, by the
  agent when it is cut off: in neither case by gpuctld, which cannot reach it);
- lost_s: gpuctld calls the node lost;
- running_s: every rank of the gang's next attempt runs (the spare node's included);
- overlap_s: how long the old rank still ran after its replacement started (must be 0).

Loopback only; every process is stopped at the end; each wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpuctl.api.client import jobs_pb2, nodes_pb2
from gpuctl.bench_failover import _node, _wait
from gpuctl.testbed import LocalCluster, Partition

CASES = ("kill", "partition")

# Each rank records when it started (CLOCK_MONOTONIC, shared by every process of this boot) in
# a file named after its attempt and node (written whole: renamed into place), then waits.
RANK = (
    "import os, pathlib, sys, time; "
    "p = pathlib.Path(sys.argv[1], os.environ['GPUCTL_ATTEMPT'] + '-' + os.environ['GPUCTL_NODE']); "
    "t = p.parent.with_name(p.parent.name + '.' + p.name); t.write_text(f'{os.getpid()} {time.monotonic()}'); "
    "t.rename(p); time.sleep(3600)"
)


@dataclass
class Round:
    case: str
    fenced_s: float
    lost_s: float
    running_s: float
    overlap_s: float


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def one_round(root: Path, case: str = "kill") -> Round:
    me = pwd.getpwuid(os.geteuid()).pw_name
    cluster = LocalCluster(root / "cluster")
    (root / "cluster").mkdir(parents=True)
    # gpuctld's defaults for everything but who may run jobs: the test bed's own account.
    (root / "cluster" / "gpuctld.toml").write_text(f'[run_as]\nallow = ["{me}"]\n')
    marks = root / "ranks"
    marks.mkdir()
    relays: dict[str, Partition] = {}
    try:
        cluster.start_daemon()
        for name in ("n1", "n2", "n3"):
            relays[name] = Partition(cluster.target)
            cluster.start_agent(_node(name), server=relays[name].address)
        with cluster.client() as c:
            _wait(lambda: len(c.nodes()) == 3, 60, "three nodes")
            gang = c.submit(
                {
                    "kind": "training",
                    "name": "gang",
                    "nodes": 2,
                    "gpus_per_node": 8,
                    "command": [sys.executable, "-c", RANK, str(marks)],
                }
            )
            job = _wait(
                lambda: (j := c.get(gang.name)).state == jobs_pb2.JOB_STATE_RUNNING and j,
                120,
                "the gang to run",
            )
            _wait(lambda: len(list(marks.iterdir())) == 2, 60, "both ranks to start")
            victim = sorted(r.node for r in job.placement.ranks)[0]
            pid = int((marks / f"{job.attempt}-{victim}").read_text().split()[0])
            killed = time.monotonic()
            if case == "kill":
                cluster.stop(f"agent-{victim}", signal.SIGKILL)
            else:
                relays[victim].cut()
            fenced = lost = None
            deadline = killed + 120
            while time.monotonic() < deadline:
                now = time.monotonic()
                if fenced is None and not _alive(pid):
                    fenced = now
                if lost is None and any(
                    n.name == victim and n.state == nodes_pb2.NODE_STATE_LOST for n in c.nodes()
                ):
                    lost = now
                after = c.get(gang.name)
                started = [
                    float(m.read_text().split()[1])
                    for m in marks.glob(f"{after.attempt}-*")
                    if after.attempt > job.attempt
                ]
                if (
                    fenced
                    and lost
                    and after.state == jobs_pb2.JOB_STATE_RUNNING
                    and len(started) == 2
                ):
                    return Round(
                        case=case,
                        fenced_s=round(fenced - killed, 2),
                        lost_s=round(lost - killed, 2),
                        running_s=round(max(started) - killed, 2),
                        overlap_s=round(max(0.0, fenced - min(started)), 2),
                    )
                time.sleep(0.05)
            raise TimeoutError("the gang did not run again within 120 s of the kill")
    finally:
        cluster.stop_all()
        for relay in relays.values():
            relay.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuctl.bench_nodeloss", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="of each case")
    p.add_argument("--case", choices=CASES, action="append", help="default: both")
    p.add_argument("--json", help="write the rounds here")
    args = p.parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="gpuctl-nodeloss-") as tmp:
        for i in range(args.rounds):
            for case in args.case or CASES:  # interleaved: the machine drifts
                r = one_round(Path(tmp) / f"{case}-{i}", case)
                rounds.append(r)
                print(json.dumps(asdict(r)), flush=True)
    for case in args.case or CASES:
        mine = [r for r in rounds if r.case == case]
        worst = {k: max(getattr(r, k) for r in mine) for k in asdict(mine[0]) if k != "case"}
        print(f"{case}, worst: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rounds], indent=2))
    return 1 if any(r.overlap_s > 0 for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
