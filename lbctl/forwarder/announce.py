"""Makes this node's share of VIP ownership real: VIP/32 on the local interface, gratuitous ARP at
takeover and a few times after, and the owner shown on each Service (annotation and Event)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lbctl.forwarder.addresses import VipAddresses
from lbctl.forwarder.ownership import VipOwner
from lbctl.kube.client import JSON_PATCH, MERGE_PATCH, ApiError, KubeClient, service_path
from lbctl.kube.events import EventRecorder

log = logging.getLogger(__name__)

ANNOUNCING_NODE_ANNOTATION = "lbctl.io/announcing-node"
EVENT_REASON = "AnnouncingAddress"
_REPATCH_S = 2.0
_ANNOTATION_POINTER = "/metadata/annotations/" + ANNOUNCING_NODE_ANNOTATION.replace("~", "~0").replace("/", "~1")


class Announcer:
    def __init__(self, node: str, addresses: VipAddresses, client: KubeClient | None,
                 service_lookup: Callable[[str], Mapping[str, Any] | None],
                 garp_repeats: Sequence[float] = (0.3, 1.0, 2.0, 4.0)) -> None:
        self._node = node
        self._addresses = addresses
        self._client = client
        self._events = EventRecorder(client, component="lbctl-forwarder") if client else None
        self._lookup = service_lookup
        self._garp_repeats = tuple(garp_repeats)
        self.owned: set[str] = set()
        self._marked: dict[str, set[str]] = {}  # service key → VIPs we announced it under
        self._repeaters: dict[str, asyncio.Task[None]] = {}
        self._patched: dict[str, float] = {}  # service key → loop time of our last annotation write
        self._unannounced: set[str] = set()  # VIPs found on the interface at start-up

    def _annotation(self, key: str) -> str | None:
        service = self._lookup(key) or {}
        annotations = (service.get("metadata") or {}).get("annotations") or {}
        value = annotations.get(ANNOUNCING_NODE_ANNOTATION) if isinstance(annotations, Mapping) else None
        return value if isinstance(value, str) else None

    async def start(self) -> None:
        await asyncio.to_thread(self._addresses.prepare)
        # An earlier run may have left VIPs behind: the first reconcile removes what is not ours
        # now, and announces again what is (meanwhile the LAN may have learnt another node's MAC).
        self.owned = await asyncio.to_thread(self._addresses.current)
        self._unannounced = set(self.owned)

    async def reconcile(self, owners: Mapping[str, VipOwner]) -> None:
        mine = {ip for ip, owner in owners.items() if owner.owner == self._node}
        for ip in sorted(self.owned - mine):
            await self._release(ip)
        for ip in sorted(mine - self.owned):
            await self._take(ip)
        for ip in sorted(mine & self._unannounced):
            log.info("announcing %s again (found on %s at start-up)", ip, self._addresses.interface)
            await self._garp(ip)
            self._repeaters[ip] = asyncio.create_task(self._garp_later(ip))
        self._unannounced.clear()
        if self._client is None:
            return
        wanted: dict[str, set[str]] = {}
        for ip in mine:
            for key in owners[ip].services:
                wanted.setdefault(key, set()).add(ip)
        now = asyncio.get_running_loop().time()
        for key, ips in wanted.items():
            if self._marked.get(key) != ips and self._annotation(key) == self._node:
                self._marked[key] = set(ips)  # already says so (we restarted): no new write, no Event
            elif self._marked.get(key) != ips:
                await self._mark(key, ips, event=True)
            elif self._annotation(key) != self._node and now - self._patched.get(key, 0.0) > _REPATCH_S:
                await self._mark(key, ips, event=False)  # someone else wrote it since
        for key in [k for k in self._marked if k not in wanted]:
            await self._unmark(key)

    async def _take(self, ip: str) -> None:
        try:
            await asyncio.to_thread(self._addresses.add, ip)
        except Exception as exc:
            log.error("could not add VIP %s to %s: %s", ip, self._addresses.interface, exc)
            return
        self.owned.add(ip)
        log.info("announcing %s from this node (%s)", ip, self._addresses.interface)
        await self._garp(ip)
        self._repeaters[ip] = asyncio.create_task(self._garp_later(ip))

    async def _release(self, ip: str) -> None:
        task = self._repeaters.pop(ip, None)
        if task is not None:
            task.cancel()
        try:
            await asyncio.to_thread(self._addresses.remove, ip)
        except Exception as exc:
            log.error("could not remove VIP %s from %s: %s", ip, self._addresses.interface, exc)
            return
        self.owned.discard(ip)
        log.info("no longer announcing %s", ip)

    async def _garp(self, ip: str) -> None:
        try:
            links = await asyncio.to_thread(self._addresses.send_gratuitous_arp, ip)
            if not links:
                log.warning("no interface to announce %s on (give one with --interface)", ip)
        except OSError as exc:
            log.warning("gratuitous ARP for %s failed: %s", ip, exc)

    async def _garp_later(self, ip: str) -> None:
        """Repeats, for switches and hosts that missed the first one."""
        elapsed = 0.0
        for at in self._garp_repeats:
            await asyncio.sleep(max(at - elapsed, 0))
            elapsed = at
            if ip in self.owned:
                await self._garp(ip)

    async def _mark(self, key: str, ips: set[str], event: bool) -> None:
        assert self._client is not None and self._events is not None
        namespace, _, name = key.partition("/")
        try:
            await self._client.request("PATCH", service_path(namespace, name), content_type=MERGE_PATCH,
                                       body={"metadata": {"annotations": {ANNOUNCING_NODE_ANNOTATION: self._node}}})
        except (ApiError, OSError) as exc:
            log.warning("could not annotate %s: %s", key, exc)
            return
        self._marked[key] = set(ips)
        self._patched[key] = asyncio.get_running_loop().time()
        service = self._lookup(key)
        if event and service is not None:
            await self._events.normal(service, EVENT_REASON,
                                      f"announcing {', '.join(sorted(ips))} from node {self._node}")

    async def _unmark(self, key: str) -> None:
        assert self._client is not None
        self._marked.pop(key, None)
        self._patched.pop(key, None)
        namespace, _, name = key.partition("/")
        # only if it still names us: the new owner may have written its name already
        patch = [{"op": "test", "path": _ANNOTATION_POINTER, "value": self._node},
                 {"op": "remove", "path": _ANNOTATION_POINTER}]
        try:
            await self._client.request("PATCH", service_path(namespace, name), content_type=JSON_PATCH, body=patch)
        except ApiError as exc:
            if exc.status not in (404, 422):
                log.warning("could not remove %s from %s: %s", ANNOUNCING_NODE_ANNOTATION, key, exc)
        except OSError as exc:
            log.warning("could not remove %s from %s: %s", ANNOUNCING_NODE_ANNOTATION, key, exc)

    async def release_all(self) -> None:
        for ip in sorted(self.owned):
            await self._release(ip)
        if self._client is not None:
            for key in list(self._marked):
                await self._unmark(key)
