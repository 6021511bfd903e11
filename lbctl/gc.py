"""`lbctl gc`: find (and with --delete remove) cloud balancers tagged for this cluster whose
Service no longer exists. The operator runs the same sweep on a timer."""

from __future__ import annotations

from typing import Any

from lbctl.kube.client import KubeClient
from lbctl.model.meta import object_key
from lbctl.model.orphans import orphans
from lbctl.model.scope import Scope
from lbctl.model.types import LoadBalancerRef
from providers.base import Provider


async def sweep(provider: Provider, client: KubeClient, scope: Scope, delete: bool) -> list[LoadBalancerRef]:
    services: dict[str, dict[str, Any]] = {}
    async for service in client.list_all("/api/v1/services"):
        services[object_key(service)] = service
    found = orphans(await provider.list_owned(), services, scope)
    if delete:
        for ref in found:
            await provider.delete(ref)
    return found
