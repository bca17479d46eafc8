"""Hostile input from agents, clients and the CLI: every bad value is a named violation (or one
`error:` line), never a crash, an INTERNAL error or a row the store cannot read back."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpuctl.api import convert
from gpuctl.api._pb.v1 import nodes_pb2
from gpuctl.api.jobfile import JobFileError, load_job_file, spec_from_mapping
from gpuctl.cli.main import cli
from gpuctl.client import Client
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    IbPort,
    JobKind,
    JobSpec,
    NetKind,
    Network,
    Node,
    NodeState,
)
from gpuctl.core.validation import (
    MAX_NODE_GPUS,
    MAX_VIOLATIONS_SHOWN,
    health_issue_violations,
    node_violations,
    profile_violations,
    spec_violations,
    validate_node,
    validate_profile,
)
from gpuctl.store import SqlStore, open_store
from gpuctl.store.mapping import node_from_row, node_values
from gpuctl.store.tables import NodeRow
from tests.test_store_contract import node as full_node

NAN, INF = math.nan, math.inf
NEW_YORK = timezone(timedelta(hours=-5))


# -- builders -----------------------------------------------------------------------------


def with_profile(**changes: Any) -> Callable[[Node], Node]:
    return lambda n: replace(n, profile=replace(n.profile, **changes))


def with_gpu(i: int, **changes: Any) -> Callable[[Node], Node]:
    def change(n: Node) -> Node:
        gpus = list(n.profile.gpus)
        gpus[i] = replace(gpus[i], **changes)
        return replace(n, profile=replace(n.profile, gpus=tuple(gpus)))

    return change


def with_port(i: int, **changes: Any) -> Callable[[Node], Node]:
    def change(n: Node) -> Node:
        ports = list(n.profile.ib_ports)
        ports[i] = replace(ports[i], **changes)
        return replace(n, profile=replace(n.profile, ib_ports=tuple(ports)))

    return change


def with_network(**changes: Any) -> Callable[[Node], Node]:
    return lambda n: replace(
        n, profile=replace(n.profile, network=replace(n.profile.network, **changes))
    )


def with_node(**changes: Any) -> Callable[[Node], Node]:
    return lambda n: replace(n, **changes)


def gpu(index: int) -> Gpu:
    return Gpu(
        index=index, uuid=f"GPU-{index}", model="H100 SXM", memory_mib=81_559, hbm_gbps=3352.0
    )


# -- valid nodes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        pytest.param(full_node("n1"), id="every-field-set"),
        pytest.param(Node(id="n1", address="10.0.0.1"), id="bare-minimum"),
        pytest.param(
            Node(id="gpu-7", address="[fe80::1%eth0]:29500", fabric="ib-a"), id="ipv6-one-part"
        ),
        # The NVML agent leaves out a GPU that fell off the bus and keeps the others' indices.
        pytest.param(
            Node(id="n1", address="n1", profile=BandwidthProfile(gpus=(gpu(0), gpu(1), gpu(3)))),
            id="a-gpu-missing-keeps-indices",
        ),
        pytest.param(
            Node(
                id="n1",
                address="n1",
                profile=BandwidthProfile(gpus=tuple(gpu(i) for i in range(MAX_NODE_GPUS))),
            ),
            id="most-gpus",
        ),
        pytest.param(
            Node(
                id="n1",
                address="n1",
                price_per_hour=10_000.0,
                cpu_milli=4096 * 1000,
                memory_mib=64 * 1024 * 1024,
                profile=BandwidthProfile(
                    measured_at=datetime(2200, 12, 31, 23, 59, tzinfo=UTC), bf16_tflops=0.0
                ),
            ),
            id="at-every-upper-bound",
        ),
    ],
)
def test_a_valid_node_has_no_violations(node: Node) -> None:
    assert node_violations(node) == []
    assert validate_node(node) is node


# -- each bad field -----------------------------------------------------------------------

# (id, change to the full fixture node, the one field named, words its description holds)
BAD_NODES: list[tuple[str, Callable[[Node], Node], str, str]] = [
    ("name-empty", with_node(id=""), "node.name", "1-63 letters"),
    ("name-space", with_node(id="gpu 1"), "node.name", "1-63 letters"),
    ("name-trailing-newline", with_node(id="gpu1\n"), "node.name", "1-63 letters"),
    ("name-too-long", with_node(id="n" * 64), "node.name", "1-63 letters"),
    ("address-empty", with_node(address=""), "node.address", "is required"),
    ("address-space", with_node(address="10.0.0.1 evil"), "node.address", "spaces"),
    ("address-tab", with_node(address="10.0.0.1\t"), "node.address", "printable"),
    ("address-nul", with_node(address="10.0.0.1\x00"), "node.address", "printable"),
    ("address-too-long", with_node(address="a" * 254), "node.address", "at most 253"),
    ("fabric-too-long", with_node(fabric="ib/" * 100), "node.fabric", "at most 255"),
    ("fabric-empty-part", with_node(fabric="ib//leaf"), "node.fabric", "joined by '/'"),
    ("fabric-trailing-slash", with_node(fabric="ib/"), "node.fabric", "joined by '/'"),
    ("fabric-space", with_node(fabric="ib a/leaf"), "node.fabric", "joined by '/'"),
    ("fabric-newline", with_node(fabric="ib\n"), "node.fabric", "printable"),
    ("sku-too-long", with_node(sku="x" * 129), "node.sku", "at most 128"),
    ("region-newline", with_node(region="us\neast"), "node.region", "printable"),
    ("provider-surrogate", with_node(provider="\ud800"), "node.provider", "printable"),
    (
        "labels-too-many",
        with_node(labels=tuple((f"k{i}", "v") for i in range(65))),
        "node.labels",
        "65 entries, at most 64",
    ),
    ("label-key-empty", with_node(labels=(("", "v"),)), "node.labels[0]", "is required"),
    (
        "label-key-too-long",
        with_node(labels=(("k" * 254, "v"),)),
        "node.labels[0]",
        "at most 253",
    ),
    (
        "label-value-too-long",
        with_node(labels=(("zone", "v" * 1025),)),
        "node.labels.zone",
        "at most 1024",
    ),
    (
        "label-value-escape",
        with_node(labels=(("zone", "\x1b[2J"),)),
        "node.labels.zone",
        "printable",
    ),
    (
        "label-twice",
        with_node(labels=(("zone", "a"), ("zone", "b"))),
        "node.labels.zone",
        "given twice",
    ),
    ("cpu-negative", with_node(cpu_milli=-1), "node.cpu_milli", "got -1"),
    ("cpu-over-4096-cores", with_node(cpu_milli=4097 * 1000), "node.cpu_milli", "got 4097000"),
    ("cpu-a-float", with_node(cpu_milli=1.5), "node.cpu_milli", "must be an integer"),
    ("memory-negative", with_node(memory_mib=-1), "node.memory_mib", "got -1"),
    (
        "memory-past-int64",
        with_node(memory_mib=2**70),
        "node.memory_mib",
        "got 1180591620717411303424",
    ),
    ("memory-past-any-float", with_node(memory_mib=2**2000), "node.memory_mib", "2001 bits"),
    ("price-nan", with_node(price_per_hour=NAN), "node.price_per_hour", "finite"),
    ("price-inf", with_node(price_per_hour=INF), "node.price_per_hour", "finite"),
    ("price-negative", with_node(price_per_hour=-0.01), "node.price_per_hour", "got -0.01"),
    ("price-841m-an-hour", with_node(price_per_hour=841e6), "node.price_per_hour", "10000"),
    ("state-not-a-state", with_node(state="ready"), "node.state", "must be one of"),
    ("reason-nul", with_node(state_reason="a\x00b"), "node.state_reason", "NUL"),
    (
        "health-too-many",
        with_node(health_issues=("GPU 0: hot",) * 257),
        "node.health_issues",
        "at most 256",
    ),
    ("health-empty", with_node(health_issues=(" ",)), "node.health_issues[0]", "is empty"),
    (
        "health-too-long",
        with_node(health_issues=("x" * 1025,)),
        "node.health_issues[0]",
        "at most 1024",
    ),
    ("lease-too-long", with_node(lease_id="l" * 129), "node.lease", "at most 128"),
    (
        "registered-1999",
        with_node(registered_at=datetime(1999, 12, 31, tzinfo=UTC)),
        "node.register_time",
        "between 2000 and 2200",
    ),
    (
        "heartbeat-2201",
        with_node(last_heartbeat=datetime(2201, 1, 1, tzinfo=UTC)),
        "node.last_heartbeat_time",
        "between 2000 and 2200",
    ),
    (
        "heartbeat-naive",
        with_node(last_heartbeat=datetime(2026, 1, 1)),
        "node.last_heartbeat_time",
        "with a zone",
    ),
    # the profile
    (
        "gpus-too-many",
        with_profile(gpus=tuple(gpu(i) for i in range(65))),
        "node.profile.gpus",
        "65 entries, at most 64",
    ),
    ("gpu-index-negative", with_gpu(0, index=-1), "node.profile.gpus[0].index", "got -1"),
    ("gpu-index-64", with_gpu(7, index=64), "node.profile.gpus[7].index", "between 0 and 63"),
    ("gpu-index-repeated", with_gpu(4, index=3), "node.profile.gpus[4].index", "above 3"),
    ("gpu-index-descending", with_gpu(1, index=0), "node.profile.gpus[1].index", "above 0"),
    (
        "gpu-index-past-int32",
        with_gpu(7, index=2**31),
        "node.profile.gpus[7].index",
        "got 2147483648",
    ),
    ("gpu-uuid-twice", with_gpu(5, uuid="GPU-0000"), "node.profile.gpus[5].uuid", "given twice"),
    ("gpu-uuid-too-long", with_gpu(0, uuid="u" * 129), "node.profile.gpus[0].uuid", "at most 128"),
    ("gpu-model-newline", with_gpu(0, model="H100\n"), "node.profile.gpus[0].model", "printable"),
    (
        "gpu-memory-negative",
        with_gpu(2, memory_mib=-1),
        "node.profile.gpus[2].memory_mib",
        "got -1",
    ),
    (
        "gpu-memory-past-1tib",
        with_gpu(2, memory_mib=2 * 1024**2),
        "node.profile.gpus[2].memory_mib",
        "got 2097152",
    ),
    ("gpu-hbm-nan", with_gpu(3, hbm_gbps=NAN), "node.profile.gpus[3].hbm_gbps", "got nan"),
    ("gpu-hbm-inf", with_gpu(3, hbm_gbps=INF), "node.profile.gpus[3].hbm_gbps", "got inf"),
    ("gpu-hbm-negative", with_gpu(3, hbm_gbps=-1.0), "node.profile.gpus[3].hbm_gbps", "got -1"),
    ("gpu-hbm-huge", with_gpu(3, hbm_gbps=1e300), "node.profile.gpus[3].hbm_gbps", "1e+300"),
    ("gpu-hbm-a-string", with_gpu(3, hbm_gbps="fast"), "node.profile.gpus[3].hbm_gbps", "number"),
    ("gpu-nvlink-nan", with_gpu(0, nvlink_gbps=NAN), "node.profile.gpus[0].nvlink_gbps", "nan"),
    (
        "gpu-measured-nan",
        with_gpu(0, measured_hbm_gbps=NAN),
        "node.profile.gpus[0].measured_hbm_gbps",
        "got nan",
    ),
    (
        "gpu-measured-negative",
        with_gpu(0, measured_hbm_gbps=-INF),
        "node.profile.gpus[0].measured_hbm_gbps",
        "got -inf",
    ),
    (
        "gpu-bus-id-too-long",
        with_gpu(0, pci_bus_id="0" * 65),
        "node.profile.gpus[0].pci_bus_id",
        "64",
    ),
    (
        "gpu-links-active-negative",
        with_gpu(0, nvlink_links_active=-1),
        "node.profile.gpus[0].nvlink_links_active",
        "got -1",
    ),
    (
        "gpu-links-total-65",
        with_gpu(0, nvlink_links_total=65),
        "node.profile.gpus[0].nvlink_links_total",
        "between 0 and 64",
    ),
    (
        "gpu-nvlink-version-huge",
        with_gpu(0, nvlink_version=1000),
        "node.profile.gpus[0].nvlink_version",
        "got 1000",
    ),
    ("gpu-pcie-gen-negative", with_gpu(0, pcie_gen=-1), "node.profile.gpus[0].pcie_gen", "-1"),
    ("gpu-pcie-width-128", with_gpu(0, pcie_width=128), "node.profile.gpus[0].pcie_width", "128"),
    ("gpu-pcie-max-gen", with_gpu(0, pcie_max_gen=33), "node.profile.gpus[0].pcie_max_gen", "33"),
    (
        "gpu-pcie-max-width",
        with_gpu(0, pcie_max_width=-5),
        "node.profile.gpus[0].pcie_max_width",
        "-5",
    ),
    (
        "gpu-peers-too-many",
        with_gpu(0, nvlink_peers=("00000000:18:00.0",) * 65),
        "node.profile.gpus[0].nvlink_peers",
        "at most 64",
    ),
    (
        "gpu-peer-newline",
        with_gpu(0, nvlink_peers=("00000000:18:00.0\n",)),
        "node.profile.gpus[0].nvlink_peers[0]",
        "printable",
    ),
    ("gpu-numa-below-unknown", with_gpu(0, numa_node=-2), "node.profile.gpus[0].numa_node", "-2"),
    ("gpu-numa-huge", with_gpu(0, numa_node=4096), "node.profile.gpus[0].numa_node", "4096"),
    (
        "gpu-affinity-too-long",
        with_gpu(0, cpu_affinity="0," * 10_000),
        "node.profile.gpus[0].cpu_affinity",
        "at most 16384",
    ),
    (
        "domain-negative",
        with_profile(nvlink_domain_size=-8),
        "node.profile.nvlink_domain_size",
        "-8",
    ),
    ("profile-pcie-gen", with_profile(pcie_gen=99), "node.profile.pcie_gen", "99"),
    ("profile-pcie-width", with_profile(pcie_width=-16), "node.profile.pcie_width", "-16"),
    ("network-kind-a-string", with_network(kind="ib"), "node.profile.network.kind", "one of"),
    ("network-ports-negative", with_network(ports=-1), "node.profile.network.ports", "-1"),
    ("network-ports-huge", with_network(ports=10**6), "node.profile.network.ports", "got 1000000"),
    (
        "network-gbps-nan",
        with_network(gbps_per_port=NAN),
        "node.profile.network.gbps_per_port",
        "got nan",
    ),
    (
        "network-gbps-inf",
        with_network(gbps_per_port=INF),
        "node.profile.network.gbps_per_port",
        "got inf",
    ),
    (
        "ib-ports-too-many",
        with_profile(
            ib_ports=(
                IbPort(
                    device="mlx5_0", port=1, rate_gbps=400, state="", phys_state="", link_layer=""
                ),
            )
            * 65
        ),
        "node.profile.ib_ports",
        "at most 64",
    ),
    ("ib-port-256", with_port(0, port=256), "node.profile.ib_ports[0].port", "256"),
    ("ib-rate-nan", with_port(1, rate_gbps=NAN), "node.profile.ib_ports[1].rate_gbps", "nan"),
    (
        "ib-rate-negative",
        with_port(1, rate_gbps=-400.0),
        "node.profile.ib_ports[1].rate_gbps",
        "-400",
    ),
    ("ib-device-too-long", with_port(2, device="m" * 65), "node.profile.ib_ports[2].device", "64"),
    ("ib-state-escape", with_port(2, state="\x07"), "node.profile.ib_ports[2].state", "printable"),
    (
        "ib-phys-state",
        with_port(2, phys_state="L" * 65),
        "node.profile.ib_ports[2].phys_state",
        "64",
    ),
    (
        "ib-link-layer",
        with_port(2, link_layer="\n"),
        "node.profile.ib_ports[2].link_layer",
        "printable",
    ),
    ("ib-guid-too-long", with_port(3, guid="0x" * 40), "node.profile.ib_ports[3].guid", "64"),
    ("tflops-inf", with_profile(bf16_tflops=INF), "node.profile.bf16_tflops", "got inf"),
    ("tflops-negative", with_profile(bf16_tflops=-1.0), "node.profile.bf16_tflops", "got -1"),
    (
        "tflops-past-an-exaflop",
        with_profile(bf16_tflops=2e6),
        "node.profile.bf16_tflops",
        "got 2000000",
    ),
    ("source-too-long", with_profile(source="s" * 65), "node.profile.source", "at most 64"),
    (
        "measured-1999",
        with_profile(measured_at=datetime(1999, 12, 31, 23, 59, tzinfo=UTC)),
        "node.profile.measure_time",
        "between 2000 and 2200",
    ),
    (
        # Still 2200 in New York, already 2201 in UTC: the instant counts, not the wall clock.
        "measured-2201-in-utc",
        with_profile(measured_at=datetime(2200, 12, 31, 23, tzinfo=NEW_YORK)),
        "node.profile.measure_time",
        "between 2000 and 2200",
    ),
    (
        "measured-naive",
        with_profile(measured_at=datetime(2026, 1, 1)),
        "node.profile.measure_time",
        "with a zone",
    ),
]


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [pytest.param(change, field, says, id=case) for case, change, field, says in BAD_NODES],
)
def test_each_bad_node_field_is_one_violation_naming_it(
    change: Callable[[Node], Node], field: str, says: str
) -> None:
    violations = node_violations(change(full_node("n1")))

    assert [v.field for v in violations] == [field], violations
    assert says in violations[0].description
    with pytest.raises(InvalidArgument) as raised:
        validate_node(change(full_node("n1")))
    assert raised.value.violations == tuple(violations)


def test_a_heartbeat_profile_is_checked_under_its_own_prefix() -> None:
    bad = replace(full_node("n1").profile, bf16_tflops=NAN)

    assert [v.field for v in profile_violations(bad)] == ["profile.bf16_tflops"]
    assert profile_violations(full_node("n1").profile) == []
    with pytest.raises(InvalidArgument, match=r"profile\.bf16_tflops"):
        validate_profile(bad)


def test_a_node_with_thousands_of_bad_fields_names_the_first_few() -> None:
    # The violations travel in a gRPC trailer, which clients cap at 8 KiB.
    bad = Gpu(index=-1, uuid="\n", model="\n", memory_mib=-1, hbm_gbps=NAN, nvlink_gbps=NAN)
    node = Node(id="n1", address="n1", profile=BandwidthProfile(gpus=(bad,) * MAX_NODE_GPUS))

    with pytest.raises(InvalidArgument) as raised:
        validate_node(node)

    shown = raised.value.violations
    assert len(node_violations(node)) > 300
    assert len(shown) == MAX_VIOLATIONS_SHOWN + 1
    assert shown[-1] == FieldViolation(
        "node", f"and {len(node_violations(node)) - MAX_VIOLATIONS_SHOWN} more problems"
    )


@pytest.mark.parametrize(
    ("issues", "fields"),
    [
        pytest.param((), [], id="none"),
        pytest.param(("GPU 3: NVLink 17/18 links active",), [], id="one"),
        pytest.param(("two\nlines",), [], id="free-text-may-hold-newlines"),
        pytest.param(("",), ["health_issues[0]"], id="empty"),
        pytest.param(("ok", "nul\x00"), ["health_issues[1]"], id="nul"),
        pytest.param(("\udcff",), ["health_issues[0]"], id="lone-surrogate"),
        pytest.param(("x",) * 257, ["health_issues"], id="too-many"),
    ],
)
def test_health_issues(issues: tuple[str, ...], fields: list[str]) -> None:
    assert [v.field for v in health_issue_violations(issues)] == fields


# -- times from the wire ------------------------------------------------------------------


def stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("msg", "present", "expected"),
    [
        pytest.param(stamp(1_767_225_600), False, None, id="absent"),
        pytest.param(stamp(0), True, None, id="zero-is-unset"),
        pytest.param(stamp(1), True, datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC), id="1970"),
        pytest.param(
            stamp(1_767_225_600, 500_000_000),
            True,
            datetime(2026, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC),
            id="2026",
        ),
        pytest.param(
            stamp(7_289_654_399), True, datetime(2200, 12, 31, 23, 59, 59, tzinfo=UTC), id="last"
        ),
    ],
)
def test_from_ts_reads_times_in_range(msg: Timestamp, present: bool, expected: object) -> None:
    assert convert.from_ts(msg, present) == expected


@pytest.mark.parametrize(
    "msg",
    [
        pytest.param(stamp(-1), id="1969"),
        pytest.param(stamp(-62_135_596_801), id="before-year-1"),
        pytest.param(stamp(7_289_654_400), id="2201"),
        pytest.param(stamp(253_402_300_800), id="after-9999"),
        pytest.param(stamp(2**62), id="int64-seconds"),
        pytest.param(stamp(-(2**63)), id="most-negative"),
        pytest.param(stamp(5, -1), id="negative-nanos"),
        pytest.param(stamp(5, 1_000_000_000), id="a-whole-second-of-nanos"),
    ],
)
def test_from_ts_refuses_times_out_of_range_naming_the_field(msg: Timestamp) -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.from_ts(msg, field="since")
    assert [v.field for v in raised.value.violations] == ["since"]
    assert "between 1970 and 2200" in str(raised.value)


@pytest.mark.parametrize(
    ("decode", "field"),
    [
        pytest.param(
            lambda: convert.node_from_pb(nodes_pb2.Node(name="n1", register_time=stamp(-5))),
            "node.register_time",
            id="register-time",
        ),
        pytest.param(
            lambda: convert.node_from_pb(
                nodes_pb2.Node(name="n1", last_heartbeat_time=stamp(2**40))
            ),
            "node.last_heartbeat_time",
            id="heartbeat-time",
        ),
        pytest.param(
            lambda: convert.node_from_pb(
                nodes_pb2.Node(
                    name="n1", profile=nodes_pb2.BandwidthProfile(measure_time=stamp(-5))
                )
            ),
            "node.profile.measure_time",
            id="node-profile",
        ),
        pytest.param(
            lambda: convert.profile_from_pb(
                nodes_pb2.BandwidthProfile(measure_time=stamp(1, nanos=-1))
            ),
            "profile.measure_time",
            id="heartbeat-profile",
        ),
    ],
)
def test_converters_name_the_bad_time(decode: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        decode()
    assert [v.field for v in raised.value.violations] == [field]


@pytest.mark.parametrize(
    "name", [pytest.param("²", id="superscript-two"), pytest.param("jobs/٣", id="arabic-three")]
)
def test_job_names_are_ascii_digits(name: str) -> None:
    with pytest.raises(InvalidArgument):
        convert.parse_job_name(name)


# -- job specs: NaN, inf and integers past the wire ---------------------------------------

TRAINING = JobSpec(kind=JobKind.TRAINING, command=("python",), gpus_per_node=8)
INFERENCE = JobSpec(kind=JobKind.INFERENCE, command=("python",), gpus_per_node=1)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param(replace(base, **{name: value}), f"spec.{name}", id=f"{kind}-{name}-{shown}")
        for kind, base in (("training", TRAINING), ("inference", INFERENCE))
        for name in ("min_nvlink_gbps", "min_net_gbps", "target_tokens_per_s", "weights_gb")
        for value, shown in ((NAN, "nan"), (INF, "inf"), (-INF, "-inf"), (-1.0, "negative"))
    ],
)
def test_spec_violations_catch_every_non_finite_float(spec: JobSpec, field: str) -> None:
    assert field in [v.field for v in spec_violations(spec)]


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        pytest.param(
            replace(TRAINING, priority=10**20),
            "spec.priority",
            "got 100000000000000000000",
            id="priority-1e20",
        ),
        pytest.param(
            replace(TRAINING, num_nodes=2**2000), "spec.num_nodes", "2001 bits", id="no-float"
        ),
        pytest.param(
            replace(INFERENCE, gpu_milli=500, gpus_per_node=-5),
            "spec.gpus_per_node",
            "got -5",
            id="negative-gpus-beside-a-share",
        ),
        pytest.param(
            replace(TRAINING, time_limit_s="1h"), "spec.time_limit_s", "'1h'", id="a-string"
        ),
    ],
)
def test_spec_violations_never_raise_on_hostile_numbers(
    spec: JobSpec, field: str, says: str
) -> None:
    found = [v for v in spec_violations(spec) if v.field == field]
    assert found and says in found[0].description


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param(replace(TRAINING, priority=2**31), "spec.priority", id="priority-int32"),
        pytest.param(replace(TRAINING, priority=-(2**40)), "spec.priority", id="priority-low"),
        pytest.param(replace(TRAINING, num_nodes=10**30), "spec.num_nodes", id="nodes-1e30"),
        pytest.param(replace(TRAINING, gpus_per_node=2**31), "spec.gpus_per_node", id="gpus"),
        pytest.param(replace(INFERENCE, replicas=2**32), "spec.replicas", id="replicas"),
        pytest.param(replace(INFERENCE, gpu_milli=2**31), "spec.gpu_milli", id="share"),
        # Training names a share "gpu_share"; the wire still says which field cannot travel.
        pytest.param(replace(TRAINING, gpu_milli=2**31), "spec.gpu_milli", id="training-share"),
        pytest.param(replace(INFERENCE, gpu_memory_mib=2**63), "spec.gpu_memory_mib", id="gmem"),
        pytest.param(replace(TRAINING, cpu_milli=2**64), "spec.cpu_milli", id="cpu-int64"),
        pytest.param(replace(TRAINING, memory_mib=-(2**63) - 1), "spec.memory_mib", id="mem"),
        pytest.param(replace(TRAINING, time_limit_s=10**20), "spec.time_limit_s", id="limit"),
        pytest.param(replace(INFERENCE, weights_gb=2**1100), "spec.weights_gb", id="no-double"),
        pytest.param(replace(TRAINING, priority="3"), "spec.priority", id="priority-a-string"),
        pytest.param(replace(TRAINING, priority=1.5), "spec.priority", id="priority-a-float"),
        pytest.param(replace(TRAINING, priority=True), "spec.priority", id="priority-a-bool"),
        pytest.param(replace(TRAINING, min_net_gbps="fast"), "spec.min_net_gbps", id="gbps-str"),
    ],
)
def test_spec_to_pb_names_a_field_the_wire_cannot_carry(spec: JobSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.spec_to_pb(spec)
    assert [v.field for v in raised.value.violations] == [field]


def test_spec_to_pb_carries_what_fits_and_leaves_the_range_to_the_server() -> None:
    spec = replace(TRAINING, priority=2**31 - 1, cpu_milli=2**63 - 1)
    msg = convert.spec_to_pb(spec)
    assert (msg.priority, msg.cpu_milli) == (2**31 - 1, 2**63 - 1)
    assert "spec.priority" in [v.field for v in spec_violations(spec)]


# -- job files and the SDK ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        pytest.param({"weights_gb": 10**400}, "weights_gb", "finite", id="int-past-float"),
        pytest.param({"min_net_gbps": NAN}, "min_net_gbps", "finite", id="nan"),
        pytest.param({"gpu_share": NAN}, "gpu_share", "finite", id="share-nan"),
        pytest.param({"gpu_share": INF}, "gpu_share", "finite", id="share-inf"),
        pytest.param({"cpus": 1e306}, "cpus", "too large", id="cores-overflow"),
        pytest.param({"cpus": "9" * 40 + "m"}, "cpus", "at most 30 digits", id="millicores"),
        pytest.param({"cpus": "²m"}, "cpus", "whole number", id="millicores-superscript"),
        pytest.param({"gpu_memory": "9" * 400 + "TiB"}, "gpu_memory", "too large", id="size"),
        pytest.param({"memory": "9" * 400}, "memory", "too large", id="size-bare"),
        pytest.param({"time_limit": "²"}, "time_limit", "whole number", id="superscript"),
        pytest.param({"time_limit": "9" * 5000}, "time_limit", "30 digits", id="5000-digits"),
        pytest.param({"time_limit": "9" * 400 + "h"}, "time_limit", "too large", id="hours"),
        pytest.param({"time_limit": "1-" + "9" * 40}, "time_limit", "30 digits", id="clock"),
    ],
)
def test_job_file_numbers_past_any_range_are_violations(
    data: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(JobFileError) as raised:
        spec_from_mapping({"kind": "inference", "command": "python", "gpus_per_node": 0, **data})
    assert [v.field for v in raised.value.violations] == [field]
    assert says in raised.value.violations[0].description


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("kind: training\npriority: " + "9" * 5000 + "\n", id="int-past-4300-digits"),
        pytest.param("kind: training\nname: 2024-13-45\n", id="month-13"),
    ],
)
def test_a_yaml_value_python_cannot_build_is_a_job_file_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(JobFileError) as raised:
        load_job_file(path)
    assert [v.field for v in raised.value.violations] == ["(document)"]
    assert str(raised.value).startswith(f"{path}: (document): holds a value that cannot be read")


def test_the_sdk_refuses_an_integer_past_int32_before_any_call() -> None:
    with (
        Client(f"127.0.0.1:{_free_port()}", timeout=1) as client,
        pytest.raises(ValueError, match=r"^priority: must be between") as raised,
    ):
        client.submit(
            {"kind": "training", "command": "python", "gpus_per_node": 8, "priority": 10**20}
        )
    # a job-file mapping is refused in its own words
    assert [v.field for v in raised.value.violations] == ["priority"]


# -- the CLI ------------------------------------------------------------------------------


def _free_port() -> int:
    # Bound and closed: nothing listens there, so a test that reached the network would fail
    # with "cannot reach gpuctld" rather than pass.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRAIN = ("submit", "--kind", "training", "--gpus-per-node", "8")
SERVE = ("submit", "--kind", "inference", "--gpus-per-node", "0")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        pytest.param(
            (*TRAIN, "--priority", "99999999999999999999", "--", "python"),
            "error: --priority: must be between -1000000 and 1000000, got 99999999999999999999",
            id="priority",
        ),
        pytest.param(
            (*TRAIN, "--priority", "-2147483649", "--", "python"),
            "error: --priority: must be between -1000000 and 1000000, got -2147483649",
            id="priority-below-int32",
        ),
        pytest.param(
            (*TRAIN, "--nodes", str(10**30), "--", "python"),
            "error: --nodes: must be between 1 and 1024, got 1000000000000000000000000000000",
            id="nodes",
        ),
        pytest.param(
            ("submit", "--kind", "training", "--gpus-per-node", str(2**31), "--", "python"),
            "error: --gpus-per-node: must be between 1 and 16, got 2147483648",
            id="gpus-per-node",
        ),
        pytest.param(
            (*SERVE, "--replicas", str(2**40), "--", "python"),
            "error: --replicas: must be between 1 and 10000, got 1099511627776",
            id="replicas",
        ),
        pytest.param(
            (*TRAIN, "--time-limit", "1" + "0" * 20, "--", "python"),
            "error: --time-limit: must be between 0 and 365d, got 100000000000000000000",
            id="time-limit-seconds",
        ),
        pytest.param(
            (*TRAIN, "--time-limit", "9" * 40, "--", "python"),
            "error: --time-limit: must be a whole number of at most 30 digits, got '"
            + "9" * 40
            + "'",
            id="time-limit-digits",
        ),
        pytest.param(
            (*SERVE, "--cpus", "1e306", "--", "python"),
            "error: --cpus: is too large a number of cores",
            id="cpus",
        ),
        pytest.param(
            (*SERVE, "--gpu-memory", "9" * 400 + "TiB", "--", "python"),
            "error: --gpu-memory: is too large a size",
            id="gpu-memory",
        ),
        pytest.param(
            (*TRAIN, "--min-nvlink-gbps", "nan", "--", "python"),
            "error: --min-nvlink-gbps: must be a finite number, got nan",
            id="nvlink-nan",
        ),
        pytest.param(
            (*SERVE, "--gpu-share", "inf", "--", "python"),
            "error: --gpu-share: must be a finite number, got inf",
            id="share-inf",
        ),
    ],
)
def test_cli_out_of_range_values_are_one_error_line(args: tuple[str, ...], line: str) -> None:
    result = CliRunner().invoke(cli, ["--server", f"127.0.0.1:{_free_port()}", *args])

    assert result.exc_info is not None and result.exc_info[0] is SystemExit, result.exc_info
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", line + "\n")


def test_cli_job_file_with_a_huge_priority_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("kind: training\ngpus_per_node: 8\ncommand: python\npriority: 1e400\n")
    big = tmp_path / "big.yaml"
    big.write_text("kind: training\ngpus_per_node: 8\ncommand: python\npriority: 1" + "0" * 30)
    server = f"127.0.0.1:{_free_port()}"

    as_float = CliRunner().invoke(cli, ["--server", server, "submit", "-f", str(path)])
    as_int = CliRunner().invoke(cli, ["--server", server, "submit", "-f", str(big)])

    assert (as_float.exit_code, as_float.stderr) == (
        1,
        f"error: {path}: priority: must be an integer, got a string ('1e400')\n",
    )
    assert (as_int.exit_code, as_int.stderr) == (
        1,
        f"error: {big}: priority: must be between -1000000 and 1000000, got "
        "1000000000000000000000000000000\n",
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(("logs", "1", "--rank", "99999999999"), "'--rank'", id="rank-past-int32"),
        pytest.param(("logs", "1", "--rank", "-1"), "'--rank'", id="rank-negative"),
        pytest.param(("cost", "--since", "99999999999999d"), "days back", id="since-days"),
        pytest.param(("cost", "--since", "9" * 5000 + "h"), "days back", id="since-digits"),
        pytest.param(("cost", "--since", "0001-01-01"), "between 1970", id="since-year-1"),
        pytest.param(("cost", "--since", "9999-12-31T23:00-05:00"), "2200", id="since-9999"),
    ],
)
def test_cli_out_of_range_options_are_usage_errors(args: tuple[str, ...], says: str) -> None:
    result = CliRunner().invoke(cli, ["--server", f"127.0.0.1:{_free_port()}", *args])

    assert result.exit_code == 2, result.output
    assert result.exc_info is not None and result.exc_info[0] is SystemExit
    assert says in result.stderr and "Traceback" not in result.stderr


# -- property: what passes the door reaches the store and comes back ----------------------
#
# Each field is drawn in range (as an agent would send it) unless the example picked it as
# hostile; a hostile field takes anything of its type: NaN, inf, ints past 64 bits, control
# characters, lone surrogates, times in year 1 or 9999, naive times. An example is a valid
# node, one with a few hostile fields (what a validator most easily lets through), or chaos.

_any_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=80),  # surrogates too
    st.sampled_from(["", " ", "a\x00b", "\ud800", "x\n", "x" * 300]),
)
_any_int = st.one_of(
    st.integers(-(2**80), 2**80),
    st.sampled_from([-1, 2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64, 10**30]),
)
# NaN on its own branch: of all hostile floats it is the one that corrupts (it breaks the JSON
# column and never equals itself), so it is drawn most.
_any_float = st.one_of(st.just(NAN), st.floats(), st.sampled_from([INF, -INF, -1.0, -0.0, 1e300]))
_printable = st.text(st.characters(categories=["L", "N", "P", "S"], include_characters=" "))
_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
_zones = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
)

# kind -> (in range, anything of its type)
KINDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "name": (_name, _any_text),
    "address": (st.sampled_from(["10.0.0.1", "gpu-01.cluster", "[::1]:29500"]), _any_text),
    "fabric": (st.lists(_name, max_size=3).map("/".join), _any_text),
    "text": (_printable.map(lambda t: t[:64]), _any_text),
    # free text (a reason, a health issue) may hold newlines, never NUL
    "free_text": (st.text(st.characters(exclude_characters="\x00"), max_size=40), _any_text),
    "count": (st.integers(0, 8), _any_int),
    "numa": (st.integers(-1, 8), _any_int),
    "float": (st.floats(0, 5000), _any_float),
    "time": (
        st.one_of(
            st.none(),
            st.datetimes(datetime(2000, 1, 2), datetime(2200, 12, 30), timezones=_zones),
        ),
        st.one_of(st.datetimes(timezones=_zones), st.datetimes()),  # years 1-9999; naive
    ),
}
# Where each value goes; a GPU or port site covers that field of every GPU or port.
SITES = {
    **dict.fromkeys(("id",), "name"),
    "address": "address",
    "fabric": "fabric",
    **dict.fromkeys(("provider", "sku", "region", "label_key", "label_value", "lease"), "text"),
    **dict.fromkeys(("cpu", "memory", "price", "tflops", "net_gbps"), "count"),
    **dict.fromkeys(("state_reason", "health_issue"), "free_text"),
    **dict.fromkeys(("registered_at", "last_heartbeat", "measured_at"), "time"),
    **dict.fromkeys(("domain", "pcie_gen", "pcie_width", "net_ports", "port"), "count"),
    **dict.fromkeys(("source", "device", "state", "phys_state", "link_layer", "guid"), "text"),
    **dict.fromkeys(("rate_gbps",), "float"),
    **dict.fromkeys(("gpu.uuid", "gpu.model", "gpu.pci_bus_id", "gpu.peer"), "text"),
    **dict.fromkeys(("gpu.cpu_affinity",), "text"),
    **dict.fromkeys(("gpu.index", "gpu.memory_mib", "gpu.links_active"), "count"),
    **dict.fromkeys(("gpu.links_total", "gpu.nvlink_version", "gpu.pcie_gen"), "count"),
    **dict.fromkeys(("gpu.pcie_width", "gpu.pcie_max_gen", "gpu.pcie_max_width"), "count"),
    "gpu.numa_node": "numa",
    **dict.fromkeys(("gpu.hbm_gbps", "gpu.nvlink_gbps", "gpu.measured_hbm_gbps"), "float"),
}
# Sites whose in-range value is a float: a hostile "count" there is an int, still valid Python.
FLOAT_SITES = {"price", "tflops", "net_gbps"}


@st.composite
def _nodes(draw: st.DrawFn) -> Node:
    # Mostly one hostile site: a bad value beside good ones is what a validator lets through.
    mode = draw(st.sampled_from(["none", "one", "one", "one", "one", "one", "few", "all"]))
    sites = sorted(SITES)
    hostile = {
        "none": frozenset(),
        "one": frozenset([draw(st.sampled_from(sites))]),
        "few": draw(st.frozensets(st.sampled_from(sites), min_size=2, max_size=4)),
        "all": frozenset(sites),
    }[mode]

    def pick(site: str) -> Any:
        real, anything = KINDS[SITES[site]]
        if site in hostile:
            return draw(_any_float if site in FLOAT_SITES else anything)
        value = draw(real)
        return float(value) if site in FLOAT_SITES else value

    count = draw(st.integers(0, 4))
    indices = sorted(draw(st.sets(st.integers(0, 63), min_size=count, max_size=count)))
    gpus = tuple(
        Gpu(
            index=pick("gpu.index") if "gpu.index" in hostile else index,
            uuid=pick("gpu.uuid") if "gpu.uuid" in hostile else f"GPU-{index}",
            model=pick("gpu.model"),
            memory_mib=pick("gpu.memory_mib"),
            hbm_gbps=pick("gpu.hbm_gbps"),
            nvlink_gbps=pick("gpu.nvlink_gbps"),
            measured_hbm_gbps=pick("gpu.measured_hbm_gbps") if draw(st.booleans()) else None,
            mig_enabled=draw(st.booleans()),
            pci_bus_id=pick("gpu.pci_bus_id"),
            nvlink_links_active=pick("gpu.links_active"),
            nvlink_links_total=pick("gpu.links_total"),
            nvlink_version=pick("gpu.nvlink_version"),
            nvlink_peers=tuple(pick("gpu.peer") for _ in range(draw(st.integers(0, 2)))),
            pcie_gen=pick("gpu.pcie_gen"),
            pcie_width=pick("gpu.pcie_width"),
            pcie_max_gen=pick("gpu.pcie_max_gen"),
            pcie_max_width=pick("gpu.pcie_max_width"),
            numa_node=pick("gpu.numa_node"),
            cpu_affinity=pick("gpu.cpu_affinity"),
        )
        for index in indices
    )
    ports = tuple(
        IbPort(
            device=pick("device"),
            port=pick("port"),
            rate_gbps=pick("rate_gbps"),
            state=pick("state"),
            phys_state=pick("phys_state"),
            link_layer=pick("link_layer"),
            guid=pick("guid"),
        )
        for _ in range(draw(st.integers(0, 2)))
    )
    profile = BandwidthProfile(
        gpus=gpus,
        nvlink_domain_size=pick("domain"),
        pcie_gen=pick("pcie_gen"),
        pcie_width=pick("pcie_width"),
        network=Network(
            kind=draw(st.sampled_from(NetKind)),
            ports=pick("net_ports"),
            gbps_per_port=pick("net_gbps"),
        ),
        ib_ports=ports,
        bf16_tflops=pick("tflops"),
        source=pick("source"),
        measured_at=pick("measured_at"),
    )
    labels = {pick("label_key") or "k": pick("label_value") for _ in range(draw(st.integers(0, 3)))}
    return Node(
        id=pick("id"),
        address=pick("address"),
        fabric=pick("fabric"),
        provider=pick("provider"),
        sku=pick("sku"),
        region=pick("region"),
        labels=tuple(sorted(labels.items())),
        cpu_milli=pick("cpu"),
        memory_mib=pick("memory"),
        profile=profile,
        price_per_hour=pick("price"),
        state=draw(st.sampled_from(NodeState)),
        state_reason=pick("state_reason"),
        health_issues=tuple(
            pick("health_issue") or "GPU 0: hot" for _ in range(draw(st.integers(0, 2)))
        ),
        lease_id=pick("lease"),
        registered_at=pick("registered_at"),
        last_heartbeat=pick("last_heartbeat"),
    )


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlStore]:
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('bounds')}/gpuctl.db")
    yield store
    store.close()


@settings(max_examples=200, deadline=None)
@given(node=_nodes())
@example(node=full_node("n1"))
def test_a_node_without_violations_round_trips_the_wire_and_the_store(
    node: Node, sqlite_store: SqlStore
) -> None:
    if node_violations(node):
        return  # refused at the door with INVALID_ARGUMENT: nothing further sees it
    # A proto map has no order and an empty provider reads as "static".
    expected = replace(node, labels=tuple(sorted(node.labels)), provider=node.provider or "static")

    wire = nodes_pb2.Node.FromString(convert.node_to_pb(node).SerializeToString())
    assert convert.node_from_pb(wire) == expected
    assert node_from_row(NodeRow(**node_values(node))) == node
    assert sqlite_store.put_node(node) == node
    assert sqlite_store.get_node(node.id) == node


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        pytest.param(
            replace(INFERENCE, gpu_model="|".join(f"M{i}" for i in range(9))),
            "names more than 8 models",
            id="nine-models",
        ),
        pytest.param(
            replace(INFERENCE, gpu_model="A|" + "x" * 65),
            "longer than 64 characters",
            id="a-long-name",
        ),
        pytest.param(replace(INFERENCE, gpu_model="A||B"), "empty model name", id="empty-name"),
        pytest.param(
            replace(INFERENCE, gpu_model="|" * 100_000), "names more than 8", id="many-bars"
        ),
    ],
)
def test_a_gpu_model_list_is_bounded_and_named(spec: JobSpec, says: str) -> None:
    found = [v for v in spec_violations(spec) if v.field == "spec.gpu_model"]
    assert found and says in found[0].description


def test_spread_is_for_inference_and_a_wire_value_past_the_enum_is_named() -> None:
    from gpuctl.api._pb.v1 import jobs_pb2
    from gpuctl.core.model import SpreadPolicy

    assert "spec.spread" in [
        v.field for v in spec_violations(replace(TRAINING, spread=SpreadPolicy.NONE))
    ]
    msg = convert.spec_to_pb(INFERENCE)
    msg.spread = 99
    with pytest.raises(InvalidArgument) as caught:
        convert.spec_from_pb(msg)
    assert [v.field for v in caught.value.violations] == ["spec.spread"]
    for spread in SpreadPolicy:  # each on the wire and back
        msg = convert.spec_to_pb(replace(INFERENCE, spread=spread))
        assert jobs_pb2.Spread.Name(msg.spread) == f"SPREAD_{spread.name}"
        assert convert.spec_from_pb(msg).spread is spread
