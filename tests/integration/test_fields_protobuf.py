"""The forwarder's protobuf lists against the real apiserver: Services and EndpointSlices of every
shape the forwarder reads (and the fields it does not), listed once as protobuf and once as JSON,
give the same caches, object for object — lbctl.forwarder.fields_protobuf keeps exactly what
lbctl.forwarder.fields keeps. And a resource the apiserver has no protobuf for (a CRD) still lists,
as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lbctl.dev.layout import ClusterInfo
from lbctl.forwarder import fields, fields_protobuf
from lbctl.kube import protobuf
from lbctl.kube.client import MERGE_PATCH, KubeClient
from lbctl.kube.reflector import Reflector
from lbctl.model.meta import SERVICE_NAME_LABEL, SOURCE_RANGES_ANNOTATION

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
Trim = Callable[[dict[str, Any]], dict[str, Any]]


def _services(namespace: str) -> list[dict[str, Any]]:
    def service(name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": namespace, **meta}, "spec": spec}

    lb = {"type": "LoadBalancer", "ports": [{"port": 80, "targetPort": 8080}]}
    return [
        service("minimal", lb),
        service("everything", {
            "type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "externalTrafficPolicy": "Local",
            "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "loadBalancerSourceRanges": ["203.0.113.0/24", "198.51.100.7/32"], "selector": {"app": "web"},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http", "appProtocol": "http"},
                      {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}]},
            labels={"app": "web", "tier": "front"},
            annotations={SOURCE_RANGES_ANNOTATION: "192.0.2.0/24", LAST_APPLIED: "{" + "x" * 2000 + "}",
                         "example.com/note": ""}),
        service("default-affinity", {**lb, "sessionAffinity": "ClientIP"}),
        service("no-node-ports", {**lb, "allocateLoadBalancerNodePorts": False}),
        service("cluster-ip", {"ports": [{"name": "a", "port": 1, "protocol": "UDP"}]}),
        service("headless", {"clusterIP": "None", "ports": [{"port": 9}]}),
        service("external-name", {"type": "ExternalName", "externalName": "example.com"}),
        service("with-status", lb),
        service("deleting", lb, finalizers=["example.com/hold"]),
    ]


def _slices(namespace: str) -> list[dict[str, Any]]:
    def endpoint_slice(name: str, address_type: str, **body: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": namespace, "labels": {SERVICE_NAME_LABEL: "everything"},
                             **body.pop("metadata", {})},
                "addressType": address_type, **body}

    return [
        endpoint_slice("v4", "IPv4", metadata={"annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                                                               "2024-01-01T00:00:05Z"}},
                       ports=[{"name": "http", "protocol": "TCP", "port": 8080}, {"port": 53, "protocol": "UDP"},
                              {"name": "unset-port"}],
                       endpoints=[
                           {"addresses": ["10.244.0.5"], "conditions": {"ready": True, "serving": True,
                                                                        "terminating": False},
                            "nodeName": "node-1", "zone": "a", "hostname": "web-0",
                            "targetRef": {"kind": "Pod", "name": "web-0", "namespace": namespace},
                            "hints": {"forZones": [{"name": "a"}]}},
                           {"addresses": ["10.244.0.6", "10.244.0.7"], "conditions": {}},
                           {"addresses": ["10.244.0.8"], "conditions": {"ready": False, "serving": True,
                                                                        "terminating": True}, "nodeName": "node-2"},
                           {"addresses": ["10.244.0.9"], "conditions": {"serving": False}},
                       ]),
        endpoint_slice("v6", "IPv6", ports=[{"name": "http", "port": 8080}],
                       endpoints=[{"addresses": ["2001:db8::5"], "nodeName": "node-1"}]),
        endpoint_slice("fqdn", "FQDN", ports=[], endpoints=[{"addresses": ["db.example.com"]}]),
        endpoint_slice("empty", "IPv4", ports=[], endpoints=[]),
        endpoint_slice("no-lists", "IPv4"),
    ]


@pytest.fixture
def objects(cluster: ClusterInfo, namespace: str) -> Iterator[str]:
    async def create() -> None:
        kube = KubeClient.from_kubeconfig(cluster.kubeconfig)
        try:
            for body in _services(namespace):
                await kube.request("POST", f"/api/v1/namespaces/{namespace}/services", body=body)
            await kube.request(
                "PATCH", f"/api/v1/namespaces/{namespace}/services/with-status/status", content_type=MERGE_PATCH,
                body={"status": {"loadBalancer": {"ingress": [
                    {"ip": "192.0.2.10", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
                    {"ip": "2001:db8::10"}, {"hostname": "lb.example.com"},
                    {"ip": "192.0.2.11", "ipMode": "Proxy"}]}}})
            await kube.request("DELETE", f"/api/v1/namespaces/{namespace}/services/deleting")
            for body in _slices(namespace):
                await kube.request("POST", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                                   body=body)
        finally:
            await kube.close()

    async def release() -> None:  # the Service held by its finalizer: let it go, or its namespace stays
        kube = KubeClient.from_kubeconfig(cluster.kubeconfig)
        try:
            await kube.request("PATCH", f"/api/v1/namespaces/{namespace}/services/deleting",
                               content_type=MERGE_PATCH, body={"metadata": {"finalizers": None}})
        except Exception:
            pass  # not made (create failed early), or gone already
        finally:
            await kube.close()

    try:
        asyncio.run(create())
        yield namespace
    finally:
        asyncio.run(release())


def _listed(cluster: ClusterInfo, path: str, trim: Trim,
            decode: Callable[[bytes], protobuf.ListPage] | None) -> dict[str, Any]:
    async def scenario() -> dict[str, Any]:
        kube = KubeClient.from_kubeconfig(cluster.kubeconfig)
        reflector = Reflector(kube, path, lambda old, new: None, trim=trim, protobuf_list=decode)
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 30)
            return dict(reflector.cache)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()
    return asyncio.run(scenario())


@pytest.mark.parametrize(("resource", "trim", "decode"), [
    ("/api/v1/namespaces/{}/services", fields.service, fields_protobuf.service_list),
    ("/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices", fields.endpoint_slice,
     fields_protobuf.endpoint_slice_list),
], ids=["services", "endpointslices"])
def test_a_protobuf_list_keeps_what_a_json_list_keeps(cluster: ClusterInfo, objects: str, resource: str,
                                                      trim: Trim, decode: Any) -> None:
    pages: list[int] = []

    def counted(body: bytes) -> protobuf.ListPage:
        page: protobuf.ListPage = decode(body)
        pages.append(len(page.items))
        return page

    path = resource.format(objects)
    from_protobuf = _listed(cluster, path, trim, counted)
    from_json = _listed(cluster, path, trim, None)
    assert pages and sum(pages) == len(from_protobuf)  # it did come as protobuf
    made = _services(objects) if "services" in resource else _slices(objects)
    # (and the slices the EndpointSlice controller makes for the Services with a selector)
    assert {f"{objects}/{obj['metadata']['name']}" for obj in made} <= from_json.keys()
    assert from_protobuf.keys() == from_json.keys()
    for key, obj in from_json.items():
        assert from_protobuf[key] == obj, key
    if "services" in resource:  # the shapes the table means to cover are really there
        deleting = from_json[f"{objects}/deleting"]["metadata"]
        assert deleting["deletionTimestamp"] and deleting["finalizers"] == ["example.com/hold"]
        assert len(from_json[f"{objects}/with-status"]["status"]["loadBalancer"]["ingress"]) == 4
        assert LAST_APPLIED not in from_protobuf[f"{objects}/everything"]["metadata"]["annotations"]
        assert from_json[f"{objects}/default-affinity"]["spec"]["sessionAffinityConfig"] == {
            "clientIP": {"timeoutSeconds": 10800}}
    else:
        assert from_json[f"{objects}/no-lists"]["endpoints"] is None
        assert from_json[f"{objects}/v4"]["endpoints"][1].conditions == {}


def test_a_resource_without_protobuf_lists_as_json(cluster: ClusterInfo, pool_crd: None) -> None:
    called: list[bytes] = []

    def decode(body: bytes) -> protobuf.ListPage:
        called.append(body)
        raise AssertionError("a CRD has no protobuf: the apiserver answers JSON")

    listed = _listed(cluster, "/apis/lbctl.io/v1alpha1/bgppeers", lambda obj: obj, decode)
    assert listed == _listed(cluster, "/apis/lbctl.io/v1alpha1/bgppeers", lambda obj: obj, None)
    assert not called
