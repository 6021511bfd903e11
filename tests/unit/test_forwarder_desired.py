"""Table tests for lbctl.forwarder.desired: Kubernetes objects → ServiceState, bad data → Problems."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from lbctl.forwarder.desired import BuildContext, build_service, endpoint_ip_problem, slice_service_key
from lbctl.forwarder.state import Backend, ServiceState
from lbctl.model.scope import Scope

NODE = "node-a"
CONTEXT = BuildContext(node=NODE, scope=Scope("lbctl.io/local"))


def service(name: str = "web", *, ports: Any = None, ingress: list[dict[str, Any]] | None = None,
            lb_class: str | None = "lbctl.io/local", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "ports": ports if ports is not None else
                 [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080}], **spec},
        "status": {"loadBalancer": {"ingress": ingress if ingress is not None else
                                    [{"ip": "192.0.2.10", "ipMode": "VIP"}]}},
    }
    if lb_class is not None:
        body["spec"]["loadBalancerClass"] = lb_class
    return body


def endpoint(ip: str, node: str = NODE, **conditions: Any) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node, "conditions": conditions or {"ready": True}}


def eps(*endpoints: dict[str, Any], ports: list[dict[str, Any]] | None = None, name: str = "web-abc",
        service_name: str = "web", address_type: str = "IPv4") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": ports if ports is not None else [{"name": "http", "protocol": "TCP", "port": 8080}],
    }


def build(svc: Any, *slices: Any, context: BuildContext = CONTEXT) -> ServiceState:
    state, problems = build_service(svc, slices, context)
    assert state is not None, problems
    return state


@pytest.mark.parametrize(("svc", "why"), [
    (service(lb_class="other.io/lb"), "another controller's class"),
    (service(lb_class=None), "no class and no --default-class"),
    ({**service(), "spec": {**service()["spec"], "type": "NodePort"}}, "not a LoadBalancer"),
    ({**service(), "metadata": {**service()["metadata"], "deletionTimestamp": "2024-01-01T00:00:00Z"}}, "deleting"),
])
def test_services_that_are_not_ours_give_no_state(svc: dict[str, Any], why: str) -> None:
    assert build_service(svc, [], CONTEXT) == (None, []), why


def test_ready_endpoints_become_backends_with_the_slice_port() -> None:
    state = build(service(), eps(endpoint("10.244.1.3"), endpoint("10.244.2.4", node="node-b"),
                                 endpoint("10.244.1.9", ready=False)))
    (port,) = state.ports
    assert (port.protocol, port.port, port.node_port) == ("tcp", 80, 30080)
    assert port.backends == (Backend("10.244.1.3", 8080), Backend("10.244.2.4", 8080))
    assert state.lb_ips == ("192.0.2.10",)
    assert state.masquerade and not state.local_only
    assert state.endpoint_nodes == frozenset({NODE, "node-b"})
    assert state.local_endpoints == 1


@pytest.mark.parametrize(("conditions", "expected"), [
    ({}, True),  # unset means ready (API contract)
    ({"ready": True}, True),
    ({"ready": False}, False),
    ({"ready": None}, True),
])
def test_ready_condition(conditions: dict[str, Any], expected: bool) -> None:
    item = {"addresses": ["10.244.1.3"], "nodeName": NODE, "conditions": conditions}
    state = build(service(), eps(item))
    assert bool(state.ports[0].backends) is expected


def test_terminating_serving_endpoints_are_used_only_when_none_is_ready() -> None:
    draining = endpoint("10.244.1.7", ready=False, serving=True, terminating=True)
    assert build(service(), eps(draining)).ports[0].backends == (Backend("10.244.1.7", 8080),)
    assert build(service(), eps(draining, endpoint("10.244.1.8"))).ports[0].backends == (Backend("10.244.1.8", 8080),)
    gone = endpoint("10.244.1.7", ready=False, serving=False, terminating=True)
    assert build(service(), eps(gone)).ports[0].backends == ()


def test_external_traffic_policy_local_uses_only_this_nodes_endpoints_and_keeps_the_client_address() -> None:
    svc = service(externalTrafficPolicy="Local", healthCheckNodePort=31000)
    state = build(svc, eps(endpoint("10.244.1.3"), endpoint("10.244.2.4", node="node-b")))
    assert state.ports[0].backends == (Backend("10.244.1.3", 8080),)
    assert state.local_only and not state.masquerade
    assert state.health_check_node_port == 31000
    elsewhere = build(svc, eps(endpoint("10.244.2.4", node="node-b")))
    assert elsewhere.ports[0].backends == () and elsewhere.local_endpoints == 0
    assert elsewhere.endpoint_nodes == frozenset({"node-b"})


def test_health_check_port_only_with_local_policy() -> None:
    assert build(service(healthCheckNodePort=31000)).health_check_node_port is None


def test_ports_are_matched_by_name_and_protocol() -> None:
    svc = service(ports=[{"name": "http", "protocol": "TCP", "port": 80},
                         {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053},
                         {"name": "dns-tcp", "protocol": "TCP", "port": 53}])
    slice_ports = [{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "dns", "protocol": "UDP", "port": 5353},
                   {"name": "dns", "protocol": "TCP", "port": 9999}]
    state = build(svc, eps(endpoint("10.244.1.3"), ports=slice_ports))
    by_port = {(p.protocol, p.port): p for p in state.ports}
    assert by_port[("tcp", 80)].backends == (Backend("10.244.1.3", 8080),)
    assert by_port[("udp", 53)].backends == (Backend("10.244.1.3", 5353),)
    assert by_port[("udp", 53)].node_port == 30053
    assert by_port[("tcp", 53)].backends == ()  # "dns-tcp" is not in the slice


def test_slices_of_other_address_types_are_ignored() -> None:
    state = build(service(), eps(endpoint("fd00::1"), address_type="IPv6"), eps(endpoint("10.244.1.3"), name="x"))
    assert state.ports[0].backends == (Backend("10.244.1.3", 8080),)


def test_duplicate_endpoints_across_slices_count_once() -> None:
    state = build(service(), eps(endpoint("10.244.1.3"), name="a"), eps(endpoint("10.244.1.3"), name="b"))
    assert state.ports[0].backends == (Backend("10.244.1.3", 8080),)


@pytest.mark.parametrize("ip", ["127.0.0.1", "169.254.1.1", "224.0.0.5", "0.0.0.0", "240.0.0.1",
                                "255.255.255.255", "not-an-ip", "fd00::1", ""])
def test_unusable_endpoint_addresses_are_reported_and_skipped(ip: str) -> None:
    state, problems = build_service(service(), [eps(endpoint(ip), endpoint("10.244.1.3"))], CONTEXT)
    assert state is not None
    assert state.ports[0].backends == (Backend("10.244.1.3", 8080),)
    assert any("endpoints[0]" in p.field for p in problems), problems


def test_endpoint_outside_the_pod_network_is_reported_and_skipped() -> None:
    context = BuildContext(node=NODE, scope=Scope("lbctl.io/local"),
                           pod_networks=(ipaddress.IPv4Network("10.244.0.0/16"),))
    state, problems = build_service(service(), [eps(endpoint("192.168.7.7"), endpoint("10.244.1.3"))], context)
    assert state is not None and state.ports[0].backends == (Backend("10.244.1.3", 8080),)
    assert [p.field for p in problems] == ["EndpointSlice web-abc: endpoints[0].addresses[0]"]
    assert "outside the pod network (10.244.0.0/16)" in problems[0].message
    assert endpoint_ip_problem("10.244.9.9", context.pod_networks) is None


def test_service_without_endpoints_keeps_its_ports_with_no_backends() -> None:
    state = build(service())
    assert [p.backends for p in state.ports] == [()]


def test_hundreds_of_ports() -> None:
    ports = [{"name": f"p{i}", "protocol": "TCP", "port": 1000 + i, "nodePort": 31000 + i} for i in range(400)]
    slice_ports = [{"name": f"p{i}", "protocol": "TCP", "port": 2000 + i} for i in range(400)]
    state = build(service(ports=ports), eps(endpoint("10.244.1.3"), ports=slice_ports))
    assert len(state.ports) == 400
    assert state.ports[399].backends == (Backend("10.244.1.3", 2399),)


@pytest.mark.parametrize(("port", "field"), [
    ({"name": "s", "protocol": "SCTP", "port": 80}, "spec.ports[0].protocol"),
    ({"name": "a", "protocol": "TCP", "port": 0}, "spec.ports[0].port"),
    ({"name": "a", "protocol": "TCP", "port": 70000}, "spec.ports[0].port"),
    ({"name": "a", "protocol": "TCP", "port": "80"}, "spec.ports[0].port"),
    ({"name": "a", "protocol": "TCP", "port": True}, "spec.ports[0].port"),
])
def test_unusable_ports_are_reported_and_skipped(port: dict[str, Any], field: str) -> None:
    svc = service(ports=[port, {"name": "http", "protocol": "TCP", "port": 80}])
    state, problems = build_service(svc, [eps(endpoint("10.244.1.3"))], CONTEXT)
    assert state is not None and [p.port for p in state.ports] == [80]
    assert [p.field for p in problems] == [field]


def test_lb_ips_skip_proxy_mode_and_other_families_and_report_garbage() -> None:
    ingress = [{"ip": "192.0.2.10", "ipMode": "VIP"}, {"ip": "192.0.2.11"}, {"ip": "192.0.2.12", "ipMode": "Proxy"},
               {"ip": "2001:DB8:0::1"}, {"hostname": "lb.example"}, {"ip": "bogus"}, {"ip": "192.0.2.10"}]
    state, problems = build_service(service(ingress=ingress), [], CONTEXT)  # no ipFamilies: IPv4
    assert state is not None and state.lb_ips == ("192.0.2.10", "192.0.2.11") and state.families == (4,)
    assert [p.field for p in problems] == ["status.loadBalancer.ingress[3].ip", "status.loadBalancer.ingress[5].ip"]
    assert "IPv6 but the Service's spec.ipFamilies is [IPv4]" in problems[0].message

    state, problems = build_service(service(ingress=ingress, ipFamilies=["IPv6", "IPv4"]), [], CONTEXT)
    assert state is not None and state.lb_ips == ("192.0.2.10", "192.0.2.11", "2001:db8::1")  # canonical text
    assert state.families == (4, 6)
    assert [p.field for p in problems] == ["status.loadBalancer.ingress[5].ip"]


def test_dual_stack_endpoints_come_from_the_slices_of_both_families() -> None:
    svc = service(ipFamilies=["IPv4", "IPv6"], ingress=[{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}])
    v4 = eps(endpoint("10.244.1.3"), endpoint("10.244.2.3", node="node-b"), name="web-v4")
    v6 = eps(endpoint("2001:db8:1:1:0::3"), endpoint("2001:db8:1:2::3", node="node-b"), endpoint("10.244.1.9"),
             name="web-v6", address_type="IPv6")
    fqdn = eps(endpoint("example.com"), name="web-fqdn", address_type="FQDN")
    state, problems = build_service(svc, [v4, v6, fqdn], CONTEXT)
    assert state is not None
    assert state.ports[0].backends == (Backend("10.244.1.3", 8080), Backend("10.244.2.3", 8080),
                                       Backend("2001:db8:1:1::3", 8080), Backend("2001:db8:1:2::3", 8080))
    assert [p.field for p in problems] == ["EndpointSlice web-v6: endpoints[2].addresses[0]"]
    assert "not an IPv6 address" in problems[0].message
    assert state.local_endpoints == 1  # one dual-stack pod on this node: one endpoint in each family


def test_endpoints_of_a_family_the_service_lacks_are_reported() -> None:
    v6 = eps(endpoint("2001:db8:1:1::3"), name="web-v6", address_type="IPv6")
    state, problems = build_service(service(ipFamilies=["IPv4"]), [v6, eps(endpoint("10.244.1.3"))], CONTEXT)
    assert state is not None and state.ports[0].backends == (Backend("10.244.1.3", 8080),)
    assert [p.field for p in problems] == ["EndpointSlice web-v6: addressType"]
    assert "IPv6 endpoints for a Service whose spec.ipFamilies is [IPv4]" in problems[0].message


@pytest.mark.parametrize(("ip", "why"), [
    ("::1", "loopback"), ("fe80::1", "link-local"), ("ff02::1", "multicast"), ("::", "loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped"), ("2001:db8:9::1", "outside the pod network (2001:db8:1::/48)"),
])
def test_unusable_ipv6_endpoints(ip: str, why: str) -> None:
    networks = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("2001:db8:1::/48"))
    assert why in (endpoint_ip_problem(ip, networks) or "")
    assert endpoint_ip_problem("2001:db8:1:5::7", networks) is None
    assert endpoint_ip_problem("2001:db8:9::1", networks[:1]) is None  # no IPv6 pod network given: anywhere


@pytest.mark.parametrize(("spec", "annotations", "expected", "problem_fields"), [
    ({}, {}, None, []),
    ({"loadBalancerSourceRanges": ["203.0.113.0/24", "198.51.100.7/32"]}, {}, ("203.0.113.0/24", "198.51.100.7/32"),
     []),
    ({"loadBalancerSourceRanges": ["203.0.113.9/24"]}, {}, ("203.0.113.0/24",), []),  # host bits are dropped
    # an IPv6 range on an IPv4-only Service: reported, and no one may come in
    ({"loadBalancerSourceRanges": ["2001:db8::/32"]}, {}, (), ["spec.loadBalancerSourceRanges[0]"]),
    ({"loadBalancerSourceRanges": ["2001:db8::/32", "203.0.113.0/24"], "ipFamilies": ["IPv4", "IPv6"]}, {},
     ("2001:db8::/32", "203.0.113.0/24"), []),
    ({"loadBalancerSourceRanges": ["nonsense", "203.0.113.0/24"]}, {}, ("203.0.113.0/24",),
     ["spec.loadBalancerSourceRanges[0]"]),
    ({"loadBalancerSourceRanges": ["nonsense"]}, {}, (), ["spec.loadBalancerSourceRanges[0]"]),  # fails closed
    ({}, {"service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/24, 10.0.0.0/8"},
     ("203.0.113.0/24", "10.0.0.0/8"), []),
])
def test_source_ranges(spec: dict[str, Any], annotations: dict[str, str], expected: tuple[str, ...] | None,
                       problem_fields: list[str]) -> None:
    svc = service(**spec)
    svc["metadata"]["annotations"] = annotations
    state, problems = build_service(svc, [], CONTEXT)
    assert state is not None and state.source_ranges == expected
    assert [p.field for p in problems] == problem_fields


@pytest.mark.parametrize(("spec", "expected", "problems"), [
    ({}, None, 0),
    ({"sessionAffinity": "None"}, None, 0),
    ({"sessionAffinity": "ClientIP"}, 10800, 0),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 60, 0),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}, 10800, 1),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": "x"}}}, 10800, 1),
])
def test_session_affinity(spec: dict[str, Any], expected: int | None, problems: int) -> None:
    state, found = build_service(service(**spec), [], CONTEXT)
    assert state is not None and state.affinity_timeout == expected
    assert len(found) == problems


def test_announce_only_for_the_announce_classes() -> None:
    assert build(service()).announce
    context = BuildContext(node=NODE, scope=Scope("lbctl.io/aws"), announce_classes=frozenset({"lbctl.io/local"}))
    assert not build(service(lb_class="lbctl.io/aws"), context=context).announce


def test_slice_service_key() -> None:
    assert slice_service_key(eps()) == "ns/web"
    assert slice_service_key({"metadata": {"namespace": "ns"}}) is None
    assert slice_service_key({}) is None


MALFORMED_SERVICES: list[Any] = [
    None, 7, "text", [], {},
    {"metadata": None, "spec": None},
    {"metadata": {"name": 5, "namespace": ["x"]},
     "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local"}},
    service(ports="80"),
    service(ports={"port": 80}),
    service(ports=[None, 7, "x", {"port": None}, {"protocol": 5, "port": 80}]),
    {**service(), "status": "ready"},
    {**service(), "status": {"loadBalancer": {"ingress": "192.0.2.1"}}},
    {**service(), "status": {"loadBalancer": {"ingress": [None, 3, {"ip": 5}, {"ip": ["x"]}]}}},
    service(loadBalancerSourceRanges="203.0.113.0/24"),
    service(loadBalancerSourceRanges=[None, 5, {"a": 1}]),
    service(sessionAffinity="ClientIP", sessionAffinityConfig="x"),
    service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": None}),
    service(externalTrafficPolicy="Local", healthCheckNodePort="x"),
    {**service(), "metadata": {"name": "web", "namespace": "ns", "annotations": "x"}},
]
MALFORMED_SLICES: list[Any] = [
    None, 1, "x", {}, {"addressType": "IPv4"},
    {"addressType": "IPv4", "endpoints": "x", "ports": "y"},
    {"addressType": "IPv4", "endpoints": [None, 1, {"addresses": None}, {"addresses": [5]}, {"addresses": []}],
     "ports": [None, {"port": "x"}, {"name": 3}]},
    {"addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.3"], "conditions": "x", "nodeName": 4}],
     "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]},
    {"addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.3"]}], "ports": [{"name": "http", "port": -1}]},
]


@pytest.mark.parametrize("svc", MALFORMED_SERVICES)
@pytest.mark.parametrize("bad_slice", MALFORMED_SLICES)
def test_malformed_objects_never_raise(svc: Any, bad_slice: Any) -> None:
    state, problems = build_service(svc, [bad_slice, eps(endpoint("10.244.1.3"))], CONTEXT)
    assert state is None or isinstance(state, ServiceState)
    assert all(p.service and p.field and p.message for p in problems)


@pytest.mark.parametrize("text", [
    "10.0.0.1", "255.255.255.255", "0.0.0.0", "010.0.0.1", "10.0.0", "10.0.0.256", " 10.0.0.1", "1.2.3.4.5",
    "2001:db8::1", "2001:DB8:0:0:0:0:0:1", "::", "::ffff:10.0.0.1", "::10.0.0.1", "fe80::1%eth0", "2001:db8:::1",
    "2001:db8::g", "", "x", "1::2::3",
])
def test_addresses_are_parsed_as_ipaddress_parses_them(text: str) -> None:
    from lbctl.forwarder.desired import _parse
    try:
        expected: object = ipaddress.ip_address(text)
    except ValueError:
        expected = ValueError
    try:
        got: object = _parse(text)
    except ValueError:
        got = ValueError
    assert got == expected and str(got) == str(expected)


@pytest.mark.parametrize("text", [
    "10.0.0.1", "0.0.0.0", "0.1.2.3", "126.255.255.255", "127.0.0.1", "127.255.255.254", "128.0.0.1",
    "169.253.255.255", "169.254.0.1", "169.254.255.255", "169.255.0.1", "223.255.255.255", "224.0.0.1",
    "239.255.255.255", "240.0.0.1", "255.255.255.254", "255.255.255.255", "100.64.0.1", "192.168.1.1",
    "10.244.3.9", "10.245.0.1", "2001:db8::1", "2001:DB8::1", "::ffff:10.0.0.1", "fe80::1", "ff02::1", "::1",
    "010.0.0.1", "10.0.0", "x",
])
def test_endpoint_addresses_are_judged_as_ipaddress_judges_them(text: str) -> None:
    """The IPv4 fast path (four bytes, no ipaddress objects) gives ipaddress's answers."""
    from lbctl.forwarder.desired import _canonical
    networks = (ipaddress.ip_network("10.244.0.0/16"),)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        with pytest.raises(ValueError):
            _canonical(text)
        assert "not an IP address" in (endpoint_ip_problem(text, ()) or "")
        return
    assert _canonical(text) == (str(address), address.version)
    unusable = (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified
                or address.is_reserved or (address.version == 6 and address.ipv4_mapped is not None))
    assert (endpoint_ip_problem(text, ()) is not None) == unusable
    outside = address.version == 4 and address not in networks[0]
    assert (endpoint_ip_problem(text, networks) is not None) == (unusable or outside)
