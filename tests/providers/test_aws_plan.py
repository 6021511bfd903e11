"""Table tests of providers.aws_plan: validation, desired state and diffs, no AWS involved."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest

from lbctl.model.errors import InvalidServiceError, NoEligibleNodesError, TransientProviderError
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, PortStatus, ServiceRef
from providers import aws_plan as plan

P = plan.ANNOTATION_PREFIX
CLUSTER = "c1"
NAME = "a0123456789abcdef0123456789abcde"  # 32 characters, as lbctl names NLBs
I1, I2, I3 = "i-00000000000000001", "i-00000000000000002", "i-00000000000000003"


def node(name: str, instance: str, zone: str = "us-east-1a", **labels: str) -> NodeTarget:
    return NodeTarget(name=name, provider_id=f"aws:///{zone}/{instance}", zone=zone, labels=labels)


def spec(**changes: Any) -> LoadBalancerSpec:
    base = LoadBalancerSpec(
        service=ServiceRef("shop", "web", "0123-4567"), cluster_name=CLUSTER, name=NAME,
        ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("https", "TCP", 443, 30443)),
        nodes=(node("n1", I1), node("n2", I2, "us-east-1b")),
    )
    return dataclasses.replace(base, **changes)


def with_annotations(**annotations: str) -> LoadBalancerSpec:
    return spec(annotations={P + k.replace("_", "-"): v for k, v in annotations.items()})


# ─── validation ─────────────────────────────────────────────────────────────────────────────────

BAD_INPUT: list[tuple[str, Callable[[], LoadBalancerSpec], str]] = [
    ("internal not a boolean", lambda: with_annotations(internal="yes"), f"metadata.annotations[{P}internal]"),
    ("cross-zone not a boolean", lambda: with_annotations(cross_zone_load_balancing_enabled="1"),
     f"metadata.annotations[{P}cross-zone-load-balancing-enabled]"),
    ("unsupported type", lambda: with_annotations(type="classic"), f"metadata.annotations[{P}type]"),
    ("bad eip id", lambda: with_annotations(eip_allocations="eip-1,eipalloc-0123456789abcdef0"),
     f"metadata.annotations[{P}eip-allocations]"),
    ("eip on internal", lambda: with_annotations(internal="true", eip_allocations="eipalloc-0123456789abcdef0"),
     f"metadata.annotations[{P}eip-allocations]"),
    ("empty subnet entry", lambda: with_annotations(subnets="subnet-0123456789abcdef0,,x"),
     f"metadata.annotations[{P}subnets]"),
    ("reserved tag", lambda: with_annotations(additional_resource_tags="kubernetes.io/cluster/x=owned"),
     f"metadata.annotations[{P}additional-resource-tags]"),
    ("tag without =", lambda: with_annotations(additional_resource_tags="team"),
     f"metadata.annotations[{P}additional-resource-tags]"),
    ("hc protocol", lambda: with_annotations(healthcheck_protocol="UDP"),
     f"metadata.annotations[{P}healthcheck-protocol]"),
    ("hc port", lambda: with_annotations(healthcheck_port="http"), f"metadata.annotations[{P}healthcheck-port]"),
    ("hc path", lambda: with_annotations(healthcheck_protocol="HTTP", healthcheck_path="healthz"),
     f"metadata.annotations[{P}healthcheck-path]"),
    ("hc interval range", lambda: with_annotations(healthcheck_interval="4"),
     f"metadata.annotations[{P}healthcheck-interval]"),
    ("hc interval not a number", lambda: with_annotations(healthcheck_interval="ten"),
     f"metadata.annotations[{P}healthcheck-interval]"),
    ("hc timeout above interval", lambda: with_annotations(healthcheck_interval="10", healthcheck_timeout="20"),
     f"metadata.annotations[{P}healthcheck-timeout]"),
    ("hc thresholds", lambda: with_annotations(healthcheck_unhealthy_threshold="11"),
     f"metadata.annotations[{P}healthcheck-unhealthy-threshold]"),
    ("cert not an ARN", lambda: with_annotations(ssl_cert="my-cert"), f"metadata.annotations[{P}ssl-cert]"),
    ("ssl ports without cert", lambda: with_annotations(ssl_ports="443"), f"metadata.annotations[{P}ssl-ports]"),
    ("ssl port unknown", lambda: with_annotations(
        ssl_cert="arn:aws:acm:us-east-1:123456789012:certificate/abc", ssl_ports="8443"),
     f"metadata.annotations[{P}ssl-ports]"),
    ("SCTP", lambda: spec(ports=(PortSpec("a", "TCP", 80, 30080), PortSpec("b", "SCTP", 90, 30090))),
     "spec.ports[1].protocol"),
    ("no node port", lambda: spec(ports=(PortSpec("a", "TCP", 80, None),)), "spec.ports[0].nodePort"),
    ("tcp and udp on different node ports",
     lambda: spec(ports=(PortSpec("t", "TCP", 53, 30053), PortSpec("u", "UDP", 53, 30054))), "spec.ports[1].nodePort"),
    ("same port twice", lambda: spec(ports=(PortSpec("a", "TCP", 80, 30080), PortSpec("b", "TCP", 80, 30081))),
     "spec.ports[1].port"),
    ("51 listeners", lambda: spec(ports=tuple(PortSpec(f"p{i}", "TCP", 1000 + i, 30000 + i) for i in range(51))),
     "spec.ports"),
    ("no ports", lambda: spec(ports=()), "spec.ports"),
    ("bad CIDR", lambda: spec(source_ranges=("10.0.0.0/8", "10.0.0.300/32")), "spec.loadBalancerSourceRanges[1]"),
    ("node without providerID", lambda: spec(nodes=(node("n1", I1), NodeTarget("bare"))),
     "spec.nodes[bare].spec.providerID"),
    ("node with a GCE providerID", lambda: spec(nodes=(NodeTarget("g1", "gce://p/us-central1-a/g1"),)),
     "spec.nodes[g1].spec.providerID"),
    ("loadBalancerIP", lambda: spec(load_balancer_ip="1.2.3.4"), "spec.loadBalancerIP"),
    ("Local without health port", lambda: spec(external_traffic_policy="Local"), "spec.healthCheckNodePort"),
    ("NLB name", lambda: spec(name="internal-x"), "metadata.uid"),
    ("ip address type", lambda: with_annotations(ip_address_type="ipv6"), f"metadata.annotations[{P}ip-address-type]"),
    ("IPv6 range on an ipv4 NLB", lambda: spec(source_ranges=("10.0.0.0/8", "2001:db8::/32")),
     "spec.loadBalancerSourceRanges[1]"),
    ("UDP on a dualstack NLB", lambda: spec(
        annotations={P + "ip-address-type": "dualstack"},
        ports=(PortSpec("t", "TCP", 53, 30053), PortSpec("u", "UDP", 53, 30053))), "spec.ports[1].protocol"),
]


@pytest.mark.parametrize(("case", "make", "field"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_names_the_field_and_a_fix(case: str, make: Callable[[], LoadBalancerSpec], field: str) -> None:
    with pytest.raises(InvalidServiceError) as caught:
        plan.read_service(make())
    assert caught.value.field == field, case
    assert caught.value.fix


def test_tls_on_a_udp_port_is_refused() -> None:
    bad = spec(
        ports=(PortSpec("t", "TCP", 53, 30053), PortSpec("u", "UDP", 53, 30053)),
        annotations={P + "ssl-cert": "arn:aws:acm:us-east-1:123456789012:certificate/abc", P + "ssl-ports": "53"},
    )
    with pytest.raises(InvalidServiceError) as caught:
        plan.read_service(bad)
    assert caught.value.field == f"metadata.annotations[{P}ssl-ports]"


@pytest.mark.parametrize(("nodes", "annotations", "error"), [
    ((), {}, "spec.nodes"),
    ((node("n1", I1, role="db"),), {P + "target-node-labels": "role=web"},
     f"metadata.annotations[{P}target-node-labels]"),
])
def test_no_eligible_nodes(nodes: tuple[NodeTarget, ...], annotations: dict[str, str], error: str) -> None:
    with pytest.raises(NoEligibleNodesError) as caught:
        plan.read_service(spec(nodes=nodes, annotations=annotations))
    assert caught.value.field == error


# ─── reading a valid Service ────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("annotations", "scheme"), [
    ({}, "internet-facing"),
    ({P + "internal": "false"}, "internet-facing"),
    ({P + "internal": "true"}, "internal"),
    ({P + "internal": " TRUE "}, "internal"),
])
def test_scheme(annotations: dict[str, str], scheme: str) -> None:
    assert plan.read_service(spec(annotations=annotations)).scheme == scheme


def test_ports_become_listeners_and_target_groups() -> None:
    intent = plan.read_service(spec(ports=(
        PortSpec("dns-udp", "UDP", 53, 30053), PortSpec("dns-tcp", "TCP", 53, 30053),
        PortSpec("http", "TCP", 80, 30080), PortSpec("syslog", "UDP", 514, 30514),
    )))
    assert [(li.port, li.protocol) for li in intent.listeners] == [(53, "TCP_UDP"), (80, "TCP"), (514, "UDP")]
    groups = {tg.name: tg for tg in intent.target_groups}
    assert {(tg.protocol, tg.port) for tg in groups.values()} == {("TCP_UDP", 30053), ("TCP", 30080), ("UDP", 30514)}
    for listener in intent.listeners:
        assert groups[listener.target_group].port == {53: 30053, 80: 30080, 514: 30514}[listener.port]
    assert intent.ports == (PortStatus(53, "UDP"), PortStatus(53, "TCP"), PortStatus(80, "TCP"), PortStatus(514, "UDP"))


CERT = "arn:aws:acm:us-east-1:123456789012:certificate/0f0e"


@pytest.mark.parametrize(("ssl_ports", "tls"), [
    (None, {80, 443}),
    ("*", {80, 443}),
    ("443", {443}),
    ("https", {443}),
    ("http, 443", {80, 443}),
])
def test_tls_listeners(ssl_ports: str | None, tls: set[int]) -> None:
    annotations = {P + "ssl-cert": CERT} | ({P + "ssl-ports": ssl_ports} if ssl_ports is not None else {})
    intent = plan.read_service(spec(annotations=annotations))
    assert {li.port for li in intent.listeners if li.protocol == "TLS"} == tls
    assert all((li.certificate_arn == CERT) == (li.port in tls) for li in intent.listeners)
    assert all(tg.protocol == "TCP" for tg in intent.target_groups)  # TLS ends at the NLB


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, plan.HealthCheck("TCP", "traffic-port", None, 10, 10, 3, 3)),
    ({"external_traffic_policy": "Local", "health_check_node_port": 32000},
     plan.HealthCheck("HTTP", "32000", "/healthz", 10, 6, 3, 3)),
    ({"annotations": {P + "healthcheck-protocol": "http", P + "healthcheck-port": "10256"}},
     plan.HealthCheck("HTTP", "10256", "/", 10, 6, 3, 3)),
    ({"external_traffic_policy": "Local", "health_check_node_port": 32000,
      "annotations": {P + "healthcheck-protocol": "TCP", P + "healthcheck-port": "traffic-port"}},
     plan.HealthCheck("TCP", "traffic-port", None, 10, 10, 3, 3)),
    ({"annotations": {P + "healthcheck-protocol": "HTTPS", P + "healthcheck-path": "/ready",
                      P + "healthcheck-interval": "30", P + "healthcheck-timeout": "5",
                      P + "healthcheck-healthy-threshold": "2", P + "healthcheck-unhealthy-threshold": "4"}},
     plan.HealthCheck("HTTPS", "traffic-port", "/ready", 30, 5, 2, 4)),
])
def test_health_check(changes: dict[str, Any], expected: plan.HealthCheck) -> None:
    intent = plan.read_service(spec(**changes))
    assert {tg.health for tg in intent.target_groups} == {expected}


def test_target_node_labels_select_nodes() -> None:
    nodes = (node("n1", I1, pool="web"), node("n2", I2, pool="db"), node("n3", I3, pool="web", spot="true"))
    cases = {"pool=web": (I1, I3), "pool=web,spot=true": (I3,), "pool=db": (I2,)}
    for labels, expected in cases.items():
        intent = plan.read_service(spec(nodes=nodes, annotations={P + "target-node-labels": labels}))
        assert intent.instance_ids == expected, labels
    assert plan.read_service(spec(nodes=nodes)).instance_ids == (I1, I2, I3)


def test_every_node_needs_a_valid_provider_id_even_when_not_selected() -> None:
    nodes = (node("n1", I1, pool="web"), NodeTarget("n2", "", labels={"pool": "db"}))
    with pytest.raises(InvalidServiceError, match="n2"):
        plan.read_service(spec(nodes=nodes, annotations={P + "target-node-labels": "pool=web"}))


@pytest.mark.parametrize(("provider_id", "instance"), [
    ("aws:///us-east-1a/i-0123456789abcdef0", "i-0123456789abcdef0"),
    ("aws:////i-0123456789abcdef0", "i-0123456789abcdef0"),
    ("aws:///i-0123abcd", "i-0123abcd"),
])
def test_provider_ids(provider_id: str, instance: str) -> None:
    assert plan.parse_provider_id(NodeTarget("n", provider_id)) == instance


def test_tags() -> None:
    intent = plan.read_service(spec(annotations={P + "additional-resource-tags": "team=shop, cost-center = 42"}))
    assert intent.tags == {
        "kubernetes.io/cluster/c1": "owned", "kubernetes.io/service-name": "shop/web",
        "lbctl.io/service-uid": "0123-4567", "lbctl.io/load-balancer": NAME, "team": "shop", "cost-center": "42",
    }


def test_source_ranges_are_normalized() -> None:
    assert plan.read_service(spec()).source_ranges == ("0.0.0.0/0",)
    dualstack = {P + "ip-address-type": "dualstack"}
    intent = plan.read_service(spec(source_ranges=("10.1.2.3/8", "10.0.0.0/8", "2001:db8::1/64"),
                                    annotations=dualstack))
    assert intent.source_ranges == ("10.0.0.0/8", "2001:db8::/64")
    assert plan.read_service(spec(annotations=dualstack)).source_ranges == ("0.0.0.0/0", "::/0")


@pytest.mark.parametrize(("value", "expected"), [(None, "ipv4"), ("ipv4", "ipv4"), (" DualStack ", "dualstack")])
def test_ip_address_type(value: str | None, expected: str) -> None:
    annotations = {} if value is None else {P + "ip-address-type": value}
    assert plan.read_service(spec(annotations=annotations)).ip_address_type == expected


def test_target_group_names() -> None:
    names = {
        plan.target_group_name(NAME, port, proto) for port in (30080, 30081) for proto in ("TCP", "UDP", "TCP_UDP")
    }
    assert len(names) == 6
    for name in names:
        assert len(name) <= plan.TARGET_GROUP_NAME_MAX
        assert re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", name) and "--" not in name
        assert plan.is_target_group_of(NAME, name)
        assert not plan.is_target_group_of("b" + NAME[1:], name)
    assert plan.target_group_name(NAME, 30080, "TCP") == plan.target_group_name(NAME, 30080, "TCP")
    assert plan.target_group_name("short", 1, "TCP").startswith("short-")


# ─── cloud facts ────────────────────────────────────────────────────────────────────────────────

ELB, INTERNAL_ELB, OWNED = "kubernetes.io/role/elb", "kubernetes.io/role/internal-elb", "kubernetes.io/cluster/c1"


def subnet(sid: str, zone: str, **tags: str) -> plan.SubnetInfo:
    return plan.SubnetInfo(sid, zone, "vpc-1", f"10.0.{int(sid[-2:], 16)}.0/24", tags)


SUBNETS = [
    subnet("subnet-00000000000000002", "az-a", **{ELB: "1", OWNED: "owned", "Name": "pub-a"}),
    subnet("subnet-00000000000000001", "az-a", **{ELB: "1", OWNED: "shared", "Name": "pub-a2"}),
    subnet("subnet-00000000000000003", "az-b", **{ELB: "", OWNED: "owned", "Name": "pub-b"}),
    subnet("subnet-00000000000000004", "az-c", **{ELB: "1", "kubernetes.io/cluster/other": "owned"}),
    subnet("subnet-00000000000000005", "az-a", **{INTERNAL_ELB: "1", OWNED: "owned", "Name": "priv-a"}),
    subnet("subnet-00000000000000006", "az-d", **{OWNED: "owned", "Name": "untagged-d"}),
]


@pytest.mark.parametrize(("annotations", "expected"), [
    ({}, ["subnet-00000000000000001", "subnet-00000000000000003"]),  # one per zone, lowest id
    ({P + "internal": "true"}, ["subnet-00000000000000005"]),
    ({P + "subnets": "subnet-00000000000000006,pub-b"}, ["subnet-00000000000000003", "subnet-00000000000000006"]),
])
def test_choose_subnets(annotations: dict[str, str], expected: list[str]) -> None:
    intent = plan.read_service(spec(annotations=annotations))
    assert [s.id for s in plan.choose_subnets(intent, CLUSTER, SUBNETS)] == expected


def test_choose_subnets_for_a_dualstack_balancer() -> None:
    with_v6 = [dataclasses.replace(s, ipv6_cidrs=("2001:db8:0:3::/64",)) if s.zone == "az-b" else s for s in SUBNETS]
    dualstack = {P + "ip-address-type": "dualstack"}
    intent = plan.read_service(spec(annotations=dualstack))
    # Discovery keeps only tagged subnets with IPv6: az-a's have none, so the NLB lives in az-b alone.
    assert [s.id for s in plan.choose_subnets(intent, CLUSTER, with_v6)] == ["subnet-00000000000000003"]
    with pytest.raises(InvalidServiceError) as caught:
        plan.choose_subnets(intent, CLUSTER, SUBNETS)
    assert caught.value.field == f"metadata.annotations[{P}ip-address-type]"
    assert caught.value.problem.startswith(
        "subnets subnet-00000000000000001,subnet-00000000000000002,subnet-00000000000000003 have no IPv6 CIDR")
    listed = plan.read_service(spec(annotations={**dualstack, P + "subnets": "pub-a,pub-b"}))
    with pytest.raises(InvalidServiceError) as caught:
        plan.choose_subnets(listed, CLUSTER, with_v6)
    assert caught.value.problem.startswith("subnets subnet-00000000000000002 have no IPv6 CIDR")
    assert "remove the annotation" in (caught.value.fix or "")


@pytest.mark.parametrize(("annotations", "subnets", "field"), [
    ({P + "subnets": "subnet-0000000000000000f"}, SUBNETS, P + "subnets"),
    ({P + "subnets": "no-such-name"}, SUBNETS, P + "subnets"),
    ({P + "subnets": "pub-a,pub-a2"}, SUBNETS, P + "subnets"),  # one zone twice
    ({}, SUBNETS[3:4], P + "subnets"),  # nothing tagged for this cluster
    ({P + "eip-allocations": "eipalloc-00000001"}, SUBNETS, P + "eip-allocations"),  # 1 EIP, 2 subnets
])
def test_choose_subnets_refuses(annotations: dict[str, str], subnets: list[plan.SubnetInfo], field: str) -> None:
    intent = plan.read_service(spec(annotations=annotations))
    with pytest.raises(InvalidServiceError) as caught:
        plan.choose_subnets(intent, CLUSTER, subnets)
    assert caught.value.field == f"metadata.annotations[{field}]"


def instance(iid: str, *groups: str, state: str = "running", vpc: str = "vpc-1") -> plan.InstanceInfo:
    return plan.InstanceInfo(iid, state, vpc, groups)


def test_usable_instances() -> None:
    intent = plan.read_service(spec(nodes=(node("n1", I1), node("n2", I2), node("n3", I3))))
    usable = plan.usable_instances(intent, [instance(I1, "sg-1"), instance(I2, "sg-1", state="stopped")])
    assert [i.id for i in usable] == [I1]  # I3 does not exist, I2 is stopped
    with pytest.raises(NoEligibleNodesError):
        plan.usable_instances(intent, [instance(I2, "sg-1", state="terminated")])
    with pytest.raises(InvalidServiceError):
        plan.usable_instances(intent, [instance(I1, "sg-1"), instance(I2, "sg-1", vpc="vpc-2")])


def test_choose_node_groups() -> None:
    tags = {"sg-tagged": {OWNED: "owned"}, "sg-other": {}}
    assert plan.choose_node_groups([instance(I1, "sg-a"), instance(I2, "sg-b")], {}, CLUSTER, {}) == ("sg-a", "sg-b")
    assert plan.choose_node_groups([instance(I1, "sg-other", "sg-tagged")], tags, CLUSTER, {}) == ("sg-tagged",)
    with pytest.raises(TransientProviderError, match="node n1"):
        plan.choose_node_groups([instance(I1, "sg-other", "sg-x")], tags, CLUSTER, {I1: "n1"})


# ─── security groups ────────────────────────────────────────────────────────────────────────────

TWO_SUBNETS = [subnet("subnet-00000000000000001", "az-a"), subnet("subnet-00000000000000003", "az-b")]


def rules_of(changes: dict[str, Any]) -> set[tuple[str, int, int, str]]:
    rules = plan.frontend_rules(plan.read_service(spec(**changes)))
    return {(r.protocol, r.from_port, r.to_port, r.cidr) for r in rules}


def test_frontend_rules_admit_everyone_on_the_listener_ports_by_default() -> None:
    assert rules_of({}) == {("tcp", 80, 80, "0.0.0.0/0"), ("tcp", 443, 443, "0.0.0.0/0")}


def test_frontend_rules_follow_source_ranges_and_protocols() -> None:
    got = rules_of({"source_ranges": ("203.0.113.0/24", "198.51.100.0/24"), "ports": (
        PortSpec("d", "UDP", 53, 30053), PortSpec("t", "TCP", 53, 30053), PortSpec("s", "UDP", 514, 30514))})
    assert got == {
        (proto, port, port, cidr)
        for proto, port in (("tcp", 53), ("udp", 53), ("udp", 514))
        for cidr in ("203.0.113.0/24", "198.51.100.0/24")
    }
    dualstack = rules_of({"source_ranges": ("203.0.113.0/24", "2001:db8::/64"),
                          "annotations": {P + "ip-address-type": "dualstack"}})
    assert dualstack == {("tcp", p, p, c) for p in (80, 443) for c in ("203.0.113.0/24", "2001:db8::/64")}


def test_frontend_rules_for_tls_and_local_traffic_policy() -> None:
    # Health checks reach the nodes through the backend group: no rule of their own.
    assert rules_of({"external_traffic_policy": "Local", "health_check_node_port": 32000,
                     "annotations": {P + "ssl-cert": CERT}}) == {
        ("tcp", 80, 80, "0.0.0.0/0"), ("tcp", 443, 443, "0.0.0.0/0")}


def test_group_names() -> None:
    assert plan.frontend_group_name(NAME) == f"lbctl-{NAME}"
    assert plan.backend_group_name("c1") != plan.backend_group_name("c2")


def test_rules_from_permission() -> None:
    assert plan.rules_from_permission("tcp", 80, 80, ["10.1.2.3/8"]) == [plan.SgRule("tcp", 80, 80, "10.0.0.0/8")]
    assert plan.rules_from_permission("-1", None, None, ["0.0.0.0/0"]) == [plan.SgRule("-1", -1, -1, "0.0.0.0/0")]


# ─── diffs ──────────────────────────────────────────────────────────────────────────────────────


def desired_for(s: LoadBalancerSpec, *, targets: tuple[str, ...] = (I1, I2)) -> plan.Desired:
    intent = plan.read_service(s)
    return plan.build_desired(intent, TWO_SUBNETS, [instance(i, "sg-1") for i in targets], ["sg-1"])


def observed_as(desired: plan.Desired, **changes: Any) -> plan.Observed:
    """What AWS would report once `desired` is fully in place (then altered by `changes`)."""
    groups = tuple(
        plan.ObservedTargetGroup(f"arn:tg/{tg.name}", tg.name, tg.protocol, tg.port, tg.health, dict(desired.tags),
                                 desired.targets)
        for tg in desired.target_groups
    )
    listeners = tuple(
        plan.ObservedListener(f"arn:listener/{li.port}", li.port, li.protocol, f"arn:tg/{li.target_group}",
                              li.certificate_arn)
        for li in desired.listeners
    )
    balancer = plan.ObservedBalancer("arn:lb", desired.scheme, "lb.example", frozenset(s.id for s in desired.subnets),
                                     dict(desired.tags), desired.cross_zone, frozenset({"sg-front", "sg-back"}),
                                     desired.ip_address_type)
    base = plan.Observed(balancer, listeners, groups, frontend_group="sg-front", frontend_rules=desired.frontend_rules,
                         backend_group="sg-back", node_groups_open=frozenset(desired.node_groups))
    return dataclasses.replace(base, **changes)


NOTHING = plan.Observed(None, (), (), frontend_group=None, frontend_rules=frozenset(), backend_group=None,
                       node_groups_open=frozenset())


def test_no_op() -> None:
    desired = desired_for(spec())
    assert plan.plan_changes(desired, observed_as(desired)).empty


def test_nothing_exists_yet() -> None:
    desired = desired_for(spec())
    changes = plan.plan_changes(desired, NOTHING)
    assert changes.create_balancer and changes.delete_balancer is None
    assert changes.create_frontend_group and changes.create_backend_group and changes.open_node_groups == ("sg-1",)
    assert set(changes.authorize_frontend) == desired.frontend_rules and not changes.set_security_groups
    assert changes.create_target_groups == desired.target_groups
    assert changes.create_listeners == desired.listeners
    assert {name for name, _ in changes.register} == {tg.name for tg in desired.target_groups}
    assert all(ids == (I1, I2) for _, ids in changes.register)
    assert changes.set_subnets is None and changes.set_cross_zone is None and not changes.balancer_tags


def test_crash_left_a_balancer_without_listeners() -> None:
    desired = desired_for(spec())
    full = observed_as(desired)
    changes = plan.plan_changes(desired, dataclasses.replace(full, listeners=()))
    assert changes == plan.Changes(create_listeners=desired.listeners)


def test_node_added_and_removed_touch_only_targets() -> None:
    before = desired_for(spec(), targets=(I1, I2))
    added = desired_for(spec(), targets=(I1, I2, I3))
    changes = plan.plan_changes(added, observed_as(before))
    assert changes == plan.Changes(register=tuple((tg.name, (I3,)) for tg in added.target_groups))
    removed = desired_for(spec(), targets=(I2,))
    changes = plan.plan_changes(removed, observed_as(before))
    assert changes == plan.Changes(deregister=tuple((f"arn:tg/{tg.name}", (I1,)) for tg in before.target_groups))


def test_node_port_change_swaps_only_that_target_group() -> None:
    before = desired_for(spec())
    after = desired_for(spec(ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("https", "TCP", 443, 30444))))
    changes = plan.plan_changes(after, observed_as(before))
    new = plan.target_group_name(NAME, 30444, "TCP")
    old = plan.target_group_name(NAME, 30443, "TCP")
    assert [tg.name for tg in changes.create_target_groups] == [new]
    assert changes.register == ((new, (I1, I2)),)
    assert [(arn, li.port, li.target_group) for arn, li in changes.modify_listeners] == [("arn:listener/443", 443, new)]
    assert changes.delete_target_groups == (f"arn:tg/{old}",)
    assert not changes.create_listeners and not changes.delete_listeners and not changes.create_balancer
    assert not changes.authorize_frontend and not changes.revoke_frontend  # listener ports did not change


def test_service_port_change_replaces_only_that_listener() -> None:
    before = desired_for(spec())
    after = desired_for(spec(ports=(PortSpec("http", "TCP", 8080, 30080), PortSpec("https", "TCP", 443, 30443))))
    changes = plan.plan_changes(after, observed_as(before))
    assert changes.delete_listeners == ("arn:listener/80",)
    assert [(li.port, li.target_group) for li in changes.create_listeners] == [
        (8080, plan.target_group_name(NAME, 30080, "TCP"))]
    assert changes.authorize_frontend == (plan.SgRule("tcp", 8080, 8080, "0.0.0.0/0"),)
    assert changes.revoke_frontend == (plan.SgRule("tcp", 80, 80, "0.0.0.0/0"),)
    rest = dataclasses.replace(changes, delete_listeners=(), create_listeners=(), authorize_frontend=(),
                               revoke_frontend=())
    assert rest.empty


def test_protocol_change_replaces_the_listener() -> None:
    before = desired_for(spec(ports=(PortSpec("d", "TCP", 53, 30053),)))
    after = desired_for(spec(ports=(PortSpec("d", "TCP", 53, 30053), PortSpec("u", "UDP", 53, 30053))))
    changes = plan.plan_changes(after, observed_as(before))
    assert changes.delete_listeners == ("arn:listener/53",)
    assert [(li.port, li.protocol) for li in changes.create_listeners] == [(53, "TCP_UDP")]
    assert [tg.protocol for tg in changes.create_target_groups] == ["TCP_UDP"]
    assert len(changes.delete_target_groups) == 1


def test_certificate_change_modifies_the_listener() -> None:
    old = desired_for(spec(annotations={P + "ssl-cert": CERT, P + "ssl-ports": "443"}))
    new = desired_for(spec(annotations={P + "ssl-cert": CERT + "1", P + "ssl-ports": "443"}))
    changes = plan.plan_changes(new, observed_as(old))
    assert [(arn, li.certificate_arn) for arn, li in changes.modify_listeners] == [("arn:listener/443", CERT + "1")]
    assert dataclasses.replace(changes, modify_listeners=()).empty


def test_scheme_change_replaces_the_balancer_and_keeps_target_groups() -> None:
    before = desired_for(spec())
    after = desired_for(spec(annotations={P + "internal": "true"}))
    changes = plan.plan_changes(after, observed_as(before))
    assert changes.delete_balancer == "arn:lb" and changes.create_balancer
    assert changes.create_listeners == after.listeners and not changes.delete_listeners
    assert not changes.create_target_groups and not changes.delete_target_groups and not changes.register


def test_health_check_change_modifies_target_groups() -> None:
    before = desired_for(spec())
    after = desired_for(spec(external_traffic_policy="Local", health_check_node_port=32000))
    changes = plan.plan_changes(after, observed_as(before))
    assert {arn for arn, _ in changes.modify_health} == {tg.arn for tg in observed_as(before).target_groups}
    assert {tg.health.protocol for _, tg in changes.modify_health} == {"HTTP"}
    assert not changes.authorize_frontend and not changes.open_node_groups
    assert not changes.create_target_groups and not changes.modify_listeners


@pytest.mark.parametrize(("observed_changes", "expected"), [
    ({"subnet_ids": frozenset({"subnet-00000000000000001"})},
     plan.Changes(set_subnets=("subnet-00000000000000001", "subnet-00000000000000003"))),
    ({"cross_zone": True}, plan.Changes(set_cross_zone=False)),
    ({"tags": {"kubernetes.io/cluster/c1": "owned"}},
     plan.Changes(balancer_tags={"kubernetes.io/service-name": "shop/web", "lbctl.io/service-uid": "0123-4567",
                                 "lbctl.io/load-balancer": NAME})),
    ({"tags": "desired+user"}, plan.Changes()),  # tags a user added are left alone
])
def test_balancer_attributes(observed_changes: dict[str, Any], expected: plan.Changes) -> None:
    desired = desired_for(spec())
    full = observed_as(desired)
    assert full.balancer is not None
    if observed_changes.get("tags") == "desired+user":
        observed_changes = {"tags": {**desired.tags, "owner": "me"}}
    balancer = dataclasses.replace(full.balancer, **observed_changes)
    assert plan.plan_changes(desired, dataclasses.replace(full, balancer=balancer)) == expected


def test_ip_address_type_changes_in_place() -> None:
    ipv4 = desired_for(spec())
    dualstack = desired_for(spec(annotations={P + "ip-address-type": "dualstack"}))
    assert dualstack.ip_address_type == "dualstack"
    changes = plan.plan_changes(dualstack, observed_as(ipv4))
    assert changes.set_ip_address_type == "dualstack" and not changes.create_balancer
    assert set(changes.authorize_frontend) == {plan.SgRule("tcp", p, p, "::/0") for p in (80, 443)}
    back = plan.plan_changes(ipv4, observed_as(dualstack))
    assert back.set_ip_address_type == "ipv4" and set(back.revoke_frontend) == set(changes.authorize_frontend)
    assert plan.plan_changes(dualstack, NOTHING).set_ip_address_type is None  # created with it


def test_cross_zone_on_a_new_balancer() -> None:
    desired = desired_for(spec(annotations={P + "cross-zone-load-balancing-enabled": "true"}))
    assert plan.plan_changes(desired, NOTHING).set_cross_zone is True


def test_source_range_change_touches_only_frontend_rules() -> None:
    before = desired_for(spec(source_ranges=("203.0.113.0/24", "198.51.100.0/24")))
    after = desired_for(spec(source_ranges=("203.0.113.0/24", "192.0.2.0/24")))
    changes = plan.plan_changes(after, observed_as(before))
    def both_ports(cidr: str) -> tuple[plan.SgRule, ...]:
        return (plan.SgRule("tcp", 80, 80, cidr), plan.SgRule("tcp", 443, 443, cidr))

    assert changes == plan.Changes(authorize_frontend=both_ports("192.0.2.0/24"),
                                   revoke_frontend=both_ports("198.51.100.0/24"))


def test_a_rule_added_by_hand_to_the_frontend_group_is_revoked() -> None:
    desired = desired_for(spec())
    full = observed_as(desired)
    extra = plan.SgRule("tcp", 22, 22, "0.0.0.0/0")
    observed = dataclasses.replace(full, frontend_rules=full.frontend_rules | {extra})
    assert plan.plan_changes(desired, observed) == plan.Changes(revoke_frontend=(extra,))


@pytest.mark.parametrize(("observed_changes", "expected"), [
    ({"node_groups_open": frozenset()}, plan.Changes(open_node_groups=("sg-1",))),
    ({"frontend_group": None}, plan.Changes(
        create_frontend_group=True, set_security_groups=True,
        authorize_frontend=(plan.SgRule("tcp", 80, 80, "0.0.0.0/0"), plan.SgRule("tcp", 443, 443, "0.0.0.0/0")))),
    ({"backend_group": None}, plan.Changes(create_backend_group=True, set_security_groups=True,
                                           open_node_groups=("sg-1",))),
])
def test_security_groups_repaired(observed_changes: dict[str, Any], expected: plan.Changes) -> None:
    desired = desired_for(spec())
    assert plan.plan_changes(desired, dataclasses.replace(observed_as(desired), **observed_changes)) == expected


def test_balancer_without_security_groups_is_replaced() -> None:
    desired = desired_for(spec())
    full = observed_as(desired)
    assert full.balancer is not None
    bare = dataclasses.replace(full, balancer=dataclasses.replace(full.balancer, security_groups=frozenset()))
    changes = plan.plan_changes(desired, bare)
    assert changes.delete_balancer == "arn:lb" and changes.create_balancer


def test_unused_attached_target_group_is_deleted() -> None:
    desired = desired_for(spec())
    full = observed_as(desired)
    extra = dataclasses.replace(full.target_groups[0], arn="arn:tg/extra", name=f"{NAME[:22]}-abcdef012")
    changes = plan.plan_changes(desired, dataclasses.replace(full, target_groups=(*full.target_groups, extra)))
    assert changes == plan.Changes(delete_target_groups=("arn:tg/extra",))
    assert changes.structure_changed
    assert not plan.Changes(register=(("tg", (I1,)),)).structure_changed


# ─── small pure helpers ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("Throttling", 400, "retry"), ("ThrottlingException", 400, "retry"), ("RequestLimitExceeded", 503, "retry"),
    ("InternalFailure", 500, "retry"), ("Whatever", 502, "retry"),
    ("TooManyLoadBalancers", 400, "quota"), ("RulesPerSecurityGroupLimitExceeded", 400, "quota"),
    ("ValidationError", 400, "other"), ("InvalidParameterValue", 400, "other"), ("AccessDenied", 403, "other"),
])
def test_classify_error(code: str, status: int, kind: str) -> None:
    assert plan.classify_error(code, status) == kind
    assert plan.is_retryable_error(code, status) == (kind == "retry")


def test_ports_of_listeners() -> None:
    assert plan.ports_of_listeners([(443, "TLS"), (53, "TCP_UDP"), (514, "UDP")]) == (
        PortStatus(53, "TCP"), PortStatus(53, "UDP"), PortStatus(443, "TCP"), PortStatus(514, "UDP"))


@pytest.mark.parametrize(("tags", "expected"), [
    ({"kubernetes.io/cluster/c1": "owned", "kubernetes.io/service-name": "ns/svc", "lbctl.io/service-uid": "u1"},
     ("ns", "svc", "u1")),
    ({"kubernetes.io/cluster/c1": "owned", "kubernetes.io/service-name": "ns/svc"}, ("ns", "svc", None)),
    ({"kubernetes.io/cluster/c1": "shared", "kubernetes.io/service-name": "ns/svc"}, None),
    ({"kubernetes.io/cluster/c2": "owned", "kubernetes.io/service-name": "ns/svc"}, None),
    ({"kubernetes.io/cluster/c1": "owned", "kubernetes.io/service-name": "svc"}, None),
])
def test_ref_from_tags(tags: dict[str, str], expected: tuple[str, str, str | None] | None) -> None:
    ref = plan.ref_from_tags("lb", CLUSTER, tags)
    assert (None if ref is None else (ref.namespace, ref.service_name, ref.uid)) == expected


def test_check_owner_refuses_someone_elses_balancer() -> None:
    desired = desired_for(spec())
    plan.check_owner(desired.tags, dict(desired.tags), NAME)
    with pytest.raises(InvalidServiceError):
        plan.check_owner(desired.tags, {**desired.tags, "lbctl.io/service-uid": "other"}, NAME)
    with pytest.raises(InvalidServiceError):
        plan.check_owner(desired.tags, {"Name": "hand-made"}, NAME)


# ─── known state ────────────────────────────────────────────────────────────────────────────────


def known_for(s: LoadBalancerSpec, targets: tuple[str, ...] = (I1, I2), stamp: float = 100.0) -> plan.KnownState:
    return plan.KnownState(
        intent=plan.without_nodes(plan.read_service(s)), vpc_id="vpc-1", node_security_groups=frozenset({"sg-1"}),
        target_group_arns=("arn:tg/1",), targets=frozenset(targets), status=plan.status_of("lb", ()), stamp=stamp,
    )


@pytest.mark.parametrize(("now", "changes", "instances", "expected"), [
    (150.0, {}, [instance(I1, "sg-1"), instance(I2, "sg-1")], ((), ())),
    (150.0, {}, [instance(I1, "sg-1"), instance(I2, "sg-1"), instance(I3, "sg-1")], ((I3,), ())),
    (150.0, {}, [instance(I2, "sg-1")], ((), (I1,))),
    (400.0, {}, [instance(I1, "sg-1")], None),  # expired
    (150.0, {"source_ranges": ("10.0.0.0/8",)}, [instance(I1, "sg-1")], None),  # other wishes
    (150.0, {"annotations": {P + "internal": "true"}}, [instance(I1, "sg-1")], None),
    (150.0, {}, [instance(I1, "sg-1"), instance(I3, "sg-2")], None),  # a new node security group
    (150.0, {}, [instance(I1, "sg-1", vpc="vpc-2")], None),
])
def test_target_changes(now: float, changes: dict[str, Any], instances: list[plan.InstanceInfo],
                        expected: tuple[tuple[str, ...], tuple[str, ...]] | None) -> None:
    nodes = (node("n1", I1), node("n2", I2), node("n3", I3))
    intent = plan.read_service(spec(nodes=nodes, **changes))
    assert plan.target_changes(known_for(spec(nodes=nodes)), intent, instances, now, 300.0) == expected
    assert plan.target_changes(None, intent, instances, now, 300.0) is None
