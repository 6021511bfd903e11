"""lbctl.kube.events.EventRecorder against the real apiserver: posters grow with a burst and post
it all, repeats update one Event, an Event deleted meanwhile is created again, a 409 on create is
taken as written, an apiserver that cannot be reached is given up on after the retries, and
`record` never raises nor waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lbctl.dev.layout import ClusterInfo
from lbctl.kube.client import KubeClient
from lbctl.kube.correlator import Correlator, EventKey
from lbctl.kube.events import EventRecorder, object_ref
from lbctl.model.meta import timestamp
from tests.integration.apicut import ApiCut


def service_ref(namespace: str, name: str) -> dict[str, Any]:
    """The object an Event is about (the apiserver does not require it to exist)."""
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}"}}


def events_of(core: client.CoreV1Api, namespace: str, name: str | None = None) -> list[client.CoreV1Event]:
    return [e for e in core.list_namespaced_event(namespace).items
            if e.source and e.source.component == "lbctl" and (name is None or e.involved_object.name == name)]


@pytest.fixture
def cut(cluster: ClusterInfo) -> Iterator[ApiCut]:
    with ApiCut(cluster.server) as relay:
        yield relay


def run(cluster: ClusterInfo, scenario: Callable[[EventRecorder], Awaitable[None]], kubeconfig: str | None = None,
        **options: Any) -> None:
    async def main() -> None:
        kube = KubeClient.from_kubeconfig(kubeconfig or cluster.kubeconfig)
        recorder = EventRecorder(kube, **options)
        try:
            await scenario(recorder)
        finally:
            await recorder.close(timeout_s=1.0)
            await kube.close()

    asyncio.run(main())


def test_a_burst_of_1000_objects_grows_the_posters_and_is_all_posted(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    async def scenario(recorder: EventRecorder) -> None:
        started = time.monotonic()
        for i in range(1000):
            await recorder.record(service_ref(namespace, f"s{i:04d}"), "Normal", "EnsuredLoadBalancer", "Ensured")
        assert time.monotonic() - started < 2.0  # record only queues
        assert recorder.posters == 16
        assert await recorder.flush(120.0)
        assert (recorder.posted, recorder.failed) == (1000, 0)

    run(cluster, scenario)
    found = events_of(core, namespace)
    assert len(found) == 1000 and {e.count for e in found} == {1}
    assert len({e.involved_object.name for e in found}) == 1000


def test_repeats_update_one_event_and_one_deleted_meanwhile_is_created_again(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    obj = service_ref(namespace, "web")

    async def scenario(recorder: EventRecorder) -> None:
        await recorder.warning(obj, "SyncLoadBalancerFailed", "pool p is exhausted")
        assert await recorder.flush(15.0)
        (first,) = events_of(core, namespace, "web")
        assert first.count == 1 and recorder.posted == 1
        for _ in range(2):  # two repeats while queued: one PATCH carries both
            await recorder.warning(obj, "SyncLoadBalancerFailed", "pool p is exhausted")
        assert await recorder.flush(15.0)
        (updated,) = events_of(core, namespace, "web")
        assert updated.metadata.name == first.metadata.name and updated.count == 3
        assert recorder.posted == 2

        await asyncio.to_thread(core.delete_namespaced_event, first.metadata.name, namespace)  # its TTL, say
        await recorder.warning(obj, "SyncLoadBalancerFailed", "pool p is exhausted")
        assert await recorder.flush(15.0)
        (again,) = events_of(core, namespace, "web")
        assert again.metadata.name != first.metadata.name and again.count == 4
        assert recorder.failed == 0

    run(cluster, scenario)


def test_a_conflict_on_create_is_taken_as_written_and_the_next_repeat_updates_it(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    """An earlier attempt whose answer was lost already created the Event: 409, not a second one."""
    obj = service_ref(namespace, "web")
    correlator = Correlator()
    key = EventKey(object_ref(obj), "Normal", "EnsuredLoadBalancer", "Ensured load balancer")
    state = correlator.observe(key, timestamp(), time.monotonic())
    assert state is not None
    core.create_namespaced_event(namespace, client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=state.name, namespace=namespace),
        involved_object=client.V1ObjectReference(kind="Service", name="web", namespace=namespace,
                                                 uid=obj["metadata"]["uid"]),
        type="Normal", reason=key.reason, message=key.message, count=1,
        source=client.V1EventSource(component="lbctl")))

    async def scenario(recorder: EventRecorder) -> None:
        await recorder.normal(obj, key.reason, key.message)  # count 2: create → 409
        assert await recorder.flush(15.0)
        assert (recorder.posted, recorder.failed) == (0, 0)
        await recorder.normal(obj, key.reason, key.message)  # count 3: an update of that Event
        assert await recorder.flush(15.0)
        assert recorder.posted == 1

    run(cluster, scenario, correlator=correlator)
    (event,) = events_of(core, namespace, "web")
    assert event.metadata.name == state.name and event.count == 3


def test_an_unreachable_apiserver_is_given_up_on_and_record_never_waits_nor_raises(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str, cut: ApiCut, tmp_path: Path
) -> None:
    kubeconfig = cut.kubeconfig(cluster.kubeconfig, tmp_path / "relay.kubeconfig")

    async def scenario(recorder: EventRecorder) -> None:
        cut.cut()
        started = time.monotonic()
        await recorder.warning(service_ref(namespace, "cut-off"), "SyncLoadBalancerFailed", "unreachable")
        await recorder.record({}, "Normal", "Odd", "an object without metadata")
        assert time.monotonic() - started < 0.5
        assert await recorder.flush(30.0)  # 5 attempts, backing off 0.2 s → 1.6 s, then given up
        assert (recorder.posted, recorder.failed) == (0, 2)

        cut.restore()
        await recorder.warning(service_ref("no-such-namespace-x", "web"), "SyncLoadBalancerFailed", "404")
        assert await recorder.flush(15.0)  # refused (404, not retryable): given up at once
        assert recorder.failed == 3
        await recorder.warning(service_ref(namespace, "back"), "SyncLoadBalancerFailed", "reachable again")
        assert await recorder.flush(15.0)
        assert recorder.posted == 1

    run(cluster, scenario, kubeconfig=kubeconfig)
    assert [e.involved_object.name for e in events_of(core, namespace)] == ["back"]


def test_a_new_recorder_continues_the_counts_of_the_events_listed_at_start(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    obj = service_ref(namespace, "web")

    async def before(recorder: EventRecorder) -> None:
        await recorder.warning(obj, "SyncLoadBalancerFailed", "pool p is exhausted")
        assert await recorder.flush(15.0)

    async def after(recorder: EventRecorder) -> None:
        (seen,) = await recorder.recorded()
        assert (seen.uid, seen.reason, seen.message) == (obj["metadata"]["uid"], "SyncLoadBalancerFailed",
                                                         "pool p is exhausted")
        await recorder.warning(obj, "SyncLoadBalancerFailed", "pool p is exhausted")
        assert await recorder.flush(15.0)

    run(cluster, before, namespaces=(namespace,))
    run(cluster, after, namespaces=(namespace,))  # a restarted operator
    (event,) = events_of(core, namespace, "web")
    assert event.count == 2
