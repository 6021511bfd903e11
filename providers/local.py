"""The local provider: addresses from `LoadBalancerPool` objects (MetalLB semantics), no cloud.

The decisions live in providers.local_pools; this adapter only feeds it the pools and Services the
operator hands over and turns its answers into statuses. It keeps no database: at start-up the
operator passes every Service that shows an address, and the allocator takes those back first
(MetalLB does the same). The node-side forwarder announces the addresses on the LAN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lbctl.model.bgp import (
    L2_ONLY,
    Advertisement,
    BgpConfigError,
    BGPPeer,
    advertisement_problem,
    check_aggregation,
    conflicting_peers,
    parse_advertisement,
    parse_peer,
)
from lbctl.model.errors import LoadBalancerError
from lbctl.model.meta import API_GROUP, API_VERSION_NAME
from lbctl.model.types import Ingress, LoadBalancerRef, LoadBalancerSpec, LoadBalancerStatus, PortStatus
from providers.base import Provider, ProviderSettings, WatchedResource
from providers.local_metrics import ALLOCATION_FAILURES, allocation_failure_reason
from providers.local_pools import (
    Allocator,
    Pool,
    PoolError,
    check_source_ranges,
    overlapping_pools,
    parse_pool,
    request_from_spec,
    wanted_families,
)

POOLS = WatchedResource(API_GROUP, API_VERSION_NAME, "loadbalancerpools")
BGP_PEERS = WatchedResource(API_GROUP, API_VERSION_NAME, "bgppeers")
_INT64_MAX = 2**63 - 1  # an IPv6 pool's free count does not fit the status field otherwise


class LocalProvider(Provider):
    name = "local"
    needs_node_ports = False
    uses_nodes = False  # the forwarder on each node carries the traffic, whatever the node set
    watched_resources: ClassVar[tuple[WatchedResource, ...]] = (POOLS,)
    optional_resources: ClassVar[tuple[WatchedResource, ...]] = (BGP_PEERS,)

    def __init__(self, cluster_name: str) -> None:
        self._cluster_name = cluster_name
        self._allocator = Allocator()
        self._refs: dict[str, LoadBalancerRef] = {}
        self._pool_names: list[str] = []
        self._pool_problems: dict[str, tuple[str, str]] = {}  # name -> (reason, message)
        # BGP: each pool's spec.advertisement (or why it is invalid), the valid peers (None while
        # BGPPeers are not served) and why the others are not
        self._advertisements: dict[str, Advertisement | BgpConfigError] = {}
        self._as_written: dict[str, Advertisement | None] = {}  # as the speakers read it (see announced)
        self._peers: list[BGPPeer] | None = None
        self._peer_names: list[str] = []
        self._peer_problems: dict[str, tuple[str, str]] = {}

    @classmethod
    def create(cls, settings: ProviderSettings) -> LocalProvider:
        return cls(settings.cluster_name)

    async def ensure(self, spec: LoadBalancerSpec) -> LoadBalancerStatus:
        check_source_ranges(spec.source_ranges, wanted_families(spec.ip_families, spec.ip_family_policy))
        request = request_from_spec(spec, labels=spec.labels, created=spec.created)
        try:
            addresses = self._allocator.assign(request)
        except LoadBalancerError as exc:
            ALLOCATION_FAILURES.labels(allocation_failure_reason(exc.problem)).inc()
            raise
        self._refs[spec.service.key] = spec.ref
        ports = tuple(PortStatus(port=p.port, protocol=p.protocol) for p in spec.ports)
        return LoadBalancerStatus(tuple(Ingress(ip=str(ip), ip_mode="VIP", ports=ports) for ip in addresses))

    async def delete(self, ref: LoadBalancerRef) -> None:
        self._allocator.release(ref.service_key)
        self._refs.pop(ref.service_key, None)

    async def get(self, ref: LoadBalancerRef) -> LoadBalancerStatus | None:
        allocation = self._allocator.allocation(ref.service_key)
        if allocation is None:
            return None
        return LoadBalancerStatus(tuple(Ingress(ip=str(ip), ip_mode="VIP") for ip in allocation.ips))

    async def list_owned(self) -> list[LoadBalancerRef]:
        return list(self._refs.values())

    async def restore(self, specs: Sequence[LoadBalancerSpec]) -> None:
        requests = []
        for spec in specs:
            try:
                requests.append(request_from_spec(spec, labels=spec.labels, created=spec.created))
            except Exception:  # an invalid Service is reported when it is synced
                continue
            self._refs[spec.service.key] = spec.ref
        self._allocator.restore(requests)

    async def resources_changed(self, resource: WatchedResource, objects: Sequence[Mapping[str, Any]]) -> set[str]:
        if resource == BGP_PEERS:
            self._set_peers(objects)
            return set()  # peers change what is announced, never an address
        pools: list[Pool] = []
        self._advertisements = {}
        self._as_written = {}
        self._pool_problems = {}
        self._pool_names = sorted(str(o["metadata"]["name"]) for o in objects)
        for obj in objects:
            try:
                pool = parse_pool(obj)
            except PoolError as exc:
                self._pool_problems[obj["metadata"]["name"]] = (
                    "InvalidPool", f"{exc}; fix the pool's spec (nothing is assigned from it meanwhile)")
                continue
            pools.append(pool)
            self._advertisements[pool.name], self._as_written[pool.name] = _advertisement(obj, pool)
        for overlap in overlapping_pools(pools):
            self._pool_problems[overlap.rejected.name] = (
                "OverlappingPool", f"{overlap.message}; fix: give each pool its own addresses "
                f"(pool {overlap.kept.name} keeps them)")
        return self._allocator.set_pools(pools)

    def address_usage(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(pool, IP version) → (usable addresses, assigned), for the pool metrics."""
        return self._allocator.family_usage()

    def _set_peers(self, objects: Sequence[Mapping[str, Any]]) -> None:
        self._peer_names = sorted(str(o["metadata"]["name"]) for o in objects)
        self._peer_problems = {}
        parsed = []
        for obj in objects:
            try:
                parsed.append(parse_peer(obj))
            except BgpConfigError as exc:
                self._peer_problems[obj["metadata"]["name"]] = ("InvalidPeer", f"{exc} (no node peers with it)")
        for conflict in conflicting_peers(parsed):
            self._peer_problems[conflict.rejected.name] = ("DuplicatePeer", conflict.message)
        self._peers = [p for p in parsed if p.name not in self._peer_problems]

    def advertisement(self, pool: str) -> Advertisement | BgpConfigError:
        """A pool's advertisement, or why it is invalid (l2 for a pool that is not known)."""
        return self._advertisements.get(pool, L2_ONLY)

    @property
    def peers(self) -> list[BGPPeer] | None:
        """The valid BGPPeers as of the last change of their specs (None while the cluster does not
        serve them); their sessions may be older than the reflector's copy."""
        return self._peers

    def peer_valid(self, name: str) -> bool:
        return self._peers is not None and name not in self._peer_problems

    def announced(self, pool: str) -> Advertisement | None:
        """The advertisement as the speakers (lbctl.forwarder.bgp_model) read it: parsed, without
        the cross-object checks they do not make (an aggregation shorter than the pool's CIDRs is
        reported on the pool but still announced); None when it does not parse."""
        return self._as_written.get(pool, L2_ONLY)

    def peer_counted(self, name: str) -> bool:
        """Whether the speakers open sessions with this peer: every peer that parses (a duplicate
        is reported on the peer but its sessions still exist)."""
        return self._peers is not None and self._peer_problems.get(name, ("",))[0] != "InvalidPeer"

    def _advertised_condition(self, name: str) -> dict[str, str] | None:
        found = self._advertisements.get(name)
        if found is None or (isinstance(found, Advertisement) and not found.bgp):
            return None  # l2, as every pool before BGP: no condition
        if isinstance(found, BgpConfigError):
            return {"type": "Advertised", "status": "False", "reason": "InvalidAdvertisement", "message": str(found)}
        problem = advertisement_problem(found, self._peers)
        if problem is None or problem.reason == "LocalPrefIgnored":
            how = {"l2": "on the LAN (l2)", "bgp": "by BGP", "both": "by BGP and on the LAN (l2)"}[found.mode]
            return {"type": "Advertised", "status": "True", "reason": problem.reason if problem else "Advertised",
                    "message": problem.message if problem else f"addresses are advertised {how}"}
        return {"type": "Advertised", "status": "False", "reason": problem.reason, "message": problem.message}

    def resource_status(self, resource: WatchedResource) -> dict[str, dict[str, Any]]:
        if resource == BGP_PEERS:
            return {name: {"conditions": [_peer_condition(self._peer_problems.get(name))]}
                    for name in self._peer_names}
        stats = self._allocator.pool_stats()
        statuses: dict[str, dict[str, Any]] = {}
        for name in self._pool_names:
            problem = self._pool_problems.get(name)
            usage = stats.get(name)
            statuses[name] = {
                "assigned": usage.assigned if usage else 0,
                "free": min(usage.free, _INT64_MAX) if usage else 0,
                "conditions": [{
                    "type": "Ready",
                    "status": "False" if problem else "True",
                    "reason": problem[0] if problem else "PoolReady",
                    "message": problem[1] if problem else "addresses are being assigned from this pool",
                }],
            }
            advertised = self._advertised_condition(name)
            if advertised is not None:
                statuses[name]["conditions"].append(advertised)
        return statuses


def _advertisement(obj: Mapping[str, Any], pool: Pool) -> tuple[Advertisement | BgpConfigError, Advertisement | None]:
    """(the advertisement or why it is invalid, the advertisement as written when it parses)."""
    spec = obj.get("spec") or {}
    try:
        found = parse_advertisement(spec.get("advertisement"))
    except BgpConfigError as exc:
        return exc, None
    try:
        check_aggregation(found, ((r.version, r.first, r.last) for r in pool.ranges))
    except BgpConfigError as exc:
        return exc, found
    return found, found


def _peer_condition(problem: tuple[str, str] | None) -> dict[str, str]:
    if problem is None:
        return {"type": "Valid", "status": "True", "reason": "Valid",
                "message": "the nodes this peer selects open sessions with it"}
    return {"type": "Valid", "status": "False", "reason": problem[0], "message": problem[1]}
