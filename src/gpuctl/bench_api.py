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
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psutil
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gpuctl.api._pb.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from gpuctl.api.auth import bearer
from gpuctl.testbed import FAST_CONFIG, LocalCluster

CALLS = ("CreateJob", "GetJob", "ListJobs", "ListNodes", "Health")
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
    if call == "ListNodes":
        return nodes_pb2.ListNodesRequest()
    return health_pb2.HealthCheckRequest()


def _method(channel: grpc.aio.Channel, call: str):
    if call == "Health":
        return health_pb2_grpc.HealthStub(channel).Check
    if call == "ListNodes":
        return nodes_pb2_grpc.NodeServiceStub(channel).ListNodes
    return getattr(jobs_pb2_grpc.JobServiceStub(channel), call)


async def _load(
    target: str, token: str, call: str, inflight: int, seconds: float, job: str, channels: int
):
    # Each channel a connection of its own (not shared with the process's other channels): as
    # many clients, which the kernel spreads over gpuctld and its API workers.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    methods = [_method(c, call) for c in opened]
    try:
        metadata = bearer(token) if token else ()
        latencies: list[float] = []
        refusals: list[float] = []
        codes: Counter[str] = Counter()
        stop = time.monotonic() + seconds

        async def worker(method) -> None:
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    await method(_request(call, job), metadata=metadata, timeout=10)
                    codes["OK"] += 1
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                    if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        # How long a refusal took; then wait as the SDK does: what the server
                        # asked (RetryInfo), with jitter.
                        refusals.append(time.perf_counter() - start)
                        await asyncio.sleep(_retry_delay(e) * random.uniform(1.0, 1.5))

        await asyncio.gather(*(worker(methods[i % channels]) for i in range(inflight)))
        return latencies, codes, refusals
    finally:
        for c in opened:
            await c.close()


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return 0.1


def _process(args) -> tuple[list[float], dict[str, int], list[float]]:
    latencies, codes, refusals = asyncio.run(_load(*args))
    return latencies, dict(codes), refusals


def run_load(target, tokens, call, *, procs, inflight, seconds, jobs=(), channels=1) -> dict:
    """`procs` processes (each its own caller, with its token) with `inflight / procs` calls
    each in flight over `channels` connections, for `seconds`."""
    per = max(1, inflight // procs)
    jobs = jobs or [""]
    work = [
        (target, tokens[i % len(tokens)], call, per, seconds, jobs[i % len(jobs)], channels)
        for i in range(procs)
    ]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        results = pool.map(_process, work)
    latencies = sorted(x for lat, _, _ in results for x in lat)
    refusals = sorted(x for _, _, ref in results for x in ref)
    codes: Counter[str] = Counter()
    for _, c, _ in results:
        codes.update(c)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1e3 if values else float("nan")

    return {
        "call": call,
        "inflight": per * procs,
        "rate": len(latencies) / seconds,
        "p50_ms": pct(latencies, 0.50),
        "p99_ms": pct(latencies, 0.99),
        "refused_p50_ms": pct(refusals, 0.50),
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


# The people whose jobs a stored history holds. A queue of one person's jobs goes in age order;
# the first job of a second person orders it by fair share, which only a full cycle can say.
HISTORY_OWNERS = 8


def preload(store_url: str, *, pending: int, finished: int, config: Path | None = None) -> None:
    """Store `pending` pending jobs and `finished` finished ones (a day old, with their
    events) the fast way, before gpuctld starts: a history as a busy head node keeps it, of
    `HISTORY_OWNERS` people (none of them a load process's caller). With
    `config` (gpuctld's), a cycle of gpuctld's own controller then tells the pending jobs why
    they wait, as a store that gpuctld ran on holds them: a gpuctld starting on it finds their
    reasons written, where jobs stored without one would have it write them all at once."""
    from gpuctl.core.model import Event, Job, JobKind, JobSpec, JobState
    from gpuctl.runtime import daemon
    from gpuctl.runtime.config import load_config
    from gpuctl.store.sql import open_store

    store = open_store(store_url)
    now = datetime.now(UTC)
    specs = [
        JobSpec(
            kind=JobKind.TRAINING, command=("python", "train.py"), gpus_per_node=8,
            owner=f"history-{i}",
        )
        for i in range(HISTORY_OWNERS)
    ]  # fmt: skip
    total = pending + finished
    try:
        for start in range(0, total, 10_000):
            jobs, events = [], []
            for n in range(start + 1, min(total, start + 10_000) + 1):
                done = n <= finished  # the history first, as ids go
                at = now - timedelta(days=1) if done else now
                state = JobState.SUCCEEDED if done else JobState.PENDING
                jobs.append(
                    Job(
                        id=n, spec=specs[n % HISTORY_OWNERS], state=state, created_at=at,
                        updated_at=at, finished_at=at if done else None,
                        exit_code=0 if done else None,
                    )
                )  # fmt: skip
                events += [
                    Event(object_kind="job", object_id=str(n), time=at, type=t, message="")
                    for t in (("Submitted", "Succeeded") if done else ("Submitted",))
                ]
            store.load_jobs(jobs, events)
        if pending and config is not None:
            with tempfile.TemporaryDirectory() as logs:
                controller = daemon.build_controller(
                    load_config(config), store, Path(logs), wake=lambda: None
                )
                controller.lead()
                controller.run_cycle()
        store.analyze()
    finally:
        store.close()


def decision_latency(client_target: str, token: str, samples: int = 20) -> list[float]:
    """Seconds from a submit's acknowledgement to the first scheduling decision about it (here:
    its reason, as no node has room), what a submitter waits to learn where it stands: for
    `samples` submits, a random 0-1 s apart (so they land anywhere in the daemon's round of
    cycles, not all just after one), sorted."""
    took = []
    pause = random.Random(1)
    with grpc.insecure_channel(client_target) as ch:
        stub = jobs_pb2_grpc.JobServiceStub(ch)
        for i in range(samples):
            if i:
                time.sleep(pause.uniform(0, 1))
            name = stub.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=bearer(token)).name
            start = time.monotonic()
            while not stub.GetJob(jobs_pb2.GetJobRequest(name=name), metadata=bearer(token)).reason:
                if time.monotonic() - start > 60:
                    return [float("inf")]
                time.sleep(0.01)
            took.append(time.monotonic() - start)
    return sorted(took)


def run_case(args, stored: int, rows: list[dict], workers: int = 0) -> None:
    root = Path(tempfile.mkdtemp(prefix="gpuctl-bench-"))
    me = pwd.getpwuid(os.geteuid()).pw_name
    config = FAST_CONFIG.replace("{user}", me).replace("interval_s = 1.0", "interval_s = 5.0")
    schema = ""
    if args.store_url:
        schema, store_url = _fresh_schema(args.store_url)
    else:
        store_url = f"sqlite:///{root / 'bench.db'}"
    config += f'\n[store]\nurl = "{store_url}"\n'
    if workers:
        config += f"\n[server]\napi_workers = {workers}\n"
    (root / "cluster").mkdir()
    (root / "cluster" / "gpuctld.toml").write_text(config)
    pending = min(stored, args.pending)
    t0 = time.monotonic()
    preload(
        store_url,
        pending=pending,
        finished=stored - pending,
        config=root / "cluster" / "gpuctld.toml",
    )
    if stored:
        print(f"stored {stored:,} jobs ({pending:,} pending) in {time.monotonic() - t0:.0f} s")
    cluster = LocalCluster(root / "cluster")
    trivial = multiprocessing.get_context("spawn").Process(
        target=_serve_trivial, args=(str(root / "trivial.port"),), daemon=True
    )
    case = {
        "stored": stored,
        "pending": pending,
        "store": "postgresql" if schema else "sqlite",
        "api_workers": workers,
    }
    try:
        cluster.start_daemon(timeout=300)
        daemon = psutil.Process(cluster.procs["gpuctld"].pid)
        tokens = [
            cluster.gpuctl("token", "create", "--user", f"bench-{i}").stdout.strip()
            for i in range(args.procs)
        ]
        # The first decision also waits out the first cycle over what was stored.
        (case["first_decision_s"],) = decision_latency(cluster.target, tokens[0], samples=1)
        took = decision_latency(cluster.target, tokens[0])
        case["decision_s"] = took[len(took) // 2]
        case["decision_p90_s"] = took[min(len(took) - 1, int(0.9 * len(took)))]
        case["decision_max_s"] = took[-1]
        with grpc.insecure_channel(cluster.target) as ch:  # a job of each caller's to get
            stub = jobs_pb2_grpc.JobServiceStub(ch)
            names = [
                stub.CreateJob(jobs_pb2.CreateJobRequest(spec=SPEC), metadata=bearer(t)).name
                for t in tokens
            ]
        start = time.monotonic()
        listed = cluster.gpuctl("jobs", "-o", "json", timeout=600).stdout
        case["gpuctl_jobs_s"] = time.monotonic() - start
        case["gpuctl_jobs_listed"] = len(json.loads(listed))
        trivial.start()
        while not (root / "trivial.port").exists():
            time.sleep(0.05)
        trivial_target = f"127.0.0.1:{(root / 'trivial.port').read_text()}"
        serial = run_load(
            cluster.target, tokens[:1], "CreateJob", procs=1, inflight=1, seconds=args.seconds
        )
        rows.append({**case, **serial, "server": "gpuctld"})
        for inflight in args.inflight or [32, 128]:
            # The ceiling first, then each call: close together, since the machine drifts.
            ceiling = run_load(
                trivial_target, [""], "Health", procs=args.procs, inflight=inflight,
                seconds=args.seconds, channels=args.channels,
            )  # fmt: skip
            rows.append({**case, **ceiling, "server": "trivial"})
            for call in args.call or ["CreateJob", "GetJob", "ListJobs", "ListNodes"]:
                row = run_load(
                    cluster.target, tokens, call, procs=args.procs, inflight=inflight,
                    seconds=args.seconds, jobs=names, channels=args.channels,
                )  # fmt: skip
                row["of_ceiling"] = row["rate"] / ceiling["rate"] if ceiling["rate"] else 0.0
                row["server"] = "gpuctld"
                row["rss_mib"] = _rss(daemon) / 2**20
                rows.append({**case, **row})
    finally:
        if trivial.is_alive():
            trivial.terminate()
        cluster.remove()
        if schema:
            _drop_schema(args.store_url, schema)
    print(
        f"stored {stored:,}, {workers} API workers: first decision {case.get('first_decision_s', 0):.2f} s, then "
        f"p50 {case.get('decision_s', 0) * 1e3:.0f} ms, p90 "
        f"{case.get('decision_p90_s', 0) * 1e3:.0f} ms, longest "
        f"{case.get('decision_max_s', 0) * 1e3:.0f} ms; `gpuctl jobs` "
        f"{case.get('gpuctl_jobs_s', 0):.2f} s for {case.get('gpuctl_jobs_listed', 0):,} jobs"
    )


def _rss(daemon: psutil.Process) -> int:
    """gpuctld's resident memory, its API workers' with it (not its cycle worker's)."""
    workers = [p for p in daemon.children() if "gpuctl.runtime.apiworkers" in p.cmdline()]
    return sum(p.memory_info().rss for p in (daemon, *workers))


def _fresh_schema(url: str) -> tuple[str, str]:
    import psycopg
    from psycopg import sql

    from gpuctl.bench_failover import _libpq, _schema_url

    schema, scoped = _schema_url(url)
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return schema, scoped


def _drop_schema(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    from gpuctl.bench_failover import _libpq

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpuctl-bench-api", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per case (default 5)")
    p.add_argument("--procs", type=int, default=4, help="load processes (default 4)")
    p.add_argument(
        "--channels", type=int, default=1,
        help="connections of each load process (default 1); many spread over API workers",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=1, help="run every case this many times, interleaved"
    )
    p.add_argument("--inflight", type=int, action="append", help="calls in flight (32, 128)")
    p.add_argument("--call", action="append", choices=CALLS, help="default: all")
    p.add_argument(
        "--stored", type=int, action="append",
        help="jobs stored before the load, one case each (default: 0)",
    )  # fmt: skip
    p.add_argument(
        "--pending", type=int, default=30_000,
        help="of the stored jobs, how many pending; the rest finished (default 30,000)",
    )  # fmt: skip
    p.add_argument("--store-url", default="", help="postgresql://... (a schema of its own)")
    p.add_argument(
        "--api-workers", type=int, action="append",
        help="gpuctld's [server] api_workers, one case each (default: 0)",
    )  # fmt: skip
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.channels < 1 or args.rounds < 1 or any(w < 0 for w in args.api_workers or ()):
        p.error("--channels and --rounds must be at least 1, --api-workers at least 0")
    rows: list[dict] = []
    for _ in range(args.rounds):
        for stored in args.stored or [0]:
            for workers in args.api_workers or [0]:
                run_case(args, stored, rows, workers)
    print(
        f"{'stored':>9} {'workers':>7} {'server':8} {'call':10} {'inflight':>8} {'rate/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'ceiling':>8} {'RSS MiB':>8}  codes"
    )
    for r in rows:
        share = f"{r['of_ceiling']:.1%}" if "of_ceiling" in r else "-"
        rss = f"{r['rss_mib']:.0f}" if "rss_mib" in r else "-"
        print(
            f"{r['stored']:>9,} {r['api_workers']:>7} {r['server']:8} {r['call']:10} {r['inflight']:>8} "
            f"{r['rate']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {share:>8} {rss:>8}  "
            f"{r['codes']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
