"""Kubernetes Events as `kubectl describe` shows them, with the service controller's reasons."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

from lbctl.kube.client import ApiError, KubeClient

log = logging.getLogger(__name__)


def event_body(obj: Mapping[str, Any], event_type: str, reason: str, message: str, component: str,
               now: dt.datetime, instance: str = "") -> dict[str, Any]:
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
        "source": {"component": component, **({"host": instance} if instance else {})},
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    """Posts Events in the background, like client-go's broadcaster: a sync never waits for one,
    so under load the writes users wait for (status) go first and Events trail behind. Each object's
    Events go through one poster, so they keep their order."""

    def __init__(self, client: KubeClient, component: str = "lbctl", posters: int = 2,
                 capacity: int = 20_000, instance: str = "") -> None:
        self._client = client
        self._component = component
        self._instance = instance  # which replica (reportingInstance, and source.host for kubectl)
        self._queues: list[asyncio.Queue[dict[str, Any]]] = [
            asyncio.Queue(max(1, capacity // posters)) for _ in range(posters)]
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._post_loop(queue)) for queue in self._queues]

    async def _post_loop(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            body = await queue.get()
            try:
                await self._client.request(
                    "POST", f"/api/v1/namespaces/{body['metadata']['namespace']}/events", body=body)
            except (ApiError, OSError) as exc:
                log.warning("could not post event %s for %s: %s", body["reason"],
                            body["involvedObject"]["name"], exc)
            finally:
                queue.task_done()

    async def record(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        """Queue an Event; never raises: an Event must not break a sync."""
        self._start()
        body = event_body(obj, event_type, reason, message, self._component, dt.datetime.now(dt.UTC),
                          self._instance)
        involved = body["involvedObject"]
        shard = zlib.crc32(f"{involved['namespace']}/{involved['name']}".encode()) % len(self._queues)
        try:
            self._queues[shard].put_nowait(body)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("event queue full: dropped %s for %s", reason, involved["name"])

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, "Warning", reason, message)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Post what is queued (for a while), then stop."""
        if self._tasks:
            try:
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues)), timeout_s)
            except TimeoutError:
                log.warning("%d events not posted at shutdown", sum(q.qsize() for q in self._queues))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
