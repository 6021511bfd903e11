"""The GCE provider's pure part: reading a Service, desired resources, diffs. Table-driven."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest

from lbctl.model.errors import InvalidServiceError, NoEligibleNodesError, PendingError
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, PortStatus, ServiceRef
from providers.gce_plan import (
    COMPUTE_URL,
    LB_TYPE_ANNOTATION,
    NETWORK_TIER_ANNOTATION,
    BackendServiceState,
    Change,
    FirewallState,
    GceConfig,
    GroupState,
    ObservedAddress,
    ObservedInstance,
    PoolState,
    RuleState,
    Scheme,
    SubnetworkState,
    Tier,
    backend_service_change,
    backend_services_for,
    bare_ip,
    check_subnetwork_for_ipv6,
    firewall_change,
    firewall_for,
    group_change,
    group_members,
    health_check_firewall_for,
    owner_of,
    plan_address,
    plan_address_v6,
    pool_change,
    read_config,
    read_intent,
    rule_change,
    rules_for,
    status_for,
    target_tags,
)

CONFIG = GceConfig(cluster_name="prod", project="proj", region="europe-west1")
NAME = "a0123456789abcdef0123456789abcde"


def node(name: str, zone: str = "europe-west1-b", project: str = "proj") -> NodeTarget:
    return NodeTarget(name=name, provider_id=f"gce://{project}/{zone}/{name}")


def spec(**changes: Any) -> LoadBalancerSpec:
    base = LoadBalancerSpec(
        service=ServiceRef("shop", "web", "01234567-89ab-cdef-0123-456789abcdef"), cluster_name="prod", name=NAME,
        ports=(PortSpec("http", "TCP", 80), PortSpec("https", "TCP", 443), PortSpec("dns", "UDP", 53)),
        nodes=(node("n1"), node("n2", "europe-west1-c")),
    )
    return dataclasses.replace(base, **changes)


def url(path: str) -> str:
    return f"{COMPUTE_URL}projects/proj/{path}"


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "error"), [
    ({"region": "r"}, "project"),
    ({"project": "p"}, "region"),
    ({"project": "p", "region": "r", "node-tags": "ok,Not_OK"}, "Not_OK"),
])
def test_config_rejects_missing_or_bad_options(options: Mapping[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        read_config("prod", options)


def test_config_reads_options_with_either_separator() -> None:
    config = read_config("prod", {"project": "p", "region": "r", "node_tags": "a, b", "subnetwork": "s"})
    assert (config.project, config.region, config.network, config.node_tags) == ("p", "r", "default", ("a", "b"))
    assert config.subnetwork_url == f"{COMPUTE_URL}projects/p/regions/r/subnetworks/s"
    assert config.network_url == f"{COMPUTE_URL}projects/p/global/networks/default"


@pytest.mark.parametrize(("cluster", "same"), [("prod", True), ("Prod_Cluster.example", False), ("x" * 40, False)])
def test_cluster_token_is_a_valid_name_part_and_unique(cluster: str, same: bool) -> None:
    token = GceConfig(cluster_name=cluster, project="p", region="r").cluster_token
    assert (token == cluster) is same
    assert len(token) <= 30 and token[0].isalpha() and token.replace("-", "").isalnum() and token == token.lower()
    other = GceConfig(cluster_name=cluster + "2", project="p", region="r").cluster_token
    assert other != token


# -- reading the Service ---------------------------------------------------------------------------


@pytest.mark.parametrize(("annotations", "scheme", "tier"), [
    ({}, Scheme.EXTERNAL, Tier.PREMIUM),
    ({LB_TYPE_ANNOTATION: "Internal"}, Scheme.INTERNAL, Tier.PREMIUM),
    ({LB_TYPE_ANNOTATION: "internal"}, Scheme.INTERNAL, Tier.PREMIUM),
    ({"cloud.google.com/load-balancer-type": "Internal"}, Scheme.INTERNAL, Tier.PREMIUM),
    ({LB_TYPE_ANNOTATION: "External", NETWORK_TIER_ANNOTATION: "Standard"}, Scheme.EXTERNAL, Tier.STANDARD),
    ({NETWORK_TIER_ANNOTATION: "premium"}, Scheme.EXTERNAL, Tier.PREMIUM),
    ({LB_TYPE_ANNOTATION: "Internal", NETWORK_TIER_ANNOTATION: "Premium"}, Scheme.INTERNAL, Tier.PREMIUM),
])
def test_scheme_and_tier_from_annotations(annotations: dict[str, str], scheme: Scheme, tier: Tier) -> None:
    intent = read_intent(spec(annotations=annotations), CONFIG)
    assert (intent.scheme, intent.tier) == (scheme, tier)


BAD_INPUT = [
    pytest.param({"annotations": {NETWORK_TIER_ANNOTATION: "Gold"}},
                 f"metadata.annotations[{NETWORK_TIER_ANNOTATION}]", id="unknown-tier"),
    pytest.param({"annotations": {LB_TYPE_ANNOTATION: "Internal", NETWORK_TIER_ANNOTATION: "Standard"}},
                 f"metadata.annotations[{NETWORK_TIER_ANNOTATION}]", id="internal-standard"),
    pytest.param({"annotations": {LB_TYPE_ANNOTATION: "Private"}},
                 f"metadata.annotations[{LB_TYPE_ANNOTATION}]", id="unknown-type"),
    pytest.param({"source_ranges": ("10.0.0.0/8", "10.0.0.300/32")}, "spec.loadBalancerSourceRanges[1]",
                 id="bad-cidr"),
    pytest.param({"source_ranges": ("2001:db8::/32",)}, "spec.loadBalancerSourceRanges[0]", id="ipv6-range"),
    pytest.param({"ip_families": ("IPv6",), "annotations": {LB_TYPE_ANNOTATION: "Internal"},
                  "ports": (PortSpec("a", "TCP", 80),), "load_balancer_ip": "10.0.0.5"},
                 "spec.loadBalancerIP", id="ipv4-ip-on-ipv6-only"),
    pytest.param({"ip_families": ("IPv4", "IPv4")}, "spec.ipFamilies", id="family-twice"),
    pytest.param({"load_balancer_ip": "not-an-ip"}, "spec.loadBalancerIP", id="bad-ip"),
    pytest.param({"load_balancer_ip": "2001:db8::1"}, "spec.loadBalancerIP", id="ipv6-ip"),
    pytest.param({"ports": ()}, "spec.ports", id="no-ports"),
    pytest.param({"ports": (PortSpec("a", "TCP", 80), PortSpec("s", "SCTP", 9))}, "spec.ports[1].protocol",
                 id="sctp"),
    pytest.param({"nodes": (node("n1"), NodeTarget(name="bare"))}, "nodes[bare].spec.providerID",
                 id="no-provider-id"),
    pytest.param({"nodes": (NodeTarget(name="ec2", provider_id="aws:///us-east-1a/i-0abc"),)},
                 "nodes[ec2].spec.providerID", id="not-gce"),
    pytest.param({"nodes": (node("far", project="other"),)}, "nodes[far].spec.providerID", id="other-project"),
    pytest.param({"nodes": (node("far", zone="us-central1-a"),)}, "nodes[far].spec.providerID", id="other-region"),
    pytest.param({"external_traffic_policy": "Local"}, "spec.healthCheckNodePort", id="local-without-hc-port"),
    pytest.param({"session_affinity": "Sticky"}, "spec.sessionAffinity", id="affinity"),
    pytest.param({"ip_families": ("IPv6",)}, "spec.ipFamilies", id="ipv6-only"),
    pytest.param({"ip_family_policy": "RequireDualStack", "ip_families": ("IPv4", "IPv6")}, "spec.ipFamilyPolicy",
                 id="dual-stack"),
]


@pytest.mark.parametrize(("changes", "field"), BAD_INPUT)
def test_bad_input_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidServiceError) as caught:
        read_intent(spec(**changes), CONFIG)
    assert caught.value.field == field
    assert caught.value.fix


def test_no_nodes_is_pending_not_invalid() -> None:
    with pytest.raises(NoEligibleNodesError):
        read_intent(spec(nodes=()), CONFIG)


def test_same_port_on_tcp_and_udp_is_accepted() -> None:
    # GCE keys forwarding rules on (address, protocol, ports): one rule per protocol can share a port.
    intent = read_intent(spec(ports=(PortSpec("dns-tcp", "TCP", 53), PortSpec("dns-udp", "UDP", 53))), CONFIG)
    assert intent.ports == (("TCP", (53,)), ("UDP", (53,)))


def test_intent_normalises_ranges_nodes_and_health_check() -> None:
    intent = read_intent(spec(source_ranges=("10.1.2.3/8", "10.0.0.0/8", "192.168.0.0/16")), CONFIG)
    assert intent.source_ranges == ("10.0.0.0/8", "192.168.0.0/16")
    assert [ref.url for ref in intent.instances] == [url("zones/europe-west1-b/instances/n1"),
                                                     url("zones/europe-west1-c/instances/n2")]
    assert intent.zones == ("europe-west1-b", "europe-west1-c")
    assert intent.health_check.shared and intent.health_check.port == 10256
    assert intent.health_check.name == "k8s-prod-node"
    assert read_intent(spec(), CONFIG).source_ranges == ("0.0.0.0/0",)
    local = read_intent(spec(external_traffic_policy="Local", health_check_node_port=31234), CONFIG)
    assert (local.health_check.name, local.health_check.port, local.health_check.path,
            local.health_check.shared) == (NAME, 31234, "/healthz", False)


def test_description_names_cluster_service_and_uid() -> None:
    intent = read_intent(spec(), CONFIG)
    owner = owner_of(intent.description, "prod")
    assert owner is not None
    assert (owner.name, owner.namespace, owner.service_name, owner.uid) == (
        NAME, "shop", "web", "01234567-89ab-cdef-0123-456789abcdef")
    assert owner_of(intent.description, "other-cluster") is None
    assert owner_of("made by hand", "prod") is None
    assert owner_of(json.dumps({"kubernetes.io/cluster/prod": "owned", "lbctl.io/shared": "x"}), "prod") is None
    assert json.loads(intent.description) == {
        "kubernetes.io/cluster/prod": "owned", "kubernetes.io/service-name": "shop/web",
        "kubernetes.io/service-uid": "01234567-89ab-cdef-0123-456789abcdef", "lbctl.io/load-balancer": NAME}


def test_status_lists_every_port() -> None:
    status = status_for(read_intent(spec(), CONFIG), "203.0.113.7")
    assert status.ingress[0].ip == "203.0.113.7"
    assert status.ingress[0].ports == (PortStatus(80, "TCP"), PortStatus(443, "TCP"), PortStatus(53, "UDP"))


# -- desired resources -----------------------------------------------------------------------------


def test_external_rules_take_one_port_range_per_protocol() -> None:
    rules = rules_for(read_intent(spec(), CONFIG), CONFIG, "203.0.113.7")
    assert [(r.name, r.protocol, r.port_range, r.scheme, r.tier) for r in rules] == [
        (f"{NAME}-tcp", "TCP", "80-443", "EXTERNAL", "PREMIUM"),
        (f"{NAME}-udp", "UDP", "53-53", "EXTERNAL", "PREMIUM"),
    ]
    assert all(r.target == url(f"regions/europe-west1/targetPools/{NAME}") and r.ip == "203.0.113.7" for r in rules)


@pytest.mark.parametrize(("count", "all_ports"), [(1, False), (5, False), (6, True)])
def test_internal_rules_list_up_to_five_ports(count: int, all_ports: bool) -> None:
    ports = tuple(PortSpec(f"p{i}", "TCP", 8000 + i) for i in range(count))
    intent = read_intent(spec(ports=ports, annotations={LB_TYPE_ANNOTATION: "Internal"}), CONFIG)
    (rule,) = rules_for(intent, CONFIG, "10.0.0.9")
    assert rule.all_ports is all_ports
    assert rule.ports == (frozenset() if all_ports else frozenset(str(8000 + i) for i in range(count)))
    assert rule.backend_service == url(f"regions/europe-west1/backendServices/{NAME}-tcp")


def test_firewalls_open_the_ports_and_the_health_check() -> None:
    intent = read_intent(spec(source_ranges=("198.51.100.0/24",)), CONFIG)
    firewall = firewall_for(intent, CONFIG, ("gke-node",))
    assert firewall.name == f"k8s-fw-{NAME}"
    assert firewall.allowed == {("tcp", frozenset({"80", "443"})), ("udp", frozenset({"53"}))}
    assert firewall.source_ranges == {"198.51.100.0/24"} and firewall.target_tags == {"gke-node"}
    check = health_check_firewall_for(intent, CONFIG, ("gke-node",))
    assert check.name == "k8s-prod-node-http-hc"
    assert check.allowed == {("tcp", frozenset({"10256"}))}
    assert "35.191.0.0/16" in check.source_ranges


def test_internal_pieces_group_nodes_by_zone() -> None:
    intent = read_intent(spec(annotations={LB_TYPE_ANNOTATION: "Internal"},
                              nodes=(node("n1"), node("n2"), node("n3", "europe-west1-c"))), CONFIG)
    assert group_members(intent) == {
        "europe-west1-b": {url("zones/europe-west1-b/instances/n1"), url("zones/europe-west1-b/instances/n2")},
        "europe-west1-c": {url("zones/europe-west1-c/instances/n3")},
    }
    services = backend_services_for(intent, CONFIG, "hc-url")
    assert [s.name for s in services] == [f"{NAME}-tcp", f"{NAME}-udp"]
    assert services[0].groups == {url("zones/europe-west1-b/instanceGroups/k8s-ig--prod"),
                                  url("zones/europe-west1-c/instanceGroups/k8s-ig--prod")}


# -- diffs -----------------------------------------------------------------------------------------

FIREWALL = FirewallState(name="fw", source_ranges=frozenset({"0.0.0.0/0"}),
                         allowed=frozenset({("tcp", frozenset({"80"}))}), target_tags=frozenset({"n"}),
                         network=url("global/networks/default"))


@pytest.mark.parametrize(("observed", "change"), [
    (None, Change.CREATE),
    (FIREWALL, Change.NONE),
    (dataclasses.replace(FIREWALL, network="projects/proj/global/networks/default"), Change.NONE),
    (dataclasses.replace(FIREWALL, source_ranges=frozenset({"10.0.0.0/8"})), Change.PATCH),
    (dataclasses.replace(FIREWALL, allowed=frozenset({("tcp", frozenset({"81"}))})), Change.PATCH),
    (dataclasses.replace(FIREWALL, target_tags=frozenset({"m"})), Change.PATCH),
    (dataclasses.replace(FIREWALL, network=url("global/networks/other")), Change.RECREATE),
])
def test_firewall_change(observed: FirewallState | None, change: Change) -> None:
    assert firewall_change(FIREWALL, observed) is change


POOL = PoolState(name="p", instances=frozenset({url("zones/z-a/instances/n1"), url("zones/z-a/instances/n2")}),
                 health_checks=(url("global/httpHealthChecks/hc"),), session_affinity="NONE")


def test_pool_change_moves_members_one_call_each_way() -> None:
    observed = dataclasses.replace(POOL, instances=frozenset({url("zones/z-a/instances/n2"),
                                                              url("zones/z-a/instances/n3")}))
    change = pool_change(POOL, observed)
    assert change.change is Change.PATCH
    assert change.add == {url("zones/z-a/instances/n1")} and change.remove == {url("zones/z-a/instances/n3")}
    assert not change.health_checks_add and not change.health_checks_remove


@pytest.mark.parametrize(("observed", "change"), [
    (None, Change.CREATE),
    (POOL, Change.NONE),
    # GCE may hand back partial URLs; they name the same resources.
    (dataclasses.replace(POOL, instances=frozenset({"projects/proj/zones/z-a/instances/n1",
                                                    "projects/proj/zones/z-a/instances/n2"})), Change.NONE),
    (dataclasses.replace(POOL, session_affinity="CLIENT_IP"), Change.RECREATE),
    (dataclasses.replace(POOL, health_checks=(url("global/httpHealthChecks/other"),)), Change.PATCH),
])
def test_pool_change(observed: PoolState | None, change: Change) -> None:
    assert pool_change(POOL, observed).change is change


def test_pool_change_swaps_health_check() -> None:
    change = pool_change(POOL, dataclasses.replace(POOL, health_checks=(url("global/httpHealthChecks/old"),)))
    assert change.health_checks_remove == (url("global/httpHealthChecks/old"),)
    assert change.health_checks_add == (url("global/httpHealthChecks/hc"),)


RULE = RuleState(name="r", ip="203.0.113.7", protocol="TCP", scheme="EXTERNAL", port_range="80-80",
                 target=url("regions/r/targetPools/p"), tier="PREMIUM")


@pytest.mark.parametrize(("observed", "change"), [
    (None, Change.CREATE),
    (RULE, Change.NONE),
    (dataclasses.replace(RULE, port_range="80"), Change.NONE),
    (dataclasses.replace(RULE, ip="203.0.113.8"), Change.RECREATE),
    (dataclasses.replace(RULE, port_range="80-81"), Change.RECREATE),
    (dataclasses.replace(RULE, scheme="INTERNAL"), Change.RECREATE),
    (dataclasses.replace(RULE, tier="STANDARD"), Change.RECREATE),
    (dataclasses.replace(RULE, target=url("regions/r/targetPools/other")), Change.RECREATE),
])
def test_rule_change(observed: RuleState | None, change: Change) -> None:
    assert rule_change(RULE, observed) is change


SERVICE = BackendServiceState(name="b", protocol="TCP", groups=frozenset({url("zones/z-a/instanceGroups/g")}),
                              health_checks=(url("regions/r/healthChecks/h"),), session_affinity="NONE")


@pytest.mark.parametrize(("observed", "change"), [
    (None, Change.CREATE),
    (SERVICE, Change.NONE),
    (dataclasses.replace(SERVICE, groups=frozenset()), Change.PATCH),
    (dataclasses.replace(SERVICE, session_affinity="CLIENT_IP"), Change.PATCH),
    (dataclasses.replace(SERVICE, health_checks=()), Change.PATCH),
    (dataclasses.replace(SERVICE, protocol="UDP"), Change.PATCH),
])
def test_backend_service_change(observed: BackendServiceState | None, change: Change) -> None:
    assert backend_service_change(SERVICE, observed) is change


def test_group_change() -> None:
    want = frozenset({"a", "b"})
    created = group_change(want, None)
    assert (created.create, created.add, created.remove) == (True, want, frozenset())
    change = group_change(want, GroupState(zone="z", name="g", members=frozenset({"b", "c"})))
    assert (change.create, change.add, change.remove) == (False, {"a"}, {"c"})


# -- the address -----------------------------------------------------------------------------------


def owned(ip: str, **changes: Any) -> ObservedAddress:
    base = ObservedAddress(name=NAME, ip=ip, address_type="EXTERNAL", tier="PREMIUM", purpose="",
                           description=read_intent(spec(), CONFIG).description)
    return dataclasses.replace(base, **changes)


def users(ip: str, **changes: Any) -> ObservedAddress:
    base = ObservedAddress(name="users-ip", ip=ip, address_type="EXTERNAL", tier="PREMIUM", purpose="",
                           description="")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(("changes", "own", "requested", "expected"), [
    pytest.param({}, None, None, (None, True, False, False, False), id="reserve"),
    pytest.param({}, owned("1.2.3.4"), None, ("1.2.3.4", False, False, False, False), id="reuse-own"),
    pytest.param({"annotations": {NETWORK_TIER_ANNOTATION: "Standard"}}, owned("1.2.3.4"), None,
                 (None, True, True, False, False), id="tier-changed"),
    pytest.param({"annotations": {LB_TYPE_ANNOTATION: "Internal"}}, owned("1.2.3.4"), None,
                 (None, True, True, False, False), id="became-internal"),
    pytest.param({"load_balancer_ip": "5.6.7.8"}, None, users("5.6.7.8"), ("5.6.7.8", False, False, False, True),
                 id="requested"),
    pytest.param({"load_balancer_ip": "5.6.7.8"}, owned("1.2.3.4"), users("5.6.7.8"),
                 ("5.6.7.8", False, False, True, True), id="moved-to-requested"),
    pytest.param({"load_balancer_ip": "1.2.3.4"}, owned("1.2.3.4"), owned("1.2.3.4"),
                 ("1.2.3.4", False, False, False, False), id="requested-own"),
])
def test_plan_address(changes: dict[str, Any], own: ObservedAddress | None, requested: ObservedAddress | None,
                      expected: tuple[Any, ...]) -> None:
    plan = plan_address(read_intent(spec(**changes), CONFIG), CONFIG, own, requested, [])
    assert (plan.ip, plan.reserve, plan.release_own_first, plan.release_own_after, plan.user_owned) == expected


@pytest.mark.parametrize(("changes", "own", "requested", "error", "field"), [
    pytest.param({"load_balancer_ip": "5.6.7.8"}, None, None, InvalidServiceError, "spec.loadBalancerIP",
                 id="not-reserved"),
    pytest.param({"load_balancer_ip": "5.6.7.8"}, None, users("5.6.7.8", address_type="INTERNAL"),
                 InvalidServiceError, "spec.loadBalancerIP", id="wrong-type"),
    pytest.param({"load_balancer_ip": "5.6.7.8"}, None, users("5.6.7.8", tier="STANDARD"), InvalidServiceError,
                 f"metadata.annotations[{NETWORK_TIER_ANNOTATION}]", id="wrong-tier"),
    pytest.param({"load_balancer_ip": "10.0.0.5", "annotations": {LB_TYPE_ANNOTATION: "Internal"}}, None,
                 users("10.0.0.5", address_type="INTERNAL", purpose="GCE_ENDPOINT"), InvalidServiceError,
                 "spec.loadBalancerIP", id="internal-not-shareable"),
    pytest.param({"load_balancer_ip": "5.6.7.8"}, None,
                 users("5.6.7.8", users=(url("regions/europe-west1/forwardingRules/someone-else"),)),
                 PendingError, "spec.loadBalancerIP", id="in-use"),
    pytest.param({}, owned("1.2.3.4", description="a user's"), None, PendingError, "spec.loadBalancerIP",
                 id="name-taken"),
])
def test_plan_address_refuses(changes: dict[str, Any], own: ObservedAddress | None,
                              requested: ObservedAddress | None, error: type[Exception], field: str) -> None:
    with pytest.raises(error) as caught:
        plan_address(read_intent(spec(**changes), CONFIG), CONFIG, own, requested, [])
    assert getattr(caught.value, "field", None) == field


def test_plan_address_accepts_our_own_rules_as_users() -> None:
    ours = url(f"regions/europe-west1/forwardingRules/{NAME}-tcp")
    plan = plan_address(read_intent(spec(load_balancer_ip="5.6.7.8"), CONFIG), CONFIG, None,
                        users("5.6.7.8", users=(ours,)), [ours])
    assert plan.ip == "5.6.7.8"


# -- node tags -------------------------------------------------------------------------------------


def instances(**tags: tuple[str, ...]) -> dict[str, ObservedInstance]:
    zones = {"n1": "europe-west1-b", "n2": "europe-west1-c"}
    return {url(f"zones/{zones[name]}/instances/{name}"): ObservedInstance(url="", tags=value)
            for name, value in tags.items()}


def test_target_tags_are_the_nodes_tags() -> None:
    intent = read_intent(spec(), CONFIG)
    assert target_tags(intent, CONFIG, instances(n1=("a", "b"), n2=("b",))) == ("a", "b")
    configured = dataclasses.replace(CONFIG, node_tags=("fixed",))
    assert target_tags(intent, configured, instances(n1=(), n2=())) == ("fixed",)


@pytest.mark.parametrize("found", [{"n1": ("a",)}, {"n1": ("a",), "n2": ()}])
def test_target_tags_wait_for_missing_or_untagged_instances(found: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(PendingError, match="n2"):
        target_tags(read_intent(spec(), CONFIG), CONFIG, instances(**found))


# -- IPv6 and dual-stack -----------------------------------------------------------------------------

INTERNAL = {LB_TYPE_ANNOTATION: "Internal"}
TCP = (PortSpec("http", "TCP", 80), PortSpec("https", "TCP", 443))


@pytest.mark.parametrize(("changes", "families"), [
    ({}, ("IPv4",)),
    ({"annotations": INTERNAL, "ports": TCP, "ip_families": ("IPv4", "IPv6"),
      "ip_family_policy": "RequireDualStack"}, ("IPv4", "IPv6")),
    ({"annotations": INTERNAL, "ports": TCP, "ip_families": ("IPv6", "IPv4"),
      "ip_family_policy": "PreferDualStack"}, ("IPv6", "IPv4")),
    ({"annotations": INTERNAL, "ports": TCP, "ip_families": ("IPv6",)}, ("IPv6",)),
    # where IPv6 cannot be had, PreferDualStack settles for IPv4
    ({"ip_families": ("IPv4", "IPv6"), "ip_family_policy": "PreferDualStack"}, ("IPv4",)),
    ({"annotations": INTERNAL, "ip_families": ("IPv4", "IPv6"), "ip_family_policy": "PreferDualStack"}, ("IPv4",)),
])
def test_families(changes: dict[str, Any], families: tuple[str, ...]) -> None:
    assert read_intent(spec(**changes), CONFIG).families == families


@pytest.mark.parametrize(("ranges", "v4", "v6"), [
    ((), ("0.0.0.0/0",), ("::/0",)),
    (("10.0.0.0/8", "2001:db8::1/32"), ("10.0.0.0/8",), ("2001:db8::/32",)),
    (("10.0.0.0/8",), ("10.0.0.0/8",), ()),  # IPv6 clients admitted by none of the ranges: no IPv6 firewall
])
def test_source_ranges_split_by_family(ranges: tuple[str, ...], v4: tuple[str, ...], v6: tuple[str, ...]) -> None:
    intent = read_intent(spec(annotations=INTERNAL, ports=TCP, ip_families=("IPv4", "IPv6"),
                              ip_family_policy="RequireDualStack", source_ranges=ranges), CONFIG)
    assert (intent.ranges("IPv4"), intent.ranges("IPv6")) == (v4, v6)
    firewall = firewall_for(intent, CONFIG, ("n",), "IPv6")
    assert firewall.name == f"k8s-fw-{NAME}-ipv6" and firewall.source_ranges == frozenset(v6)
    check = health_check_firewall_for(intent, CONFIG, ("n",), "IPv6")
    assert (check.name, check.source_ranges) == ("k8s-prod-node-http-hc-ipv6", {"2600:2d00:1:b029::/64"})


def test_dual_stack_rules_and_status() -> None:
    intent = read_intent(spec(annotations=INTERNAL, ports=TCP, ip_families=("IPv6", "IPv4"),
                              ip_family_policy="RequireDualStack"), CONFIG)
    rules = rules_for(intent, CONFIG, "10.0.0.9", "fd20::9")
    assert [(r.name, r.ip, r.ip_version) for r in rules] == [
        (f"{NAME}-tcp", "10.0.0.9", ""), (f"{NAME}-tcp-ipv6", "fd20::9", "IPV6")]
    assert rules[0].backend_service == rules[1].backend_service and rules[1].ports == {"80", "443"}
    assert [i.ip for i in status_for(intent, "10.0.0.9", "fd20::9").ingress] == ["fd20::9", "10.0.0.9"]
    assert [i.ip for i in status_for(intent, None, "fd20::9").ingress] == ["fd20::9"]
    assert rule_change(rules[1], dataclasses.replace(rules[1], ip_version="")) is Change.RECREATE


def test_plan_address_v6() -> None:
    intent = read_intent(spec(annotations=INTERNAL, ports=TCP, ip_families=("IPv6",)), CONFIG)
    mine = json.dumps({"kubernetes.io/cluster/prod": "owned", "kubernetes.io/service-name": "shop/web",
                       "lbctl.io/load-balancer": NAME})
    own = ObservedAddress(name=f"{NAME}-ipv6", ip="fd20:0:0:1:0:0:0:100", address_type="INTERNAL", tier="",
                          purpose="GCE_ENDPOINT", description=mine, ip_version="IPV6")
    assert plan_address_v6(intent, CONFIG, None).reserve
    assert plan_address_v6(intent, CONFIG, own).ip == "fd20:0:0:1::100"
    assert plan_address_v6(intent, CONFIG, dataclasses.replace(own, ip_version="IPV4")).release_own_first
    with pytest.raises(PendingError):
        plan_address_v6(intent, CONFIG, dataclasses.replace(own, description="someone's"))


@pytest.mark.parametrize(("subnetwork", "fine"), [
    (SubnetworkState("default", "IPV4_IPV6", "INTERNAL"), True),
    (SubnetworkState("default", "IPV6_ONLY", "INTERNAL"), True),
    (SubnetworkState("default", "IPV4_IPV6", "EXTERNAL"), False),
    (SubnetworkState("default", "IPV4_ONLY", ""), False),
    (SubnetworkState("default", "", ""), False),
    (None, False),
])
def test_check_subnetwork_for_ipv6(subnetwork: SubnetworkState | None, fine: bool) -> None:
    intent = read_intent(spec(annotations=INTERNAL, ports=TCP, ip_families=("IPv4", "IPv6"),
                              ip_family_policy="RequireDualStack"), CONFIG)
    if fine:
        check_subnetwork_for_ipv6(intent, CONFIG, subnetwork)
        return
    with pytest.raises(InvalidServiceError) as caught:
        check_subnetwork_for_ipv6(intent, CONFIG, subnetwork)
    assert caught.value.field == "spec.ipFamilyPolicy" and "default" in caught.value.problem


@pytest.mark.parametrize(("text", "bare"), [("fd20:0:0:1:0:0:0:100/96", "fd20:0:0:1::100"),
                                            ("10.0.0.9", "10.0.0.9"), ("", "")])
def test_bare_ip(text: str, bare: str) -> None:
    assert bare_ip(text) == bare
