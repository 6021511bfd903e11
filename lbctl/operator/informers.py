"""The operator's watches: one `lbctl.kube.reflector.Reflector` per resource it reads (Services,
Nodes when the provider targets nodes, the provider's own resources such as pools), each feeding
the reconciler's caches.

Why not kopf's watches: after `410 Gone` (a watch cut for longer than the apiserver keeps
history), kopf re-lists and yields only the objects that still exist, never a deletion for what
vanished in the gap, so a Node deleted then stayed eligible for ever and a Service deleted without
its finalizer kept its balancer. The reflector diffs every re-list against its cache and reports
what is missing as deleted. kopf remains the runtime (start-up, login, liveness, cleanup).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from lbctl.kube.client import ApiError, KubeClient
from lbctl.kube.reflector import Reflector
from lbctl.operator.bgp import BgpAnnouncer
from lbctl.operator.reconciler import MissingResourceError, Reconciler
from providers.base import WatchedResource

log = logging.getLogger("lbctl.operator")


def _resource_path(resource: WatchedResource) -> str:
    return f"/apis/{resource.group}/{resource.version}/{resource.plural}"


class Informers:
    def __init__(self, client: KubeClient, reconciler: Reconciler, namespaces: tuple[str, ...] = ()) -> None:
        self._client = client
        self._reconciler = reconciler
        self._namespaces = tuple(sorted(namespaces))
        self.reflectors: list[Reflector] = []
        #: BGP's announcing nodes (local provider, when the cluster serves BGPPeers): see check_served
        self.announcer: BgpAnnouncer | None = None
        for namespace in self._namespaces or [""]:
            path = f"/api/v1/namespaces/{namespace}/services" if namespace else "/api/v1/services"
            self.reflectors.append(Reflector(client, path, self._on_service,
                                             name=f"services{'/' + namespace if namespace else ''}"))
        if reconciler.provider.uses_nodes:
            self.reflectors.append(Reflector(client, "/api/v1/nodes", self._on_node, name="nodes"))
        for resource in reconciler.provider.watched_resources:
            self.reflectors.append(Reflector(client, _resource_path(resource), self._resource_handler(resource),
                                             name=resource.plural))
        self._tasks: list[asyncio.Task[None]] = []

    def _resource_handler(self, resource: WatchedResource) -> Any:
        def changed(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
            self._reconciler.on_resource(resource, old, new)
            if self.announcer is not None:
                self.announcer.changed()

        return changed

    def _on_service(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        self._reconciler.on_service(old, new)
        if self.announcer is not None:
            self.announcer.changed()

    def _on_node(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        self._reconciler.on_node(old, new)
        if self.announcer is not None:
            self.announcer.changed()

    async def _served(self, resource: WatchedResource) -> bool:
        try:
            await self._client.request("GET", _resource_path(resource), params={"limit": "1"})
        except ApiError as exc:
            if exc.status != 404:
                raise
            return False
        return True

    def _watch_optional(self, resource: WatchedResource) -> None:
        """Watch a resource the provider can do without (BGPPeers), now that it is served; with
        BGP peers come the Nodes and EndpointSlices that decide who announces."""
        self._reconciler.watched.append(resource)
        self.reflectors.append(Reflector(self._client, _resource_path(resource), self._resource_handler(resource),
                                         name=resource.plural))
        advertisements = self._reconciler.provider
        if resource.plural != "bgppeers" or not hasattr(advertisements, "advertisement"):
            return
        self.announcer = BgpAnnouncer(self._reconciler, advertisements)
        if not any(r.name == "nodes" for r in self.reflectors):
            self.reflectors.append(Reflector(self._client, "/api/v1/nodes", self._on_node, name="nodes"))
        for namespace in self._namespaces or [""]:
            base = "/apis/discovery.k8s.io/v1"
            path = f"{base}/namespaces/{namespace}/endpointslices" if namespace else f"{base}/endpointslices"
            self.reflectors.append(Reflector(self._client, path, self.announcer.on_slice,
                                             name=f"endpointslices{'/' + namespace if namespace else ''}"))

    async def check_served(self) -> None:
        """Name a resource the provider needs but the cluster does not serve (its CRD is missing)
        instead of letting its reflector retry in silence."""
        provider = self._reconciler.provider
        for resource in provider.watched_resources:
            if not await self._served(resource):
                raise MissingResourceError(
                    f"the {provider.name} provider needs {resource.plural}.{resource.group}/{resource.version}, "
                    "which this cluster does not serve: install its CRD "
                    "(kubectl apply -f examples/deploy/crd-loadbalancerpool.yaml)")
        for resource in provider.optional_resources:
            if resource in self._reconciler.watched:
                continue  # a start-up retried after a failure
            if await self._served(resource):
                self._watch_optional(resource)
            else:
                log.warning("%s.%s/%s is not served: the %s provider works without it (BGP off: install "
                            "examples/deploy/crd-bgppeer.yaml and restart the operator to use it)",
                            resource.plural, resource.group, resource.version, provider.name)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(r.run(), name=f"reflector {r.name}") for r in self.reflectors]
            if self.announcer is not None:
                self.announcer.start()

    async def synced(self) -> None:
        """Until every reflector has completed its first list."""
        await asyncio.gather(*(r.synced.wait() for r in self.reflectors))

    async def stop(self) -> None:
        if self.announcer is not None:
            await self.announcer.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
