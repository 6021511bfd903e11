"""AWS NLB decisions (pure): read a LoadBalancerSpec and its annotations, validate them, build the
desired NLB (listeners, target groups, targets, security-group rules), and diff it against what
AWS reports. No SDK calls here; `providers.aws` gathers the observed state and executes `Changes`.

Layout in AWS for one Service:
  NLB `spec.name` ── listener per service port ──▶ target group per (nodePort, protocol) ──▶ instances
  security groups on the NLB: its own ("frontend": the source ranges on the listener ports) and the
  cluster's shared "backend" group, which each node security group admits with a single rule.

Why NLB security groups rather than per-port rules on the node security group: a security group
holds 60 rules by default, so per-port rules stop at a few dozen Services per cluster, and nodes'
node ports would be open to the source ranges directly. AWS documents that referencing the NLB's
group from the targets' group admits its traffic and health checks with client-IP preservation on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lbctl.model.errors import InvalidServiceError, NoEligibleNodesError, TransientProviderError
from lbctl.model.spec import parse_cidrs
from lbctl.model.types import (
    EMPTY,
    Ingress,
    LoadBalancerRef,
    LoadBalancerSpec,
    LoadBalancerStatus,
    NodeTarget,
    PortSpec,
    PortStatus,
)
from providers import tags

ANNOTATION_PREFIX = "service.beta.kubernetes.io/aws-load-balancer-"
ANN_TYPE = ANNOTATION_PREFIX + "type"
ANN_INTERNAL = ANNOTATION_PREFIX + "internal"
ANN_SUBNETS = ANNOTATION_PREFIX + "subnets"
ANN_EIP_ALLOCATIONS = ANNOTATION_PREFIX + "eip-allocations"
ANN_ADDITIONAL_TAGS = ANNOTATION_PREFIX + "additional-resource-tags"
ANN_TARGET_NODE_LABELS = ANNOTATION_PREFIX + "target-node-labels"
ANN_CROSS_ZONE = ANNOTATION_PREFIX + "cross-zone-load-balancing-enabled"
ANN_SSL_CERT = ANNOTATION_PREFIX + "ssl-cert"
ANN_SSL_PORTS = ANNOTATION_PREFIX + "ssl-ports"
ANN_HC_PROTOCOL = ANNOTATION_PREFIX + "healthcheck-protocol"
ANN_HC_PORT = ANNOTATION_PREFIX + "healthcheck-port"
ANN_HC_PATH = ANNOTATION_PREFIX + "healthcheck-path"
ANN_HC_INTERVAL = ANNOTATION_PREFIX + "healthcheck-interval"
ANN_HC_TIMEOUT = ANNOTATION_PREFIX + "healthcheck-timeout"
ANN_HC_HEALTHY = ANNOTATION_PREFIX + "healthcheck-healthy-threshold"
ANN_HC_UNHEALTHY = ANNOTATION_PREFIX + "healthcheck-unhealthy-threshold"
# The AWS Load Balancer Controller's name and values for the NLB's IP address type.
ANN_IP_ADDRESS_TYPE = ANNOTATION_PREFIX + "ip-address-type"
IPV4 = "ipv4"
DUALSTACK = "dualstack"

TAG_CLUSTER_PREFIX = tags.CLUSTER_PREFIX
TAG_SERVICE_NAME = tags.SERVICE_NAME
TAG_SERVICE_UID = "lbctl.io/service-uid"
# Which NLB a target group or security-group rule belongs to (their names cannot say it reliably).
TAG_BALANCER = tags.BALANCER
TAG_ROLE = "lbctl.io/role"  # on the shared backend security group and the node rule admitting it
ROLE_BACKEND = "nlb-backend"
TAG_ROLE_ELB = "kubernetes.io/role/elb"
TAG_ROLE_INTERNAL_ELB = "kubernetes.io/role/internal-elb"
RESERVED_TAG_PREFIXES = ("kubernetes.io/", "lbctl.io/", "aws:")

SCHEME_INTERNET_FACING = "internet-facing"
SCHEME_INTERNAL = "internal"
MAX_LISTENERS = 50  # per NLB (AWS quota)
TRAFFIC_PORT = "traffic-port"
EVERYONE = ("0.0.0.0/0",)
EVERYONE_DUALSTACK = ("0.0.0.0/0", "::/0")
TARGET_GROUP_NAME_MAX = 32
_PREFIX_LEN = 22  # + "-" + 9 hex digits = 32

_BALANCER_NAME = re.compile(r"^(?!internal-)[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")
_PROVIDER_ID = re.compile(r"^aws://(?:/[A-Za-z0-9-]*)?/(i-[0-9a-f]{8,17})$")
_EIP_ALLOCATION = re.compile(r"^eipalloc-[0-9a-f]{8,17}$")
_CERT_ARN = re.compile(r"^arn:aws[a-z-]*:(acm|iam):[a-z0-9-]*:\d{12}:(certificate|server-certificate)/\S+$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8,17}$")

# Error codes, classified so the adapter knows what a failed call means.
RETRYABLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "SlowDown",
    "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable",
})
QUOTA_CODES = frozenset({
    "TooManyLoadBalancers", "TooManyTargetGroups", "TooManyListeners", "TooManyTargets",
    "TooManyRegistrationsForTargetId", "TooManyTags", "TooManyActions", "TooManyUniqueTargetGroupsPerLoadBalancer",
    "RulesPerSecurityGroupLimitExceeded", "AddressLimitExceeded", "TooManyCertificates",
})


def is_retryable_error(code: str, http_status: int) -> bool:
    """Throttling and server-side failures are worth another try; every other 4xx is not."""
    return code in RETRYABLE_CODES or http_status >= 500


def is_quota_error(code: str) -> bool:
    return code in QUOTA_CODES


# ─── what the Service asks for ──────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class HealthCheck:
    protocol: str  # TCP | HTTP | HTTPS
    port: str  # "traffic-port" or a port number
    path: str | None  # only for HTTP and HTTPS
    interval_s: int
    timeout_s: int
    healthy_threshold: int
    unhealthy_threshold: int


@dataclass(frozen=True)
class TargetGroupPlan:
    name: str
    protocol: str  # TCP | UDP | TCP_UDP
    port: int  # the node port
    health: HealthCheck


@dataclass(frozen=True)
class ListenerPlan:
    port: int
    protocol: str  # TCP | UDP | TCP_UDP | TLS
    target_group: str  # TargetGroupPlan.name
    certificate_arn: str | None = None


@dataclass(frozen=True)
class ServiceIntent:
    """A Service's validated wishes, before any cloud facts are known."""

    name: str
    scheme: str
    tags: Mapping[str, str]
    extra_tags: Mapping[str, str]
    target_groups: tuple[TargetGroupPlan, ...]
    listeners: tuple[ListenerPlan, ...]
    instance_ids: tuple[str, ...]  # sorted, unique
    node_of_instance: Mapping[str, str]  # instance id -> node name, for error messages
    subnet_refs: tuple[str, ...]  # from the annotation (ids or Name tags); empty: discover
    eip_allocations: tuple[str, ...]
    cross_zone: bool
    source_ranges: tuple[str, ...]
    ports: tuple[PortStatus, ...]
    ip_address_type: str = IPV4  # ipv4 | dualstack


def read_service(spec: LoadBalancerSpec) -> ServiceIntent:
    """Validate everything the Service says and turn it into an intent; raises InvalidServiceError."""
    ann = spec.annotations
    check_balancer_name(spec.name)
    lb_type = ann.get(ANN_TYPE)
    if lb_type is not None and lb_type.strip().lower() != "nlb":
        raise InvalidServiceError(
            f"load balancer type {lb_type!r} is not supported by lbctl's aws provider",
            field=_ann(ANN_TYPE), fix='set it to "nlb" or remove it',
        )
    internal = _bool_annotation(ann, ANN_INTERNAL, default=False)
    scheme = SCHEME_INTERNAL if internal else SCHEME_INTERNET_FACING
    if spec.load_balancer_ip:
        raise InvalidServiceError(
            "an NLB cannot take a requested address", field="spec.loadBalancerIP",
            fix=f"remove spec.loadBalancerIP; for fixed public addresses use {ANN_EIP_ALLOCATIONS}",
        )
    extra_tags = _key_values(ann, ANN_ADDITIONAL_TAGS, reserved=True)
    cross_zone = _bool_annotation(ann, ANN_CROSS_ZONE, default=False)
    subnet_refs = _list_annotation(ann, ANN_SUBNETS)
    eips = _list_annotation(ann, ANN_EIP_ALLOCATIONS)
    for eip in eips:
        if not _EIP_ALLOCATION.match(eip):
            raise InvalidServiceError(
                f"{eip!r} is not an Elastic IP allocation id", field=_ann(ANN_EIP_ALLOCATIONS),
                fix="list allocation ids like eipalloc-0123456789abcdef0, one per subnet",
            )
    if eips and internal:
        raise InvalidServiceError(
            "an internal NLB cannot use Elastic IPs", field=_ann(ANN_EIP_ALLOCATIONS),
            fix=f"remove it or set {ANN_INTERNAL} to \"false\"",
        )
    if len(set(eips)) != len(eips):
        raise InvalidServiceError(
            "an allocation id is listed twice", field=_ann(ANN_EIP_ALLOCATIONS), fix="list each allocation once",
        )
    ip_address_type = read_ip_address_type(ann)
    source_ranges = normalize_source_ranges(spec.source_ranges, ip_address_type)
    health = read_health_check(spec)
    target_groups, listeners = plan_ports(spec, health)
    if ip_address_type == DUALSTACK:
        check_dualstack_listeners(spec, listeners)
    instances = select_instances(spec)
    tags = {
        TAG_CLUSTER_PREFIX + spec.cluster_name: "owned",
        TAG_SERVICE_NAME: spec.service.key,
        TAG_SERVICE_UID: spec.service.uid,
        TAG_BALANCER: spec.name,
    }
    return ServiceIntent(
        name=spec.name, scheme=scheme, tags={**extra_tags, **tags}, extra_tags=extra_tags,
        target_groups=target_groups, listeners=listeners,
        instance_ids=tuple(sorted(instances)), node_of_instance=instances,
        subnet_refs=subnet_refs, eip_allocations=eips, cross_zone=cross_zone,
        source_ranges=source_ranges,
        ports=tuple(PortStatus(port=p.port, protocol=p.protocol) for p in spec.ports),
        ip_address_type=ip_address_type,
    )


def check_balancer_name(name: str) -> None:
    if not _BALANCER_NAME.match(name):
        raise InvalidServiceError(
            f"{name!r} cannot name an NLB (1-32 letters, digits and inner hyphens, not starting with 'internal-')",
            field="metadata.uid", fix="report this: lbctl derives the name from the Service UID",
        )


def target_group_prefix(balancer_name: str) -> str:
    return balancer_name[:_PREFIX_LEN].rstrip("-")


def target_group_name(balancer_name: str, node_port: int, protocol: str) -> str:
    """Deterministic, ≤ 32 characters, unique per (NLB, node port, protocol): port and protocol are
    immutable on a target group, so a change of either means a new group under a new name."""
    digest = hashlib.sha256(f"{balancer_name}/{protocol}/{node_port}".encode()).hexdigest()[:9]
    return f"{target_group_prefix(balancer_name)}-{digest}"


def is_target_group_of(balancer_name: str, name: str) -> bool:
    """True when `name` has the shape of this NLB's target groups (tags must confirm it)."""
    prefix = target_group_prefix(balancer_name) + "-"
    rest = name[len(prefix):]
    return name.startswith(prefix) and len(rest) == 9 and all(c in "0123456789abcdef" for c in rest)


def _ann(key: str) -> str:
    return f"metadata.annotations[{key}]"


def _bool_annotation(ann: Mapping[str, str], key: str, *, default: bool) -> bool:
    raw = ann.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise InvalidServiceError(f"{raw!r} is not a boolean", field=_ann(key), fix='set it to "true" or "false"')
    return value == "true"


def _list_annotation(ann: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = ann.get(key)
    if raw is None:
        return ()
    items = tuple(item.strip() for item in raw.split(","))
    if not items or any(not item for item in items):
        raise InvalidServiceError(
            f"{raw!r} has an empty entry", field=_ann(key), fix="give a comma-separated list without empty entries",
        )
    return items


def _key_values(ann: Mapping[str, str], key: str, *, reserved: bool) -> dict[str, str]:
    """Parse "k1=v1,k2=v2"; with reserved, keys that lbctl or AWS own are refused."""
    result: dict[str, str] = {}
    for item in _list_annotation(ann, key):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise InvalidServiceError(f"{item!r} is not key=value", field=_ann(key), fix="write entries as key=value")
        if reserved:
            if len(name) > 128 or len(value) > 256:
                raise InvalidServiceError(
                    f"tag {name!r} is too long", field=_ann(key), fix="keys ≤ 128 and values ≤ 256 characters",
                )
            if name.startswith(RESERVED_TAG_PREFIXES):
                raise InvalidServiceError(
                    f"tag key {name!r} is reserved", field=_ann(key),
                    fix=f"use keys outside {', '.join(RESERVED_TAG_PREFIXES)}",
                )
        result[name] = value
    return result


def read_ip_address_type(ann: Mapping[str, str]) -> str:
    """ipv4 (the default) or dualstack, as the AWS Load Balancer Controller reads the annotation."""
    raw = ann.get(ANN_IP_ADDRESS_TYPE)
    if raw is None:
        return IPV4
    value = raw.strip().lower()
    if value not in (IPV4, DUALSTACK):
        raise InvalidServiceError(
            f"{raw!r} is not an NLB IP address type", field=_ann(ANN_IP_ADDRESS_TYPE),
            fix=f'set "{IPV4}" or "{DUALSTACK}" (dualstack-without-public-ipv4 exists only for ALBs)',
        )
    return value


def check_dualstack_listeners(spec: LoadBalancerSpec, listeners: Sequence[ListenerPlan]) -> None:
    """lbctl's target groups hold instances, so they are IPv4 target groups: a dualstack NLB's TCP and
    TLS listeners may use them (IPv6 clients are translated), but AWS documents that "a UDP listener
    for a dualstack load balancer requires IPv6 target groups", and those take only IP targets."""
    for listener in listeners:
        if listener.protocol in ("UDP", "TCP_UDP"):
            index = next(i for i, p in enumerate(spec.ports) if p.port == listener.port and p.protocol == "UDP")
            raise InvalidServiceError(
                f"port {listener.port} carries UDP: a UDP listener of a dualstack NLB requires IPv6 target "
                "groups, which hold only IP targets, and lbctl registers instances (IPv4 target groups)",
                field=f"spec.ports[{index}].protocol",
                fix=f"serve UDP from a Service without {ANN_IP_ADDRESS_TYPE}: dualstack, or use TCP",
            )


def normalize_source_ranges(ranges: Sequence[str], ip_address_type: str = IPV4) -> tuple[str, ...]:
    """Everyone when none are given (the Kubernetes default): both families on a dualstack NLB. An
    IPv6 range on an IPv4-only NLB could never match a client, so it is refused."""
    networks = parse_cidrs(ranges)
    if ip_address_type != DUALSTACK:
        for index, text in enumerate(ranges):
            network = ipaddress.ip_network(text.strip(), strict=False)
            if network.version == 6:
                raise InvalidServiceError(
                    f"{network} is an IPv6 range but the NLB takes IPv4 clients only",
                    field=f"spec.loadBalancerSourceRanges[{index}]",
                    fix=f'remove the IPv6 ranges, or set {ANN_IP_ADDRESS_TYPE}: "{DUALSTACK}"',
                )
    return tuple(str(n) for n in networks) or (EVERYONE_DUALSTACK if ip_address_type == DUALSTACK else EVERYONE)


def _int_annotation(ann: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    raw = ann.get(key)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidServiceError(
            f"{raw!r} is not a whole number from {low} to {high}", field=_ann(key), fix=f"set {low}..{high}",
        )
    return value


def read_health_check(spec: LoadBalancerSpec) -> HealthCheck:
    """Defaults: TCP on the traffic port; for externalTrafficPolicy Local, HTTP /healthz on the
    healthCheckNodePort (kube-proxy's contract). Annotations override either."""
    ann = spec.annotations
    local = spec.external_traffic_policy == "Local"
    if local and spec.health_check_node_port is None:
        raise InvalidServiceError(
            "externalTrafficPolicy Local needs a health check node port", field="spec.healthCheckNodePort",
            fix="let Kubernetes allocate spec.healthCheckNodePort (or set it)",
        )
    protocol = "HTTP" if local else "TCP"
    raw_protocol = ann.get(ANN_HC_PROTOCOL)
    if raw_protocol is not None:
        protocol = raw_protocol.strip().upper()
        if protocol not in ("TCP", "HTTP", "HTTPS"):
            raise InvalidServiceError(
                f"{raw_protocol!r} is not a health check protocol", field=_ann(ANN_HC_PROTOCOL),
                fix="set TCP, HTTP or HTTPS",
            )
    port = str(spec.health_check_node_port) if local else TRAFFIC_PORT
    raw_port = ann.get(ANN_HC_PORT)
    if raw_port is not None:
        port = raw_port.strip()
        if port != TRAFFIC_PORT and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise InvalidServiceError(
                f"{raw_port!r} is not a port", field=_ann(ANN_HC_PORT), fix=f'set a port number or "{TRAFFIC_PORT}"',
            )
    path: str | None = None
    if protocol != "TCP":
        path = ann.get(ANN_HC_PATH, "/healthz" if local else "/").strip()
        if not path.startswith("/"):
            raise InvalidServiceError(
                f"{path!r} is not an HTTP path", field=_ann(ANN_HC_PATH), fix='start the path with "/"',
            )
    interval = _int_annotation(ann, ANN_HC_INTERVAL, 5, 300) or 10
    timeout = _int_annotation(ann, ANN_HC_TIMEOUT, 2, 120) or (10 if protocol == "TCP" else 6)
    if timeout > interval:
        raise InvalidServiceError(
            f"health check timeout {timeout}s is longer than the interval {interval}s",
            field=_ann(ANN_HC_TIMEOUT), fix=f"set a timeout ≤ {interval} or raise {ANN_HC_INTERVAL}",
        )
    healthy = _int_annotation(ann, ANN_HC_HEALTHY, 2, 10) or 3
    unhealthy = _int_annotation(ann, ANN_HC_UNHEALTHY, 2, 10) or 3
    return HealthCheck(protocol, port, path, interval, timeout, healthy, unhealthy)


def plan_ports(
    spec: LoadBalancerSpec, health: HealthCheck
) -> tuple[tuple[TargetGroupPlan, ...], tuple[ListenerPlan, ...]]:
    """One listener per service port; TCP and UDP on one port number become one TCP_UDP listener."""
    by_port: dict[int, list[tuple[int, PortSpec]]] = defaultdict(list)
    for i, port in enumerate(spec.ports):
        if port.protocol not in ("TCP", "UDP"):
            raise InvalidServiceError(
                f"an NLB cannot carry {port.protocol}", field=f"spec.ports[{i}].protocol", fix="use TCP or UDP",
            )
        if not 1 <= port.port <= 65535:
            raise InvalidServiceError(f"{port.port} is not a port", field=f"spec.ports[{i}].port", fix="use 1-65535")
        if port.node_port is None or not 1 <= port.node_port <= 65535:
            raise InvalidServiceError(
                "an NLB sends traffic to node ports and this port has none", field=f"spec.ports[{i}].nodePort",
                fix="set spec.allocateLoadBalancerNodePorts to true (or give the port a nodePort)",
            )
        if any(other.protocol == port.protocol for _, other in by_port[port.port]):
            raise InvalidServiceError(
                f"port {port.port}/{port.protocol} is listed twice", field=f"spec.ports[{i}].port",
                fix="list each port and protocol once",
            )
        by_port[port.port].append((i, port))
    if not by_port:
        raise InvalidServiceError("the Service has no ports", field="spec.ports", fix="add at least one port")
    if len(by_port) > MAX_LISTENERS:
        raise InvalidServiceError(
            f"{len(by_port)} ports need {len(by_port)} listeners; an NLB allows {MAX_LISTENERS}",
            field="spec.ports", fix=f"use at most {MAX_LISTENERS} distinct port numbers",
        )
    certificate, tls_ports = _read_tls(spec)
    groups: dict[str, TargetGroupPlan] = {}
    listeners: list[ListenerPlan] = []
    for number in sorted(by_port):
        entries = by_port[number]
        (i, first) = entries[0]
        node_port = first.node_port or 0
        if len(entries) == 2:
            (j, second) = entries[1]
            if second.node_port != first.node_port:
                raise InvalidServiceError(
                    f"port {number} is used with TCP and UDP, which one NLB listener (TCP_UDP) carries to one "
                    f"node port, but the node ports differ ({first.node_port}, {second.node_port})",
                    field=f"spec.ports[{j}].nodePort", fix=f"give both entries of port {number} the same nodePort",
                )
            protocol = "TCP_UDP"
        else:
            protocol = first.protocol
        tls = number in tls_ports
        if tls and protocol != "TCP":
            raise InvalidServiceError(
                f"port {number} carries UDP, which TLS cannot", field=_ann(ANN_SSL_PORTS),
                fix=f"leave port {number} out of the TLS ports",
            )
        name = target_group_name(spec.name, node_port, protocol)
        groups[name] = TargetGroupPlan(name=name, protocol=protocol, port=node_port, health=health)
        listeners.append(ListenerPlan(
            port=number, protocol="TLS" if tls else protocol, target_group=name,
            certificate_arn=certificate if tls else None,
        ))
    return tuple(groups[n] for n in sorted(groups)), tuple(listeners)


def _read_tls(spec: LoadBalancerSpec) -> tuple[str | None, frozenset[int]]:
    ann = spec.annotations
    certificate = ann.get(ANN_SSL_CERT)
    ports_raw = ann.get(ANN_SSL_PORTS)
    if certificate is None:
        if ports_raw is not None:
            raise InvalidServiceError(
                "TLS ports are listed without a certificate", field=_ann(ANN_SSL_PORTS), fix=f"set {ANN_SSL_CERT} too",
            )
        return None, frozenset()
    certificate = certificate.strip()
    if not _CERT_ARN.match(certificate):
        raise InvalidServiceError(
            f"{certificate!r} is not a certificate ARN", field=_ann(ANN_SSL_CERT),
            fix="give the ARN of an ACM or IAM certificate",
        )
    if ports_raw is None or ports_raw.strip() == "*":
        return certificate, frozenset(p.port for p in spec.ports if p.protocol == "TCP")
    chosen: set[int] = set()
    for entry in _list_annotation(ann, ANN_SSL_PORTS):
        matches = [p for p in spec.ports if p.name == entry or str(p.port) == entry]
        if not matches:
            raise InvalidServiceError(
                f"no service port is named or numbered {entry!r}", field=_ann(ANN_SSL_PORTS),
                fix="list port numbers or names from spec.ports, or \"*\"",
            )
        chosen.update(p.port for p in matches)
    return certificate, frozenset(chosen)


def parse_provider_id(node: NodeTarget) -> str:
    """aws:///<zone>/<instance-id> → instance id."""
    match = _PROVIDER_ID.match(node.provider_id)
    if not match:
        problem = "has no providerID" if not node.provider_id else f"has providerID {node.provider_id!r}, not AWS"
        raise InvalidServiceError(
            f"node {node.name} {problem}", field=f"spec.nodes[{node.name}].spec.providerID",
            fix="set the node's providerID to aws:///<zone>/<instance-id> (the kubelet's --provider-id)",
        )
    return match.group(1)


def select_instances(spec: LoadBalancerSpec) -> dict[str, str]:
    """Instance id -> node name for the nodes that should receive traffic."""
    wanted = _key_values(spec.annotations, ANN_TARGET_NODE_LABELS, reserved=False)
    result: dict[str, str] = {}
    for node in spec.nodes:
        instance = parse_provider_id(node)  # every node must be valid, selected or not
        if all(node.labels.get(k) == v for k, v in wanted.items()):
            result.setdefault(instance, node.name)
    if not result:
        if spec.nodes:
            raise NoEligibleNodesError(
                "no node carries the requested labels", field=_ann(ANN_TARGET_NODE_LABELS),
                fix="label some nodes or change the annotation",
            )
        raise NoEligibleNodesError("there are no eligible nodes to send traffic to", field="spec.nodes",
                                   fix="add Ready nodes the Service may use")
    return result


# ─── cloud facts the desired state depends on ───────────────────────────────────────────────────


@dataclass(frozen=True)
class SubnetInfo:
    id: str
    zone: str
    vpc_id: str
    cidr: str
    tags: Mapping[str, str] = field(default_factory=lambda: EMPTY, compare=False, hash=False)
    ipv6_cidrs: tuple[str, ...] = ()  # associated IPv6 CIDR blocks


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    state: str
    vpc_id: str
    security_groups: tuple[str, ...]


def usable_instances(intent: ServiceIntent, instances: Iterable[InstanceInfo]) -> tuple[InstanceInfo, ...]:
    """Instances that exist and run; a node whose instance is gone or stopped gets no traffic."""
    found = {i.id: i for i in instances if i.state in ("pending", "running")}
    result = tuple(found[i] for i in intent.instance_ids if i in found)
    if not result:
        raise NoEligibleNodesError(
            "none of the nodes' EC2 instances is running", field="spec.nodes",
            fix="check the nodes' providerIDs name running instances in this region",
        )
    vpcs = sorted({i.vpc_id for i in result})
    if len(vpcs) > 1:
        raise InvalidServiceError(
            f"the nodes' instances are in several VPCs ({', '.join(vpcs)}); one NLB serves one VPC",
            field=_ann(ANN_TARGET_NODE_LABELS), fix="select nodes of one VPC with target-node-labels",
        )
    return result


def choose_subnets(
    intent: ServiceIntent, cluster_name: str, vpc_subnets: Sequence[SubnetInfo]
) -> tuple[SubnetInfo, ...]:
    """The annotation's subnets (ids or Name tags), or one tagged subnet per zone."""
    if intent.subnet_refs:
        chosen: list[SubnetInfo] = []
        for ref in intent.subnet_refs:
            if _SUBNET_ID.match(ref):
                matches = [s for s in vpc_subnets if s.id == ref]
            else:
                matches = [s for s in vpc_subnets if s.tags.get("Name") == ref]
            if not matches:
                raise InvalidServiceError(
                    f"no subnet {ref!r} in the nodes' VPC", field=_ann(ANN_SUBNETS),
                    fix="name existing subnets (ids or Name tags) of the nodes' VPC",
                )
            if len(matches) > 1:
                raise InvalidServiceError(
                    f"several subnets are named {ref!r}", field=_ann(ANN_SUBNETS), fix="use subnet ids",
                )
            if matches[0] not in chosen:
                chosen.append(matches[0])
        zones = [s.zone for s in chosen]
        if len(set(zones)) != len(zones):
            raise InvalidServiceError(
                "two subnets are in one availability zone", field=_ann(ANN_SUBNETS),
                fix="list at most one subnet per availability zone",
            )
        if intent.ip_address_type == DUALSTACK and (v4_only := [s.id for s in chosen if not s.ipv6_cidrs]):
            raise InvalidServiceError(
                f"subnets {','.join(v4_only)} have no IPv6 CIDR, which a dualstack NLB needs in every subnet",
                field=_ann(ANN_IP_ADDRESS_TYPE),
                fix=f"associate an IPv6 CIDR with them, list dualstack subnets in {ANN_SUBNETS}, "
                    "or remove the annotation",
            )
        result = tuple(sorted(chosen, key=lambda s: s.zone))
    else:
        role = TAG_ROLE_INTERNAL_ELB if intent.scheme == SCHEME_INTERNAL else TAG_ROLE_ELB
        cluster_tag = TAG_CLUSTER_PREFIX + cluster_name
        tagged = [
            s for s in sorted(vpc_subnets, key=lambda s: s.id)
            if s.tags.get(role) in ("1", "") and s.tags.get(cluster_tag) in ("owned", "shared")
        ]
        if not tagged:
            raise InvalidServiceError(
                f"no subnet of the nodes' VPC is tagged {role}=1 and {cluster_tag}=owned|shared",
                field=_ann(ANN_SUBNETS),
                fix="tag one subnet per zone for the cluster, or list subnets in the annotation",
            )
        if intent.ip_address_type == DUALSTACK:
            # Only subnets with IPv6 can hold a dualstack NLB: a zone without one is left out.
            usable = [s for s in tagged if s.ipv6_cidrs]
            if not usable:
                raise InvalidServiceError(
                    f"subnets {','.join(s.id for s in tagged)} have no IPv6 CIDR, which a dualstack NLB needs",
                    field=_ann(ANN_IP_ADDRESS_TYPE),
                    fix=f"associate an IPv6 CIDR with the cluster's {role} subnets, or remove the annotation",
                )
            tagged = usable
        by_zone: dict[str, SubnetInfo] = {}
        for subnet in tagged:
            by_zone.setdefault(subnet.zone, subnet)
        result = tuple(by_zone[z] for z in sorted(by_zone))
    if intent.eip_allocations and len(intent.eip_allocations) != len(result):
        raise InvalidServiceError(
            f"{len(intent.eip_allocations)} Elastic IPs for {len(result)} subnets", field=_ann(ANN_EIP_ALLOCATIONS),
            fix=f"give exactly one allocation per subnet ({len(result)})",
        )
    return result


def choose_node_groups(
    instances: Sequence[InstanceInfo], group_tags: Mapping[str, Mapping[str, str]], cluster_name: str,
    node_of_instance: Mapping[str, str],
) -> tuple[str, ...]:
    """The security group of each node: its only one, else the one tagged for the cluster."""
    cluster_tag = TAG_CLUSTER_PREFIX + cluster_name
    chosen: set[str] = set()
    for instance in instances:
        groups = instance.security_groups
        if len(groups) > 1:
            groups = tuple(g for g in groups if cluster_tag in group_tags.get(g, EMPTY))
        if len(groups) != 1:
            raise TransientProviderError(
                f"node {node_of_instance.get(instance.id, instance.id)} ({instance.id}) has "
                f"{len(instance.security_groups)} security groups and {len(groups)} of them are tagged {cluster_tag}",
                field=f"spec.nodes[{node_of_instance.get(instance.id, instance.id)}]",
                fix=f"tag exactly one of the node's security groups with {cluster_tag}",
            )
        chosen.add(groups[0])
    return tuple(sorted(chosen))


# ─── desired and observed state ─────────────────────────────────────────────────────────────────


@dataclass(frozen=True, order=True)
class SgRule:
    """One ingress rule of the NLB's own security group: a protocol, a port range and a source range."""

    protocol: str  # tcp | udp (or whatever a person added by hand)
    from_port: int
    to_port: int
    cidr: str


@dataclass(frozen=True)
class Desired:
    name: str
    scheme: str
    subnets: tuple[SubnetInfo, ...]
    eip_allocations: tuple[str, ...]
    cross_zone: bool
    tags: Mapping[str, str]
    target_groups: tuple[TargetGroupPlan, ...]
    listeners: tuple[ListenerPlan, ...]
    targets: frozenset[str]
    frontend_rules: frozenset[SgRule]
    node_groups: tuple[str, ...]
    ip_address_type: str = IPV4


def frontend_group_name(balancer_name: str) -> str:
    """The NLB's own security group, which admits the Service's source ranges on its listener ports."""
    return f"lbctl-{balancer_name}"


def backend_group_name(cluster_name: str) -> str:
    """Shared by every NLB of the cluster; the nodes' security groups admit it with one rule."""
    return f"lbctl-nlb-backend-{cluster_name}"


def frontend_rules(intent: ServiceIntent) -> frozenset[SgRule]:
    """Clients in the source ranges may reach the listener ports; nothing else reaches the NLB."""
    rules: set[SgRule] = set()
    for listener in intent.listeners:
        protocols = ("tcp", "udp") if listener.protocol == "TCP_UDP" else (
            "udp" if listener.protocol == "UDP" else "tcp",)
        rules.update(
            SgRule(proto, listener.port, listener.port, cidr) for proto in protocols for cidr in intent.source_ranges
        )
    return frozenset(rules)


def build_desired(
    intent: ServiceIntent, subnets: Sequence[SubnetInfo], instances: Sequence[InstanceInfo], group_ids: Sequence[str]
) -> Desired:
    return Desired(
        name=intent.name, scheme=intent.scheme, subnets=tuple(subnets), eip_allocations=intent.eip_allocations,
        cross_zone=intent.cross_zone, tags=intent.tags, target_groups=intent.target_groups,
        listeners=intent.listeners, targets=frozenset(i.id for i in instances),
        frontend_rules=frontend_rules(intent), node_groups=tuple(group_ids),
        ip_address_type=intent.ip_address_type,
    )


@dataclass(frozen=True)
class ObservedBalancer:
    arn: str
    scheme: str
    dns_name: str
    subnet_ids: frozenset[str]
    tags: Mapping[str, str]
    cross_zone: bool
    security_groups: frozenset[str]
    ip_address_type: str = IPV4


@dataclass(frozen=True)
class ObservedListener:
    arn: str
    port: int
    protocol: str
    target_group_arn: str | None
    certificate_arn: str | None


@dataclass(frozen=True)
class ObservedTargetGroup:
    arn: str
    name: str
    protocol: str
    port: int
    health: HealthCheck
    tags: Mapping[str, str]
    targets: frozenset[str]  # registered (not draining) instance ids


@dataclass(frozen=True)
class Observed:
    balancer: ObservedBalancer | None
    listeners: tuple[ObservedListener, ...]
    target_groups: tuple[ObservedTargetGroup, ...]  # attached to the NLB or found by a desired name
    frontend_group: str | None  # id of the NLB's own security group
    frontend_rules: frozenset[SgRule]
    backend_group: str | None  # id of the cluster's shared NLB security group
    node_groups_open: frozenset[str]  # node security groups that already admit the backend group


@dataclass(frozen=True)
class Changes:
    """What ensure must write, in the order the adapter applies it."""

    delete_balancer: str | None = None  # ARN; the scheme changed, which no NLB can do in place
    create_balancer: bool = False
    set_subnets: tuple[str, ...] | None = None
    # SetIpAddressType in place (the NLB keeps its name, DNS name and IPv4 addresses); with
    # dualstack it comes after set_subnets (every subnet must have IPv6 first), with ipv4 before.
    set_ip_address_type: str | None = None
    set_cross_zone: bool | None = None
    balancer_tags: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    create_target_groups: tuple[TargetGroupPlan, ...] = ()
    modify_health: tuple[tuple[str, TargetGroupPlan], ...] = ()  # (arn, plan)
    target_group_tags: tuple[tuple[str, Mapping[str, str]], ...] = ()  # (arn, tags to add)
    register: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (target group name, instance ids)
    deregister: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (target group arn, instance ids)
    create_frontend_group: bool = False
    create_backend_group: bool = False
    authorize_frontend: tuple[SgRule, ...] = ()
    open_node_groups: tuple[str, ...] = ()  # node security groups to admit the backend group
    set_security_groups: bool = False
    delete_listeners: tuple[str, ...] = ()  # ARNs; before creating, a replaced listener holds its port
    create_listeners: tuple[ListenerPlan, ...] = ()
    modify_listeners: tuple[tuple[str, ListenerPlan], ...] = ()  # (arn, plan)
    delete_target_groups: tuple[str, ...] = ()  # ARNs, once no listener uses them
    revoke_frontend: tuple[SgRule, ...] = ()

    @property
    def empty(self) -> bool:
        return self == Changes()

    @property
    def structure_changed(self) -> bool:
        """Balancer, listeners or target groups come or go: the moments a crash may have left an
        unused target group behind (or is being recovered from)."""
        return bool(
            self.create_balancer or self.delete_balancer or self.create_target_groups or self.delete_target_groups
            or self.create_listeners or self.delete_listeners or self.modify_listeners
        )


def plan_changes(desired: Desired, observed: Observed) -> Changes:
    """Diff desired against observed. Only what differs is written; a no-op plan is `Changes()`."""
    balancer = observed.balancer
    # The scheme is fixed for an NLB's life, and so is having security groups at all.
    recreate = balancer is not None and (balancer.scheme != desired.scheme or not balancer.security_groups)
    fresh = balancer is None or recreate
    subnet_ids = tuple(s.id for s in desired.subnets)

    set_subnets = None
    set_ip_address_type = None
    set_cross_zone: bool | None = desired.cross_zone if desired.cross_zone else None
    balancer_tags: Mapping[str, str] = EMPTY
    set_security_groups = False
    if balancer is not None and not fresh:
        groups_now = {observed.frontend_group, observed.backend_group}
        set_security_groups = None in groups_now or balancer.security_groups != groups_now
        if frozenset(subnet_ids) != balancer.subnet_ids:
            set_subnets = subnet_ids
        if desired.ip_address_type != balancer.ip_address_type:
            set_ip_address_type = desired.ip_address_type
        set_cross_zone = desired.cross_zone if desired.cross_zone != balancer.cross_zone else None
        balancer_tags = missing_tags(desired.tags, balancer.tags)

    groups = {tg.name: tg for tg in observed.target_groups}
    wanted = {tg.name for tg in desired.target_groups}
    create_groups = tuple(tg for tg in desired.target_groups if tg.name not in groups)
    modify_health = tuple(
        (groups[tg.name].arn, tg) for tg in desired.target_groups
        if tg.name in groups and groups[tg.name].health != tg.health
    )
    group_tags = tuple(
        (groups[tg.name].arn, tags) for tg in desired.target_groups
        if tg.name in groups and (tags := missing_tags(desired.tags, groups[tg.name].tags))
    )
    register: list[tuple[str, tuple[str, ...]]] = []
    deregister: list[tuple[str, tuple[str, ...]]] = []
    for tg in desired.target_groups:
        have = groups[tg.name].targets if tg.name in groups else frozenset()
        if add := desired.targets - have:
            register.append((tg.name, tuple(sorted(add))))
        if drop := have - desired.targets:
            deregister.append((groups[tg.name].arn, tuple(sorted(drop))))

    listeners = () if recreate else observed.listeners
    name_of_arn = {tg.arn: tg.name for tg in observed.target_groups}
    by_port = {listener.port: listener for listener in listeners}
    delete_listeners: list[str] = []
    create_listeners: list[ListenerPlan] = []
    modify_listeners: list[tuple[str, ListenerPlan]] = []
    for plan in desired.listeners:
        current = by_port.pop(plan.port, None)
        if current is None:
            create_listeners.append(plan)
        elif current.protocol != plan.protocol:
            # moving between TCP, UDP, TCP_UDP and TLS: replace (ModifyListener cannot do all of them)
            delete_listeners.append(current.arn)
            create_listeners.append(plan)
        elif (
            name_of_arn.get(current.target_group_arn or "") != plan.target_group
            or current.certificate_arn != plan.certificate_arn
        ):
            modify_listeners.append((current.arn, plan))
    delete_listeners.extend(listener.arn for listener in by_port.values())

    delete_groups = tuple(tg.arn for tg in observed.target_groups if tg.name not in wanted)

    have_rules = observed.frontend_rules if observed.frontend_group else frozenset()
    open_groups = observed.node_groups_open if observed.backend_group else frozenset()

    return Changes(
        delete_balancer=balancer.arn if recreate and balancer is not None else None,
        create_balancer=fresh,
        set_subnets=set_subnets,
        set_ip_address_type=set_ip_address_type,
        set_cross_zone=set_cross_zone,
        balancer_tags=balancer_tags,
        create_target_groups=create_groups,
        modify_health=modify_health,
        target_group_tags=group_tags,
        register=tuple(register),
        deregister=tuple(deregister),
        create_frontend_group=observed.frontend_group is None,
        create_backend_group=observed.backend_group is None,
        authorize_frontend=tuple(sorted(desired.frontend_rules - have_rules)),
        open_node_groups=tuple(g for g in desired.node_groups if g not in open_groups),
        set_security_groups=set_security_groups,
        delete_listeners=tuple(delete_listeners),
        create_listeners=tuple(create_listeners),
        modify_listeners=tuple(modify_listeners),
        delete_target_groups=delete_groups,
        revoke_frontend=tuple(sorted(have_rules - desired.frontend_rules)),
    )


def missing_tags(desired: Mapping[str, str], observed: Mapping[str, str]) -> Mapping[str, str]:
    """Tags to add or correct; tags a user added by hand are left alone."""
    return {k: v for k, v in desired.items() if observed.get(k) != v}


def rules_from_permission(
    protocol: str, from_port: int | None, to_port: int | None, cidrs: Iterable[str]
) -> list[SgRule]:
    """Flatten one IpPermission of a security group into rules."""
    low = -1 if from_port is None else from_port
    high = -1 if to_port is None else to_port
    return [SgRule(protocol, low, high, str(ipaddress.ip_network(c, strict=False))) for c in cidrs]


def health_from_aws(
    protocol: str | None, port: str | None, path: str | None, interval: int | None, timeout: int | None,
    healthy: int | None, unhealthy: int | None,
) -> HealthCheck:
    protocol = protocol or "TCP"
    return HealthCheck(
        protocol=protocol, port=port or TRAFFIC_PORT, path=path if protocol != "TCP" else None,
        interval_s=interval or 0, timeout_s=timeout or 0,
        healthy_threshold=healthy or 0, unhealthy_threshold=unhealthy or 0,
    )


# ─── what the last full ensure left behind ──────────────────────────────────────────────────────


@dataclass(frozen=True)
class KnownState:
    """What the last successful full ensure of one balancer read and wrote. Within its lifetime an
    ensure whose Service-side wishes are unchanged (only the nodes differ) registers and deregisters
    targets without reading the rest again; drift made by hand is corrected once it expires."""

    intent: ServiceIntent  # without its nodes, see `without_nodes`
    vpc_id: str
    node_security_groups: frozenset[str]  # every security group of the usable instances
    target_group_arns: tuple[str, ...]
    targets: frozenset[str]
    status: LoadBalancerStatus
    stamp: float


def without_nodes(intent: ServiceIntent) -> ServiceIntent:
    return dataclasses.replace(intent, instance_ids=(), node_of_instance=EMPTY)


def target_changes(
    known: KnownState | None, intent: ServiceIntent, usable: Sequence[InstanceInfo], now: float, lifetime_s: float
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(instances to register, instances to deregister) when only targets can differ from `known`;
    None when a full ensure is needed (no or expired knowledge, other wishes, other VPC or groups)."""
    if known is None or now - known.stamp >= lifetime_s or known.intent != without_nodes(intent):
        return None
    if {i.vpc_id for i in usable} != {known.vpc_id}:
        return None
    if frozenset(g for i in usable for g in i.security_groups) != known.node_security_groups:
        return None
    wanted = frozenset(i.id for i in usable)
    return tuple(sorted(wanted - known.targets)), tuple(sorted(known.targets - wanted))


# ─── results ────────────────────────────────────────────────────────────────────────────────────


def status_of(dns_name: str, ports: Sequence[PortStatus]) -> LoadBalancerStatus:
    """Ports sorted, so `ensure` and `get` report the same status for the same balancer."""
    ordered = tuple(sorted(ports, key=lambda p: (p.port, p.protocol)))
    return LoadBalancerStatus(ingress=(Ingress(hostname=dns_name, ports=ordered),))


def ports_of_listeners(listeners: Iterable[tuple[int, str]]) -> tuple[PortStatus, ...]:
    """What a Service sees of an NLB's listeners: TLS is TCP; TCP_UDP is both."""
    result: list[PortStatus] = []
    for port, protocol in sorted(listeners):
        if protocol == "TCP_UDP":
            result += [PortStatus(port, "TCP"), PortStatus(port, "UDP")]
        else:
            result.append(PortStatus(port, "UDP" if protocol == "UDP" else "TCP"))
    return tuple(result)


def ref_from_tags(name: str, cluster_name: str, tags: Mapping[str, str]) -> LoadBalancerRef | None:
    """A balancer is this cluster's when tagged owned for it and with the Service it serves."""
    if tags.get(TAG_CLUSTER_PREFIX + cluster_name) != "owned":
        return None
    namespace, sep, service = tags.get(TAG_SERVICE_NAME, "").partition("/")
    if not sep or not namespace or not service:
        return None
    return LoadBalancerRef(
        name=name, cluster_name=cluster_name, namespace=namespace, service_name=service,
        uid=tags.get(TAG_SERVICE_UID) or None,
    )


def check_owner(desired_tags: Mapping[str, str], observed_tags: Mapping[str, str], name: str) -> None:
    """An NLB named like ours but serving another Service or cluster is never adopted."""
    for key in (TAG_SERVICE_UID, TAG_SERVICE_NAME):
        if key in observed_tags and observed_tags[key] != desired_tags[key]:
            raise InvalidServiceError(
                f"an NLB named {name} already exists for {observed_tags[key]}", field="metadata.uid",
                fix="delete that NLB or the other Service; NLB names come from the Service UID",
            )
    if not any(k.startswith(TAG_CLUSTER_PREFIX) and k in desired_tags for k in observed_tags):
        raise InvalidServiceError(
            f"an NLB named {name} already exists and is not tagged for this cluster", field="metadata.uid",
            fix="delete that NLB or tag it for this cluster",
        )


ErrorKind = Literal["retry", "quota", "other"]


def classify_error(code: str, http_status: int) -> ErrorKind:
    if is_retryable_error(code, http_status):
        return "retry"
    if is_quota_error(code):
        return "quota"
    return "other"
