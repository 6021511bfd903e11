"""Kubernetes Events as `kubectl describe` shows them (core/v1, with the service controller's
reasons), recorded like client-go's recorder: repeats fold into one Event with a count, a token
bucket per object, and writes in the background.

`record` never waits for the apiserver: it counts the occurrence (lbctl.kube.correlator) and
queues the object. Posters write each object's Events in order; their number grows with the
backlog (up to `max_posters`), so a burst of 1,000 Services is posted within seconds, and the
status writes users wait for never queue behind Events (give the recorder its own KubeClient).
A repeat that comes while its Event is still queued costs no extra request: the write carries
the latest count.

Why core/v1 and not events.k8s.io/v1: kube-controller-manager's service controller still records
through client-go's core/v1 recorder, so `count`, `firstTimestamp` and `lastTimestamp` are what
`kubectl get events` and `kubectl describe` show for these reasons today, and every existing
alert and dashboard reads them; events.k8s.io/v1 would only rename them (`series.count`,
`series.lastObservedTime`) and require `eventTime`/`action`, and its series updates are what
this recorder does already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from lbctl.kube.client import STRATEGIC_MERGE_PATCH, ApiError, KubeClient
from lbctl.kube.correlator import Correlator, EventKey, ObjectRef, Write
from lbctl.model.meta import timestamp
from lbctl.model.outcome import RecordedEvent

log = logging.getLogger(__name__)

_ATTEMPTS = 5  # per write, for 429, 5xx and connection errors


def object_ref(obj: Mapping[str, Any]) -> ObjectRef:
    meta = obj.get("metadata") or {}
    return ObjectRef(kind=str(obj.get("kind") or "Service"), namespace=str(meta.get("namespace") or ""),
                     name=str(meta.get("name") or ""), uid=str(meta.get("uid") or ""))


def event_body(key: EventKey, api_version: str, name: str, count: int, first: str, last: str, component: str,
               instance: str = "") -> dict[str, Any]:
    obj = key.obj
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": obj.namespace or "default"},
        "involvedObject": {"apiVersion": api_version, "kind": obj.kind, "name": obj.name,
                           "namespace": obj.namespace or None, "uid": obj.uid},
        "type": key.type,
        "reason": key.reason,
        "message": key.message[:1024],
        "source": {"component": component, **({"host": instance} if instance else {})},
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": first,
        "lastTimestamp": last,
        "count": count,
    }


#: objects waiting per poster: a poster writes one object's Events at a time, a few ms each
BACKLOG_PER_POSTER = 20


def posters_wanted(backlog: int, max_posters: int) -> int:
    """How many posters a backlog of `backlog` objects waiting needs: one per BACKLOG_PER_POSTER,
    at least one, at most `max_posters` (posters never stop; a burst's posters serve the next)."""
    return max(1, min(max_posters, 1 + backlog // BACKLOG_PER_POSTER))


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, ApiError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | OSError | TimeoutError)


class EventRecorder:
    def __init__(self, client: KubeClient, component: str = "lbctl", instance: str = "",
                 namespaces: tuple[str, ...] = (), max_posters: int = 16, correlator: Correlator | None = None) -> None:
        self._client = client
        self._component = component
        self._instance = instance  # which replica (reportingInstance, and source.host for kubectl)
        self._namespaces = namespaces
        self._correlator = correlator or Correlator()
        self._max_posters = max_posters
        self._api_versions: dict[ObjectRef, str] = {}
        self._pending: dict[ObjectRef, deque[EventKey]] = {}  # per object, in order, each key once
        self._ready: asyncio.Queue[ObjectRef] = asyncio.Queue()
        self._scheduled: set[ObjectRef] = set()  # queued in _ready or being posted
        self._posters: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.posted = 0  # requests that succeeded (creates and updates)
        self.failed = 0

    # ---- recording ------------------------------------------------------------------------------

    async def record(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        """Count one occurrence and queue its write; never raises and never waits for the apiserver."""
        ref = object_ref(obj)
        key = EventKey(ref, event_type, reason, message[:1024])
        if self._correlator.observe(key, timestamp(), time.monotonic()) is None:
            log.debug("event %s on %s refused by its rate limit", reason, ref.key)
            return
        self._api_versions[ref] = str(obj.get("apiVersion") or "v1")
        queue = self._pending.setdefault(ref, deque())
        if key not in queue:
            queue.append(key)
        if ref not in self._scheduled:
            self._scheduled.add(ref)
            self._idle.clear()
            self._ready.put_nowait(ref)
            self._grow()

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, "Warning", reason, message)

    @property
    def posters(self) -> int:
        return len(self._posters)

    def _grow(self) -> None:
        wanted = posters_wanted(self._ready.qsize(), self._max_posters)
        while len(self._posters) < wanted:
            self._posters.append(asyncio.create_task(self._post_loop(), name="event poster"))

    # ---- writing ---------------------------------------------------------------------------------

    async def _post_loop(self) -> None:
        while True:
            ref = await self._ready.get()
            try:
                queue = self._pending.get(ref)
                while queue:
                    try:
                        await self._write(queue[0])
                    except Exception:  # never let one Event stop a poster
                        log.exception("writing event %s for %s failed", queue[0].reason, ref.key)
                    queue.popleft()
                self._pending.pop(ref, None)
            finally:
                self._scheduled.discard(ref)
                if not self._scheduled:
                    self._idle.set()

    async def _write(self, key: EventKey) -> None:
        for attempt in range(_ATTEMPTS):
            action = self._correlator.next_write(key)
            state = self._correlator.state(key)
            if action is Write.NOTHING or state is None:
                return
            count = state.count
            namespace = key.obj.namespace or "default"
            collection = f"/api/v1/namespaces/{quote(namespace)}/events"
            try:
                if action is Write.CREATE:
                    body = event_body(key, self._api_versions.get(key.obj, "v1"), state.name, count, state.first,
                                      state.last, self._component, self._instance)
                    await self._client.request("POST", collection, body=body)
                else:
                    await self._client.request("PATCH", f"{collection}/{quote(state.name)}",
                                               content_type=STRATEGIC_MERGE_PATCH,
                                               body={"count": count, "lastTimestamp": state.last})
            except ApiError as exc:
                if action is Write.UPDATE and exc.status == 404:
                    self._correlator.expired(key)  # past its TTL: a new Event next time round
                    continue
                if action is Write.CREATE and exc.status == 409:
                    self._correlator.written(key, count)  # written by an earlier attempt whose answer was lost
                    continue
                if not _retryable(exc) or attempt == _ATTEMPTS - 1:
                    self._give_up(key, exc)
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == _ATTEMPTS - 1:
                    self._give_up(key, exc)
                    return
            else:
                self._correlator.written(key, count)
                self.posted += 1
                continue  # a repeat may have come meanwhile
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))

    def _give_up(self, key: EventKey, exc: Exception) -> None:
        self.failed += 1
        log.warning("could not write event %s for %s: %s", key.reason, key.obj.key, exc)

    # ---- after a restart ------------------------------------------------------------------------

    async def recorded(self) -> list[RecordedEvent]:
        """The Events this component wrote before (another replica, or this process before a
        crash): remembered for aggregation, and returned so that outcomes never written as an Event
        can be found. Empty when they cannot be listed (the recorder then starts afresh)."""
        found: list[RecordedEvent] = []
        paths = [f"/api/v1/namespaces/{quote(n)}/events" for n in self._namespaces] or ["/api/v1/events"]
        try:
            for path in paths:
                async for event in self._client.list_all(path, params={"fieldSelector": f"source={self._component}"}):
                    involved = event.get("involvedObject") or {}
                    ref = ObjectRef(str(involved.get("kind") or ""), str(involved.get("namespace") or ""),
                                    str(involved.get("name") or ""), str(involved.get("uid") or ""))
                    key = EventKey(ref, str(event.get("type") or ""), str(event.get("reason") or ""),
                                   str(event.get("message") or ""))
                    last = str(event.get("lastTimestamp") or event.get("firstTimestamp") or "")
                    self._correlator.seed(key, str((event.get("metadata") or {}).get("name") or ""),
                                          int(event.get("count") or 1), str(event.get("firstTimestamp") or last), last)
                    found.append(RecordedEvent(ref.uid, key.reason, last, key.message))
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("could not list earlier events (%s): repeats start new Events, none is re-derived", exc)
        return found

    # ---- shutdown ----------------------------------------------------------------------------------

    async def flush(self, timeout_s: float) -> bool:
        """Until everything queued is written (or `timeout_s`); whether it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for a while), then stop."""
        if not await self.flush(timeout_s):
            log.warning("%d objects' events not written at shutdown", len(self._scheduled))
        for task in self._posters:
            task.cancel()
        await asyncio.gather(*self._posters, return_exceptions=True)
        self._posters = []
