"""Which nodes a balancer may send traffic to (pure).

Like the Kubernetes service controller: drop nodes being deleted, labelled
node.kubernetes.io/exclude-from-external-load-balancers, or tainted ToBeDeletedByClusterAutoscaler;
unlike it, also drop nodes that are not Ready, since traffic sent there is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from lbctl.model.meta import AUTOSCALER_TAINT, EXCLUDE_LABEL, ZONE_LABEL
from lbctl.model.types import NodeTarget


def ineligibility(node: Mapping[str, Any]) -> str | None:
    """Why a node must not receive balancer traffic, or None when it may."""
    meta = node.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "being deleted"
    if EXCLUDE_LABEL in (meta.get("labels") or {}):
        return f"labelled {EXCLUDE_LABEL}"
    for taint in (node.get("spec") or {}).get("taints") or ():
        if taint.get("key") == AUTOSCALER_TAINT:
            return f"tainted {AUTOSCALER_TAINT}"
    conditions = (node.get("status") or {}).get("conditions") or ()
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    if ready != "True":
        return "not Ready"
    return None


def node_target(node: Mapping[str, Any]) -> NodeTarget:
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    addresses = (node.get("status") or {}).get("addresses") or ()
    internal = next((a.get("address") for a in addresses if a.get("type") == "InternalIP"), None)
    return NodeTarget(
        name=meta.get("name", ""),
        provider_id=(node.get("spec") or {}).get("providerID") or "",
        internal_ip=internal,
        zone=labels.get(ZONE_LABEL),
        labels=MappingProxyType(dict(labels)),
    )


def eligible_nodes(nodes: Iterable[Mapping[str, Any]]) -> tuple[NodeTarget, ...]:
    """Eligible nodes sorted by name, so equal sets compare equal."""
    return tuple(sorted((node_target(n) for n in nodes if ineligibility(n) is None), key=lambda t: t.name))


def node_set_key(nodes: Iterable[NodeTarget]) -> frozenset[tuple[str, str]]:
    """What a balancer depends on: node names and providerIDs (labels and addresses are not)."""
    return frozenset((n.name, n.provider_id) for n in nodes)


# The tolerations the DaemonSet controller adds to every daemon pod (hostNetwork pods also get
# network-unavailable), so these taints never keep a DaemonSet off a node.
DAEMON_TOLERATED = frozenset({
    "node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable", "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure", "node.kubernetes.io/pid-pressure", "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/network-unavailable",
})


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key")
    if toleration.get("operator") == "Exists":
        return not key or key == taint.get("key")
    return key == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or "")


def daemon_pod_misfit(pod_spec: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """Why a DaemonSet with this pod spec places no pod on the node (its nodeSelector, or a
    NoSchedule/NoExecute taint it does not tolerate), or None when it does."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    for key, value in sorted((pod_spec.get("nodeSelector") or {}).items()):
        if labels.get(key) != value:
            return f"nodeSelector {key}={value}"
    tolerations = pod_spec.get("tolerations") or ()
    for taint in (node.get("spec") or {}).get("taints") or ():
        if taint.get("effect") not in ("NoSchedule", "NoExecute") or taint.get("key") in DAEMON_TOLERATED:
            continue
        if not any(_tolerates(t, taint) for t in tolerations):
            value = f"={taint['value']}" if taint.get("value") else ""
            return f"taint {taint.get('key')}{value}:{taint.get('effect')}"
    return None
