"""The CLI as people use it, against a real gpuctld and agent (loopback, bounded): watching
jobs change, a job read back as YAML and submitted again, versions, and shell completion
that names the daemon's jobs and nodes."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time

import pytest
import yaml

from gpuctl.demo import INFERENCE_NODES
from gpuctl.testbed import LocalCluster
from tests.test_e2e import wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("habits") / "cluster")
    c.start_daemon()
    c.start_agent(INFERENCE_NODES[0])
    wait_until(lambda: "infer-1" in c.gpuctl("nodes").stdout, what="the node")
    yield c
    c.stop_all()


def cli(cluster: LocalCluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "gpuctl.cli.main", "--server", cluster.local, *args]


def test_jobs_watch_prints_a_line_for_each_change_until_stopped(cluster):
    watch = subprocess.Popen(
        cli(cluster, "jobs", "--all", "--watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in watch.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=20).split()[:2] == ["JOBID", "NAME"]
        job = cluster.gpuctl(
            "submit", "--parsable", "--kind", "inference", "--gpus-per-node", "1",
            "--name", "watched", "--", "sleep", "60",
        ).stdout.strip()  # fmt: skip
        seen: list[list[str]] = []
        deadline = time.monotonic() + 30
        while not any(r[5] == "R" for r in seen):  # pending, then running
            assert time.monotonic() < deadline, seen
            row = lines.get(timeout=30).split()
            assert row[:2] == [job, "watched"]  # rows only, no header again
            seen.append(row)
        cluster.gpuctl("cancel", job)
        while seen[-1][5] != "CA":
            seen.append(lines.get(timeout=30).split())
        assert seen[0][5] in ("PD", "R")
    finally:
        watch.terminate()
        watch.wait(10)


def test_a_job_read_back_as_yaml_is_submitted_again_unchanged(cluster):
    first = cluster.gpuctl(
        "submit", "--parsable", "--kind", "inference", "--replicas", "2", "--gpu-share", "0.5",
        "--name", "again", "--env", "A=1", "--time-limit", "1h", "--", "sleep", "1",
    ).stdout.strip()  # fmt: skip
    shown = cluster.gpuctl("get", "job", first, "-o", "yaml").stdout
    doc = yaml.safe_load(shown)
    assert doc["spec"]["gpu_share"] == 0.5 and doc["spec"]["time_limit"] == "1h"
    assert doc["status"]["state"] in ("pending", "running", "succeeded")
    again = subprocess.run(
        cli(cluster, "submit", "--parsable", "-f", "-"),
        input=shown,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    second = yaml.safe_load(cluster.gpuctl("get", "job", again.stdout.strip(), "-o", "yaml").stdout)
    assert second["spec"] == doc["spec"]
    assert second["id"] != doc["id"]


def test_version_names_client_and_server_and_completion_names_jobs_and_nodes(cluster):
    out = cluster.gpuctl("version").stdout.splitlines()
    assert out[0].startswith("client: ") and out[1].startswith("server: ")
    assert out[0].split()[1] == out[1].split()[1]  # one release here
    job = cluster.gpuctl(
        "submit", "--parsable", "--kind", "inference", "--gpus-per-node", "1", "--", "sleep", "60"
    ).stdout.strip()

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_GPUCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            # the index of the word being completed: a new one after a space
            "COMP_CWORD": str(len(words.split()) - (not words.endswith(" "))),
        }
        run = subprocess.run(cli(cluster)[:3], env=env, capture_output=True, text=True, timeout=30)
        return [line.split(",", 1)[1] for line in run.stdout.splitlines() if line]

    assert job in complete(f"gpuctl --server {cluster.local} cancel ")
    assert complete(f"gpuctl --server {cluster.local} drain inf") == ["infer-1"]
    # An unreachable daemon completes nothing, and says nothing into the command line.
    assert complete("gpuctl --server 127.0.0.1:1 cancel ") == []
    script = cluster.gpuctl("completion", "zsh").stdout
    assert "_GPUCTL_COMPLETE" in script and "compdef" in script
    cluster.gpuctl("cancel", job)
