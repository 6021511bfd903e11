"""GCE passthrough load balancers, the pure part: read a LoadBalancerSpec into what GCE must hold
(validating every field first), and diff that against what GCE holds.

External (the default): a regional static address, a target pool of the node instances with a
legacy HTTP health check, one forwarding rule per protocol, and firewalls for clients and for the
health checkers. Internal (networking.gke.io/load-balancer-type: Internal): the same address and
firewalls, the nodes in one unmanaged instance group per zone (shared by the cluster's internal
balancers, as GCE lets a VM be load-balanced through one group only), one INTERNAL regional backend
service and forwarding rule per protocol, and a regional health check.

Ports and protocols: GCE keys forwarding rules on (address, protocol, ports), so each protocol gets
its own rule on the shared address and the same port number may appear with TCP and UDP in both
schemes. Target-pool rules take one contiguous port range (min..max of the Service's ports; the
firewall still admits only the listed ports); internal rules list up to five ports, beyond that
they take all ports (again narrowed by the firewall). SCTP is refused: internal backend services
cannot carry it and the firewall/health-check pairing of target pools is only defined here for
TCP and UDP.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from lbctl.model.errors import InvalidServiceError, NoEligibleNodesError, PendingError
from lbctl.model.spec import parse_cidrs
from lbctl.model.types import Ingress, LoadBalancerRef, LoadBalancerSpec, LoadBalancerStatus, NodeTarget, PortStatus
from providers import tags

LB_TYPE_ANNOTATION = "networking.gke.io/load-balancer-type"
LEGACY_LB_TYPE_ANNOTATION = "cloud.google.com/load-balancer-type"
NETWORK_TIER_ANNOTATION = "cloud.google.com/network-tier"

COMPUTE_URL = "https://www.googleapis.com/compute/v1/"
# kube-proxy's own health endpoint: what the shared node health check probes (as upstream does).
NODE_HEALTH_CHECK_PORT = 10256
HEALTH_CHECK_PATH = "/healthz"
# Where Google's health checkers come from (legacy target-pool checks and regional checks).
HEALTH_CHECK_SOURCE_RANGES = ("130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22", "35.191.0.0/16")
# Where they probe IPv6 backends of internal passthrough balancers from.
HEALTH_CHECK_SOURCE_RANGES_V6 = ("2600:2d00:1:b029::/64",)
IPV4, IPV6 = "IPv4", "IPv6"
IPV6_SUFFIX = "-ipv6"  # IPv6 pieces are named like the IPv4 ones plus this, as ingress-gce's L4 namer does
CHECK_INTERVAL_S = 8
CHECK_TIMEOUT_S = 1
HEALTHY_THRESHOLD = 1
UNHEALTHY_THRESHOLD = 3
MAX_RULE_PORTS = 5  # an internal forwarding rule lists at most five ports
PROTOCOLS = ("TCP", "UDP")

# Description keys: how list_owned and orphan GC recognise what lbctl made.
CLUSTER_KEY_PREFIX = tags.CLUSTER_PREFIX  # the key names the cluster, its value is "owned"
KEY_SERVICE = tags.SERVICE_NAME
KEY_UID = "kubernetes.io/service-uid"
KEY_BALANCER = tags.BALANCER
KEY_SHARED = "lbctl.io/shared"

_NAME_OK = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class Scheme(StrEnum):
    EXTERNAL = "EXTERNAL"
    INTERNAL = "INTERNAL"


class Tier(StrEnum):
    PREMIUM = "PREMIUM"
    STANDARD = "STANDARD"


class Change(StrEnum):
    NONE = "none"
    CREATE = "create"
    PATCH = "patch"
    RECREATE = "recreate"


# ---------------------------------------------------------------------------------------------
# Provider configuration


@dataclass(frozen=True)
class GceConfig:
    cluster_name: str
    project: str
    region: str
    network: str = "default"
    subnetwork: str = ""  # empty: an auto-mode network's subnetwork, named like the network
    node_tags: tuple[str, ...] = ()  # empty: the node instances' own network tags

    @property
    def network_url(self) -> str:
        if "/" in self.network:
            return self.network if self.network.startswith("https://") else COMPUTE_URL + self.network
        return f"{COMPUTE_URL}projects/{self.project}/global/networks/{self.network}"

    @property
    def subnetwork_url(self) -> str:
        sub = self.subnetwork or self.network.rsplit("/", 1)[-1]
        if "/" in sub:
            return sub if sub.startswith("https://") else COMPUTE_URL + sub
        return f"{COMPUTE_URL}projects/{self.project}/regions/{self.region}/subnetworks/{sub}"

    def regional_url(self, collection: str, name: str) -> str:
        return f"{COMPUTE_URL}projects/{self.project}/regions/{self.region}/{collection}/{name}"

    def global_url(self, collection: str, name: str) -> str:
        return f"{COMPUTE_URL}projects/{self.project}/global/{collection}/{name}"

    def zonal_url(self, zone: str, collection: str, name: str) -> str:
        return f"{COMPUTE_URL}projects/{self.project}/zones/{zone}/{collection}/{name}"

    @property
    def cluster_token(self) -> str:
        """The cluster name as a GCE name part: kept as is when already valid and short, else a
        readable prefix plus a hash so two clusters never share a name."""
        name = self.cluster_name.lower()
        if _NAME_OK.match(name) and len(name) <= 30:
            return name
        cleaned = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")[:20].strip("-") or "c"
        digest = hashlib.sha256(self.cluster_name.encode()).hexdigest()[:8]
        return f"{cleaned}-{digest}"

    @property
    def shared_health_check_name(self) -> str:
        return f"k8s-{self.cluster_token}-node"

    @property
    def instance_group_name(self) -> str:
        return f"k8s-ig--{self.cluster_token}"


def read_config(cluster_name: str, options: Mapping[str, str]) -> GceConfig:
    """Provider options (keys with '-' or '_'); ValueError names a missing or bad one."""
    opts = {key.replace("-", "_"): value.strip() for key, value in options.items()}
    missing = [key for key in ("project", "region") if not opts.get(key)]
    if missing:
        raise ValueError(f"gce provider needs the option(s) {', '.join(missing)}")
    if not cluster_name:
        raise ValueError("gce provider needs a cluster name")
    tags = tuple(tag.strip() for tag in opts.get("node_tags", "").split(",") if tag.strip())
    bad = [tag for tag in tags if not _NAME_OK.match(tag)]
    if bad:
        raise ValueError(f"gce option node-tags: {', '.join(bad)} are not valid network tags")
    return GceConfig(
        cluster_name=cluster_name, project=opts["project"], region=opts["region"],
        network=opts.get("network") or "default", subnetwork=opts.get("subnetwork", ""), node_tags=tags,
    )


# ---------------------------------------------------------------------------------------------
# Ownership descriptions


def describe_owner(config: GceConfig, spec: LoadBalancerSpec) -> str:
    """The tags every lbctl resource carries, as JSON: GCE descriptions stand in for labels,
    which cannot hold these keys."""
    return json.dumps({
        CLUSTER_KEY_PREFIX + config.cluster_name: "owned", KEY_SERVICE: spec.service.key, KEY_UID: spec.service.uid,
        KEY_BALANCER: spec.name,
    }, sort_keys=True)


def describe_shared(config: GceConfig, what: str) -> str:
    """Cluster-wide pieces (node health check, instance groups): no Service owns them."""
    return json.dumps({CLUSTER_KEY_PREFIX + config.cluster_name: "owned", KEY_SHARED: what}, sort_keys=True)


def owner_of(description: str, cluster_name: str) -> LoadBalancerRef | None:
    """The balancer a resource belongs to, when its description says lbctl made it for a
    Service of this cluster; None for anything else (shared pieces, other clusters, users')."""
    try:
        data = json.loads(description)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get(CLUSTER_KEY_PREFIX + cluster_name) != "owned":
        return None
    service, name, uid = data.get(KEY_SERVICE), data.get(KEY_BALANCER), data.get(KEY_UID)
    if not (isinstance(service, str) and "/" in service and isinstance(name, str) and name):
        return None
    namespace, _, service_name = service.partition("/")
    return LoadBalancerRef(
        name=name, cluster_name=cluster_name, namespace=namespace, service_name=service_name,
        uid=uid if isinstance(uid, str) else None,
    )


def owned_by(description: str, cluster_name: str, balancer: str) -> bool:
    owner = owner_of(description, cluster_name)
    return owner is not None and owner.name == balancer


# ---------------------------------------------------------------------------------------------
# Names of one balancer's resources


@dataclass(frozen=True)
class Names:
    balancer: str

    @property
    def address(self) -> str:
        return self.balancer

    @property
    def target_pool(self) -> str:
        return self.balancer

    @property
    def own_health_check(self) -> str:
        return self.balancer

    @property
    def firewall(self) -> str:
        return f"k8s-fw-{self.balancer}"

    @property
    def own_health_check_firewall(self) -> str:
        return f"k8s-{self.balancer}-http-hc"

    def rule(self, protocol: str) -> str:
        return f"{self.balancer}-{protocol.lower()}"

    def backend_service(self, protocol: str) -> str:
        return f"{self.balancer}-{protocol.lower()}"

    @property
    def address_v6(self) -> str:
        return self.address + IPV6_SUFFIX

    @property
    def firewall_v6(self) -> str:
        return self.firewall + IPV6_SUFFIX

    @property
    def own_health_check_firewall_v6(self) -> str:
        return self.own_health_check_firewall + IPV6_SUFFIX

    def rule_v6(self, protocol: str) -> str:
        return self.rule(protocol) + IPV6_SUFFIX

    def firewall_of(self, family: str) -> str:
        return self.firewall_v6 if family == IPV6 else self.firewall


def health_check_firewall_name(health_check_name: str, family: str = IPV4) -> str:
    base = health_check_name if health_check_name.startswith("k8s-") else f"k8s-{health_check_name}"
    return f"{base}-http-hc" + (IPV6_SUFFIX if family == IPV6 else "")


# ---------------------------------------------------------------------------------------------
# Reading and validating the Service


@dataclass(frozen=True)
class InstanceRef:
    project: str
    zone: str
    name: str
    node: str  # the Kubernetes node name, for messages

    @property
    def url(self) -> str:
        return f"{COMPUTE_URL}projects/{self.project}/zones/{self.zone}/instances/{self.name}"


@dataclass(frozen=True)
class HealthCheckIntent:
    name: str
    port: int
    path: str
    shared: bool


@dataclass(frozen=True)
class Intent:
    """A validated Service, in GCE's terms."""

    name: str
    description: str
    scheme: Scheme
    tier: Tier
    ports: tuple[tuple[str, tuple[int, ...]], ...]  # (protocol, sorted ports), protocols sorted
    source_ranges: tuple[str, ...]
    requested_ip: str | None
    health_check: HealthCheckIntent
    session_affinity: str  # NONE or CLIENT_IP
    instances: tuple[InstanceRef, ...]
    status_ports: tuple[PortStatus, ...]
    # The families the balancer serves, in spec.ipFamilies order (status lists addresses so).
    families: tuple[str, ...] = (IPV4,)
    source_ranges_v6: tuple[str, ...] = ()

    @property
    def names(self) -> Names:
        return Names(self.name)

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(protocol for protocol, _ in self.ports)

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(sorted({instance.zone for instance in self.instances}))

    @property
    def ipv4(self) -> bool:
        return IPV4 in self.families

    @property
    def ipv6(self) -> bool:
        return IPV6 in self.families

    def ranges(self, family: str) -> tuple[str, ...]:
        """Who may reach the balancer over `family`; empty: nobody (no firewall is made)."""
        return self.source_ranges_v6 if family == IPV6 else self.source_ranges


def annotation_field(key: str) -> str:
    return f"metadata.annotations[{key}]"


def read_scheme(annotations: Mapping[str, str]) -> Scheme:
    for key in (LB_TYPE_ANNOTATION, LEGACY_LB_TYPE_ANNOTATION):
        value = annotations.get(key)
        if value is None:
            continue
        if value.strip().lower() == "internal":
            return Scheme.INTERNAL
        if value.strip().lower() == "external":
            return Scheme.EXTERNAL
        raise InvalidServiceError(
            f"unknown load balancer type {value!r}", field=annotation_field(key),
            fix="use Internal, External, or remove the annotation",
        )
    return Scheme.EXTERNAL


def read_tier(annotations: Mapping[str, str], scheme: Scheme) -> Tier:
    value = annotations.get(NETWORK_TIER_ANNOTATION)
    if value is None:
        return Tier.PREMIUM
    try:
        tier = Tier(value.strip().upper())
    except ValueError:
        raise InvalidServiceError(
            f"unknown network tier {value!r}", field=annotation_field(NETWORK_TIER_ANNOTATION),
            fix="use Premium or Standard",
        ) from None
    if scheme is Scheme.INTERNAL and tier is not Tier.PREMIUM:
        raise InvalidServiceError(
            "internal load balancers only exist in the Premium tier",
            field=annotation_field(NETWORK_TIER_ANNOTATION), fix="remove the annotation or set it to Premium",
        )
    return tier


def read_ports(spec: LoadBalancerSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not spec.ports:
        raise InvalidServiceError("a LoadBalancer Service needs at least one port", field="spec.ports",
                                  fix="add a port")
    by_protocol: dict[str, set[int]] = {}
    for index, port in enumerate(spec.ports):
        protocol = port.protocol.upper()
        if protocol not in PROTOCOLS:
            raise InvalidServiceError(
                f"protocol {port.protocol} is not supported by GCE passthrough load balancers here",
                field=f"spec.ports[{index}].protocol", fix="use TCP or UDP",
            )
        if not 1 <= port.port <= 65535:
            raise InvalidServiceError(f"port {port.port} is out of range", field=f"spec.ports[{index}].port",
                                      fix="use a port between 1 and 65535")
        by_protocol.setdefault(protocol, set()).add(port.port)
    return tuple((protocol, tuple(sorted(ports))) for protocol, ports in sorted(by_protocol.items()))


def read_source_ranges(ranges: Iterable[str], service_families: tuple[str, ...]) -> tuple[tuple[str, ...],
                                                                                   tuple[str, ...]]:
    """(IPv4 ranges, IPv6 ranges); everyone of both families when none are given. A range of a
    family the Service does not have could never match and is refused. When ranges are given and
    none is of one family, that family admits nobody (no firewall is made for it)."""
    texts = list(ranges)
    networks = parse_cidrs(texts)
    for index, text in enumerate(texts):
        version = ipaddress.ip_network(text.strip(), strict=False).version
        family = IPV6 if version == 6 else IPV4
        if family not in service_families:
            raise InvalidServiceError(
                f"{text.strip()} is an {family} range but the Service is {'/'.join(service_families)} only",
                field=f"spec.loadBalancerSourceRanges[{index}]",
                fix=f"remove the {family} ranges, or add {family} to spec.ipFamilies "
                    "(ipFamilyPolicy PreferDualStack or RequireDualStack)",
            )
    if not networks:
        return ("0.0.0.0/0",), ("::/0",)
    return (tuple(sorted(str(n) for n in networks if n.version == 4)),
            tuple(sorted(str(n) for n in networks if n.version == 6)))


def read_requested_ip(value: str | None) -> str | None:
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidServiceError(f"{value!r} is not an IP address", field="spec.loadBalancerIP",
                                  fix="write an IPv4 address reserved in the project, or remove it") from None
    if address.version != 4:
        raise InvalidServiceError(f"{value} is IPv6; spec.loadBalancerIP names the IPv4 address only",
                                  field="spec.loadBalancerIP",
                                  fix="use a reserved IPv4 address (the IPv6 one is reserved by lbctl)")
    return str(address)


def service_families(spec: LoadBalancerSpec) -> tuple[str, ...]:
    families = tuple(spec.ip_families) or (IPV4,)
    if any(f not in (IPV4, IPV6) for f in families) or len(set(families)) != len(families):
        raise InvalidServiceError(f"{', '.join(families)} are not IP families", field="spec.ipFamilies",
                                  fix="list IPv4, IPv6 or both, each once")
    return families


def read_families(spec: LoadBalancerSpec, scheme: Scheme, protocols: tuple[str, ...]) -> tuple[str, ...]:
    """The families the balancer serves. IPv6 needs an internal (backend service) balancer with one
    protocol: target pools carry IPv4 only, and lbctl does not share an internal IPv6 address between
    a TCP and a UDP rule. Where IPv6 cannot be had, PreferDualStack settles for IPv4; RequireDualStack and
    IPv6-only Services are refused, naming the field."""
    families = service_families(spec)
    if IPV6 not in families:
        return families
    problem = fix = None
    if scheme is Scheme.EXTERNAL:
        problem = "an external passthrough balancer made of a target pool carries IPv4 only"
        fix = (f"set {LB_TYPE_ANNOTATION}: Internal for an IPv6 forwarding rule (backend service based), "
               "or ask for IPv4 (ipFamilyPolicy SingleStack with IPv4, or PreferDualStack)")
    elif len(protocols) > 1:
        # lbctl makes one rule per protocol; it does not share an internal IPv6 address between two
        # rules (the IPv4 side does, with purpose SHARED_LOADBALANCER_VIP).
        problem = "lbctl does not put a TCP and a UDP forwarding rule on one internal IPv6 address"
        fix = "serve TCP and UDP from two Services, or ask for IPv4 (PreferDualStack settles for it)"
    if problem is None:
        return families
    if spec.ip_family_policy == "PreferDualStack" and IPV4 in families:
        return (IPV4,)
    field = "spec.ipFamilyPolicy" if spec.ip_family_policy == "RequireDualStack" else "spec.ipFamilies"
    raise InvalidServiceError(f"IPv6 was asked for, but {problem}", field=field, fix=fix)


def read_session_affinity(value: str) -> str:
    if value in ("", "None"):
        return "NONE"
    if value == "ClientIP":
        return "CLIENT_IP"
    raise InvalidServiceError(f"unknown session affinity {value!r}", field="spec.sessionAffinity",
                              fix="use None or ClientIP")


def parse_provider_id(node: NodeTarget, config: GceConfig) -> InstanceRef:
    """`gce://<project>/<zone>/<instance>`, in the provider's project and region."""
    where = f"nodes[{node.name}].spec.providerID"
    if not node.provider_id:
        raise InvalidServiceError(f"node {node.name} has no providerID, so its instance is unknown", field=where,
                                  fix="run the node with the GCE cloud provider (kubelet --provider-id)")
    match = re.fullmatch(r"gce://([^/]+)/([^/]+)/([^/]+)", node.provider_id)
    if match is None:
        raise InvalidServiceError(
            f"node {node.name} has providerID {node.provider_id!r}, not a GCE instance", field=where,
            fix="fix its providerID, or exclude the node "
                "(label node.kubernetes.io/exclude-from-external-load-balancers)",
        )
    project, zone, name = match.groups()
    if project != config.project:
        raise InvalidServiceError(
            f"node {node.name} is in project {project}, the balancer in {config.project}", field=where,
            fix="set the gce project option to the nodes' project",
        )
    if not zone.startswith(config.region + "-"):
        raise InvalidServiceError(
            f"node {node.name} is in zone {zone}, outside region {config.region}", field=where,
            fix="set the gce region option to the nodes' region, or exclude the node",
        )
    return InstanceRef(project=project, zone=zone, name=name, node=node.name)


def read_health_check(spec: LoadBalancerSpec, config: GceConfig) -> HealthCheckIntent:
    if spec.external_traffic_policy == "Local":
        port = spec.health_check_node_port
        if port is None or not 1 <= port <= 65535:
            raise InvalidServiceError(
                "externalTrafficPolicy Local needs a health check node port", field="spec.healthCheckNodePort",
                fix="let Kubernetes allocate it (leave it unset) or set a valid port",
            )
        return HealthCheckIntent(name=spec.name, port=port, path=HEALTH_CHECK_PATH, shared=False)
    return HealthCheckIntent(name=config.shared_health_check_name, port=NODE_HEALTH_CHECK_PORT,
                             path=HEALTH_CHECK_PATH, shared=True)


def read_intent(spec: LoadBalancerSpec, config: GceConfig) -> Intent:
    """Everything the Service asks for, checked before any cloud call."""
    if not _NAME_OK.match(spec.name) or len(spec.name) > 40:
        raise ValueError(f"balancer name {spec.name!r} is not a valid GCE name part")
    scheme = read_scheme(spec.annotations)
    tier = read_tier(spec.annotations, scheme)
    ports = read_ports(spec)
    families = read_families(spec, scheme, tuple(protocol for protocol, _ in ports))
    source_ranges, source_ranges_v6 = read_source_ranges(spec.source_ranges, service_families(spec))
    requested_ip = read_requested_ip(spec.load_balancer_ip)
    if requested_ip is not None and IPV4 not in families:
        raise InvalidServiceError("spec.loadBalancerIP names an IPv4 address but the balancer is IPv6 only",
                                  field="spec.loadBalancerIP", fix="remove it, or add IPv4 to spec.ipFamilies")
    affinity = read_session_affinity(spec.session_affinity)
    health_check = read_health_check(spec, config)
    instances = tuple(sorted({parse_provider_id(node, config) for node in spec.nodes},
                             key=lambda ref: (ref.zone, ref.name)))
    if not instances:
        raise NoEligibleNodesError("no eligible nodes to send traffic to",
                                   fix="make a Ready node available to load balancers")
    status_ports = tuple(PortStatus(port=port.port, protocol=port.protocol.upper()) for port in spec.ports)
    return Intent(
        name=spec.name, description=describe_owner(config, spec), scheme=scheme, tier=tier, ports=ports,
        source_ranges=source_ranges, requested_ip=requested_ip, health_check=health_check,
        session_affinity=affinity, instances=instances, status_ports=status_ports,
        families=families, source_ranges_v6=source_ranges_v6 if IPV6 in families else (),
    )


def status_for(intent: Intent, ip: str | None, ip_v6: str | None = None) -> LoadBalancerStatus:
    """One ingress entry per family the balancer serves, in spec.ipFamilies order."""
    by_family = {IPV4: ip, IPV6: ip_v6}
    return LoadBalancerStatus(ingress=tuple(
        Ingress(ip=by_family[family], ports=intent.status_ports) for family in intent.families if by_family[family]))


# ---------------------------------------------------------------------------------------------
# What GCE holds (plain values the adapter reads out of the SDK's messages)


@dataclass(frozen=True)
class ObservedAddress:
    name: str
    ip: str
    address_type: str  # EXTERNAL or INTERNAL
    tier: str
    purpose: str
    description: str
    users: tuple[str, ...] = ()
    ip_version: str = ""  # IPV6 for IPv6 addresses; "" or IPV4 otherwise


@dataclass(frozen=True)
class ObservedInstance:
    url: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class FirewallState:
    name: str
    source_ranges: frozenset[str]
    allowed: frozenset[tuple[str, frozenset[str]]]  # (lower-case protocol, ports)
    target_tags: frozenset[str]
    network: str


@dataclass(frozen=True)
class HealthCheckState:
    name: str
    port: int
    path: str
    interval_s: int = CHECK_INTERVAL_S
    timeout_s: int = CHECK_TIMEOUT_S
    healthy: int = HEALTHY_THRESHOLD
    unhealthy: int = UNHEALTHY_THRESHOLD


@dataclass(frozen=True)
class PoolState:
    name: str
    instances: frozenset[str]
    health_checks: tuple[str, ...]
    session_affinity: str


@dataclass(frozen=True)
class RuleState:
    name: str
    ip: str
    protocol: str
    scheme: str
    port_range: str = ""  # "a-b" (external)
    ports: frozenset[str] = frozenset()  # internal
    all_ports: bool = False
    target: str = ""  # target pool URL (external)
    backend_service: str = ""  # backend service URL (internal)
    tier: str = ""
    ip_version: str = ""  # IPV6 for IPv6 rules


@dataclass(frozen=True)
class BackendServiceState:
    name: str
    protocol: str
    groups: frozenset[str]
    health_checks: tuple[str, ...]
    session_affinity: str


@dataclass(frozen=True)
class GroupState:
    zone: str
    name: str
    members: frozenset[str] = field(default_factory=frozenset)


# ---------------------------------------------------------------------------------------------
# What GCE should hold


def firewall_for(intent: Intent, config: GceConfig, target_tags: tuple[str, ...],
                 family: str = IPV4) -> FirewallState:
    """Clients of one family (a GCE firewall holds ranges of one family only)."""
    allowed = frozenset((protocol.lower(), frozenset(str(port) for port in ports)) for protocol, ports in intent.ports)
    return FirewallState(name=intent.names.firewall_of(family), source_ranges=frozenset(intent.ranges(family)),
                         allowed=allowed, target_tags=frozenset(target_tags), network=config.network_url)


def health_check_firewall_for(intent: Intent, config: GceConfig, target_tags: tuple[str, ...],
                              family: str = IPV4) -> FirewallState:
    check = intent.health_check
    ranges = HEALTH_CHECK_SOURCE_RANGES_V6 if family == IPV6 else HEALTH_CHECK_SOURCE_RANGES
    return FirewallState(
        name=health_check_firewall_name(check.name, family), source_ranges=frozenset(ranges),
        allowed=frozenset({("tcp", frozenset({str(check.port)}))}), target_tags=frozenset(target_tags),
        network=config.network_url,
    )


def health_check_for(intent: Intent) -> HealthCheckState:
    return HealthCheckState(name=intent.health_check.name, port=intent.health_check.port, path=intent.health_check.path)


def pool_for(intent: Intent, health_check_url: str) -> PoolState:
    return PoolState(name=intent.names.target_pool, instances=frozenset(ref.url for ref in intent.instances),
                     health_checks=(health_check_url,), session_affinity=intent.session_affinity)


def group_members(intent: Intent) -> dict[str, frozenset[str]]:
    zones: dict[str, set[str]] = {}
    for ref in intent.instances:
        zones.setdefault(ref.zone, set()).add(ref.url)
    return {zone: frozenset(urls) for zone, urls in zones.items()}


def backend_services_for(intent: Intent, config: GceConfig, health_check_url: str) -> tuple[BackendServiceState, ...]:
    groups = frozenset(config.zonal_url(zone, "instanceGroups", config.instance_group_name) for zone in intent.zones)
    return tuple(
        BackendServiceState(name=intent.names.backend_service(protocol), protocol=protocol, groups=groups,
                            health_checks=(health_check_url,), session_affinity=intent.session_affinity)
        for protocol in intent.protocols
    )


def rules_for(intent: Intent, config: GceConfig, ip: str | None, ip_v6: str | None = None) -> tuple[RuleState, ...]:
    """The forwarding rules of each family the balancer serves (None: that family has no address)."""
    rules = list(_rules_v4(intent, config, ip)) if intent.ipv4 and ip else []
    if intent.ipv6 and ip_v6:
        for protocol, ports in intent.ports:  # internal only: read_families refuses the rest
            listed = len(ports) <= MAX_RULE_PORTS
            rules.append(RuleState(
                name=intent.names.rule_v6(protocol), ip=ip_v6, protocol=protocol, scheme=Scheme.INTERNAL,
                ports=frozenset(str(port) for port in ports) if listed else frozenset(), all_ports=not listed,
                backend_service=config.regional_url("backendServices", intent.names.backend_service(protocol)),
                tier=Tier.PREMIUM, ip_version="IPV6",
            ))
    return tuple(rules)


def _rules_v4(intent: Intent, config: GceConfig, ip: str) -> tuple[RuleState, ...]:
    rules = []
    for protocol, ports in intent.ports:
        name = intent.names.rule(protocol)
        if intent.scheme is Scheme.EXTERNAL:
            rules.append(RuleState(
                name=name, ip=ip, protocol=protocol, scheme=Scheme.EXTERNAL, port_range=f"{ports[0]}-{ports[-1]}",
                target=config.regional_url("targetPools", intent.names.target_pool), tier=intent.tier,
            ))
        else:
            listed = len(ports) <= MAX_RULE_PORTS
            rules.append(RuleState(
                name=name, ip=ip, protocol=protocol, scheme=Scheme.INTERNAL,
                ports=frozenset(str(port) for port in ports) if listed else frozenset(), all_ports=not listed,
                backend_service=config.regional_url("backendServices", intent.names.backend_service(protocol)),
                tier=Tier.PREMIUM,
            ))
    return tuple(rules)


# ---------------------------------------------------------------------------------------------
# Diffs


def firewall_change(desired: FirewallState, observed: FirewallState | None) -> Change:
    if observed is None:
        return Change.CREATE
    if not same_resource(desired.network, observed.network):
        return Change.RECREATE  # a firewall cannot move to another network
    same = (desired.source_ranges == observed.source_ranges and desired.allowed == observed.allowed
            and desired.target_tags == observed.target_tags)
    return Change.NONE if same else Change.PATCH


def health_check_change(desired: HealthCheckState, observed: HealthCheckState | None) -> Change:
    if observed is None:
        return Change.CREATE
    return Change.NONE if desired == observed else Change.PATCH


@dataclass(frozen=True)
class PoolChange:
    change: Change
    add: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()
    health_checks_remove: tuple[str, ...] = ()
    health_checks_add: tuple[str, ...] = ()


def pool_change(desired: PoolState, observed: PoolState | None) -> PoolChange:
    """Members move one add/remove call at a time; session affinity cannot change in place."""
    if observed is None:
        return PoolChange(Change.CREATE)
    if desired.session_affinity != observed.session_affinity:
        return PoolChange(Change.RECREATE)
    add = frozenset(url for url in desired.instances if not _contains(observed.instances, url))
    remove = frozenset(url for url in observed.instances if not _contains(desired.instances, url))
    wanted = set(desired.health_checks)
    have = list(observed.health_checks)
    drop = tuple(url for url in have if not any(same_resource(url, want) for want in wanted))
    attach = tuple(url for url in desired.health_checks if not any(same_resource(url, h) for h in have))
    if add or remove or drop or attach:
        return PoolChange(Change.PATCH, add=add, remove=remove, health_checks_remove=drop, health_checks_add=attach)
    return PoolChange(Change.NONE)


def rule_change(desired: RuleState, observed: RuleState | None) -> Change:
    """Forwarding rules cannot change address, protocol, ports or scheme in place."""
    if observed is None:
        return Change.CREATE
    same = (
        observed.ip == desired.ip and observed.protocol == desired.protocol and observed.scheme == desired.scheme
        and _normal_range(observed.port_range) == _normal_range(desired.port_range)
        and observed.ports == desired.ports and observed.all_ports == desired.all_ports
        and same_resource(observed.target, desired.target)
        and same_resource(observed.backend_service, desired.backend_service)
        and (observed.tier or Tier.PREMIUM) == (desired.tier or Tier.PREMIUM)
        and (observed.ip_version or "IPV4") == (desired.ip_version or "IPV4")
    )
    return Change.NONE if same else Change.RECREATE


def backend_service_change(desired: BackendServiceState, observed: BackendServiceState | None) -> Change:
    if observed is None:
        return Change.CREATE
    same = (
        observed.protocol == desired.protocol and _same_set(observed.groups, desired.groups)
        and observed.session_affinity == desired.session_affinity
        and len(observed.health_checks) == len(desired.health_checks)
        and all(same_resource(a, b) for a, b in zip(observed.health_checks, desired.health_checks, strict=True))
    )
    return Change.NONE if same else Change.PATCH


@dataclass(frozen=True)
class GroupChange:
    create: bool
    add: frozenset[str]
    remove: frozenset[str]


def group_change(desired: frozenset[str], observed: GroupState | None) -> GroupChange:
    if observed is None:
        return GroupChange(create=True, add=desired, remove=frozenset())
    return GroupChange(
        create=False,
        add=frozenset(url for url in desired if not _contains(observed.members, url)),
        remove=frozenset(url for url in observed.members if not _contains(desired, url)),
    )


# ---------------------------------------------------------------------------------------------
# The address


@dataclass(frozen=True)
class AddressPlan:
    """Which address the rules use. `ip` is None when one must be reserved first (`reserve`).
    `release_own_first`: our address has the wrong type or tier: its rules and it go before a new
    one is reserved. `release_own_after`: the Service moved to an address of the user's; ours goes
    once no rule uses it."""

    ip: str | None
    reserve: bool = False
    release_own_first: bool = False
    release_own_after: bool = False
    user_owned: bool = False


def _address_fits(address: ObservedAddress, intent: Intent) -> bool:
    if intent.scheme is Scheme.INTERNAL:
        return address.address_type == "INTERNAL"
    return address.address_type in ("EXTERNAL", "") and (address.tier or Tier.PREMIUM) == intent.tier


def plan_address(
    intent: Intent, config: GceConfig, own: ObservedAddress | None, requested: ObservedAddress | None,
    rule_urls: Iterable[str],
) -> AddressPlan:
    """`own`: the address named after the balancer, if any; `requested`: the reserved address
    holding spec.loadBalancerIP, if it was asked for and exists; `rule_urls`: our rules' URLs."""
    own_is_ours = own is not None and owned_by(own.description, config.cluster_name, intent.name)
    if intent.requested_ip is not None:
        if requested is None:
            raise InvalidServiceError(
                f"{intent.requested_ip} is not a static address reserved in project {config.project}, "
                f"region {config.region}", field="spec.loadBalancerIP",
                fix=f"reserve it (gcloud compute addresses create NAME --region {config.region} "
                    f"--addresses {intent.requested_ip}) or remove spec.loadBalancerIP",
            )
        if own is not None and own_is_ours and requested.name == own.name:
            return _plan_own(intent, own)  # the address lbctl reserved earlier, asked for by IP
        wanted_type = "INTERNAL" if intent.scheme is Scheme.INTERNAL else "EXTERNAL"
        if (requested.address_type or "EXTERNAL") != wanted_type:
            raise InvalidServiceError(
                f"{intent.requested_ip} is an {requested.address_type.lower()} address but the balancer is "
                f"{wanted_type.lower()}", field="spec.loadBalancerIP",
                fix=f"reserve an {wanted_type.lower()} address, or change {LB_TYPE_ANNOTATION}",
            )
        if intent.scheme is Scheme.EXTERNAL and (requested.tier or Tier.PREMIUM) != intent.tier:
            raise InvalidServiceError(
                f"{intent.requested_ip} is a {requested.tier.title()} tier address but the Service asks for "
                f"{intent.tier.title()}", field=annotation_field(NETWORK_TIER_ANNOTATION),
                fix=f"set the annotation to {requested.tier.title()} or reserve a {intent.tier.title()} address",
            )
        if (intent.scheme is Scheme.INTERNAL and len(intent.ports) > 1
                and requested.purpose != "SHARED_LOADBALANCER_VIP"):
            raise InvalidServiceError(
                f"{intent.requested_ip} carries TCP and UDP rules, which GCE lets share an internal address only "
                "when it is reserved for sharing", field="spec.loadBalancerIP",
                fix="reserve it with --purpose SHARED_LOADBALANCER_VIP, or use one protocol",
            )
        ours = list(rule_urls)
        strangers = [user for user in requested.users if not any(same_resource(user, url) for url in ours)]
        if strangers:
            raise PendingError(
                f"{intent.requested_ip} is in use by {', '.join(strangers)}", field="spec.loadBalancerIP",
                fix="free the address or ask for another one",
            )
        return AddressPlan(ip=requested.ip, release_own_after=own_is_ours, user_owned=True)
    if own is None:
        return AddressPlan(ip=None, reserve=True)
    if not own_is_ours:
        raise PendingError(
            f"an address named {own.name} exists but lbctl did not make it for this Service",
            field="spec.loadBalancerIP", fix=f"delete or rename address {own.name} in region {config.region}",
        )
    return _plan_own(intent, own)


def _plan_own(intent: Intent, own: ObservedAddress) -> AddressPlan:
    if _address_fits(own, intent):
        return AddressPlan(ip=own.ip)
    return AddressPlan(ip=None, reserve=True, release_own_first=True)


def plan_address_v6(intent: Intent, config: GceConfig, own: ObservedAddress | None) -> AddressPlan:
    """The internal IPv6 address lbctl reserves for the balancer (named `<name>-ipv6`)."""
    if own is None:
        return AddressPlan(ip=None, reserve=True)
    if not owned_by(own.description, config.cluster_name, intent.name):
        raise PendingError(
            f"an address named {own.name} exists but lbctl did not make it for this Service",
            field="spec.ipFamilies", fix=f"delete or rename address {own.name} in region {config.region}",
        )
    if own.ip_version == "IPV6" and own.address_type == "INTERNAL":
        return AddressPlan(ip=bare_ip(own.ip))
    return AddressPlan(ip=None, reserve=True, release_own_first=True)


@dataclass(frozen=True)
class SubnetworkState:
    name: str
    stack_type: str  # IPV4_ONLY, IPV4_IPV6 or IPV6_ONLY
    ipv6_access_type: str  # INTERNAL or EXTERNAL when it has IPv6


def check_subnetwork_for_ipv6(intent: Intent, config: GceConfig, subnetwork: SubnetworkState | None) -> None:
    """An internal IPv6 forwarding rule needs a subnetwork with internal IPv6 (ULA) addresses."""
    where = config.subnetwork_url
    field = "spec.ipFamilyPolicy" if IPV4 in intent.families else "spec.ipFamilies"
    if subnetwork is None:
        raise InvalidServiceError(
            f"IPv6 was asked for, but subnetwork {last_segment(where)} was not found in region {config.region}",
            field=field, fix="set the gce subnetwork option to the nodes' dual-stack subnetwork, or ask for IPv4",
        )
    if subnetwork.stack_type not in ("IPV4_IPV6", "IPV6_ONLY") or subnetwork.ipv6_access_type != "INTERNAL":
        have = subnetwork.stack_type or "IPV4_ONLY"
        if subnetwork.stack_type in ("IPV4_IPV6", "IPV6_ONLY"):
            have += f" with {subnetwork.ipv6_access_type or 'no'} IPv6 access"
        raise InvalidServiceError(
            f"IPv6 was asked for, but subnetwork {subnetwork.name} is {have}; an internal IPv6 forwarding rule "
            "needs internal IPv6 addresses",
            field=field,
            fix=f"gcloud compute networks subnets update {subnetwork.name} --region {config.region} "
                "--stack-type IPV4_IPV6 --ipv6-access-type INTERNAL (its network needs ULA internal IPv6), "
                "or ask for IPv4 (SingleStack IPv4 or PreferDualStack)",
        )


def bare_ip(text: str) -> str:
    """An address as GCE reports it, without the /96 an IPv6 forwarding rule may carry, compressed."""
    value = text.split("/", 1)[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def target_tags(intent: Intent, config: GceConfig, instances: Mapping[str, ObservedInstance]) -> tuple[str, ...]:
    """The network tags the firewalls open to: the configured ones, else every node's own tags.
    `instances` maps instance URL to what GCE holds; a missing node is worth waiting for."""
    missing = [ref for ref in intent.instances if ref.url not in instances]
    if missing:
        names = ", ".join(f"{ref.node} ({ref.zone}/{ref.name})" for ref in missing)
        raise PendingError(f"node instance(s) not found in GCE: {names}",
                           fix="wait for the instances to exist, or fix the nodes' providerID")
    if config.node_tags:
        return tuple(sorted(config.node_tags))
    untagged = [ref for ref in intent.instances if not instances[ref.url].tags]
    if untagged:
        names = ", ".join(ref.node for ref in untagged)
        raise PendingError(f"node instance(s) {names} have no network tag, so no firewall rule can admit traffic",
                           fix="give the node instances a network tag, or set the gce node-tags option")
    return tuple(sorted({tag for ref in intent.instances for tag in instances[ref.url].tags}))


# ---------------------------------------------------------------------------------------------
# URL helpers


def resource_path(url: str) -> str:
    """`projects/...` part of a full or partial resource URL (GCE accepts either)."""
    index = url.find("projects/")
    return url[index:] if index >= 0 else url


def same_resource(a: str, b: str) -> bool:
    return resource_path(a) == resource_path(b)


def _contains(urls: Iterable[str], url: str) -> bool:
    path = resource_path(url)
    return any(resource_path(other) == path for other in urls)


def _same_set(a: Iterable[str], b: Iterable[str]) -> bool:
    return {resource_path(url) for url in a} == {resource_path(url) for url in b}


def _normal_range(port_range: str) -> str:
    if not port_range:
        return ""
    low, _, high = port_range.partition("-")
    return f"{int(low)}-{int(high or low)}"


def last_segment(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def zone_of(url: str) -> str:
    match = re.search(r"/zones/([^/]+)/", url)
    return match.group(1) if match else ""
