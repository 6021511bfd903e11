"""Test doubles of lbctl's own seams for driving the reconciler without an apiserver: an in-memory
`ServiceWriter` (it records each write and applies it to its copies of the objects, bumping
resourceVersion as the apiserver would) and an `EventSink` that keeps what was recorded. Neither is
a Kubernetes API: they implement lbctl.operator.writer's Protocols, nothing more.

`Cluster` ties them to a Reconciler the way the reflectors do: `deliver` hands the reconciler the
writer's current copy of an object, as a watch event would."""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from lbctl.kube.client import ApiError
from lbctl.model.errors import TransientProviderError
from lbctl.model.meta import LOCAL_CLASS, object_key
from lbctl.model.outcome import RecordedEvent
from lbctl.model.scope import Scope
from lbctl.model.types import Ingress, LoadBalancerRef, LoadBalancerSpec, LoadBalancerStatus
from lbctl.operator.reconciler import Reconciler, ReconcilerSettings
from providers.base import Provider, ProviderSettings, WatchedResource
from providers.local import POOLS, LocalProvider

_uids = itertools.count(1)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class MemoryWriter:
    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, Any]] = []  # (what, key, body), in order
        self._versions = itertools.count(100)

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(obj)

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", f"00000000-0000-0000-0000-{next(_uids):012d}")
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        obj.setdefault("status", {})
        self.services[object_key(obj)] = obj
        return self._stamp(obj)

    def update(self, key: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """A user's change (not one of the reconciler's writes)."""
        change(self.services[key])
        return self._stamp(self.services[key])

    def delete(self, key: str) -> dict[str, Any] | None:
        """kubectl delete: with finalizers, only marks it deleted; returns the object if it stays."""
        obj = self.services[key]
        if obj["metadata"].get("finalizers"):
            obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z"
            return self._stamp(obj)
        del self.services[key]
        return None

    def _service(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.services.get(f"{namespace}/{name}")
        if obj is None:
            raise ApiError(404, "PATCH", f"{namespace}/{name}", {"message": "not found"})
        return obj

    async def patch_service(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        obj = self._service(namespace, name)
        self.writes.append(("service", f"{namespace}/{name}", copy.deepcopy(dict(patch))))
        meta, change = obj["metadata"], dict(patch.get("metadata") or {})
        finalizers = list(meta.get("finalizers") or ())
        finalizers += [f for f in change.pop("finalizers", ()) if f not in finalizers]
        removed = change.pop("$deleteFromPrimitiveList/finalizers", ())
        meta["finalizers"] = [f for f in finalizers if f not in removed]
        if "annotations" in change:
            meta["annotations"] = merge_patch(meta.get("annotations") or {}, change.pop("annotations"))
        assert not change, f"unexpected metadata patch {change}"
        if meta.get("deletionTimestamp") and not meta["finalizers"]:
            del self.services[f"{namespace}/{name}"]
        return self._stamp(obj)

    async def patch_service_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        obj = self._service(namespace, name)
        self.writes.append(("status", f"{namespace}/{name}", copy.deepcopy(dict(patch))))
        obj["status"] = merge_patch(obj.get("status") or {}, patch["status"])
        return self._stamp(obj)

    async def replace_service_ports(self, namespace: str, name: str, resource_version: str,
                                    ports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        obj = self._service(namespace, name)
        if obj["metadata"]["resourceVersion"] != resource_version:
            raise ApiError(422, "PATCH", f"{namespace}/{name}", {"message": "test operation failed"})
        self.writes.append(("ports", f"{namespace}/{name}", [dict(p) for p in ports]))
        obj["spec"]["ports"] = [dict(p) for p in ports]
        return self._stamp(obj)

    def create_resource(self, resource: WatchedResource, body: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        obj.setdefault("metadata", {}).setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        self.resources[(resource.plural, obj["metadata"]["name"])] = obj
        return self._stamp(obj)

    async def patch_resource_status(self, resource: WatchedResource, name: str,
                                    status: Mapping[str, Any]) -> dict[str, Any]:
        obj = self.resources[(resource.plural, name)]
        self.writes.append(("resource-status", name, copy.deepcopy(dict(status))))
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        return self._stamp(obj)

    def service_writes(self, key: str) -> list[tuple[str, Any]]:
        return [(what, body) for what, k, body in self.writes if k == key and what != "resource-status"]


class MemoryEvents:
    """An EventSink that keeps (key, type, reason, message) in order."""

    def __init__(self, recorded: Sequence[RecordedEvent] = ()) -> None:
        self.events: list[tuple[str, str, str, str]] = []
        self._recorded = list(recorded)

    async def record(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        self.events.append((object_key(obj), event_type, reason, message))

    async def recorded(self) -> list[RecordedEvent]:
        return list(self._recorded)

    async def close(self) -> None:
        pass

    def of(self, key: str) -> list[tuple[str, str]]:
        return [(reason, message) for k, _type, reason, message in self.events if k == key]

    def reasons(self, key: str) -> list[str]:
        return [reason for reason, _message in self.of(key)]


class NodePortProvider(Provider):
    """A tiny provider that sends traffic to NodePorts on every eligible node, like aws; it records
    each ensure and delete."""

    name = "nodeport"
    needs_node_ports = True
    uses_nodes = True
    watched_resources: ClassVar[tuple[WatchedResource, ...]] = ()

    def __init__(self) -> None:
        self.ensured: list[LoadBalancerSpec] = []
        self.deleted: list[LoadBalancerRef] = []
        self.live: dict[str, LoadBalancerRef] = {}
        self.failing_deletes = 0  # how many deletes fail (a 503) before one succeeds

    @classmethod
    def create(cls, settings: ProviderSettings) -> NodePortProvider:
        return cls()

    async def ensure(self, spec: LoadBalancerSpec) -> LoadBalancerStatus:
        self.ensured.append(spec)
        self.live[spec.service.key] = spec.ref
        return LoadBalancerStatus((Ingress(hostname=f"{spec.name}.lb.example"),))

    async def delete(self, ref: LoadBalancerRef) -> None:
        if self.failing_deletes > 0:
            self.failing_deletes -= 1
            raise TransientProviderError("the cloud answered 503")
        self.deleted.append(ref)
        self.live.pop(ref.service_key, None)

    async def get(self, ref: LoadBalancerRef) -> LoadBalancerStatus | None:
        return LoadBalancerStatus((Ingress(hostname=f"{ref.name}.lb.example"),)) if ref.service_key in self.live \
            else None

    async def list_owned(self) -> list[LoadBalancerRef]:
        return list(self.live.values())

    def synced(self, key: str) -> list[LoadBalancerSpec]:
        return [s for s in self.ensured if s.service.key == key]


class ObservedLocalProvider(LocalProvider):
    """The real local provider; each ensure also notes whether the Service held our finalizer then."""

    def __init__(self, writer: MemoryWriter) -> None:
        super().__init__("test")
        self._writer = writer
        self.finalizer_at_ensure: dict[str, bool] = {}

    async def ensure(self, spec: LoadBalancerSpec) -> LoadBalancerStatus:
        obj = self._writer.services.get(spec.service.key) or {}
        self.finalizer_at_ensure[spec.service.key] = bool((obj.get("metadata") or {}).get("finalizers"))
        return await super().ensure(spec)


def service(name: str, *, namespace: str = "default", lb_class: str | None = LOCAL_CLASS, ports: Sequence[int] = (80,),
            annotations: Mapping[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})},
        "spec": {"type": "LoadBalancer", "selector": {"app": name},
                 "ports": [{"name": f"p{i}", "port": p, "protocol": "TCP"} for i, p in enumerate(ports)], **spec},
    }
    if lb_class:
        body["spec"]["loadBalancerClass"] = lb_class
    return body


def node(name: str, ready: bool = True, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": dict(labels or {}), "resourceVersion": "1"},
            "spec": {"providerID": f"test://{name}"},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}


class Cluster:
    """A Reconciler with the doubles, started without workers: `sync` processes what is queued,
    one key at a time, so each test sees exactly which keys a change queued."""

    def __init__(self, provider: Provider, writer: MemoryWriter | None = None, events: MemoryEvents | None = None,
                 lb_class: str = LOCAL_CLASS) -> None:
        self.writer = writer or MemoryWriter()
        self.events = events or MemoryEvents()
        self.provider = provider
        settings = ReconcilerSettings(cluster_name="test", scope=Scope(lb_class), workers=0, node_debounce_s=0.0,
                                      node_port_range=(30000, 30009))
        self.reconciler = Reconciler(settings, provider, self.writer, self.events)

    def add(self, body: Mapping[str, Any]) -> str:
        created = self.writer.create(body)
        self.reconciler.on_service(None, created)
        return object_key(created)

    def deliver(self, key: str) -> None:
        """The watch event for the writer's current copy (a deletion when it is gone)."""
        old = self.reconciler.services.get(key)
        current = self.writer.services.get(key)
        if current is None:
            self.reconciler.on_service(old, None)
        else:
            self.reconciler.on_service(old, copy.deepcopy(current))

    def change(self, key: str, edit: Callable[[dict[str, Any]], None]) -> None:
        self.writer.update(key, edit)
        self.deliver(key)

    def add_pool(self, name: str, addresses: list[str], **spec: Any) -> None:
        body = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": name},
                "spec": {"addresses": addresses, **spec}}
        self.reconciler.on_resource(POOLS, None, self.writer.create_resource(POOLS, body))

    def queued(self) -> set[str]:
        return set(self.reconciler.queue.queued())

    async def sync(self) -> list[str]:
        """Process every queued key once (a key queued again meanwhile too); returns them in order."""
        done = []
        queue = self.reconciler.queue
        while len(queue):
            key = await queue.get()
            try:
                await self.reconciler.reconcile(key)
            finally:
                queue.done(key)
            done.append(key)
            for known in set(self.writer.services) | set(self.reconciler.services):
                current, cached = self.writer.services.get(known), self.reconciler.services.get(known)
                if current is None and cached is not None:
                    self.deliver(known)  # the watch reports what our writes deleted ...
                elif current is not None and cached is not None and \
                        current["metadata"]["resourceVersion"] != cached["metadata"]["resourceVersion"]:
                    self.deliver(known)  # ... and echoes what they changed
        return done


async def until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Let the event loop run until `condition()` holds (timers, debounces), failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.001)
