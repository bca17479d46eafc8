"""Leasing in the pure core: which offer to lease for work the leased nodes cannot take, what a
queue's budget allows, which nodes a job may not use because of their lease, and which
leases to give back. Offers are plain values: the core never sees a provider.

- `terms`: offers, budgets, spend, the lease side of a cycle's input, requests and releases;
- `offers`: which offer for a gang or for replicas, and the budget book;
- `blocks`: what a job may not use because of a node's lease (asked while placing);
- `phase`: the cycle's lease phase over what stayed unplaced (`plan_leases`).
"""

from gpuctl.core.leasing.blocks import LeaseBlocks, Refused, busy_seconds
from gpuctl.core.leasing.offers import floors, gang_options, offer_misfit, replica_options
from gpuctl.core.leasing.phase import LeasePlan, plan_leases
from gpuctl.core.leasing.terms import (
    Budget,
    LeaseRelease,
    LeaseRequest,
    Leasing,
    Offer,
    Spend,
    managed,
)

__all__ = [
    "Budget",
    "LeaseBlocks",
    "LeasePlan",
    "LeaseRelease",
    "LeaseRequest",
    "Leasing",
    "Offer",
    "Refused",
    "Spend",
    "busy_seconds",
    "floors",
    "gang_options",
    "managed",
    "offer_misfit",
    "plan_leases",
    "replica_options",
]
