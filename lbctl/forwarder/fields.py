"""What the forwarder keeps of a Service or an EndpointSlice in its watch caches (pure).

The caches hold every Service and EndpointSlice of the cluster for as long as the forwarder runs;
the apiserver sends much the forwarder never reads (targetRef, zone and hints of every endpoint,
spec.clusterIPs, managedFields, kubectl's last-applied copy of the object, …). The reflector keeps
only the fields below, at its boundary, before anything else sees the object. Everything the
forwarder reads must be listed here: lbctl.forwarder.desired (building rules), lbctl.model.scope
(which Services are ours), the announcer's mark (its annotation), the ForwardingProblem Events
(namespace, name, uid of the Service they are about), the programming-latency metric
(the trigger-time annotation), and the reflector itself (name, namespace, resourceVersion: a
re-list compares versions). tests/unit/test_forwarder_fields.py checks that each of them reads the
same from a trimmed object as from the whole one.

Endpoint conditions are shared: the apiserver repeats the same three booleans for most endpoints,
and one dict per distinct set of conditions is kept instead of one per endpoint (nobody mutates
cached objects). Node names are interned for the same reason.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "labels",
         "annotations", "finalizers")
_SLICE_META = ("name", "namespace", "resourceVersion", "labels", "annotations")
_SERVICE_SPEC = ("type", "loadBalancerClass", "externalTrafficPolicy", "ipFamilies", "ipFamilyPolicy", "ports",
                 "healthCheckNodePort", "loadBalancerSourceRanges", "sessionAffinity", "sessionAffinityConfig")
_PORT = ("name", "protocol", "port", "nodePort")
_SLICE_PORT = ("name", "protocol", "port")
_ENDPOINT = ("addresses", "conditions", "nodeName")
#: large annotations nothing in the forwarder reads
_DROPPED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})

_conditions: dict[tuple[tuple[str, Any], ...], Mapping[str, Any]] = {}


def _pick(obj: Any, fields: tuple[str, ...]) -> Any:
    if not isinstance(obj, Mapping):
        return obj  # malformed: kept as it is, for the readers to report
    return {name: obj[name] for name in fields if name in obj}


def _each(items: Any, fields: tuple[str, ...]) -> Any:
    return [_pick(item, fields) for item in items] if isinstance(items, list) else items


def _meta(meta: Any, fields: tuple[str, ...]) -> Any:
    kept = _pick(meta, fields)
    if isinstance(kept, dict):
        annotations = kept.get("annotations")
        if isinstance(annotations, Mapping) and not _DROPPED_ANNOTATIONS.isdisjoint(annotations):
            kept["annotations"] = {k: v for k, v in annotations.items() if k not in _DROPPED_ANNOTATIONS}
    return kept


def service(obj: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if "metadata" in obj:
        kept["metadata"] = _meta(obj["metadata"], _META)
    spec = obj.get("spec")
    if spec is not None:
        spec = _pick(spec, _SERVICE_SPEC)
        if isinstance(spec, dict) and "ports" in spec:
            spec["ports"] = _each(spec["ports"], _PORT)
        kept["spec"] = spec
    status = obj.get("status")
    if isinstance(status, Mapping) and "loadBalancer" in status:
        kept["status"] = {"loadBalancer": status["loadBalancer"]}
    elif status is not None and not isinstance(status, Mapping):
        kept["status"] = status
    return kept


def _endpoint(item: Any) -> Any:
    kept = _pick(item, _ENDPOINT)
    if isinstance(kept, dict):
        node = kept.get("nodeName")
        if isinstance(node, str):
            kept["nodeName"] = sys.intern(node)
        conditions = kept.get("conditions")
        if isinstance(conditions, dict):
            try:
                shape = tuple(sorted(conditions.items()))
                kept["conditions"] = _conditions.setdefault(shape, conditions) if len(_conditions) < 64 else conditions
            except TypeError:  # unhashable values: a malformed object, kept as it is
                pass
    return kept


def endpoint_slice(obj: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if "metadata" in obj:
        kept["metadata"] = _meta(obj["metadata"], _SLICE_META)
    for name in ("addressType", "ports", "endpoints"):
        if name in obj:
            kept[name] = obj[name]
    if "ports" in kept:
        kept["ports"] = _each(kept["ports"], _SLICE_PORT)
    if isinstance(kept.get("endpoints"), list):
        kept["endpoints"] = [_endpoint(item) for item in kept["endpoints"]]
    return kept
