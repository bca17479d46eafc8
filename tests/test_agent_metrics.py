"""The agent's metrics and DCGM exporter's job mapping files, driven through the agent loop
against a fake gpuctld on a real socket, with real rank processes."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from gpuctl.agent.dcgm import JobMapping
from gpuctl.agent.metrics import AgentMetrics
from gpuctl.agent.runner import RankKey
from gpuctl.runtime.exposition import EndpointSettings, MetricsEndpoint
from tests import test_agent_loop
from tests.test_agent_loop import FakeDaemon, assignment, make_agent
from tests.test_metrics import scrape

OTHER = RankKey(job_id=9, rank=1, attempt=0)
daemon = test_agent_loop.daemon  # the fake gpuctld, a fixture


def mapping(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_dcgm_files_name_the_jobs_on_each_gpu_and_go_when_the_ranks_do(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    out = tmp_path / "dcgm"
    (tmp_path / "dcgm").mkdir()
    (out / "README").write_text("not ours")  # left alone: not a GPU's file
    with make_agent(daemon, tmp_path, job_map=JobMapping(out), crash=True) as agent:
        first = assignment("sleep", "60")
        first.gpu_indices.extend([0, 1])
        second = assignment("sleep", "60", key=OTHER)
        second.gpu_indices.extend([1, 3])  # GPU 1 shared (two shares of one GPU)
        daemon.assignments = [first, second]
        agent.loop.tick()
        assert mapping(out) == {"0": "7\n", "1": "7\n9\n", "3": "9\n", "README": "not ours"}
        assert oct(os.stat(out / "1").st_mode & 0o777) == "0o644"
        daemon.assignments = [second]
        daemon.stop = [first.ref]
        agent.heartbeat()  # told to stop job 7's rank
        agent.until(lambda: mapping(out) == {"1": "9\n", "3": "9\n", "README": "not ours"})
    # A restarted agent adopts job 9's rank and learns its GPUs from the assignments the
    # daemon sends again.
    (out / "1").unlink()
    with make_agent(daemon, tmp_path, job_map=JobMapping(out)) as agent:
        agent.until(lambda: mapping(out) == {"1": "9\n", "3": "9\n", "README": "not ours"})
        agent.runner.stop_all(0)
        agent.until(lambda: mapping(out) == {"README": "not ours"})


def test_agent_metrics_show_its_link_to_gpuctld_its_ranks_and_its_gpus(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    holder: list = []
    metrics = AgentMetrics(lambda: holder[0].loop.status)
    with make_agent(daemon, tmp_path, observer=metrics) as agent:
        holder.append(agent)
        endpoint = MetricsEndpoint(EndpointSettings(listen="127.0.0.1:0"), metrics.registry)
        try:
            daemon.assignments = [assignment("sleep", "60")]
            agent.loop.tick()  # registers, heartbeats, starts the rank
            daemon.fail("Heartbeat", grpc.StatusCode.UNAVAILABLE)
            agent.heartbeat()
            status, text = scrape(f"http://127.0.0.1:{endpoint.port}/metrics")
            assert status == 200
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            assert samples[("gpuctl_agent_registered", ())] == 1
            assert samples[("gpuctl_agent_ranks", ())] == 1
            assert samples[("gpuctl_agent_heartbeats_total", (("result", "ok"),))] == 1
            assert samples[("gpuctl_agent_heartbeats_total", (("result", "failed"),))] == 1
            assert (
                samples[("gpuctl_agent_daemon_silence_seconds", ())] == 10
            )  # one heartbeat interval
            assert samples[("gpuctl_agent_fenced", ())] == 0
            assert (
                samples[("gpuctl_agent_heartbeat_duration_seconds_count", (("result", "failed"),))]
                == 1
            )
            gpu0 = (("gpu", "0"), ("model", "H100 SXM"), ("source", "datasheet"))
            assert samples[("gpuctl_agent_gpu_hbm_bytes_per_second", gpu0)] == 3350e9
            assert samples[
                ("gpuctl_agent_network_bytes_per_second", (("kind", "infiniband"),))
            ] == (8 * 400e9 / 8)
        finally:
            endpoint.close()
            agent.runner.stop_all(0)


def test_agent_metrics_off_loopback_need_tls_and_a_token_file(tmp_path: Path) -> None:
    import pytest

    from gpuctl.agent.main import SettingsError, load_settings

    base = ["--fake-gpus", "h100-sxm:8", "--state-dir", str(tmp_path / "s")]
    settings = load_settings([*base, "--metrics-listen", "127.0.0.1:9751"], {})
    assert settings.metrics is not None and settings.metrics.is_open
    with pytest.raises(SettingsError, match=r"need TLS.*need a token"):
        load_settings([*base, "--metrics-listen", "0.0.0.0:9751"], {})
    with pytest.raises(SettingsError, match="not HOST:PORT"):
        load_settings([*base, "--metrics-listen", "9751"], {})
    config = tmp_path / "agent.toml"
    config.write_text(
        'metrics_listen = "0.0.0.0:9751"\nmetrics_tls_cert_file = "/etc/c.pem"\n'
        'metrics_tls_key_file = "/etc/k.pem"\nmetrics_token_file = "/etc/token"\n'
        f'dcgm_job_mapping_dir = "{tmp_path}/dcgm"\nlog_format = "json"\n'
    )
    settings = load_settings([*base, "--config", str(config)], {})
    assert settings.metrics is not None and not settings.metrics.is_open
    assert settings.metrics_token_file == Path("/etc/token")
    assert settings.dcgm_job_mapping_dir == tmp_path / "dcgm"
    assert settings.log_format == "json"
    with pytest.raises(SettingsError, match="invalid choice"):
        load_settings([*base, "--log-format", "xml"], {})
