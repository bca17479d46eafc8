"""The static provider: nodes that already exist (an on-prem cluster, a reserved block), listed in
config. "Acquire" claims free ones, "release" hands them back; nothing is created or destroyed.

Claims live in memory only: after a restart the daemon passes back the leases its store holds
(`claimed=`), which is how a claim survives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from gpuctl.core.errors import FieldViolation
from gpuctl.providers.base import (
    Acquired,
    CapacityUnavailable,
    Held,
    LeaseNotHeld,
    Sku,
    UnknownSku,
    check_count,
    check_now,
)
from gpuctl.providers.settings import SKU_FIELDS, Fields, raise_if, sku_from

NODE_FIELDS = ("name", "address", "sku", "fabric", *SKU_FIELDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticNode:
    name: str
    address: str
    sku: Sku
    fabric: str = ""  # fabric path "fabric/spine/leaf"; "" = on no fabric that can gang
    price_per_hour: float = 0.0  # this node's own (amortised) cost; the SKU shows the lowest

    @property
    def fabric_name(self) -> str:
        return self.fabric.split("/", 1)[0]


def _on_fabric(node: StaticNode, fabric: str) -> bool:
    # A request names the fabric ("ib0") or a narrower part of its path ("ib0/spine1").
    return node.fabric == fabric or node.fabric.startswith(fabric + "/")


class StaticProvider:
    def __init__(
        self, nodes: Iterable[StaticNode], *, name: str = "static", claimed: Iterable[Held] = ()
    ) -> None:
        self._name = name
        self._nodes = tuple(nodes)
        violations: list[FieldViolation] = []
        by_name: dict[str, StaticNode] = {}
        skus: dict[str, Sku] = {}
        for i, node in enumerate(self._nodes):
            if node.name in by_name:
                violations.append(FieldViolation(f"node[{i}].name", f"{node.name} is listed twice"))
            by_name[node.name] = node
            first = skus.get(node.sku.name)
            if first is None:
                skus[node.sku.name] = replace(node.sku, price_per_hour=node.price_per_hour)
            elif replace(first, price_per_hour=0.0) != replace(node.sku, price_per_hour=0.0):
                violations.append(
                    FieldViolation(
                        f"node[{i}].sku",
                        f"{node.name} is sku {node.sku.name} but differs from its other nodes "
                        "(GPU model, count, network or region); give it its own sku name",
                    )
                )
            else:
                skus[first.name] = replace(
                    first, price_per_hour=min(first.price_per_hour, node.price_per_hour)
                )
        raise_if(violations)
        self._by_name = by_name
        self._skus = tuple(skus.values())
        self._lock = threading.Lock()
        self._seq = 0
        # Claims of nodes no longer in the inventory are dropped: held() then omits them, so
        # reconciliation sees those leases gone rather than the provider inventing nodes.
        self._claims: dict[str, Held] = {c.node: c for c in claimed if c.node in by_name}

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, object], *, claimed: Iterable[Held] = ()
    ) -> StaticProvider:
        """From a `[[provider]]` table of kind "static" (see config/providers.toml)."""
        out: list[FieldViolation] = []
        top = Fields(settings, "", out)
        top.only(("name", "kind", "node"))
        name = top.text("name", required=True, default="static")
        raw_nodes = settings.get("node", [])
        if not isinstance(raw_nodes, list) or not raw_nodes:
            out.append(FieldViolation("node", "must list at least one [[provider.node]]"))
            raw_nodes = []
        nodes = []
        for i, raw in enumerate(raw_nodes):
            f = Fields(raw, f"node[{i}]", out)
            f.only(NODE_FIELDS)
            sku = sku_from(f, provider=name, name=f.text("sku", required=True))
            nodes.append(
                StaticNode(
                    name=f.text("name", required=True),
                    address=f.text("address", required=True),
                    sku=sku,
                    fabric=f.text("fabric"),
                    price_per_hour=sku.price_per_hour,
                )
            )
        raise_if(out)
        return cls(nodes, name=name, claimed=claimed)

    @property
    def name(self) -> str:
        return self._name

    def skus(self) -> tuple[Sku, ...]:
        return self._skus

    @property
    def nodes(self) -> tuple[StaticNode, ...]:
        return self._nodes

    @property
    def can_renew(self) -> bool:
        return True

    def inventory(self) -> tuple[str, ...]:
        """The inventory: what the daemon refuses to take in unless it is leased."""
        return tuple(n.name for n in self._nodes)

    def acquire(
        self, sku: str, count: int, *, fabric: str | None = None, now: datetime
    ) -> tuple[Acquired, ...]:
        check_count(count)
        check_now(now)
        if not any(s.name == sku for s in self._skus):
            raise UnknownSku(self._name, sku)
        with self._lock:
            free = [n for n in self._nodes if n.sku.name == sku and n.name not in self._claims]
            if fabric is not None:
                free = [n for n in free if _on_fabric(n, fabric)]
            chosen = self._choose(free, count)
            if chosen is None:
                where = f" on fabric {fabric}" if fabric is not None else ""
                raise CapacityUnavailable(
                    self._name, f"sku {sku}: {len(free)} of {count} nodes free{where}"
                )
            got = []
            for node in chosen:
                self._seq += 1
                lease = Acquired(
                    lease_id=f"{self._name}/{node.name}/{now:%Y%m%dT%H%M%SZ}-{self._seq}",
                    sku=sku,
                    node=node.name,
                    address=node.address,
                    fabric=node.fabric,
                    price_per_hour=node.price_per_hour,
                    acquired_at=now,
                )
                self._claims[node.name] = lease
                got.append(lease)
            return tuple(got)

    @staticmethod
    def _choose(free: list[StaticNode], count: int) -> list[StaticNode] | None:
        """`count` of `free`, on one fabric where one has room: the smallest island that fits,
        so larger islands stay whole for larger gangs."""
        if len(free) < count:
            return None
        islands: dict[str, list[StaticNode]] = {}
        for node in free:
            if node.fabric_name:
                islands.setdefault(node.fabric_name, []).append(node)
        fits = [nodes for nodes in islands.values() if len(nodes) >= count]
        if fits:
            best = min(fits, key=lambda nodes: (len(nodes), nodes[0].fabric_name))
            # Sorted by path, so the nodes share as many leaf switches as the island allows.
            return sorted(best, key=lambda n: n.fabric)[:count]
        return free[:count]

    def renew(self, lease_id: str, *, now: datetime) -> datetime | None:
        check_now(now)
        with self._lock:
            if not any(c.lease_id == lease_id for c in self._claims.values()):
                raise LeaseNotHeld(self._name, lease_id)
        return None  # the nodes are ours: a claim never expires

    def release(self, lease_id: str, *, now: datetime) -> None:
        check_now(now)
        with self._lock:
            for node, claim in list(self._claims.items()):
                if claim.lease_id == lease_id:
                    del self._claims[node]

    def held(self) -> tuple[Held, ...]:
        with self._lock:
            return tuple(sorted(self._claims.values(), key=lambda c: c.lease_id))
