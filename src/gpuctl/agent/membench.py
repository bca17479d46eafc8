"""Measured HBM bandwidth: a short device-to-device copy benchmark per GPU through PyTorch or
CuPy, imported only when a measurement is asked for. Without either a GPU stays "not measured"
(None): the profile never carries an invented number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from gpuctl.core.model import Gpu

log = logging.getLogger(__name__)

GIB = 1024**3
# 1 GiB is 20x the L2 of an H200 (60 MB), so the copy streams from HBM, and big enough that the
# launch overhead (a few us) is noise. 50 copies of it take 25 ms on an H200 (2 GiB moved per
# copy at ~4.3 TB/s) and ~0.4 s on an L4 (300 GB/s): a few hundred ms per node at most.
DEFAULT_BYTES = GIB
DEFAULT_ITERATIONS = 50
WARMUP_COPIES = 3  # the first copy pays for page mapping and clock ramp-up


class CopyBackend(Protocol):
    """A GPU framework that can time device-to-device copies."""

    name: str

    def device_keys(self) -> Sequence[Sequence[str]]:
        """Per CUDA device (in CUDA's order): lower-case identifiers, "gpu-<uuid>" and/or the
        PCI bus id "0000:18:00.0", by which it is matched to an NVML GPU. Empty where unknown."""
        ...

    def time_copies(self, device: int, nbytes: int, iterations: int) -> float:
        """Seconds that `iterations` copies of `nbytes` on CUDA device `device` took, warm."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class HbmResult:
    gpus: tuple[Gpu, ...]  # with measured_hbm_gbps set where measured
    notes: tuple[str, ...] = ()  # why a GPU was not measured


def copy_gbps(nbytes: int, iterations: int, seconds: float) -> float:
    """A copy reads and writes every byte: 2 x bytes x copies / time, in GB/s (10^9 bytes)."""
    return 2 * nbytes * iterations / seconds / 1e9


def _cuda_index(gpu: Gpu, gpus: Sequence[Gpu], keys: Sequence[Sequence[str]]) -> int | None:
    wanted = {gpu.uuid.lower(), gpu.pci_bus_id.lower()} - {""}
    for i, ids in enumerate(keys):
        if wanted & set(ids):
            return i
    # No identifiers from the framework: CUDA orders devices fastest first and NVML by PCI bus
    # id, which agree only where every GPU is the same model (ties go in PCI order).
    if not any(keys) and len(keys) == len(gpus) and len({g.model for g in gpus}) == 1:
        return gpus.index(gpu)
    return None


def measure_hbm(
    gpus: Sequence[Gpu],
    backend: CopyBackend | None,
    *,
    nbytes: int = DEFAULT_BYTES,
    iterations: int = DEFAULT_ITERATIONS,
) -> HbmResult:
    """Each GPU with its measured HBM GB/s, or left unmeasured with a note saying why."""
    gpus = tuple(gpus)
    if backend is None:
        return HbmResult(
            gpus=gpus,
            notes=("HBM not measured: neither PyTorch nor CuPy with a CUDA device is importable",),
        )
    keys = backend.device_keys()
    out: list[Gpu] = []
    notes: list[str] = []
    for gpu in gpus:
        device = _cuda_index(gpu, gpus, keys)
        if gpu.mig_enabled:
            # CUDA sees the MIG instances, not the whole GPU: a copy on one slice is no HBM figure.
            notes.append(f"GPU {gpu.index}: HBM not measured: MIG mode is on")
        elif device is None:
            notes.append(f"GPU {gpu.index}: HBM not measured: {backend.name} does not see it")
        else:
            try:
                seconds = backend.time_copies(device, nbytes, iterations)
            except Exception as e:  # out of memory on a busy GPU, a CUDA error: this GPU only
                log.warning("GPU %d: HBM copy benchmark failed: %s", gpu.index, e)
                notes.append(f"GPU {gpu.index}: HBM not measured: {type(e).__name__}: {e}")
                out.append(gpu)
                continue
            if seconds > 0:
                gbps = round(copy_gbps(nbytes, iterations, seconds), 1)
                out.append(replace(gpu, measured_hbm_gbps=gbps))
                continue
            notes.append(f"GPU {gpu.index}: HBM not measured: the copies took no time")
        out.append(gpu)
    return HbmResult(gpus=tuple(out), notes=tuple(notes))


# -- real backends (imported lazily: neither framework is a dependency) ---------------------


def _pci(domain: int, bus: int, device: int) -> str:
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


class TorchBackend:
    name = "PyTorch"

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    def device_keys(self) -> list[list[str]]:
        keys = []
        for i in range(self._torch.cuda.device_count()):
            props = self._torch.cuda.get_device_properties(i)
            ids = []
            if getattr(props, "uuid", None) is not None:
                ids.append(f"gpu-{props.uuid}".lower())
            if hasattr(props, "pci_bus_id") and hasattr(props, "pci_domain_id"):
                ids.append(_pci(props.pci_domain_id, props.pci_bus_id, props.pci_device_id))
            keys.append(ids)
        return keys

    def time_copies(self, device: int, nbytes: int, iterations: int) -> float:
        t = self._torch
        with t.cuda.device(device):
            src = t.empty(nbytes, dtype=t.uint8, device=f"cuda:{device}")
            dst = t.empty_like(src)
            for _ in range(WARMUP_COPIES):
                dst.copy_(src)
            start = t.cuda.Event(enable_timing=True)
            end = t.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                dst.copy_(src)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            del src, dst
            t.cuda.empty_cache()  # give the memory back before the next GPU, or to jobs
        return ms / 1000


class CupyBackend:
    name = "CuPy"

    def __init__(self, cupy: Any) -> None:
        self._cp = cupy

    def device_keys(self) -> list[list[str]]:
        rt = self._cp.cuda.runtime
        keys = []
        for i in range(rt.getDeviceCount()):
            ids = [rt.deviceGetPCIBusId(i).lower()]
            raw = rt.getDeviceProperties(i).get("uuid", b"")
            if isinstance(raw, bytes) and len(raw) == 16:
                h = raw.hex()
                ids.append(f"gpu-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
            keys.append(ids)
        return keys

    def time_copies(self, device: int, nbytes: int, iterations: int) -> float:
        cp = self._cp
        with cp.cuda.Device(device):
            src = cp.empty(nbytes, dtype=cp.uint8)
            dst = cp.empty_like(src)
            for _ in range(WARMUP_COPIES):
                dst.data.copy_from_device_async(src.data, nbytes)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(iterations):
                dst.data.copy_from_device_async(src.data, nbytes)
            end.record()
            end.synchronize()
            ms = cp.cuda.get_elapsed_time(start, end)
            del src, dst
            cp.get_default_memory_pool().free_all_blocks()
        return ms / 1000


def load_backend() -> CopyBackend | None:
    """PyTorch if it imports and sees a CUDA device, else CuPy likewise, else None."""
    try:
        import torch  # optional, and slow to import: only when measuring

        if torch.cuda.is_available():
            return TorchBackend(torch)
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return CupyBackend(cupy)
    except ImportError:
        pass
    except Exception as e:  # CuPy raises its own CUDARuntimeError when there is no driver
        log.info("CuPy found no usable CUDA device: %s", e)
    return None
