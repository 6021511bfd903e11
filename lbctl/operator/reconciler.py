"""Drives Services to their balancers: caches what the reflectors deliver, queues keys, and for
each key decides (with lbctl.model) and acts (provider, status patch, Events).

The caches are filled whether or not this replica leads (a standby stays warm); only `lead()`
starts the workers, the orphan sweep and every write. Writes go through a `ServiceWriter` and
Events to an `EventSink` (lbctl.operator.writer), so unit tests drive this class with an
in-memory writer; what to do after each provider call is lbctl.model.outcome's decision.

Like the Kubernetes service controller: one key is never synced by two workers at once, failures
come back with backoff, a node change re-syncs only the Services whose node set changed, and a
Service's status is written only when it changes. A pending Service records what it waits for
(lbctl.model.waits), and only a change that can end that wait requeues it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.kube.client import ApiError
from lbctl.model import nodeports
from lbctl.model.errors import LoadBalancerError, PendingError, TransientProviderError
from lbctl.model.meta import FINALIZER, OWNER_ANNOTATION, WRITTEN_BY_LBCTL, now, object_key, split_key, timestamp
from lbctl.model.names import load_balancer_name
from lbctl.model.nodes import eligible_nodes, node_set_key
from lbctl.model.orphans import orphans
from lbctl.model.outcome import (
    DELETED,
    EventSpec,
    Outcome,
    RecordedEvent,
    after_ensure,
    after_failure,
    allocated_node_ports,
    condition_warnings,
    deleting_event,
    ensuring_event,
    missing_events,
    no_eligible_nodes,
    retry_for,
)
from lbctl.model.scope import Scope
from lbctl.model.spec import build_spec, missing_node_ports
from lbctl.model.status import ingress_to_api, status_patch
from lbctl.model.types import LoadBalancerRef, NodeTarget
from lbctl.model.waits import Change, ChangeKind, Wait, WaitFor, wakes
from lbctl.operator import defaults, metrics
from lbctl.operator.workqueue import WorkQueue
from lbctl.operator.writer import EventSink, ServiceWriter
from providers.base import Provider, WatchedResource

log = logging.getLogger("lbctl.operator")


class MissingResourceError(RuntimeError):
    """A resource the provider reads is not served (its CRD is not installed)."""


class NotLeadingError(RuntimeError):
    """This replica may no longer act (its Lease was not renewed in time); nothing more is written."""


@dataclass(frozen=True)
class ReconcilerSettings:
    cluster_name: str
    scope: Scope
    workers: int = defaults.WORKERS
    node_port_range: tuple[int, int] = defaults.NODE_PORT_RANGE
    node_debounce_s: float = defaults.NODE_DEBOUNCE_S
    resync_interval_s: float = defaults.RESYNC_INTERVAL_S
    gc_interval_s: float = defaults.GC_INTERVAL_S


def _relevant(body: Mapping[str, Any] | None, marked_for: str | None = None) -> tuple[Any, ...] | None:
    """What a sync depends on: a watch event that changes none of it (our own status write
    coming back, say) does not queue the Service again. `marked_for`: as if it carried our
    finalizer and mark for that class already."""
    if body is None:
        return None
    meta = body.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in WRITTEN_BY_LBCTL}
    finalizers = tuple(meta.get("finalizers") or ())
    if marked_for is not None:
        annotations[OWNER_ANNOTATION] = marked_for
        finalizers += () if FINALIZER in finalizers else (FINALIZER,)
    # the spec itself, not metadata.generation: the apiserver does not maintain it for Services
    return (meta.get("uid"), body.get("spec"), annotations, meta.get("labels"), finalizers,
            meta.get("deletionTimestamp"))


def _newer(candidate: Mapping[str, Any], cached: Mapping[str, Any] | None) -> bool:
    if cached is None:
        return True
    try:
        return int(candidate["metadata"]["resourceVersion"]) >= int(cached["metadata"]["resourceVersion"])
    except (KeyError, ValueError, TypeError):
        return True


def _same_resource_spec(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    deleting = [(x.get("metadata") or {}).get("deletionTimestamp") for x in (a, b)]
    return a.get("spec") == b.get("spec") and deleting[0] == deleting[1]


def _ref(body: Mapping[str, Any], cluster_name: str) -> LoadBalancerRef:
    meta = body.get("metadata") or {}
    return LoadBalancerRef(name=load_balancer_name(meta.get("uid", "")), cluster_name=cluster_name,
                           namespace=meta.get("namespace", ""), service_name=meta.get("name", ""),
                           uid=meta.get("uid"))


def _ingress(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(((body.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])


def _ips(ingress: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(i["ip"]) for i in ingress if i.get("ip"))


class Reconciler:
    def __init__(self, settings: ReconcilerSettings, provider: Provider, writer: ServiceWriter,
                 events: EventSink) -> None:
        self.settings = settings
        self.provider = provider
        self.writer = writer
        self.events = events
        self.scope = settings.scope
        self.queue = WorkQueue()
        self.services: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.eligible: tuple[NodeTarget, ...] = ()
        self.resources: dict[WatchedResource, dict[str, dict[str, Any]]] = {}
        #: the provider's resources being watched: its watched_resources, and those of its
        #: optional_resources the cluster serves (lbctl.operator.informers adds them)
        self.watched: list[WatchedResource] = list(provider.watched_resources)
        self._synced_nodes: dict[str, frozenset[tuple[str, str]]] = {}
        self._refs: dict[str, LoadBalancerRef] = {}  # what we ensured, to release after a force-delete
        self._held: dict[str, tuple[str, ...]] = {}  # the addresses each Service was last given
        self.waits: dict[str, Wait] = {}  # what each pending Service waits for
        self._deleting: set[str] = set()  # releases announced (DeletingLoadBalancer) and not done yet
        self._tasks: list[asyncio.Task[None]] = []
        self._node_timer: asyncio.TimerHandle | None = None
        self._resource_timers: dict[WatchedResource, asyncio.TimerHandle] = {}
        self._claimed_ports: set[int] = set()
        self._status_refresh: asyncio.Task[None] | None = None
        self.started = asyncio.Event()
        #: whether this replica may act right now (leader election's fence; always, without it)
        self.may_act: Callable[[], bool] = lambda: True

    def _fence(self) -> None:
        if not self.may_act():
            raise NotLeadingError("this replica no longer holds the leader Lease")

    # ---- start-up and shutdown -------------------------------------------------------------

    async def lead(self, sweep_soon: bool = False) -> None:
        """Start acting, from the caches the reflectors filled (their first list, or everything
        seen since while standing by): hand the provider the current pools and let it rebuild its
        state from the Services' status; post the outcomes a crash kept from becoming Events; then
        start the workers, Services without an address first.
        `sweep_soon`: look for orphaned balancers shortly after, not only after --gc-interval (a
        replica taking over from another cannot know what was deleted while it stood by)."""
        self.eligible = eligible_nodes(self.nodes.values())
        for resource in reversed(self.watched):  # optional ones (BGP peers) first: pools' status reads them
            await self.provider.resources_changed(resource, list(self.resources.get(resource, {}).values()))
        specs = []
        for service in self.services.values():
            if self.scope.manages(service) and _ingress(service):
                try:
                    specs.append(build_spec(service, self._nodes_for_provider(), self.settings.cluster_name))
                except LoadBalancerError:
                    continue  # reported when its key is synced
        await self.provider.restore(specs)
        await self._record_missing(await self.events.recorded())
        ours = [key for key, service in self.services.items() if self.scope.concerns(service)]
        # the Services users are waiting for go first; the rest are usually no-op re-syncs
        ours.sort(key=lambda k: bool(_ingress(self.services[k])))
        for key in ours:
            self.queue.add(key)
        for _ in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._worker()))
        first_sweep = defaults.FIRST_SWEEP_S if sweep_soon else None
        self._tasks.append(asyncio.create_task(
            self._periodic(self.settings.gc_interval_s, self.collect_orphans, first_s=first_sweep)))
        self._tasks.append(asyncio.create_task(self._periodic(self.settings.resync_interval_s, self._resync)))
        self.started.set()
        log.info("started: %d services (%d ours), %d nodes (%d eligible)", len(self.services), len(ours),
                 len(self.nodes), len(self.eligible))
        # from here on every change is handled as it comes; catch up with any that came meanwhile
        if node_set_key(eligible_nodes(self.nodes.values())) != node_set_key(self.eligible):
            self._nodes_settled()
        for resource in self.watched:
            # a pool that changed while we were getting ready reached only the cache: hand the
            # provider the list once more (a no-op when nothing changed) and write the status
            await self._resources_settled(resource)

    async def _record_missing(self, recorded: list[RecordedEvent]) -> None:
        """Outcomes the Services' status shows but no Event does (the previous leader died with them
        queued): recorded now, so no Service is left without the Event of its last outcome."""
        by_uid: dict[str, list[RecordedEvent]] = {}
        for seen in recorded:
            by_uid.setdefault(seen.uid, []).append(seen)
        at = now()
        missing = 0
        for service in self.services.values():
            if not self.scope.manages(service):
                continue
            uid = str((service.get("metadata") or {}).get("uid") or "")
            for event in missing_events(service, by_uid.get(uid, ()), at):
                await self._record(service, event)
                missing += 1
        if missing:
            log.info("recorded %d events that an earlier run did not get to post", missing)

    async def stop(self) -> None:
        self.queue.shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.close()
        await self.provider.close()

    async def _periodic(self, interval_s: float, action: Any, first_s: float | None = None) -> None:
        delay = first_s
        while True:
            await asyncio.sleep(delay if delay is not None else interval_s * random.uniform(0.9, 1.1))
            delay = None
            try:
                await action()
            except Exception:
                log.exception("periodic %s failed", getattr(action, "__name__", action))

    async def _resync(self) -> None:
        for key, service in self.services.items():
            if self.scope.manages(service):
                self.queue.add(key)

    # ---- changes reported by the reflectors (lbctl.operator.informers) ---------------------
    # `new` is None for a deletion, whether a DELETED event or an object missing from a re-list.

    def on_service(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        if new is None:
            if old is not None:
                self._service_gone(object_key(old))
            return
        key = object_key(new)
        cached = self.services.get(key)
        if not _newer(new, cached):
            return
        self.services[key] = {"kind": "Service", "apiVersion": "v1", **new}
        ours = self.scope.concerns(new) or key in self._refs
        # our own finalizer write, seen on the watch before its answer came back, is no change
        changed = _relevant(new) not in (_relevant(cached), _relevant(cached, marked_for=self.scope.lb_class))
        log.debug("service %s: ours=%s changed=%s", key, ours, changed)
        if self.started.is_set() and ours and changed:
            self.queue.add(key)

    def _service_gone(self, key: str) -> None:
        cached = self.services.pop(key, None)
        if not self.started.is_set():
            # A standby cannot tell a release by the leader from a finalizer removed by hand (it
            # never sees the leader's writes first): the sweep at takeover finds what is left.
            return
        if key not in self._refs and cached is not None and self.scope.holds(cached):
            # it still had our finalizer when last seen: the finalizer was removed by hand (maybe
            # while the watch was down), so its balancer was never released
            self._refs[key] = _ref(cached, self.settings.cluster_name)
        if key in self._refs:
            if cached is not None:
                self._held.setdefault(key, _ips(_ingress(cached)))  # to wake whoever waits for them
            self.queue.add(key)  # reconcile() finds no body and releases the balancer
        elif cached is not None and nodeports.used_node_ports([cached]):
            self._wake(Change(ChangeKind.FREED, service=key, node_ports=True))  # its NodePorts are free

    def on_node(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        if new is None:
            if old is not None:
                self.nodes.pop(old["metadata"]["name"], None)
        else:
            self.nodes[new["metadata"]["name"]] = dict(new)
        if self.started.is_set() and self._node_timer is None:
            # one batch per burst of node changes
            self._node_timer = asyncio.get_running_loop().call_later(self.settings.node_debounce_s, self._nodes_settled)

    def _nodes_settled(self) -> None:
        self._node_timer = None
        eligible = eligible_nodes(self.nodes.values())
        if node_set_key(eligible) == node_set_key(self.eligible):
            self.eligible = eligible
            return
        self.eligible = eligible
        if not self.provider.uses_nodes:
            return
        current = node_set_key(eligible)
        affected = [k for k, s in self.services.items()
                    if self.scope.manages(s) and self._synced_nodes.get(k) != current]
        log.info("eligible nodes changed (%d now): re-syncing %d services", len(eligible), len(affected))
        for key in affected:
            self.queue.add(key)
        self._wake(Change(ChangeKind.NODES))

    def on_resource(self, resource: WatchedResource, old: Mapping[str, Any] | None,
                    new: Mapping[str, Any] | None) -> None:
        objects = self.resources.setdefault(resource, {})
        if new is None:
            if old is None:
                return
            objects.pop(old["metadata"]["name"], None)
        else:
            name = new["metadata"]["name"]
            previous = objects.get(name)
            objects[name] = dict(new)
            if previous is not None and _same_resource_spec(previous, new):
                return  # a status write of ours
        if self.started.is_set() and resource not in self._resource_timers:
            self._resource_timers[resource] = asyncio.get_running_loop().call_later(
                defaults.RESOURCE_DEBOUNCE_S, lambda: asyncio.ensure_future(self._resources_settled(resource))
            )

    async def _resources_settled(self, resource: WatchedResource) -> None:
        self._resource_timers.pop(resource, None)
        # the Services the change displaced, and those waiting that a new or changed pool may serve
        # (the provider knows what its pools offer); a BGP peer or a pool no waiter may use wakes nobody
        affected = await self.provider.resources_changed(resource, list(self.resources.get(resource, {}).values()))
        self._wake(Change(ChangeKind.POOLS, services=frozenset(affected)))
        for key in affected:
            self.queue.add(key)
        for watched in self.watched:  # one resource's status may depend on another's (pools on peers)
            await self._write_resource_status(watched)

    def _wake(self, change: Change) -> None:
        """Requeue the pending Services that `change` may serve; the others keep waiting."""
        for key, wait in list(self.waits.items()):
            if wakes(wait, change, key):
                log.info("%s woken: %s (it waited for %s)", key, change.describe(), wait.describe())
                self.queue.add(key)

    def _refresh_resource_status(self) -> None:
        """Assignments change what the provider's objects report (a pool's free count): write it
        once per second at most, not once per Service."""
        if self._status_refresh is not None or not self.watched:
            return

        async def refresh() -> None:
            await asyncio.sleep(defaults.STATUS_REFRESH_S)
            self._status_refresh = None
            for resource in self.watched:
                await self._write_resource_status(resource)

        self._status_refresh = asyncio.create_task(refresh())

    async def _write_resource_status(self, resource: WatchedResource) -> None:
        for name, status in self.provider.resource_status(resource).items():
            current = self.resources.get(resource, {}).get(name)
            # only the fields written here: others may have the rest (forwarders write a peer's nodes)
            if current is None or all((current.get("status") or {}).get(k) == v for k, v in status.items()):
                continue
            self._fence()
            try:
                updated = await self.writer.patch_resource_status(resource, name, status)
                self.resources[resource][name] = updated
            except ApiError as exc:
                log.warning("could not write status of %s %s: %s", resource.plural, name, exc)
                continue
            for warning in condition_warnings(current.get("status"), status):
                await self._record(updated, warning)

    # ---- the work loop ------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            started = time.monotonic()
            try:
                await self.reconcile(key)
            except NotLeadingError:
                return  # the process is stopping: leader election lost
            except Exception:  # never let one Service stop a worker
                log.exception("unexpected error syncing %s", key)
                self.queue.retry_later(key)
            finally:
                self.queue.done(key)
                metrics.SYNC_SECONDS.observe(time.monotonic() - started)

    async def reconcile(self, key: str) -> None:
        self._fence()
        body = self.services.get(key)
        if body is None:
            ref = self._refs.get(key)
            if ref is not None:  # gone without our release (finalizer removed by hand): release now
                log.info("%s: deleted without its finalizer; releasing balancer %s", key, ref.name)
                await self.provider.delete(ref)  # on failure the worker retries with backoff
                self._refs.pop(key, None)
                self._forget(key)
                self._wake(Change(ChangeKind.FREED, service=key, addresses=self._held.pop(key, ()), node_ports=True))
            return
        try:
            if self.scope.manages(body):
                await self._ensure(key, body)
            elif self.scope.holds(body):
                await self._release(key, body)
            else:
                self._forget(key)
        except NotLeadingError:
            raise
        except LoadBalancerError as exc:
            await self._failed(key, exc, deleting=not self.scope.manages(body))
        except ApiError as exc:
            await self._failed(key, TransientProviderError(f"Kubernetes API: {exc}"), deleting=False)
        except Exception as exc:
            log.exception("provider error on %s", key)
            await self._failed(key, TransientProviderError(f"{type(exc).__name__}: {exc}"),
                               deleting=not self.scope.manages(body))

    def _forget(self, key: str) -> None:
        self._deleting.discard(key)
        self.queue.forget(key)
        self._synced_nodes.pop(key, None)
        self.waits.pop(key, None)

    def _nodes_for_provider(self) -> tuple[NodeTarget, ...]:
        return self.eligible if self.provider.uses_nodes else ()

    async def _ensure(self, key: str, body: dict[str, Any]) -> None:
        self._deleting.discard(key)  # a LoadBalancer again before its release was done
        if not self.scope.holds(body):
            body = await self._patch_service(key, {"metadata": {
                "finalizers": [FINALIZER], "annotations": {OWNER_ANNOTATION: self.scope.lb_class}}})
        no_auto_ports = (body.get("spec") or {}).get("allocateLoadBalancerNodePorts") is False
        if self.provider.needs_node_ports and no_auto_ports and missing_node_ports(body):
            await self._claim_node_ports(key, body)
            return
        nodes = self._nodes_for_provider()
        spec = build_spec(body, nodes, self.settings.cluster_name)
        if (unavailable := no_eligible_nodes(self.provider.uses_nodes, len(nodes), len(self.nodes))) is not None:
            raise unavailable
        ensuring = ensuring_event(body)
        if ensuring is not None:
            await self._record(body, ensuring)
        self._fence()
        status = await self.provider.ensure(spec)
        self._refs[key] = spec.ref
        ingress = ingress_to_api(status.ingress)
        node_key = node_set_key(nodes)
        hosts_changed = key in self._synced_nodes and self._synced_nodes[key] != node_key
        outcome = after_ensure(body, ingress, self.provider.name, hosts_changed, timestamp())
        await self._write_status(key, body, outcome.ingress, outcome.condition)
        for event in outcome.events:
            await self._record(body, event)
        self._synced_nodes[key] = node_key
        self.waits.pop(key, None)
        self.queue.forget(key)
        metrics.SYNCS.labels(result="ensured", reason="LoadBalancerEnsured").inc()
        before, after = _ips(_ingress(body)), _ips(ingress)
        self._held[key] = after
        freed = tuple(ip for ip in before if ip not in after)
        if freed:
            self._wake(Change(ChangeKind.FREED, service=key, addresses=freed))
        self._refresh_resource_status()

    async def _release(self, key: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        deleting = deleting_event(key in self._deleting)
        if deleting is not None:
            await self._record(body, deleting)
            self._deleting.add(key)
        ref = _ref(body, self.settings.cluster_name)
        self._fence()
        await self.provider.delete(ref)
        if not meta.get("deletionTimestamp"):
            await self._write_status(key, body, [], None)
        try:
            await self._patch_service(key, {"metadata": {
                "$deleteFromPrimitiveList/finalizers": [FINALIZER], "annotations": {OWNER_ANNOTATION: None}}})
        except ApiError as exc:
            if exc.status != 404:
                raise
        await self._record(body, DELETED)
        self._refs.pop(key, None)
        self._forget(key)
        metrics.SYNCS.labels(result="released", reason="LoadBalancerDeleted").inc()
        self._refresh_resource_status()
        freed = tuple(dict.fromkeys(self._held.pop(key, ()) + _ips(_ingress(body))))
        self._wake(Change(ChangeKind.FREED, service=key, addresses=freed, node_ports=True))

    async def _failed(self, key: str, error: LoadBalancerError, deleting: bool) -> None:
        body = self.services.get(key)
        metrics.SYNCS.labels(result="failed", reason=getattr(error, "condition_reason", error.reason)).inc()
        if body is None:
            outcome = Outcome(condition=None, ingress=None, retry=retry_for(error, deleting))
        else:
            exists = deleting or await self._still_exists(key, body)
            outcome = after_failure(body, error, deleting, exists, timestamp())
            for event in outcome.events:
                await self._record(body, event)
            try:
                await self._write_status(key, body, outcome.ingress, outcome.condition)
            except ApiError as exc:
                log.warning("%s: could not write condition: %s", key, exc)
            if outcome.ingress == [] and _ips(_ingress(body)):
                self._held.pop(key, None)
                self._wake(Change(ChangeKind.FREED, service=key, addresses=_ips(_ingress(body))))
        if outcome.wait is not None:
            self.waits[key] = outcome.wait
        else:
            self.waits.pop(key, None)
        delay = self.queue.retry_after(key, outcome.retry) if outcome.retry is not None else None
        waits = f", or when it gets {outcome.wait.describe()}" if outcome.wait is not None else ""
        log.warning("%s: error %s load balancer: %s (again in %.0fs%s)", key, "deleting" if deleting else "syncing",
                    error.describe(), delay or 0.0, waits)

    async def _still_exists(self, key: str, body: Mapping[str, Any]) -> bool:
        """After a failed sync: does the balancer the status shows still exist? A transient error
        leaves a working balancer in place; an address taken back (a pool shrank) must leave the
        status too."""
        if not _ingress(body):
            return True
        ref = _ref(body, self.settings.cluster_name)
        try:
            return await self.provider.get(ref) is not None
        except Exception:
            log.warning("%s: could not check whether its balancer still exists", key, exc_info=True)
            return True

    # ---- writes -------------------------------------------------------------------------------

    async def _patch_service(self, key: str, patch: dict[str, Any]) -> dict[str, Any]:
        self._fence()
        namespace, name = split_key(key)
        updated = await self.writer.patch_service(namespace, name, patch)
        self._remember(key, updated)
        return self.services.get(key, updated)

    async def _write_status(self, key: str, body: dict[str, Any], ingress: list[dict[str, Any]] | None,
                            condition: Mapping[str, Any] | None) -> None:
        patch = status_patch(body, ingress, condition)
        if patch is None:
            return
        self._fence()
        namespace, name = split_key(key)
        updated = await self.writer.patch_service_status(namespace, name, patch)
        self._remember(key, updated)

    def _remember(self, key: str, updated: dict[str, Any]) -> None:
        if updated.get("metadata") and _newer(updated, self.services.get(key)):
            self.services[key] = {"kind": "Service", "apiVersion": "v1", **updated}

    async def _claim_node_ports(self, key: str, body: dict[str, Any]) -> None:
        """allocateLoadBalancerNodePorts: false, but this provider needs NodePorts: propose free
        ones; the apiserver arbitrates (a conflict means another writer won: pick again)."""
        ports = list((body.get("spec") or {}).get("ports") or ())
        missing = missing_node_ports(body)
        used = nodeports.used_node_ports(self.services.values()) | self._claimed_ports
        low, high = self.settings.node_port_range
        try:
            chosen = nodeports.pick_node_ports(len(missing), used, low, high, start=random.randrange(high - low + 1))
        except ValueError as exc:
            raise PendingError(str(exc), field="spec.ports[].nodePort",
                               fix="free NodePorts or set allocateLoadBalancerNodePorts: true",
                               wait=Wait(WaitFor.NODE_PORTS)) from None
        new_ports = nodeports.with_node_ports(ports, chosen)
        self._fence()
        namespace, name = split_key(key)
        try:
            updated = await self.writer.replace_service_ports(namespace, name, body["metadata"]["resourceVersion"],
                                                              new_ports)
        except ApiError as exc:
            if exc.status in (409, 422):
                log.info("%s: NodePort claim lost (%s); picking again", key, exc)
                self.queue.add_after(key, defaults.CLAIM_RETRY_S)
                return
            raise
        self._claimed_ports.update(chosen)
        self._remember(key, updated)
        await self._record(body, allocated_node_ports(self.provider.name, new_ports, missing))
        self.queue.add(key)

    async def _record(self, body: Mapping[str, Any], event: EventSpec) -> None:
        await self.events.record(body, event.type, event.reason, event.message)

    # ---- orphans ------------------------------------------------------------------------------

    async def collect_orphans(self) -> list[LoadBalancerRef]:
        found = orphans(await self.provider.list_owned(), self.services, self.scope)
        metrics.ORPHANS_FOUND.inc(len(found))
        for ref in found:
            self._fence()
            log.info("deleting orphaned load balancer %s (service %s)", ref.name, ref.service_key)
            try:
                await self.provider.delete(ref)
                metrics.ORPHANS_DELETED.inc()
            except Exception:
                log.exception("could not delete orphan %s", ref.name)
        return found
