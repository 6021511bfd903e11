"""List-then-watch caches of Kubernetes objects (informers), one per resource: the one watch
implementation of both the operator and the forwarder.

Each Reflector keeps {namespace/name: object} and reports every change as (old, new) to its
callback, `new` None for a deletion. A re-list is the truth: after one (start-up, `410 Gone`, a
watch that could not be resumed) the differences to the old cache are reported the same way, so
an object deleted while the watch was down is reported deleted, exactly like a DELETED event.
(kopf's own watches do not do this: after `410 Gone` they re-list and yield what exists, and never
a deletion for what vanished in the gap.)

Failures follow client-go's reflector: a broken stream is resumed from the last resourceVersion
after a backoff; `410 Gone` (as an HTTP status or as an ERROR event) means that version is no
longer served, so the reflector re-lists. The cache is never cleared because the apiserver cannot
be reached: the last known state stays until a successful re-list replaces it (static stability).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from lbctl import cyclic_gc
from lbctl.kube import protobuf
from lbctl.kube.client import KubeClient, json_lines
from lbctl.model.meta import object_key

log = logging.getLogger(__name__)

Change = Callable[[Mapping[str, Any] | None, Mapping[str, Any] | None], None]
#: what a cache keeps of each object (a new object with the fields its readers need)
Trim = Callable[[dict[str, Any]], dict[str, Any]]
#: a protobuf list page (a response body) → its items as the cache keeps them (trimmed); ValueError
#: for a body that is not one
ProtobufList = Callable[[bytes], protobuf.ListPage]
_WATCH_TIMEOUT_S = 290
#: A watch that asked for bookmarks hears from the apiserver about once a minute even when nothing
#: changes; one silent for longer is resumed (from its last resourceVersion): whatever cut the
#: stream without closing it, a new one does not wait for the watch's timeout, minutes later.
#: (Seen: the forwarder's own NodePort rules taking its watch connections, before they knew
#: better: tests/dataplane/test_node_connections.py.)
_SILENT_WATCH_S = 90.0
#: a watch that keeps failing this many times in a row is given up for a re-list
_RESUME_ATTEMPTS = 3


def relist_changes(
    old: Mapping[str, Mapping[str, Any]], fresh: Mapping[str, Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]]:
    """What a re-list says happened since the cache was last right: deletions first (objects
    absent from the list), then additions and changes (by resourceVersion); unchanged objects
    are not reported."""
    changes: list[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]] = [
        (old[key], None) for key in old.keys() - fresh.keys()]
    for key, obj in fresh.items():
        previous = old.get(key)
        if previous is None or _version(previous) != _version(obj):
            changes.append((previous, obj))
    return changes


class _Gone(Exception):
    pass


class Reflector:
    def __init__(self, api: KubeClient, path: str, on_change: Change, *, params: Mapping[str, str] | None = None,
                 name: str = "", trim: Trim | None = None, report_pages: bool = False,
                 protobuf_list: ProtobufList | None = None) -> None:
        """`report_pages`: the first list reports each page as it comes (into an empty cache every
        object is an addition either way), so that a consumer can work on one page while the
        apiserver serves the next; its callback then sees a cache that is not whole before
        `synced`. Otherwise (and for every re-list) changes are reported once the list is whole.
        `protobuf_list`: lists are asked for in protobuf (JSON still taken when that is what
        comes), read by it into what `trim` would keep of the same objects; watches stay JSON."""
        self._api = api
        self._protobuf_list = protobuf_list
        self._report_pages = report_pages
        self._keep = trim
        self._path = path
        self._params = dict(params or {})
        self._on_change = on_change
        self.name = name or path
        self.cache: dict[str, Mapping[str, Any]] = {}
        self.synced = asyncio.Event()
        self._resource_version = ""
        self.relists = 0  # how many lists succeeded (the first one included)
        self.failing = False  # the last list or watch failed, and no watch has started since
        self.failures = 0  # lists and watches that failed, all told
        self.silent_watch_s = _SILENT_WATCH_S

    async def run(self) -> None:
        backoff = 0.2
        listed = False
        failed_watches = 0
        while True:
            phase = "list" if not listed else "watch"
            try:
                if not listed:
                    await self._list()
                    listed, failed_watches, backoff = True, 0, 0.2
                    phase = "watch"
                started = time.monotonic()
                await self._watch()  # returns when the server ends the watch (its timeout)
                failed_watches, backoff = 0, 0.2
                if time.monotonic() - started < 1.0:
                    await asyncio.sleep(backoff)  # a server that ends every watch at once
            except asyncio.CancelledError:
                raise
            except _Gone:
                log.info("%s: resource version %s is gone (410): relisting", self.name, self._resource_version)
                listed = False
            except Exception as exc:  # network, apiserver restarts, bad payloads
                self.failing, self.failures = True, self.failures + 1
                if phase == "watch":
                    failed_watches += 1
                    listed = failed_watches < _RESUME_ATTEMPTS
                log.warning("%s: %s failed (%s: %s); %s in %.1fs", self.name, phase, type(exc).__name__, exc,
                            "resuming the watch" if listed else "relisting", backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 10.0)

    def _trim(self, obj: dict[str, Any]) -> dict[str, Any]:
        """managedFields is often the bulk of an object and nothing here reads it; with `trim`,
        only what the cache's readers need is kept (callbacks see the trimmed object too)."""
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            meta.pop("managedFields", None)
        return self._keep(obj) if self._keep is not None else obj

    async def _list(self) -> None:
        first = self._report_pages and not self.cache and not self.synced.is_set()
        fresh: dict[str, Mapping[str, Any]] = self.cache if first else {}
        params = dict(self._params, limit="500")
        version = ""
        while True:
            await self._api.refresh_credentials()
            headers = self._api.headers(None)
            if self._protobuf_list is not None:
                headers = {**headers, "Accept": protobuf.ACCEPT}
            async with self._api.session().get(self._api.base + self._path, params=params,
                                               headers=headers) as response:
                if response.status >= 400:
                    raise RuntimeError(f"list {self._path}: HTTP {response.status}: {(await response.text())[:300]}")
                body = await response.read()
                content_type = response.content_type
            with cyclic_gc.paused():  # 500 objects made, none in a cycle
                page = self._page(body, content_type)
                items = {object_key(item): item for item in page.items}
                fresh.update(items)
                if first:
                    for added in items.values():
                        self._report(None, added)
            version = page.resource_version or version
            if not page.continue_token:
                break
            params["continue"] = page.continue_token
        old = self.cache
        self.cache = fresh
        self._resource_version = version
        changes = relist_changes(old, fresh)
        if self.synced.is_set():
            gone = sum(1 for _, new in changes if new is None)
            log.info("%s: relisted %d objects: %d changed while unwatched, %d of them deleted", self.name,
                     len(fresh), len(changes), gone)
        self.relists += 1
        with cyclic_gc.paused():
            for previous, obj in changes:
                self._report(previous, obj)
        self.synced.set()

    def _page(self, body: bytes, content_type: str) -> protobuf.ListPage:
        if self._protobuf_list is not None and content_type == protobuf.MEDIA_TYPE:
            return self._protobuf_list(body)
        page = json.loads(body)
        meta = page.get("metadata") or {}
        return protobuf.ListPage([self._trim(item) for item in page.get("items") or () if isinstance(item, dict)],
                                 str(meta.get("resourceVersion") or ""), str(meta.get("continue") or ""))

    async def _watch(self) -> None:
        params = dict(self._params, watch="true", allowWatchBookmarks="true",
                      resourceVersion=self._resource_version, timeoutSeconds=str(_WATCH_TIMEOUT_S))
        await self._api.refresh_credentials()
        async with self._api.session().get(
            self._api.base + self._path, params=params, headers=self._api.headers(None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.silent_watch_s),
        ) as response:
            if response.status == 410:
                raise _Gone()
            if response.status >= 400:
                raise RuntimeError(f"watch {self._path}: HTTP {response.status}: {(await response.text())[:300]}")
            if self.failing:
                self.failing = False
                log.info("%s: watching again", self.name)  # after the failures logged before
            async for event in json_lines(response):
                kind, obj = event.get("type"), event.get("object")
                if not isinstance(obj, dict):
                    continue
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch {self._path}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self._resource_version = str(version)
                if kind == "BOOKMARK":
                    continue
                key = object_key(obj)
                previous = self.cache.get(key)
                obj = self._trim(obj)
                if kind == "DELETED":
                    self.cache.pop(key, None)
                    self._report(previous if previous is not None else obj, None)
                else:
                    self.cache[key] = obj
                    self._report(previous, obj)

    def _report(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        """A consumer's bug must not break the watch (its event would be skipped on resume)."""
        try:
            self._on_change(old, new)
        except Exception:
            log.exception("%s: handling a change of %s failed", self.name, object_key(new or old or {}))


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
