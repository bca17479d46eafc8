"""The HBM copy benchmark's arithmetic and its "not measured" paths, through a hand-written
copy backend: no GPU framework is needed, and none is installed here."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pytest

from gpuctl.agent.membench import GIB, copy_gbps, load_backend, measure_hbm
from gpuctl.core.model import Gpu


def gpu(index: int, *, model: str = "H100 SXM", mig: bool = False) -> Gpu:
    return Gpu(
        index=index,
        uuid=f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd",
        model=model,
        memory_mib=81559,
        hbm_gbps=3352.3,
        pci_bus_id=f"0000:{0x18 + index:02x}:00.0",
        mig_enabled=mig,
    )


class FakeBackend:
    """Copies that take `seconds[device]`; records what was asked for."""

    name = "FakeTorch"

    def __init__(
        self,
        seconds: Sequence[float],
        keys: Sequence[Sequence[str]] | None = None,
        fail: dict[int, Exception] | None = None,
    ) -> None:
        self.seconds = list(seconds)
        default = [[gpu(i).uuid.lower()] for i in range(len(seconds))]
        self.keys = keys if keys is not None else default
        self.fail = fail or {}
        self.asked: list[tuple[int, int, int]] = []

    def device_keys(self) -> Sequence[Sequence[str]]:
        return self.keys

    def time_copies(self, device: int, nbytes: int, iterations: int) -> float:
        self.asked.append((device, nbytes, iterations))
        if device in self.fail:
            raise self.fail[device]
        return self.seconds[device]


def test_copy_gbps_counts_read_and_write() -> None:
    # 50 copies of 1 GiB in 25 ms: 2 x 1,073,741,824 x 50 / 0.025 s = 4294.97 GB/s
    assert copy_gbps(GIB, 50, 0.025) == pytest.approx(4294.967296)
    # 8.6 GB read + written in 2.0 ms is 4.3 TB/s
    assert copy_gbps(4_300_000_000, 1, 0.002) == pytest.approx(4300.0)


def test_measured_per_gpu() -> None:
    backend = FakeBackend([0.025, 0.050])

    result = measure_hbm([gpu(0), gpu(1)], backend, nbytes=GIB, iterations=50)

    assert [g.measured_hbm_gbps for g in result.gpus] == [4295.0, 2147.5]
    assert [g.hbm_gbps for g in result.gpus] == [3352.3, 3352.3]  # theoretical untouched
    assert backend.asked == [(0, GIB, 50), (1, GIB, 50)]
    assert result.notes == ()


def test_without_a_framework_nothing_is_measured() -> None:
    result = measure_hbm([gpu(0), gpu(1)], None)

    assert [g.measured_hbm_gbps for g in result.gpus] == [None, None]
    assert result.notes == (
        "HBM not measured: neither PyTorch nor CuPy with a CUDA device is importable",
    )


def test_cuda_order_is_matched_by_uuid_or_bus_id() -> None:
    # CUDA numbers devices fastest-first: here GPU 1 is CUDA device 0.
    backend = FakeBackend([0.025, 0.050], keys=[[gpu(1).pci_bus_id], [gpu(0).uuid.lower()]])

    result = measure_hbm([gpu(0), gpu(1)], backend, nbytes=GIB, iterations=50)

    assert [g.measured_hbm_gbps for g in result.gpus] == [2147.5, 4295.0]


def test_position_is_trusted_only_on_a_one_model_node() -> None:
    same = measure_hbm([gpu(0), gpu(1)], FakeBackend([0.025, 0.05], keys=[[], []]))
    mixed = measure_hbm([gpu(0), gpu(1, model="L4")], FakeBackend([0.025, 0.05], keys=[[], []]))

    assert all(g.measured_hbm_gbps for g in same.gpus)
    assert [g.measured_hbm_gbps for g in mixed.gpus] == [None, None]
    assert mixed.notes[0] == "GPU 0: HBM not measured: FakeTorch does not see it"


def test_mig_gpus_a_failed_copy_and_a_hidden_gpu_are_not_measured() -> None:
    backend = FakeBackend(
        [0.025, 0.025, 0.025],
        fail={1: RuntimeError("CUDA out of memory")},
    )
    gpus = [gpu(0, mig=True), gpu(1), gpu(2), gpu(3)]  # GPU 3: not visible to CUDA

    result = measure_hbm(gpus, backend, nbytes=GIB, iterations=50)

    assert [g.measured_hbm_gbps for g in result.gpus] == [None, None, 4295.0, None]
    assert result.notes == (
        "GPU 0: HBM not measured: MIG mode is on",
        "GPU 1: HBM not measured: RuntimeError: CUDA out of memory",
        "GPU 3: HBM not measured: FakeTorch does not see it",
    )
    assert [device for device, _, _ in backend.asked] == [1, 2]  # never on the MIG GPU


def test_a_copy_that_took_no_time_is_not_a_number() -> None:
    result = measure_hbm([gpu(0)], FakeBackend([0.0]))
    assert result.gpus[0].measured_hbm_gbps is None
    assert result.notes == ("GPU 0: HBM not measured: the copies took no time",)


def test_load_backend_without_torch_or_cupy(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert load_backend() is None
