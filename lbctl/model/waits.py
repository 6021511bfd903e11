"""Why a pending Service waits, and which changes can end the wait (pure).

A provider that cannot serve a Service *yet* raises `PendingError` carrying a `Wait`: the pools
whose freed addresses could serve it, the address it asked for, eligible nodes, free NodePorts, or
a new or changed pool. The operator keeps each pending Service's `Wait` and, for every change it
sees (a Service released, addresses freed, pools or the eligible node set changed), requeues only
the Services for which `wakes(wait, change, key)` holds. For a pool change, the provider, which
owns the pools, names the waiting Services a new or changed pool may serve (the local provider by
its allocator's rules: the pool asked for, who the pool admits, its address families); a change to
any other pool, or to a BGP peer, wakes nobody. Anything else waits for its timer, which backs
off to minutes (see lbctl.model.outcome).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class WaitFor(StrEnum):
    ADDRESS = "address"  # a free address in one of `ranges` (pools exhausted, an address held)
    POOL = "pool"  # a pool that serves it (none admits it, none has its families)
    NODES = "nodes"  # an eligible node
    NODE_PORTS = "node-ports"  # free NodePorts in the apiserver's range


#: (IP version, first, last) as integers, inclusive
Range = tuple[int, int, int]


@dataclass(frozen=True)
class Wait:
    kind: WaitFor
    pools: tuple[str, ...] = ()  # ADDRESS: the pools it may take an address from
    ranges: tuple[Range, ...] = ()  # ADDRESS: their usable addresses (or just the address it asked for)
    holders: tuple[str, ...] = ()  # ADDRESS: Services ("ns/name") holding the address it asked for

    def describe(self) -> str:
        if self.kind is WaitFor.ADDRESS:
            if self.holders:
                return f"an address held by {', '.join(self.holders)}"
            return f"a free address in pool {', '.join(self.pools)}" if self.pools else "a free address"
        if self.kind is WaitFor.POOL:
            return "a pool that serves it"
        if self.kind is WaitFor.NODES:
            return "an eligible node"
        return "free NodePorts"


class ChangeKind(StrEnum):
    FREED = "freed"  # a Service released its balancer or moved off addresses
    POOLS = "pools"  # pools were created, changed or deleted; `services`: whom they may serve
    NODES = "nodes"  # the eligible node set changed


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    service: str = ""  # FREED: whose
    addresses: tuple[str, ...] = ()  # FREED: the addresses it no longer holds
    node_ports: bool = False  # FREED: whether it gave NodePorts back (deleted, or no longer a LoadBalancer)
    services: frozenset[str] = frozenset()  # POOLS: the Services a new or changed pool may serve

    def describe(self) -> str:
        if self.kind is ChangeKind.FREED:
            what = ", ".join(self.addresses) or "nothing"
            return f"{self.service} freed {what}{' and its NodePorts' if self.node_ports else ''}"
        return "pools changed" if self.kind is ChangeKind.POOLS else "eligible nodes changed"


def address_range(ip: str) -> Range:
    parsed = ipaddress.ip_address(ip)
    return parsed.version, int(parsed), int(parsed)


def _inside(address: str, ranges: Iterable[Range]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(version == ip.version and first <= int(ip) <= last for version, first, last in ranges)


def wakes(wait: Wait, change: Change, waiter: str = "") -> bool:
    """Whether `change` may satisfy what Service `waiter` ("ns/name") waits for."""
    if change.kind is ChangeKind.POOLS:
        return wait.kind in (WaitFor.ADDRESS, WaitFor.POOL) and waiter in change.services
    if change.kind is ChangeKind.NODES:
        return wait.kind is WaitFor.NODES
    if wait.kind is WaitFor.NODE_PORTS:
        return change.node_ports
    if wait.kind is WaitFor.ADDRESS:
        return change.service in wait.holders or any(_inside(a, wait.ranges) for a in change.addresses)
    return False
