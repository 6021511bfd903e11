"""Drives Services to their balancers: caches what the reflectors deliver, queues keys, and for
each key decides (with lbctl.model) and acts (provider, status patch, Events).

The caches are filled whether or not this replica leads (a standby stays warm); only `lead()`
starts the workers, the orphan sweep and every write.

Like the Kubernetes service controller: one key is never synced by two workers at once, failures
come back with backoff, a node change re-syncs only the Services whose node set changed, and a
Service's status is written only when it changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.kube.client import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, ApiError, KubeClient, service_path
from lbctl.kube.events import EventRecorder
from lbctl.model import nodeports
from lbctl.model.errors import LoadBalancerError, NoEligibleNodesError, PendingError, TransientProviderError
from lbctl.model.names import load_balancer_name
from lbctl.model.nodes import eligible_nodes, node_set_key
from lbctl.model.orphans import orphans
from lbctl.model.scope import FINALIZER, OWNER_ANNOTATION, Scope
from lbctl.model.spec import build_spec, missing_node_ports
from lbctl.model.status import current_condition, ingress_to_api, ready_condition, status_patch
from lbctl.model.types import LoadBalancerRef, NodeTarget
from lbctl.operator import metrics
from lbctl.operator.workqueue import WorkQueue
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
    workers: int = 32
    node_port_range: tuple[int, int] = (30000, 32767)
    node_debounce_s: float = 0.2
    resync_interval_s: float = 600.0
    gc_interval_s: float = 300.0
    instance: str = ""  # this replica's identity, as Events' reportingInstance


# Annotations lbctl's own components write on Services; a change of them is no reason to sync.
_WRITTEN_BY_LBCTL = frozenset({"lbctl.io/announcing-node"})


def _key(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _relevant(body: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    """What a sync depends on: a watch event that changes none of it (our own status write
    coming back, say) does not queue the Service again."""
    if body is None:
        return None
    meta = body.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _WRITTEN_BY_LBCTL}
    # the spec itself, not metadata.generation: the apiserver does not maintain it for Services
    return (meta.get("uid"), body.get("spec"), annotations, meta.get("labels"),
            tuple(meta.get("finalizers") or ()), meta.get("deletionTimestamp"))


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


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _addresses(ingress: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(i.get("ip") or i.get("hostname") or "?" for i in ingress) or "none"


class Reconciler:
    def __init__(self, settings: ReconcilerSettings, provider: Provider, client: KubeClient) -> None:
        self.settings = settings
        self.provider = provider
        self.client = client
        self.events = EventRecorder(client, instance=settings.instance)
        self.scope = settings.scope
        self.queue = WorkQueue()
        self.services: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.eligible: tuple[NodeTarget, ...] = ()
        self.resources: dict[WatchedResource, dict[str, dict[str, Any]]] = {}
        self._synced_nodes: dict[str, frozenset[tuple[str, str]]] = {}
        self._refs: dict[str, LoadBalancerRef] = {}  # what we ensured, to release after a force-delete
        self._pending: set[str] = set()
        self._last_event: dict[str, tuple[str, str]] = {}
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
        state from the Services' status; then start the workers, Services without an address first.
        `sweep_soon`: look for orphaned balancers shortly after, not only after --gc-interval (a
        replica taking over from another cannot know what was deleted while it stood by)."""
        self.eligible = eligible_nodes(self.nodes.values())
        for resource in self.provider.watched_resources:
            await self.provider.resources_changed(resource, list(self.resources.get(resource, {}).values()))
        specs = []
        for service in self.services.values():
            if self.scope.manages(service) and (service.get("status") or {}).get("loadBalancer", {}).get("ingress"):
                try:
                    specs.append(build_spec(service, self._nodes_for_provider(), self.settings.cluster_name))
                except LoadBalancerError:
                    continue  # reported when its key is synced
        await self.provider.restore(specs)
        ours = [key for key, service in self.services.items() if self.scope.concerns(service)]
        # the Services users are waiting for go first; the rest are usually no-op re-syncs
        ours.sort(key=lambda k: bool(((self.services[k].get("status") or {}).get("loadBalancer") or {}).get("ingress")))
        for key in ours:
            self.queue.add(key)
        for _ in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._worker()))
        self._tasks.append(asyncio.create_task(
            self._periodic(self.settings.gc_interval_s, self.collect_orphans, first_s=10.0 if sweep_soon else None)))
        self._tasks.append(asyncio.create_task(self._periodic(self.settings.resync_interval_s, self._resync)))
        self.started.set()
        log.info("started: %d services (%d ours), %d nodes (%d eligible)", len(self.services), len(ours),
                 len(self.nodes), len(self.eligible))
        # from here on every change is handled as it comes; catch up with any that came meanwhile
        if node_set_key(eligible_nodes(self.nodes.values())) != node_set_key(self.eligible):
            self._nodes_settled()
        for resource in self.provider.watched_resources:
            await self._write_resource_status(resource)

    async def stop(self) -> None:
        self.queue.shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.close()
        await self.provider.close()
        await self.client.close()

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
                self._service_gone(_key(old))
            return
        key = _key(new)
        cached = self.services.get(key)
        if not _newer(new, cached):
            return
        self.services[key] = {"kind": "Service", "apiVersion": "v1", **new}
        ours = self.scope.concerns(new) or key in self._refs
        changed = _relevant(new) != _relevant(cached)
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
            self.queue.add(key)  # reconcile() finds no body and releases the balancer

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
                0.05, lambda: asyncio.ensure_future(self._resources_settled(resource))
            )

    async def _resources_settled(self, resource: WatchedResource) -> None:
        self._resource_timers.pop(resource, None)
        affected = await self.provider.resources_changed(resource, list(self.resources[resource].values()))
        for key in affected | self._pending:
            self.queue.add(key)
        await self._write_resource_status(resource)

    def _refresh_resource_status(self) -> None:
        """Assignments change what the provider's objects report (a pool's free count): write it
        once per second at most, not once per Service."""
        if self._status_refresh is not None or not self.provider.watched_resources:
            return

        async def refresh() -> None:
            await asyncio.sleep(1.0)
            self._status_refresh = None
            for resource in self.provider.watched_resources:
                await self._write_resource_status(resource)

        self._status_refresh = asyncio.create_task(refresh())

    async def _write_resource_status(self, resource: WatchedResource) -> None:
        for name, status in self.provider.resource_status(resource).items():
            current = self.resources.get(resource, {}).get(name)
            if current is None or current.get("status") == status:
                continue
            path = f"/apis/{resource.group}/{resource.version}/{resource.plural}/{name}/status"
            self._fence()
            try:
                updated = await self.client.request("PATCH", path, body={"status": status}, content_type=MERGE_PATCH)
                self.resources[resource][name] = updated
            except ApiError as exc:
                log.warning("could not write status of %s %s: %s", resource.plural, name, exc)
                continue
            before = {c.get("type"): c for c in (current.get("status") or {}).get("conditions") or ()}
            for condition in status.get("conditions") or ():
                if condition.get("status") == "False" and before.get(condition.get("type")) != condition:
                    await self.events.warning(updated, condition.get("reason", "Invalid"), condition.get("message", ""))

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
        self.queue.forget(key)
        self._synced_nodes.pop(key, None)
        self._pending.discard(key)
        self._last_event.pop(key, None)

    def _nodes_for_provider(self) -> tuple[NodeTarget, ...]:
        return self.eligible if self.provider.uses_nodes else ()

    async def _ensure(self, key: str, body: dict[str, Any]) -> None:
        if not self.scope.holds(body):
            body = await self._patch_service(key, {"metadata": {
                "finalizers": [FINALIZER], "annotations": {OWNER_ANNOTATION: self.scope.lb_class}}})
        no_auto_ports = (body.get("spec") or {}).get("allocateLoadBalancerNodePorts") is False
        if self.provider.needs_node_ports and no_auto_ports and missing_node_ports(body):
            await self._claim_node_ports(key, body)
            return
        nodes = self._nodes_for_provider()
        spec = build_spec(body, nodes, self.settings.cluster_name)
        if self.provider.uses_nodes and not nodes:
            raise NoEligibleNodesError(
                f"no eligible nodes among {len(self.nodes)}: each is not Ready, being deleted, labelled "
                "node.kubernetes.io/exclude-from-external-load-balancers or tainted ToBeDeletedByClusterAutoscaler",
                fix="make at least one node Ready and eligible")
        before = ((body.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if not before:
            await self._event(key, body, "Normal", "EnsuringLoadBalancer", "Ensuring load balancer")
        self._fence()
        status = await self.provider.ensure(spec)
        self._refs[key] = spec.ref
        ingress = ingress_to_api(status.ingress)
        condition = ready_condition(True, "LoadBalancerEnsured",
                                    f"{self.provider.name} load balancer at {_addresses(ingress)}",
                                    (body.get("metadata") or {}).get("generation"), _now(),
                                    current_condition(body))
        await self._write_status(key, body, ingress, condition)
        node_key = node_set_key(nodes)
        if not before:
            await self._event(key, body, "Normal", "EnsuredLoadBalancer", "Ensured load balancer")
        elif _addresses(before) != _addresses(ingress):
            await self._event(key, body, "Normal", "UpdatedLoadBalancer",
                              f"Load balancer moved from {_addresses(before)} to {_addresses(ingress)}")
        elif key in self._synced_nodes and self._synced_nodes[key] != node_key:
            await self._event(key, body, "Normal", "UpdatedLoadBalancer", "Updated load balancer with new hosts")
        self._synced_nodes[key] = node_key
        self._pending.discard(key)
        self.queue.forget(key)
        metrics.SYNCS.labels(result="ensured").inc()
        self._refresh_resource_status()

    async def _release(self, key: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        await self._event(key, body, "Normal", "DeletingLoadBalancer", "Deleting load balancer")
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
        await self._event(key, body, "Normal", "DeletedLoadBalancer", "Deleted load balancer")
        self._refs.pop(key, None)
        self._forget(key)
        metrics.SYNCS.labels(result="released").inc()
        self._refresh_resource_status()
        for waiting in self._pending:  # capacity was freed: those waiting for it try again now
            self.queue.add(waiting)

    async def _failed(self, key: str, error: LoadBalancerError, deleting: bool) -> None:
        body = self.services.get(key)
        metrics.SYNCS.labels(result="failed").inc()
        reason = "DeleteLoadBalancerFailed" if deleting else error.reason
        message = f"Error {'deleting' if deleting else 'syncing'} load balancer: {error.describe()}"
        log.warning("%s: %s", key, message)
        if body is not None:
            await self._event(key, body, "Warning", reason, message)
            if not (body.get("metadata") or {}).get("deletionTimestamp"):
                condition = ready_condition(False, getattr(error, "condition_reason", "Failed"), error.describe(),
                                            (body.get("metadata") or {}).get("generation"), _now(),
                                            current_condition(body))
                try:
                    keep = deleting or await self._still_exists(key, body)
                    ingress: list[dict[str, Any]] | None = None if keep else []
                    await self._write_status(key, body, ingress, condition)
                except ApiError as exc:
                    log.warning("%s: could not write condition: %s", key, exc)
        if error.retryable:
            if isinstance(error, PendingError):
                self._pending.add(key)
            self.queue.retry_later(key)
        else:
            self.queue.forget(key)  # synced again when the Service changes

    async def _still_exists(self, key: str, body: Mapping[str, Any]) -> bool:
        """After a failed sync: does the balancer the status shows still exist? A transient error
        leaves a working balancer in place; an address taken back (a pool shrank) must leave the
        status too, or clients would be sent to an address that is no longer this Service's."""
        if not ((body.get("status") or {}).get("loadBalancer") or {}).get("ingress"):
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
        namespace, name = key.split("/", 1)
        updated = await self.client.request("PATCH", service_path(namespace, name), body=patch,
                                            content_type=STRATEGIC_MERGE_PATCH)
        self._remember(key, updated)
        return self.services.get(key, updated)

    async def _write_status(self, key: str, body: dict[str, Any], ingress: list[dict[str, Any]] | None,
                            condition: Mapping[str, Any] | None) -> None:
        patch = status_patch(body, ingress, condition)
        if patch is None:
            return
        self._fence()
        namespace, name = key.split("/", 1)
        updated = await self.client.request("PATCH", service_path(namespace, name, "status"), body=patch,
                                            content_type=MERGE_PATCH)
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
                               fix="free NodePorts or set allocateLoadBalancerNodePorts: true") from None
        new_ports = nodeports.with_node_ports(ports, chosen)
        self._fence()
        rv = body["metadata"]["resourceVersion"]
        namespace, name = key.split("/", 1)
        try:
            updated = await self.client.request(
                "PATCH", service_path(namespace, name), content_type=JSON_PATCH,
                body=[{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                      {"op": "replace", "path": "/spec/ports", "value": new_ports}])
        except ApiError as exc:
            if exc.status in (409, 422):
                log.info("%s: NodePort claim lost (%s); picking again", key, exc)
                self.queue.add_after(key, 0.05)
                return
            raise
        self._claimed_ports.update(chosen)
        self._remember(key, updated)
        described = ", ".join(f"{p['port']}/{p.get('protocol', 'TCP')}→{p['nodePort']}"
                              for i, p in enumerate(new_ports) if i in missing)
        await self._event(key, body, "Normal", "AllocatedNodePorts",
                          f"allocateLoadBalancerNodePorts is false but the {self.provider.name} provider sends "
                          f"traffic to NodePorts: claimed {described}")
        self.queue.add(key)

    async def _event(self, key: str, body: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        # the same event twice in a row for one Service tells the reader nothing new
        if self._last_event.get(key) == (reason, message):
            return
        self._last_event[key] = (reason, message)
        await self.events.record(body, event_type, reason, message)

    # ---- orphans ------------------------------------------------------------------------------

    async def collect_orphans(self) -> list[LoadBalancerRef]:
        found = orphans(await self.provider.list_owned(), self.services, self.scope)
        for ref in found:
            self._fence()
            log.info("deleting orphaned load balancer %s (service %s)", ref.name, ref.service_key)
            try:
                await self.provider.delete(ref)
            except Exception:
                log.exception("could not delete orphan %s", ref.name)
        return found

