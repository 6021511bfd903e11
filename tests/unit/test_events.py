"""The pure part of lbctl.kube.events: how many posters a backlog needs, and the Event body.
What it does against the API (create, update, 404, 409, giving up) is tested on the real apiserver
in tests/integration/test_event_recorder.py."""

from __future__ import annotations

import pytest

from lbctl.kube.correlator import EventKey, ObjectRef
from lbctl.kube.events import event_body, object_ref, posters_wanted


@pytest.mark.parametrize(("backlog", "max_posters", "wanted"), [
    (0, 16, 1), (1, 16, 1), (19, 16, 1), (20, 16, 2), (100, 16, 6), (299, 16, 15), (300, 16, 16),
    (1000, 16, 16), (1000, 4, 4), (0, 0, 1),
])
def test_posters_grow_with_the_backlog(backlog: int, max_posters: int, wanted: int) -> None:
    assert posters_wanted(backlog, max_posters) == wanted


def test_an_event_body_names_its_object_and_counts() -> None:
    ref = object_ref({"kind": "Service", "metadata": {"namespace": "shop", "name": "web", "uid": "u1"}})
    body = event_body(EventKey(ref, "Warning", "SyncLoadBalancerFailed", "x" * 2000), "v1", "web.abc", 3,
                      "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "lbctl", "pod-1")
    assert body["metadata"] == {"name": "web.abc", "namespace": "shop"}
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Service", "name": "web", "namespace": "shop",
                                      "uid": "u1"}
    assert (body["count"], body["firstTimestamp"], body["lastTimestamp"]) == (3, "2026-01-01T00:00:00Z",
                                                                              "2026-01-01T00:01:00Z")
    assert len(body["message"]) == 1024 and body["source"] == {"component": "lbctl", "host": "pod-1"}


def test_a_cluster_scoped_object_gets_its_event_in_default() -> None:
    ref = ObjectRef("LoadBalancerPool", "", "p", "u2")
    body = event_body(EventKey(ref, "Warning", "InvalidPool", "bad"), "lbctl.io/v1alpha1", "p.1", 1, "t", "t",
                      "lbctl")
    assert body["metadata"]["namespace"] == "default" and body["involvedObject"]["namespace"] is None
    assert object_ref({}) == ObjectRef("Service", "", "", "")  # never raises on a malformed object
