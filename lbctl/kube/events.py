"""Kubernetes Events as `kubectl describe` shows them, with the service controller's reasons."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from lbctl.kube.client import ApiError, KubeClient

log = logging.getLogger(__name__)


def event_body(obj: Mapping[str, Any], event_type: str, reason: str, message: str, component: str,
               now: dt.datetime) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name', 'unknown')}.{uuid.uuid4().hex[:16]}",
                     "namespace": meta.get("namespace") or "default"},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion", "v1"), "kind": obj.get("kind", "Service"),
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    def __init__(self, client: KubeClient, component: str = "lbctl") -> None:
        self._client = client
        self._component = component

    async def record(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        """Post an Event; failures are logged, never raised: an Event must not break a sync."""
        body = event_body(obj, event_type, reason, message, self._component, dt.datetime.now(dt.UTC))
        try:
            await self._client.request("POST", f"/api/v1/namespaces/{body['metadata']['namespace']}/events",
                                       body=body)
        except (ApiError, OSError) as exc:
            log.warning("could not post event %s for %s: %s", reason, body["involvedObject"]["name"], exc)

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, "Warning", reason, message)
