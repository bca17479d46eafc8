"""The catalog builder on a tiny copy of the source format, the shipped config/catalog.csv, and the
simulated provider that leases its SKUs."""

from __future__ import annotations

import csv
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuctl.core.errors import InvalidArgument
from gpuctl.core.model import NetKind, Network
from gpuctl.providers.base import CapacityUnavailable, LeaseNotHeld, Sku, UnknownSku
from gpuctl.providers.catalog import CatalogProvider, load_catalog, parse_catalog
from gpuctl.providers.catalog_build import COLUMNS, RULE_IDS, build, main, render

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "catalog.csv"
README = ROOT / "config" / "catalog.README.md"
SHARED_SOURCE = ROOT.parent / "shared" / "catalogs"
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# -- the builder on a fixture ----------------------------------------------------------------------

SPECS = """gpu,memory_gib,hbm_gbps,nvlink_gbps_per_gpu,bf16_dense_tflops,source_url
H200 SXM,141,4800,900,989.4,x
H100 SXM,80,3350,900,989.4,x
H100 PCIe,80,2000,600,756.5,x
A100 80GB SXM,80,2039,600,312,x
A100 40GB,40,1555,600,312,x
L40S,48,864,0,362.05,x
L4,24,300,0,121,x
T4,16,320,0,,x
"""
INFO_40 = "\"{'Gpus': [{'Name': 'A100', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 40960}}]}\""
INFO_80 = "\"{'Gpus': [{'Name': 'A100', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 81920}}]}\""
SOURCES = {
    "lambda.csv": f"""InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
cpu_4x_generalx,,,4.0,16.0,0.2,us-east-1,,
gpu_8x_h100_sxm5,H100,8.0,208.0,1800.0,25.00,us-west-1,,
gpu_8x_h100_sxm5,H100,8.0,208.0,1800.0,23.92,us-east-1,,
gpu_8x_h100_sxm5,H100,8.0,208.0,1800.0,23.92,asia-south-1,,
gpu_1x_h100_pcie,H100,1.0,26.0,200.0,2.49,us-east-1,,
gpu_1x_a100,A100,1.0,30.0,200.0,1.29,us-east-1,{INFO_40},
gpu_8x_b200_sxm6,B200,8.0,208.0,2900.0,39.92,us-east-1,,
gpu_1x_a10,A10,1.0,30.0,200.0,,us-east-1,,
""",
    # Column order differs per file: the builder reads by header name.
    "azure.csv": """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,Generation
Standard_ND96isr_H100_v5,H100,8,96,1900,H100,98.32,,eastus,V2
Standard_NC24ads_A100_v4,A100-80GB,1,24,220,A100-80GB,3.673,,eastus,V2
Standard_NC40ads_H100_v5,H100,1,40,320,H100,6.98,,eastus,V2
Standard_NV6ads_A10_v5,A10,0.167,6,55,A10,0.454,,eastus,V2
""",
    "gcp.csv": """InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice
a3-ultragpu-8g,224.0,2952.0,,,,us-central1,us-central1-b,12.0,4.0
,,,H200,8,,us-central1,us-central1-b,40.0,30.0
g2-standard-24,24.0,96.0,,,,us-central1,us-central1-a,1.0,0.5
,,,L4,2,,us-central1,us-central1-a,1.2,0.6
,,,T4,1,,us-central1,us-central1-a,0.35,0.1
a4-highgpu-8g,224.0,3968.0,,,,us-central1,us-central1-b,0.0,0.0
,,,B200,8,,us-central1,us-central1-b,64.44,41.0
,,,tpu-v5p-8,1,,us-central1,us-central1-a,4.2,2.1
""",
    "shadeform.csv": """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
voltagepark_H100-sxm5x8-bm,H100,8.0,104.0,1024,15.92,dallas-usa-5,,
hyperstack_H100x8-NVLINK,H100,8.0,192.0,1800,15.6,montreal-canada-2,,
cudo_L40Sx8-bm-no,L40S,8.0,64.0,512,6.96,oslo-norway-1,,
""",
    "hyperstack.csv": """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,Region,SpotPrice
n3-H100x8-NVLink,H100-80G-PCIe-NVLink,8,192,1800.0,,15.6,CANADA-1,
""",
    "nebius.csv": """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
gpu-h200-sxm_8gpu-128vcpu-1600gb,H200,8,128,1600,28.00,eu-north1,,
""",
    "vast.csv": f"""InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region
1x-A100_SXM4-32-65536,A100,1,32,64.0,{INFO_40},0.93,0.00,"Georgia, US, NA"
1x-A100_SXM4-32-65536,A100,1,32,64.0,{INFO_80},1.10,0.00,"Czechia, CZ, EU"
""",
    "primeintellect.csv": """InstanceType,UpstreamCloudId,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice
datacrunch__8xH100_80GB__176__1480__SPOT,8H100.80S.176V_SPOT,176.0,1480,H100,8.0,,FI,FIN-01,,
datacrunch__8xH100_80GB__176__1480,8H100.80S.176V,176.0,1480,H100,8.0,,FI,FIN-01,15.77,
""",
    "mithril.csv": """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,SpotPrice,Region,GpuInfo
h100-80gb.sxm.8x,H100,8,168,1814,8.0,8.0,us-central2-a,
""",
}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    (tmp_path / "gpu_specs.csv").write_text(SPECS)
    (tmp_path / "skypilot").mkdir()
    for name, text in SOURCES.items():
        (tmp_path / "skypilot" / name).write_text(text)
    return tmp_path


# fmt: off
EXPECTED = {
    # sku:                                  (gpu,            form,     nvlink, net_kind,     net_gbps, interconnect_source,          price,    region)
    "azure/Standard_ND96isr_H100_v5":       ("H100 SXM",     "sxm",     "900", "infiniband", "3200",   "azure-nd-infiniband",        "98.32",  "eastus"),
    "azure/Standard_NC24ads_A100_v4":       ("A100 80GB SXM", "pcie",   "0",   "ethernet",   "0",      "one-gpu",                    "3.673",  "eastus"),
    "gcp/a3-ultragpu-8g":                   ("H200 SXM",     "sxm",     "900", "roce",       "3200",   "gcp-a3-ultra-roce",          "52",     "us-central1"),  # 12 + 40
    "gcp/g2-standard-24":                   ("L4",           "pcie",    "0",   "ethernet",   "0",      "pcie-card",                  "2.2",    "us-central1"),  # 1.0 + 1.2, 2 L4
    "hyperstack/n3-H100x8-NVLink":          ("H100 PCIe",    "pcie",    "0",   "ethernet",   "0",      "pcie-nvlink-bridge",         "15.6",   "CANADA-1"),
    "lambda/gpu_1x_a100":                   ("A100 40GB",    "unknown", "0",   "ethernet",   "0",      "one-gpu",                    "1.29",   "us-east-1"),
    "lambda/gpu_1x_h100_pcie":              ("H100 PCIe",    "pcie",    "0",   "ethernet",   "0",      "one-gpu",                    "2.49",   "us-east-1"),
    "lambda/gpu_8x_h100_sxm5":              ("H100 SXM",     "sxm",     "900", "ethernet",   "0",      "sxm-nvlink-only",            "23.92",  "asia-south-1"),
    "nebius/gpu-h200-sxm_8gpu-128vcpu-1600gb": ("H200 SXM",  "sxm",     "900", "infiniband", "3200",   "nebius-8gpu-infiniband",     "28",     "eu-north1"),
    "primeintellect/datacrunch__8xH100_80GB__176__1480": ("H100 SXM", "sxm", "900", "ethernet", "0",   "sxm-nvlink-only",            "15.77",  "FI"),  # upstream 8H100.80S.
    "shadeform/cudo_L40Sx8-bm-no":          ("L40S",         "pcie",    "0",   "ethernet",   "0",      "pcie-card",                  "6.96",   "oslo-norway-1"),
    "shadeform/hyperstack_H100x8-NVLINK":   ("H100 PCIe",    "unknown", "0",   "ethernet",   "0",      "form-not-stated",            "15.6",   "montreal-canada-2"),
    "shadeform/voltagepark_H100-sxm5x8-bm": ("H100 SXM",     "sxm",     "900", "infiniband", "3200",   "sxm8-baremetal-ib-assumed",  "15.92",  "dallas-usa-5"),
    "vast/1x-A100_SXM4-32-65536@a100-40gb": ("A100 40GB",    "sxm",     "0",   "ethernet",   "0",      "one-gpu",                    "0.93",   "Georgia, US, NA"),
    "vast/1x-A100_SXM4-32-65536@a100-80gb-sxm": ("A100 80GB SXM", "sxm", "0",  "ethernet",   "0",      "one-gpu",                    "1.1",    "Czechia, CZ, EU"),
}
# fmt: on
FIELDS = ("gpu", "form_factor", "nvlink_gbps", "net_kind", "net_gbps", "interconnect_source")
FIELDS += ("price_per_hour", "region")


def test_build_keeps_maps_and_infers(source: Path) -> None:
    rows, _ = build(source)
    assert {r["sku"]: tuple(r[f] for f in FIELDS) for r in rows} == EXPECTED


def test_build_keeps_the_cheapest_region_and_counts_the_rest(source: Path) -> None:
    rows, _ = build(source)
    h100 = next(r for r in rows if r["sku"] == "lambda/gpu_8x_h100_sxm5")
    # 23.92 in us-east-1 and asia-south-1 (a tie: the region that sorts first), 25.00 in us-west-1.
    assert (h100["region"], h100["regions_listed"], h100["price_per_hour"]) == (
        "asia-south-1",
        "3",
        "23.92",
    )
    assert (h100["hbm_gbps"], h100["bf16_tflops"], h100["gpu_memory_gb"]) == ("3350", "989.4", "80")
    assert (h100["vcpus"], h100["memory_gib"], h100["gpu_count"]) == ("208", "1800", "8")


def test_build_notes_what_it_assumed(source: Path) -> None:
    rows = {r["sku"]: r["inferred"].split("; ") for r in build(source)[0]}
    assert (
        "form factor not stated: H100 PCIe figures used (the lower bound)"
        in rows["shadeform/hyperstack_H100x8-NVLINK"]
    )
    assert (
        "PCIe card: HBM shown is the SXM part's 2039 GB/s (PCIe: 1935)"
        in rows["azure/Standard_NC24ads_A100_v4"]
    )
    assert "GPU memory read from GpuInfo" in rows["lambda/gpu_1x_a100"]
    assert "price = GCP host VM row + accelerator row" in rows["gcp/a3-ultragpu-8g"]


def test_build_says_what_it_left_out(source: Path) -> None:
    _, report = build(source)
    assert dict(report.skipped) == {
        "GPU not in gpu_specs.csv: B200": 1,
        "no on-demand price": 1,
        "H100 NVL (94 GB): no row in gpu_specs.csv": 1,
        "fractional GPU count (a share of a GPU)": 1,
        "spot offer (spot prices are not used)": 1,
        "mithril: prices look like placeholders or bid limits (1.0 per GPU)": 1,
        "GCP VM without both a host and an accelerator price": 1,  # a4: host price 0.0
        "GCP accelerator for n1 hosts (no fixed instance type)": 1,  # the T4 row
    }
    assert report.by_rule["one-gpu"] == 5
    assert report.rows == len(EXPECTED)


def test_build_is_reproducible(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "catalog.csv"
    assert main(["--src", str(source), "--out", str(out)]) == 0
    assert out.read_text() == render(build(source)[0])
    assert capsys.readouterr().out.startswith(
        f"wrote {out}\n15 catalog rows from 20 priced GPU offers"
    )
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert load_catalog(out)  # what the builder writes, the provider reads


# -- the shipped catalog ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> list[dict[str, str]]:
    with SHIPPED.open(newline="") as f:
        return list(csv.DictReader(f))


def test_shipped_catalog_parses(shipped: list[dict[str, str]]) -> None:
    skus = load_catalog(SHIPPED)
    assert len(skus) == len(shipped)
    assert 100 <= len(skus) <= 3000
    assert all(s.price_per_hour > 0 and s.gpu_count >= 1 and s.hbm_gbps > 0 for s in skus)


# The widest $/GPU-hour any on-demand list price could plausibly take (catalogs README §4 has
# $0.35 to $7.50 by model; the bounds leave room for bundled CPU and RAM and for odd regions).
@pytest.mark.parametrize(
    "gpu", ["H100 SXM", "H200 SXM", "A100 80GB SXM", "A100 40GB", "L40S", "L4"]
)
def test_shipped_catalog_has_plausible_prices(shipped: list[dict[str, str]], gpu: str) -> None:
    per_gpu = [float(r["price_per_hour"]) / int(r["gpu_count"]) for r in shipped if r["gpu"] == gpu]
    assert len(per_gpu) >= 5, f"too few {gpu} rows"
    assert min(per_gpu) >= 0.1 and max(per_gpu) <= 20.0
    assert min(per_gpu) < 4.0  # somewhere it is sold at a market price


def test_shipped_catalog_interconnect_follows_the_documented_rules(
    shipped: list[dict[str, str]],
) -> None:
    readme = README.read_text()
    # The README's rule table: "| 1 | `azure-nd-infiniband` | ... | 6 |" — ids, order and counts.
    table = re.findall(r"^\| (\d+) \| `([a-z0-9-]+)` \|.*\| (\d+) \|$", readme, re.M)
    assert [rule for _, rule, _ in table] == list(RULE_IDS)
    counted = {rule: int(n) for _, rule, n in table}
    assert counted == {
        rule: sum(r["interconnect_source"] == rule for r in shipped) for rule in RULE_IDS
    }
    for r in shipped:
        assert r["interconnect_source"] in RULE_IDS
        claims_network = RULE_IDS.index(r["interconnect_source"]) < RULE_IDS.index("one-gpu")
        assert (float(r["net_gbps"]) > 0) == claims_network, r["sku"]
        if float(r["nvlink_gbps"]) > 0:
            assert r["form_factor"] == "sxm" and int(r["gpu_count"]) > 1, r["sku"]


def test_shipped_catalog_knows_the_training_classics(shipped: list[dict[str, str]]) -> None:
    by_sku = {r["sku"]: r for r in shipped}
    nd = by_sku["azure/Standard_ND96isr_H100_v5"]
    assert (nd["gpu"], nd["nvlink_gbps"], nd["net_kind"], nd["net_gbps"]) == (
        "H100 SXM",
        "900",
        "infiniband",
        "3200",
    )
    a3 = by_sku["gcp/a3-highgpu-8g"]
    assert (a3["region"], a3["price_per_hour"]) == ("us-central1", "43.0662")  # 9.46006 + 33.60609


@pytest.mark.skipif(not SHARED_SOURCE.is_dir(), reason="shared/catalogs is not next to the repo")
def test_shipped_catalog_is_what_the_builder_makes() -> None:
    assert SHIPPED.read_text() == render(build(SHARED_SOURCE)[0]), (
        "config/catalog.csv is stale: python -m gpuctl.providers.catalog_build "
        "--src ../shared/catalogs --out config/catalog.csv"
    )


# -- parsing a catalog -----------------------------------------------------------------------------


def test_parse_catalog_names_bad_cells() -> None:
    row = dict.fromkeys(COLUMNS, "0") | {"sku": "x/y", "net_kind": "ethernet", "hbm_gbps": "fast"}
    with pytest.raises(InvalidArgument) as e:
        parse_catalog(render([row]))
    assert [str(v) for v in e.value.violations] == [
        "catalog line 2.hbm_gbps: must be a number: 'fast'"
    ]
    with pytest.raises(InvalidArgument, match="lacks columns price_per_hour"):
        parse_catalog(",".join(c for c in COLUMNS if c != "price_per_hour") + "\n")


# -- the simulated provider ------------------------------------------------------------------------

IB = Sku(
    provider="nebius",
    name="nebius/gpu-h100-sxm_8gpu-128vcpu-1600gb",
    instance_type="gpu-h100-sxm_8gpu-128vcpu-1600gb",
    gpu_model="H100 SXM",
    gpu_count=8,
    network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
    region="eu-north1",
    price_per_hour=23.6,
)
ETH = Sku(
    provider="lambda",
    name="lambda/gpu_1x_a10",
    instance_type="gpu_1x_a10",
    region="us-east-1",
    price_per_hour=1.29,
)
IB_ELSEWHERE = Sku(
    provider="azure",
    name="azure/Standard_ND96isr_H100_v5",
    instance_type="Standard_ND96isr_H100_v5",
    network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
    region="eastus",
    price_per_hour=98.32,
)


def sim(**kw) -> CatalogProvider:
    return CatalogProvider((IB, ETH, IB_ELSEWHERE), name="sim", **kw)


def test_acquire_is_instant_and_deterministic() -> None:
    p = sim()
    got = p.acquire(IB.name, 2, now=T0)
    assert [(a.lease_id, a.node, a.fabric) for a in got] == [
        ("sim/nebius-gpu-h100-sxm-8gpu-128vcpu-1600gb-0001", "nebius-gpu-h100-sxm-8gpu-128vcpu-1600gb-0001", "nebius-eu-north1-f1"),
        ("sim/nebius-gpu-h100-sxm-8gpu-128vcpu-1600gb-0002", "nebius-gpu-h100-sxm-8gpu-128vcpu-1600gb-0002", "nebius-eu-north1-f1"),
    ]  # fmt: skip
    assert {(a.price_per_hour, a.acquired_at, a.expires_at) for a in got} == {(23.6, T0, None)}
    (a10,) = p.acquire(ETH.name, 1, now=T0)
    assert (a10.node, a10.fabric) == ("lambda-gpu-1x-a10-0003", "")  # no network stated: no fabric
    assert sim().acquire(IB.name, 2, now=T0) == got  # same calls, same names


def test_each_acquire_gets_its_own_fabric_and_can_join_one() -> None:
    p = sim()
    first = p.acquire(IB.name, 2, now=T0)
    second = p.acquire(IB.name, 1, now=T0)
    assert second[0].fabric == "nebius-eu-north1-f2"
    grown = p.acquire(IB.name, 2, fabric=first[0].fabric, now=T0)
    assert {a.fabric for a in grown} == {"nebius-eu-north1-f1"}


# fmt: off
FABRIC_REFUSALS = [
    # id,               sku,                 fabric,                  message
    ("unknown-fabric",  IB.name,             "ib-nowhere",            "has no fabric ib-nowhere"),
    ("other-region",    IB_ELSEWHERE.name,   "nebius-eu-north1-f1",   "fabric nebius-eu-north1-f1 is in nebius eu-north1, sku azure/Standard_ND96isr_H100_v5 in azure eastus"),
    ("no-network",      ETH.name,            "nebius-eu-north1-f1",   "states no network between nodes"),
]
# fmt: on


@pytest.mark.parametrize(
    ("sku", "fabric", "message"),
    [c[1:] for c in FABRIC_REFUSALS],
    ids=[c[0] for c in FABRIC_REFUSALS],
)
def test_fabric_refusals(sku: str, fabric: str, message: str) -> None:
    p = sim()
    p.acquire(IB.name, 1, now=T0)
    with pytest.raises(CapacityUnavailable, match=re.escape(message)):
        p.acquire(sku, 1, fabric=fabric, now=T0)
    assert len(p.held()) == 1


def test_capacity_simulates_scarcity() -> None:
    p = sim(capacity={IB.name: 3})
    p.acquire(IB.name, 2, now=T0)
    with pytest.raises(CapacityUnavailable, match="1 of 2 nodes left"):
        p.acquire(IB.name, 2, now=T0)
    assert len(p.acquire(IB.name, 1, now=T0)) == 1
    with pytest.raises(UnknownSku):
        p.acquire("nebius/b300", 1, now=T0)


def test_max_lease_expires_unless_renewed() -> None:
    p = sim(max_lease=timedelta(hours=4))
    assert {s.max_lease for s in p.skus()} == {timedelta(hours=4)}
    a, b = p.acquire(IB.name, 2, now=T0)
    assert a.expires_at == T0 + timedelta(hours=4)
    assert p.renew(a.lease_id, now=T0 + timedelta(hours=3)) == T0 + timedelta(hours=7)
    # b was not renewed in time: the provider has taken the node back.
    with pytest.raises(LeaseNotHeld, match="expired at 2026-01-01 04:00:00"):
        p.renew(b.lease_id, now=T0 + timedelta(hours=5))
    assert [h.lease_id for h in p.held()] == [a.lease_id]


def test_leases_are_restored_from_held() -> None:
    before = sim()
    before.acquire(IB.name, 2, now=T0)
    after = sim(held=before.held())
    assert after.held() == before.held()
    (more,) = after.acquire(IB.name, 1, fabric="nebius-eu-north1-f1", now=T0)
    assert more.node.endswith("-0003")  # numbering goes on: no name is handed out twice
    assert after.acquire(IB.name, 1, now=T0)[0].fabric == "nebius-eu-north1-f2"


def test_from_settings_reads_the_catalog_file() -> None:
    settings = {
        "name": "sim",
        "kind": "catalog",
        "path": "catalog.csv",
        "sellers": ["lambda", "nebius"],
        "max_lease_s": 3600,
        "capacity": {"nebius/gpu-h100-sxm_8gpu-128vcpu-1600gb": 1},
    }
    p = CatalogProvider.from_settings(settings, base_dir=SHIPPED.parent)
    assert {s.provider for s in p.skus()} == {"lambda", "nebius"}
    (lease,) = p.acquire("nebius/gpu-h100-sxm_8gpu-128vcpu-1600gb", 1, now=T0)
    assert lease.expires_at == T0 + timedelta(hours=1)
    with pytest.raises(CapacityUnavailable):
        p.acquire("nebius/gpu-h100-sxm_8gpu-128vcpu-1600gb", 1, now=T0)
    with pytest.raises(InvalidArgument) as e:
        CatalogProvider.from_settings(
            {**settings, "capacity": {"lambda/nope": 1}}, base_dir=SHIPPED.parent
        )
    assert [v.field for v in e.value.violations] == ["capacity.lambda/nope"]
