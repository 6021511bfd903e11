"""Facts read off Kubernetes objects as the API returns them (plain dicts), shared by `lbctl
status`, `lbctl doctor` and the operator's metrics (pure: no I/O, `now` is passed in)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lbctl.model import meta as model_meta
from lbctl.model.names import load_balancer_name
from lbctl.model.status import current_condition

ANNOUNCING_NODE = model_meta.ANNOUNCING_NODE_ANNOTATION  # the forwarder's mark (lbctl.forwarder.announce)
BGP_ANNOUNCING_NODES = model_meta.BGP_ANNOUNCING_NODES_ANNOTATION  # the operator's (lbctl.operator.bgp)
OWNER_ANNOTATION = model_meta.OWNER_ANNOTATION
CLASS_PREFIX = model_meta.CLASS_PREFIX
SYSTEM_NAMESPACE = model_meta.SYSTEM_NAMESPACE
FORWARDER_LEASE_PREFIX = "lbctl-forwarder-"  # lbctl.forwarder.leases.lease_name
OPERATOR_LEASE = "lbctl-operator"  # lbctl.operator.defaults.LEASE_NAME
POOL_CRD = f"loadbalancerpools.{model_meta.API_GROUP}"
BGP_PEER_CRD = f"bgppeers.{model_meta.API_GROUP}"
POOL_CRD_VERSION = model_meta.API_VERSION_NAME
# condition reasons of a Service that waits for something outside it (lbctl.model.errors)
_WAITING_REASONS = frozenset({"Pending", "NoEligibleNodes"})

READY, PENDING, FAILED = "ready", "pending", "failed"
STATES = (READY, PENDING, FAILED)


def parse_time(text: Any) -> float | None:
    """RFC 3339 (with or without fractions, as Kubernetes writes them) → epoch seconds."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def age(seconds: float | None) -> str:
    """kubectl's short ages: 45s, 12m, 3h, 5d."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    value = obj.get("metadata")
    return value if isinstance(value, Mapping) else {}


key_of = model_meta.object_key  # "namespace/name": lbctl.model.meta's one key helper


def annotations_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    value = meta(obj).get("annotations")
    return value if isinstance(value, Mapping) else {}


def lb_class(service: Mapping[str, Any]) -> str | None:
    """The class lbctl handles this Service under: its loadBalancerClass, else the mark the
    operator leaves on class-less Services it adopted with --default-class."""
    spec = service.get("spec") or {}
    return spec.get("loadBalancerClass") or annotations_of(service).get(OWNER_ANNOTATION)


def is_lbctls(service: Mapping[str, Any], classes: Iterable[str] = ()) -> bool:
    """A LoadBalancer Service of an lbctl class (lbctl.io/…, or one named in `classes`)."""
    if (service.get("spec") or {}).get("type") != "LoadBalancer" and not annotations_of(service).get(OWNER_ANNOTATION):
        return False
    cls = lb_class(service)
    return cls is not None and (cls.startswith(CLASS_PREFIX) or cls in set(classes))


def provider_of(service: Mapping[str, Any]) -> str:
    cls = lb_class(service) or ""
    name = cls.removeprefix(CLASS_PREFIX) if cls.startswith(CLASS_PREFIX) else ""
    if name in ("local", "aws", "gce"):
        return name
    ingress = ingress_of(service)
    if any(i.get("hostname") for i in ingress):
        return "aws"
    return name or "?"


def ingress_of(service: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ())


def addresses(service: Mapping[str, Any]) -> list[str]:
    return [str(i.get("ip") or i.get("hostname")) for i in ingress_of(service) if i.get("ip") or i.get("hostname")]


def balancer_name(service: Mapping[str, Any]) -> str:
    """The cloud balancer's name (the Kubernetes convention, as the providers name it)."""
    return load_balancer_name(str(meta(service).get("uid") or ""))


@dataclass(frozen=True)
class ServiceState:
    state: str  # ready | pending | failed
    reason: str  # the condition's reason, or why there is none
    problem: str  # plain words
    fix: str  # what to do ("" when nothing)


def split_fix(message: str) -> tuple[str, str]:
    """lbctl's messages end with "; fix: …" (lbctl.model.errors.LoadBalancerError.describe)."""
    problem, sep, fix = message.partition("; fix: ")
    return problem.strip(), fix.strip() if sep else ""


def service_state(service: Mapping[str, Any]) -> ServiceState:
    condition = current_condition(service) or {}
    reason = str(condition.get("reason") or "")
    message = str(condition.get("message") or "")
    if condition.get("status") == "True" and ingress_of(service):
        return ServiceState(READY, reason, message, "")
    if condition.get("status") == "False":
        problem, fix = split_fix(message)
        return ServiceState(PENDING if reason in _WAITING_REASONS else FAILED, reason, problem, fix)
    if meta(service).get("deletionTimestamp"):
        return ServiceState(PENDING, "Deleting", "being deleted: lbctl releases its balancer first", "")
    if not annotations_of(service).get(OWNER_ANNOTATION):
        return ServiceState(PENDING, "NotSeen", "no lbctl operator has taken it up yet",
                            "check that the operator runs and handles this class (`lbctl doctor`)")
    return ServiceState(PENDING, "Provisioning", "the operator is provisioning its balancer", "")


def state_counts(services: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for service in services:
        counts[service_state(service).state] += 1
    return counts


def event_time(event: Mapping[str, Any]) -> float:
    series = event.get("series") or {}
    for value in (series.get("lastObservedTime"), event.get("lastTimestamp"), event.get("eventTime"),
                  event.get("firstTimestamp"), meta(event).get("creationTimestamp")):
        stamp = parse_time(value)
        if stamp is not None:
            return stamp
    return 0.0


def events_by_object(events: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Service events by "namespace/name", oldest first."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        involved = event.get("involvedObject") or event.get("regarding") or {}
        if involved.get("kind") not in (None, "Service"):
            continue
        found.setdefault(model_meta.key(involved.get("namespace"), involved.get("name")), []).append(event)
    for items in found.values():
        items.sort(key=event_time)
    return found


@dataclass(frozen=True)
class LeaseView:
    holder: str
    renewed_age_s: float | None  # seconds since the last renewal, on the reader's clock
    duration_s: int
    fresh: bool


def lease_view(lease: Mapping[str, Any] | None, now: float, slack_s: float = 0.0) -> LeaseView | None:
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = int(spec.get("leaseDurationSeconds") or 0)
    age_s = None if renewed is None else now - renewed
    fresh = age_s is not None and age_s <= duration + slack_s and bool(spec.get("holderIdentity"))
    return LeaseView(str(spec.get("holderIdentity") or ""), age_s, duration, fresh)


def forwarder_leases(leases: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The forwarders' Leases (lbctl-forwarder-<node>) by node name."""
    return {str(meta(lease).get("name"))[len(FORWARDER_LEASE_PREFIX):]: lease for lease in leases
            if str(meta(lease).get("name", "")).startswith(FORWARDER_LEASE_PREFIX)}
