"""A hand-written stand-in for the pynvml module: the same function names, constants and error
class, answered from `FakeGpu` data, so `NvmlProbe`'s real code path runs without a GPU.
`fake_board("h100-sxm", 8)` builds the GPUs of a known board with its real clocks and links.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gpuctl.agent.probe import SpecError
from gpuctl.agent.sysfs import parse_cpulist

# pynvml's values (nvidia-ml-py 13), so the probe reads the same numbers from either module.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_CLOCK_MEM = 2
NVML_NVLINK_MAX_LINKS = 36
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_NVLINK_DEVICE_TYPE_GPU = 0x00
NVML_NVLINK_DEVICE_TYPE_IBMNPU = 0x01
NVML_NVLINK_DEVICE_TYPE_SWITCH = 0x02
NVML_NVLINK_DEVICE_TYPE_UNKNOWN = 0xFF
NVML_NVLINK_VERSION_INVALID = 0
NVML_NVLINK_VERSION_1_0 = 1
NVML_NVLINK_VERSION_2_0 = 2
NVML_NVLINK_VERSION_2_2 = 3
NVML_NVLINK_VERSION_3_0 = 4
NVML_NVLINK_VERSION_3_1 = 5
NVML_NVLINK_VERSION_4_0 = 6
NVML_NVLINK_VERSION_5_0 = 7
NVML_NVLINK_VERSION_6_0 = 8

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class NVMLError(Exception):
    """pynvml's error: `value` is the NVML_ERROR_* code."""

    def __init__(self, value: int) -> None:
        super().__init__(_MESSAGES.get(value, f"NVML error {value}"))
        self.value = value


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeLink:
    active: bool = True
    remote_bus_id: str = ""  # NVML's form, "00000000:05:00.0"
    remote_type: int | None = NVML_NVLINK_DEVICE_TYPE_SWITCH  # None: the driver cannot say
    version: int = NVML_NVLINK_VERSION_4_0


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeGpu:
    name: str  # as NVML reports it, e.g. "NVIDIA H100 80GB HBM3"
    uuid: str
    bus_id: str  # NVML's form, "00000000:18:00.0"
    memory_mib: int
    max_mem_clock_mhz: int | None  # None: NotSupported
    bus_width_bits: int | None
    links: tuple[FakeLink, ...] = ()  # link indices beyond these answer NotSupported
    pcie_gen: int = 4
    pcie_width: int = 16
    pcie_max_gen: int = 4
    pcie_max_width: int = 16
    mig_mode: int | None = None  # None: the part has no MIG (NotSupported)
    numa_node: int | None = None  # None: NotSupported
    cpu_affinity: str = ""  # a CPU list; "": NotSupported


@dataclass(frozen=True, slots=True)
class _PciInfo:
    busId: bytes  # pynvml's struct field is bytes, not str


@dataclass(frozen=True, slots=True)
class _MemoryInfo:
    total: int
    free: int
    used: int = 0


@dataclass
class FakeNvml:
    """The pynvml functions `NvmlProbe` calls, over `gpus`; `init_error` makes nvmlInit fail as
    on a node without the library (NVML_ERROR_LIBRARY_NOT_FOUND) or driver."""

    gpus: Sequence[FakeGpu] = ()
    init_error: int | None = None
    driver_version: str = "580.159.04"
    inits: int = 0
    shutdowns: int = 0
    calls: list[str] = field(default_factory=list)

    NVMLError = NVMLError
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_NVLINK_MAX_LINKS = NVML_NVLINK_MAX_LINKS
    NVML_FEATURE_ENABLED = NVML_FEATURE_ENABLED
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    NVML_NVLINK_DEVICE_TYPE_GPU = NVML_NVLINK_DEVICE_TYPE_GPU
    NVML_NVLINK_DEVICE_TYPE_SWITCH = NVML_NVLINK_DEVICE_TYPE_SWITCH

    def _live(self, name: str) -> None:
        self.calls.append(name)
        if self.inits <= self.shutdowns:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _link(self, handle: FakeGpu, link: int) -> FakeLink:
        if not 0 <= link < NVML_NVLINK_MAX_LINKS:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if link >= len(handle.links):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.links[link]

    # -- library ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._live("nvmlShutdown")
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._live("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._live("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._live("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    # -- identity and memory ----------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._live("nvmlDeviceGetName")
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._live("nvmlDeviceGetUUID")
        return handle.uuid

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> _PciInfo:
        self._live("nvmlDeviceGetPciInfo")
        return _PciInfo(handle.bus_id.encode())

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> _MemoryInfo:
        self._live("nvmlDeviceGetMemoryInfo")
        total = handle.memory_mib * 1024 * 1024
        return _MemoryInfo(total=total, free=total)

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeGpu, clock_type: int) -> int:
        self._live("nvmlDeviceGetMaxClockInfo")
        if clock_type != NVML_CLOCK_MEM or handle.max_mem_clock_mhz is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.max_mem_clock_mhz

    def nvmlDeviceGetMemoryBusWidth(self, handle: FakeGpu) -> int:
        self._live("nvmlDeviceGetMemoryBusWidth")
        if handle.bus_width_bits is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.bus_width_bits

    # -- NVLink -----------------------------------------------------------------------------

    def nvmlDeviceGetNvLinkState(self, handle: FakeGpu, link: int) -> int:
        self._live("nvmlDeviceGetNvLinkState")
        active = self._link(handle, link).active
        return NVML_FEATURE_ENABLED if active else NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkVersion(self, handle: FakeGpu, link: int) -> int:
        self._live("nvmlDeviceGetNvLinkVersion")
        return self._link(handle, link).version

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: FakeGpu, link: int) -> _PciInfo:
        self._live("nvmlDeviceGetNvLinkRemotePciInfo")
        return _PciInfo(self._link(handle, link).remote_bus_id.encode())

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: FakeGpu, link: int) -> int:
        self._live("nvmlDeviceGetNvLinkRemoteDeviceType")
        remote_type = self._link(handle, link).remote_type
        if remote_type is None:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        return remote_type

    # -- PCIe, MIG, locality ----------------------------------------------------------------

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeGpu) -> int:
        self._live("nvmlDeviceGetCurrPcieLinkGeneration")
        return handle.pcie_gen

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeGpu) -> int:
        self._live("nvmlDeviceGetCurrPcieLinkWidth")
        return handle.pcie_width

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeGpu) -> int:
        self._live("nvmlDeviceGetMaxPcieLinkGeneration")
        return handle.pcie_max_gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeGpu) -> int:
        self._live("nvmlDeviceGetMaxPcieLinkWidth")
        return handle.pcie_max_width

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        self._live("nvmlDeviceGetMigMode")
        if handle.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [handle.mig_mode, handle.mig_mode]  # [current, pending]

    def nvmlDeviceGetNumaNodeId(self, handle: FakeGpu) -> int:
        self._live("nvmlDeviceGetNumaNodeId")
        if handle.numa_node is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.numa_node

    def nvmlDeviceGetCpuAffinity(self, handle: FakeGpu, cpu_set_size: int) -> list[int]:
        """The mask as NVML gives it: 64-bit words, CPU 0 in bit 0 of word 0."""
        self._live("nvmlDeviceGetCpuAffinity")
        if not handle.cpu_affinity:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        words = [0] * cpu_set_size
        for cpu in parse_cpulist(handle.cpu_affinity):
            if cpu // 64 < cpu_set_size:
                words[cpu // 64] |= 1 << (cpu % 64)
        return words


# -- boards of known parts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FakePart:
    name: str  # NVML's name for it
    memory_mib: int  # total as NVML reports it (what nvidia-smi shows)
    max_mem_clock_mhz: int
    bus_width_bits: int
    nvlinks: int = 0  # links per GPU, all to NVSwitches on the SXM boards
    nvlink_version: int = NVML_NVLINK_VERSION_INVALID
    pcie_gen: int = 4
    mig: bool = False  # MIG-capable (mode off by default)


# Clocks and widths are the parts' published memory specs, in NVML's terms: the max memory clock
# is half the data rate per pin (HBM and GDDR6 alike), so 2 x clock x width / 8 is the peak.
#   H100 SXM 2619 MHz x 5120 bit -> 3352 GB/s (datasheet 3.35 TB/s); nvidia-smi on an H100 SXM
#     shows 81559 MiB and a 2619 MHz max memory clock.
#   H200 3201 MHz x 6144 bit -> 4917 GB/s: the memory clock nvidia-smi showed on an H200 of this
#     workplace (its device notes); the datasheet says 4.8 TB/s, 2.4% less.
#   A100 80GB SXM 1593 MHz x 5120 bit -> 2039 GB/s (datasheet 2039 GB/s).
#   L40S GDDR6 18 Gb/s: 9001 MHz x 384 bit -> 864 GB/s (datasheet 864 GB/s).
#   L4 GDDR6 12.5 Gb/s: 6251 MHz x 192 bit -> 300 GB/s (datasheet 300 GB/s).
# The L40S and L4 clocks are recalled from nvidia-smi output, not read on hardware here;
# scripts/device-check.sh records the real ones where a GPU is lent.
PARTS: dict[str, FakePart] = {
    "h100-sxm": FakePart(
        name="NVIDIA H100 80GB HBM3",
        memory_mib=81559,
        max_mem_clock_mhz=2619,
        bus_width_bits=5120,
        nvlinks=18,
        nvlink_version=NVML_NVLINK_VERSION_4_0,
        pcie_gen=5,
        mig=True,
    ),
    "h200": FakePart(
        name="NVIDIA H200",
        memory_mib=143771,
        max_mem_clock_mhz=3201,
        bus_width_bits=6144,
        nvlinks=18,
        nvlink_version=NVML_NVLINK_VERSION_4_0,
        pcie_gen=5,
        mig=True,
    ),
    "a100-80g-sxm": FakePart(
        name="NVIDIA A100-SXM4-80GB",
        memory_mib=81920,
        max_mem_clock_mhz=1593,
        bus_width_bits=5120,
        nvlinks=12,
        nvlink_version=NVML_NVLINK_VERSION_3_0,
        pcie_gen=4,
        mig=True,
    ),
    "l40s": FakePart(
        name="NVIDIA L40S", memory_mib=46068, max_mem_clock_mhz=9001, bus_width_bits=384
    ),
    "l4": FakePart(name="NVIDIA L4", memory_mib=23034, max_mem_clock_mhz=6251, bus_width_bits=192),
}

# An HGX board's GPU bus numbers, and its four NVSwitches'; two sockets, four GPUs on each.
_GPU_BUSES = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")
_SWITCH_BUSES = ("05", "06", "07", "08")
_SOCKET_CPUS = ("0-55,112-167", "56-111,168-223")  # 2 x 56 cores with hyper-threads


def _bus(number: str) -> str:
    return f"00000000:{number.upper()}:00.0"


def fake_board(part: str, count: int, *, node: str = "fake") -> tuple[FakeGpu, ...]:
    """`count` GPUs of `part` (a key of PARTS), as one board: SXM parts have every link up to
    the NVSwitches, PCIe parts none; UUIDs are stable per node name and index."""
    spec = PARTS[part]
    gpus = []
    for i in range(count):
        socket = 0 if i < max(count // 2, 1) else 1
        links = tuple(
            FakeLink(
                remote_bus_id=_bus(_SWITCH_BUSES[link % len(_SWITCH_BUSES)]),
                version=spec.nvlink_version,
            )
            for link in range(spec.nvlinks)
        )
        bus = _GPU_BUSES[i] if i < len(_GPU_BUSES) else f"{0xE0 + i:02x}"
        gpus.append(
            FakeGpu(
                name=spec.name,
                uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{node}.gpu{i}.gpuctl')}",
                bus_id=_bus(bus),
                memory_mib=spec.memory_mib,
                max_mem_clock_mhz=spec.max_mem_clock_mhz,
                bus_width_bits=spec.bus_width_bits,
                links=links,
                pcie_gen=spec.pcie_gen,
                pcie_max_gen=spec.pcie_gen,
                mig_mode=NVML_DEVICE_MIG_DISABLE if spec.mig else None,
                numa_node=socket,
                cpu_affinity=_SOCKET_CPUS[socket],
            )
        )
    return tuple(gpus)


def with_link_down(gpus: Sequence[FakeGpu], index: int, link: int) -> tuple[FakeGpu, ...]:
    """The board with one NVLink link of GPU `index` inactive."""
    gpu = gpus[index]
    links = tuple(
        replace(lnk, active=False) if i == link else lnk for i, lnk in enumerate(gpu.links)
    )
    return tuple(replace(g, links=links) if i == index else g for i, g in enumerate(gpus))


def with_mig(gpus: Sequence[FakeGpu], *indices: int) -> tuple[FakeGpu, ...]:
    """The board with MIG mode on for the GPUs at `indices`."""
    return tuple(
        replace(g, mig_mode=NVML_DEVICE_MIG_ENABLE) if i in indices else g
        for i, g in enumerate(gpus)
    )


def fake_nvml(spec: str, *, node: str = "fake") -> FakeNvml:
    """'h100-sxm:8' -> a FakeNvml over that board; the count defaults to 1."""
    part, _, count_raw = spec.strip().lower().partition(":")
    if part not in PARTS:
        raise SpecError(f"unknown part {part!r} in {spec!r}; known: {', '.join(PARTS)}")
    if count_raw and not (count_raw.isdigit() and 1 <= int(count_raw) <= len(_GPU_BUSES)):
        raise SpecError(f"bad GPU count {count_raw!r} in {spec!r}: want 1..{len(_GPU_BUSES)}")
    return FakeNvml(gpus=fake_board(part, int(count_raw or 1), node=node))
