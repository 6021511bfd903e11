"""Which node announces which VIP (pure).

Every forwarder computes the same answer from the same inputs, so no election is needed.

- A VIP stays with the node that holds it while that node is alive and eligible: every move
  resets the established flows through the VIP, so nothing moves merely because a node joined or
  came back (no fail-back). Holders are known from the peers' heartbeats (their claims).
- A VIP nobody eligible holds goes to the eligible live node with the highest rendezvous score
  sha256(node, VIP): when a node dies only its VIPs move, each to a different survivor.
- The addresses of one Service (a dual-stack Service's IPv4 and IPv6 address) go to one node: a
  VIP nobody holds goes to the node that holds one of its siblings when that node is eligible,
  else the rendezvous key is the group's first address, so both fail over together, to the same
  survivor. One Service, one announcing node: the annotation naming it stays true, and a client
  falling back from one family to the other finds the same path.
- Two holders (a late heartbeat from before a cut, a healed partition): the newer take (the higher
  generation) keeps it; on a tie the higher score does, and the other lets go.
  A tentative holder (a restarted forwarder that found the VIP on its interface) yields to a firm one.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
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


@functools.lru_cache(maxsize=1 << 17)
def canonical(ip: str) -> str:
    """One spelling per address: "2001:DB8:0::1" and "2001:db8::1" are one VIP (the kernel, and so
    our claims, use the short lower-case form)."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


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
    siblings: dict[str, set[str]] = {}
    for state in states:
        if state.announce:
            ips = [canonical(ip) for ip in state.lb_ips]
            for ip in ips:
                groups.setdefault(ip, []).append(state)
                siblings.setdefault(ip, set()).update(ips)
    firm_of = _by_canonical(holders)
    tentative_of = _by_canonical(tentative)
    eligible_of: dict[str, frozenset[str]] = {}
    owners: dict[str, VipOwner] = {}
    for ip, members in groups.items():
        local_sets = [s.endpoint_nodes & candidates for s in members if s.local_only]
        eligible = candidates
        if local_sets:
            both = frozenset.intersection(*local_sets)
            eligible = both if both else frozenset.union(*local_sets)
        eligible_of[ip] = eligible
        firm = eligible & firm_of.get(ip, frozenset())
        held = firm or eligible & tentative_of.get(ip, frozenset())
        if held:
            owners[ip] = VipOwner(ip, choose_owner(ip, held), tuple(sorted(s.key for s in members)))
    for ip, members in groups.items():
        if ip in owners:
            continue
        eligible = eligible_of[ip]
        # with a sibling's holder when it may hold this one too; else by the group's first address
        # (the same key for every address of the group: they land on one node)
        with_siblings = frozenset(o for sib in siblings[ip] - {ip}
                                  if (o := owners[sib].owner if sib in owners else None) in eligible)
        anchor = min(siblings[ip])
        owners[ip] = VipOwner(ip, choose_owner(anchor, with_siblings or eligible),
                              tuple(sorted(s.key for s in members)))
    return owners


def _by_canonical(mapping: Mapping[str, Iterable[str]] | None) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    for ip, nodes in (mapping or {}).items():
        key = canonical(ip)
        found[key] = found.get(key, frozenset()) | frozenset(nodes)
    return found


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
