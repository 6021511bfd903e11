"""Services and EndpointSlices from the apiserver's protobuf lists, read straight into what the watch
caches keep (pure).

The forwarder's first lists are most of its start-up at 10,000 Services: as protobuf (what
kube-proxy gets) they come at half JSON's size and parse in C, and only the fields below are read
out of them. The result is exactly what lbctl.forwarder.fields keeps of the same object sent as
JSON — tests/integration/test_fields_protobuf.py lists one set of objects both ways from the
apiserver and compares — so the schema lists the fields fields.py keeps, with their numbers in
k8s.io/api's generated.proto, and the readers mirror JSON's rules of presence: a field Go marks
`omitempty` is left out when empty, a pointer field is there when it is set, a list the apiserver
sends as null is None.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

from lbctl.forwarder.fields import DROPPED_ANNOTATIONS, new_endpoint, shared_conditions, shared_families
from lbctl.kube.protobuf import Field, ListPage, messages, parse
from lbctl.model.meta import timestamp

_META = [Field("name", 1, "string"), Field("namespace", 3, "string"), Field("uid", 5, "string"),
         Field("resourceVersion", 6, "string"), Field("creationTimestamp", 8, "Time"),
         Field("deletionTimestamp", 9, "Time"), Field("labels", 11, "map"), Field("annotations", 12, "map"),
         Field("finalizers", 14, "string", repeated=True)]
SCHEMA = {
    # k8s.io/apimachinery/pkg/apis/meta/v1
    "Time": [Field("seconds", 1, "int64")],
    "ListMeta": [Field("resourceVersion", 2, "string"), Field("continue", 3, "string")],
    "ObjectMeta": _META,
    # k8s.io/api/core/v1
    "ServiceList": [Field("metadata", 1, "ListMeta"), Field("items", 2, "Service", repeated=True)],
    "Service": [Field("metadata", 1, "ObjectMeta"), Field("spec", 2, "ServiceSpec"),
                Field("status", 3, "ServiceStatus")],
    "ServiceSpec": [Field("ports", 1, "ServicePort", repeated=True), Field("type", 4, "string"),
                    Field("sessionAffinity", 7, "string"),
                    Field("loadBalancerSourceRanges", 9, "string", repeated=True),
                    Field("externalTrafficPolicy", 11, "string"), Field("healthCheckNodePort", 12, "int32"),
                    Field("sessionAffinityConfig", 14, "SessionAffinityConfig"),
                    Field("ipFamilyPolicy", 17, "string"), Field("ipFamilies", 19, "string", repeated=True),
                    Field("loadBalancerClass", 21, "string")],
    "ServicePort": [Field("name", 1, "string"), Field("protocol", 2, "string"), Field("port", 3, "int32"),
                    Field("nodePort", 5, "int32")],
    "SessionAffinityConfig": [Field("clientIP", 1, "ClientIPConfig")],
    "ClientIPConfig": [Field("timeoutSeconds", 1, "int32")],
    "ServiceStatus": [Field("loadBalancer", 1, "LoadBalancerStatus")],
    "LoadBalancerStatus": [Field("ingress", 1, "LoadBalancerIngress", repeated=True)],
    "LoadBalancerIngress": [Field("ip", 1, "string"), Field("ipMode", 3, "string")],
    # k8s.io/api/discovery/v1
    "EndpointSliceList": [Field("metadata", 1, "ListMeta"), Field("items", 2, "EndpointSlice", repeated=True)],
    "EndpointSlice": [Field("metadata", 1, "ObjectMeta"), Field("endpoints", 2, "Endpoint", repeated=True),
                      Field("ports", 3, "EndpointPort", repeated=True), Field("addressType", 4, "string")],
    "Endpoint": [Field("addresses", 1, "string", repeated=True), Field("conditions", 2, "EndpointConditions"),
                 Field("nodeName", 6, "string")],
    "EndpointConditions": [Field("ready", 1, "bool"), Field("serving", 2, "bool"), Field("terminating", 3, "bool")],
    "EndpointPort": [Field("name", 1, "string"), Field("protocol", 2, "string"), Field("port", 3, "int32")],
}
_MESSAGES = messages("lbctl.forwarder", SCHEMA)
_intern = sys.intern


def _time(value: Any) -> str:
    return timestamp(dt.datetime.fromtimestamp(value.seconds, dt.UTC))  # as JSON has it: whole seconds


def _meta(meta: Any, service: bool) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if meta.name:
        kept["name"] = _intern(meta.name) if service else meta.name  # a Service's name its slices' label repeats
    if meta.namespace:
        kept["namespace"] = _intern(meta.namespace)
    if service and meta.uid:
        kept["uid"] = meta.uid
    if meta.resourceVersion:
        kept["resourceVersion"] = meta.resourceVersion
    if service:
        if meta.HasField("creationTimestamp"):
            kept["creationTimestamp"] = _time(meta.creationTimestamp)
        if meta.HasField("deletionTimestamp"):
            kept["deletionTimestamp"] = _time(meta.deletionTimestamp)
    if meta.labels:
        kept["labels"] = {_intern(k): _intern(v) for k, v in meta.labels.items()}
    if meta.annotations:
        kept["annotations"] = {k: v for k, v in meta.annotations.items() if k not in DROPPED_ANNOTATIONS}
    if service and meta.finalizers:
        kept["finalizers"] = list(meta.finalizers)
    return kept


def _service_spec(spec: Any) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if spec.type:
        kept["type"] = _intern(spec.type)
    if spec.HasField("loadBalancerClass"):
        kept["loadBalancerClass"] = _intern(spec.loadBalancerClass)
    if spec.externalTrafficPolicy:
        kept["externalTrafficPolicy"] = _intern(spec.externalTrafficPolicy)
    if spec.ipFamilies:
        kept["ipFamilies"] = shared_families(spec.ipFamilies)
    if spec.HasField("ipFamilyPolicy"):
        kept["ipFamilyPolicy"] = _intern(spec.ipFamilyPolicy)
    if spec.ports:
        ports = []
        for port in spec.ports:
            item: dict[str, Any] = {}
            if port.name:
                item["name"] = _intern(port.name)
            if port.protocol:
                item["protocol"] = _intern(port.protocol)
            item["port"] = port.port  # not omitempty
            if port.nodePort:
                item["nodePort"] = port.nodePort
            ports.append(item)
        kept["ports"] = ports
    if spec.healthCheckNodePort:
        kept["healthCheckNodePort"] = spec.healthCheckNodePort
    if spec.loadBalancerSourceRanges:
        kept["loadBalancerSourceRanges"] = list(spec.loadBalancerSourceRanges)
    if spec.sessionAffinity:
        kept["sessionAffinity"] = _intern(spec.sessionAffinity)
    if spec.HasField("sessionAffinityConfig"):
        config: dict[str, Any] = {}
        if spec.sessionAffinityConfig.HasField("clientIP"):
            client_ip = spec.sessionAffinityConfig.clientIP
            config["clientIP"] = {"timeoutSeconds": client_ip.timeoutSeconds} \
                if client_ip.HasField("timeoutSeconds") else {}
        kept["sessionAffinityConfig"] = config
    return kept


def _service(obj: Any) -> dict[str, Any]:
    balancer: dict[str, Any] = {}
    ingress = obj.status.loadBalancer.ingress
    if ingress:
        items = []
        for entry in ingress:
            item: dict[str, Any] = {}
            if entry.ip:
                item["ip"] = entry.ip
            if entry.HasField("ipMode"):
                item["ipMode"] = _intern(entry.ipMode)
            items.append(item)
        balancer["ingress"] = items
    return {"metadata": _meta(obj.metadata, True), "spec": _service_spec(obj.spec),
            "status": {"loadBalancer": balancer}}


_CONDITIONS: dict[bytes, Any] = {}  # an endpoint's conditions as sent → the cache's shared dict


def _conditions(conditions: Any) -> Any:
    # 50,000 endpoints at start-up and a handful of distinct conditions: looked up by their bytes
    sent = conditions.SerializeToString()
    shared = _CONDITIONS.get(sent)
    if shared is None:
        # ready, serving, terminating: pointers, there when set; `conditions` itself always is
        shared = shared_conditions({field.name: value for field, value in conditions.ListFields()})
        if len(_CONDITIONS) < 64:  # malformed input cannot grow it
            _CONDITIONS[sent] = shared
    return shared


def _endpoint_slice(obj: Any) -> dict[str, Any]:
    ports = []
    for port in obj.ports:
        item: dict[str, Any] = {}
        if port.HasField("name"):
            item["name"] = _intern(port.name)
        if port.HasField("protocol"):
            item["protocol"] = _intern(port.protocol)
        if port.HasField("port"):
            item["port"] = port.port
        ports.append(item)
    endpoints = []
    for endpoint in obj.endpoints:
        addresses = endpoint.addresses
        endpoints.append(new_endpoint((addresses[0] if addresses else None, _conditions(endpoint.conditions),
                                       _intern(endpoint.nodeName) if endpoint.HasField("nodeName") else None)))
    return {"metadata": _meta(obj.metadata, False), "addressType": _intern(obj.addressType),
            "ports": ports or None, "endpoints": endpoints or None}  # both `json:"…"` without omitempty


def service_list(body: bytes) -> ListPage:
    """A page of the Service list (a protobuf response body); ValueError when it is not one."""
    page = parse(_MESSAGES["ServiceList"], body)
    return ListPage([_service(item) for item in page.items], page.metadata.resourceVersion,
                    getattr(page.metadata, "continue"))


def endpoint_slice_list(body: bytes) -> ListPage:
    """A page of the EndpointSlice list (a protobuf response body); ValueError when it is not one."""
    page = parse(_MESSAGES["EndpointSliceList"], body)
    return ListPage([_endpoint_slice(item) for item in page.items], page.metadata.resourceVersion,
                    getattr(page.metadata, "continue"))
