"""Names and small helpers every part of lbctl shares, each defined here once: the finalizer,
annotations and labels lbctl reads or writes, the "namespace/name" key of an object, and the clock
(timestamps as Kubernetes writes them). Decisions take the time as an argument; `now()` is read by
the shells that call them."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Mapping
from typing import Any

#: the upstream service controller's finalizer, which lbctl uses too (see OWNER_ANNOTATION)
FINALIZER = "service.kubernetes.io/load-balancer-cleanup"
#: written with the finalizer: the upstream controller uses the same finalizer, and once a Service's
#: type changes away from LoadBalancer its class is gone, so this marks what is ours
OWNER_ANNOTATION = "lbctl.io/load-balancer-class"
#: the forwarder that announces a Service's VIP writes its node name here
ANNOUNCING_NODE_ANNOTATION = "lbctl.io/announcing-node"
#: the operator names here the nodes that announce a BGP-advertised Service (sorted, comma-separated)
BGP_ANNOUNCING_NODES_ANNOTATION = "lbctl.io/bgp-announcing-nodes"
#: annotations lbctl's own components write on Services: a change of them is no reason to sync
WRITTEN_BY_LBCTL = frozenset({ANNOUNCING_NODE_ANNOTATION, BGP_ANNOUNCING_NODES_ANNOTATION})

#: the older way to set spec.loadBalancerSourceRanges
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"

EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
AUTOSCALER_TAINT = "ToBeDeletedByClusterAutoscaler"
ZONE_LABEL = "topology.kubernetes.io/zone"
#: on EndpointSlices: the Service they belong to
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: the forwarder's node Leases
FORWARDER_LEASE_LABEL = "lbctl.io/forwarder-node"

#: lbctl's own API (the LoadBalancerPool and BGPPeer CRDs)
API_GROUP = "lbctl.io"
API_VERSION_NAME = "v1alpha1"
API_VERSION = f"{API_GROUP}/{API_VERSION_NAME}"

#: where lbctl's components run (examples/deploy) and keep their Leases
SYSTEM_NAMESPACE = "lbctl-system"

CLASS_PREFIX = "lbctl.io/"


def default_class(provider: str) -> str:
    """The spec.loadBalancerClass a provider's operator handles unless told otherwise."""
    return f"{CLASS_PREFIX}{provider}"


LOCAL_CLASS = default_class("local")


def key(namespace: str | None, name: str | None) -> str:
    """"namespace/name" ("/name" for cluster-scoped objects). Interned: the same key is kept by
    several caches and maps (10,000s of them in a forwarder), one string for all of them."""
    return sys.intern(f"{namespace or ''}/{name or ''}")


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return key(meta.get("namespace"), meta.get("name"))


def split_key(text: str) -> tuple[str, str]:
    namespace, _, name = text.partition("/")
    return namespace, name


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timestamp(at: dt.datetime | None = None) -> str:
    """Kubernetes' Time (RFC 3339, whole seconds, UTC)."""
    return (at or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(at: dt.datetime | None = None) -> str:
    """Kubernetes' MicroTime (RFC 3339 with microseconds, UTC)."""
    return (at or now()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
