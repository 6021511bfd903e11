"""Which prefixes this node announces to which BGP peers (pure).

Inputs: this node (name, labels, addresses, eligibility), the parsed BGPPeers, the pools with
their advertisement, and the Services' states (addresses, ETP, nodes with ready endpoints).

- A peer takes part when its nodeSelector selects this node.
- An address is announced when it lies in a pool advertised by `bgp` or `both`, the pool's
  nodeSelector selects this node and its peerSelector the peer, the node is eligible (not excluded
  from load balancers, not being deleted), and a Service of ours uses it: with
  externalTrafficPolicy Cluster on every such node once the Service has an endpoint to send to
  (as MetalLB: no route that would only attract traffic to drop), with Local only on nodes that
  have a ready endpoint of that Service (several Services sharing the address: any of them wanting
  it is enough).
- Prefix: /32 per IPv4 address and /128 per IPv6 address, or the pool's aggregationLength(V6).
- Attributes: the pool's communities (standard and large), its localPref (iBGP only), and next-hop
  = the node's own address of the prefix's family (the peer's sourceAddress when set and of that
  family). A prefix with no next-hop of its family on this node is not announced.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lbctl.forwarder.bgp_model import IPAddress, Peer, PoolAdvert
from lbctl.forwarder.state import ServiceState


@dataclass(frozen=True, order=True)
class Route:
    prefix: str  # "198.51.100.7/32"
    next_hop: str
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    local_pref: int | None = None


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()  # the Node's InternalIPs (ExternalIPs after them)
    eligible: bool = True


def pool_of(address: IPAddress, pools: Sequence[PoolAdvert]) -> PoolAdvert | None:
    for pool in pools:
        if pool.contains(address):
            return pool
    return None


def bgp_only_addresses(ips: Iterable[str], pools: Sequence[PoolAdvert]) -> frozenset[str]:
    """Of `ips`, those whose pool is advertised by BGP only: no node may hold them on an interface
    nor answer ARP for them (layer 2 leaves them alone)."""
    found = set()
    for ip in ips:
        try:
            pool = pool_of(ipaddress.ip_address(ip), pools)
        except ValueError:
            continue
        if pool is not None and pool.advertisement.mode == "bgp":
            found.add(ip)
    return frozenset(found)


def next_hop(peer: Peer, node: NodeView, version: int) -> str | None:
    if peer.source is not None and peer.source.version == version:
        return str(peer.source)
    for text in node.addresses:
        try:
            if ipaddress.ip_address(text).version == version:
                return text
        except ValueError:
            continue
    return None


def wanted_addresses(node: NodeView, states: Iterable[ServiceState]) -> frozenset[str]:
    """The Service addresses this node would carry (ETP=Local: only with a ready local endpoint)."""
    if not node.eligible:
        return frozenset()
    found: set[str] = set()
    for state in states:
        if not state.announce:
            continue
        if state.local_only and node.name not in state.endpoint_nodes:
            continue
        if not state.local_only and not any(port.backends for port in state.ports):
            continue  # nowhere to send it (no endpoint yet, or none left): attracting traffic would drop it
        found.update(state.lb_ips)
    return frozenset(found)


def announcements(node: NodeView, peers: Sequence[Peer], pools: Sequence[PoolAdvert],
                  states: Iterable[ServiceState]) -> dict[str, frozenset[Route]]:
    """Peer name → the routes to announce to it (every peer that selects this node has an entry,
    possibly empty)."""
    mine = [p for p in peers if p.node_selector.matches(node.labels)]
    result: dict[str, dict[str, Route]] = {p.name: {} for p in mine}
    for text in sorted(wanted_addresses(node, states)):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        pool = pool_of(address, pools)
        if pool is None or not pool.advertisement.bgp or not pool.advertisement.node_selector.matches(node.labels):
            continue
        advert = pool.advertisement
        length = advert.aggregation_v4 if address.version == 4 else advert.aggregation_v6
        prefix = str(ipaddress.ip_network(f"{address}/{length}", strict=False))
        for peer in mine:
            if not advert.peer_selector.matches(dict(peer.labels)):
                continue
            hop = next_hop(peer, node, address.version)
            if hop is None:
                continue
            route = Route(prefix, hop, advert.communities, advert.large_communities,
                          advert.local_pref if peer.ibgp else None)
            before = result[peer.name].get(prefix)
            if before is not None:  # two pools aggregate into one prefix: one route with both's attributes
                route = Route(prefix, hop, tuple(dict.fromkeys(before.communities + route.communities)),
                              tuple(dict.fromkeys(before.large_communities + route.large_communities)),
                              max((p for p in (before.local_pref, route.local_pref) if p is not None),
                                  default=None))
            result[peer.name][prefix] = route
    return {name: frozenset(routes.values()) for name, routes in result.items()}
