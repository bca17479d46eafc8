"""Builds config/catalog.csv from the public instance catalogs in shared/catalogs (SkyPilot's
format, one vms.csv per cloud) joined with gpu_specs.csv. Reproducible: same input, same bytes.

    python -m gpuctl.providers.catalog_build --src ../shared/catalogs --out config/catalog.csv

What it keeps: GPU instances whose accelerator maps to a row of gpu_specs.csv (ACCELERATORS and
SPEC_ROW below), whole GPUs only, with an on-demand price (spot prices are not used), one row per
provider x instance type x GPU, from the cheapest region (the region is recorded, with how many
regions list it). What it infers: the form factor from names (FORM SIGNALS) and the interconnect,
which no source column states, by the first rule of INTERCONNECT_RULES that fires; the rule's id
goes into `interconnect_source`. config/catalog.README.md says the same for people.

Accelerator names seen in the source, and the gpu_specs.csv row each becomes:

    source AcceleratorName (upper-cased, _ and space as -)        form      gpu_specs.csv row
    H100, H100-SXM, H100-SXM5, H100-80G-SXM5, H100-MEGA, ...      sxm       H100 SXM
    H100-PCIE, H100-80G-PCIE, H100-80G-PCIE-NVLINK, ...           pcie      H100 PCIe
    H100 with no form in any name                                 unknown   H100 PCIe (lower bound)
    H100-NVL, or an H100 named NVL / Azure NC..._H100_v5          -         skipped: H100 NVL has no row
    H200, H200-SXM5                                               any       H200 SXM
    A100, A100-40GB, A100-80GB, A100-80G-PCIE, A100-80G-SXM4,     any       A100 80GB SXM or A100 40GB
      A100-40GB-320GB ... (memory from the name or GpuInfo)                 (by memory; else skipped)
    L40S, L40S-PCIE, L40S-PCIE-BAREMETAL                          pcie      L40S
    L4, L4-PCIE                                                   pcie      L4
    A10 / A10G / T4                                               pcie      A10 / A10G / T4
    V100-32GB, V100-32G-PCIE (32 GB only)                         any       V100 SXM2 32GB
    MI300X                                                        oam       MI300X
    anything else (B200, GH200, L40, A6000, RTX..., TPU, ...)     -         skipped: no row
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from gpuctl.providers.specs import GpuSpec, parse_gpu_specs

# -- accelerator names → GPU family ------------------------------------------------------------

# (family, pattern): the pattern must match the whole normalised AcceleratorName.
ACCELERATORS: tuple[tuple[str, str], ...] = (
    ("H100 NVL", r"H100-NVL"),
    ("H100", r"H100(-MEGA|-NVLINK|-SXM\d?|-80GB?(-SXM\d?|-PCIE(-NVLINK)?)?|-PCIE(-BAREMETAL)?)?"),
    ("H200", r"H200(-SXM\d?)?"),
    ("A100", r"A100(-(40|80)GB?)?(-(SXM4?|PCIE)(-NVLINK)?)?(-\d+GB)?"),
    ("L40S", r"L40S(-PCIE)?(-BAREMETAL)?"),
    ("L4", r"L4(-PCIE)?"),
    ("A10G", r"A10G"),
    ("A10", r"A10"),
    ("T4", r"T4"),
    ("V100", r"(TESLA-)?V100(-(16|32)GB?)?(-PCIE|-SXM2)?"),
    ("MI300X", r"MI300X"),
)

# GPUs sold only as PCIe cards: no NVLink domain whatever the SKU is called.
PCIE_ONLY = frozenset({"L40S", "L4", "A10G", "A10", "T4"})

# (family, form) → gpu_specs.csv row; "*" = any form. A100 and V100 also need their memory.
SPEC_ROW: dict[tuple[str, str], str] = {
    ("H100", "sxm"): "H100 SXM",
    ("H100", "pcie"): "H100 PCIe",
    ("H100", "unknown"): "H100 PCIe",  # the lower bound on every figure
    ("H200", "*"): "H200 SXM",
    ("A100-80", "*"): "A100 80GB SXM",
    ("A100-40", "*"): "A100 40GB",
    ("V100-32", "*"): "V100 SXM2 32GB",
    ("L40S", "*"): "L40S",
    ("L4", "*"): "L4",
    ("A10G", "*"): "A10G",
    ("A10", "*"): "A10",
    ("T4", "*"): "T4",
    ("MI300X", "*"): "MI300X",
}

# -- form factor signals (searched in the accelerator, instance type, upstream id, GpuInfo names)

SXM_SIGNALS: tuple[tuple[str, str], ...] = (
    ("SXM", r"SXM"),
    ("HBM3", r"HBM3"),  # the H100 PCIe has HBM2e: an HBM3 H100 is the SXM5 part
    ("verda .NNS.", r"\.\d+S\."),  # Verda/DataCrunch: 8H100.80S.176V, 1H200.141S.44V
    ("DGX/HGX", r"(?<![A-Z0-9])[DH]GX(?![A-Z0-9])"),
)
PCIE_SIGNALS: tuple[tuple[str, str], ...] = (("PCIe", r"(?<![A-Z])PCIE?(?![A-Z])"),)
NVL_SIGNAL = r"(?<![A-Z])NVL(?![A-Z])"  # H100 NVL (94 GB), not NVLINK
NVLINK_SIGNAL = r"NVLINK"
BAREMETAL_SIGNAL = r"(?<![A-Z0-9])(BM|BAREMETAL|BARE-METAL)(?![A-Z0-9])"

# GCP prices a GPU VM as the host row plus the accelerator-only row for its GPUs, per zone.
GCP_FAMILIES: tuple[tuple[str, str, Callable[[int], int] | None], ...] = (
    # (VM instance type pattern, accelerator row name, GPU count from the captured number)
    (r"a2-highgpu-(\d+)g", "A100", None),
    (r"a2-megagpu-(16)g", "A100", None),
    (r"a2-ultragpu-(\d+)g", "A100-80GB", None),
    (r"a3-highgpu-(\d+)g", "H100", None),
    (r"a3-edgegpu-(8)g(-nolssd)?", "H100", None),
    (r"a3-megagpu-(8)g", "H100-MEGA", None),
    (r"a3-ultragpu-(8)g(-nolssd)?", "H200", None),
    (r"a4-highgpu-(8)g", "B200", None),
    # g2-standard-N: 1 L4 up to 32 vCPUs (except 24: 2), 48: 4, 96: 8.
    (r"g2-standard-(\d+)", "L4", lambda n: {24: 2, 48: 4, 96: 8}.get(n, 1)),
)


# -- interconnect rules ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interconnect:
    nvlink: bool  # the datasheet NVLink (Infinity Fabric) figure applies to every GPU
    kind: str  # infiniband | roce | ethernet
    ports: int = 0  # 0: bandwidth not stated by any source
    gbps_per_port: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """One priced row of a source file (GCP: a VM row joined with its accelerator row)."""

    provider: str
    instance_type: str
    accelerator: str
    count: float
    vcpus: float
    memory_gib: float
    price: float
    region: str
    source_file: str
    signals: str = ""  # upstream id and GpuInfo GPU names, for form factor signals
    gpu_info: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Classified:
    offer: Offer
    family: str  # e.g. "H100", "A100-80"
    form: str  # sxm | pcie | unknown
    spec: GpuSpec
    text: str  # upper-cased names the signals were searched in
    notes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return int(self.offer.count)


@dataclass(frozen=True, slots=True)
class InterconnectRule:
    id: str
    why: str
    fires: Callable[[Classified], Interconnect | None]


def _azure_nd(c: Classified) -> Interconnect | None:
    # In Azure size names the letters after the vCPU count are features; `r` is RDMA, i.e.
    # InfiniBand: ND96isr_H100_v5, ND96amsr_A100_v4, ND96asr_v4, ND40rs_v2.
    m = re.fullmatch(r"Standard_ND\d+([a-z]*)_.*", c.offer.instance_type)
    if c.offer.provider != "azure" or not m or "r" not in m.group(1):
        return None
    ports = {
        "H100": (8, 400.0),
        "H200": (8, 400.0),
        "MI300X": (8, 400.0),
        "A100-40": (8, 200.0),
        "A100-80": (8, 200.0),
        "V100-32": (1, 100.0),
    }.get(c.family)
    return Interconnect(True, "infiniband", *ports) if ports else None


def _gcp(
    pattern: str, kind: str, ports: int, gbps: float
) -> Callable[[Classified], Interconnect | None]:
    def fires(c: Classified) -> Interconnect | None:
        if c.offer.provider == "gcp" and re.fullmatch(pattern, c.offer.instance_type):
            return Interconnect(True, kind, ports, gbps)
        return None

    return fires


def _nebius_8gpu(c: Classified) -> Interconnect | None:
    if c.offer.provider == "nebius" and re.fullmatch(
        r"gpu-h[12]00-sxm_8gpu-.*", c.offer.instance_type
    ):
        return Interconnect(True, "infiniband", 8, 400.0)
    return None


def _sxm8_baremetal(c: Classified) -> Interconnect | None:
    if c.form == "sxm" and c.count == 8 and re.search(BAREMETAL_SIGNAL, c.text):
        return Interconnect(True, "infiniband", 8, 200.0 if c.family.startswith("A100") else 400.0)
    return None


def _one_gpu(c: Classified) -> Interconnect | None:
    return Interconnect(False, "ethernet") if c.count == 1 else None


def _sxm(c: Classified) -> Interconnect | None:
    return Interconnect(True, "ethernet") if c.form == "sxm" else None


def _pcie_bridge(c: Classified) -> Interconnect | None:
    if c.form == "pcie" and re.search(NVLINK_SIGNAL, c.text):
        return Interconnect(False, "ethernet")
    return None


def _pcie(c: Classified) -> Interconnect | None:
    return Interconnect(False, "ethernet") if c.form == "pcie" else None


def _unknown(c: Classified) -> Interconnect | None:
    return Interconnect(False, "ethernet")


# First match wins. Only the first five claim bandwidth between nodes; the rest say
# "ethernet, not stated" (0 Gb/s), which no interconnect floor of a gang will accept.
INTERCONNECT_RULES: tuple[InterconnectRule, ...] = (
    InterconnectRule(
        "azure-nd-infiniband",
        "Azure ND size with r (RDMA) in its features: SXM/OAM board on NVLink (MI300X: Infinity "
        "Fabric); InfiniBand NDR 8x400 Gb/s (H100, H200, MI300X v5), HDR 8x200 (A100 v4), "
        "EDR 1x100 (NDv2), per Azure's size documentation",
        _azure_nd,
    ),
    InterconnectRule(
        "gcp-a3-ultra-roce",
        "GCP a3-ultragpu-8g (H200): NVLink; GPUDirect-RDMA over RoCE, 8x400 Gb/s",
        _gcp(r"a3-ultragpu-8g(-nolssd)?", "roce", 8, 400.0),
    ),
    InterconnectRule(
        "gcp-a3-mega-tcpxo",
        "GCP a3-megagpu-8g (H100): NVLink; GPUDirect-TCPXO Ethernet, 8x200 Gb/s",
        _gcp(r"a3-megagpu-8g", "ethernet", 8, 200.0),
    ),
    InterconnectRule(
        "gcp-a3-high-tcpx",
        "GCP a3-highgpu-8g and a3-edgegpu-8g (H100): NVLink; GPUDirect-TCPX Ethernet, 4x200 Gb/s",
        _gcp(r"a3-(highgpu|edgegpu)-8g(-nolssd)?", "ethernet", 4, 200.0),
    ),
    InterconnectRule(
        "nebius-8gpu-infiniband",
        "Nebius gpu-h100-sxm / gpu-h200-sxm 8-GPU presets, which Nebius joins into GPU clusters "
        "over InfiniBand 8x400 Gb/s",
        _nebius_8gpu,
    ),
    InterconnectRule(
        "sxm8-baremetal-ib-assumed",
        "8 SXM GPUs on a SKU named bare metal (-bm, BAREMETAL): NVLink; InfiniBand 8x400 Gb/s "
        "(A100: 8x200) ASSUMED, as HGX bare-metal nodes are built; no source column states it",
        _sxm8_baremetal,
    ),
    InterconnectRule(
        "one-gpu",
        "a single GPU: no NVLink peer inside the instance; Ethernet, bandwidth not stated",
        _one_gpu,
    ),
    InterconnectRule(
        "sxm-nvlink-only",
        "SXM-class GPUs (a form signal, or a family that is SXM by construction: Azure ND, GCP "
        "a2/a3): NVLink at the datasheet figure; between nodes Ethernet, bandwidth not stated",
        _sxm,
    ),
    InterconnectRule(
        "pcie-nvlink-bridge",
        "PCIe cards on a SKU named NVLink (Hyperstack -NVLink and the like): bridges join pairs, "
        "not every GPU, so no NVLink is claimed; Ethernet, bandwidth not stated",
        _pcie_bridge,
    ),
    InterconnectRule(
        "pcie-card",
        "PCIe cards (L4, L40S, A10, A10G, T4, and parts named PCIe or sold as Azure NC/NV): "
        "no NVLink; Ethernet, bandwidth not stated",
        _pcie,
    ),
    InterconnectRule(
        "form-not-stated",
        "no name says SXM or PCIe (H100, H200, A100, V100 of unknown form): NVLink not claimed; "
        "Ethernet, bandwidth not stated",
        _unknown,
    ),
)
RULE_IDS = tuple(r.id for r in INTERCONNECT_RULES)


# -- reading the sources -----------------------------------------------------------------------

COLUMNS = (
    "sku",
    "provider",
    "instance_type",
    "region",
    "regions_listed",
    "gpu",
    "gpu_count",
    "form_factor",
    "gpu_memory_gb",
    "hbm_gbps",
    "nvlink_gbps",
    "bf16_tflops",
    "net_kind",
    "net_ports",
    "net_gbps",
    "vcpus",
    "memory_gib",
    "price_per_hour",
    "source_accelerator",
    "source_file",
    "interconnect_source",
    "inferred",
)

# Providers whose prices are not list prices (catalogs README §4).
SKIP_PROVIDERS = {"mithril": "prices look like placeholders or bid limits (1.0 per GPU)"}


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def _gpu_names(gpu_info: str) -> str:
    return " ".join(re.findall(r"""['"]name['"]\s*:\s*['"]([^'"]+)""", gpu_info, re.I))


def _rows(path: Path) -> Iterator[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def read_offers(skypilot: Path, skipped: Counter[str]) -> Iterator[Offer]:
    """Every priced GPU row of every source file; what is left out is counted in `skipped`."""
    for path in sorted(skypilot.glob("*.csv")):
        provider = path.stem
        if provider == "gcp":
            yield from _gcp_offers(path, skipped)
            continue
        for row in _rows(path):
            accelerator = (row.get("AcceleratorName") or "").strip()
            if not accelerator:
                continue  # a CPU instance
            if provider in SKIP_PROVIDERS:
                skipped[f"{provider}: {SKIP_PROVIDERS[provider]}"] += 1
                continue
            instance = row.get("InstanceType", "")
            if row.get("SpheronInstanceType") == "SPOT" or re.search(r"SPOT", instance, re.I):
                skipped["spot offer (spot prices are not used)"] += 1
                continue
            price = _float(row.get("Price"))
            if not price or price <= 0:
                skipped["no on-demand price"] += 1
                continue
            gpu_info = row.get("GpuInfo") or ""
            yield Offer(
                provider=provider,
                instance_type=instance,
                accelerator=accelerator,
                count=_float(row.get("AcceleratorCount")) or 0.0,
                vcpus=_float(row.get("vCPUs")) or 0.0,
                memory_gib=_float(row.get("MemoryGiB")) or 0.0,
                price=price,
                region=row.get("Region", ""),
                source_file=f"skypilot/{path.name}",
                signals=f"{row.get('UpstreamCloudId') or ''} {_gpu_names(gpu_info)}",
                gpu_info=gpu_info,
            )


def _gcp_offers(path: Path, skipped: Counter[str]) -> Iterator[Offer]:
    accel: dict[tuple[str, str, str, int], tuple[float, str]] = {}
    vms = []
    for row in _rows(path):
        if row["InstanceType"]:
            vms.append(row)
        elif row["AcceleratorName"] and not row["AcceleratorName"].startswith("tpu-"):
            price = _float(row["Price"])
            count = int(_float(row["AcceleratorCount"]) or 0)
            if price:
                key = (row["Region"], row["AvailabilityZone"], row["AcceleratorName"], count)
                accel[key] = (price, row["GpuInfo"])
    used: set[tuple[str, str, str, int]] = set()
    for row in vms:
        for pattern, name, count_of in GCP_FAMILIES:
            m = re.fullmatch(pattern, row["InstanceType"])
            if not m:
                continue
            n = int(m.group(1))
            count = count_of(n) if count_of else n
            key = (row["Region"], row["AvailabilityZone"], name, count)
            vm_price = _float(row["Price"])
            if key not in accel or not vm_price:
                skipped["GCP VM without both a host and an accelerator price"] += 1
                break
            used.add(key)
            price, gpu_info = accel[key]
            yield Offer(
                provider="gcp",
                instance_type=row["InstanceType"],
                accelerator=name,
                count=float(count),
                vcpus=_float(row["vCPUs"]) or 0.0,
                memory_gib=_float(row["MemoryGiB"]) or 0.0,
                price=round(vm_price + price, 5),
                region=row["Region"],
                source_file=f"skypilot/{path.name}",
                gpu_info=gpu_info,
                notes=("price = GCP host VM row + accelerator row",),
            )
            break
    for key in accel.keys() - used:
        if key[2] in ("T4", "V100", "P100", "P4"):
            skipped["GCP accelerator for n1 hosts (no fixed instance type)"] += 1


# -- classification ----------------------------------------------------------------------------


def _normalise(name: str) -> str:
    return re.sub(r"[_\s]+", "-", name.strip().upper())


def _memory_candidates(gpu_info: str, count: float) -> set[int]:
    """Nominal per-GPU GB that GpuInfo's SizeInMiB could mean: sources give MiB or GB, per GPU
    or for the whole instance, so each reading is tried and only nominal sizes are kept."""
    m = re.search(r"sizeinmib['\"]?\s*:\s*([\d.]+)", gpu_info, re.I)
    value = float(m.group(1)) if m else 0.0
    if value <= 0:
        return set()
    readings = {value, value * 1024}
    if count >= 1:
        readings |= {value / count, value * 1024 / count}
    return {
        gb for gb in (16, 32, 40, 80) for r in readings if abs(r - gb * 1024) <= gb * 1024 * 0.06
    }


def _memory_gb(offer: Offer, text: str, family: str) -> tuple[int | None, str]:
    """(nominal GB, how it was found) for an A100 or V100, whose rows differ by memory."""
    pattern = {
        "A100": r"A100[-_ .]?(?:SXM4?[-_ .]?|PCIE?[-_ .]?)?(40|80)\s*G|A100\.(40|80)S",
        "V100": r"V100[-_ .]?(?:SXM2?[-_ .]?|PCIE?[-_ .]?)?(16|32)\s*G",
    }[family]
    for where in (_normalise(offer.accelerator).replace("-", "_"), text):
        found = {int(g) for m in re.finditer(pattern, where) for g in m.groups() if g}
        if len(found) == 1:
            return found.pop(), ""
    if offer.provider == "azure" and offer.instance_type == "Standard_ND96asr_v4":
        return 40, "Azure ND96asr_v4 is the A100 40 GB part (catalogs README)"
    found = (
        _memory_candidates(offer.gpu_info, offer.count)
        & {
            "A100": {40, 80},
            "V100": {16, 32},
        }[family]
    )
    if len(found) == 1:
        return found.pop(), "GPU memory read from GpuInfo"
    return None, ""


def _form(offer: Offer, family: str, text: str) -> tuple[str, tuple[str, ...]]:
    if family in PCIE_ONLY:
        return "pcie", ()
    if family == "MI300X":
        return "sxm", ()  # OAM modules on Infinity Fabric: SXM-class for every purpose here
    sxm = [name for name, p in SXM_SIGNALS if re.search(p, text)]
    pcie = [name for name, p in PCIE_SIGNALS if re.search(p, text)]
    if offer.provider == "azure":
        (sxm if offer.instance_type.startswith("Standard_ND") else pcie).append("Azure size")
    if offer.provider == "gcp" and re.match(r"a[234]-", offer.instance_type):
        sxm.append("GCP a2/a3 family")
    if sxm and pcie:
        return "pcie", (f"conflicting form signals ({', '.join(sxm + pcie)}): PCIe assumed",)
    if sxm:
        return "sxm", ()
    if pcie:
        return "pcie", ()
    return "unknown", ()


def classify(offer: Offer, specs: dict[str, GpuSpec]) -> Classified | str:
    """The offer with its GPU row and form factor, or why it is left out."""
    name = _normalise(offer.accelerator)
    family = next((fam for fam, p in ACCELERATORS if re.fullmatch(p, name)), None)
    if family is None:
        if name.startswith("TPU-"):
            return "TPU"
        return f"GPU not in gpu_specs.csv: {offer.accelerator}"
    if offer.count < 1 or offer.count != int(offer.count):
        return "fractional GPU count (a share of a GPU)"
    text = f"{offer.accelerator} {offer.instance_type} {offer.signals}".upper()
    if family == "H100 NVL" or (
        family == "H100"
        and (
            re.search(NVL_SIGNAL, text)
            or re.fullmatch(r"Standard_NCC?\d+\w*_H100_v5", offer.instance_type)
        )
    ):
        return "H100 NVL (94 GB): no row in gpu_specs.csv"
    notes = list(offer.notes)
    key = family
    if family in ("A100", "V100"):
        gb, how = _memory_gb(offer, text, family)
        if gb is None:
            return f"{family} memory not stated"
        if family == "V100" and gb != 32:
            return f"V100 {gb} GB: no row in gpu_specs.csv"
        key = f"{family}-{gb}"
        if how:
            notes.append(how)
    form, form_notes = _form(offer, family, text)
    notes.extend(form_notes)
    row = SPEC_ROW.get((key, form)) or SPEC_ROW[(key, "*")]
    if form == "unknown":
        if family == "H100":
            notes.append("form factor not stated: H100 PCIe figures used (the lower bound)")
        else:
            notes.append("form factor not stated: figures are the SXM part's")
    if key == "A100-80" and form == "pcie":
        notes.append("PCIe card: HBM shown is the SXM part's 2039 GB/s (PCIe: 1935)")
    if specs[row].bf16_tflops == 0:
        notes.append("no BF16 on this GPU")
    return Classified(
        offer=offer, family=key, form=form, spec=specs[row], text=text, notes=tuple(notes)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    c: Classified
    rule: InterconnectRule
    link: Interconnect
    regions: frozenset[str] = field(default_factory=frozenset)

    def values(self, sku: str) -> dict[str, str]:
        o, spec = self.c.offer, self.c.spec
        nvlink = spec.nvlink_gbps if self.link.nvlink else 0.0
        return {
            "sku": sku,
            "provider": o.provider,
            "instance_type": o.instance_type,
            "region": o.region,
            "regions_listed": str(len(self.regions)),
            "gpu": spec.model,
            "gpu_count": str(self.c.count),
            "form_factor": self.c.form,
            "gpu_memory_gb": f"{spec.memory_gb:g}",
            "hbm_gbps": f"{spec.hbm_gbps:g}",
            "nvlink_gbps": f"{nvlink:g}",
            "bf16_tflops": f"{spec.bf16_tflops:g}",
            "net_kind": self.link.kind,
            "net_ports": str(self.link.ports),
            "net_gbps": f"{self.link.ports * self.link.gbps_per_port:g}",
            "vcpus": f"{o.vcpus:g}",
            "memory_gib": f"{o.memory_gib:g}",
            "price_per_hour": f"{round(o.price, 4):g}",
            "source_accelerator": o.accelerator,
            "source_file": o.source_file,
            "interconnect_source": self.rule.id,
            "inferred": "; ".join(self.c.notes),
        }


@dataclass(frozen=True, slots=True)
class Report:
    rows: int
    offers: int
    skipped: Counter[str]
    by_rule: Counter[str]
    by_gpu: Counter[str]
    by_provider: Counter[str]

    def lines(self) -> list[str]:
        out = [f"{self.rows} catalog rows from {self.offers} priced GPU offers"]
        for title, counts in (
            ("interconnect_source", self.by_rule),
            ("gpu", self.by_gpu),
            ("provider", self.by_provider),
            ("left out", self.skipped),
        ):
            out.append(f"{title}:")
            out.extend(f"  {n:6d}  {what}" for what, n in sorted(counts.items(), key=_by_count))
        return out


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


def build(src: Path) -> tuple[list[dict[str, str]], Report]:
    """The catalog rows (sorted, one per provider x instance type x GPU) and what went where."""
    specs = parse_gpu_specs((src / "gpu_specs.csv").read_text(encoding="utf-8"))
    skipped: Counter[str] = Counter()
    best: dict[tuple[str, str, str], Row] = {}
    offers = 0
    for offer in read_offers(src / "skypilot", skipped):
        offers += 1
        c = classify(offer, specs)
        if isinstance(c, str):
            skipped[c] += 1
            continue
        rule, link = next((r, link) for r in INTERCONNECT_RULES if (link := r.fires(c)) is not None)
        key = (offer.provider, offer.instance_type, c.spec.model)
        row = Row(c=c, rule=rule, link=link, regions=frozenset({offer.region}))
        seen = best.get(key)
        if seen is not None:
            regions = seen.regions | row.regions
            cheaper = (offer.price, offer.region) < (seen.c.offer.price, seen.c.offer.region)
            row = replace(row if cheaper else seen, regions=regions)
        best[key] = row
    # A SKU name is provider/instance type; where one instance type comes with two GPUs (Vast's
    # A100 in 40 and 80 GB), the GPU row is added to keep it unique.
    names = Counter((p, i) for p, i, _ in best)
    out = []
    for (provider, instance, gpu), row in sorted(best.items(), key=_order):
        sku = f"{provider}/{instance}"
        if names[(provider, instance)] > 1:
            sku += f"@{re.sub(r'[^a-z0-9]+', '-', gpu.lower())}"
        out.append(row.values(sku))
    report = Report(
        rows=len(out),
        offers=offers,
        skipped=skipped,
        by_rule=Counter(r["interconnect_source"] for r in out),
        by_gpu=Counter(r["gpu"] for r in out),
        by_provider=Counter(r["provider"] for r in out),
    )
    return out, report


def _order(item: tuple[tuple[str, str, str], Row]) -> tuple[str, str, int, float, str]:
    (provider, instance, gpu), row = item
    return (provider, gpu, row.c.count, row.c.offer.price, instance)


def render(rows: Sequence[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuctl.providers.catalog_build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--src", type=Path, required=True, help="the shared/catalogs folder")
    parser.add_argument("--out", type=Path, required=True, help="where to write catalog.csv")
    args = parser.parse_args(argv)
    rows, report = build(args.src)
    args.out.write_text(render(rows), encoding="utf-8")
    print(f"wrote {args.out}", *report.lines(), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
