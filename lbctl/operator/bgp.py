"""The operator's side of BGP: keeps `lbctl.io/bgp-announcing-nodes` on every Service whose pool
is advertised by BGP, and posts an Event when that set of nodes changes.

Who announces is decided by the forwarders (each speaks BGP for its node); what they report is
read back: a node counts when a session of it with a peer the pool selects is Established (the
peer's status.nodes), and the node may announce the Service (eligible, chosen by the pool's
nodeSelector, with a ready local endpoint under externalTrafficPolicy Local). The decision is
`desired_annotations` (pure); `BgpAnnouncer` feeds it from the reflectors' caches and writes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from lbctl.model.bgp import (
    Advertisement,
    BgpConfigError,
    BGPPeer,
    NodeInfo,
    announcing_nodes,
    candidate_nodes,
    format_nodes,
    parse_peer,
)
from lbctl.model.meta import (
    BGP_ANNOUNCING_NODES_ANNOTATION,
    EXCLUDE_LABEL,
    SERVICE_NAME_LABEL,
    key,
    object_key,
    split_key,
)
from lbctl.model.scope import Scope
from providers.local_pools import Pool

log = logging.getLogger("lbctl.operator")

DEBOUNCE_S = 0.1

#: a pool's advertisement as the provider parsed it, or why it is invalid
PoolAdvertisement = tuple[Pool, Advertisement | BgpConfigError]


def ready_nodes_by_service(slices: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """"namespace/service" → the nodes with at least one ready endpoint (ready unset counts as
    ready, as in EndpointSlice's API; "" for a ready endpoint without nodeName)."""
    found: dict[str, set[str]] = {}
    for endpoint_slice in slices:
        meta = endpoint_slice.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            continue
        nodes = found.setdefault(key(meta.get("namespace"), service), set())
        for endpoint in endpoint_slice.get("endpoints") or ():
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            nodes.add(str(endpoint.get("nodeName") or ""))
    return found


def may_announce(node: Mapping[str, Any]) -> bool:
    """Whether a node's reported sessions count: it is not excluded from load balancers nor being
    deleted (the speaker's own rule, lbctl.forwarder.ownership.excluded_nodes) and it is Ready. A
    speaker keeps announcing while its node is NotReady (static stability), but a node that died
    cannot take back the Established it last wrote: NotReady is the operator's sign that the entry
    may be stale. (The autoscaler's taint, which the balancers of other providers honour, is not
    the speaker's rule, so it is not this one either.)"""
    meta = node.get("metadata") or {}
    if meta.get("deletionTimestamp") or EXCLUDE_LABEL in (meta.get("labels") or {}):
        return False
    conditions = (node.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def node_infos(nodes: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    infos = []
    for node in nodes:
        meta = node.get("metadata") or {}
        infos.append(NodeInfo(str(meta.get("name") or ""), dict(meta.get("labels") or {}), eligible=may_announce(node)))
    return infos


def _pool_of(service: Mapping[str, Any], pools: Sequence[PoolAdvertisement]) -> PoolAdvertisement | None:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
    for entry in ingress:
        try:
            ip = ipaddress.ip_address(str(entry.get("ip") or ""))
        except ValueError:
            continue
        for found in pools:
            if found[0].contains(ip):
                return found
    return None


def desired_annotation(service: Mapping[str, Any], pools: Sequence[PoolAdvertisement], peers: Sequence[BGPPeer],
                       nodes: Sequence[NodeInfo], ready_nodes: Collection[str],
                       candidates: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """The annotation's value for one Service: None when its address is not advertised by BGP
    (no address yet, or its pool is l2 only), "" when no node announces it, else the nodes.
    `candidates`: each pool's candidate nodes, filled as pools are met (one pass, many Services)."""
    found = _pool_of(service, pools)
    if found is None:
        return None
    pool, advertisement = found
    if isinstance(advertisement, BgpConfigError):
        return ""  # an advertisement that does not parse: no speaker announces it (the condition says why)
    if not advertisement.bgp:
        return None
    cache = {} if candidates is None else candidates
    if pool.name not in cache:
        cache[pool.name] = candidate_nodes(advertisement, nodes, peers)
    local = (service.get("spec") or {}).get("externalTrafficPolicy") == "Local"
    return format_nodes(announcing_nodes(advertisement, local, ready_nodes, nodes, peers, cache[pool.name]))


def desired_annotations(services: Iterable[Mapping[str, Any]], scope: Scope, pools: Iterable[PoolAdvertisement],
                        peers: Iterable[BGPPeer], nodes: Iterable[NodeInfo],
                        ready: Mapping[str, set[str]]) -> dict[str, tuple[str | None, str | None]]:
    """"namespace/name" → (current, desired) for each of our Services where they differ."""
    pools, peers, nodes = list(pools), list(peers), list(nodes)
    candidates: dict[str, tuple[str, ...]] = {}
    changes: dict[str, tuple[str | None, str | None]] = {}
    for service in services:
        if not scope.concerns(service):
            continue
        current = ((service.get("metadata") or {}).get("annotations") or {}).get(BGP_ANNOUNCING_NODES_ANNOTATION)
        wanted = None
        if scope.manages(service) and not (service.get("metadata") or {}).get("deletionTimestamp"):
            service_key = object_key(service)
            wanted = desired_annotation(service, pools, peers, nodes, ready.get(service_key, frozenset()), candidates)
        if wanted != current:
            changes[object_key(service)] = (current, wanted)
    return changes


def change_event(service: Mapping[str, Any], before: str | None, after: str | None) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event for a change of the announcing nodes; None when the
    Service simply stopped being advertised by BGP."""
    if after is None:
        return None
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
    addresses = ", ".join(str(i["ip"]) for i in ingress if i.get("ip")) or "its address"
    was = f" (before: {before.replace(',', ', ') or 'none'})" if before is not None else ""
    if not after:
        return ("Warning", "BGPNotAnnounced",
                f"no node announces {addresses} by BGP{was}: none of the nodes the pool selects has an Established "
                "session with a BGPPeer the pool selects (and, with externalTrafficPolicy Local, a ready endpoint); "
                "fix: lbctl doctor shows the peers' sessions, kubectl get bgpp -o yaml their status.nodes")
    return ("Normal", "BGPAnnouncingNodes", f"{addresses} announced by BGP from {after.replace(',', ', ')}{was}")


class BgpAnnouncer:
    """Feeds `desired_annotations` from the caches (Services, Nodes, pools and peers by the
    reconciler, EndpointSlices here) and writes what changed, as the leader only."""

    def __init__(self, reconciler: Any, advertisements: Any) -> None:
        """`reconciler`: lbctl.operator.reconciler.Reconciler; `advertisements`: the local
        provider (its `advertisement(pool)` and `peers`)."""
        self.reconciler = reconciler
        self.provider = advertisements
        self.slices: dict[str, dict[str, Any]] = {}  # "namespace/name" of the slice → slice
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- changes from the reflectors -----------------------------------------------------------

    def changed(self, *_: Any) -> None:
        self._dirty.set()

    def on_slice(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        if new is None:
            if old is not None:
                self.slices.pop(object_key(old), None)
        else:
            self.slices[object_key(new)] = dict(new)
        self._dirty.set()

    # ---- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bgp announcing nodes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        from lbctl.operator.reconciler import NotLeadingError

        pause = DEBOUNCE_S
        while True:
            await self._dirty.wait()
            await self.reconciler.started.wait()  # a standby only keeps its caches
            # one pass per burst of changes; a pass runs in the event loop (about 30 ms per 1,000
            # Services, bench/bgp_operator.py), so the pause grows with it: at most a third of the time
            await asyncio.sleep(pause)
            self._dirty.clear()
            try:
                pause = max(DEBOUNCE_S, 2 * await self.sync())
            except NotLeadingError:
                return
            except Exception:
                log.exception("updating BGP announcing nodes failed; trying again")
                await asyncio.sleep(1.0)
                self._dirty.set()

    def pools(self) -> list[PoolAdvertisement]:
        from providers.local import POOLS
        from providers.local_pools import PoolError, parse_pool

        found = []
        for obj in self.reconciler.resources.get(POOLS, {}).values():
            try:
                pool = parse_pool(obj)
            except PoolError:
                continue
            # what the speakers announce, which is what the routers see
            announced = self.provider.announced(pool.name)
            found.append((pool, announced if announced is not None else self.provider.advertisement(pool.name)))
        return found

    def peers(self) -> list[BGPPeer]:
        """The peers the speakers open sessions with, and those sessions as the reflector last saw
        them (the provider sees only spec changes)."""
        from providers.local import BGP_PEERS

        found = []
        for name, obj in self.reconciler.resources.get(BGP_PEERS, {}).items():
            if not self.provider.peer_counted(name):
                continue
            try:
                found.append(parse_peer(obj))
            except BgpConfigError:
                continue
        return found

    async def sync(self) -> float:
        """One pass; returns the seconds it computed for (the writes not counted)."""
        reconciler = self.reconciler
        started = time.monotonic()
        changes = desired_annotations(
            list(reconciler.services.values()), reconciler.scope, self.pools(), self.peers(),
            node_infos(reconciler.nodes.values()), ready_nodes_by_service(self.slices.values()))
        computed = time.monotonic() - started
        for service_key, (before, after) in changes.items():
            reconciler._fence()
            namespace, name = split_key(service_key)
            try:
                updated = await reconciler.writer.patch_service(
                    namespace, name, {"metadata": {"annotations": {BGP_ANNOUNCING_NODES_ANNOTATION: after}}})
            except Exception as exc:
                if getattr(exc, "status", None) == 404:
                    continue  # deleted meanwhile
                raise
            reconciler._remember(service_key, updated)
            log.info("%s: BGP announcing nodes %r (was %r)", service_key, after, before)
            event = change_event(updated, before, after)
            if event is not None:
                await reconciler.events.record(updated, *event)
        return computed
