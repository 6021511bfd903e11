"""Table tests of the operator's pure decisions: scope, node eligibility, spec building, status
patches, NodePort picking and the orphan sweep."""

from __future__ import annotations

from typing import Any

import pytest

from lbctl.model import nodeports
from lbctl.model.errors import InvalidServiceError
from lbctl.model.names import load_balancer_name
from lbctl.model.nodes import eligible_nodes, ineligibility, node_set_key
from lbctl.model.orphans import orphans
from lbctl.model.scope import FINALIZER, OWNER_ANNOTATION, Scope
from lbctl.model.spec import build_spec, missing_node_ports, source_ranges
from lbctl.model.status import ingress_from_api, ingress_to_api, ready_condition, status_patch
from lbctl.model.types import Ingress, LoadBalancerRef, NodeTarget, PortStatus

UID = "0b6c5a4e-1f2d-4c3b-9a8e-7d6c5b4a3f2e"


def svc(spec: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
        status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "shop", "uid": UID, **(meta or {})},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}],
                 **(spec or {})},
        "status": status or {},
    }


# ---- scope ----------------------------------------------------------------------------------

OURS = Scope("lbctl.io/local")
DEFAULT = Scope("lbctl.io/local", default_class=True)
ONLY_A = Scope("lbctl.io/local", namespaces=frozenset({"a"}))


@pytest.mark.parametrize(("scope", "service", "manages"), [
    (OURS, svc({"loadBalancerClass": "lbctl.io/local"}), True),
    (OURS, svc({"loadBalancerClass": "example.com/x"}), False),
    (OURS, svc(), False),
    (DEFAULT, svc(), True),
    (DEFAULT, svc({"loadBalancerClass": "example.com/x"}), False),
    (OURS, svc({"loadBalancerClass": "lbctl.io/local", "type": "ClusterIP"}), False),
    (OURS, svc({"loadBalancerClass": "lbctl.io/local"}, {"deletionTimestamp": "2026-01-01T00:00:00Z"}), False),
    (ONLY_A, svc({"loadBalancerClass": "lbctl.io/local"}), False),
    (ONLY_A, svc({"loadBalancerClass": "lbctl.io/local"}, {"namespace": "a"}), True),
])
def test_scope_manages(scope: Scope, service: dict[str, Any], manages: bool) -> None:
    assert scope.manages(service) is manages


@pytest.mark.parametrize(("meta", "holds"), [
    ({"finalizers": [FINALIZER], "annotations": {OWNER_ANNOTATION: "lbctl.io/local"}}, True),
    # the upstream service controller uses the same finalizer: without our mark it is not ours
    ({"finalizers": [FINALIZER]}, False),
    ({"finalizers": [FINALIZER], "annotations": {OWNER_ANNOTATION: "lbctl.io/aws"}}, False),
    ({"annotations": {OWNER_ANNOTATION: "lbctl.io/local"}}, False),
])
def test_scope_holds_only_what_carries_our_finalizer_and_mark(meta: dict[str, Any], holds: bool) -> None:
    assert OURS.holds(svc({"type": "ClusterIP"}, meta)) is holds


# ---- nodes ----------------------------------------------------------------------------------

def node(name: str, ready: str = "True", labels: dict[str, str] | None = None,
         taints: list[dict[str, str]] | None = None, deleting: bool = False, provider_id: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"taints": taints or [], "providerID": provider_id},
            "status": {"conditions": [{"type": "Ready", "status": ready}],
                       "addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}


@pytest.mark.parametrize(("candidate", "why"), [
    (node("n"), None),
    (node("n", ready="False"), "not Ready"),
    (node("n", ready="Unknown"), "not Ready"),
    ({"metadata": {"name": "n"}}, "not Ready"),
    (node("n", deleting=True), "being deleted"),
    (node("n", labels={"node.kubernetes.io/exclude-from-external-load-balancers": ""}),
     "labelled node.kubernetes.io/exclude-from-external-load-balancers"),
    (node("n", taints=[{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]),
     "tainted ToBeDeletedByClusterAutoscaler"),
    (node("n", taints=[{"key": "other", "effect": "NoSchedule"}]), None),
])
def test_node_eligibility(candidate: dict[str, Any], why: str | None) -> None:
    assert ineligibility(candidate) == why


def test_eligible_nodes_are_sorted_and_keyed_by_name_and_provider_id_only() -> None:
    nodes = [node("b", provider_id="aws:///z/i-b", labels={"topology.kubernetes.io/zone": "z"}), node("a"),
             node("c", ready="False")]
    eligible = eligible_nodes(nodes)
    assert [n.name for n in eligible] == ["a", "b"]
    assert eligible[1].zone == "z" and eligible[1].internal_ip == "192.0.2.10"
    relabelled = eligible_nodes([node("a", labels={"x": "y"}), nodes[0]])
    assert node_set_key(relabelled) == node_set_key(eligible)
    assert node_set_key(eligible_nodes([node("a"), node("b")])) != node_set_key(eligible)


# ---- spec -----------------------------------------------------------------------------------

def test_build_spec_carries_everything_a_provider_needs() -> None:
    service = svc(
        {"externalTrafficPolicy": "Local", "healthCheckNodePort": 31000, "loadBalancerIP": "198.18.0.1",
         "loadBalancerSourceRanges": ["10.1.2.3/8"], "ipFamilies": ["IPv4", "IPv6"],
         "ipFamilyPolicy": "PreferDualStack", "selector": {"app": "web"}, "sessionAffinity": "ClientIP"},
        {"labels": {"tier": "web"}, "annotations": {"a": "b"}, "creationTimestamp": "2026-01-01T00:00:00Z"},
        {"loadBalancer": {"ingress": [
            {"ip": "198.18.0.1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]}]}},
    )
    nodes = (NodeTarget("n1"),)
    spec = build_spec(service, nodes, "prod")
    assert spec.name == load_balancer_name(UID) == "a0b6c5a4e1f2d4c3b9a8e7d6c5b4a3f2"
    assert spec.cluster_name == "prod" and spec.nodes == nodes
    assert spec.source_ranges == ("10.0.0.0/8",)
    assert spec.ports[0].node_port == 30080 and spec.health_check_node_port == 31000
    assert spec.ip_families == ("IPv4", "IPv6") and spec.ip_family_policy == "PreferDualStack"
    assert spec.current_ingress == (Ingress(ip="198.18.0.1", ip_mode="VIP", ports=(PortStatus(80, "TCP"),)),)
    assert dict(spec.labels) == {"tier": "web"} and spec.created == "2026-01-01T00:00:00Z"
    assert spec.ref.service_key == "shop/web" and spec.ref.uid == UID


@pytest.mark.parametrize(("service", "field"), [
    (svc({"loadBalancerSourceRanges": ["10.0.0.0/8", "nope"]}), "spec.loadBalancerSourceRanges[1]"),
    (svc(meta={"annotations": {"service.beta.kubernetes.io/load-balancer-source-ranges": "1.2.3.4/33"}}),
     "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges][0]"),
    (svc({"ports": []}), "spec.ports"),
])
def test_invalid_services_name_the_field(service: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidServiceError) as error:
        build_spec(service, (), "c")
    assert error.value.field == field and error.value.fix


def test_source_ranges_come_from_the_annotation_when_the_field_is_empty() -> None:
    annotation = "service.beta.kubernetes.io/load-balancer-source-ranges"
    annotated = svc(meta={"annotations": {annotation: "192.0.2.0/24, 2001:db8::/32"}})
    assert source_ranges(annotated) == ("192.0.2.0/24", "2001:db8::/32")
    assert source_ranges(svc()) == ()


def test_missing_node_ports() -> None:
    assert missing_node_ports(svc({"ports": [{"port": 80}, {"port": 81, "nodePort": 30081}]})) == [0]


# ---- status ---------------------------------------------------------------------------------

def test_ingress_round_trips_and_ip_mode_needs_an_ip() -> None:
    ingress = (Ingress(ip="198.18.0.1", ip_mode="VIP", ports=(PortStatus(53, "UDP", error="x"),)),
               Ingress(hostname="lb.example.com", ip_mode="VIP"))
    api = ingress_to_api(ingress)
    assert api == [{"ip": "198.18.0.1", "ipMode": "VIP", "ports": [{"port": 53, "protocol": "UDP", "error": "x"}]},
                   {"hostname": "lb.example.com"}]
    assert ingress_from_api(api)[0] == ingress[0]


NOW = "2026-01-02T00:00:00Z"
THEN = "2026-01-01T00:00:00Z"
READY = {"type": "LoadBalancerReady", "status": "True", "reason": "LoadBalancerEnsured", "message": "m",
         "lastTransitionTime": THEN}
OTHER = {"type": "SomethingElse", "status": "True", "reason": "R", "message": "", "lastTransitionTime": THEN}
INGRESS = [{"ip": "198.18.0.1"}]


@pytest.mark.parametrize(("status", "ingress", "condition", "patch"), [
    # nothing changes: no write at all
    ({"loadBalancer": {"ingress": INGRESS}, "conditions": [READY]}, INGRESS,
     ready_condition(True, "LoadBalancerEnsured", "m", None, NOW, READY), None),
    # same condition, new address: the transition time is kept and only ingress is written
    ({"loadBalancer": {"ingress": [{"ip": "198.18.0.2"}]}, "conditions": [READY]}, INGRESS,
     ready_condition(True, "LoadBalancerEnsured", "m", None, NOW, READY),
     {"status": {"loadBalancer": {"ingress": INGRESS}}}),
    # a failure: condition flips (new transition time), ingress left alone, other conditions kept
    ({"loadBalancer": {"ingress": INGRESS}, "conditions": [OTHER, READY]}, None,
     ready_condition(False, "Pending", "full", None, NOW, READY),
     {"status": {"conditions": [OTHER, {"type": "LoadBalancerReady", "status": "False", "reason": "Pending",
                                        "message": "full", "lastTransitionTime": NOW}]}}),
    # release: ingress cleared with an explicit null, our condition removed
    ({"loadBalancer": {"ingress": INGRESS}, "conditions": [OTHER, READY]}, [], None,
     {"status": {"loadBalancer": {"ingress": None}, "conditions": [OTHER]}}),
    ({}, [], None, None),
])
def test_status_patch_writes_only_what_changed(
    status: dict[str, Any], ingress: list[dict[str, Any]] | None, condition: dict[str, Any] | None,
    patch: dict[str, Any] | None,
) -> None:
    assert status_patch({"status": status}, ingress, condition) == patch


# ---- NodePorts ------------------------------------------------------------------------------

def test_node_ports_skip_used_ones_and_wrap_around() -> None:
    other = svc({"healthCheckNodePort": 30002, "ports": [{"port": 1, "nodePort": 30001}]})
    used = nodeports.used_node_ports([svc(), other])
    assert used == {30080, 30001, 30002}
    assert nodeports.pick_node_ports(3, used, 30000, 30004, start=1) == [30003, 30004, 30000]
    with pytest.raises(ValueError, match="no 3 free NodePorts"):
        nodeports.pick_node_ports(3, {30000, 30001}, 30000, 30003)


def test_with_node_ports_fills_only_missing_ones() -> None:
    ports = [{"port": 80}, {"port": 81, "nodePort": 30081}, {"port": 82}]
    assert nodeports.with_node_ports(ports, [30100, 30101]) == [
        {"port": 80, "nodePort": 30100}, {"port": 81, "nodePort": 30081}, {"port": 82, "nodePort": 30101}]


# ---- orphans --------------------------------------------------------------------------------

def ref(service_name: str, uid: str | None, name: str | None = None) -> LoadBalancerRef:
    return LoadBalancerRef(name=name or load_balancer_name(uid or UID), cluster_name="c", namespace="shop",
                           service_name=service_name, uid=uid)


LIVE = svc({"loadBalancerClass": "lbctl.io/local"})


@pytest.mark.parametrize(("candidate", "services", "orphaned"), [
    (ref("web", UID), {"shop/web": LIVE}, False),
    (ref("web", None), {"shop/web": LIVE}, False),  # a cloud that does not record the uid
    (ref("gone", UID), {"shop/web": LIVE}, True),
    (ref("web", "11111111-2222-3333-4444-555555555555"), {"shop/web": LIVE}, True),  # recreated Service
    (ref("web", UID), {"shop/web": svc({"type": "ClusterIP"})}, True),  # no longer ours, no finalizer
    (ref("web", UID), {"shop/web": svc({"type": "ClusterIP"}, {
        "finalizers": [FINALIZER], "annotations": {OWNER_ANNOTATION: "lbctl.io/local"}})}, False),  # release pending
])
def test_orphans(candidate: LoadBalancerRef, services: dict[str, dict[str, Any]], orphaned: bool) -> None:
    assert (orphans([candidate], services, OURS) == [candidate]) is orphaned
