"""The shared reflector against the real apiserver: its first list, in pages of 500, reported page
by page when asked (the forwarder builds Services while the next page is served), else once whole
(either way every object exactly once, and a cache that is whole once `synced` is set); and a
watch that goes silent, resumed instead of waiting out its timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.dev.layout import ClusterInfo
from lbctl.kube.client import KubeClient
from lbctl.kube.reflector import Reflector
from tests.integration.apicut import ApiCut

OBJECTS = 1_100  # three pages


@pytest.fixture
def configmaps(cluster: ClusterInfo, namespace: str) -> str:
    async def create() -> None:
        kube = KubeClient.from_kubeconfig(cluster.kubeconfig)
        gate = asyncio.Semaphore(16)

        async def one(index: int) -> None:
            async with gate:
                await kube.request("POST", f"/api/v1/namespaces/{namespace}/configmaps",
                                   body={"metadata": {"name": f"cm-{index:04d}"}, "data": {"i": str(index)}})
        try:
            await asyncio.gather(*(one(i) for i in range(OBJECTS)))
        finally:
            await kube.close()

    asyncio.run(create())
    return namespace


@pytest.mark.parametrize("report_pages", [True, False], ids=["page-by-page", "once-whole"])
def test_a_first_list_reports_every_object_once(cluster: ClusterInfo, configmaps: str, report_pages: bool) -> None:
    reports: list[tuple[str, bool, int]] = []  # (name, synced yet, objects in the cache) at each report

    async def scenario() -> tuple[int, set[str]]:
        kube = KubeClient.from_kubeconfig(cluster.kubeconfig)
        reflector: Reflector

        def changed(old: Any, new: Any) -> None:
            assert old is None and new is not None
            reports.append((new["metadata"]["name"], reflector.synced.is_set(), len(reflector.cache)))

        reflector = Reflector(kube, f"/api/v1/namespaces/{configmaps}/configmaps", changed, name="configmaps",
                              report_pages=report_pages)
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 30)
            return len(reflector.cache), {key.partition("/")[2] for key in reflector.cache}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()

    cached, names = asyncio.run(scenario())
    expected = {f"cm-{i:04d}" for i in range(OBJECTS)}
    assert expected <= names and cached == len(names)  # and the namespace's own kube-root-ca.crt
    assert sorted(name for name, _, _ in reports) == sorted(names), "not every object exactly once"
    assert not any(synced for _, synced, _ in reports), "reported after synced was set"
    sizes = sorted({size for _, _, size in reports})
    if report_pages:  # one cache size per page as the pages came, the first a page of 500
        assert sizes == [500, 1000, cached]
    else:
        assert sizes == [cached]


@pytest.fixture
def relay(cluster: ClusterInfo) -> Iterator[ApiCut]:
    with ApiCut(cluster.server) as cut:
        yield cut


def test_a_watch_gone_silent_is_resumed(cluster: ClusterInfo, namespace: str, relay: ApiCut, tmp_path: Path) -> None:
    """The apiserver stops sending on the open watch (the connection stays up, as seen once in a
    bench run): with bookmarks asked for, silence means a deaf watch; it is resumed from its last
    resourceVersion and the change made meanwhile is reported, without a re-list."""
    seen: list[str] = []
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    async def scenario() -> tuple[int, int]:
        kube = KubeClient.from_kubeconfig(relay.kubeconfig(cluster.kubeconfig, tmp_path / "relay.kubeconfig"))
        admin = KubeClient.from_kubeconfig(cluster.kubeconfig)
        reflector = Reflector(kube, path, lambda old, new: seen.append((new or old or {})["metadata"]["name"]),
                              name="configmaps")
        reflector.silent_watch_s = 3.0  # the apiserver's bookmarks come about once a minute: 90 s by default
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 15)
            await asyncio.sleep(0.5)  # the watch is open
            relay.mute()
            await admin.request("POST", path, body={"metadata": {"name": "made-while-deaf"}})
            deadline = time.monotonic() + 20
            while "made-while-deaf" not in seen:
                assert time.monotonic() < deadline, "the silent watch was never given up"
                await asyncio.sleep(0.05)
            return reflector.relists, reflector.failures
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()
            await admin.close()

    relists, failures = asyncio.run(scenario())
    assert relists == 1 and failures >= 1  # resumed (once silent), not re-listed
