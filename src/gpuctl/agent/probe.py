"""What the agent knows about its node: the `Probe` protocol, the psutil host probe and the fake
GPU probe built from `--fake-gpus h100-sxm:8`, the parsers for the node's flag values, and how
`gpuctl-agent profile` shows a probe's findings. The NVML probe (`nvml.py`) is another `Probe`.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psutil

from gpuctl.core.model import BandwidthProfile, Gpu, NetKind, Network

MIB = 1024 * 1024
MAX_FAKE_GPUS = 64  # more than any real node; a typo like h100-sxm:80 is refused


class SpecError(ValueError):
    """A flag or config value that cannot be parsed; the message names the value and the fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFacts:
    """One probe's findings: what the node has, before the operator's flags name and place it."""

    hostname: str
    cpu_milli: int
    memory_mib: int
    profile: BandwidthProfile = field(default_factory=BandwidthProfile)
    notes: tuple[str, ...] = ()  # what the probe could not find out, for `gpuctl-agent profile`


class Probe(Protocol):
    def probe(self) -> NodeFacts: ...


# -- GPU SKUs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSku:
    """One GPU model as a node reports it: the catalog row plus what the catalog leaves out."""

    name: str  # the short name used in --fake-gpus
    model: str  # the row in gpu_specs.csv, and Gpu.model
    memory_mib: int
    hbm_gbps: float
    nvlink_gbps: float  # per GPU; 0 for cards without NVLink between them
    bf16_tflops: float  # dense, per GPU; 0 where the GPU has no BF16 (T4, V100)
    pcie_gen: int
    pcie_width: int = 16


@dataclass(frozen=True, slots=True)
class _Form:
    model: str  # row name in gpu_specs.csv
    pcie_gen: int
    nvlink: bool  # SXM/OAM on an NVSwitch (or Infinity Fabric) board: every GPU in one domain
    # Usable MiB as nvidia-smi reports it: the driver reserves some of the datasheet GiB.
    # None where no reading was at hand: then memory_gib * 1024.
    usable_mib: int | None = None


# PCIe generation is the host link of the card (Hopper and MI300X: gen 5; Ampere and Ada: gen
# 4; Turing and Volta: gen 3). PCIe cards get no NVLink even where the catalog lists a bridge
# figure (H100 PCIe: 600 GB/s between a bridged *pair*): a fake node has no bridges, and a
# scheduler that saw 600 GB/s on all eight cards would gang them as if they were SXM.
_FORMS: dict[str, _Form] = {
    "h200": _Form("H200 SXM", 5, True, 143771),
    "h100-sxm": _Form("H100 SXM", 5, True, 81559),
    "h100-pcie": _Form("H100 PCIe", 5, False, 81559),
    "a100-80g-sxm": _Form("A100 80GB SXM", 4, True, 81920),
    "a100-40g": _Form("A100 40GB", 4, True, 40960),  # the catalog row is the SXM4 part
    "l40s": _Form("L40S", 4, False, 46068),
    "l4": _Form("L4", 4, False, 23034),
    "a10g": _Form("A10G", 4, False, 23028),
    "a10": _Form("A10", 4, False, 23028),
    "t4": _Form("T4", 3, False, 15360),
    "v100-sxm2-32g": _Form("V100 SXM2 32GB", 3, True),
    "mi300x": _Form("MI300X", 5, True),
}
_ALIASES = {
    "h100": "h100-sxm",
    "h200-sxm": "h200",
    "a100-80g": "a100-80g-sxm",
    "v100": "v100-sxm2-32g",
}


@functools.cache
def _catalog() -> dict[str, dict[str, str]]:
    text = importlib.resources.files("gpuctl").joinpath("data/gpu_specs.csv").read_text()
    return {row["gpu"]: row for row in csv.DictReader(text.splitlines())}


def _float(raw: str) -> float:
    return float(raw) if raw.strip() else 0.0


def datasheet(model: str, column: str) -> float:
    """A figure from gpu_specs.csv, e.g. datasheet("H100 SXM", "bf16_dense_tflops") -> 989.4;
    0.0 where the model or the figure is not in the catalog."""
    row = _catalog().get(model)
    return _float(row.get(column) or "") if row else 0.0


@functools.cache
def gpu_skus() -> dict[str, GpuSku]:
    """Every short name --fake-gpus accepts (aliases included), mapped to its SKU."""
    rows = _catalog()
    skus: dict[str, GpuSku] = {}
    for name, form in _FORMS.items():
        row = rows[form.model]  # a KeyError here means the catalog and this table drifted
        skus[name] = GpuSku(
            name=name,
            model=form.model,
            memory_mib=form.usable_mib or int(_float(row["memory_gib"]) * 1024),
            hbm_gbps=_float(row["hbm_gbps"]),
            nvlink_gbps=_float(row["nvlink_gbps_per_gpu"]) if form.nvlink else 0.0,
            bf16_tflops=_float(row["bf16_dense_tflops"]),
            pcie_gen=form.pcie_gen,
        )
    skus.update({alias: skus[target] for alias, target in _ALIASES.items()})
    return skus


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeGpus:
    sku: GpuSku
    count: int


def parse_fake_gpus(spec: str) -> FakeGpus:
    """'h100-sxm:8' -> 8 x H100 SXM; the count defaults to 1."""
    name, _, count_raw = spec.strip().lower().partition(":")
    skus = gpu_skus()
    if name not in skus:
        known = ", ".join(sorted(_FORMS))
        raise SpecError(f"unknown GPU {name!r} in --fake-gpus {spec!r}; known: {known}")
    if not count_raw:
        return FakeGpus(sku=skus[name], count=1)
    if not count_raw.isdigit() or not 1 <= int(count_raw) <= MAX_FAKE_GPUS:
        raise SpecError(
            f"bad GPU count {count_raw!r} in --fake-gpus {spec!r}: want 1..{MAX_FAKE_GPUS}, e.g. {name}:8"
        )
    return FakeGpus(sku=skus[name], count=int(count_raw))


def fake_profile(
    gpus: FakeGpus, *, node_name: str, network: Network | None = None
) -> BandwidthProfile:
    """The profile a node with these GPUs would report, with stable per-node fake UUIDs."""
    sku, count = gpus.sku, gpus.count
    return BandwidthProfile(
        gpus=tuple(
            Gpu(
                index=i,
                uuid=f"GPU-fake-{node_name}-{i}",
                model=sku.model,
                memory_mib=sku.memory_mib,
                hbm_gbps=sku.hbm_gbps,
                nvlink_gbps=sku.nvlink_gbps,
            )
            for i in range(count)
        ),
        nvlink_domain_size=count if sku.nvlink_gbps > 0 else 0,
        pcie_gen=sku.pcie_gen,
        pcie_width=sku.pcie_width,
        network=network or Network(),
        bf16_tflops=round(sku.bf16_tflops * count, 3),
        source="fake",
    )


# -- flag values ---------------------------------------------------------------------------

_NET_KINDS = {
    "infiniband": NetKind.INFINIBAND,
    "ib": NetKind.INFINIBAND,
    "roce": NetKind.ROCE,
    "ethernet": NetKind.ETHERNET,
    "eth": NetKind.ETHERNET,
}
_NET_RE = re.compile(r"(?P<ports>\d+)x(?P<gbps>\d+(?:\.\d+)?)")


def parse_network(spec: str) -> Network:
    """'infiniband:8x400' (ports x Gb/s per port), 'roce:2x200', 'ethernet:1x100' or 'none'."""
    text = spec.strip().lower()
    if text == "none":
        return Network()
    kind_raw, sep, links = text.partition(":")
    kind = _NET_KINDS.get(kind_raw)
    if kind is None:
        raise SpecError(
            f"unknown network kind {kind_raw!r} in --net {spec!r}; "
            "known: infiniband, roce, ethernet, none"
        )
    match = _NET_RE.fullmatch(links) if sep else None
    if match is None:
        raise SpecError(f"bad --net {spec!r}: want KIND:PORTSxGBPS, e.g. infiniband:8x400")
    ports, gbps = int(match["ports"]), float(match["gbps"])
    if ports < 1 or gbps <= 0:
        raise SpecError(f"bad --net {spec!r}: ports and Gb/s per port must be positive")
    return Network(kind=kind, ports=ports, gbps_per_port=gbps)


# Binary units throughout, as Slurm and Kubernetes read "G": a node's RAM is sold in GiB.
_MEMORY_UNITS = {"": 1, "m": 1, "g": 1024, "t": 1024 * 1024}
_MEMORY_RE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[mgt]?)(?:i?b)?")


def parse_memory(spec: str) -> int:
    """'512GiB', '512G', '1TiB' or '65536' (MiB) -> MiB."""
    match = _MEMORY_RE.fullmatch(spec.strip().lower())
    if match is None or float(match["n"]) <= 0:
        raise SpecError(f"bad memory size {spec!r}: want e.g. 512GiB, 1TiB or 65536MiB")
    return int(float(match["n"]) * _MEMORY_UNITS[match["unit"]])


def parse_cpus(spec: str | float) -> int:
    """'64' or '7.5' CPUs -> milli-CPUs."""
    try:
        cpus = float(spec)
    except ValueError:
        raise SpecError(f"bad CPU count {spec!r}: want a positive number, e.g. 64") from None
    if not 0 < cpus < float("inf"):
        raise SpecError(f"bad CPU count {spec!r}: want a positive number, e.g. 64")
    return round(cpus * 1000)


# -- probes --------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _usable_cpus() -> int:
    # The affinity mask, not the core count: under a cpuset (a container, `taskset`) only
    # those CPUs are ours to hand out.
    try:
        return len(psutil.Process().cpu_affinity() or ()) or psutil.cpu_count() or 1
    except AttributeError:  # no affinity on macOS
        return psutil.cpu_count() or 1


class PsutilProbe:
    """A CPU-only node: CPUs and memory from psutil unless given, the network as configured."""

    def __init__(
        self,
        *,
        hostname: str | None = None,
        network: Network | None = None,
        cpu_milli: int | None = None,
        memory_mib: int | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._hostname = hostname
        self._network = network or Network()
        self._cpu_milli = cpu_milli
        self._memory_mib = memory_mib
        self._now = now

    def probe(self) -> NodeFacts:
        cpu_milli = self._cpu_milli or _usable_cpus() * 1000
        memory_mib = self._memory_mib or psutil.virtual_memory().total // MIB
        return NodeFacts(
            hostname=self._hostname or socket.gethostname(),
            cpu_milli=cpu_milli,
            memory_mib=memory_mib,
            profile=BandwidthProfile(
                network=self._network, source="psutil", measured_at=self._now()
            ),
        )


class FakeProbe:
    """Simulated GPUs on top of a real (or fake) host probe: the demo and test bed."""

    def __init__(
        self, gpus: FakeGpus | str, *, node_name: str, host: Probe, lost_file: Path | None = None
    ) -> None:
        self._gpus = parse_fake_gpus(gpus) if isinstance(gpus, str) else gpus
        self._node_name = node_name
        self._host = host
        self._lost_file = lost_file

    def probe(self) -> NodeFacts:
        facts = self._host.probe()
        profile = replace(
            fake_profile(self._gpus, node_name=self._node_name, network=facts.profile.network),
            measured_at=facts.profile.measured_at,
        )
        lost = self._lost()
        if lost:
            profile = replace(profile, gpus=tuple(g for g in profile.gpus if g.index not in lost))
        return replace(facts, profile=profile)

    def _lost(self) -> frozenset[int]:
        """The simulated GPUs fallen off the bus: the indices in the lost file, if any."""
        if self._lost_file is None:
            return frozenset()
        try:
            text = self._lost_file.read_text()
        except OSError:
            return frozenset()
        return frozenset(int(t) for t in text.replace(",", " ").split() if t.isdigit())


# -- showing a profile (`gpuctl-agent profile`) ----------------------------------------------

NOT_MEASURED = "not measured"


def profile_dict(facts: NodeFacts, *, fabric: str = "") -> dict[str, Any]:
    """The probe's findings as plain JSON data; a measured HBM of null means not measured."""
    p = facts.profile
    return {
        "hostname": facts.hostname,
        "source": p.source,
        "measured_at": p.measured_at.isoformat() if p.measured_at else None,
        "cpus": facts.cpu_milli / 1000,
        "memory_mib": facts.memory_mib,
        "gpu_count": len(p.gpus),
        "gpu_model": p.gpu_model,
        "nvlink_domain_size": p.nvlink_domain_size,
        "pcie": {"gen": p.pcie_gen, "width": p.pcie_width},
        "bf16_tflops": p.bf16_tflops,
        "network": {
            "kind": p.network.kind.value,
            "ports": p.network.ports,
            "gbps_per_port": p.network.gbps_per_port,
            "total_gbps": p.network.total_gbps,
        },
        "fabric": fabric,
        "ib_ports": [
            {
                "device": x.device,
                "port": x.port,
                "rate_gbps": x.rate_gbps,
                "state": x.state,
                "phys_state": x.phys_state,
                "link_layer": x.link_layer,
                "guid": x.guid,
            }
            for x in p.ib_ports
        ],
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "model": g.model,
                "pci_bus_id": g.pci_bus_id,
                "memory_mib": g.memory_mib,
                "hbm_gbps_theoretical": g.hbm_gbps,
                "hbm_gbps_measured": g.measured_hbm_gbps,
                "nvlink": {
                    "links_active": g.nvlink_links_active,
                    "links_total": g.nvlink_links_total,
                    "version": g.nvlink_version,
                    "gbps": g.nvlink_gbps,
                    "peers": list(g.nvlink_peers),
                },
                "pcie": {
                    "gen": g.pcie_gen,
                    "width": g.pcie_width,
                    "max_gen": g.pcie_max_gen,
                    "max_width": g.pcie_max_width,
                },
                "numa_node": g.numa_node,
                "cpu_affinity": g.cpu_affinity,
                "mig_enabled": g.mig_enabled,
            }
            for g in p.gpus
        ],
        "notes": list(facts.notes),
    }


def _columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]


def _pcie(gen: int, width: int) -> str:
    return f"gen{gen}x{width}" if gen else "-"


def _num(value: float) -> str:
    return f"{value:g}" if value else "-"


def profile_table(facts: NodeFacts, *, fabric: str = "") -> str:
    """The probe's findings for a person: the node, one row per GPU, the network's ports."""
    p = facts.profile
    net = p.network
    when = p.measured_at.strftime("%Y-%m-%dT%H:%M:%SZ") if p.measured_at else "-"
    models = ", ".join(dict.fromkeys(g.model for g in p.gpus))
    head = [
        (
            "Node",
            f"{facts.hostname} ({facts.cpu_milli / 1000:g} CPUs, {facts.memory_mib / 1024:.1f} GiB memory)",
        ),
        ("Source", f"{p.source}, probed {when}"),
        ("GPUs", f"{len(p.gpus)} x {models}" if p.gpus else "none (CPU-only node)"),
        ("NVLink domain", f"{p.nvlink_domain_size} GPUs" if p.nvlink_domain_size else "-"),
        ("PCIe", _pcie(p.pcie_gen, p.pcie_width).replace("x", " x")),
        ("BF16 TFLOPS", f"{p.bf16_tflops:g} (dense, whole node)" if p.bf16_tflops else "-"),
        (
            "Network",
            f"{net.kind.value}, {net.ports} x {net.gbps_per_port:g} Gb/s ({net.total_gbps:g} Gb/s)"
            if net.ports
            else "none",
        ),
        ("Fabric", fabric or "-"),
    ]
    width = max(len(k) for k, _ in head) + 2
    lines = [f"{(k + ':').ljust(width)}{v}" for k, v in head]
    if p.gpus:
        rows = [
            [
                str(g.index),
                g.model,
                f"{g.memory_mib / 1024:.1f}GiB",
                _num(g.hbm_gbps),
                f"{g.measured_hbm_gbps:g}" if g.measured_hbm_gbps is not None else NOT_MEASURED,
                f"{g.nvlink_links_active}/{g.nvlink_links_total}" if g.nvlink_links_total else "-",
                str(g.nvlink_version) if g.nvlink_version else "-",
                _num(g.nvlink_gbps),
                f"{_pcie(g.pcie_gen, g.pcie_width)}/{_pcie(g.pcie_max_gen, g.pcie_max_width)}",
                str(g.numa_node) if g.numa_node >= 0 else "-",
                g.cpu_affinity or "-",
                "on" if g.mig_enabled else "off",
                g.pci_bus_id or "-",
            ]
            for g in p.gpus
        ]
        headers = [
            "GPU",
            "MODEL",
            "MEMORY",
            "HBM_GB/s",
            "MEASURED_GB/s",
            "NVLINKS",
            "NVL_GEN",
            "NVLINK_GB/s",
            "PCIE(CUR/MAX)",
            "NUMA",
            "CPUS",
            "MIG",
            "PCI_BUS_ID",
        ]
        lines += ["", *_columns(headers, rows)]
    if p.ib_ports:
        rows = [
            [
                x.device,
                str(x.port),
                x.state,
                x.phys_state,
                _num(x.rate_gbps),
                x.link_layer,
                x.guid or "-",
            ]
            for x in p.ib_ports
        ]
        headers = ["DEVICE", "PORT", "STATE", "PHYS_STATE", "RATE_Gb/s", "LINK_LAYER", "GUID"]
        lines += ["", "IB/RoCE ports:", *("  " + r for r in _columns(headers, rows))]
    if facts.notes:
        lines += ["", "Notes:", *(f"  {n}" for n in facts.notes)]
    return "\n".join(lines)
