"""`lbctl status` and `lbctl doctor` decisions: plain API objects in, rows and checks out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbctl.report import doctor, facts, render, status

DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy"
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def stamp(seconds_ago: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(NOW - seconds_ago, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def service(name: str = "web", namespace: str = "shop", lb_class: str | None = "lbctl.io/local",
            ingress: list[dict[str, Any]] | None = None, condition: tuple[str, str, str] | None = None,
            annotations: dict[str, str] | None = None, kind: str = "LoadBalancer", age_s: float = 30,
            condition_age_s: float | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, "ports": [{"port": 80, "protocol": "TCP", "nodePort": 31000}]}
    if lb_class:
        spec["loadBalancerClass"] = lb_class
    status_: dict[str, Any] = {"loadBalancer": {"ingress": ingress or []}}
    if condition:
        status_["conditions"] = [{"type": "LoadBalancerReady", "status": condition[0], "reason": condition[1],
                                  "message": condition[2],
                                  "lastTransitionTime": stamp(age_s if condition_age_s is None else condition_age_s)}]
    return {"metadata": {"name": name, "namespace": namespace, "uid": "0a1b2c3d-0000-4000-8000-000000000001",
                         "creationTimestamp": stamp(age_s), "annotations": annotations or {}},
            "spec": spec, "status": status_}


def pool(name: str, addresses: list[str], assigned: int | None = None, free: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool",
                            "metadata": {"name": name, "creationTimestamp": stamp(100)},
                            "spec": {"addresses": addresses}}
    if assigned is not None:
        body["status"] = {"assigned": assigned, "free": free}
    return body


MARKED = {"lbctl.io/load-balancer-class": "lbctl.io/local"}
READY_SVC = service(ingress=[{"ip": "198.18.0.10", "ipMode": "VIP"}], annotations={
    **MARKED, "lbctl.io/announcing-node": "node-1"}, condition=("True", "LoadBalancerEnsured", "local load balancer"))
EXHAUSTED = service("queued", ingress=[], annotations=MARKED, condition=(
    "False", "Pending", "every address pool that serves this Service is exhausted (a); fix: delete a Service that "
    "holds an address, or add addresses to a pool"))
BAD = service("bad", annotations=MARKED, condition=(
    "False", "InvalidConfiguration", "annotation lbctl.io/load-balancer-ips: 'x' is not an IP address; fix: write "
    "one IPv4 and/or one IPv6 address"))


@pytest.mark.parametrize(("svc", "expected"), [
    (READY_SVC, ("ready", "")),
    (EXHAUSTED, ("pending", "delete a Service that holds an address, or add addresses to a pool")),
    (BAD, ("failed", "write one IPv4 and/or one IPv6 address")),
    (service("new", annotations=MARKED), ("pending", "")),
    (service("unseen"), ("pending", "check that the operator runs and handles this class (`lbctl doctor`)")),
    (service("no-ingress", condition=("True", "LoadBalancerEnsured", "x")), ("pending", "check that the operator "
                                                                             "runs and handles this class "
                                                                             "(`lbctl doctor`)")),
], ids=["ready", "pool-exhausted", "bad-annotation", "provisioning", "not-seen", "true-but-no-address"])
def test_service_state(svc: dict[str, Any], expected: tuple[str, str]) -> None:
    state = facts.service_state(svc)
    assert (state.state, state.fix) == expected


@pytest.mark.parametrize(("svc", "ours"), [
    (service(), True),
    (service(lb_class="lbctl.io/aws"), True),
    (service(lb_class="example.com/other"), False),
    (service(lb_class=None), False),
    (service(lb_class=None, annotations=MARKED), True),  # adopted with --default-class
    (service(kind="ClusterIP", lb_class=None), False),
])
def test_which_services_are_lbctls(svc: dict[str, Any], ours: bool) -> None:
    assert facts.is_lbctls(svc) is ours


def test_rows_name_pool_owner_and_the_fix() -> None:
    events = [{"type": "Warning", "reason": "SyncLoadBalancerFailed", "involvedObject": {
        "kind": "Service", "namespace": "shop", "name": "new"}, "lastTimestamp": stamp(5),
        "message": "Error syncing load balancer: no address pool with autoAssign serves this Service's namespace "
                   "and labels; fix: create a LoadBalancerPool"}]
    found = status.rows([READY_SVC, EXHAUSTED, BAD, service("new", annotations=MARKED),
                         service("other", lb_class="example.com/x")],
                        [pool("a", ["198.18.0.0/28"])], events, NOW)
    assert [(r.name, r.state, r.balancer, r.served_by, r.age) for r in found] == [
        ("bad", "failed", "-", "-", "30s"), ("new", "pending", "-", "-", "30s"),
        ("queued", "pending", "-", "-", "30s"), ("web", "ready", "a", "node-1 (L2)", "30s")]
    assert found[0].reason == "annotation lbctl.io/load-balancer-ips: 'x' is not an IP address"
    assert found[1].reason == "the operator is provisioning its balancer"
    assert found[2].fix.startswith("delete a Service")
    assert found[3].reason == ""


def test_a_condition_less_service_takes_its_reason_from_the_last_warning() -> None:
    unmarked = service("new")
    events = [{"type": "Warning", "involvedObject": {"kind": "Service", "namespace": "shop", "name": "new"},
               "lastTimestamp": stamp(5), "message": "bad thing; fix: do this"}]
    (row,) = status.rows([{**unmarked, "status": {}}], [], events, NOW)
    assert row.state == "pending"
    assert row.reason == "no lbctl operator has taken it up yet"  # the state's own words come first


@pytest.mark.parametrize(("svc", "provider", "served_by"), [
    (service(lb_class="lbctl.io/aws", ingress=[{"hostname": "a1-123.elb.us-east-1.amazonaws.com"}]), "aws",
     "a1-123.elb.us-east-1.amazonaws.com"),
    (service(lb_class="lbctl.io/gce", ingress=[{"ip": "203.0.113.7"}]), "gce",
     "forwarding rule a0a1b2c3d00004000800000000000000"),
    (service(lb_class="lbctl.io/gce"), "gce", "-"),
])
def test_cloud_rows_name_the_balancer(svc: dict[str, Any], provider: str, served_by: str) -> None:
    (row,) = status.rows([svc], [], [], NOW)
    assert (row.provider, row.balancer, row.served_by) == (provider, "a0a1b2c3d00004000800000000000000", served_by)


def lease(node: str, renewed_ago: float, duration: int = 40) -> dict[str, Any]:
    return {"metadata": {"name": f"lbctl-forwarder-{node}", "namespace": "lbctl-system"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": stamp(renewed_ago)}}


def node(name: str, ready: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}


def test_detail_shows_each_nodes_forwarder_and_endpoints() -> None:
    slices = [{"endpoints": [{"nodeName": "node-1", "conditions": {"ready": True}},
                             {"nodeName": "node-2", "conditions": {"ready": False}},
                             {"nodeName": "node-2"}]}]
    probes: dict[str, Any] = {"node-1": {"state": "serving", "services": {"shop/web": {"programmed": True}}},
                              "node-3": "unreachable (ClientConnectorError)"}
    result = status.detail(READY_SVC, [pool("a", ["198.18.0.0/28"])], [], [node("node-1"), node("node-2"),
                                                                           node("node-3")],
                           [lease("node-1", 5), lease("node-2", 300)], slices, NOW, probes)
    assert [(n.node, n.forwarder, n.announcing, n.ready_endpoints, n.healthz, n.programmed) for n in result.nodes] == [
        ("node-1", "live (renewed 5s ago)", True, 1, "serving", True),
        ("node-2", "stale (renewed 5m ago)", False, 1, "", None),
        ("node-3", "none (no Lease lbctl-system/lbctl-forwarder-<node>)", False, 0,
         "unreachable (ClientConnectorError)", None)]
    assert result.spec["ports"] == ["80/TCP→31000"]
    assert [(n.seen_endpoints, n.local_endpoints, n.problems) for n in result.nodes] == [(None, None, ())] * 3
    text = render.detail_text(result)
    assert "Served by:     node-1 (L2)" in text and "Pool:          a" in text
    assert render.dump(result.to_dict(), "json").startswith("{")


def test_probe_shows_what_each_forwarder_saw() -> None:
    """--probe: per node, rules programmed, the endpoints the forwarder balances to (and how many are
    local), what it left out, and a health-check answer from its own local count."""
    local = {**READY_SVC, "spec": {**READY_SVC["spec"], "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}}
    slices = [{"endpoints": [{"nodeName": "node-1", "conditions": {"ready": True}},
                             {"nodeName": "node-2", "conditions": {"ready": True}}]}]
    probes: dict[str, Any] = {
        "node-1": {"state": "serving", "services": {"shop/web": {
            "known": True, "programmed": True, "readyEndpoints": 2, "localEndpoints": 1, "problems": []}}},
        # the apiserver has a ready endpoint on node-2, but this forwarder has not seen it (yet)
        "node-2": {"state": "serving", "services": {"shop/web": {
            "known": True, "programmed": False, "readyEndpoints": 1, "localEndpoints": 0,
            "problems": ["endpoint fd00::5 is IPv6 but the Service is IPv4 only"]}}},
        "node-3": {"state": "no-state", "services": {"shop/web": {"known": False, "programmed": False,
                                                                   "readyEndpoints": 0, "localEndpoints": 0}}},
    }
    result = status.detail(local, [], [], [node("node-1"), node("node-2"), node("node-3")], [], slices, NOW, probes)
    assert [(n.node, n.healthz, n.programmed, n.seen_endpoints, n.local_endpoints, n.health_check)
            for n in result.nodes] == [
        ("node-1", "serving", True, 2, 1, "200 (1 local)"),
        ("node-2", "serving", False, 1, 0, "503 (no local endpoint)"),  # the slices alone would say 200
        ("node-3", "no-state (does not know the Service)", False, 0, 0, "503 (no local endpoint)")]
    text = render.detail_text(result)
    assert re.search(r"^  NODE\s+FORWARDER\s+ANNOUNCES\s+READY-ENDPOINTS\s+HEALTH-CHECK\s+HEALTHZ\s+PROGRAMMED\s+"
                     r"SEEN-ENDPOINTS$", text, re.M), text
    assert re.search(r"^  node-1\s+none .*\s+yes\s+1\s+200 \(1 local\)\s+serving\s+yes\s+2 \(1 local\)$", text,
                     re.M), text
    assert re.search(r"^  node-2\s+none .*\s+1\s+503 \(no local endpoint\)\s+serving\s+no\s+1 \(0 local\)$", text,
                     re.M), text
    assert "  node-2: left out: endpoint fd00::5 is IPv6 but the Service is IPv4 only" in text.splitlines()
    as_json = result.to_dict()["nodes"][1]
    assert (as_json["seen_endpoints"], as_json["local_endpoints"], as_json["problems"]) == (
        1, 0, ("endpoint fd00::5 is IPv6 but the Service is IPv4 only",))


def test_status_table_lines() -> None:
    rows = status.rows([READY_SVC, EXHAUSTED], [pool("a", ["198.18.0.0/28"])], [], NOW)
    lines = render.status_table(rows, all_namespaces=True).splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "CLASS", "ADDRESSES", "POOL/BALANCER", "SERVED-BY", "STATE",
                                "AGE", "REASON"]
    assert lines[1].split()[:6] == ["shop", "queued", "lbctl.io/local", "<pending>", "-", "-"]
    assert lines[2].split() == ["shop", "web", "lbctl.io/local", "198.18.0.10", "a", "node-1", "(L2)", "ready",
                                "30s"]
    coloured = render.status_table(rows, all_namespaces=False, colour=True)
    assert "\x1b[32mready" in coloured and "\x1b[33mpending" in coloured


# -- doctor -----------------------------------------------------------------------------------------

def shipped_crd(file: str, annotation: str | None = "keep", drop: str = "") -> dict[str, Any]:
    """examples/deploy's CRD as the apiserver returns it once Established; `annotation` replaces
    the revision (None: removed), `drop` removes a spec property (an older schema)."""
    crd: dict[str, Any] = yaml.safe_load((DEPLOY / file).read_text())
    annotations = crd["metadata"].setdefault("annotations", {})
    if annotation is None:
        annotations.pop(doctor.CRD_REVISION_ANNOTATION)
    elif annotation != "keep":
        annotations[doctor.CRD_REVISION_ANNOTATION] = annotation
    if drop:
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"].pop(drop)
    crd["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
    return crd


CRD = shipped_crd("crd-loadbalancerpool.yaml")


@pytest.mark.parametrize(("crd", "result", "words"), [
    (CRD, "pass", "loadbalancerpools.lbctl.io v1alpha1 installed (revision 1)"),
    (None, "fail", "is not installed"),
    ({"spec": {"versions": [{"name": "v1beta9", "served": True}]}, "status": {}}, "fail", "does not serve v1alpha1"),
    ({**CRD, "status": {}}, "fail", "not Established"),
    # a pool CRD from before BGP: no spec.advertisement, no revision
    (shipped_crd("crd-loadbalancerpool.yaml", None, drop="advertisement"), "fail",
     "outdated (no lbctl.io/crd-revision, this lbctl expects revision 1); its schema lacks spec.advertisement"),
    (shipped_crd("crd-loadbalancerpool.yaml", "0"), "fail", "outdated (revision 0, this lbctl expects revision 1)"),
    (shipped_crd("crd-loadbalancerpool.yaml", None), "warn", "records no lbctl.io/crd-revision"),
    (shipped_crd("crd-loadbalancerpool.yaml", "7"), "warn", "newer than this lbctl (revision 7"),
])
def test_crd_check(crd: dict[str, Any] | None, result: str, words: str) -> None:
    check = doctor.check_crd(crd, doctor.POOL_CRD)
    assert check.status == result and words in check.message, check
    if "outdated" in words:
        assert check.fix.startswith("apply this lbctl's CRD: kubectl apply -f "
                                    "examples/deploy/crd-loadbalancerpool.yaml")


def test_the_bgppeer_crd_is_checked_too() -> None:
    assert doctor.check_crd(shipped_crd("crd-bgppeer.yaml"), doctor.PEER_CRD).status == "pass"
    missing = doctor.check_crd(None, doctor.PEER_CRD)
    assert (missing.name, missing.status) == ("crd bgppeers", "warn")
    assert "kubectl apply -f examples/deploy/crd-bgppeer.yaml" in missing.fix
    old = doctor.check_crd(shipped_crd("crd-bgppeer.yaml", None, drop="passwordSecretRef"), doctor.PEER_CRD)
    assert old.status == "fail" and "lacks spec.passwordSecretRef" in old.message


# The shipped CRDs' specs, hashed: a schema change fails here until the revision is raised
CRD_DIGESTS = {
    "crd-loadbalancerpool.yaml": (1, "690303287ff719f0"),
    "crd-bgppeer.yaml": (1, "70f1d22228606a43"),
}


@pytest.mark.parametrize("expected", [doctor.POOL_CRD, doctor.PEER_CRD], ids=lambda e: e.file)
def test_the_shipped_crds_carry_the_revision_doctor_expects(expected: doctor.ExpectedCrd) -> None:
    import hashlib
    import json

    crd = yaml.safe_load((DEPLOY / expected.file).read_text())
    assert crd["metadata"]["name"] == expected.name
    assert crd["metadata"]["annotations"][doctor.CRD_REVISION_ANNOTATION] == str(expected.revision)
    assert doctor.check_crd(shipped_crd(expected.file), expected).status == "pass"  # every field doctor wants
    digest = hashlib.sha256(json.dumps(crd["spec"], sort_keys=True).encode()).hexdigest()[:16]
    assert CRD_DIGESTS[expected.file] == (expected.revision, digest), (
        f"{expected.file} changed: raise lbctl.io/crd-revision in it and in charts/lbctl/templates/{expected.file}, "
        f"and in doctor.{'POOL' if 'pool' in expected.file else 'PEER'}_CRD, then record it here with the new digest "
        f"{digest}")


OPERATOR_LEASE = {"spec": {"holderIdentity": "lbctl-operator-1", "leaseDurationSeconds": 3, "renewTime": stamp(1)}}


@pytest.mark.parametrize(("lease_", "deployment", "result"), [
    (OPERATOR_LEASE, None, "pass"),
    ({"spec": {**OPERATOR_LEASE["spec"], "renewTime": stamp(60)}}, None, "fail"),
    ({"spec": {**OPERATOR_LEASE["spec"], "holderIdentity": ""}}, None, "fail"),
    (None, {"status": {"readyReplicas": 1}}, "warn"),
    (None, {"status": {}}, "fail"),
    (None, None, "fail"),
])
def test_operator_check(lease_: dict[str, Any] | None, deployment: dict[str, Any] | None, result: str) -> None:
    assert doctor.check_operator(lease_, deployment, NOW).status == result


DAEMONSET = {"spec": {"template": {"spec": {"tolerations": [{"operator": "Exists"}]}}}}
EDGE_ONLY = {"spec": {"template": {"spec": {"nodeSelector": {"lbctl.io/edge": "true"},
                                            "tolerations": [{"key": "edge", "operator": "Exists"}]}}}}


def tainted(name: str, key: str, effect: str = "NoSchedule", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {**node(name, labels=labels), "spec": {"taints": [{"key": key, "effect": effect}]}}


@pytest.mark.parametrize(("nodes", "leases", "daemonset", "result", "words"), [
    ([node("a"), node("b")], [lease("a", 5), lease("b", 5)], DAEMONSET, "pass", "each of the 2"),
    ([node("a"), node("b")], [lease("a", 5)], DAEMONSET, "fail", "no forwarder on b"),
    ([node("a"), node("b")], [lease("a", 5), lease("b", 90)], DAEMONSET, "fail", "not renewing its Lease on b"),
    ([node("a"), node("b", ready=False)], [lease("a", 5)], DAEMONSET, "pass", "each of the 1"),
    ([node("a", ready=False)], [], DAEMONSET, "warn", "no eligible node"),
    # an aws/gce install: no DaemonSet, no local Service, no pool
    ([node("a"), node("b")], [], None, "pass", "not used: no DaemonSet lbctl-system/lbctl-forwarder"),
    # the DaemonSet's nodeSelector and tolerations say which nodes need one
    ([node("a", labels={"lbctl.io/edge": "true"}), node("b")], [lease("a", 5)], EDGE_ONLY, "pass",
     "each of the 1 eligible nodes; 1 eligible node(s) the DaemonSet does not select: b (nodeSelector "
     "lbctl.io/edge=true)"),
    ([tainted("a", "edge", labels={"lbctl.io/edge": "true"}), tainted("b", "gpu", labels={"lbctl.io/edge": "true"})],
     [lease("a", 5)], EDGE_ONLY, "pass", "b (taint gpu:NoSchedule)"),
    ([tainted("a", "gpu", "PreferNoSchedule"), tainted("b", "node.kubernetes.io/unschedulable")], [lease("a", 5)],
     {"spec": {"template": {"spec": {}}}}, "fail", "no forwarder on b"),
    ([node("b")], [], EDGE_ONLY, "warn", "selects none of the 1 eligible nodes"),
])
def test_forwarder_check(nodes: list[dict[str, Any]], leases: list[dict[str, Any]],
                         daemonset: dict[str, Any] | None, result: str, words: str) -> None:
    check = doctor.check_forwarders(nodes, leases, NOW, daemonset)
    assert check.status == result and words in check.message, check


def test_forwarders_are_expected_by_local_services_and_pools_without_a_daemonset() -> None:
    nodes, leases = [node("a"), node("b")], [lease("a", 5)]
    for services, pools in (([READY_SVC], []), ([], [pool("a", ["198.18.0.0/28"])])):
        check = doctor.check_forwarders(nodes, leases, NOW, None, services, pools)
        assert check.status == "fail" and "no forwarder on b" in check.message, check
        assert "kubectl apply -f examples/deploy/forwarder-daemonset.yaml" in check.fix
    cloud = service(lb_class="lbctl.io/aws", ingress=[{"hostname": "a.elb.amazonaws.com"}])
    assert doctor.check_forwarders(nodes, leases, NOW, None, [cloud], []).status == "pass"


@pytest.mark.parametrize(("pools", "results"), [
    ([pool("a", ["198.18.0.0/28"], 2, 14)], ["pass"]),
    ([pool("a", ["198.18.0.0/28"], 16, 0)], ["fail"]),
    ([pool("a", ["198.18.0.0/24"], 240, 16)], ["warn"]),
    ([pool("a", ["198.18.0.0/28"])], ["skip"]),
    ([pool("a", ["198.18.0.0/28"], 0, 16), pool("b", ["198.18.0.8/29"], 0, 8)], ["pass", "fail"]),
    ([pool("a", ["not-an-address"], 0, 0)], ["fail"]),
    ([], ["skip"]),
])
def test_pool_checks(pools: list[dict[str, Any]], results: list[str]) -> None:
    assert [c.status for c in doctor.check_pools(pools)] == results


def holding(name: str, *ips: str, lb_class: str = "lbctl.io/local") -> dict[str, Any]:
    return service(name, lb_class=lb_class, ingress=[{"ip": ip} for ip in ips])


DUAL = pool("d", ["198.18.0.0/30", "fd00::/126"], 4, 4)  # the status holds sums: 4 of 8 assigned


@pytest.mark.parametrize(("services", "status", "words"), [
    # IPv4 used up while IPv6 has room: the sums (4 of 8) would pass
    ([holding(f"s{i}", f"198.18.0.{i}") for i in range(4)], "fail",
     "exhausted for IPv4: 4 of 4 IPv4 addresses assigned, 0 free (0 of 4 IPv6 addresses assigned, 4 free)"),
    ([holding("a", "198.18.0.0", "fd00::"), holding("b", "198.18.0.1", "fd00::1")], "pass",
     "2 of 4 IPv4 addresses assigned, 2 free; 2 of 4 IPv6 addresses assigned, 2 free"),
    # a shared address counts once; an address outside the pool, or of another provider, not at all
    ([holding("a", "fd00::"), holding("b", "fd00::"), holding("c", "198.18.1.1"),
      holding("d", "198.18.0.1", lb_class="lbctl.io/gce")], "pass", "1 of 4 IPv6 addresses assigned"),
])
def test_a_dual_stack_pool_is_judged_per_family(services: list[dict[str, Any]], status: str, words: str) -> None:
    (check,) = doctor.check_pools([DUAL], services)
    assert (check.status, check.name) == (status, "pool d") and words in check.message, check
    if status == "fail":
        assert check.fix == "add IPv4 addresses to spec.addresses of pool d, or delete Services that use it"


def test_nearly_exhausted_per_family() -> None:
    big = pool("big", ["198.18.0.0/28", "fd00::/120"], 15, 100)
    (check,) = doctor.check_pools([big], [holding(f"s{i}", f"198.18.0.{i}") for i in range(15)])
    assert check.status == "warn" and check.message.startswith("nearly exhausted for IPv4: 15 of 16"), check


def test_services_waiting_over_a_minute_fail_with_their_reason() -> None:
    old = service("old", annotations=MARKED, age_s=600, condition=(
        "False", "Pending", "pool 'a' has no free address for this Service; fix: add addresses"), condition_age_s=90)
    young = service("young", annotations=MARKED, age_s=10)
    check = doctor.check_services([READY_SVC, old, young], NOW)
    assert check.status == "fail"
    assert "1 Service(s)" in check.message and "shop/old (90s): pool 'a' has no free address" in check.message
    assert doctor.check_services([READY_SVC, young], NOW).status == "pass"
    custom = service("custom", lb_class="example.com/lb", age_s=600)  # the operator runs with --class example.com/lb
    assert doctor.check_services([custom], NOW).status == "pass"
    check = doctor.check_services([custom], NOW, classes=("example.com/lb",))
    assert check.status == "fail" and "shop/custom" in check.message


def test_nodes_excluded_are_named_with_why() -> None:
    check = doctor.check_nodes([node("a"), node("b", ready=False),
                                node("c", labels={"node.kubernetes.io/exclude-from-external-load-balancers": ""})])
    assert check.status == "warn"
    assert "b (not Ready)" in check.message and "c (labelled node.kubernetes.io/exclude" in check.message


def shipped_rules(account: tuple[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(namespace, rule) of every Role/ClusterRole examples/deploy binds to the ServiceAccount
    (namespace "" for a ClusterRole)."""
    docs = [d for path in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs
             if d["kind"] in ("Role", "ClusterRole")}
    found = []
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if {"kind": "ServiceAccount", "namespace": account[0], "name": account[1]} not in binding["subjects"]:
            continue
        namespace = binding["metadata"].get("namespace", "")
        role = roles[(binding["roleRef"]["kind"], namespace if binding["roleRef"]["kind"] == "Role" else "",
                      binding["roleRef"]["name"])]
        found += [(namespace, rule) for rule in role["rules"]]
    return found


def grants(namespace: str, rule: dict[str, Any], p: doctor.Permission) -> bool:
    resource = p.resource + (f"/{p.subresource}" if p.subresource else "")
    return (p.group in rule["apiGroups"] and resource in rule["resources"] and p.verb in rule["verbs"]
            and (not namespace or namespace == p.namespace)
            and (not rule.get("resourceNames") or p.name in rule["resourceNames"]))


@pytest.mark.parametrize(("account", "needed"), [
    (doctor.OPERATOR_ACCOUNT, doctor.OPERATOR_PERMISSIONS), (doctor.FORWARDER_ACCOUNT, doctor.FORWARDER_PERMISSIONS),
], ids=["operator", "forwarder"])
def test_doctor_permissions_are_the_shipped_rbac(account: tuple[str, str],
                                                 needed: tuple[doctor.Permission, ...]) -> None:
    """doctor asks about exactly what examples/deploy grants (the chart's RBAC equals it:
    tests/integration/test_chart.py), so a verb added to one and not the other fails here."""
    rules = shipped_rules(account)
    assert rules
    ungranted = [p.describe() for p in needed if not any(grants(ns, rule, p) for ns, rule in rules)]
    assert not ungranted, f"doctor checks what examples/deploy does not grant: {ungranted}"
    unchecked = []
    for namespace, rule in rules:
        for resource in rule["resources"]:
            name, _, sub = resource.partition("/")
            for verb in rule["verbs"]:
                for object_name in rule.get("resourceNames") or [""]:
                    if not any(p.verb == verb and p.resource == name and p.subresource == sub and
                               p.group in rule["apiGroups"] and p.namespace == namespace and p.name == object_name
                               for p in needed):
                        unchecked.append(f"{verb} {resource} {object_name} in {namespace or 'the cluster'}")
    assert not unchecked, f"examples/deploy grants what doctor does not check: {unchecked}"


def test_access_check() -> None:
    needed = doctor.OPERATOR_PERMISSIONS
    allowed = dict.fromkeys(needed, True)
    assert doctor.check_access("x", doctor.OPERATOR_ACCOUNT, needed, allowed, "").status == "pass"
    denied = {**allowed, needed[0]: False}
    check = doctor.check_access("x", doctor.OPERATOR_ACCOUNT, needed, denied, "")
    assert check.status == "fail" and "may not: get services" in check.message
    assert doctor.check_access("x", doctor.OPERATOR_ACCOUNT, needed, None, "nope").status == "skip"


def test_a_healthy_snapshot_passes_and_the_text_ends_with_a_count() -> None:
    snapshot = doctor.Snapshot(
        now=NOW, pool_crd=CRD, peer_crd=shipped_crd("crd-bgppeer.yaml"), operator_lease=OPERATOR_LEASE,
        operator_deployment=None, nodes=[node("a")],
        leases=[lease("a", 3)], pools=[pool("a", ["198.18.0.0/28"], 1, 15)], services=[READY_SVC],
        access={"lbctl-system/lbctl-operator": dict.fromkeys(doctor.OPERATOR_PERMISSIONS, True),
                "lbctl-system/lbctl-forwarder": dict.fromkeys(doctor.FORWARDER_PERMISSIONS, True)})
    checks = doctor.run_checks(snapshot)
    assert not doctor.failed(checks), checks
    assert render.checks_text(checks).splitlines()[-1] == f"{len(checks)} checks: 0 failed, 0 warnings"


@pytest.mark.parametrize(("address", "expected"), [
    ("198.18.3.4", "a"), ("198.18.255.255", "a"), ("198.19.0.0", None),
    ("10.0.0.255", "b"), ("10.0.1.0", None), ("fd00::5", "b"), ("fd00::1:0", None),
    ("192.168.1.0", None), ("192.168.1.7", "c"), ("192.168.1.255", None),  # avoidBuggyIPs
    ("1.1.1.1", None), ("::1", None), ("not-an-address", None),
])
def test_pool_index_finds_the_pool_of_an_address(address: str, expected: str | None) -> None:
    buggy = pool("c", ["192.168.1.0/24"])
    buggy["spec"]["avoidBuggyIPs"] = True
    index = status.PoolIndex(status.parse_pools([pool("a", ["198.18.0.0/16"]), pool("b", ["10.0.0.0/24", "fd00::/120"]),
                                                 buggy, pool("bad", ["x"])]))
    assert index.pool_of(address) == expected


def test_detail_of_a_local_traffic_service_says_what_each_health_check_answers() -> None:
    local = {**READY_SVC, "spec": {**READY_SVC["spec"], "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}}
    slices = [{"endpoints": [{"nodeName": "node-1", "conditions": {"ready": True}}]}]
    result = status.detail(local, [], [], [node("node-1"), node("node-2")], [], slices, NOW)
    assert [(n.node, n.health_check) for n in result.nodes] == [("node-1", "200 (1 local)"),
                                                               ("node-2", "503 (no local endpoint)")]
    assert "HEALTH-CHECK" in render.detail_text(result)
    assert "HEALTH-CHECK" not in render.detail_text(status.detail(READY_SVC, [], [], [node("node-1")], [], [], NOW))
