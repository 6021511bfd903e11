"""Service (as the API returns it) + eligible nodes → LoadBalancerSpec (pure).

Validates what every provider relies on; provider-specific annotations are validated by the
provider's own plan module.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from lbctl.model.errors import InvalidServiceError
from lbctl.model.meta import SOURCE_RANGES_ANNOTATION
from lbctl.model.names import load_balancer_name
from lbctl.model.status import ingress_from_api
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, ServiceRef

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def service_ref(service: Mapping[str, Any]) -> ServiceRef:
    meta = service.get("metadata") or {}
    return ServiceRef(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""))


def source_ranges(service: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.loadBalancerSourceRanges, else the older annotation; each a normalised CIDR."""
    spec = service.get("spec") or {}
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    if spec.get("loadBalancerSourceRanges"):
        raw: list[str] = list(spec["loadBalancerSourceRanges"])
        field = "spec.loadBalancerSourceRanges"
    elif annotations.get(SOURCE_RANGES_ANNOTATION, "").strip():
        raw = [r.strip() for r in annotations[SOURCE_RANGES_ANNOTATION].split(",") if r.strip()]
        field = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
    else:
        return ()
    return tuple(str(n) for n in parse_cidrs(raw, field))


def parse_cidrs(texts: Iterable[str], field: str = "spec.loadBalancerSourceRanges") -> list[IPNetwork]:
    """Each text as a network (host bits allowed, as Go's ParseCIDR), duplicates dropped, order kept;
    InvalidServiceError naming `field[index]` for the first that is not a CIDR."""
    networks: list[IPNetwork] = []
    for index, text in enumerate(texts):
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise InvalidServiceError(
                f"{text!r} is not a CIDR", field=f"{field}[{index}]",
                fix="use CIDR notation such as 203.0.113.0/24 or 2001:db8::/64",
            ) from None
        if network not in networks:
            networks.append(network)
    return networks


def ports(service: Mapping[str, Any]) -> tuple[PortSpec, ...]:
    result = []
    for entry in (service.get("spec") or {}).get("ports") or ():
        result.append(
            PortSpec(
                name=entry.get("name") or "",
                protocol=entry.get("protocol") or "TCP",
                port=int(entry["port"]),
                node_port=entry.get("nodePort"),
            )
        )
    if not result:
        raise InvalidServiceError("a LoadBalancer Service needs at least one port", field="spec.ports",
                                  fix="add a port")
    return tuple(result)


def build_spec(service: Mapping[str, Any], nodes: tuple[NodeTarget, ...], cluster_name: str) -> LoadBalancerSpec:
    spec = service.get("spec") or {}
    meta = service.get("metadata") or {}
    ref = service_ref(service)
    status = (service.get("status") or {}).get("loadBalancer") or {}
    return LoadBalancerSpec(
        service=ref,
        cluster_name=cluster_name,
        name=load_balancer_name(ref.uid),
        ports=ports(service),
        nodes=nodes,
        annotations=MappingProxyType(dict(meta.get("annotations") or {})),
        external_traffic_policy=spec.get("externalTrafficPolicy") or "Cluster",
        health_check_node_port=spec.get("healthCheckNodePort"),
        source_ranges=source_ranges(service),
        load_balancer_ip=spec.get("loadBalancerIP") or None,
        ip_families=tuple(spec.get("ipFamilies") or ("IPv4",)),
        ip_family_policy=spec.get("ipFamilyPolicy") or "SingleStack",
        session_affinity=spec.get("sessionAffinity") or "None",
        selector=MappingProxyType(dict(spec.get("selector") or {})),
        current_ingress=ingress_from_api(status.get("ingress") or ()),
        labels=MappingProxyType(dict(meta.get("labels") or {})),
        created=meta.get("creationTimestamp") or "",
    )


def missing_node_ports(service: Mapping[str, Any]) -> list[int]:
    """Indexes of spec.ports without a nodePort."""
    return [i for i, p in enumerate((service.get("spec") or {}).get("ports") or ()) if not p.get("nodePort")]
