"""Which node announces which VIP (pure).

Every forwarder computes the same answer from the same inputs, so no election is needed.

- A VIP stays with the node that holds it while that node is alive and eligible: every move
  resets the established flows through the VIP, so nothing moves merely because a node joined or
  came back (no fail-back). Holders are known from the peers' heartbeats (their claims).
- A VIP nobody eligible holds goes to the eligible live node with the highest rendezvous score
  sha256(node, VIP): when a node dies only its VIPs move, each to a different survivor.
- Two holders (a late heartbeat from before a cut, a healed partition): the newer take (the higher
  generation) keeps it; on a tie the higher score does, and the other lets go.
  A tentative holder (a restarted forwarder that found the VIP on its interface) yields to a firm one.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.forwarder.state import ServiceState
from lbctl.model.meta import EXCLUDE_LABEL


@functools.lru_cache(maxsize=1 << 17)
def score(node: str, vip: str) -> bytes:
    return hashlib.sha256(f"{node}\x00{vip}".encode()).digest()


def choose_owner(vip: str, candidates: Iterable[str]) -> str | None:
    best: tuple[bytes, str] | None = None
    for node in candidates:
        entry = (score(node, vip), node)
        if best is None or entry > best:
            best = entry
    return best[1] if best else None


@dataclass(frozen=True)
class VipOwner:
    ip: str
    owner: str | None  # None: no eligible node (e.g. ETP=Local without any ready endpoint)
    services: tuple[str, ...]  # keys of the Services that use the address


def vip_owners(
    states: Iterable[ServiceState], live: Iterable[str], excluded: Iterable[str] = (),
    holders: Mapping[str, Iterable[str]] | None = None, tentative: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, VipOwner]:
    """The owner of every announced VIP.

    For externalTrafficPolicy Local only nodes with a ready endpoint of that Service are eligible
    (elsewhere the traffic would be dropped). Services sharing a VIP: nodes eligible for all of
    them; if none is, nodes eligible for any (better some ports work than none). `holders` maps a
    VIP to the live nodes that hold it now (ours and the peers' claims); `tentative` to those that
    hold it since before a restart and yield to a firm holder.
    """
    candidates = frozenset(live) - frozenset(excluded)
    groups: dict[str, list[ServiceState]] = {}
    for state in states:
        if state.announce:
            for ip in state.lb_ips:
                groups.setdefault(ip, []).append(state)
    owners: dict[str, VipOwner] = {}
    for ip, members in groups.items():
        local_sets = [s.endpoint_nodes & candidates for s in members if s.local_only]
        eligible = candidates
        if local_sets:
            both = frozenset.intersection(*local_sets)
            eligible = both if both else frozenset.union(*local_sets)
        firm = eligible & frozenset((holders or {}).get(ip, ()))
        held = firm or eligible & frozenset((tentative or {}).get(ip, ()))
        owners[ip] = VipOwner(ip, choose_owner(ip, held or eligible), tuple(sorted(s.key for s in members)))
    return owners


def excluded_nodes(nodes: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Nodes that must not carry balancer traffic (the upstream label), or are being deleted."""
    names = set()
    for node in nodes:
        meta = node.get("metadata") if isinstance(node, Mapping) else None
        if not isinstance(meta, Mapping):
            continue
        labels = meta.get("labels")
        if (isinstance(labels, Mapping) and EXCLUDE_LABEL in labels) or meta.get("deletionTimestamp"):
            names.add(str(meta.get("name")))
    return frozenset(names)


def node_addresses(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Each node's address on the node network: its first InternalIP (IPv4 first), else ExternalIP."""
    found: dict[str, str] = {}
    for node in nodes:
        meta = node.get("metadata") if isinstance(node, Mapping) else None
        status = node.get("status") if isinstance(node, Mapping) else None
        if not isinstance(meta, Mapping) or not isinstance(status, Mapping):
            continue
        addresses = [a for a in status.get("addresses") or () if isinstance(a, Mapping)]
        for kind in ("InternalIP", "ExternalIP"):
            ips = [str(a.get("address")) for a in addresses if a.get("type") == kind and a.get("address")]
            ips.sort(key=lambda ip: ":" in ip)  # IPv4 first: the heartbeat socket is IPv4
            if ips:
                found[str(meta.get("name"))] = ips[0]
                break
    return found


def newest_takes(claims: Mapping[str, Mapping[str, int]]) -> dict[str, frozenset[str]]:
    """VIP → the holders whose claim has the highest generation: when a late heartbeat from before a
    cut still names the old holder, the node that took the VIP over since is the holder."""
    newest: dict[str, frozenset[str]] = {}
    for vip, holders in claims.items():
        if holders:
            top = max(holders.values())
            newest[vip] = frozenset(node for node, generation in holders.items() if generation == top)
    return newest
