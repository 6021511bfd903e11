"""Kubernetes objects → ServiceState (pure). Objects may be malformed: every field is read
defensively, and what cannot be used is reported as a Problem and left out, never raised.

Endpoint choice follows kube-proxy: ready endpoints; when there are none, endpoints that are
serving and terminating (so connections drain instead of failing); for externalTrafficPolicy
Local only this node's.

Both IP families: a Service's families are its spec.ipFamilies; EndpointSlices of addressType
IPv4 and IPv6 give the endpoints of each, and an address, endpoint or source range of a family the
Service does not have is reported and left out. Addresses are kept in their canonical text (IPv6
compressed, lower case), as nft prints them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lbctl.forwarder.fields import SliceEndpoint
from lbctl.forwarder.state import IPV4, IPV6, TCP, UDP, Backend, Problem, ServicePort, ServiceState
from lbctl.model.meta import LOCAL_CLASS, SERVICE_NAME_LABEL, SOURCE_RANGES_ANNOTATION, key
from lbctl.model.scope import Scope

DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' default for sessionAffinityConfig.clientIP
MAX_AFFINITY_TIMEOUT = 86400
_PROTOCOLS = {"TCP": TCP, "UDP": UDP}
_FAMILIES = {"IPv4": IPV4, "IPv6": IPV6}
_FAMILY_NAMES = {IPV4: "IPv4", IPV6: "IPv6"}
PodNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BuildContext:
    """What building depends on besides the objects themselves."""

    node: str
    scope: Scope
    announce_classes: frozenset[str] = frozenset({LOCAL_CLASS})
    # Endpoints must lie in one of these of their family (none of it: anywhere but loopback,
    # link-local, multicast…)
    pod_networks: tuple[PodNetwork, ...] = ()


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def _sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _port(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        return None
    return value


def service_key(obj: Mapping[str, Any]) -> str:
    meta = _mapping(obj.get("metadata"))
    return key(_text(meta.get("namespace")), _text(meta.get("name")))


def slice_service_key(obj: Mapping[str, Any]) -> str | None:
    """The Service an EndpointSlice belongs to (its kubernetes.io/service-name label)."""
    meta = _mapping(obj.get("metadata"))
    name = _text(_mapping(meta.get("labels")).get(SERVICE_NAME_LABEL))
    return key(_text(meta.get("namespace")), name) if name else None


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(ip: str) -> Address:
    """ipaddress.ip_address, with the text read by the C library when it can (what ipaddress does
    in Python was most of building 10,000 Services); anything inet_pton refuses (a zone index,
    garbage) is left to ipaddress, which decides."""
    try:
        if ":" in ip:
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, ip))
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, ip))
    except (OSError, ValueError):
        return ipaddress.ip_address(ip)


def _canonical(ip: str) -> tuple[str, int]:
    """`ip` in its canonical text, and its family; ValueError for what is no address. Dotted
    decimal that inet_pton takes is canonical already (no leading zeros, each part 0-255)."""
    try:
        socket.inet_pton(socket.AF_INET, ip)
        return ip, IPV4
    except OSError:
        address = _parse(ip)
        return str(address), address.version


_IPV4_ANY = bytes(4)


def _endpoint_address(ip: str, pod_networks: Sequence[PodNetwork]) -> tuple[str, int, str | None]:
    """`ip` in its canonical text and its family (4 or 6; 0 when it is no address), and why it
    must not be a DNAT target (None: it may be). A start-up sync of 10,000 Services checks 50,000
    endpoints: an IPv4 address is judged on its four bytes, as ipaddress would judge it, without
    ipaddress's objects (which were half the time of building them)."""
    try:
        packed = socket.inet_pton(socket.AF_INET, ip)  # dotted decimal only, no leading zeros: canonical
    except OSError:
        return _endpoint_address_by_ipaddress(ip, pod_networks)
    first = packed[0]
    if first == 127 or first >= 224 or (first == 169 and packed[1] == 254) or packed == _IPV4_ANY:
        return ip, IPV4, f"{ip} is a loopback, link-local, multicast or reserved address"
    nets = [n for n in pod_networks if n.version == IPV4]
    if nets and not any(ipaddress.IPv4Address(packed) in net for net in nets):
        return ip, IPV4, f"{ip} is outside the pod network ({', '.join(str(n) for n in nets)})"
    return ip, IPV4, None


def _endpoint_address_by_ipaddress(ip: str, pod_networks: Sequence[PodNetwork]) -> tuple[str, int, str | None]:
    try:
        address = _parse(ip)
    except ValueError:
        return ip, 0, f"{ip!r} is not an IP address"
    text, version = str(address), address.version
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return text, version, (f"{ip} is an IPv4-mapped IPv6 address (list it as {address.ipv4_mapped} in an IPv4 "
                               "EndpointSlice)")
    if address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified \
            or address.is_reserved or address == _BROADCAST:
        return text, version, f"{ip} is a loopback, link-local, multicast or reserved address"
    nets = [n for n in pod_networks if n.version == address.version]
    if nets and not any(address in net for net in nets):
        return text, version, f"{ip} is outside the pod network ({', '.join(str(n) for n in nets)})"
    return text, version, None


def endpoint_ip_problem(ip: str, pod_networks: Sequence[PodNetwork]) -> str | None:
    """Why `ip` must not be a DNAT target, or None when it may be."""
    return _endpoint_address(ip, pod_networks)[2]


def _families(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """spec.ipFamilies as 4 and/or 6 (the apiserver always sets it; IPv4 when it is missing)."""
    families = {_FAMILIES[f] for f in _sequence(spec.get("ipFamilies")) if isinstance(f, str) and f in _FAMILIES}
    return tuple(sorted(families)) or (IPV4,)


def _names(families: Sequence[int]) -> str:
    return "[" + ", ".join(_FAMILY_NAMES[f] for f in families) + "]"


class _Endpoint(NamedTuple):  # a tuple: 50,000 are made at start-up, and a frozen dataclass is slow to make
    ip: str
    node: str
    ready: bool
    serving: bool
    terminating: bool


def _slice_endpoints(
    key: str, slices: Iterable[Mapping[str, Any]], pod_networks: Sequence[PodNetwork], families: Sequence[int],
    problems: list[Problem],
) -> list[tuple[Mapping[str, Any], list[_Endpoint]]]:
    """Per IPv4 or IPv6 slice of one of the Service's families: the slice and its usable endpoints."""
    result = []
    for obj in slices:
        if not isinstance(obj, Mapping):
            continue
        family = _FAMILIES.get(_text(obj.get("addressType")))
        if family is None:
            continue  # FQDN slices carry no address to forward to
        slice_name = _text(_mapping(obj.get("metadata")).get("name"))
        if family not in families:
            problems.append(Problem(key, f"EndpointSlice {slice_name}: addressType",
                                    f"{_FAMILY_NAMES[family]} endpoints for a Service whose spec.ipFamilies is "
                                    f"{_names(families)}; slice ignored (add {_FAMILY_NAMES[family]} to "
                                    "spec.ipFamilies, with ipFamilyPolicy PreferDualStack)"))
            continue
        endpoints = []
        for index, raw in enumerate(_sequence(obj.get("endpoints"))):
            if type(raw) is SliceEndpoint:  # as the watch cache keeps it
                first, conditions, node = raw
                if first is None:
                    continue
            else:  # as the apiserver sends it
                item = _mapping(raw)
                addresses = _sequence(item.get("addresses"))
                if not addresses:
                    continue
                first, conditions, node = addresses[0], item.get("conditions"), item.get("nodeName")
            raw_ip = _text(first)
            ip, version, problem = _endpoint_address(raw_ip, pod_networks)
            if not problem and version != family:
                problem = f"{raw_ip} is not an {_FAMILY_NAMES[family]} address (the slice's addressType)"
            if problem:
                problems.append(Problem(key, f"EndpointSlice {slice_name}: endpoints[{index}].addresses[0]",
                                        f"{problem}; endpoint ignored"))
                continue
            ip = raw_ip if ip == raw_ip else ip  # the cache's string when it is canonical: one copy
            conditions = _mapping(conditions)
            ready = conditions.get("ready") is not False  # unset means ready (API contract)
            serving = conditions.get("serving") is not False if "serving" in conditions else ready
            endpoints.append(_Endpoint(ip=ip, node=_text(node), ready=ready, serving=serving,
                                       terminating=conditions.get("terminating") is True))
        result.append((obj, endpoints))
    return result


def _slice_port(obj: Mapping[str, Any], name: str, protocol: str) -> int | None:
    for raw in _sequence(obj.get("ports")):
        item = _mapping(raw)
        if _text(item.get("name")) == name and _PROTOCOLS.get(_text(item.get("protocol")) or "TCP") == protocol:
            return _port(item.get("port"))
    return None


def _choose(candidates: list[Backend], terminating: list[Backend]) -> tuple[Backend, ...]:
    # one Backend per (ip, port), sorted by them: keyed by plain tuples, hashed and compared in C
    unique: dict[tuple[str, int], Backend] = {}
    for backend in candidates or terminating:
        unique.setdefault((backend.ip, backend.port), backend)
    return tuple(unique[k] for k in sorted(unique))


def _source_ranges(key: str, spec: Mapping[str, Any], annotations: Mapping[str, Any], families: Sequence[int],
                   problems: list[Problem]) -> tuple[str, ...] | None:
    field_name = "spec.loadBalancerSourceRanges"
    raw: Sequence[Any] = _sequence(spec.get("loadBalancerSourceRanges"))
    if not raw and _text(annotations.get(SOURCE_RANGES_ANNOTATION)).strip():
        field_name = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
        raw = [part.strip() for part in _text(annotations.get(SOURCE_RANGES_ANNOTATION)).split(",")]
    if not raw:
        return None
    ranges: list[str] = []
    for index, item in enumerate(raw):
        try:
            network = ipaddress.ip_network(_text(item).strip(), strict=False)
        except ValueError:
            # Fail closed: a range we cannot read allows nobody, rather than everybody.
            problems.append(Problem(key, f"{field_name}[{index}]",
                                    f"{item!r} is not a CIDR; it admits no one (fix the entry, e.g. 203.0.113.0/24)"))
            continue
        if network.version not in families:
            problems.append(Problem(key, f"{field_name}[{index}]",
                                    f"{item!r} is {_FAMILY_NAMES[network.version]} but the Service's spec.ipFamilies "
                                    f"is {_names(families)}; it admits no one (remove it, or make the Service "
                                    "dual-stack)"))
            continue
        if str(network) not in ranges:
            ranges.append(str(network))
    return tuple(ranges)


def _affinity(key: str, spec: Mapping[str, Any], problems: list[Problem]) -> int | None:
    if spec.get("sessionAffinity") != "ClientIP":
        return None
    config = _mapping(_mapping(spec.get("sessionAffinityConfig")).get("clientIP"))
    if "timeoutSeconds" not in config:
        return DEFAULT_AFFINITY_TIMEOUT
    timeout = config.get("timeoutSeconds")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
        problems.append(Problem(key, "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                f"{timeout!r} is not 1..{MAX_AFFINITY_TIMEOUT}; using {DEFAULT_AFFINITY_TIMEOUT}"))
        return DEFAULT_AFFINITY_TIMEOUT
    return timeout


def _lb_ips(key: str, status: Mapping[str, Any], families: Sequence[int], problems: list[Problem]) -> tuple[str, ...]:
    ips: list[str] = []
    ingress = _sequence(_mapping(status.get("loadBalancer")).get("ingress"))
    for index, raw in enumerate(ingress):
        item = _mapping(raw)
        ip = _text(item.get("ip"))
        # ipMode Proxy: the balancer delivers to the node's own address, so the LB IP is not ours
        if not ip or item.get("ipMode") == "Proxy":
            continue
        try:
            text, version = _canonical(ip)
        except ValueError:
            problems.append(Problem(key, f"status.loadBalancer.ingress[{index}].ip", f"{ip!r} is not an address"))
            continue
        if version not in families:
            problems.append(Problem(key, f"status.loadBalancer.ingress[{index}].ip",
                                    f"{ip} is {_FAMILY_NAMES[version]} but the Service's spec.ipFamilies is "
                                    f"{_names(families)}; not forwarded"))
            continue
        if text not in ips:  # canonical text: nft prints IPv6 compressed
            ips.append(text)
    return tuple(ips)


def build_service(
    service: Mapping[str, Any], slices: Iterable[Mapping[str, Any]], context: BuildContext,
) -> tuple[ServiceState | None, list[Problem]]:
    """The ServiceState for one Service, or None when it is not ours; never raises on bad data."""
    problems: list[Problem] = []
    if not isinstance(service, Mapping) or not context.scope.manages(service):
        return None, problems
    key = service_key(service)
    meta = _mapping(service.get("metadata"))
    spec = _mapping(service.get("spec"))
    local_only = spec.get("externalTrafficPolicy") == "Local"
    families = _families(spec)

    per_slice = _slice_endpoints(key, slices, context.pod_networks, families, problems)
    endpoint_nodes = frozenset(e.node for _, eps in per_slice for e in eps if e.ready and e.node)
    local_ips = {e.ip for _, eps in per_slice for e in eps if e.ready and e.node == context.node}
    # a dual-stack pod is one endpoint in each family's slice: count the larger family
    local_count = max(sum(1 for ip in local_ips if (":" in ip) == (f == IPV6)) for f in (IPV4, IPV6))

    ports: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    for index, raw in enumerate(_sequence(spec.get("ports"))):
        item = _mapping(raw)
        where = f"spec.ports[{index}]"
        protocol = _PROTOCOLS.get(_text(item.get("protocol")) or "TCP")
        if protocol is None:
            problems.append(Problem(key, f"{where}.protocol",
                                    f"{item.get('protocol')!r} is not carried by the forwarder (TCP and UDP are)"))
            continue
        port = _port(item.get("port"))
        if port is None or (protocol, port) in seen:
            problems.append(Problem(key, f"{where}.port", f"{item.get('port')!r} is not a usable, unique port"))
            continue
        seen.add((protocol, port))
        node_port = _port(item.get("nodePort")) if item.get("nodePort") is not None else None
        name = _text(item.get("name"))
        ready: list[Backend] = []
        terminating: list[Backend] = []
        for obj, endpoints in per_slice:
            target = _slice_port(obj, name, protocol)
            if target is None:
                continue
            for ep in endpoints:
                if local_only and ep.node != context.node:
                    continue
                backend = Backend(ep.ip, target, ep.node)
                if ep.ready:
                    ready.append(backend)
                elif ep.serving and ep.terminating:
                    terminating.append(backend)
        ports.append(ServicePort(name=name, protocol=protocol, port=port, node_port=node_port,
                                 backends=_choose(ready, terminating)))

    status = _mapping(service.get("status"))
    health = _port(spec.get("healthCheckNodePort")) if local_only else None
    state = ServiceState(
        key=key,
        uid=_text(meta.get("uid")),
        created=_text(meta.get("creationTimestamp")),
        ports=tuple(ports),
        lb_ips=_lb_ips(key, status, families, problems),
        local_only=local_only,
        source_ranges=_source_ranges(key, spec, _mapping(meta.get("annotations")), families, problems),
        affinity_timeout=_affinity(key, spec, problems),
        health_check_node_port=health,
        announce=_text(spec.get("loadBalancerClass")) in context.announce_classes,
        endpoint_nodes=endpoint_nodes,
        local_endpoints=local_count,
        families=families,
    )
    return state, problems
