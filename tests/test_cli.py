"""The `gpuctl` CLI through click's CliRunner, against the fake API on a real gRPC server."""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import timedelta

import pytest
import yaml
from click.testing import CliRunner

from gpuctl.cli.main import cli
from gpuctl.cli.render import age, index_ranges, table
from gpuctl.client import jobs_pb2, leases_pb2, nodes_pb2
from tests.fakes_api import FIXED_NOW, h100_node, running_job, serve_fake


@pytest.fixture
def api():
    with serve_fake() as fake:
        yield fake


@pytest.fixture
def gpuctl(api):
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(
            cli,
            ["--server", api.target, *args],
            input=input,
            env={"GPUCTL_TOKEN": "token-of-alice"},
        )

    return run


TRAIN = ("submit", "--kind", "training", "--nodes", "2", "--gpus-per-node", "8")


# -- submit -------------------------------------------------------------------------------


def test_submit_prints_the_job_id_like_sbatch(api, gpuctl):
    result = gpuctl(
        *TRAIN,
        "--time-limit",
        "2h",
        "--env",
        "NCCL_DEBUG=INFO",
        "--",
        "torchrun",
        "train.py",
        "--lr",
        "3e-4",
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == "Submitted job 1\n"
    spec = api.jobs.jobs[1].spec
    assert list(spec.command) == ["torchrun", "train.py", "--lr", "3e-4"]
    assert (spec.num_nodes, spec.gpus_per_node, spec.time_limit.seconds) == (2, 8, 7200)
    assert dict(spec.env) == {"NCCL_DEBUG": "INFO"}
    assert spec.working_dir == os.getcwd()  # the default workdir is where you submit from
    assert api.jobs.jobs[1].owner == "alice"


def test_submit_command_options_after_the_program_belong_to_it(api, gpuctl):
    result = gpuctl(
        "submit",
        "--kind",
        "inference",
        "--replicas",
        "2",
        "--gpu-share",
        "0.5",
        "vllm",
        "serve",
        "--port",
        "8000",
    )

    assert result.exit_code == 0, result.output
    spec = api.jobs.jobs[1].spec
    assert list(spec.command) == ["vllm", "serve", "--port", "8000"]
    assert (spec.replicas, spec.gpu_milli) == (2, 500)


def test_submit_parsable_prints_only_the_id(gpuctl):
    result = gpuctl(*TRAIN, "--parsable", "--", "python", "x.py")
    assert (result.exit_code, result.stdout) == (0, "1\n")


def test_submit_dry_run_validates_and_stores_nothing(api, gpuctl):
    result = gpuctl(*TRAIN, "--dry-run", "--", "python", "x.py")

    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout and "nothing was submitted" in result.stdout
    assert "training: 2 nodes x 8 GPUs = 16 GPUs on one fabric" in result.stdout
    assert api.jobs.calls("CreateJob")[0].validate_only
    assert api.jobs.jobs == {}


def test_submit_from_a_file_with_flags_overriding_it(api, gpuctl, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "kind: training\nname: from-file\nnodes: 4\ngpus_per_node: 8\nenv: {A: '1'}\n"
        "working_dir: /data/run\ncommand: python train.py\n"
    )

    result = gpuctl("submit", "-f", str(path), "--nodes", "2", "--env", "B=2")

    assert result.exit_code == 0, result.output
    spec = api.jobs.jobs[1].spec
    assert (spec.name, spec.num_nodes, spec.working_dir) == ("from-file", 2, "/data/run")
    assert dict(spec.env) == {"A": "1", "B": "2"}
    assert list(spec.command) == ["python", "train.py"]


def test_submit_spreads_replicas_over_fabrics_on_request(api, gpuctl):
    result = gpuctl(
        "submit", "--kind", "inference", "--replicas", "4", "--gpus-per-node", "1",
        "--spread", "fabric", "--", "serve",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert api.jobs.jobs[1].spec.spread == jobs_pb2.SPREAD_FABRIC


def test_submit_from_stdin(api, gpuctl):
    result = gpuctl(
        "submit", "-f", "-", input="kind: training\ngpus_per_node: 1\ncommand: [python, x.py]\n"
    )
    assert result.exit_code == 0, result.output
    assert api.jobs.jobs[1].spec.gpus_per_node == 1


def test_submit_invalid_spec_is_one_error_line(api, gpuctl):
    result = gpuctl("submit", "--kind", "training", "--gpus-per-node", "0", "--", "python")

    assert result.exit_code == 1
    assert result.stdout == ""
    # named as it was typed, and refused before anything is sent
    assert result.stderr == "error: --gpus-per-node: must be between 1 and 16, got 0\n"
    assert api.jobs.calls("CreateJob") == []


def test_submit_bad_file_names_the_file_and_field(api, gpuctl, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("kind: training\ngpus: 8\ncommand: x\n")

    result = gpuctl("submit", "-f", str(path))

    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {path}: gpus: unknown field; did you mean 'gpus_per_node'?"
    )
    assert result.stderr.count("\n") == 1
    assert api.jobs.requests == []


def test_submit_without_kind_says_it_is_required(gpuctl):
    result = gpuctl("submit", "--", "python")
    assert (result.exit_code, result.stderr) == (
        1,
        "error: kind: is required: 'training' or 'inference'\n",
    )


def test_submit_env_name_alone_passes_the_local_value(api, gpuctl, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert gpuctl(*TRAIN, "--env", "HF_TOKEN", "--", "python").exit_code == 0
    assert dict(api.jobs.jobs[1].spec.env) == {"HF_TOKEN": "secret"}


def test_submit_wait_shows_progress_and_exits_with_the_jobs_exit_code(api, gpuctl):
    api.jobs.after_watch_start.append(
        lambda: api.jobs.set_state(1, jobs_pb2.JOB_STATE_SUCCEEDED, exit_code=0, reason="")
    )
    ok = gpuctl(*TRAIN, "--wait", "--", "python")
    assert (ok.exit_code, ok.stdout) == (0, "Submitted job 1\njob 1 succeeded (exit code 0)\n")
    assert ok.stderr == "job 1 pending: waiting for the next scheduling cycle\n"

    api.jobs.after_watch_start.append(
        lambda: api.jobs.set_state(
            2, jobs_pb2.JOB_STATE_FAILED, exit_code=3, reason="rank 1 exited with 3"
        )
    )
    failed = gpuctl(*TRAIN, "--wait", "--parsable", "--", "python")
    assert (failed.exit_code, failed.stdout) == (3, "2\n")
    assert failed.stderr.splitlines()[-1] == "job 2 failed (exit code 3): rank 1 exited with 3"


@pytest.mark.parametrize(
    ("state", "exit_code", "expected"),
    [
        (jobs_pb2.JOB_STATE_FAILED, -9, 137),
        (jobs_pb2.JOB_STATE_FAILED, None, 1),
        (jobs_pb2.JOB_STATE_TIMEOUT, None, 124),
        (jobs_pb2.JOB_STATE_CANCELLED, None, 130),
        (jobs_pb2.JOB_STATE_NODE_LOST, None, 69),
    ],
)
def test_submit_wait_exit_codes_per_end_state(api, gpuctl, state, exit_code, expected):
    fields = {} if exit_code is None else {"exit_code": exit_code}
    api.jobs.after_watch_start.append(lambda: api.jobs.set_state(1, state, **fields))
    assert gpuctl(*TRAIN, "--wait", "--", "python").exit_code == expected


def test_unreachable_server_is_one_clear_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    result = CliRunner().invoke(cli, ["--server", f"127.0.0.1:{port}", "jobs"])

    assert result.exit_code == 1
    assert result.stderr == f"error: cannot reach gpuctld at 127.0.0.1:{port} (is it running?)\n"


# -- jobs ---------------------------------------------------------------------------------


def test_jobs_table_shows_active_jobs_by_default(api, gpuctl, monkeypatch):
    monkeypatch.setattr("gpuctl.cli.main._now", lambda: FIXED_NOW)
    gpuctl(*TRAIN, "--name", "waiting", "--", "python")
    running_job(api, 2)
    gpuctl(*TRAIN, "--", "python")
    gpuctl("cancel", "3")

    result = gpuctl("jobs")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "JOBID",
        "NAME",
        "KIND",
        "QUEUE",
        "USER",
        "ST",
        "AGE",
        "TIME",
        "NODES",
        "GPUS",
        "REPLICAS",
        "NODELIST(REASON)",
    ]
    assert [r.split()[0] for r in rows] == ["1", "2"]
    assert rows[0].split()[:11] == [
        "1",
        "waiting",
        "training",
        "default",
        "alice",
        "PD",
        "0s",  # submitted at the fake's fixed now
        "-",  # not started
        "2",
        "16",
        "-",
    ]
    assert rows[0].endswith("(waiting for the next scheduling cycle)")
    assert rows[1].split()[5] == "R" and rows[1].endswith("gpu-01,gpu-02")
    assert api.jobs.calls("ListJobs")[-1].states == [
        jobs_pb2.JOB_STATE_PENDING,
        jobs_pb2.JOB_STATE_RUNNING,
        jobs_pb2.JOB_STATE_CANCELLING,
    ]

    everything = gpuctl("jobs", "--all")
    assert [r.split()[0] for r in everything.stdout.splitlines()[1:]] == ["1", "2", "3"]
    assert everything.stdout.splitlines()[3].split()[5] == "CA"


def test_jobs_filters_by_state_and_queue(api, gpuctl):
    gpuctl(*TRAIN, "--queue", "prod", "--", "python")
    running_job(api, 2)

    assert [r.split()[0] for r in gpuctl("jobs", "--state", "running").stdout.splitlines()[1:]] == [
        "2"
    ]
    assert [r.split()[0] for r in gpuctl("jobs", "--queue", "prod").stdout.splitlines()[1:]] == [
        "1"
    ]
    bad = gpuctl("jobs", "--state", "sleeping")
    assert bad.exit_code == 2 and "'sleeping' is not one of" in bad.stderr


def test_jobs_wide_adds_columns(api, gpuctl):
    running_job(api, 1)
    header = gpuctl("jobs", "-o", "wide").stdout.splitlines()[0].split()
    assert header[11:] == [
        "GPU_MODEL",
        "PRIO",
        "ATTEMPT",
        "RESTARTS",
        "SUBMITTED",
        "EXIT",
        "NODELIST(REASON)",
    ]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_jobs_machine_output_parses(api, gpuctl, fmt):
    running_job(api, 1)
    gpuctl(*TRAIN, "--", "python")

    result = gpuctl("jobs", "-o", fmt)

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert [j["name"] for j in data] == ["jobs/1", "jobs/2"]
    # the job-file schema: enums as the words people type, zero values kept
    assert data[0]["status"]["state"] == "running"
    assert data[0]["status"]["placement"]["ranks"][0]["rank"] == 0
    assert data[0]["status"]["placement"]["ranks"][1]["node"] == "gpu-02"
    assert data[0]["status"]["attempt"] == 0 and data[0]["status"]["exit_code"] is None
    assert data[1]["spec"]["gpus_per_node"] == 8 and data[1]["spec"]["kind"] == "training"
    assert data[1]["spec"]["priority"] == 0 and data[1]["spec"]["preemptible"] is False
    assert data[1]["spec"]["replicas"] is None  # not one of a training job's
    assert data[1]["status"]["submitted"].endswith("Z")


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_get_one_job_is_one_object_and_submit_takes_it_back(api, gpuctl, fmt, tmp_path):
    gpuctl(
        *TRAIN,
        "--name",
        "again",
        "--env",
        "A=1",
        "--secret-env",
        "TOKEN=s3cret",
        "--gpu-model",
        "H100 SXM,A100 80GB",
        "--time-limit",
        "2h",
        "--",
        "python",
        "-c",
        "print(1)",
    )
    shown = gpuctl("get", "job", "1", "-o", fmt)
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout) if fmt == "json" else yaml.safe_load(shown.stdout)
    assert doc["id"] == 1 and doc["status"]["state"] == "pending"
    again = gpuctl("submit", "-f", "-", input=shown.stdout)
    assert again.exit_code == 0, again.output
    first, second = (api.jobs.jobs[i].spec for i in (1, 2))
    assert second == first  # every field, the secret env still secret
    assert second.secret_env == ["TOKEN"]
    # describe -o of one job is the same object
    assert yaml.safe_load(gpuctl("describe", "1", "-o", "yaml").stdout)["spec"] == doc["spec"]
    listed = gpuctl("get", "jobs", "-o", "json")
    assert [j["id"] for j in json.loads(listed.stdout)] == [1, 2]


# -- describe -----------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["1", "jobs/1"])
def test_describe_job(api, gpuctl, ref):
    running_job(api, 1)

    result = gpuctl("describe", ref)

    assert result.exit_code == 0, result.output
    out = result.stdout
    for line in [
        "Name:       jobs/1",
        "State:      running",
        "Asks for:   training: 2 nodes x 8 GPUs = 16 GPUs on one fabric; queue research, priority 0",
        "  command: torchrun train.py",
        "  Master:   10.0.0.6:29500",
        "  rank 1 (gpu-02):",
        "    NODE_RANK=1",
    ]:
        assert line in out.splitlines(), line
    ranks = out.split("Placement:")[1].splitlines()
    assert [r.split()[:5] for r in ranks if r.strip().startswith(("0 ", "1 "))] == [
        ["0", "gpu-01", "0-7", "1", "running"],
        ["1", "gpu-02", "0-7", "1", "running"],
    ]


def test_a_service_short_of_a_replica_shows_it_in_jobs_and_describe(api, gpuctl):
    job = jobs_pb2.Job(
        id=4,
        spec=jobs_pb2.JobSpec(
            kind=jobs_pb2.JOB_KIND_INFERENCE,
            command=["vllm", "serve"],
            queue="default",
            replicas=3,
            gpus_per_node=1,
        ),
        state=jobs_pb2.JOB_STATE_RUNNING,
        owner="alice",
        reason="2 of 3 replicas running; replacing replica 1 (exited with 1) at 14:02:10Z",
    )
    job.start_time.FromDatetime(FIXED_NOW)
    ranks = job.placement.ranks
    ranks.add(rank=0, node="gpu-01", gpu_indices=[0], gpu_milli=1000, state=2, ready=True)
    ranks.add(rank=1, node="gpu-01", gpu_indices=[1], gpu_milli=1000, state=3, exit_code=1)
    ranks.add(
        rank=3,
        node="gpu-02",
        gpu_indices=[0],
        gpu_milli=1000,
        state=2,
        restarts=1,
        last_failure="exited with 1",
        ready=True,
    )
    api.jobs.put(job)

    row = gpuctl("jobs", "-o", "wide").stdout.splitlines()[1].split()

    assert row[8:11] == ["2", "2", "2/3"]  # nodes and GPUs of the live replicas, 2 of 3 run
    assert row[14] == "1"  # restarts
    out = gpuctl("describe", "4").stdout
    assert "Replicas:   2 ready, 2 running of 3 desired; restart policy on-failure" in (
        out.splitlines()
    )
    placement = out.split("Placement:")[1].splitlines()
    assert [r.split()[:8] for r in placement if r.strip().startswith(("1 ", "3 "))] == [
        ["1", "gpu-01", "1", "1", "exited", "1", "0", "-"],
        ["3", "gpu-02", "0", "1", "running", "-", "1", "exited"],
    ]


def test_describe_pending_job_shows_reason_and_events(api, gpuctl):
    gpuctl(*TRAIN, "--", "python")

    out = gpuctl("describe", "1").stdout

    assert "Reason:     waiting for the next scheduling cycle" in out
    assert "Placement:  <none>" in out
    events = out.split("Events:")[1].splitlines()
    assert events[1].split() == ["AGE", "TYPE", "MESSAGE"]
    assert events[2].split()[1:] == ["Submitted", "by", "alice"]


def test_drain_wait_returns_once_the_nodes_jobs_are_gone(api, gpuctl, monkeypatch):
    api.nodes.add(h100_node("gpu-01", used={0: (1000, [7]), 1: (1000, [7, 8])}))
    sleeps = []

    def job_ends(seconds: float) -> None:  # between polls, the node's jobs end one by one
        sleeps.append(seconds)
        usage = api.nodes.nodes["gpu-01"].usage
        kept = [u for u in usage if 8 not in u.job_ids] if len(sleeps) == 1 else []
        del usage[:]
        usage.extend(kept)

    monkeypatch.setattr("gpuctl.cli.main.time.sleep", job_ends)

    result = gpuctl("drain", "gpu-01", "--wait")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "node gpu-01: no job runs there any more"
    assert result.stderr.splitlines() == ["waiting for job(s) 7, 8", "waiting for job(s) 7"]
    assert sleeps == [2.0, 2.0]


def test_describe_node(api, gpuctl):
    api.nodes.add(h100_node("gpu-01", used={0: (1000, [7]), 1: (250, [8])}))
    api.nodes.add(h100_node("gpu-02", measured=False, state=nodes_pb2.NODE_STATE_DRAINING))
    api.nodes.nodes["gpu-02"].state_reason = "bad DIMM"

    out = gpuctl("describe", "gpu-01").stdout
    lines = out.splitlines()

    assert "Fabric:         fabric-a/spine-1/leaf-1" in lines
    assert "Price:          $98.32/hr" in lines
    assert "  Network:       infiniband, 8 x 400 Gb/s (3200 Gb/s)" in lines
    assert "  BF16 TFLOPS:   7912 (dense, whole node)" in lines
    gpu0 = next(line for line in lines if line.split()[:2] == ["0", "H100"])
    assert gpu0.split()[:7] == ["0", "H100", "SXM", "79.6GiB", "3352", "2980.5", "900"]
    assert "GPU usage:  6.75 of 8 GPUs free" in lines
    assert "Registered  agent 0.1.0 registered" in out

    drained = gpuctl("describe", "gpu-02").stdout
    assert "State:          draining (bad DIMM)" in drained.splitlines()
    assert "not measured" in drained


def test_describe_node_shows_links_pcie_locality_ports_and_health(api, gpuctl):
    api.nodes.add(
        h100_node(
            "gpu-03",
            measured=False,
            links_down={3: 1},
            state=nodes_pb2.NODE_STATE_DEGRADED,
            health_issues=("GPU 3: NVLink 17/18 links active (was 18)",),
        )
    )

    out = gpuctl("describe", "gpu-03").stdout
    lines = out.splitlines()

    assert "State:          degraded" in lines
    issues = lines.index("Health issues:")
    assert lines[issues + 1] == "  GPU 3: NVLink 17/18 links active (was 18)"
    header = next(line for line in lines if line.split()[:1] == ["INDEX"]).split()
    assert header[5:13] == [
        "NVLINK_GB/s", "NVLINKS", "NVL_GEN", "PCIE(CUR/MAX)", "NUMA", "CPUS", "MIG", "PCI_BUS_ID",
    ]  # fmt: skip
    gpus = {line.split()[0]: line.split() for line in lines if line.split()[1:3] == ["H100", "SXM"]}
    # index, model (2 words), memory, HBM, "not measured" (2 words), NVLink GB/s = 17 x 50, ...
    assert gpus["3"][:15] == [
        "3", "H100", "SXM", "79.6GiB", "3352", "not", "measured", "850", "17/18", "4",
        "gen5x16/gen5x16", "0", "0-55,112-167", "no", "0000:5d:00.0",
    ]  # fmt: skip
    assert gpus["0"][10] == "gen1x16/gen5x16"  # an idle GPU's link shows its power-saving gen
    assert gpus["7"][11:13] == ["1", "56-111,168-223"]
    ports = out.split("IB/RoCE ports:")[1].splitlines()
    assert ports[1].split() == [
        "DEVICE", "PORT", "STATE", "PHYS_STATE", "RATE_Gb/s", "LINK_LAYER", "GUID",
    ]  # fmt: skip
    assert ports[2].split() == [
        "mlx5_0", "1", "ACTIVE", "LinkUp", "400", "InfiniBand", "0c42:a103:00f1:0000",
    ]  # fmt: skip
    assert len([p for p in ports if p.strip().startswith("mlx5_")]) == 8

    api.nodes.add(h100_node("gpu-01"))
    assert "Health issues:" not in gpuctl("describe", "gpu-01").stdout  # none: no section


def test_describe_missing_things_is_one_error_line(gpuctl):
    job = gpuctl("describe", "42")
    node = gpuctl("describe", "gpu-99")
    assert (job.exit_code, job.stderr) == (1, "error: job jobs/42 not found\n")
    assert (node.exit_code, node.stderr) == (1, "error: node gpu-99 not found\n")


# -- logs, cancel -------------------------------------------------------------------------


def test_logs_writes_the_bytes(api, gpuctl):
    running_job(api, 1)
    api.jobs.logs[(1, 1)] = b"rank 1: step 10\n\xff binary ok\n"

    result = gpuctl("logs", "1", "--rank", "1")

    assert result.exit_code == 0
    assert result.stdout_bytes == b"rank 1: step 10\n\xff binary ok\n"
    assert api.jobs.calls("StreamJobLogs")[0].rank == 1


def test_logs_tail_and_all_ranks_prefix_each_line_with_its_rank(api, gpuctl):
    running_job(api, 1)
    api.jobs.log_chunk_size = 7  # lines cut across chunks
    api.jobs.logs[(1, 0)] = b"a1\na2\na3\na4\n"
    api.jobs.logs[(1, 1)] = b"b1\nb2\nno newline"

    assert gpuctl("logs", "1", "--tail", "2").stdout_bytes == b"a3\na4\n"
    assert gpuctl("logs", "1", "--tail", "0").stdout_bytes == b""
    both = gpuctl("logs", "1", "--all-ranks", "--tail", "2")
    assert both.exit_code == 0, both.output
    assert both.stdout_bytes == (b"[rank 0] a3\n[rank 0] a4\n[rank 1] b2\n[rank 1] no newline")
    everything = gpuctl("logs", "1", "--all-ranks").stdout_bytes.splitlines()
    assert everything[:4] == [b"[rank 0] a1", b"[rank 0] a2", b"[rank 0] a3", b"[rank 0] a4"]
    assert len(everything) == 7
    # Following every rank: the streams end with the job, each line whole and prefixed.
    followed = gpuctl("logs", "1", "--all-ranks", "-f").stdout_bytes.splitlines()
    assert sorted(followed) == sorted(everything)
    assert gpuctl("logs", "1", "--tail", "-1").exit_code == 2


def test_following_all_ranks_starts_each_line_on_its_own_after_a_last_line_unended(api, gpuctl):
    # Rank 1's log ends without a newline, and rank 0's stream begins only once rank 1's has
    # ended, so rank 0's lines mostly come after that unended one: each still starts a line
    # of its own, whatever the order.
    running_job(api, 1)
    api.jobs.logs[(1, 0)] = b"a1\na2\n"
    api.jobs.logs[(1, 1)] = b"b1\nno newline"
    api.jobs.log_ended[1] = threading.Event()
    api.jobs.log_waits[0] = api.jobs.log_ended[1]
    followed = gpuctl("logs", "1", "--all-ranks", "-f").stdout_bytes.splitlines()
    assert sorted(followed) == [
        b"[rank 0] a1", b"[rank 0] a2", b"[rank 1] b1", b"[rank 1] no newline"
    ]  # fmt: skip


def test_logs_timestamps_begin_each_line_with_when_its_first_byte_arrived(api, gpuctl):
    running_job(api, 1)
    api.jobs.log_chunk_size = 7  # the fake dates each chunk `offset` seconds after 12:00
    api.jobs.logs[(1, 0)] = b"a1\na2\na3\na4\n"
    out = gpuctl("logs", "1", "--timestamps").stdout_bytes.splitlines()
    assert out == [
        b"2025-03-01T12:00:00.000Z a1",
        b"2025-03-01T12:00:00.000Z a2",
        b"2025-03-01T12:00:00.000Z a3",  # begun in the first chunk, ended in the second
        b"2025-03-01T12:00:07.000Z a4",
    ]
    assert api.jobs.calls("StreamJobLogs")[-1].timestamps
    tail = gpuctl("logs", "1", "--timestamps", "--tail", "1", "--all-ranks").stdout_bytes
    assert tail == b"[rank 0] 2025-03-01T12:00:07.000Z a4\n"


def test_cancel_several_keeps_going_after_a_failure(api, gpuctl):
    gpuctl(*TRAIN, "--", "python")
    running_job(api, 2)

    result = gpuctl("cancel", "1", "99", "jobs/2", "nope")

    assert result.exit_code == 1
    assert result.stdout == "job 1 cancelled\njob 2 cancelling\n"
    assert result.stderr.splitlines() == [
        "error: job jobs/99 not found",
        "error: job: 'nope' is not a job name like 'jobs/42' or '42'",
    ]


def test_cancel_all_ok_exits_zero(api, gpuctl):
    gpuctl(*TRAIN, "--", "python")
    assert gpuctl("cancel", "1").exit_code == 0


# -- nodes, drain, leases -----------------------------------------------------------------


def test_nodes_table(api, gpuctl):
    api.nodes.add(h100_node("gpu-01", used={0: (1000, [7]), 1: (500, [8])}))
    api.nodes.add(h100_node("gpu-02", measured=False, fabric="fabric-b/spine-1/leaf-2"))

    result = gpuctl("nodes")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "NAME", "STATE", "GPUS", "MODEL", "HBM_GB/s", "NVLINK_GB/s", "NETWORK", "FABRIC", "LEASE", "$/HR", "FREE(GPUs)",
    ]  # fmt: skip
    assert rows[0].split() == [
        "gpu-01", "ready", "8", "H100", "SXM", "2980.5", "900", "ib", "8x400G",
        "fabric-a/spine-1/leaf-1", "leases/gpu-01", "98.32", "6.5",
    ]  # fmt: skip
    assert rows[1].split()[5] == "3352"  # not measured: the datasheet number

    data = json.loads(gpuctl("nodes", "-o", "json").stdout)
    assert data[0]["profile"]["gpus"][0]["measured_hbm_gbps"] == 2980.5
    assert data[0]["profile"]["gpus"][3]["nvlink_links_active"] == 18
    assert data[0]["profile"]["ib_ports"][0]["rate_gbps"] == 400
    assert "SKU" in gpuctl("nodes", "-o", "wide").stdout.splitlines()[0].split()


def test_nodes_table_shows_a_degraded_node_with_no_free_gpus(api, gpuctl):
    api.nodes.add(
        h100_node(
            "gpu-01",
            links_down={3: 2},
            state=nodes_pb2.NODE_STATE_DEGRADED,
            health_issues=("GPU 3: NVLink 16/18 links active (was 18)",),
        )
    )

    header, row = gpuctl("nodes").stdout.splitlines()

    cells = row.split()
    assert cells[1] == "degraded"
    assert cells[6] == "800"  # the node's NVLink is its weakest GPU's: 16 x 50 GB/s
    assert cells[-1] == "-"  # nothing free for new work while degraded
    assert "ISSUES" not in header.split()  # describe has them


def test_drain(api, gpuctl):
    api.nodes.add(h100_node("gpu-01"))

    result = gpuctl("drain", "gpu-01", "--reason", "bad DIMM")

    assert (result.exit_code, result.stdout) == (0, "node gpu-01 draining\n")
    assert api.nodes.nodes["gpu-01"].state_reason == "bad DIMM"


def test_several_servers_the_first_down(api):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    api.nodes.add(h100_node("gpu-01"))

    result = CliRunner().invoke(
        cli,
        ["--server", f"{down},{api.target}", "drain", "gpu-01"],
        env={"GPUCTL_TOKEN": "token-of-alice"},
    )

    assert (result.exit_code, result.stdout) == (0, "node gpu-01 draining\n")


def test_leases_table(api, gpuctl):
    api.leases.leases.extend(
        [
            leases_pb2.Lease(
                name="leases/a",
                node="gpu-01",
                provider="static",
                sku="p5.48xlarge",
                price_per_hour=98.32,
                state=leases_pb2.LEASE_STATE_ACTIVE,
                for_job_id=2,
                cost_usd=12.5,
                kept_for="warm pool (1 of 1 kept)",
            ),
            leases_pb2.Lease(name="leases/b", node="gpu-02", state=leases_pb2.LEASE_STATE_RELEASED),
        ]
    )

    rows = gpuctl("leases").stdout.splitlines()
    assert rows[0].split() == [
        "NAME",
        "NODE",
        "PROVIDER",
        "SKU",
        "STATE",
        "$/HR",
        "AGE",
        "FOR_JOB",
        "COST_$",
        "KEPT",
    ]
    assert rows[1].split() == [
        "leases/a",
        "gpu-01",
        "static",
        "p5.48xlarge",
        "active",
        "98.32",
        "-",
        "2",
        "12.50",
        *["warm", "pool", "(1", "of", "1", "kept)"],
    ]
    assert len(rows) == 2
    assert len(gpuctl("leases", "--all").stdout.splitlines()) == 3


# -- rendering pieces ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (65, "1m"), (3600, "1h"), (7500, "2h5m"), (90061, "1d1h")],
)
def test_ages_read_as_people_read_them(seconds, text):
    assert age(FIXED_NOW - timedelta(seconds=seconds), FIXED_NOW) == text


def test_index_ranges_and_table():
    assert index_ranges([6, 0, 1, 2, 3]) == "0-3,6"
    assert table(["A", "LONGER"], [["xx", ""], ["y", "z"]]) == "A   LONGER\nxx  -\ny   z"
    # cut to a width, the last column first; coloured cells keep the columns aligned
    assert table(["A", "B"], [["xx", "a long reason"]], width=8) == "A   B\nxx  a l…"
    red = table(
        ["A", "ST", "C"],
        [["1", "F", "x"], ["22", "R", "y"]],
        paint=lambda row: lambda col, text: f"<{text}>" if col == 1 else text,
    )
    assert red == "A   ST  C\n1   <F >  x\n22  <R >  y"


def test_unreadable_job_file_is_one_error_line(gpuctl, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("kind: training\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads everything
        pytest.skip("running as root")

    result = gpuctl("submit", "-f", str(path))

    assert (result.exit_code, result.stderr) == (
        1,
        f"error: cannot read {path}: Permission denied\n",
    )


def test_help_lists_the_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("submit", "jobs", "describe", "logs", "cancel", "nodes", "drain", "leases"):
        assert f"  {command} " in result.stdout


def test_submit_secret_env_marks_the_keys_and_can_take_the_value_from_here(
    api, gpuctl, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "hf_from_my_shell")
    result = gpuctl(*TRAIN, "--env", "A=1", "--secret-env", "HF_TOKEN", "--", "train")
    assert result.exit_code == 0, result.output
    spec = api.jobs.jobs[1].spec
    assert dict(spec.env) == {"A": "1", "HF_TOKEN": "hf_from_my_shell"}
    assert list(spec.secret_env) == ["HF_TOKEN"]
    assert "hf_from_my_shell" not in result.output


def test_a_server_list_with_no_address_is_a_usage_error_not_a_traceback():
    result = CliRunner().invoke(cli, ["--server", " , ", "jobs"])
    assert result.exit_code == 2
    assert "Invalid value for --server: no gpuctld address" in result.stderr
    assert "Traceback" not in result.output


def test_config_contexts_pick_the_server_and_flags_still_win(api, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCTL_CONFIG", str(tmp_path / "config.yaml"))
    monkeypatch.setenv("GPUCTL_TOKEN", "token-of-alice")
    monkeypatch.delenv("GPUCTL_SERVER", raising=False)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli, list(args))

    assert run("config", "current-context").exit_code == 1  # none yet
    assert run("config", "set-context", "lab", "--server", api.target).exit_code == 0
    assert run("config", "set-context", "nowhere", "--server", "127.0.0.1:1").exit_code == 0
    assert run("config", "current-context").stdout == "lab\n"  # the first becomes current
    assert oct((tmp_path / "config.yaml").stat().st_mode & 0o777) == "0o600"
    running_job(api, 1)
    assert run("jobs").stdout.splitlines()[1].split()[0] == "1"  # through lab
    down = run("--context", "nowhere", "jobs")
    assert down.exit_code == 1 and "cannot reach gpuctld" in down.stderr
    # --server wins over the context's
    assert run("--context", "nowhere", "--server", api.target, "jobs").exit_code == 0
    assert run("config", "use-context", "nowhere").exit_code == 0
    listed = run("config", "get-contexts").stdout.splitlines()
    assert [line.split()[:3] for line in listed[1:]] == [
        ["-", "lab", api.target],
        ["*", "nowhere", "127.0.0.1:1"],
    ]
    bad = run("--context", "prod", "jobs")
    assert bad.exit_code == 1
    assert bad.stderr == "error: context: 'prod': no such context; contexts: lab, nowhere\n"
    assert run("config", "delete-context", "nowhere").exit_code == 0
    assert run("config", "current-context").exit_code == 1
