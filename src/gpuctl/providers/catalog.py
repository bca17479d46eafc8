"""The catalog provider: simulated nodes of any SKU in config/catalog.csv (real instance types and
list prices), acquired instantly under deterministic names, for `gpuctl simulate` and the demo.
Nothing real is leased or billed; the prices are what it would have cost.
"""

from __future__ import annotations

import csv
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import NetKind, Network
from gpuctl.providers.base import (
    Acquired,
    CapacityUnavailable,
    Held,
    LeaseNotHeld,
    Sku,
    UnknownSku,
    check_count,
    check_now,
    slug,
)
from gpuctl.providers.settings import Fields, raise_if

REQUIRED_COLUMNS = (
    "sku",
    "provider",
    "instance_type",
    "region",
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
    "interconnect_source",
    "inferred",
)
_NAME_PART = 40  # of the instance type in a node name: host name labels stop at 63


def parse_catalog(text: str) -> tuple[Sku, ...]:
    """The SKUs of a catalog CSV (catalog_build's format); every bad cell is reported."""
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise InvalidArgument([FieldViolation("catalog", f"lacks columns {', '.join(missing)}")])
    out: list[FieldViolation] = []
    skus: dict[str, Sku] = {}
    for line, row in enumerate(reader, start=2):
        where = f"catalog line {line}"

        def number(column: str, row: dict[str, str] = row, where: str = where) -> float:
            return _number(row, column, where, out)

        try:
            kind = NetKind(row["net_kind"])
        except ValueError:
            out.append(FieldViolation(f"{where}.net_kind", f"unknown: {row['net_kind']!r}"))
            kind = NetKind.ETHERNET
        ports, total = int(number("net_ports")), number("net_gbps")
        sku = Sku(
            provider=row["provider"],
            name=row["sku"],
            instance_type=row["instance_type"],
            gpu_model=row["gpu"],
            gpu_count=int(number("gpu_count")),
            gpu_memory_gb=number("gpu_memory_gb"),
            hbm_gbps=number("hbm_gbps"),
            nvlink_gbps=number("nvlink_gbps"),
            bf16_tflops=number("bf16_tflops"),
            network=Network(kind=kind, ports=ports, gbps_per_port=total / ports if ports else 0.0),
            region=row["region"],
            price_per_hour=number("price_per_hour"),
            vcpus=number("vcpus"),
            memory_gib=number("memory_gib"),
            form_factor=row["form_factor"],
            interconnect_source=row["interconnect_source"],
            inferred=tuple(n for n in row["inferred"].split("; ") if n),
        )
        if sku.name in skus:
            out.append(FieldViolation(f"{where}.sku", f"{sku.name} is listed twice"))
        skus[sku.name] = sku
    raise_if(out)
    return tuple(skus.values())


def _number(row: dict[str, str], column: str, where: str, out: list[FieldViolation]) -> float:
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        out.append(FieldViolation(f"{where}.{column}", f"must be a number: {row[column]!r}"))
        return 0.0
    if value < 0:
        out.append(FieldViolation(f"{where}.{column}", f"must be >= 0: {value:g}"))
    return value


def load_catalog(path: Path) -> tuple[Sku, ...]:
    return parse_catalog(path.read_text(encoding="utf-8"))


class CatalogProvider:
    def __init__(
        self,
        skus: Iterable[Sku],
        *,
        name: str = "catalog",
        max_lease: timedelta | None = None,
        capacity: Mapping[str, int] | None = None,
        held: Iterable[Held] = (),
    ) -> None:
        """`capacity` caps the nodes of a SKU held at once (simulated scarcity; default: none);
        `held` restores the leases of a previous run."""
        self._name = name
        self._skus = {s.name: replace(s, max_lease=max_lease) for s in skus}
        self._max_lease = max_lease
        self._capacity = dict(capacity or {})
        self._lock = threading.Lock()
        self._leases: dict[str, Held] = {h.lease_id: h for h in held}
        self._fabrics: dict[str, tuple[str, str]] = {}  # fabric → (seller, region)
        self._seq = 0
        self._fabric_seq = 0
        for lease in self._leases.values():
            if m := re.search(r"-(\d+)$", lease.node):
                self._seq = max(self._seq, int(m.group(1)))
            if m := re.search(r"-f(\d+)$", lease.fabric):
                self._fabric_seq = max(self._fabric_seq, int(m.group(1)))
            sku = self._skus.get(lease.sku)
            if lease.fabric and sku is not None:
                self._fabrics[lease.fabric] = (sku.provider, sku.region)

    @classmethod
    def from_settings(
        cls,
        settings: Mapping[str, object],
        *,
        base_dir: Path = Path("."),
        held: Iterable[Held] = (),
    ) -> CatalogProvider:
        """From a `[[provider]]` table of kind "catalog" (see config/providers.toml)."""
        out: list[FieldViolation] = []
        f = Fields(settings, "", out)
        f.only(("name", "kind", "path", "max_lease_s", "sellers", "capacity"))
        name = f.text("name", required=True, default="catalog")
        path = f.text("path", required=True)
        max_lease_s = f.number("max_lease_s")
        sellers = settings.get("sellers", [])
        if not isinstance(sellers, list) or not all(isinstance(s, str) for s in sellers):
            f.bad("sellers", "must be a list of provider names from the catalog, e.g. ['lambda']")
            sellers = []
        capacity_raw = settings.get("capacity", {})
        capacity = {}
        if isinstance(capacity_raw, Mapping):
            g = Fields(capacity_raw, "capacity", out)
            capacity = {sku: g.whole(sku) for sku in capacity_raw}
        else:
            f.bad("capacity", "must be a table of sku = nodes")
        raise_if(out)
        skus = load_catalog(base_dir / path)
        if sellers:
            skus = tuple(s for s in skus if s.provider in sellers)
        unknown = sorted(set(capacity) - {s.name for s in skus})
        if unknown:
            raise InvalidArgument(
                [FieldViolation(f"capacity.{u}", "is not a sku of this catalog") for u in unknown]
            )
        return cls(
            skus,
            name=name,
            max_lease=timedelta(seconds=max_lease_s) if max_lease_s else None,
            capacity=capacity,
            held=held,
        )

    @property
    def name(self) -> str:
        return self._name

    def skus(self) -> tuple[Sku, ...]:
        return tuple(self._skus.values())

    @property
    def can_renew(self) -> bool:
        return True

    def inventory(self) -> tuple[str, ...]:
        return ()

    def acquire(
        self, sku: str, count: int, *, fabric: str | None = None, now: datetime
    ) -> tuple[Acquired, ...]:
        check_count(count)
        check_now(now)
        offer = self._skus.get(sku)
        if offer is None:
            raise UnknownSku(self._name, sku)
        with self._lock:
            cap = self._capacity.get(sku)
            in_use = sum(1 for lease in self._leases.values() if lease.sku == sku)
            if cap is not None and in_use + count > cap:
                raise CapacityUnavailable(
                    self._name, f"sku {sku}: {max(cap - in_use, 0)} of {count} nodes left"
                )
            on = self._fabric_for(offer, fabric)
            got = []
            for _ in range(count):
                self._seq += 1
                node = f"{slug(offer.provider)}-{slug(offer.instance_type)[:_NAME_PART]}"
                node = f"{node.rstrip('-')}-{self._seq:04d}"
                lease = Acquired(
                    lease_id=f"{self._name}/{node}",
                    sku=sku,
                    node=node,
                    fabric=on,
                    price_per_hour=offer.price_per_hour,
                    acquired_at=now,
                    expires_at=now + self._max_lease if self._max_lease else None,
                )
                self._leases[lease.lease_id] = lease
                got.append(lease)
            return tuple(got)

    def _fabric_for(self, offer: Sku, fabric: str | None) -> str:
        """The fabric new nodes of `offer` join: a fresh one per call, so the nodes of one
        acquire can be ganged; none where the SKU states no network between nodes."""
        can_gang = offer.network.total_gbps > 0
        if fabric is None:
            if not can_gang:
                return ""
            self._fabric_seq += 1
            new = f"{slug(offer.provider)}-{slug(offer.region)}-f{self._fabric_seq}"
            self._fabrics[new] = (offer.provider, offer.region)
            return new
        if not can_gang:
            raise CapacityUnavailable(
                self._name,
                f"sku {offer.name} states no network between nodes ({offer.interconnect_source}):"
                f" it cannot join fabric {fabric}",
            )
        where = self._fabrics.get(fabric)
        if where is None:
            raise CapacityUnavailable(self._name, f"has no fabric {fabric}")
        if where != (offer.provider, offer.region):
            raise CapacityUnavailable(
                self._name,
                f"fabric {fabric} is in {where[0]} {where[1]}, sku {offer.name} in "
                f"{offer.provider} {offer.region}",
            )
        return fabric

    def renew(self, lease_id: str, *, now: datetime) -> datetime | None:
        check_now(now)
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise LeaseNotHeld(self._name, lease_id)
            if lease.expires_at is not None and lease.expires_at <= now:
                # Too late: a real provider has reclaimed the node by now.
                del self._leases[lease_id]
                raise LeaseNotHeld(self._name, lease_id, f"expired at {lease.expires_at:%F %T%z}")
            expires_at = now + self._max_lease if self._max_lease else None
            self._leases[lease_id] = replace(lease, expires_at=expires_at)
            return expires_at

    def release(self, lease_id: str, *, now: datetime) -> None:
        check_now(now)
        with self._lock:
            self._leases.pop(lease_id, None)

    def held(self) -> tuple[Held, ...]:
        with self._lock:
            return tuple(sorted(self._leases.values(), key=lambda lease: lease.lease_id))
