"""Is a node's claimed fabric plausible? Operators declare fabric paths in the agent config;
the InfiniBand/RoCE ports each agent measured say whether the claim can be true."""

from __future__ import annotations

from collections.abc import Iterable

from gpuctl.core.model import Node


def _active(node: Node) -> list[tuple[str, str, str]]:
    """(device/port, link layer, GUID) of the node's ACTIVE ports."""
    return [
        (f"{p.device}/{p.port}", p.link_layer, p.guid)
        for p in node.profile.ib_ports
        if p.state.split(":")[-1].strip().upper() == "ACTIVE"
    ]


def fabric_issues(node: Node, others: Iterable[Node]) -> tuple[str, ...]:
    """What makes `node`'s fabric claim implausible against the other known nodes; empty if
    nothing does. Ganging trusts the claim, so these are warnings for the operator."""
    if not node.fabric_name:
        return ()
    peers = [o for o in others if o.id != node.id]
    issues: list[str] = []
    mine = _active(node)
    owners = {guid: o.id for o in peers for _, _, guid in _active(o) if guid}
    for port, _, guid in mine:
        if guid and guid in owners:
            issues.append(f"port {port} GUID {guid} is also reported by node {owners[guid]}")
    same_fabric = [o for o in peers if o.fabric_name == node.fabric_name and _active(o)]
    if same_fabric:
        theirs = sorted({layer for o in same_fabric for _, layer, _ in _active(o)})
        if not mine:
            issues.append(
                f"claims fabric {node.fabric_name} but has no active InfiniBand/RoCE port "
                f"(its other nodes have {', '.join(theirs)})"
            )
        else:
            ours = sorted({layer for _, layer, _ in mine})
            if not set(ours) & set(theirs):
                issues.append(
                    f"claims fabric {node.fabric_name} with {', '.join(ours)} ports; "
                    f"its other nodes use {', '.join(theirs)}"
                )
    return tuple(issues)
