"""The NVML probe: each GPU's identity, memory, theoretical HBM GB/s (max memory clock x bus
width), NVLink links, version, peers and domain, PCIe links, NUMA node, CPU affinity and MIG mode,
read through an injected pynvml-like module; network from sysfs; measured HBM where asked.

A node without the NVIDIA library or driver is a CPU node: one log line, never a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpuctl.agent.membench import HbmResult
from gpuctl.agent.probe import MIB, NodeFacts, Probe, datasheet
from gpuctl.agent.sysfs import (
    ROOT,
    EthernetNic,
    canonical_bus_id,
    derive_network,
    ethernet_nics,
    format_cpulist,
    pci_local_cpulist,
    pci_numa_node,
    read_ib_ports,
)
from gpuctl.core.model import BandwidthProfile, Gpu, Network

log = logging.getLogger(__name__)

# NVML_NVLINK_VERSION_* is an enum, not the generation: 1_0=1, 2_0=2, 2_2=3, 3_0=4, 3_1=5,
# 4_0=6, 5_0=7, 6_0=8 in nvidia-ml-py. Map it to the NVLink generation (Pascal 1, Volta 2,
# Ampere 3, Hopper 4, Blackwell 5).
NVLINK_GENERATION = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}
# Bidirectional GB/s per link, the figure NVIDIA's per-GPU totals are sums of: P100 4 x 40 = 160,
# V100 6 x 50 = 300, A100 12 x 50 = 600, H100 18 x 50 = 900, B200 18 x 100 = 1800. Generation 6
# is left out until a part's link count is published: its GPUs fall back to the datasheet.
NVLINK_LINK_GBPS = {1: 40.0, 2: 50.0, 3: 50.0, 4: 50.0, 5: 100.0}

# NVML's name (minus "NVIDIA "/"Tesla ") -> the row in gpu_specs.csv, which is also Gpu.model so
# that a job asking for "H100 SXM" finds these GPUs. Parts absent here keep NVML's name.
_NVML_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), model)
    for pattern, model in (
        (r"H200( SXM.*)?", "H200 SXM"),  # "NVIDIA H200"; not the H200 NVL (a PCIe card)
        (r"H100 80GB HBM3|H100 SXM.*", "H100 SXM"),
        (r"H100 PCIe", "H100 PCIe"),
        (r"A100-SXM4-80GB", "A100 80GB SXM"),
        (r"A100-SXM4-40GB", "A100 40GB"),
        (r"L40S", "L40S"),
        (r"L4", "L4"),
        (r"A10G", "A10G"),
        (r"A10", "A10"),
        (r"T4", "T4"),
        (r"V100-SXM2-32GB", "V100 SXM2 32GB"),
    )
)


class NvmlUnavailable(Exception):
    """NVML cannot be used on this node; the message says why, for the one log line."""


def catalog_model(nvml_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100 SXM'; None for a part gpu_specs.csv does not list."""
    name = re.sub(r"^(NVIDIA|Tesla)\s+", "", nvml_name.strip())
    return next((model for pattern, model in _NVML_NAMES if pattern.fullmatch(name)), None)


def theoretical_hbm_gbps(max_mem_clock_mhz: int, bus_width_bits: int) -> float:
    """Peak memory bandwidth in GB/s: two transfers per clock on every pin of the bus,
    2 x MHz x 10^6 x bits / 8 bytes/s (H100 SXM: 2 x 2619 x 5120 / 8 = 3352 GB/s)."""
    return round(2 * max_mem_clock_mhz * 1e6 * bus_width_bits / 8 / 1e9, 1)


@dataclass(frozen=True, slots=True)
class NvLinkEnd:
    """The far end of one active NVLink link."""

    bus_id: str  # canonical PCI bus id
    kind: str  # "gpu" | "switch" | "unknown" (the driver could not say)


def nvlink_domain_size(gpus: Sequence[tuple[str, Sequence[NvLinkEnd]]]) -> int:
    """The most GPUs (bus id, far ends of its active links) that reach each other over NVLink.

    GPUs and NVSwitches are the vertices; a GPU links to a peer GPU directly, or to a switch
    that every GPU on it can reach. An end of unknown kind that is not a local GPU is a switch
    (on HGX boards the switches are not PCI devices NVML knows). 0 where no GPU has a link up.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    local = {bus for bus, _ in gpus}
    for bus, ends in gpus:
        for end in ends:
            is_gpu = end.kind == "gpu" or (end.kind == "unknown" and end.bus_id in local)
            other = end.bus_id if is_gpu else f"switch:{end.bus_id}"
            parent[find(bus)] = find(other)
    sizes = Counter(find(bus) for bus, ends in gpus if ends)
    return max(sizes.values(), default=0)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Read:
    gpu: Gpu
    ends: tuple[NvLinkEnd, ...]
    bf16_tflops: float
    notes: tuple[str, ...]


class NvmlProbe:
    """GPUs through NVML on top of the host probe (CPUs, memory, hostname); a node without the
    NVIDIA library or driver reports the host probe's CPU-only facts."""

    def __init__(
        self,
        *,
        host: Probe,
        nvml: Any = None,  # a pynvml-like module; None: import pynvml when probing
        sysfs_root: Path = ROOT,
        network: Network | None = None,  # the operator's --net, over what sysfs finds
        nics: Callable[[], tuple[EthernetNic, ...]] | None = None,
        hbm: Callable[[tuple[Gpu, ...]], HbmResult] | None = None,  # None: not measured
        cpu_count: int | None = None,
    ) -> None:
        self._host = host
        self._nvml = nvml
        self._root = sysfs_root
        self._network = network
        self._nics = nics or (lambda: ethernet_nics(root=sysfs_root))
        self._hbm = hbm
        self._cpu_count = cpu_count or os.cpu_count() or 64
        self._told = False  # the CPU-node message is logged once, not at every re-registration

    def probe(self) -> NodeFacts:
        facts = self._host.probe()
        ib_ports = read_ib_ports(self._root)
        network = derive_network(ib_ports, self._nics(), self._network)
        try:
            reads = self._read_gpus()
        except NvmlUnavailable as e:
            if not self._told:
                log.warning("%s: registering as a CPU-only node", e)
                self._told = True
            profile = replace(facts.profile, network=network, ib_ports=ib_ports)
            return replace(facts, profile=profile, notes=(f"{e}: a CPU-only node",))
        gpus = tuple(r.gpu for r in reads)
        notes = [n for r in reads for n in r.notes]
        if self._hbm is not None:
            result = self._hbm(gpus)
            gpus, notes = result.gpus, [*notes, *result.notes]
        # The node's PCIe figure is what its links can do: the current generation drops to gen1
        # on an idle GPU to save power, so it says nothing about the slot.
        max_gens = [g.pcie_max_gen for g in gpus if g.pcie_max_gen]
        max_widths = [g.pcie_max_width for g in gpus if g.pcie_max_width]
        profile = BandwidthProfile(
            gpus=gpus,
            nvlink_domain_size=nvlink_domain_size([(r.gpu.pci_bus_id, r.ends) for r in reads]),
            pcie_gen=min(max_gens, default=0),
            pcie_width=min(max_widths, default=0),
            network=network,
            ib_ports=ib_ports,
            bf16_tflops=round(sum(r.bf16_tflops for r in reads), 3),
            source="nvml",
            measured_at=facts.profile.measured_at,
        )
        return replace(facts, profile=profile, notes=tuple(notes))

    # -- NVML ------------------------------------------------------------------------------

    def _module(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        try:
            import pynvml  # the NVIDIA library is loaded by nvmlInit, not by this import
        except ImportError as e:
            raise NvmlUnavailable(f"pynvml (nvidia-ml-py) is not installed ({e})") from None
        return pynvml

    def _read_gpus(self) -> list[_Read]:
        nvml = self._module()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            if e.value == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                why = "no NVIDIA driver: libnvidia-ml.so.1 not found"
            elif e.value == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
                why = "the NVIDIA driver is not loaded"
            else:
                why = f"NVML did not start: {e}"
            raise NvmlUnavailable(why) from None
        try:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                raise NvmlUnavailable("NVML sees no GPUs")
            reads = []
            for index in range(count):
                try:
                    reads.append(self._read_gpu(nvml, index))
                except nvml.NVMLError as e:
                    # A GPU that fell off the bus must not take the node's other GPUs with it.
                    log.warning("GPU %d: cannot be read through NVML: %s", index, e)
            if not reads:
                raise NvmlUnavailable("NVML could read none of its GPUs")
            return reads
        finally:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def _read_gpu(self, nvml: Any, index: int) -> _Read:
        def optional(fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
            # What a part or an older driver lacks (NotSupported, FunctionNotFound, or a pynvml
            # without the function) is left at its "unknown" value, never a failed probe.
            try:
                return fn(*args)
            except (nvml.NVMLError, AttributeError):
                return default

        h = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(h))
        bus = canonical_bus_id(nvml.nvmlDeviceGetPciInfo(h).busId)
        model = catalog_model(name)
        notes: list[str] = []
        if model is None:
            notes.append(f"GPU {index}: {name!r} has no datasheet row: BF16 TFLOPS unknown (0)")
        clock = optional(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM, default=0)
        width = optional(nvml.nvmlDeviceGetMemoryBusWidth, h, default=0)
        hbm = theoretical_hbm_gbps(clock, width)
        if not hbm and model:
            hbm = datasheet(model, "hbm_gbps")
            notes.append(f"GPU {index}: no memory clock or bus width from NVML: datasheet HBM")

        links, versions = self._links(nvml, h, optional)
        active = [end for end in links if end is not None]
        version = Counter(v for v in versions if v).most_common(1)
        generation = NVLINK_GENERATION.get(version[0][0], 0) if version else 0
        per_link = NVLINK_LINK_GBPS.get(generation, 0.0)
        nvlink_gbps = len(active) * per_link
        if active and not per_link and model:
            nvlink_gbps = datasheet(model, "nvlink_gbps_per_gpu") * len(active) / len(links)
        if len(active) < len(links):
            notes.append(f"GPU {index}: NVLink {len(active)}/{len(links)} links active")

        mig = optional(nvml.nvmlDeviceGetMigMode, h)
        numa = pci_numa_node(bus, self._root)
        if numa is None:
            numa = optional(nvml.nvmlDeviceGetNumaNodeId, h, default=-1)
        affinity = pci_local_cpulist(bus, self._root)
        if not affinity:
            # Room for every CPU the host has and at least 1024: NVML leaves absent ones 0.
            words = (max(self._cpu_count, 1024) + 63) // 64
            mask = optional(nvml.nvmlDeviceGetCpuAffinity, h, words, default=())
            affinity = format_cpulist(
                w * 64 + b for w, word in enumerate(mask) for b in range(64) if word >> b & 1
            )
        gpu = Gpu(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(h)),
            model=model or re.sub(r"^(NVIDIA|Tesla)\s+", "", name),
            memory_mib=nvml.nvmlDeviceGetMemoryInfo(h).total // MIB,
            hbm_gbps=hbm,
            nvlink_gbps=round(nvlink_gbps, 1),
            mig_enabled=bool(mig) and mig[0] == nvml.NVML_DEVICE_MIG_ENABLE,
            pci_bus_id=bus,
            nvlink_links_active=len(active),
            nvlink_links_total=len(links),
            nvlink_version=generation,
            nvlink_peers=tuple(dict.fromkeys(end.bus_id for end in active)),
            pcie_gen=optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h, default=0),
            pcie_width=optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, h, default=0),
            pcie_max_gen=optional(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h, default=0),
            pcie_max_width=optional(nvml.nvmlDeviceGetMaxPcieLinkWidth, h, default=0),
            numa_node=numa if numa is not None and numa >= 0 else -1,
            cpu_affinity=affinity,
        )
        bf16 = datasheet(model, "bf16_dense_tflops") if model else 0.0
        return _Read(gpu=gpu, ends=tuple(active), bf16_tflops=bf16, notes=tuple(notes))

    def _links(
        self, nvml: Any, h: Any, optional: Callable[..., Any]
    ) -> tuple[list[NvLinkEnd | None], list[int]]:
        """One entry per link the GPU has (the far end where the link is up, else None), and the
        NVML_NVLINK_VERSION_* each link reports."""
        links: list[NvLinkEnd | None] = []
        versions: list[int] = []
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                state = nvml.nvmlDeviceGetNvLinkState(h, link)
            except nvml.NVMLError:
                # NotSupported (InvalidArgument on some drivers): the GPU has no such link.
                continue
            versions.append(optional(nvml.nvmlDeviceGetNvLinkVersion, h, link, default=0))
            if state != nvml.NVML_FEATURE_ENABLED:
                links.append(None)
                continue
            remote = optional(nvml.nvmlDeviceGetNvLinkRemotePciInfo, h, link)
            kind = optional(nvml.nvmlDeviceGetNvLinkRemoteDeviceType, h, link)
            links.append(
                NvLinkEnd(
                    bus_id=canonical_bus_id(remote.busId) if remote is not None else "",
                    kind={
                        nvml.NVML_NVLINK_DEVICE_TYPE_GPU: "gpu",
                        nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH: "switch",
                    }.get(kind, "unknown"),
                )
            )
        return links, versions
