"""The agent's Prometheus metrics: its link to gpuctld (heartbeats, silence, fencing), its ranks,
and the node's measured profile per GPU. Per-GPU utilisation, power and errors are DCGM
exporter's; the agent's job mapping files (agent.dcgm) label those with gpuctl job ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpuctl.agent.loop import AgentStatus

GB = 1e9
HEARTBEAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    """The registry: heartbeat latency as it happens, the rest read from the loop's status."""

    def __init__(self, status: Callable[[], AgentStatus]) -> None:
        self.registry = CollectorRegistry()
        self._heartbeats = Histogram(
            "gpuctl_agent_heartbeat_duration_seconds",
            "Time gpuctld took to answer a heartbeat, by result (ok, failed).",
            ["result"],
            buckets=HEARTBEAT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Status(status))

    def heartbeat(self, ok: bool, seconds: float) -> None:
        self._heartbeats.labels("ok" if ok else "failed").observe(seconds)


class _Status(Collector):
    def __init__(self, status: Callable[[], AgentStatus]) -> None:
        self._status = status

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        s = self._status()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        yield gauge("gpuctl_agent_registered", "1 once gpuctld knows this node.", s.registered)
        yield gauge(
            "gpuctl_agent_ranks", "Ranks held: running, or exited and not yet reported.", s.ranks
        )
        yield gauge(
            "gpuctl_agent_reports_pending", "Rank reports not yet delivered.", s.reports_pending
        )
        if s.silent_s is not None:
            yield gauge(
                "gpuctl_agent_daemon_silence_seconds",
                "Seconds since gpuctld last answered this agent.",
                s.silent_s,
            )
        yield gauge(
            "gpuctl_agent_fenced",
            "1 when the agent stopped its ranks for lack of word from gpuctld.",
            s.fenced,
        )
        yield gauge(
            "gpuctl_agent_health_issues",
            "Hardware problems the last health check found (the node is degraded while > 0).",
            s.health_issues,
        )
        c = CounterMetricFamily(
            "gpuctl_agent_heartbeats", "Heartbeats sent, by result.", labels=["result"]
        )
        c.add_metric(["ok"], s.heartbeats_ok)
        c.add_metric(["failed"], s.heartbeats_failed)
        yield c
        if s.profile is None:
            return
        hbm = GaugeMetricFamily(
            "gpuctl_agent_gpu_hbm_bytes_per_second",
            "Each GPU's HBM bandwidth: measured (source=measured) or the datasheet's.",
            labels=["gpu", "model", "source"],
        )
        nvlink = GaugeMetricFamily(
            "gpuctl_agent_gpu_nvlink_bytes_per_second",
            "Each GPU's NVLink bandwidth over its active links (0: none).",
            labels=["gpu", "model"],
        )
        for g in s.profile.gpus:
            measured = g.measured_hbm_gbps is not None
            value = g.measured_hbm_gbps if measured else g.hbm_gbps
            source = "measured" if measured else "datasheet"
            hbm.add_metric([str(g.index), g.model, source], (value or 0.0) * GB)
            nvlink.add_metric([str(g.index), g.model], g.nvlink_gbps * GB)
        yield hbm
        yield nvlink
        net = GaugeMetricFamily(
            "gpuctl_agent_network_bytes_per_second",
            "The node's inter-node network bandwidth, all ports together.",
            labels=["kind"],
        )
        net.add_metric([s.profile.network.kind.value], s.profile.network.total_gbps * GB / 8)
        yield net
