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
same from a trimmed object as from the whole one. The forwarder's lists come as protobuf, read
straight into this same form by lbctl.forwarder.fields_protobuf: a field kept here is read there
too (tests/integration/test_fields_protobuf.py compares the two on the apiserver's objects).

Memory (a forwarder keeps every Service and EndpointSlice of the cluster): an endpoint is kept
as a SliceEndpoint tuple rather than the apiserver's dict (a third of the size, and 10,000 Services
have 50,000 of them); endpoint conditions are shared, one dict per distinct set of them (the
apiserver repeats the same three booleans for most endpoints; nobody mutates cached objects);
values that repeat across objects (namespaces, node names, protocols, port names, types, …) are
interned, one string for all the objects that hold them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "labels",
         "annotations", "finalizers")
_SLICE_META = ("name", "namespace", "resourceVersion", "labels", "annotations")
_SERVICE_SPEC = ("type", "loadBalancerClass", "externalTrafficPolicy", "ipFamilies", "ipFamilyPolicy", "ports",
                 "healthCheckNodePort", "loadBalancerSourceRanges", "sessionAffinity", "sessionAffinityConfig")
_PORT = ("name", "protocol", "port", "nodePort")
_SLICE_PORT = ("name", "protocol", "port")
_INGRESS = ("ip", "ipMode")
_SERVICE_SPEC_REPEATED = ("type", "loadBalancerClass", "externalTrafficPolicy", "ipFamilyPolicy", "sessionAffinity")
#: large annotations nothing in the forwarder reads
DROPPED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})

_conditions: dict[tuple[Any, ...], Any] = {}
_families: dict[tuple[Any, ...], Any] = {}
_SHARED_LIMIT = 64  # distinct values kept per table: a cluster has a handful; malformed input cannot grow it


def _shared(table: dict[tuple[Any, ...], Any], shape: tuple[Any, ...], value: Any) -> Any:
    """One object for every equal `value` (keyed by its hashable `shape`); nobody mutates cached objects."""
    try:
        shared = table.get(shape)
        if shared is not None:
            return shared
        return table.setdefault(shape, value) if len(table) < _SHARED_LIMIT else value
    except TypeError:  # unhashable values: a malformed object, kept as it is
        return value


class SliceEndpoint(NamedTuple):
    """One entry of an EndpointSlice's endpoints as the cache keeps it. `address` is its first
    address (the one kube-proxy uses; None when the entry has no list of them); `conditions` and
    `node` are its conditions and nodeName as sent (None when absent). lbctl.forwarder.desired
    reads these and the apiserver's dicts alike."""

    address: Any
    conditions: Any
    node: Any


def _pick(obj: Any, fields: tuple[str, ...]) -> Any:
    if not isinstance(obj, Mapping):
        return obj  # malformed: kept as it is, for the readers to report
    return {name: obj[name] for name in fields if name in obj}


def _intern(obj: Any, fields: tuple[str, ...]) -> Any:
    """`obj` with the string values of `fields` interned (values many objects repeat)."""
    if type(obj) is dict:
        intern = sys.intern
        for name in fields:
            if type(value := obj.get(name)) is str:
                obj[name] = intern(value)
    return obj


def _each(items: Any, fields: tuple[str, ...], repeated: tuple[str, ...] = ()) -> Any:
    return [_intern(_pick(item, fields), repeated) for item in items] if isinstance(items, list) else items


def _meta(meta: Any, fields: tuple[str, ...]) -> Any:
    kept = _intern(_pick(meta, fields), ("namespace",))
    if isinstance(kept, dict):
        annotations = kept.get("annotations")
        if isinstance(annotations, Mapping) and not DROPPED_ANNOTATIONS.isdisjoint(annotations):
            kept["annotations"] = {k: v for k, v in annotations.items() if k not in DROPPED_ANNOTATIONS}
        labels = kept.get("labels")
        if isinstance(labels, dict):
            _intern(labels, tuple(labels))  # managed-by, the Service's name, …
    return kept


def service(obj: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if "metadata" in obj:
        kept["metadata"] = _intern(_meta(obj["metadata"], _META), ("name",))  # the name its slices' label repeats
    spec = obj.get("spec")
    if spec is not None:
        spec = _intern(_pick(spec, _SERVICE_SPEC), _SERVICE_SPEC_REPEATED)
        if isinstance(spec, dict) and "ports" in spec:
            spec["ports"] = _each(spec["ports"], _PORT, ("name", "protocol"))
        if isinstance(spec, dict) and isinstance(spec.get("ipFamilies"), list):
            spec["ipFamilies"] = shared_families(spec["ipFamilies"])
        kept["spec"] = spec
    status = obj.get("status")
    if isinstance(status, Mapping) and "loadBalancer" in status:
        balancer = status["loadBalancer"]
        if isinstance(balancer, dict) and isinstance(balancer.get("ingress"), list):
            balancer = {**balancer, "ingress": _each(balancer["ingress"], _INGRESS, ("ipMode",))}
        kept["status"] = {"loadBalancer": balancer}
    elif status is not None and not isinstance(status, Mapping):
        kept["status"] = status
    return kept


def shared_families(families: Sequence[Any]) -> Any:
    """spec.ipFamilies as a tuple, one for every Service with the same families."""
    shape = tuple(families)
    return _shared(_families, shape, shape)


def shared_conditions(conditions: Any) -> Any:
    # keyed in the apiserver's order (it is always the same): no sorting per endpoint
    return _shared(_conditions, tuple(conditions.items()), conditions) if type(conditions) is dict else conditions


new_endpoint = partial(tuple.__new__, SliceEndpoint)  # NamedTuple's own __new__ is a Python call


def _endpoints(items: list[Any]) -> list[Any]:
    """The endpoints of a slice as SliceEndpoints (50,000 of them at start-up: kept tight)."""
    kept: list[Any] = []
    intern = sys.intern
    for item in items:
        if not isinstance(item, Mapping):
            kept.append(item)  # malformed: kept as it is, for the reader to skip
            continue
        addresses, node = item.get("addresses"), item.get("nodeName")
        kept.append(new_endpoint((addresses[0] if isinstance(addresses, list | tuple) and addresses else None,
                                  shared_conditions(item.get("conditions")),
                                  intern(node) if type(node) is str else node)))
    return kept


def endpoint_slice(obj: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    if "metadata" in obj:
        kept["metadata"] = _meta(obj["metadata"], _SLICE_META)
    for name in ("addressType", "ports", "endpoints"):
        if name in obj:
            kept[name] = obj[name]
    _intern(kept, ("addressType",))
    if "ports" in kept:
        kept["ports"] = _each(kept["ports"], _SLICE_PORT, ("name", "protocol"))
    if isinstance(kept.get("endpoints"), list):
        kept["endpoints"] = _endpoints(kept["endpoints"])
    return kept
