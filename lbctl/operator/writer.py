"""The reconciler's seams: what it writes through (`ServiceWriter`) and where its Events go
(`EventSink`), as Protocols, and `KubeWriter`, the writer over lbctl's API client.

Unit tests drive the reconciler with an in-memory writer of their own (tests/unit/test_reconciler.py);
the operator process uses `KubeWriter` and `lbctl.kube.events.EventRecorder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from lbctl.kube.client import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeClient, service_path
from lbctl.model.outcome import RecordedEvent
from providers.base import WatchedResource


class ServiceWriter(Protocol):
    """Every write the reconciler makes. Each returns the object as the apiserver stored it and
    raises lbctl.kube.client.ApiError as the apiserver answers (404 gone, 409/422 conflict)."""

    async def patch_service(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A strategic merge patch of the Service (its finalizers and annotations)."""
        ...

    async def patch_service_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A merge patch of the status subresource."""
        ...

    async def replace_service_ports(self, namespace: str, name: str, resource_version: str,
                                    ports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """spec.ports replaced only if the Service is still at `resource_version` (else 409/422)."""
        ...

    async def patch_resource_status(self, resource: WatchedResource, name: str,
                                    status: Mapping[str, Any]) -> dict[str, Any]:
        """A merge patch of a provider resource's status (a pool's counts and conditions)."""
        ...


class EventSink(Protocol):
    async def record(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        """Never raises and never waits for the apiserver."""
        ...

    async def recorded(self) -> list[RecordedEvent]:
        """The Events written before this process led (for outcomes a crash kept from becoming one)."""
        ...

    async def close(self) -> None:
        ...


class KubeWriter:
    def __init__(self, client: KubeClient) -> None:
        self._client = client

    async def patch_service(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self._client.request("PATCH", service_path(namespace, name), body=patch,
                                          content_type=STRATEGIC_MERGE_PATCH)

    async def patch_service_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self._client.request("PATCH", service_path(namespace, name, "status"), body=patch,
                                          content_type=MERGE_PATCH)

    async def replace_service_ports(self, namespace: str, name: str, resource_version: str,
                                    ports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return await self._client.request(
            "PATCH", service_path(namespace, name), content_type=JSON_PATCH,
            body=[{"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
                  {"op": "replace", "path": "/spec/ports", "value": list(ports)}])

    async def patch_resource_status(self, resource: WatchedResource, name: str,
                                    status: Mapping[str, Any]) -> dict[str, Any]:
        path = f"/apis/{resource.group}/{resource.version}/{resource.plural}/{name}/status"
        return await self._client.request("PATCH", path, body={"status": dict(status)}, content_type=MERGE_PATCH)
