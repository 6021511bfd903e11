"""List-then-watch caches of Kubernetes objects (the forwarder's informers), one per resource.

Each Reflector keeps {namespace/name: object} and reports every change as (old, new) to its
callback; after a relist (start-up, 410 Gone, a broken stream) the differences to the old cache
are reported the same way, so consumers never see a gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from lbctl.kube.client import KubeClient, json_lines

log = logging.getLogger(__name__)

Change = Callable[[Mapping[str, Any] | None, Mapping[str, Any] | None], None]
_WATCH_TIMEOUT_S = 290


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class _Gone(Exception):
    pass


class Reflector:
    def __init__(self, api: KubeClient, path: str, on_change: Change, *, params: Mapping[str, str] | None = None,
                 name: str = "") -> None:
        self._api = api
        self._path = path
        self._params = dict(params or {})
        self._on_change = on_change
        self.name = name or path
        self.cache: dict[str, Mapping[str, Any]] = {}
        self.synced = asyncio.Event()
        self._resource_version = ""

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._list()
                backoff = 0.2
                while True:
                    await self._watch()
            except asyncio.CancelledError:
                raise
            except _Gone:
                log.debug("%s: resource version expired, relisting", self.name)
                continue
            except Exception as exc:  # network, apiserver restarts, bad payloads: relist
                log.warning("%s: watch failed (%s: %s); relisting in %.1fs", self.name, type(exc).__name__, exc,
                            backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 10.0)

    @staticmethod
    def _trim(obj: dict[str, Any]) -> dict[str, Any]:
        """managedFields is often the bulk of an object and nothing here reads it."""
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            meta.pop("managedFields", None)
        return obj

    async def _list(self) -> None:
        fresh: dict[str, Mapping[str, Any]] = {}
        params = dict(self._params, limit="500")
        version = ""
        while True:
            async with self._api.session().get(self._api.base + self._path, params=params,
                                               headers=self._api.headers(None)) as response:
                if response.status >= 400:
                    raise RuntimeError(f"list {self._path}: HTTP {response.status}: {(await response.text())[:300]}")
                page = await response.json(content_type=None)
            for item in page.get("items") or ():
                if isinstance(item, dict):
                    fresh[object_key(item)] = self._trim(item)
            meta = page.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        old = self.cache
        self.cache = fresh
        self._resource_version = version
        for key in old.keys() - fresh.keys():
            self._on_change(old[key], None)
        for key, obj in fresh.items():
            previous = old.get(key)
            if previous is None or _version(previous) != _version(obj):
                self._on_change(previous, obj)
        self.synced.set()

    async def _watch(self) -> None:
        params = dict(self._params, watch="true", allowWatchBookmarks="true",
                      resourceVersion=self._resource_version, timeoutSeconds=str(_WATCH_TIMEOUT_S))
        async with self._api.session().get(
            self._api.base + self._path, params=params, headers=self._api.headers(None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=_WATCH_TIMEOUT_S + 30),
        ) as response:
            if response.status == 410:
                raise _Gone()
            if response.status >= 400:
                raise RuntimeError(f"watch {self._path}: HTTP {response.status}: {(await response.text())[:300]}")
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
                if kind == "DELETED":
                    self.cache.pop(key, None)
                    self._on_change(previous, None)
                else:
                    self.cache[key] = self._trim(obj)
                    self._on_change(previous, obj)


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
