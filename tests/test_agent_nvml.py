"""The NVML probe through a hand-written FakeNvml: per-board table tests (HBM from clocks x bus
width against the datasheets, NVLink links, version and domain, PCIe, MIG), the faults (a link
down, no driver) and the fake's fidelity to the installed pynvml."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pynvml
import pytest

from gpuctl.agent import fakenvml
from gpuctl.agent.fakenvml import FakeNvml, fake_board, fake_nvml
from gpuctl.agent.main import main
from gpuctl.agent.membench import HbmResult
from gpuctl.agent.nvml import (
    NVLINK_GENERATION,
    NvLinkEnd,
    NvmlProbe,
    catalog_model,
    nvlink_domain_size,
    theoretical_hbm_gbps,
)
from gpuctl.agent.probe import NodeFacts, SpecError, datasheet, profile_dict, profile_table
from gpuctl.core.model import BandwidthProfile, Gpu, NetKind, Network
from tests.nvml_fixtures import BOARDS, H100_SXM_8, L4_1, ndr_ports, write_sysfs

PROBED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FixedHost:
    """The host half of a probe with fixed answers, so profiles do not depend on this machine."""

    def probe(self) -> NodeFacts:
        return NodeFacts(
            hostname="node-1",
            cpu_milli=224_000,
            memory_mib=2_000_000,
            profile=BandwidthProfile(source="psutil", measured_at=PROBED),
        )


def probe(nvml: FakeNvml, root: Path, *, network: Network | None = None, hbm=None) -> NodeFacts:
    return NvmlProbe(
        host=FixedHost(),
        nvml=nvml,
        sysfs_root=root,
        network=network,
        nics=lambda: (),
        hbm=hbm,
        cpu_count=224,
    ).probe()


# board, model, count, MiB, HBM GB/s (clock x width), links per GPU, NVLink gen, NVLink GB/s,
# domain, PCIe max gen, node BF16 TFLOPS (datasheet x count)
BOARD_CASES = [
    # 2 x 2619 MHz x 5120 bit / 8 = 3352.3 GB/s; 18 x 50 = 900; 8 x 989.4 = 7915.2
    ("h100-sxm-8", "H100 SXM", 8, 81559, 3352.3, 18, 4, 900, 8, 5, 7915.2),
    # 2 x 3201 x 6144 / 8 = 4916.7
    ("h200-8", "H200 SXM", 8, 143771, 4916.7, 18, 4, 900, 8, 5, 7915.2),
    # 2 x 1593 x 5120 / 8 = 2039.0; 12 x 50 = 600; 8 x 312 = 2496
    ("a100-80g-sxm-8", "A100 80GB SXM", 8, 81920, 2039.0, 12, 3, 600, 8, 4, 2496.0),
    # 2 x 9001 x 384 / 8 = 864.1; no NVLink; 4 x 362.05 = 1448.2
    ("l40s-4", "L40S", 4, 46068, 864.1, 0, 0, 0, 0, 4, 1448.2),
    # 2 x 6251 x 192 / 8 = 300.0
    ("l4-1", "L4", 1, 23034, 300.0, 0, 0, 0, 0, 4, 121.0),
]


@pytest.mark.parametrize(
    ("board", "model", "count", "mib", "hbm", "links", "gen", "nvlink", "domain", "pcie", "tflops"),
    BOARD_CASES,
    ids=[c[0] for c in BOARD_CASES],
)
def test_board_profile(
    tmp_path, board, model, count, mib, hbm, links, gen, nvlink, domain, pcie, tflops
) -> None:
    nvml = FakeNvml(gpus=BOARDS[board])

    facts = probe(nvml, tmp_path)

    p = facts.profile
    assert (p.source, p.measured_at, facts.hostname) == ("nvml", PROBED, "node-1")
    assert [g.model for g in p.gpus] == [model] * count
    assert [g.index for g in p.gpus] == list(range(count))
    assert {g.memory_mib for g in p.gpus} == {mib}
    assert {g.hbm_gbps for g in p.gpus} == {hbm}
    assert {(g.nvlink_links_active, g.nvlink_links_total) for g in p.gpus} == {(links, links)}
    assert {g.nvlink_version for g in p.gpus} == {gen}
    assert {g.nvlink_gbps for g in p.gpus} == {nvlink}
    assert p.nvlink_domain_size == domain
    assert (p.pcie_gen, p.pcie_width) == (pcie, 16)
    assert p.bf16_tflops == tflops
    assert all(g.measured_hbm_gbps is None for g in p.gpus)  # not asked to measure
    assert not any(g.mig_enabled for g in p.gpus)
    assert len({g.uuid for g in p.gpus}) == count
    assert nvml.inits == nvml.shutdowns == 1  # NVML is let go after every probe


# NVIDIA's datasheet figure; 1% is the tolerance the published clocks allow for rounding.
DATASHEET_CASES = [
    ("h100-sxm", 3352, 0.01),  # "3.35 TB/s"
    ("a100-80g-sxm", 2039, 0.01),
    ("l40s", 864, 0.01),
    ("l4", 300, 0.01),
    # NVIDIA says 4.8 TB/s; the 3201 MHz memory clock an H200 here showed gives 4917 GB/s. The
    # clock a real H200 reports is for scripts/device-check.sh to confirm.
    ("h200", 4800, 0.025),
]


@pytest.mark.parametrize(
    ("part", "gbps", "tolerance"), DATASHEET_CASES, ids=[c[0] for c in DATASHEET_CASES]
)
def test_theoretical_hbm_is_near_the_datasheet(part: str, gbps: float, tolerance: float) -> None:
    spec = fakenvml.PARTS[part]
    assert theoretical_hbm_gbps(spec.max_mem_clock_mhz, spec.bus_width_bits) == pytest.approx(
        gbps, rel=tolerance
    )


def test_theoretical_hbm_arithmetic() -> None:
    # 2 transfers x 2619e6 /s x 5120 bit / 8 bit per byte = 3,352,320,000,000 B/s
    assert theoretical_hbm_gbps(2619, 5120) == 3352.3
    assert theoretical_hbm_gbps(0, 5120) == 0.0


@pytest.mark.parametrize(
    ("constant", "generation"),
    [
        ("NVML_NVLINK_VERSION_1_0", 1),
        ("NVML_NVLINK_VERSION_2_0", 2),
        ("NVML_NVLINK_VERSION_2_2", 2),
        ("NVML_NVLINK_VERSION_3_0", 3),
        ("NVML_NVLINK_VERSION_3_1", 3),
        ("NVML_NVLINK_VERSION_4_0", 4),
        ("NVML_NVLINK_VERSION_5_0", 5),
        ("NVML_NVLINK_VERSION_6_0", 6),
    ],
)
def test_nvlink_version_enum_maps_to_the_generation(constant: str, generation: int) -> None:
    # The installed pynvml's enum value, not our copy of it: an H100 answers 6, not 4.
    assert NVLINK_GENERATION[getattr(pynvml, constant)] == generation


def test_fake_nvml_matches_the_installed_pynvml() -> None:
    constants = [n for n in dir(fakenvml) if n.startswith("NVML_")]
    assert constants
    assert {n: getattr(fakenvml, n) for n in constants} == {
        n: getattr(pynvml, n) for n in constants
    }
    functions = [n for n in dir(FakeNvml) if n.startswith("nvml")]
    assert [n for n in functions if not callable(getattr(pynvml, n, None))] == []


def test_a_link_down_shows_on_that_gpu_only(tmp_path) -> None:
    facts = probe(FakeNvml(gpus=BOARDS["h100-link-down"]), tmp_path)

    gpus = facts.profile.gpus
    assert (gpus[3].nvlink_links_active, gpus[3].nvlink_links_total) == (17, 18)
    assert gpus[3].nvlink_gbps == 850  # 17 x 50
    assert {(g.nvlink_links_active, g.nvlink_gbps) for i, g in enumerate(gpus) if i != 3} == {
        (18, 900)
    }
    assert facts.profile.nvlink_gbps == 850  # the node's figure is its weakest GPU's
    assert facts.profile.nvlink_domain_size == 8  # the other 17 links still reach the switches
    assert "GPU 3: NVLink 17/18 links active" in facts.notes


def test_mig_mode_per_gpu(tmp_path) -> None:
    a100 = probe(FakeNvml(gpus=BOARDS["a100-mig"]), tmp_path).profile.gpus
    l40s = probe(FakeNvml(gpus=BOARDS["l40s-4"]), tmp_path).profile.gpus

    assert [g.mig_enabled for g in a100] == [True, True] + [False] * 6
    assert [g.mig_enabled for g in l40s] == [False] * 4  # NotSupported: no MIG on the part


def test_nvlink_peers_are_the_switches_and_pci_ids_are_canonical(tmp_path) -> None:
    gpu = probe(FakeNvml(gpus=H100_SXM_8), tmp_path).profile.gpus[0]

    assert gpu.pci_bus_id == "0000:18:00.0"  # NVML says 00000000:18:00.0
    assert gpu.nvlink_peers == ("0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0")


SW = "switch"


def _ends(*pairs: tuple[str, str]) -> tuple[NvLinkEnd, ...]:
    return tuple(NvLinkEnd(bus_id=b, kind=k) for b, k in pairs)


DOMAIN_CASES = [
    ("nvswitch-board", [(f"g{i}", _ends(("s0", SW), ("s1", SW))) for i in range(8)], 8),
    ("no-links", [("g0", ()), ("g1", ())], 0),
    ("one-gpu-on-a-switch", [("g0", _ends(("s0", SW)))], 1),
    (
        "two-bridged-pairs",  # PCIe cards with NVLink bridges: 0-1 and 2-3
        [
            ("g0", _ends(("g1", "gpu"))),
            ("g1", _ends(("g0", "gpu"))),
            ("g2", _ends(("g3", "gpu"))),
            ("g3", _ends(("g2", "gpu"))),
        ],
        2,
    ),
    (
        "two-switch-planes",  # 0-3 on one switch, 4-7 on another: two islands of 4
        [(f"g{i}", _ends(("s0" if i < 4 else "s1", SW))) for i in range(8)],
        4,
    ),
    (
        "kind-unknown",  # old driver: a local GPU's bus id is a GPU, anything else a switch
        [
            ("g0", _ends(("g1", "unknown"))),
            ("g1", _ends(("g0", "unknown"))),
            ("g2", _ends(("", "unknown"))),
            ("g3", _ends(("", "unknown"))),
            ("g4", _ends(("", "unknown"))),
        ],
        3,
    ),
    (
        "hybrid-cube-mesh",  # DGX-1: every GPU reaches every other through some path
        [
            (f"g{i}", _ends((f"g{(i + 1) % 8}", "gpu"), (f"g{(i + 4) % 8}", "gpu")))
            for i in range(8)
        ],
        8,
    ),
]


@pytest.mark.parametrize(
    ("gpus", "size"), [c[1:] for c in DOMAIN_CASES], ids=[c[0] for c in DOMAIN_CASES]
)
def test_nvlink_domain_size(gpus, size: int) -> None:
    assert nvlink_domain_size(gpus) == size


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10G", "A10G"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2 32GB"),
        ("NVIDIA H200 NVL", None),  # a PCIe card: not the SXM row
        ("NVIDIA L40", None),  # not the L4 nor the L40S
        ("NVIDIA B200", None),
    ],
)
def test_catalog_model(name: str, model: str | None) -> None:
    assert catalog_model(name) == model
    if model:
        assert datasheet(model, "hbm_gbps") > 0  # every mapped name has its catalog row


def test_unknown_part_keeps_nvml_name_and_no_invented_tflops(tmp_path) -> None:
    b200 = replace(L4_1[0], name="NVIDIA B200")

    facts = probe(FakeNvml(gpus=(b200,)), tmp_path)

    assert facts.profile.gpus[0].model == "B200"
    assert facts.profile.bf16_tflops == 0
    assert any("'NVIDIA B200' has no datasheet row" in n for n in facts.notes)


def test_no_memory_clock_falls_back_to_the_datasheet(tmp_path) -> None:
    gpu = replace(H100_SXM_8[0], max_mem_clock_mhz=None)

    facts = probe(FakeNvml(gpus=(gpu,)), tmp_path)

    assert facts.profile.gpus[0].hbm_gbps == 3350  # gpu_specs.csv's H100 SXM row
    assert any("datasheet HBM" in n for n in facts.notes)


def test_numa_and_cpus_come_from_sysfs_over_nvml(tmp_path) -> None:
    write_sysfs(tmp_path, pci={"0000:18:00.0": (1, "8-15")})

    gpus = probe(FakeNvml(gpus=H100_SXM_8[:2]), tmp_path).profile.gpus

    assert (gpus[0].numa_node, gpus[0].cpu_affinity) == (1, "8-15")  # the kernel's answer
    assert (gpus[1].numa_node, gpus[1].cpu_affinity) == (0, "0-55,112-167")  # NVML's mask


def test_locality_unknown_everywhere(tmp_path) -> None:
    gpu = replace(L4_1[0], numa_node=None, cpu_affinity="")

    facts = probe(FakeNvml(gpus=(gpu,)), tmp_path)

    assert (facts.profile.gpus[0].numa_node, facts.profile.gpus[0].cpu_affinity) == (-1, "")


def test_ib_ports_from_sysfs_make_the_network_and_net_overrides(tmp_path) -> None:
    write_sysfs(tmp_path, ports=ndr_ports(8))
    nvml = FakeNvml(gpus=H100_SXM_8)

    found = probe(nvml, tmp_path).profile
    forced = probe(nvml, tmp_path, network=Network(kind=NetKind.ROCE, ports=2, gbps_per_port=200))

    assert found.network == Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400)
    assert (found.ib_ports[0].device, found.ib_ports[0].rate_gbps, found.ib_ports[0].state) == (
        "mlx5_0",
        400,
        "ACTIVE",
    )
    assert len(found.ib_ports) == 8
    assert forced.profile.network == Network(kind=NetKind.ROCE, ports=2, gbps_per_port=200)
    assert len(forced.profile.ib_ports) == 8  # the ports are still reported


def test_measured_hbm_comes_from_the_injected_benchmark(tmp_path) -> None:
    def hbm(gpus: tuple[Gpu, ...]) -> HbmResult:
        measured = tuple(replace(g, measured_hbm_gbps=3000.0 + g.index) for g in gpus[:-1])
        return HbmResult(gpus=(*measured, gpus[-1]), notes=("GPU 7: HBM not measured: busy",))

    facts = probe(FakeNvml(gpus=H100_SXM_8), tmp_path, hbm=hbm)

    assert [g.measured_hbm_gbps for g in facts.profile.gpus] == [
        3000.0, 3001.0, 3002.0, 3003.0, 3004.0, 3005.0, 3006.0, None,
    ]  # fmt: skip
    assert "GPU 7: HBM not measured: busy" in facts.notes


# -- no driver: a CPU node, one log line, never a crash --------------------------------------


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (fakenvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver: libnvidia-ml.so.1 not found"),
        (fakenvml.NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA driver is not loaded"),
        (fakenvml.NVML_ERROR_NO_PERMISSION, "NVML did not start: Insufficient Permissions"),
    ],
)
def test_no_driver_is_a_cpu_node(tmp_path, caplog, error: int, why: str) -> None:
    write_sysfs(tmp_path, ports=ndr_ports(2))
    prober = NvmlProbe(
        host=FixedHost(), nvml=FakeNvml(init_error=error), sysfs_root=tmp_path, nics=lambda: ()
    )

    with caplog.at_level(logging.INFO, logger="gpuctl.agent.nvml"):
        first, second = prober.probe(), prober.probe()

    assert first == second
    assert first.profile.gpus == ()
    assert (first.profile.source, first.cpu_milli) == ("psutil", 224_000)
    assert first.profile.network == Network(kind=NetKind.INFINIBAND, ports=2, gbps_per_port=400)
    assert first.notes == (f"{why}: a CPU-only node",)
    assert [r.getMessage() for r in caplog.records] == [f"{why}: registering as a CPU-only node"]


def test_no_pynvml_is_a_cpu_node(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError

    facts = NvmlProbe(host=FixedHost(), sysfs_root=tmp_path, nics=lambda: ()).probe()

    assert facts.profile.gpus == ()
    assert facts.notes[0].startswith("pynvml (nvidia-ml-py) is not installed")


def test_no_gpus_and_a_lost_gpu(tmp_path) -> None:
    none = probe(FakeNvml(gpus=()), tmp_path)
    assert (none.profile.gpus, none.notes) == ((), ("NVML sees no GPUs: a CPU-only node",))

    class LostGpu3(FakeNvml):
        def nvmlDeviceGetName(self, handle):
            if handle is self.gpus[3]:
                raise fakenvml.NVMLError(fakenvml.NVML_ERROR_GPU_IS_LOST)
            return super().nvmlDeviceGetName(handle)

    nvml = LostGpu3(gpus=H100_SXM_8)
    facts = probe(nvml, tmp_path)
    assert [g.index for g in facts.profile.gpus] == [0, 1, 2, 4, 5, 6, 7]
    assert nvml.inits == nvml.shutdowns == 1


# -- `gpuctl-agent profile` -------------------------------------------------------------------


def test_profile_json_and_table_of_a_fake_board(capsys) -> None:
    assert main(["profile", "--fake-nvml", "h100-sxm:8", "-o", "json", "--name", "n1"]) == 0
    data = json.loads(capsys.readouterr().out)

    assert data["source"] == "nvml"
    assert (data["gpu_count"], data["gpu_model"], data["nvlink_domain_size"]) == (8, "H100 SXM", 8)
    gpu = data["gpus"][0]
    assert (gpu["hbm_gbps_theoretical"], gpu["hbm_gbps_measured"]) == (3352.3, None)
    assert gpu["nvlink"] == {
        "links_active": 18,
        "links_total": 18,
        "version": 4,
        "gbps": 900,
        "peers": ["0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0"],
    }
    assert gpu["pcie"] == {"gen": 5, "width": 16, "max_gen": 5, "max_width": 16}
    assert (gpu["numa_node"], gpu["cpu_affinity"], gpu["mig_enabled"]) == (0, "0-55,112-167", False)

    assert main(["profile", "--fake-nvml", "l4", "--fabric", "eth-a/s1/l1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "GPUs:          1 x L4" in out
    assert "Fabric:        eth-a/s1/l1" in out
    row = next(line for line in out if line.startswith("0 "))
    assert row.split()[:6] == ["0", "L4", "22.5GiB", "300", "not", "measured"]


def test_profile_with_fake_gpus(capsys) -> None:
    assert main(["profile", "--fake-gpus", "h100-sxm:8", "--net", "infiniband:8x400"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Source:        fake, probed" in out[1]
    assert "Network:       infiniband, 8 x 400 Gb/s (3200 Gb/s)" in out


def test_profile_bad_flags_are_one_line_and_exit_2(capsys) -> None:
    assert main(["profile", "--fake-nvml", "b300:8"]) == 2
    assert main(["profile", "--fake-nvml", "l4", "--fake-gpus", "l4"]) == 2
    assert main(["profile", "-o", "yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gpuctl-agent profile: unknown part 'b300'")
    assert err[1] == "gpuctl-agent profile: --fake-nvml and --fake-gpus: give one or the other"
    assert "invalid choice: 'yaml'" in err[2]


def test_fake_nvml_spec() -> None:
    assert len(fake_nvml("a100-80g-sxm:8").gpus) == 8
    assert len(fake_nvml("L4").gpus) == 1
    with pytest.raises(SpecError, match=r"want 1\.\.8"):
        fake_nvml("h100-sxm:9")


def test_profile_rendering_of_a_cpu_node() -> None:
    facts = replace(FixedHost().probe(), notes=("no NVIDIA driver: a CPU-only node",))

    text = profile_table(facts)
    data = profile_dict(facts)

    assert "GPUs:          none (CPU-only node)" in text.splitlines()
    assert text.splitlines()[-1] == "  no NVIDIA driver: a CPU-only node"
    assert (data["gpus"], data["network"]["kind"], data["source"]) == ([], "none", "psutil")


def test_fake_board_is_stable_per_node() -> None:
    assert fake_board("h100-sxm", 2, node="a") == fake_board("h100-sxm", 2, node="a")
    assert (
        fake_board("h100-sxm", 1, node="a")[0].uuid != fake_board("h100-sxm", 1, node="b")[0].uuid
    )
