"""Which node announces which VIP (pure).

Every forwarder computes the same answer from the same inputs, so no election is needed: the
owner of a VIP is the eligible live node with the highest rendezvous score sha256(node, VIP).
When a node dies only its VIPs move, and each to a different survivor.

Liveness: one Lease per node, renewed every fraction of its duration. A node is live while the
lease has been seen renewed within its duration — measured on the observer's own monotonic clock
from the moment the renewal was seen, so clock skew between nodes does not matter.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.forwarder.state import ServiceState

EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


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
) -> dict[str, VipOwner]:
    """The owner of every announced VIP.

    For externalTrafficPolicy Local only nodes with a ready endpoint of that Service are eligible
    (elsewhere the traffic would be dropped). Services sharing a VIP: nodes eligible for all of
    them; if none is, nodes eligible for any (better some ports work than none).
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
        owners[ip] = VipOwner(ip, choose_owner(ip, eligible), tuple(sorted(s.key for s in members)))
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


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class _Seen:
    marker: str
    expires: float  # monotonic


class Liveness:
    """Lease observations → live node names. Time is passed in (monotonic and wall clock)."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def observe(self, lease: Mapping[str, Any] | None, node: str, now: float, wall_now: float) -> None:
        if lease is None:
            self._seen.pop(node, None)
            return
        raw_spec = lease.get("spec")
        spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
        duration = spec.get("leaseDurationSeconds")
        if isinstance(duration, bool) or not isinstance(duration, int) or duration <= 0:
            self._seen.pop(node, None)
            return
        marker = str(spec.get("renewTime") or "")
        seen = self._seen.get(node)
        if seen is not None and seen.marker == marker:
            return
        if seen is None:
            # first sight: trust the holder's clock once, so a long-dead lease is not taken as live
            renewed = _parse_time(spec.get("renewTime"))
            remaining = duration - (wall_now - renewed) if renewed is not None else -1.0
            self._seen[node] = _Seen(marker, now + min(remaining, float(duration)))
        else:
            self._seen[node] = _Seen(marker, now + duration)

    def live(self, now: float) -> frozenset[str]:
        return frozenset(node for node, seen in self._seen.items() if seen.expires > now)

    def next_expiry(self, now: float) -> float | None:
        pending = [s.expires for s in self._seen.values() if s.expires > now]
        return min(pending) if pending else None
