"""lbctl.forwarder.fields: what the watch caches keep. Every reader of the caches must read the
same from a trimmed object as from the whole object the apiserver sent (table of whole objects,
well-formed and not)."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from lbctl.forwarder import fields
from lbctl.forwarder.desired import BuildContext, build_service, service_key, slice_service_key
from lbctl.forwarder.metrics import TRIGGER_TIME_ANNOTATION, change_time
from lbctl.model.meta import ANNOUNCING_NODE_ANNOTATION, SOURCE_RANGES_ANNOTATION, object_key
from lbctl.model.scope import Scope

MANAGED = [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {"f:ports": {}}}}]


def whole_service(**spec: Any) -> dict[str, Any]:
    """A Service as the apiserver sends it, with much the forwarder never reads."""
    return {
        "kind": "Service", "apiVersion": "v1",
        "metadata": {
            "name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": "42", "generation": 3,
            "creationTimestamp": "2024-01-01T00:00:00Z", "labels": {"app": "web"}, "finalizers": ["x"],
            "annotations": {SOURCE_RANGES_ANNOTATION: "203.0.113.0/24, 2001:db8:ff::/48",
                            ANNOUNCING_NODE_ANNOTATION: "node-2",
                            "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 5000 + "}"},
            "managedFields": MANAGED,
        },
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00:10:96::a"], "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack", "internalTrafficPolicy": "Cluster",
            "allocateLoadBalancerNodePorts": True, "selector": {"app": "web"},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080,
                       "appProtocol": "http"},
                      {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": "dns", "nodePort": 30053}],
            **spec,
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "VIP"},
                                                {"ip": "2001:db8::10", "ipMode": "VIP", "ports": [{"port": 80}]}]},
                   "conditions": [{"type": "x", "status": "True", "message": "y" * 200}]},
    }


def whole_slice(family: str = "IPv4", **extra: Any) -> dict[str, Any]:
    def address(i: int) -> str:
        return f"10.244.{i}.7" if family == "IPv4" else f"2001:db8:1:{i}::7"
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "addressType": family,
        "metadata": {"name": f"web-{family.lower()}", "namespace": "shop", "resourceVersion": "77", "generation": 9,
                     "generateName": "web-", "uid": "s-1", "creationTimestamp": "2024-01-01T00:00:00Z",
                     "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "annotations": {TRIGGER_TIME_ANNOTATION: "2024-01-01T00:00:05Z"},
                     "ownerReferences": [{"kind": "Service", "name": "web", "uid": "u-1"}], "managedFields": MANAGED},
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
                  {"name": "dns", "protocol": "UDP", "port": 5353}],
        "endpoints": [
            {"addresses": [address(1)], "nodeName": "node-a", "zone": "z1", "hostname": "h",
             "conditions": {"ready": True, "serving": True, "terminating": False},
             "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "p-1"},
             "hints": {"forZones": [{"name": "z1"}]}},
            {"addresses": [address(2)], "nodeName": "node-b",
             "conditions": {"ready": False, "serving": True, "terminating": True}},
            {"addresses": [address(3)], "nodeName": "node-a", "conditions": {}},
            {"addresses": [], "nodeName": "node-c"},
        ],
        **extra,
    }


SERVICES = {
    "dual-stack, source ranges, affinity": whole_service(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
    "ETP Local with a health check": whole_service(externalTrafficPolicy="Local", healthCheckNodePort=32000),
    "source ranges in spec": whole_service(loadBalancerSourceRanges=["198.51.100.0/24", "bad"]),
    "another class": whole_service(loadBalancerClass="example.com/other"),
    "not a LoadBalancer": whole_service(type="ClusterIP"),
    "malformed ports": whole_service(ports="80"),
    "malformed port entry": whole_service(ports=[{"name": "http", "port": "eighty"}, 7]),
    "being deleted": {**whole_service(), "metadata": {**whole_service()["metadata"],
                                                      "deletionTimestamp": "2024-01-02T00:00:00Z"}},
    "no status": {k: v for k, v in whole_service().items() if k != "status"},
    "malformed status": {**whole_service(), "status": "ok"},
    "malformed spec": {**whole_service(), "spec": ["LoadBalancer"]},
    "malformed metadata": {**whole_service(), "metadata": "web"},
}
SLICES = {
    "both families": [whole_slice("IPv4"), whole_slice("IPv6")],
    "FQDN slice": [whole_slice("FQDN")],
    "malformed endpoints": [whole_slice("IPv4", endpoints="none")],
    "malformed endpoint entries": [whole_slice("IPv4", endpoints=[7, {"addresses": "10.0.0.1"},
                                                                  {"addresses": ["10.0.0.2"], "conditions": []}])],
    "malformed ports": [whole_slice("IPv4", ports=[{"name": "http", "port": 99999}, "x"])],
    "no slices": [],
}
def outcome(read: Callable[[], object]) -> object:
    """What a reader returns, or the kind of error it raises (objects the apiserver would refuse)."""
    try:
        return read()
    except Exception as exc:
        return type(exc)


CONTEXTS = [BuildContext(node="node-a", scope=Scope("lbctl.io/local")),
            BuildContext(node="node-b", scope=Scope("lbctl.io/local"), announce_classes=frozenset(),
                         pod_networks=(ipaddress.ip_network("10.244.0.0/16"),))]


@pytest.mark.parametrize("service", SERVICES.values(), ids=SERVICES.keys())
@pytest.mark.parametrize("slices", SLICES.values(), ids=SLICES.keys())
@pytest.mark.parametrize("context", CONTEXTS, ids=["node-a", "node-b"])
def test_rules_built_from_trimmed_objects_are_the_same(service: dict[str, Any], slices: list[dict[str, Any]],
                                                       context: BuildContext) -> None:
    whole = outcome(lambda: build_service(copy.deepcopy(service), copy.deepcopy(slices), context))
    trimmed = outcome(lambda: build_service(fields.service(copy.deepcopy(service)),
                                            [fields.endpoint_slice(copy.deepcopy(s)) for s in slices], context))
    assert trimmed == whole


@pytest.mark.parametrize("service", SERVICES.values(), ids=SERVICES.keys())
def test_every_other_reader_of_a_service_reads_the_same(service: dict[str, Any]) -> None:
    trimmed = fields.service(copy.deepcopy(service))
    for scope in (Scope("lbctl.io/local"), Scope("example.com/other"), Scope("x", default_class=True)):
        assert outcome(lambda s=scope: s.manages(trimmed)) == outcome(lambda s=scope: s.manages(service))
    meta = service.get("metadata")
    if isinstance(meta, dict):
        assert object_key(trimmed) == object_key(service) and service_key(trimmed) == service_key(service)
        assert trimmed["metadata"]["resourceVersion"] == meta["resourceVersion"]  # a re-list compares them
        assert trimmed["metadata"]["annotations"][ANNOUNCING_NODE_ANNOTATION] == "node-2"  # the announcer's mark
    assert "managedFields" not in str(trimmed) and "last-applied" not in str(trimmed)


@pytest.mark.parametrize("slices", SLICES.values(), ids=SLICES.keys())
def test_every_other_reader_of_a_slice_reads_the_same(slices: list[dict[str, Any]]) -> None:
    for whole in slices:
        trimmed = fields.endpoint_slice(copy.deepcopy(whole))
        assert object_key(trimmed) == object_key(whole)
        assert slice_service_key(trimmed) == slice_service_key(whole)
        assert trimmed["metadata"]["resourceVersion"] == whole["metadata"]["resourceVersion"]
        older = {"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: "2024-01-01T00:00:01Z"}}}
        assert change_time(older, trimmed, 2e9) == change_time(older, whole, 2e9)
        assert "targetRef" not in str(trimmed) and "ownerReferences" not in str(trimmed)


def test_endpoints_with_the_same_conditions_share_one_dict() -> None:
    first, second = (fields.endpoint_slice(whole_slice()) for _ in range(2))
    assert first["endpoints"][0].conditions is second["endpoints"][0].conditions
    assert first["endpoints"][0].conditions == {"ready": True, "serving": True, "terminating": False}
