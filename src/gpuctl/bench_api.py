"""`python -m gpuctl.bench_api` (benchmark B3, `make bench-api`): the API under load. A closed
loop of `grpc.aio` calls from separate processes, loopback only, bounded in time, against a
gpuctld of its own (SQLite, or `--store-url`), and in the same run against a trivial `grpc.aio`
health server: this machine's ceiling, which every rate is also reported as a fraction of."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pwd
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpuctl.api._pb.v1 import jobs_pb2, jobs_pb2_grpc
from gpuctl.api.auth import bearer
from gpuctl.testbed import FAST_CONFIG, LocalCluster

CALLS = ("CreateJob", "GetJob", "ListJobs", "Health")
SPEC = jobs_pb2.JobSpec(
    kind=jobs_pb2.JOB_KIND_TRAINING, command=["python", "train.py"], gpus_per_node=8
)


def _request(call: str, job: str):
    if call == "CreateJob":
        return jobs_pb2.CreateJobRequest(spec=SPEC, request_id=str(uuid.uuid4()))
    if call == "GetJob":
        return jobs_pb2.GetJobRequest(name=job)
    if call == "ListJobs":
        return jobs_pb2.ListJobsRequest(page_size=100)
    return health_pb2.HealthCheckRequest()


async def _load(target: str, token: str, call: str, inflight: int, seconds: float, job: str):
    async with grpc.aio.insecure_channel(target) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        method = (
            getattr(jobs, call) if call != "Health" else health_pb2_grpc.HealthStub(channel).Check
        )
        metadata = bearer(token) if token else ()
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        stop = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    await method(_request(call, job), metadata=metadata, timeout=10)
                    codes["OK"] += 1
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return latencies, codes


def _process(args) -> tuple[list[float], dict[str, int]]:
    latencies, codes = asyncio.run(_load(*args))
    return latencies, dict(codes)


def run_load(target, tokens, call, *, procs, inflight, seconds, jobs=()) -> dict:
    """`procs` processes (each its own caller, with its token) with `inflight / procs` calls
    each in flight, for `seconds`."""
    per = max(1, inflight // procs)
    jobs = jobs or [""]
    work = [
        (target, tokens[i % len(tokens)], call, per, seconds, jobs[i % len(jobs)])
        for i in range(procs)
    ]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        results = pool.map(_process, work)
    latencies = sorted(x for lat, _ in results for x in lat)
    codes: Counter[str] = Counter()
    for _, c in results:
        codes.update(c)
    ok = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(ok - 1, int(p * ok))] * 1e3 if ok else float("nan")

    return {
        "call": call,
        "inflight": per * procs,
        "rate": ok / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "codes": dict(codes),
    }


async def _trivial(port_file: str) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


def _serve_trivial(port_file: str) -> None:
    asyncio.run(_trivial(port_file))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpuctl-bench-api", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per case (default 5)")
    p.add_argument("--procs", type=int, default=4, help="load processes (default 4)")
    p.add_argument("--inflight", type=int, action="append", help="calls in flight (32, 128)")
    p.add_argument("--call", action="append", choices=CALLS, help="default: all")
    p.add_argument("--store-url", default="", help="postgresql://...; default: SQLite")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    inflights = args.inflight or [32, 128]
    calls = args.call or ["CreateJob", "GetJob", "ListJobs"]
    root = Path(tempfile.mkdtemp(prefix="gpuctl-bench-"))
    me = pwd.getpwuid(os.geteuid()).pw_name
    config = FAST_CONFIG.replace("{user}", me).replace("interval_s = 1.0", "interval_s = 5.0")
    if args.store_url:
        config += f'\n[store]\nurl = "{args.store_url}"\n'
    (root / "cluster").mkdir()
    (root / "cluster" / "gpuctld.toml").write_text(config)
    cluster = LocalCluster(root / "cluster")
    trivial = multiprocessing.get_context("spawn").Process(
        target=_serve_trivial, args=(str(root / "trivial.port"),), daemon=True
    )
    rows = []
    try:
        cluster.start_daemon()
        daemon = psutil.Process(cluster.procs["gpuctld"].pid)
        tokens = [
            cluster.gpuctl("token", "create", "--user", f"bench-{i}").stdout.strip()
            for i in range(args.procs)
        ]
        with grpc.insecure_channel(cluster.target) as ch:  # a job of each caller's to get
            stub = jobs_pb2_grpc.JobServiceStub(ch)
            names = [
                stub.CreateJob(
                    jobs_pb2.CreateJobRequest(spec=SPEC),
                    metadata=bearer(t),
                ).name
                for t in tokens
            ]
        trivial.start()
        while not (root / "trivial.port").exists():
            time.sleep(0.05)
        trivial_target = f"127.0.0.1:{(root / 'trivial.port').read_text()}"
        for inflight in inflights:
            # The ceiling first, then each call: close together, since the machine drifts.
            ceiling = run_load(
                trivial_target, [""], "Health", procs=args.procs, inflight=inflight,
                seconds=args.seconds,
            )  # fmt: skip
            rows.append({**ceiling, "server": "trivial"})
            for call in calls:
                row = run_load(
                    cluster.target, tokens, call, procs=args.procs, inflight=inflight,
                    seconds=args.seconds, jobs=names,
                )  # fmt: skip
                row["of_ceiling"] = row["rate"] / ceiling["rate"] if ceiling["rate"] else 0.0
                row["server"] = "gpuctld"
                row["rss_mib"] = daemon.memory_info().rss / 2**20
                rows.append(row)
    finally:
        if trivial.is_alive():
            trivial.terminate()
        cluster.remove()
    print(f"{'server':8} {'call':10} {'inflight':>8} {'rate/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'ceiling':>8}  codes")  # fmt: skip
    for r in rows:
        share = f"{r['of_ceiling']:.1%}" if "of_ceiling" in r else "-"
        print(
            f"{r['server']:8} {r['call']:10} {r['inflight']:>8} {r['rate']:>8.0f} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {share:>8}  {r['codes']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
