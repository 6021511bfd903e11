"""Picking NodePorts for Services with allocateLoadBalancerNodePorts: false (pure).

The apiserver arbitrates: the operator proposes free ports, and on a conflict picks again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def used_node_ports(services: Iterable[Mapping[str, Any]]) -> set[int]:
    used: set[int] = set()
    for service in services:
        spec = service.get("spec") or {}
        used.update(p["nodePort"] for p in spec.get("ports") or () if p.get("nodePort"))
        if spec.get("healthCheckNodePort"):
            used.add(int(spec["healthCheckNodePort"]))
    return used


def pick_node_ports(count: int, used: set[int], low: int, high: int, start: int = 0) -> list[int]:
    """`count` free ports in [low, high], scanning from an offset so concurrent pickers spread out."""
    span = high - low + 1
    picked: list[int] = []
    for step in range(span):
        port = low + (start + step) % span
        if port not in used:
            picked.append(port)
            if len(picked) == count:
                return picked
    raise ValueError(f"no {count} free NodePorts left in {low}-{high}")


def with_node_ports(ports: list[Mapping[str, Any]], chosen: Iterable[int]) -> list[dict[str, Any]]:
    """spec.ports with each port lacking a nodePort given the next chosen one."""
    supply = iter(chosen)
    return [dict(p) if p.get("nodePort") else {**p, "nodePort": next(supply)} for p in ports]
