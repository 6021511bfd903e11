"""Plain data that flows from a Service to a provider and back (see the data flow in README)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lbctl.model.meta import key

EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        return key(self.namespace, self.name)


@dataclass(frozen=True)
class PortSpec:
    """One entry of spec.ports; node_port is None where none is allocated."""

    name: str
    protocol: str  # TCP, UDP or SCTP, as in the Service
    port: int
    node_port: int | None = None


@dataclass(frozen=True)
class NodeTarget:
    """An eligible node as a balancer sees it."""

    name: str
    provider_id: str = ""
    internal_ip: str | None = None
    zone: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY, compare=False, hash=False)


@dataclass(frozen=True)
class LoadBalancerSpec:
    """Everything a provider needs to converge one Service's balancer; built by lbctl.model.spec."""

    service: ServiceRef
    cluster_name: str
    name: str  # deterministic cloud name, see lbctl.model.names
    ports: tuple[PortSpec, ...]
    nodes: tuple[NodeTarget, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    external_traffic_policy: str = "Cluster"  # or "Local"
    health_check_node_port: int | None = None
    source_ranges: tuple[str, ...] = ()  # validated CIDRs; empty means everyone
    load_balancer_ip: str | None = None  # spec.loadBalancerIP, deprecated upstream but still used
    ip_families: tuple[str, ...] = ("IPv4",)
    ip_family_policy: str = "SingleStack"
    session_affinity: str = "None"
    selector: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    current_ingress: tuple[Ingress, ...] = ()  # what status.loadBalancer.ingress says now
    # the Service's labels (address pools select on them)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    created: str = ""  # metadata.creationTimestamp: older Services win conflicts on restore

    @property
    def ref(self) -> LoadBalancerRef:
        return LoadBalancerRef(
            name=self.name, cluster_name=self.cluster_name, namespace=self.service.namespace,
            service_name=self.service.name, uid=self.service.uid,
        )


@dataclass(frozen=True)
class PortStatus:
    port: int
    protocol: str
    error: str | None = None


@dataclass(frozen=True)
class Ingress:
    """One entry of status.loadBalancer.ingress."""

    ip: str | None = None
    hostname: str | None = None
    ip_mode: str | None = None  # "VIP" or "Proxy"
    ports: tuple[PortStatus, ...] = ()


@dataclass(frozen=True)
class LoadBalancerStatus:
    ingress: tuple[Ingress, ...]


@dataclass(frozen=True)
class LoadBalancerRef:
    """Identifies a balancer in the cloud; uid is None when the cloud does not record it."""

    name: str
    cluster_name: str
    namespace: str
    service_name: str
    uid: str | None = None

    @property
    def service_key(self) -> str:
        return key(self.namespace, self.service_name)
