"""The `Provider` protocol every lease provider implements, the values it trades in, and its errors.

A provider sells SKUs, hands out leases on nodes (`acquire`), extends (`renew`) and ends them
(`release`), and says what it believes we hold (`held`) so the daemon can reconcile after a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from gpuctl.core.errors import (
    FailedPrecondition,
    FieldViolation,
    GpuctlError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from gpuctl.core.leasing import Offer
from gpuctl.core.model import Network


@dataclass(frozen=True, slots=True, kw_only=True)
class Sku:
    """One kind of node a provider can lease, with the figures the scheduler ranks it by."""

    provider: str  # who sells it: the provider's name, or the cloud a catalog row came from
    name: str  # unique within the Provider that lists it: what `acquire` takes
    instance_type: str = ""  # the seller's own name for it ("" = same as name)
    gpu_model: str = ""  # a row of gpu_specs.csv, e.g. "H100 SXM"; "" = not known
    gpu_count: int = 0
    gpu_memory_gb: float = 0.0  # per GPU, nominal vendor GB
    hbm_gbps: float = 0.0  # per GPU
    nvlink_gbps: float = 0.0  # per GPU; 0 = no NVLink domain across the node's GPUs
    bf16_tflops: float = 0.0  # dense, per GPU; 0 where the GPU has no BF16
    network: Network = field(default_factory=Network)  # between nodes; 0 Gb/s = not stated
    region: str = ""
    price_per_hour: float = 0.0  # the whole node, on-demand
    max_lease: timedelta | None = None  # how long one grant lasts before `renew`; None = unlimited
    vcpus: float = 0.0
    memory_gib: float = 0.0  # host memory
    form_factor: str = ""  # "sxm" | "pcie" | "unknown" | "" (not recorded)
    interconnect_source: str = ""  # the catalog rule that inferred NVLink and network
    inferred: tuple[str, ...] = ()  # every figure above that was assumed rather than read

    def offer(self, *, provider: str, renewable: bool) -> Offer:
        """This SKU as the scheduling core ranks it, leased through `provider`.

        Vendor "80 GB" of HBM is taken as 80 GiB."""
        return Offer(
            provider=provider,
            sku=self.name,
            gpu_model=self.gpu_model,
            gpu_count=self.gpu_count,
            gpu_memory_mib=int(self.gpu_memory_gb * 1024),
            hbm_gbps=self.hbm_gbps,
            nvlink_gbps=self.nvlink_gbps,
            network_gbps=self.network.total_gbps,
            bf16_tflops=self.bf16_tflops,
            cpu_milli=int(self.vcpus * 1000),
            memory_mib=int(self.memory_gib * 1024),
            region=self.region,
            price_per_hour=self.price_per_hour,
            max_lease_s=self.max_lease.total_seconds() if self.max_lease else 0.0,
            renewable=renewable,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquired:
    """One node under lease: what `acquire` returns and, for the same lease, what `held` lists."""

    lease_id: str  # the provider's id; unique for the provider's lifetime, never reused
    sku: str
    node: str = ""  # "" until the provider knows it (the node's agent will register)
    address: str = ""
    fabric: str = ""  # fabric path "fabric/spine/leaf"; "" = not on a fabric that can gang
    price_per_hour: float = 0.0
    acquired_at: datetime | None = None
    expires_at: datetime | None = None  # None = until released


# The same record: `held()` after a restart must say exactly what `acquire` said before it.
Held = Acquired


@runtime_checkable
class Provider(Protocol):
    """Where leased nodes come from. Calls may block on I/O (the command provider runs scripts)."""

    @property
    def name(self) -> str: ...

    def skus(self) -> tuple[Sku, ...]: ...

    @property
    def can_renew(self) -> bool:
        """Whether `renew` extends a lease (False: a lease ends when it expires)."""
        ...

    def inventory(self) -> tuple[str, ...]:
        """Names of nodes of the provider's own (a lab's machines) that serve only while leased
        through it: the daemon refuses them otherwise. () for a cloud."""
        ...

    def acquire(
        self, sku: str, count: int, *, fabric: str | None = None, now: datetime
    ) -> tuple[Acquired, ...]:
        """`count` nodes of `sku`, all or none; with `fabric`, all on that fabric.

        Raises CapacityUnavailable when the provider cannot supply them now."""
        ...

    def renew(self, lease_id: str, *, now: datetime) -> datetime | None:
        """Extends a held lease; returns its new expiry (None: it does not expire)."""
        ...

    def release(self, lease_id: str, *, now: datetime) -> None:
        """Ends a lease. Idempotent: an unknown or already released lease returns quietly."""
        ...

    def held(self) -> tuple[Held, ...]: ...


# -- errors ------------------------------------------------------------------------------------


class ProviderError(GpuctlError):
    """A provider could not do what was asked; `str()` is one line an operator can act on."""

    def __init__(self, provider: str, message: str) -> None:
        self.provider = provider
        self.message = message
        Exception.__init__(self, f"provider {provider}: {message}")


class CapacityUnavailable(ProviderError, Unavailable):
    """No such capacity now: try another SKU or provider, or again later."""


class ProviderMisbehaved(ProviderError, Unavailable):
    """The provider answered with garbage, failed, or did not answer in time."""

    def __init__(self, provider: str, message: str, stderr_tail: tuple[str, ...] = ()) -> None:
        self.stderr_tail = stderr_tail
        super().__init__(provider, message)


class ProviderMisconfigured(ProviderError, FailedPrecondition):
    """The provider cannot work as configured (missing script, bad setting); retrying won't help."""


class UnknownSku(ProviderError, NotFound):
    def __init__(self, provider: str, sku: str) -> None:
        self.kind, self.name = "sku", sku
        super().__init__(provider, f"does not offer sku {sku!r}")


class LeaseNotHeld(ProviderError, NotFound):
    """`renew` of a lease the provider does not hold (never did, released, or expired)."""

    def __init__(self, provider: str, lease_id: str, why: str = "holds no such lease") -> None:
        self.kind, self.name = "lease", lease_id
        super().__init__(provider, f"lease {lease_id}: {why}")


# -- shared checks -----------------------------------------------------------------------------


def check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgument(
            [FieldViolation("count", f"must be a whole number >= 1, got {count!r}")]
        )


def check_now(now: datetime) -> None:
    # Lease times are compared across providers and the store: a naive datetime would be a bug.
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise InvalidArgument([FieldViolation("now", "must be a timezone-aware datetime")])


def slug(text: str) -> str:
    """A name fit for a host name: lower case, runs of other characters folded to '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
