"""The agent's probes and flag parsers: fake SKUs match the GPU catalog, bad specs are refused
with a message that says what would be accepted."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpuctl.agent.probe import (
    FakeProbe,
    NodeFacts,
    PsutilProbe,
    SpecError,
    fake_profile,
    gpu_skus,
    parse_cpus,
    parse_fake_gpus,
    parse_memory,
    parse_network,
)
from gpuctl.core.model import BandwidthProfile, NetKind, Network

MEASURED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FixedHost:
    """A host probe with fixed answers, so profiles do not depend on the test machine."""

    def probe(self) -> NodeFacts:
        return NodeFacts(
            hostname="host-1",
            cpu_milli=96_000,
            memory_mib=2_000_000,
            profile=BandwidthProfile(
                network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
                source="psutil",
                measured_at=MEASURED,
            ),
        )


# spec, model, count, MiB per GPU, HBM GB/s, NVLink GB/s, node BF16 TFLOPS, PCIe gen
SKU_CASES = [
    ("h100-sxm:8", "H100 SXM", 8, 81559, 3350, 900, 7915.2, 5),  # 8 x 989.4
    ("h100", "H100 SXM", 1, 81559, 3350, 900, 989.4, 5),  # alias, count defaults to 1
    ("h200", "H200 SXM", 1, 143771, 4800, 900, 989.4, 5),
    ("h200:8", "H200 SXM", 8, 143771, 4800, 900, 7915.2, 5),
    ("a100-80g-sxm:8", "A100 80GB SXM", 8, 81920, 2039, 600, 2496.0, 4),  # 8 x 312
    ("a100-40g", "A100 40GB", 1, 40960, 1555, 600, 312.0, 4),
    ("l40s:4", "L40S", 4, 46068, 864, 0, 1448.2, 4),  # 4 x 362.05; PCIe card: no NVLink
    ("l4:1", "L4", 1, 23034, 300, 0, 121.0, 4),
    ("h100-pcie", "H100 PCIe", 1, 81559, 2000, 0, 756.5, 5),  # bridges not modelled
    ("a10g", "A10G", 1, 23028, 600, 0, 70.0, 4),
    ("t4", "T4", 1, 15360, 320, 0, 0.0, 3),  # no BF16 on Turing
    ("mi300x", "MI300X", 1, 192 * 1024, 5300, 896, 1307.4, 5),  # catalog GiB x 1024
    ("MI300X:8", "MI300X", 8, 192 * 1024, 5300, 896, 10459.2, 5),  # case-insensitive
]


@pytest.mark.parametrize(
    ("spec", "model", "count", "memory_mib", "hbm", "nvlink", "tflops", "pcie_gen"),
    SKU_CASES,
    ids=[c[0] for c in SKU_CASES],
)
def test_fake_gpu_profile(
    spec: str,
    model: str,
    count: int,
    memory_mib: int,
    hbm: float,
    nvlink: float,
    tflops: float,
    pcie_gen: int,
) -> None:
    facts = FakeProbe(spec, node_name="n7", host=FixedHost()).probe()
    p = facts.profile
    assert [g.model for g in p.gpus] == [model] * count
    assert {g.memory_mib for g in p.gpus} == {memory_mib}
    assert p.hbm_gbps == hbm
    assert p.nvlink_gbps == nvlink
    assert p.nvlink_domain_size == (count if nvlink else 0)
    assert p.bf16_tflops == pytest.approx(tflops)
    assert (p.pcie_gen, p.pcie_width) == (pcie_gen, 16)
    assert p.source == "fake"


def test_fake_profile_keeps_host_facts_and_has_stable_uuids() -> None:
    facts = FakeProbe("h100-sxm:2", node_name="n7", host=FixedHost()).probe()
    assert (facts.hostname, facts.cpu_milli, facts.memory_mib) == ("host-1", 96_000, 2_000_000)
    assert facts.profile.network == Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400)
    assert facts.profile.measured_at == MEASURED
    assert [g.uuid for g in facts.profile.gpus] == ["GPU-fake-n7-0", "GPU-fake-n7-1"]
    assert [g.index for g in facts.profile.gpus] == [0, 1]
    again = fake_profile(parse_fake_gpus("h100-sxm:2"), node_name="n7")
    assert again.gpus == facts.profile.gpus


def test_every_short_name_is_in_the_catalog() -> None:
    skus = gpu_skus()
    for name in ("h100-sxm", "h200", "a100-80g-sxm", "a100-40g", "l40s", "l4", "h100-pcie"):
        assert name in skus
    for sku in skus.values():
        assert sku.memory_mib > 0 and sku.hbm_gbps > 0


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("x100:8", "unknown GPU 'x100'"),
        ("", "unknown GPU ''"),
        ("h100-sxm:0", "bad GPU count '0'"),
        ("h100-sxm:eight", "bad GPU count 'eight'"),
        ("h100-sxm:-1", "bad GPU count '-1'"),
        ("h100-sxm:65", "want 1..64"),
    ],
    ids=["unknown", "empty", "zero", "word", "negative", "too-many"],
)
def test_fake_gpus_errors(spec: str, needle: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_fake_gpus(spec)
    assert needle in str(e.value)


def test_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(SpecError) as e:
        parse_fake_gpus("b200:8")
    assert "known: " in str(e.value)
    assert "h100-sxm" in str(e.value) and "mi300x" in str(e.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("infiniband:8x400", Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400)),
        ("ib:4x200", Network(kind=NetKind.INFINIBAND, ports=4, gbps_per_port=200)),
        ("roce:2x200", Network(kind=NetKind.ROCE, ports=2, gbps_per_port=200)),
        ("ethernet:1x100", Network(kind=NetKind.ETHERNET, ports=1, gbps_per_port=100)),
        ("Ethernet:1x25.5", Network(kind=NetKind.ETHERNET, ports=1, gbps_per_port=25.5)),
        ("none", Network()),
        (" NONE ", Network()),
    ],
    ids=["ib", "ib-alias", "roce", "ethernet", "fractional", "none", "none-padded"],
)
def test_parse_network(spec: str, expected: Network) -> None:
    assert parse_network(spec) == expected


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("myrinet:1x10", "unknown network kind 'myrinet'"),
        ("infiniband", "want KIND:PORTSxGBPS"),
        ("infiniband:8", "want KIND:PORTSxGBPS"),
        ("infiniband:x400", "want KIND:PORTSxGBPS"),
        ("infiniband:8x", "want KIND:PORTSxGBPS"),
        ("infiniband:0x400", "must be positive"),
        ("roce:2x0", "must be positive"),
        ("", "unknown network kind ''"),
    ],
    ids=["kind", "no-links", "no-speed", "no-ports", "no-gbps", "zero-ports", "zero-gbps", "empty"],
)
def test_parse_network_errors(spec: str, needle: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_network(spec)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("spec", "mib"),
    [
        ("512GiB", 512 * 1024),
        ("512G", 512 * 1024),
        ("512gb", 512 * 1024),
        ("1TiB", 1024 * 1024),
        ("1.5T", 1536 * 1024),
        ("65536", 65536),
        ("4096MiB", 4096),
    ],
)
def test_parse_memory(spec: str, mib: int) -> None:
    assert parse_memory(spec) == mib


@pytest.mark.parametrize("spec", ["", "lots", "0GiB", "-1G", "5PiB", "12 apples"])
def test_parse_memory_errors(spec: str) -> None:
    with pytest.raises(SpecError, match="bad memory size"):
        parse_memory(spec)


@pytest.mark.parametrize(("spec", "milli"), [("64", 64_000), ("7.5", 7_500), (2, 2_000)])
def test_parse_cpus(spec: str | float, milli: int) -> None:
    assert parse_cpus(spec) == milli


@pytest.mark.parametrize("spec", ["", "many", "0", "-4", "nan", "inf"])
def test_parse_cpus_errors(spec: str) -> None:
    with pytest.raises(SpecError, match="bad CPU count"):
        parse_cpus(spec)


def test_psutil_probe_is_a_cpu_only_node() -> None:
    facts = PsutilProbe(hostname="box", now=lambda: MEASURED).probe()
    assert facts.hostname == "box"
    assert facts.cpu_milli >= 1000 and facts.cpu_milli % 1000 == 0
    assert facts.memory_mib > 0
    assert facts.profile.gpus == ()
    assert facts.profile.measured_at == MEASURED


def test_psutil_probe_overrides() -> None:
    net = parse_network("roce:2x200")
    facts = PsutilProbe(network=net, cpu_milli=8000, memory_mib=1024).probe()
    assert (facts.cpu_milli, facts.memory_mib, facts.profile.network) == (8000, 1024, net)
