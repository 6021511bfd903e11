"""Makes this node's share of VIP ownership real: VIP/32 on the local interface and gratuitous ARP
(IPv4), VIP/128 on the announce interface and unsolicited neighbour advertisements (IPv6), at
takeover and a few times after. The owner's name on each Service (annotation and Event) is written
by ServiceMarks in the background: the apiserver may be away, and the VIPs never wait for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lbctl.forwarder import metrics
from lbctl.forwarder.addresses import VipAddresses
from lbctl.forwarder.ownership import VipOwner
from lbctl.kube.client import JSON_PATCH, MERGE_PATCH, ApiError, KubeClient, service_path
from lbctl.kube.events import EventRecorder
from lbctl.model.meta import ANNOUNCING_NODE_ANNOTATION

log = logging.getLogger(__name__)

EVENT_REASON = "AnnouncingAddress"
_REPATCH_S = 2.0
_WRITE_TIMEOUT_S = 5.0
_MAX_BACKOFF_S = 30.0
_ANNOTATION_POINTER = "/metadata/annotations/" + ANNOUNCING_NODE_ANNOTATION.replace("~", "~0").replace("/", "~1")


class Announcer:
    def __init__(self, node: str, addresses: VipAddresses,
                 garp_repeats: Sequence[float] = (0.3, 1.0, 2.0, 4.0)) -> None:
        self._node = node
        self._addresses = addresses
        self._garp_repeats = tuple(garp_repeats)
        self.owned: set[str] = set()
        self.adopted: set[str] = set()  # found on the interface at start-up, not yet confirmed ours
        self.generations: dict[str, int] = {}  # the generation of our take of each VIP we hold
        self._repeaters: dict[str, asyncio.Task[None]] = {}
        self._add_failures: dict[str, str] = {}  # VIP → why adding it failed last

    async def start(self) -> None:
        await asyncio.to_thread(self._addresses.prepare)
        # An earlier run (a restart, a crash) left its VIPs: we keep holding them — the kernel has
        # been answering for them all along — until the first reconcile says whose they are.
        self.owned = await asyncio.to_thread(self._addresses.current)
        self.adopted = set(self.owned)
        if self.owned:
            log.info("kept %d VIP(s) from an earlier run: %s", len(self.owned), ", ".join(sorted(self.owned)))

    async def reconcile(self, owners: Mapping[str, VipOwner], peer_claims: Mapping[str, frozenset[str]],
                        generation_seen: Callable[[str], int] = lambda ip: 0) -> set[str]:
        """Hold exactly the VIPs we own; returns those we hold. A VIP another live peer still holds
        is taken only once that peer has let go (its heartbeat no longer claims it), so two nodes
        never answer for one address. Each take (and each adoption confirmed) gets a generation
        above any claim of the VIP seen so far."""
        mine = {ip for ip, owner in owners.items() if owner.owner == self._node}
        for ip in sorted(self.owned - mine):
            await self._release(ip)
        for ip in set(self._add_failures) - mine:
            del self._add_failures[ip]
        for ip in sorted(mine - self.owned):
            if peer_claims.get(ip):
                log.debug("%s is ours but %s still holds it: waiting", ip, ", ".join(sorted(peer_claims[ip])))
                continue
            await self._take(ip, generation_seen(ip) + 1)
        for ip in sorted(mine & self.adopted):
            # ours still; announce again in case the LAN learnt another MAC while we were away
            self.generations[ip] = generation_seen(ip) + 1
            await self._garp(ip)
        self.adopted.clear()
        return set(self.owned)

    async def _take(self, ip: str, generation: int) -> None:
        try:
            await asyncio.to_thread(self._addresses.add, ip)
        except Exception as exc:
            # retried at every reconcile (5 a second): said once per VIP and reason, not each time
            if self._add_failures.get(ip) != str(exc):
                self._add_failures[ip] = str(exc)
                log.error("could not add VIP %s to %s: %s", ip,
                          "the announce interface" if ":" in ip else self._addresses.interface, exc)
            return
        self._add_failures.pop(ip, None)
        self.owned.add(ip)
        self.generations[ip] = generation
        metrics.OWNERSHIP_CHANGES.labels("taken").inc()
        log.info("announcing %s from this node (%s)", ip,
                 "on the announce interface" if ":" in ip else self._addresses.interface)
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
        self.generations.pop(ip, None)
        metrics.OWNERSHIP_CHANGES.labels("released").inc()
        log.info("no longer announcing %s", ip)

    async def _garp(self, ip: str) -> None:
        """Gratuitous ARP (IPv4) or an unsolicited neighbour advertisement (IPv6) on each link."""
        v6 = ":" in ip
        try:
            links = await asyncio.to_thread(self._addresses.announce, ip)
            (metrics.UNSOLICITED_NA if v6 else metrics.GRATUITOUS_ARP).inc(len(links))
            if not links:
                log.warning("no interface to announce %s on (give one with --interface)", ip)
        except OSError as exc:
            log.warning("%s for %s failed: %s", "neighbour advertisement" if v6 else "gratuitous ARP", ip, exc)

    async def _garp_later(self, ip: str) -> None:
        """Repeats, for switches and hosts that missed the first one."""
        elapsed = 0.0
        for at in self._garp_repeats:
            await asyncio.sleep(max(at - elapsed, 0))
            elapsed = at
            if ip in self.owned:
                await self._garp(ip)

    async def release_all(self) -> None:
        for ip in sorted(self.owned):
            await self._release(ip)

    def stop(self) -> None:
        for task in self._repeaters.values():
            task.cancel()
        self._repeaters.clear()


class ServiceMarks:
    """Keeps the annotation lbctl.io/announcing-node on each Service whose VIP we hold, and posts
    an Event when we take one over. Writes happen in the background, retried with backoff, so a
    slow or absent apiserver delays only this record, never the VIPs."""

    def __init__(self, node: str, client: KubeClient,
                 service_lookup: Callable[[str], Mapping[str, Any] | None]) -> None:
        self._node = node
        self._client = client
        self._events = EventRecorder(client, component="lbctl-forwarder")
        self._lookup = service_lookup
        self._wanted: dict[str, frozenset[str]] = {}  # service key → VIPs we hold for it
        self._marked: dict[str, frozenset[str]] = {}
        self._patched: dict[str, float] = {}  # service key → loop time of our last annotation write
        self._wake = asyncio.Event()

    def _annotation(self, key: str) -> str | None:
        service = self._lookup(key) or {}
        annotations = (service.get("metadata") or {}).get("annotations") or {}
        value = annotations.get(ANNOUNCING_NODE_ANNOTATION) if isinstance(annotations, Mapping) else None
        return value if isinstance(value, str) else None

    def update(self, owners: Mapping[str, VipOwner], held: set[str]) -> None:
        wanted: dict[str, set[str]] = {}
        for ip in held:
            owner = owners.get(ip)
            for key in owner.services if owner is not None else ():
                wanted.setdefault(key, set()).add(ip)
        frozen = {k: frozenset(v) for k, v in wanted.items()}
        if frozen != self._wanted:
            self._wanted = frozen
            self._wake.set()

    def _pending(self, now: float) -> list[tuple[str, frozenset[str] | None]]:
        work: list[tuple[str, frozenset[str] | None]] = []
        for key, ips in self._wanted.items():
            stale = self._annotation(key) != self._node and now - self._patched.get(key, 0.0) > _REPATCH_S
            if self._marked.get(key) != ips or stale:
                work.append((key, ips))
        work += [(key, None) for key in self._marked if key not in self._wanted]
        return work

    async def run(self) -> None:
        backoff = 0.5
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=_REPATCH_S)
            self._wake.clear()
            failed = False
            for key, ips in self._pending(asyncio.get_running_loop().time()):
                try:
                    if ips is None:
                        await asyncio.wait_for(self._unmark(key), _WRITE_TIMEOUT_S)
                    else:
                        await asyncio.wait_for(self._mark(key, ips), _WRITE_TIMEOUT_S)
                except (ApiError, OSError, TimeoutError) as exc:
                    log.warning("could not update %s on %s: %s", ANNOUNCING_NODE_ANNOTATION, key, exc)
                    failed = True
                    break  # the apiserver is probably away: back off instead of trying each Service
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                self._wake.set()
            else:
                backoff = 0.5

    async def _mark(self, key: str, ips: frozenset[str]) -> None:
        if self._marked.get(key) != ips and self._annotation(key) == self._node and key not in self._marked:
            self._marked[key] = ips  # already says so (we restarted): no new write, no Event
            return
        namespace, _, name = key.partition("/")
        try:
            await self._client.request("PATCH", service_path(namespace, name), content_type=MERGE_PATCH,
                                       body={"metadata": {"annotations": {ANNOUNCING_NODE_ANNOTATION: self._node}}})
        except ApiError as exc:
            if exc.status != 404:
                raise
        first = self._marked.get(key) is None
        self._marked[key] = ips
        self._patched[key] = asyncio.get_running_loop().time()
        service = self._lookup(key)
        if first and service is not None:
            message = f"announcing {', '.join(sorted(ips))} from node {self._node}"
            await self._events.normal(service, EVENT_REASON, message)

    async def _unmark(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        # only if it still names us: the new owner may have written its name already
        patch = [{"op": "test", "path": _ANNOTATION_POINTER, "value": self._node},
                 {"op": "remove", "path": _ANNOTATION_POINTER}]
        try:
            await self._client.request("PATCH", service_path(namespace, name), content_type=JSON_PATCH, body=patch)
        except ApiError as exc:
            if exc.status not in (404, 422):
                raise
        self._marked.pop(key, None)
        self._patched.pop(key, None)

    async def close(self) -> None:
        await self._events.close(timeout_s=1.0)
