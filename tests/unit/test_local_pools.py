"""Table tests for the local provider's pools and address allocator (providers/local_pools.py)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import pytest

from lbctl.model.errors import InvalidServiceError, LoadBalancerError, PendingError
from lbctl.model.types import Ingress, LoadBalancerSpec, PortSpec, ServiceRef
from providers.local_pools import (
    FIELD_LOAD_BALANCER_IP,
    POOL_API_VERSION,
    Allocator,
    Pool,
    PoolError,
    PoolUsage,
    ServiceRequest,
    _FreeSpace,
    check_source_ranges,
    may_serve,
    overlapping_pools,
    parse_pool,
    request_from_spec,
    requested_ips,
    service_request,
    wanted_families,
)

LB_IPS = "metadata.annotations[lbctl.io/load-balancer-ips]"
METALLB_IPS = "metadata.annotations[metallb.io/loadBalancerIPs]"
POOL_FIELD = "metadata.annotations[lbctl.io/address-pool]"
METALLB_POOL_FIELD = "metadata.annotations[metallb.io/address-pool]"
SHARING_FIELD = "metadata.annotations[lbctl.io/allow-shared-ip]"
DUAL = ("IPv4", "IPv6")


def pool_object(name: str, *addresses: Any, created: str = "", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": "LoadBalancerPool",
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"addresses": list(addresses), **spec},
    }


def pool(name: str, *addresses: Any, created: str = "", **spec: Any) -> Pool:
    return parse_pool(pool_object(name, *addresses, created=created, **spec))


def req(
    key: str,
    *,
    ips: tuple[str, ...] = (),
    current: tuple[str, ...] = (),
    ports: tuple[tuple[str, int], ...] = (("TCP", 80),),
    **fields: Any,
) -> ServiceRequest:
    return ServiceRequest(
        key=key,
        namespace=key.split("/")[0],
        ports=frozenset(ports),
        requested_ips=tuple(ip_address(i) for i in ips),
        current_ips=tuple(ip_address(i) for i in current),
        **fields,
    )


# --------------------------------------------------------------------------------------------
# Pool parsing
# --------------------------------------------------------------------------------------------


def v4(text: str) -> int:
    return int(ip_address(text))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"addresses": ["192.168.10.0/24"]},
            {"ranges": [(4, v4("192.168.10.0"), v4("192.168.10.255"))], "auto_assign": True,
             "avoid_buggy_ips": False, "priority": 0, "namespaces": frozenset(), "service_selector": None},
            id="cidr-and-defaults",
        ),
        pytest.param(
            {"addresses": [" 192.168.10.10 - 192.168.10.20 "]},
            {"ranges": [(4, v4("192.168.10.10"), v4("192.168.10.20"))]},
            id="range-with-spaces",
        ),
        pytest.param(
            {"addresses": ["10.0.0.7"]}, {"ranges": [(4, v4("10.0.0.7"), v4("10.0.0.7"))]}, id="single-address"
        ),
        pytest.param(
            {"addresses": ["192.168.10.5/24"]},
            {"ranges": [(4, v4("192.168.10.0"), v4("192.168.10.255"))]},
            id="cidr-host-bits-taken-as-network",
        ),
        pytest.param(
            {"addresses": ["fc00::/120", "fd00::1-fd00::3"]},
            {"ranges": [(6, int(ip_address("fc00::")), int(ip_address("fc00::ff"))),
                        (6, int(ip_address("fd00::1")), int(ip_address("fd00::3")))]},
            id="ipv6",
        ),
        pytest.param(
            {"addresses": ["10.0.1.0/24", "10.0.0.0/24"]},
            {"ranges": [(4, v4("10.0.0.0"), v4("10.0.0.255")), (4, v4("10.0.1.0"), v4("10.0.1.255"))]},
            id="adjacent-entries-sorted",
        ),
        pytest.param(
            {"addresses": ["10.0.0.0/24"], "autoAssign": False, "avoidBuggyIPs": True, "priority": 3,
             "namespaces": ["a", "b"]},
            {"auto_assign": False, "avoid_buggy_ips": True, "priority": 3, "namespaces": frozenset({"a", "b"})},
            id="options",
        ),
        pytest.param(
            {"addresses": ["10.0.0.0/24"], "autoAssign": None, "priority": None, "namespaces": None},
            {"auto_assign": True, "priority": 0, "namespaces": frozenset()},
            id="nulls-are-defaults",
        ),
    ],
)
def test_parse_pool(spec: dict[str, Any], expected: dict[str, Any]) -> None:
    parsed = parse_pool({"apiVersion": POOL_API_VERSION, "metadata": {"name": "p"}, "spec": spec})
    assert parsed.name == "p"
    for attribute, value in expected.items():
        if attribute == "ranges":
            assert [(r.version, r.first, r.last) for r in parsed.ranges] == value
        else:
            assert getattr(parsed, attribute) == value


def test_parse_pool_reads_creation_time_and_keeps_sources() -> None:
    parsed = pool("p", "10.0.0.0/30", "fc00::1", created="2024-05-01T10:00:00Z")
    assert parsed.created == "2024-05-01T10:00:00Z"
    assert [(r.source, r.position) for r in parsed.ranges] == [("10.0.0.0/30", 0), ("fc00::1", 1)]
    assert parsed.families == frozenset({4, 6})


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"metadata": {}, "spec": {"addresses": ["10.0.0.0/24"]}}, "metadata.name: a pool needs a name"),
        ({"spec": {"addresses": ["10.0.0.0/24"]}}, "metadata.name: a pool needs a name"),
        ({**pool_object("p", "10.0.0.0/24"), "apiVersion": "metallb.io/v1beta1"},
         "apiVersion: 'metallb.io/v1beta1' is not lbctl.io/v1alpha1"),
        ({"metadata": {"name": "p"}}, "spec: a pool needs a spec with addresses"),
        (pool_object("p"), "spec.addresses: a pool needs at least one CIDR, a-b range or address"),
        ({"metadata": {"name": "p"}, "spec": {"addresses": "10.0.0.0/24"}},
         "spec.addresses: a pool needs at least one CIDR, a-b range or address"),
        (pool_object("p", "10.0.0.0/24", "10.1.0.0/24", "10.0.0.300"),
         "spec.addresses[2]: '10.0.0.300' is not an address, CIDR or a-b range"),
        (pool_object("p", 42), "spec.addresses[0]: 42 is not an address, CIDR or a-b range"),
        (pool_object("p", "10.0.0.0/33"), "spec.addresses[0]: '10.0.0.0/33' is not an address, CIDR or a-b range"),
        (pool_object("p", "10.0.0.1-"), "spec.addresses[0]: '10.0.0.1-' is not an address, CIDR or a-b range"),
        (pool_object("p", "10.0.0.9-10.0.0.1"), "spec.addresses[0]: '10.0.0.9-10.0.0.1' starts after it ends"),
        (pool_object("p", "10.0.0.1-fc00::1"), "spec.addresses[0]: '10.0.0.1-fc00::1' mixes IPv4 and IPv6"),
        (pool_object("p", "fe80::1%eth0"),
         "spec.addresses[0]: 'fe80::1%eth0' is not an address, CIDR or a-b range"),
        (pool_object("p", "fd00::/120", "fe80::10-fe80::20"),
         "spec.addresses[1]: 'fe80::10-fe80::20' overlaps link-local fe80::/10: no load-balancer address can be "
         "one; give unicast addresses routable on the LAN"),
        (pool_object("p", "ff02::1"),
         "spec.addresses[0]: 'ff02::1' overlaps multicast ff00::/8: no load-balancer address can be "
         "one; give unicast addresses routable on the LAN"),
        (pool_object("p", "169.254.1.0/24"),
         "spec.addresses[0]: '169.254.1.0/24' overlaps link-local 169.254.0.0/16: no load-balancer address can "
         "be one; give unicast addresses routable on the LAN"),
        (pool_object("p", "223.255.255.0-224.0.0.10"),
         "spec.addresses[0]: '223.255.255.0-224.0.0.10' overlaps multicast 224.0.0.0/4: no load-balancer address "
         "can be one; give unicast addresses routable on the LAN"),
        (pool_object("p", "::/0"),
         "spec.addresses[0]: '::/0' overlaps the unspecified address ::: no load-balancer address can be "
         "one; give unicast addresses routable on the LAN"),
        (pool_object("p", "10.0.0.0/24", "10.0.0.128-10.0.1.5"),
         "spec.addresses[1]: '10.0.0.128-10.0.1.5' overlaps spec.addresses[0] ('10.0.0.0/24')"),
        (pool_object("p", "10.0.0.5", "10.0.0.0/24"),
         "spec.addresses[1]: '10.0.0.0/24' overlaps spec.addresses[0] ('10.0.0.5')"),
        (pool_object("p", "10.0.0.0/24", autoAssign="yes"), "spec.autoAssign: 'yes' is not true or false"),
        (pool_object("p", "10.0.0.0/24", avoidBuggyIPs=1), "spec.avoidBuggyIPs: 1 is not true or false"),
        (pool_object("p", "10.0.0.0/24", priority=-1),
         "spec.priority: -1 is not a whole number ≥ 0 (1 is preferred, 0 means none)"),
        (pool_object("p", "10.0.0.0/24", priority=True),
         "spec.priority: True is not a whole number ≥ 0 (1 is preferred, 0 means none)"),
        (pool_object("p", "10.0.0.0/24", priority="1"),
         "spec.priority: '1' is not a whole number ≥ 0 (1 is preferred, 0 means none)"),
        (pool_object("p", "10.0.0.0/24", namespaces="a"), "spec.namespaces: must be a list of namespace names"),
        (pool_object("p", "10.0.0.0/24", namespaces=["a", ""]), "spec.namespaces: must be a list of namespace names"),
        (pool_object("p", "10.0.0.0/24", namespaces=["a", "a"]), "spec.namespaces: lists a namespace twice"),
        (pool_object("p", "10.0.0.0/24", serviceSelector=["tier"]),
         "spec.serviceSelector: must be an object with matchLabels and/or matchExpressions"),
        (pool_object("p", "10.0.0.0/24", serviceSelector={"matchLabels": {"tier": 1}}),
         "spec.serviceSelector.matchLabels: must map label names to string values"),
        (pool_object("p", "10.0.0.0/24", serviceSelector={"matchExpressions": [{"key": "a", "operator": "Has"}]}),
         "spec.serviceSelector.matchExpressions[0].operator: 'Has' is not In, NotIn, Exists or DoesNotExist"),
        (pool_object("p", "10.0.0.0/24", serviceSelector={"matchExpressions": [{"operator": "Exists"}]}),
         "spec.serviceSelector.matchExpressions[0].key: a non-empty label name is required"),
        (pool_object("p", "10.0.0.0/24", serviceSelector={"matchExpressions": [
            {"key": "a", "operator": "Exists"}, {"key": "b", "operator": "In", "values": []}]}),
         "spec.serviceSelector.matchExpressions[1].values: In needs at least one value"),
        (pool_object("p", "10.0.0.0/24", serviceSelector={"matchExpressions": [
            {"key": "a", "operator": "DoesNotExist", "values": ["x"]}]}),
         "spec.serviceSelector.matchExpressions[0].values: DoesNotExist takes no values"),
    ],
)
def test_parse_pool_rejects(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(PoolError) as caught:
        parse_pool(obj)
    assert str(caught.value) == message
    assert caught.value.field == message.split(":")[0]


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({}, {}, True),
        ({}, {"any": "thing"}, True),
        ({"matchLabels": {"tier": "web"}}, {"tier": "web", "x": "y"}, True),
        ({"matchLabels": {"tier": "web"}}, {"tier": "db"}, False),
        ({"matchLabels": {"tier": "web"}}, {}, False),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "stage"]}]}, {"env": "stage"}, True),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}, {"env": "dev"}, False),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}, {}, False),
        ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}, {}, True),
        ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}, {"env": "dev"}, True),
        ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}, {"env": "prod"}, False),
        ({"matchExpressions": [{"key": "env", "operator": "Exists"}]}, {"env": ""}, True),
        ({"matchExpressions": [{"key": "env", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, {"env": "x"}, False),
        ({"matchLabels": {"tier": "web"}, "matchExpressions": [{"key": "env", "operator": "Exists"}]},
         {"tier": "web"}, False),
        ({"matchLabels": {"tier": "web"}, "matchExpressions": [{"key": "env", "operator": "Exists"}]},
         {"tier": "web", "env": "x"}, True),
    ],
)
def test_service_selector(selector: dict[str, Any], labels: dict[str, str], matches: bool) -> None:
    parsed = pool("p", "10.0.0.0/24", serviceSelector=selector)
    assert parsed.admits("any", labels) is matches


@pytest.mark.parametrize(
    ("pools", "expected"),
    [
        pytest.param([pool("a", "10.0.0.0/25"), pool("b", "10.0.0.128/25"), pool("c", "fc00::/64")], [],
                     id="adjacent-and-other-family"),
        pytest.param(
            [pool("b", "10.0.0.128/25"), pool("a", "10.0.0.0/24")],
            [("b", "a", "spec.addresses[0]: '10.0.0.128/25' overlaps '10.0.0.0/24' of pool 'a', which is older; "
                        "this pool is not used until the overlap is removed")],
            id="same-age-name-decides",
        ),
        pytest.param(
            [pool("a", "10.0.0.0/24", created="2024-03-01T00:00:00Z"),
             pool("b", "10.0.0.128/25", created="2024-01-01T00:00:00Z")],
            [("a", "b", "spec.addresses[0]: '10.0.0.0/24' overlaps '10.0.0.128/25' of pool 'b', which is older; "
                        "this pool is not used until the overlap is removed")],
            id="older-pool-keeps-its-addresses",
        ),
        pytest.param(
            [pool("a", "10.0.0.0-10.0.0.127"), pool("b", "10.0.0.100-10.0.0.200"), pool("c", "10.0.0.150-10.0.0.250")],
            [("b", "a", "spec.addresses[0]: '10.0.0.100-10.0.0.200' overlaps '10.0.0.0-10.0.0.127' of pool 'a', "
                        "which is older; this pool is not used until the overlap is removed")],
            id="rejected-pool-does-not-reject-others",
        ),
        pytest.param(
            [pool("a", "fc00::/64"), pool("b", "10.1.0.0/24", "fc00::5")],
            [("b", "a", "spec.addresses[1]: 'fc00::5' overlaps 'fc00::/64' of pool 'a', which is older; "
                        "this pool is not used until the overlap is removed")],
            id="names-the-entry",
        ),
    ],
)
def test_overlapping_pools(pools: list[Pool], expected: list[tuple[str, str, str]]) -> None:
    assert [(o.rejected.name, o.kept.name, o.message) for o in overlapping_pools(pools)] == expected


@pytest.mark.parametrize(
    ("addresses", "avoid", "usable"),
    [
        (["10.0.0.0/24"], False, 256),
        (["10.0.0.0/24"], True, 254),
        (["10.0.0.0/16"], True, 65536 - 512),
        (["10.0.0.250-10.0.1.5"], True, 10),
        (["10.0.0.1-10.0.0.254"], True, 254),
        (["10.0.0.255-10.0.1.0"], True, 0),
        (["fc00::/64"], True, 2**64),
        (["fc00::/120", "10.0.0.0/30"], True, 256 + 3),
    ],
)
def test_pool_capacity(addresses: list[str], avoid: bool, usable: int) -> None:
    allocator = Allocator([pool("p", *addresses, avoidBuggyIPs=avoid)])
    assert allocator.pool_stats() == {"p": PoolUsage(assigned=0, free=usable)}


# --------------------------------------------------------------------------------------------
# What a Service asks for
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load_balancer_ip", "annotations", "addresses", "field"),
    [
        (None, {}, (), FIELD_LOAD_BALANCER_IP),
        ("  ", {"lbctl.io/load-balancer-ips": ""}, (), FIELD_LOAD_BALANCER_IP),
        ("10.0.0.1", {}, ("10.0.0.1",), FIELD_LOAD_BALANCER_IP),
        (None, {"lbctl.io/load-balancer-ips": "10.0.0.1, fc00::1"}, ("10.0.0.1", "fc00::1"), LB_IPS),
        (None, {"metallb.io/loadBalancerIPs": "fc00::1"}, ("fc00::1",), METALLB_IPS),
        (None, {"lbctl.io/load-balancer-ips": "10.0.0.1,fc00::1", "metallb.io/loadBalancerIPs": "fc00::1,10.0.0.1"},
         ("10.0.0.1", "fc00::1"), LB_IPS),
        ("10.0.0.1", {"lbctl.io/load-balancer-ips": "10.0.0.1,fc00::1"}, ("10.0.0.1", "fc00::1"), LB_IPS),
    ],
)
def test_requested_ips(
    load_balancer_ip: str | None, annotations: dict[str, str], addresses: tuple[str, ...], field: str
) -> None:
    got = requested_ips(load_balancer_ip, annotations)
    assert got.addresses == tuple(ip_address(a) for a in addresses)
    assert got.field == field


@pytest.mark.parametrize(
    ("load_balancer_ip", "annotations", "field", "problem"),
    [
        ("10.0.0.300", {}, FIELD_LOAD_BALANCER_IP, "'10.0.0.300' is not an IP address"),
        ("fe80::1%eth0", {}, FIELD_LOAD_BALANCER_IP, "'fe80::1%eth0' is not an IP address"),
        (None, {"lbctl.io/load-balancer-ips": "10.0.0.1,bogus"}, LB_IPS, "'bogus' is not an IP address"),
        (None, {"metallb.io/loadBalancerIPs": "10.0.0.1,"}, METALLB_IPS, "'' is not an IP address"),
        (None, {"lbctl.io/load-balancer-ips": "10.0.0.1,10.0.0.2"}, LB_IPS,
         "'10.0.0.1,10.0.0.2' has more than one IPv4 address"),
        ("10.0.0.9", {"lbctl.io/load-balancer-ips": "10.0.0.1"}, FIELD_LOAD_BALANCER_IP,
         f"'10.0.0.9' disagrees with {LB_IPS} ('10.0.0.1')"),
        ("10.0.0.9", {"metallb.io/loadBalancerIPs": "10.0.0.1"}, FIELD_LOAD_BALANCER_IP,
         f"'10.0.0.9' disagrees with {METALLB_IPS} ('10.0.0.1')"),
        (None, {"lbctl.io/load-balancer-ips": "10.0.0.1", "metallb.io/loadBalancerIPs": "10.0.0.2"}, LB_IPS,
         f"'10.0.0.1' disagrees with {METALLB_IPS} ('10.0.0.2')"),
    ],
)
def test_requested_ips_rejects(
    load_balancer_ip: str | None, annotations: dict[str, str], field: str, problem: str
) -> None:
    with pytest.raises(InvalidServiceError) as caught:
        requested_ips(load_balancer_ip, annotations)
    assert (caught.value.field, caught.value.problem) == (field, problem)
    assert caught.value.fix


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, {"pool": None, "pool_field": POOL_FIELD, "sharing_key": None}),
        ({"lbctl.io/address-pool": "lan"}, {"pool": "lan", "pool_field": POOL_FIELD}),
        ({"metallb.io/address-pool": "lan"}, {"pool": "lan", "pool_field": METALLB_POOL_FIELD}),
        ({"lbctl.io/address-pool": "lan", "metallb.io/address-pool": "lan"}, {"pool": "lan", "pool_field": POOL_FIELD}),
        ({"lbctl.io/allow-shared-ip": "dns"}, {"sharing_key": "dns", "sharing_key_field": SHARING_FIELD}),
        ({"metallb.io/allow-shared-ip": "dns"},
         {"sharing_key": "dns", "sharing_key_field": "metadata.annotations[metallb.io/allow-shared-ip]"}),
        ({"lbctl.io/allow-shared-ip": ""}, {"sharing_key": None}),
    ],
)
def test_service_request_annotations(annotations: dict[str, str], expected: dict[str, Any]) -> None:
    request = service_request(key="a/s", namespace="a", annotations=annotations)
    for attribute, value in expected.items():
        assert getattr(request, attribute) == value


@pytest.mark.parametrize(
    ("annotations", "field", "problem"),
    [
        ({"lbctl.io/address-pool": "lan", "metallb.io/address-pool": "wan"}, POOL_FIELD,
         f"'lan' disagrees with {METALLB_POOL_FIELD} ('wan')"),
        ({"lbctl.io/allow-shared-ip": "a", "metallb.io/allow-shared-ip": "b"}, SHARING_FIELD,
         "'a' disagrees with metadata.annotations[metallb.io/allow-shared-ip] ('b')"),
    ],
)
def test_service_request_rejects_disagreeing_annotations(
    annotations: dict[str, str], field: str, problem: str
) -> None:
    with pytest.raises(InvalidServiceError) as caught:
        service_request(key="a/s", namespace="a", annotations=annotations)
    assert (caught.value.field, caught.value.problem) == (field, problem)


def test_service_request_plain_fields() -> None:
    request = service_request(
        key="a/s", namespace="a", labels={"tier": "web"}, load_balancer_ip="10.0.0.5",
        ports=[("tcp", 80), ("UDP", 53)], external_traffic_policy="Local", selector={"app": "x"},
        ip_families=["IPv6", "IPv4"], ip_family_policy="PreferDualStack",
        ingress_ips=[None, "lb.example.com", "10.0.0.5", "fc00::5"], created="2024-01-01T00:00:00Z",
    )
    assert request.ports == frozenset({("TCP", 80), ("UDP", 53)})
    assert request.requested_ips == (ip_address("10.0.0.5"),)
    assert request.current_ips == (ip_address("10.0.0.5"), ip_address("fc00::5"))
    assert request.ip_families == ("IPv6", "IPv4")
    assert request.backend_key == "Local:app=x"
    assert (request.labels, request.created) == ({"tier": "web"}, "2024-01-01T00:00:00Z")


def test_request_from_spec() -> None:
    spec = LoadBalancerSpec(
        service=ServiceRef("team-a", "dns", "0000-1111"), cluster_name="c", name="a00001111",
        ports=(PortSpec("dns-udp", "UDP", 53), PortSpec("dns-tcp", "TCP", 53, node_port=30053)),
        annotations={"metallb.io/loadBalancerIPs": "10.0.0.5,fc00::5", "lbctl.io/address-pool": "lan",
                     "metallb.io/allow-shared-ip": "dns"},
        external_traffic_policy="Local", load_balancer_ip="fc00::5", ip_families=DUAL,
        ip_family_policy="RequireDualStack", selector={"app": "dns"},
        current_ingress=(Ingress(hostname="dns.example.com"), Ingress(ip="10.0.0.5")),
        labels={"tier": "infra"}, created="2024-01-01T00:00:00Z",
    )
    request = request_from_spec(spec)
    assert request == ServiceRequest(
        key="team-a/dns", namespace="team-a", labels={"tier": "infra"},
        ports=frozenset({("UDP", 53), ("TCP", 53)}),
        requested_ips=(ip_address("10.0.0.5"), ip_address("fc00::5")), requested_ips_field=METALLB_IPS,
        pool="lan", pool_field=POOL_FIELD,
        sharing_key="dns", sharing_key_field="metadata.annotations[metallb.io/allow-shared-ip]",
        external_traffic_policy="Local", selector={"app": "dns"}, ip_families=DUAL,
        ip_family_policy="RequireDualStack", current_ips=(ip_address("10.0.0.5"),), created="2024-01-01T00:00:00Z",
    )
    overridden = request_from_spec(spec, labels={"tier": "web"}, created="2025-01-01T00:00:00Z")
    assert (overridden.labels, overridden.created) == ({"tier": "web"}, "2025-01-01T00:00:00Z")


@pytest.mark.parametrize(
    ("families", "policy", "expected"),
    [
        ((), "SingleStack", (4,)),
        (("IPv6", "IPv4"), "SingleStack", (6,)),
        (("IPv4", "IPv6"), "PreferDualStack", (4, 6)),
        (("IPv6",), "PreferDualStack", (6,)),
        (("IPv6", "IPv4"), "RequireDualStack", (6, 4)),
    ],
)
def test_wanted_families(families: tuple[str, ...], policy: str, expected: tuple[int, ...]) -> None:
    assert wanted_families(families, policy) == expected


@pytest.mark.parametrize(
    ("ranges", "families", "refused"),
    [
        ((), (4,), None),
        (("10.0.0.0/8", "192.0.2.0/24"), (4,), None),
        (("10.0.0.0/8", "2001:db8::/64"), (4,), "spec.loadBalancerSourceRanges[1]"),
        (("2001:db8::/64",), (6,), None),
        (("10.0.0.0/8",), (6,), "spec.loadBalancerSourceRanges[0]"),
        (("10.0.0.0/8", "2001:db8::/64"), (6, 4), None),
    ],
)
def test_source_ranges_of_a_family_the_service_lacks_are_refused(
    ranges: tuple[str, ...], families: tuple[int, ...], refused: str | None
) -> None:
    if refused is None:
        check_source_ranges(ranges, families)
        return
    with pytest.raises(InvalidServiceError) as caught:
        check_source_ranges(ranges, families)
    assert caught.value.field == refused and "PreferDualStack" in caught.value.fix


@pytest.mark.parametrize(
    ("families", "policy", "field"),
    [
        (("IPv4",), "RequireDualStack", "spec.ipFamilyPolicy"),
        (("IPv4", "IPv5"), "SingleStack", "spec.ipFamilies[1]"),
        (("IPv4",), "DualStack", "spec.ipFamilyPolicy"),
    ],
)
def test_wanted_families_rejects(families: tuple[str, ...], policy: str, field: str) -> None:
    with pytest.raises(InvalidServiceError) as caught:
        wanted_families(families, policy)
    assert caught.value.field == field


# --------------------------------------------------------------------------------------------
# Allocation scenarios: each is a list of steps run against one Allocator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fails:
    error: type[LoadBalancerError]
    field: str | None
    text: str  # must appear in str(error)


@dataclass(frozen=True)
class Assign:
    request: ServiceRequest
    expect: tuple[str, ...] | Fails


@dataclass(frozen=True)
class Release:
    key: str


@dataclass(frozen=True)
class SetPools:
    pools: list[Pool]
    expect: set[str]


@dataclass(frozen=True)
class Restore:
    requests: list[ServiceRequest]
    expect: set[str]


@dataclass(frozen=True)
class Holders:
    ip: str
    expect: tuple[str, ...]


@dataclass(frozen=True)
class Stats:
    expect: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Holds:
    key: str
    pool: str | None  # None: holds nothing
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Waiting:
    expect: set[str]


Step = Assign | Release | SetPools | Restore | Holders | Stats | Holds | Waiting


def run(pools: list[Pool], steps: list[Step]) -> None:
    allocator = Allocator(pools)
    for number, step in enumerate(steps):
        where = f"step {number}: {step}"
        if isinstance(step, Assign):
            if isinstance(step.expect, Fails):
                with pytest.raises(step.expect.error) as caught:
                    allocator.assign(step.request)
                assert type(caught.value) is step.expect.error, where
                assert caught.value.field == step.expect.field, where
                assert step.expect.text in str(caught.value), f"{where}: {caught.value}"
            else:
                assert allocator.assign(step.request) == tuple(ip_address(i) for i in step.expect), where
        elif isinstance(step, Release):
            allocator.release(step.key)
        elif isinstance(step, SetPools):
            assert allocator.set_pools(step.pools) == step.expect, where
        elif isinstance(step, Restore):
            assert allocator.restore(step.requests) == step.expect, where
        elif isinstance(step, Holders):
            assert allocator.holders(step.ip) == step.expect, where
        elif isinstance(step, Stats):
            assert allocator.pool_stats() == {k: PoolUsage(*v) for k, v in step.expect.items()}, where
        elif isinstance(step, Holds):
            held = allocator.allocation(step.key)
            if step.pool is None:
                assert held is None, where
            else:
                assert held is not None, where
                assert (held.pool, held.ips) == (step.pool, tuple(ip_address(i) for i in step.ips)), where
        else:
            assert allocator.waiting() == step.expect, where


LAN = pool("lan", "10.0.0.0/29")

SCENARIOS: dict[str, tuple[list[Pool], list[Step]]] = {
    "lowest free first, same answer again, a release frees the lowest": ([LAN], [
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("a/s2"), ("10.0.0.1",)),
        Assign(req("a/s3"), ("10.0.0.2",)),
        Holds("a/s2", "lan", ("10.0.0.1",)),
        Release("a/s1"),
        Release("a/unknown"),
        Holds("a/s1", None),
        Assign(req("a/s4"), ("10.0.0.0",)),
        Stats({"lan": (3, 5)}),
    ]),
    "a requested address held by another Service waits, naming the holder": ([LAN], [
        Assign(req("a/s1", ips=("10.0.0.5",)), ("10.0.0.5",)),
        Assign(req("b/s2", ips=("10.0.0.5",)), Fails(PendingError, FIELD_LOAD_BALANCER_IP,
                                                     "10.0.0.5 is already used by a/s1")),
        Waiting({"b/s2"}),
        Assign(req("b/s2"), ("10.0.0.0",)),
        Waiting(set()),
        Release("a/s1"),
        Assign(req("b/s3", ips=("10.0.0.5",)), ("10.0.0.5",)),
    ]),
    "a requested address outside every pool names the field it came from": ([LAN], [
        Assign(req("a/s1", ips=("192.168.1.1",), requested_ips_field=LB_IPS),
               Fails(InvalidServiceError, LB_IPS, "192.168.1.1 is not in any address pool; "
                     "fix: request an address inside a pool (lan: 10.0.0.0/29)")),
        Assign(req("a/s1", ips=("fc00::1",), ip_families=("IPv6",)),
               Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP, "fc00::1 is not in any address pool")),
    ]),
    "a failed assign keeps what the Service held": ([LAN], [
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("a/s2"), ("10.0.0.1",)),
        Assign(req("a/s2", ips=("10.0.0.0",)), Fails(PendingError, FIELD_LOAD_BALANCER_IP, "used by a/s1")),
        Holds("a/s2", "lan", ("10.0.0.1",)),
        Holders("10.0.0.1", ("a/s2",)),
    ]),
    "changing the requested address moves the Service and frees the old one": ([LAN], [
        Assign(req("a/s1", ips=("10.0.0.3",)), ("10.0.0.3",)),
        Assign(req("a/s1", ips=("10.0.0.4",)), ("10.0.0.4",)),
        Holders("10.0.0.3", ()),
        Stats({"lan": (1, 7)}),
        Assign(req("a/s1"), ("10.0.0.4",)),  # no longer asking for one: keeps what it has
    ]),
    "status addresses are kept when valid, also without restore": ([LAN], [
        Assign(req("a/s1", current=("10.0.0.5",)), ("10.0.0.5",)),
        Assign(req("a/s2", current=("10.0.0.5",)), ("10.0.0.0",)),
        Assign(req("a/s3", current=("192.168.0.1",)), ("10.0.0.1",)),
        Assign(req("a/s4", current=("10.0.0.6",), ips=("10.0.0.7",)), ("10.0.0.7",)),
    ]),
    "exhaustion waits, a release lets the next try succeed": ([pool("lan", "10.0.0.0/31")], [
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("a/s2"), ("10.0.0.1",)),
        Assign(req("a/s3"),
               Fails(PendingError, None, "every address pool that serves this Service is exhausted (lan)")),
        Waiting({"a/s3"}),
        Release("a/s1"),
        Assign(req("a/s3"), ("10.0.0.0",)),
        Waiting(set()),
        Stats({"lan": (2, 0)}),
    ]),
    "avoidBuggyIPs skips .0 and .255 across a /24 boundary": (
        [pool("lan", "10.0.0.254-10.0.1.1", avoidBuggyIPs=True)], [
            Stats({"lan": (0, 2)}),
            Assign(req("a/s1"), ("10.0.0.254",)),
            Assign(req("a/s2"), ("10.0.1.1",)),
            Assign(req("a/s3"), Fails(PendingError, None, "exhausted")),
            Assign(req("a/s4", ips=("10.0.0.255",)),
                   Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP, "pool 'lan' has avoidBuggyIPs set")),
            Release("a/s1"),
            Assign(req("a/s3"), ("10.0.0.254",)),
        ]),
    "without avoidBuggyIPs .255 and .0 are handed out": ([pool("lan", "10.0.0.254-10.0.1.1")], [
        Assign(req("a/s1"), ("10.0.0.254",)),
        Assign(req("a/s2"), ("10.0.0.255",)),
        Assign(req("a/s3"), ("10.0.1.0",)),
        Assign(req("a/s4"), ("10.0.1.1",)),
    ]),
    "priority: 1 before 2, then unset; pinned pools before open ones at equal priority": ([
        pool("p-two", "10.0.2.0/31", priority=2),
        pool("p-one", "10.0.1.0/31", priority=1),
        pool("p-open", "10.0.3.0/31"),
        pool("p-pinned", "10.0.4.0/31", namespaces=["a"]),
    ], [
        Assign(req("a/s1"), ("10.0.1.0",)),
        Assign(req("b/s2"), ("10.0.1.1",)),
        Assign(req("a/s3"), ("10.0.2.0",)),
        Assign(req("a/s4"), ("10.0.2.1",)),
        Assign(req("a/s5"), ("10.0.4.0",)),
        Assign(req("b/s6"), ("10.0.3.0",)),
        Holds("a/s5", "p-pinned", ("10.0.4.0",)),
    ]),
    "equal preference: by name": ([pool("b", "10.0.2.0/31"), pool("a", "10.0.1.0/31")], [
        Assign(req("a/s1"), ("10.0.1.0",)),
    ]),
    "autoAssign false pools serve only Services that ask for them": ([
        pool("manual", "10.0.9.0/31", autoAssign=False), pool("lan", "10.0.0.0/31"),
    ], [
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("a/s2", pool="manual"), ("10.0.9.0",)),
        Assign(req("a/s3", ips=("10.0.9.1",)), ("10.0.9.1",)),
        Assign(req("a/s4"), ("10.0.0.1",)),
        Assign(req("a/s5"), Fails(PendingError, None, "exhausted (lan)")),
        Assign(req("a/s6", pool="manual"), Fails(PendingError, POOL_FIELD, "pool 'manual' has no free address")),
    ]),
    "a named pool must exist and serve the Service": ([pool("team", "10.0.1.0/30", namespaces=["team-a"]), LAN], [
        Assign(req("a/s1", pool="nope", pool_field=METALLB_POOL_FIELD),
               Fails(InvalidServiceError, METALLB_POOL_FIELD, "there is no pool 'nope'; fix: name one of the pools "
                     "(lan, team)")),
        Assign(req("b/s2", pool="team"), Fails(InvalidServiceError, POOL_FIELD, "only for namespaces team-a")),
        Assign(req("team-a/s3", pool="team"), ("10.0.1.0",)),
        Assign(req("team-a/s4", pool="lan"), ("10.0.0.0",)),
    ]),
    "requested addresses must agree with the named pool, one pool, and its namespaces": ([
        LAN, pool("other", "10.0.1.0/29", "fc00::/126"), pool("team", "10.0.2.0/30", namespaces=["team-a"]),
    ], [
        Assign(req("a/s1", ips=("10.0.1.1",), pool="lan"), Fails(
            InvalidServiceError, FIELD_LOAD_BALANCER_IP,
            f"10.0.1.1 is in pool 'other' but {POOL_FIELD} asks for pool 'lan'")),
        Assign(req("a/s2", ips=("10.0.0.1", "fc00::1"), ip_families=DUAL, ip_family_policy="RequireDualStack"),
               Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP, "different pools (lan, other)")),
        Assign(req("a/s3", ips=("10.0.2.1",)), Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP,
                                                     "pool 'team' holding 10.0.2.1 is only for namespaces team-a")),
        Assign(req("a/s4", ips=("10.0.1.1", "fc00::1"), ip_families=DUAL, ip_family_policy="RequireDualStack",
                   pool="other"), ("10.0.1.1", "fc00::1")),
    ]),
    "namespaces and serviceSelector decide which pools serve a Service": ([
        pool("team", "10.0.1.0/30", namespaces=["team-a"]),
        pool("web", "10.0.2.0/30", serviceSelector={"matchLabels": {"tier": "web"}}),
        pool("both", "10.0.3.0/30", namespaces=["team-a"], serviceSelector={"matchLabels": {"tier": "web"}}),
        pool("prod", "10.0.4.0/30", serviceSelector={"matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod"]}]}),
    ], [
        Assign(req("team-a/s1", labels={"tier": "web"}), ("10.0.3.0",)),
        Assign(req("team-a/s2"), ("10.0.1.0",)),
        Assign(req("team-b/s3", labels={"tier": "web"}), ("10.0.2.0",)),
        Assign(req("team-b/s4", labels={"env": "prod"}), ("10.0.4.0",)),
        Assign(req("team-b/s5", labels={"env": "dev"}),
               Fails(PendingError, None, "no address pool with autoAssign serves this Service")),
    ]),
    "sharing a requested address: same key, disjoint ports": ([LAN], [
        Assign(req("a/s1", ips=("10.0.0.1",), sharing_key="k"), ("10.0.0.1",)),
        Assign(req("a/s2", ips=("10.0.0.1",), sharing_key="k", ports=(("UDP", 80),)), ("10.0.0.1",)),
        Holders("10.0.0.1", ("a/s1", "a/s2")),
        Assign(req("a/s3", ips=("10.0.0.1",), sharing_key="k", ports=(("TCP", 443), ("TCP", 80))),
               Fails(InvalidServiceError, SHARING_FIELD,
                     "10.0.0.1 is shared under key 'k', and a/s1 already uses TCP/80 on it")),
        Assign(req("a/s4", ips=("10.0.0.1",), sharing_key="other", ports=(("TCP", 22),)),
               Fails(PendingError, FIELD_LOAD_BALANCER_IP, "10.0.0.1 is already used by a/s1, a/s2")),
        Assign(req("a/s5", ips=("10.0.0.1",), ports=(("TCP", 22),)),
               Fails(PendingError, FIELD_LOAD_BALANCER_IP, "already used by a/s1, a/s2")),
        Assign(req("a/s6", ips=("10.0.0.1",), sharing_key="k", ports=(("TCP", 22),),
                   external_traffic_policy="Local", selector={"app": "x"}),
               Fails(InvalidServiceError, SHARING_FIELD, "externalTrafficPolicy Local")),
        Stats({"lan": (1, 7)}),
        Release("a/s1"),
        Holders("10.0.0.1", ("a/s2",)),
        Stats({"lan": (1, 7)}),
        Release("a/s2"),
        Holders("10.0.0.1", ()),
        Stats({"lan": (0, 8)}),
    ]),
    "sharing with externalTrafficPolicy Local needs the same selector": ([LAN], [
        Assign(req("a/s1", ips=("10.0.0.1",), sharing_key="k", external_traffic_policy="Local",
                   selector={"app": "x"}), ("10.0.0.1",)),
        Assign(req("a/s2", ips=("10.0.0.1",), sharing_key="k", external_traffic_policy="Local",
                   selector={"app": "x"}, ports=(("TCP", 443),)), ("10.0.0.1",)),
        Assign(req("a/s3", ips=("10.0.0.1",), sharing_key="k", external_traffic_policy="Local",
                   selector={"app": "y"}, ports=(("TCP", 22),)),
               Fails(InvalidServiceError, SHARING_FIELD, "same selector")),
        Assign(req("a/s4", ips=("10.0.0.1",), sharing_key="k", ports=(("TCP", 22),)),
               Fails(InvalidServiceError, SHARING_FIELD, "same selector")),
    ]),
    "auto-assigned Services with a sharing key join the key's address when their ports fit": ([LAN], [
        Assign(req("a/s1", sharing_key="k"), ("10.0.0.0",)),
        Assign(req("a/s2"), ("10.0.0.1",)),
        Assign(req("a/s3", sharing_key="k", ports=(("TCP", 443),)), ("10.0.0.0",)),
        Assign(req("a/s4", sharing_key="k"), ("10.0.0.2",)),
        Assign(req("a/s5", sharing_key="j", ports=(("TCP", 22),)), ("10.0.0.3",)),
        Assign(req("a/s6", sharing_key="k", ports=(("UDP", 53),)), ("10.0.0.0",)),
        Assign(req("a/s7", sharing_key="k", pool="lan", ports=(("UDP", 54),)), ("10.0.0.0",)),
        Holders("10.0.0.0", ("a/s1", "a/s3", "a/s6", "a/s7")),
        Stats({"lan": (4, 4)}),
    ]),
    "a sole holder changes its key in place; a sharing one must move": ([LAN], [
        Assign(req("a/s1", sharing_key="k"), ("10.0.0.0",)),
        Assign(req("a/s1", sharing_key="j"), ("10.0.0.0",)),
        Assign(req("a/s2", sharing_key="j", ports=(("TCP", 443),)), ("10.0.0.0",)),
        Assign(req("a/s2", sharing_key="z", ports=(("TCP", 443),)), ("10.0.0.1",)),
        Holders("10.0.0.0", ("a/s1",)),
        Assign(req("a/s3", sharing_key="j", ports=(("TCP", 443),)), ("10.0.0.0",)),
        Assign(req("a/s3", sharing_key="j"), ("10.0.0.2",)),  # its ports now clash with a/s1: it moves
        Holders("10.0.0.0", ("a/s1",)),
    ]),
    "RequireDualStack takes both families from one pool": ([
        pool("v4", "10.0.0.0/30", priority=1), pool("dual", "10.1.0.0/30", "fc00::/126", priority=2),
    ], [
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="RequireDualStack"), ("10.1.0.0", "fc00::")),
        Assign(req("a/s2", ip_families=("IPv6", "IPv4"), ip_family_policy="RequireDualStack"),
               ("fc00::1", "10.1.0.1")),
        Holds("a/s2", "dual", ("fc00::1", "10.1.0.1")),
        Stats({"v4": (0, 4), "dual": (4, 4)}),
    ]),
    "RequireDualStack waits when no pool has both families": ([
        pool("v4", "10.0.0.0/30"), pool("v6", "fc00::/126"),
    ], [
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="RequireDualStack"),
               Fails(PendingError, "spec.ipFamilies", "no address pool that serves this Service has IPv4 and IPv6")),
        Assign(req("a/s2", ip_families=DUAL, ip_family_policy="RequireDualStack", pool="v4"),
               Fails(InvalidServiceError, POOL_FIELD, "pool 'v4' has no IPv6 addresses")),
        Assign(req("a/s3", ip_families=DUAL, ip_family_policy="RequireDualStack", ips=("10.0.0.1",)),
               Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP, "RequireDualStack needs one IPv4 and one IPv6")),
    ]),
    "RequireDualStack waits when the only dual pool runs out of one family": ([
        pool("dual", "10.1.0.0/30", "fc00::/127"),
    ], [
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="RequireDualStack"), ("10.1.0.0", "fc00::")),
        Assign(req("a/s2", ip_families=DUAL, ip_family_policy="RequireDualStack"), ("10.1.0.1", "fc00::1")),
        Assign(req("a/s3", ip_families=DUAL, ip_family_policy="RequireDualStack"),
               Fails(PendingError, None, "exhausted (dual)")),
        Assign(req("a/s4", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.1.0.2",)),
    ]),
    "PreferDualStack: a pool with both families beats a better single-family one": ([
        pool("v4", "10.0.0.0/30", priority=1), pool("dual", "10.1.0.0/30", "fc00::/126", priority=2),
    ], [
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.1.0.0", "fc00::")),
        Assign(req("a/s2", ip_families=("IPv6", "IPv4"), ip_family_policy="PreferDualStack"),
               ("fc00::1", "10.1.0.1")),
    ]),
    "PreferDualStack degrades to one family, and gains the other once its pool has it": ([pool("lan", "10.0.0.0/30")], [
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.0.0.0",)),
        SetPools([pool("lan", "10.0.0.0/30", "fc00::/126")], set()),
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.0.0.0", "fc00::")),
        Holds("a/s1", "lan", ("10.0.0.0", "fc00::")),
    ]),
    "PreferDualStack falls back to the first pool with the primary family, then the secondary": ([
        pool("v6", "fd00::/127", priority=1), pool("v4", "10.0.0.0/31", priority=2),
        pool("v4-last", "10.0.9.0/32", priority=3),
    ], [
        Assign(req("a/s1", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.0.0.0",)),
        Assign(req("a/s2", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.0.0.1",)),
        Assign(req("a/s3", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("10.0.9.0",)),
        Assign(req("a/s4", ip_families=DUAL, ip_family_policy="PreferDualStack"), ("fd00::",)),
        Assign(req("a/s5", ip_families=DUAL, ip_family_policy="PreferDualStack", pool="v6"), ("fd00::1",)),
    ]),
    "SingleStack takes only its family": ([
        pool("v4", "10.0.0.0/30", priority=1), pool("v6", "fd00::/126", priority=2),
    ], [
        Assign(req("a/s1", ip_families=("IPv6", "IPv4")), ("fd00::",)),
        Assign(req("a/s2"), ("10.0.0.0",)),
        Assign(req("a/s3", ips=("fd00::3",)), Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP,
                                                    "fd00::3 is IPv6 but the Service is IPv4 (SingleStack)")),
        Assign(req("a/s4", pool="v4", ip_families=("IPv6",)),
               Fails(InvalidServiceError, POOL_FIELD, "pool 'v4' has no IPv6 addresses")),
        Assign(req("a/s5", ip_families=("IPv6",), current=("10.0.0.3",)), ("fd00::1",)),
    ]),
    "a shrunk pool displaces and releases what fell out; growing it back wakes the waiting": (
        [pool("lan", "10.0.0.0/29")], [
            Assign(req("a/s1"), ("10.0.0.0",)),
            Assign(req("a/s2"), ("10.0.0.1",)),
            Assign(req("a/s3"), ("10.0.0.2",)),
            Assign(req("a/s4"), ("10.0.0.3",)),
            Assign(req("a/s5", ips=("10.0.0.6",)), ("10.0.0.6",)),
            SetPools([pool("lan", "10.0.0.0/30")], {"a/s5"}),
            Holds("a/s5", None),
            Holders("10.0.0.6", ()),
            Stats({"lan": (4, 0)}),
            Assign(req("a/s5", ips=("10.0.0.6",)), Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP,
                                                         "10.0.0.6 is not in any address pool")),
            Assign(req("a/s6"), Fails(PendingError, None, "exhausted")),
            SetPools([pool("lan", "10.0.0.0/29")], {"a/s5", "a/s6"}),
            Stats({"lan": (4, 4)}),
            Assign(req("a/s6"), ("10.0.0.4",)),
            Assign(req("a/s5", ips=("10.0.0.6",)), ("10.0.0.6",)),
            Holds("a/s1", "lan", ("10.0.0.0",)),
        ]),
    "a renamed or split pool keeps its Services on their addresses": ([pool("old", "10.0.0.0/29")], [
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("a/s2", ips=("10.0.0.5",)), ("10.0.0.5",)),
        SetPools([pool("new", "10.0.0.0/29")], set()),
        Holds("a/s1", "new", ("10.0.0.0",)),
        Stats({"new": (2, 6)}),
        SetPools([pool("low", "10.0.0.0/30"), pool("high", "10.0.0.4/30")], set()),
        Holds("a/s1", "low", ("10.0.0.0",)),
        Holds("a/s2", "high", ("10.0.0.5",)),
        Stats({"high": (1, 3), "low": (1, 3)}),
        Assign(req("a/s3"), ("10.0.0.4",)),
    ]),
    "removing a pool or narrowing who it serves displaces its Services": ([LAN, pool("spare", "10.0.1.0/30")], [
        Assign(req("a/s1"), ("10.0.0.0",)),
        Assign(req("b/s2"), ("10.0.0.1",)),
        Assign(req("b/s3", pool="lan"), ("10.0.0.2",)),
        Assign(req("c/s4", pool="spare"), ("10.0.1.0",)),
        SetPools([pool("lan", "10.0.0.0/29", namespaces=["a"]), pool("spare", "10.0.1.0/30")], {"b/s2", "b/s3"}),
        Holds("a/s1", "lan", ("10.0.0.0",)),
        Assign(req("b/s2"), ("10.0.1.1",)),
        SetPools([pool("spare", "10.0.1.0/30")], {"a/s1"}),
        Holds("c/s4", "spare", ("10.0.1.0",)),
        Stats({"spare": (2, 2)}),
        Assign(req("c/s4", pool="lan"), Fails(InvalidServiceError, POOL_FIELD, "there is no pool 'lan'")),
        Holds("c/s4", "spare", ("10.0.1.0",)),
    ]),
    "a Service whose named pool goes away is displaced even if its address stays in another": ([LAN], [
        Assign(req("a/s1", pool="lan"), ("10.0.0.0",)),
        Assign(req("a/s2"), ("10.0.0.1",)),
        SetPools([pool("lan2", "10.0.0.0/29")], {"a/s1"}),
        Holds("a/s2", "lan2", ("10.0.0.1",)),
        Holders("10.0.0.0", ()),
    ]),
    "an overlapping younger pool is not used; naming it says why": ([
        pool("old", "10.0.0.0/30", created="2024-01-01T00:00:00Z"),
        pool("new", "10.0.0.2/31", "10.0.5.0/30", created="2024-02-01T00:00:00Z"),
    ], [
        Stats({"old": (0, 4)}),
        Assign(req("a/s1", pool="new"), Fails(
            InvalidServiceError, POOL_FIELD,
            "pool 'new' is not usable: spec.addresses[0]: '10.0.0.2/31' overlaps '10.0.0.0/30' of pool 'old'")),
        Assign(req("a/s2", ips=("10.0.5.1",)), Fails(InvalidServiceError, FIELD_LOAD_BALANCER_IP,
                                                     "not in any address pool")),
        SetPools([pool("new", "10.0.0.2/31", "10.0.5.0/30", created="2024-02-01T00:00:00Z")], {"a/s1", "a/s2"}),
        Assign(req("a/s1", pool="new"), ("10.0.0.2",)),
        Assign(req("a/s2", ips=("10.0.5.1",)), ("10.0.5.1",)),
    ]),
    "restore keeps the oldest Service's address and hands the rest back": ([LAN], [
        Restore([
            req("a/new", current=("10.0.0.1",), created="2024-02-01T00:00:00Z"),
            req("a/old", current=("10.0.0.1",), created="2024-01-01T00:00:00Z"),
            req("a/other", current=("10.0.0.2",), created="2024-03-01T00:00:00Z"),
            req("a/fresh", created="2023-01-01T00:00:00Z"),
            req("a/outside", current=("192.168.0.1",)),
            req("a/moved", current=("10.0.0.3",), ips=("10.0.0.4",)),
            req("a/v6", current=("fc00::1",), ip_families=("IPv6",)),
            req("a/bad-family", current=("10.0.0.5",), ip_family_policy="RequireDualStack"),
        ], {"a/new", "a/outside", "a/moved", "a/v6", "a/bad-family"}),
        Holders("10.0.0.1", ("a/old",)),
        Holders("10.0.0.2", ("a/other",)),
        Holds("a/fresh", None),
        Stats({"lan": (2, 6)}),
        Assign(req("a/new", current=("10.0.0.1",), created="2024-02-01T00:00:00Z"), ("10.0.0.0",)),
        Assign(req("a/moved", current=("10.0.0.3",), ips=("10.0.0.4",)), ("10.0.0.4",)),
    ]),
    "restore keeps Services sharing under one key and checks their pools and namespaces": (
        [LAN, pool("team", "10.0.1.0/30", namespaces=["team-a"])], [
            Restore([
                req("a/dns-tcp", current=("10.0.0.3",), sharing_key="dns", ports=(("TCP", 53),),
                    created="2024-01-01T00:00:00Z"),
                req("a/dns-udp", current=("10.0.0.3",), sharing_key="dns", ports=(("UDP", 53),),
                    created="2024-02-01T00:00:00Z"),
                req("a/dns-dup", current=("10.0.0.3",), sharing_key="dns", ports=(("UDP", 53),),
                    created="2024-03-01T00:00:00Z"),
                req("a/wrong-pool", current=("10.0.0.4",), pool="team"),
                req("b/wrong-ns", current=("10.0.1.1",)),
                req("team-a/right-ns", current=("10.0.1.2",)),
            ], {"a/dns-dup", "a/wrong-pool", "b/wrong-ns"}),
            Holders("10.0.0.3", ("a/dns-tcp", "a/dns-udp")),
            Holds("team-a/right-ns", "team", ("10.0.1.2",)),
            Stats({"lan": (1, 7), "team": (1, 3)}),
        ]),
    "IPv6 pools count exactly, however large": ([pool("v6", "fc00::/64")], [
        Assign(req("a/s1", ip_families=("IPv6",)), ("fc00::",)),
        Assign(req("a/s2", ip_families=("IPv6",), ips=("fc00::ffff:ffff:ffff:ffff",)), ("fc00::ffff:ffff:ffff:ffff",)),
        Stats({"v6": (2, 2**64 - 2)}),
        Holders("fc00::0:0", ("a/s1",)),
    ]),
}


@pytest.mark.parametrize(("pools", "steps"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_allocation(pools: list[Pool], steps: list[Step]) -> None:
    run(pools, steps)


V4 = pool("v4", "198.18.0.0/30")
V6 = pool("v6", "fd00::/126")
BOTH = pool("both", "198.18.1.0/30", "fd00:1::/126")
ONLY_B = pool("only-b", "198.18.2.0/30", namespaces=["b"])
WEB = pool("web", "198.18.3.0/30", serviceSelector={"matchLabels": {"tier": "web"}})
MANUAL = pool("manual", "198.18.4.0/30", autoAssign=False)
BUGGY = pool("buggy", "198.18.5.0/24", avoidBuggyIPs=True)
DUAL_STACK: dict[str, Any] = {"ip_families": ("IPv4", "IPv6"), "ip_family_policy": "RequireDualStack"}
PREFER_DUAL: dict[str, Any] = {"ip_families": ("IPv4", "IPv6"), "ip_family_policy": "PreferDualStack"}


@pytest.mark.parametrize(("new_pool", "request_", "serves"), [
    (V4, req("a/s"), True),
    (V6, req("a/s"), False),  # no address of its family
    (V6, req("a/s", ip_families=("IPv6",)), True),
    (V4, req("a/s", **DUAL_STACK), False),  # RequireDualStack needs both families in one pool
    (BOTH, req("a/s", **DUAL_STACK), True),
    (V6, req("a/s", **PREFER_DUAL), True),  # PreferDualStack takes either
    (V4, req("a/s", ip_families=("IPv4",), ip_family_policy="RequireDualStack"), False),  # invalid Service
    (V4, req("a/s", pool="other"), False),  # it names another pool
    (V4, req("a/s", pool="v4"), True),
    (ONLY_B, req("a/s"), False),  # not for its namespace
    (ONLY_B, req("b/s"), True),
    (WEB, req("a/s"), False),  # its labels do not match the serviceSelector
    (WEB, req("a/s", labels={"tier": "web"}), True),
    (MANUAL, req("a/s"), False),  # autoAssign false: only for Services naming it or its addresses
    (MANUAL, req("a/s", pool="manual"), True),
    (MANUAL, req("a/s", ips=("198.18.4.1",)), True),
    (V4, req("a/s", ips=("198.18.4.1",)), False),  # the address it asks for is elsewhere
    (V4, req("a/s", pool="v4", ips=("198.18.4.1",)), False),
    (BUGGY, req("a/s", ips=("198.18.5.0",)), False),  # avoidBuggyIPs never hands out .0
    (BUGGY, req("a/s", ips=("198.18.5.1",)), True),
    (BOTH, req("a/s", ips=("198.18.1.1", "fd00:1::1")), True),
    (BOTH, req("a/s", ips=("198.18.1.1", "fd00::1")), False),  # not all in this pool
])
def test_which_waiting_services_a_new_or_changed_pool_may_serve(
    new_pool: Pool, request_: ServiceRequest, serves: bool
) -> None:
    assert may_serve(new_pool, request_) is serves


def test_a_pool_change_wakes_only_the_waiting_services_it_may_serve() -> None:
    allocator = Allocator([pool("full", "198.18.0.0/32", namespaces=["a"])])
    allocator.assign(req("a/holder"))
    for request in (req("a/waiter"), req("a/dual", **DUAL_STACK), req("b/named", pool="b-pool")):
        with pytest.raises(LoadBalancerError):
            allocator.assign(request)
    assert allocator.waiting() == {"a/waiter", "a/dual", "b/named"}
    full = pool("full", "198.18.0.0/32", namespaces=["a"])
    other = pool("other", "198.18.9.0/30", namespaces=["c"])
    assert allocator.set_pools([full, other]) == set()  # a pool for namespace c only: nobody
    assert allocator.set_pools([full, other]) == set()  # the same pools again: nothing changed
    assert allocator.set_pools([full]) == set()  # a pool deleted frees nothing
    assert allocator.set_pools([pool("full", "198.18.0.0/31", namespaces=["a"])]) == {"a/waiter"}  # grown
    grown = pool("full", "198.18.0.0/31", namespaces=["a"])
    named = pool("b-pool", "198.18.7.0/30", namespaces=["b"])
    assert allocator.set_pools([grown, named]) == {"b/named"}
    assert allocator.set_pools([grown, named, BOTH]) == {"a/waiter", "a/dual"}
    assert allocator.waiting() == {"a/waiter", "a/dual", "b/named"}  # until they are assigned


def test_set_pools_rejects_duplicate_names() -> None:
    with pytest.raises(PoolError, match="two pools have the same name"):
        Allocator([pool("lan", "10.0.0.0/30"), pool("lan", "10.0.1.0/30")])


def test_invalid_families_are_reported_before_anything_is_taken() -> None:
    allocator = Allocator([LAN])
    with pytest.raises(InvalidServiceError) as caught:
        allocator.assign(req("a/s1", ip_families=("IPv4",), ip_family_policy="RequireDualStack"))
    assert caught.value.field == "spec.ipFamilyPolicy"
    assert allocator.pool_stats() == {"lan": PoolUsage(0, 8)}
    assert allocator.waiting() == {"a/s1"}


def test_many_assignments_and_releases_stay_consistent() -> None:
    """Interleaved assign/release over a fragmented avoidBuggyIPs pool never hands out one address twice."""
    allocator = Allocator([pool("lan", "10.0.0.0/22", avoidBuggyIPs=True)])
    held: dict[str, str] = {}
    for i in range(900):
        key = f"a/s{i}"
        got = allocator.assign(req(key))
        assert len(got) == 1 and str(got[0]) not in held.values()
        assert int(got[0]) & 255 not in (0, 255)
        held[key] = str(got[0])
        if i % 3 == 0:  # free every third, in a scattered order
            victim = f"a/s{(i * 7) % (i + 1)}"
            if victim in held:
                allocator.release(victim)
                del held[victim]
    usage = allocator.pool_stats()["lan"]
    assert usage == PoolUsage(len(held), 4 * 254 - len(held))
    # the lowest free address is handed out next
    every = {str(ip_address("10.0.0.0") + n) for n in range(1024) if n & 255 not in (0, 255)}
    lowest = min(every - set(held.values()), key=lambda s: int(ip_address(s)))
    assert allocator.assign(req("a/next")) == (ip_address(lowest),)


# The free-interval structure is what keeps assign fast (see bench/allocator.py); its intervals must
# stay merged after releases so a long-running allocator does not fragment into one entry per address.
@pytest.mark.parametrize(
    ("ranges", "avoid_buggy", "operations", "intervals", "lowest"),
    [
        ([(0, 9)], False, [("take", 0), ("take", 1)], [(2, 9)], 2),
        ([(0, 9)], False, [("take", 5)], [(0, 4), (6, 9)], 0),
        ([(0, 9)], False, [("take", 5), ("give", 5)], [(0, 9)], 0),
        ([(0, 9)], False, [("take", 4), ("take", 5), ("give", 4)], [(0, 4), (6, 9)], 0),
        ([(0, 9)], False, [("take", 4), ("take", 5), ("give", 5)], [(0, 3), (5, 9)], 0),
        ([(0, 9)], False, [("take", 3), ("take", 4), ("take", 5), ("give", 4)], [(0, 2), (4, 4), (6, 9)], 0),
        ([(0, 2)], False, [("take", 0), ("take", 1), ("take", 2)], [], None),
        ([(0, 2), (5, 6)], False, [("take", 0), ("take", 1), ("take", 2)], [(5, 6)], 5),
        ([(250, 260)], True, [], [(250, 260)], 250),
        ([(254, 257)], True, [("take", 254)], [(255, 257)], 257),
        ([(254, 257)], True, [("take", 254), ("take", 257)], [], None),
        ([(255, 256)], True, [], [], None),
        ([(256, 300)], True, [], [(256, 300)], 257),
    ],
)
def test_free_space(
    ranges: list[tuple[int, int]], avoid_buggy: bool, operations: list[tuple[str, int]],
    intervals: list[tuple[int, int]], lowest: int | None,
) -> None:
    free = _FreeSpace(ranges, avoid_buggy)
    for operation, address in operations:
        getattr(free, operation)(address)
    assert list(zip(free._starts, free._ends, strict=True)) == intervals
    assert free.lowest() == lowest


def test_free_space_refuses_double_take_and_give() -> None:
    free = _FreeSpace([(0, 9)], False)
    free.take(3)
    with pytest.raises(ValueError, match="not free"):
        free.take(3)
    with pytest.raises(ValueError, match="already free"):
        free.give(4)
