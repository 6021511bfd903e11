"""The operator with the GCE provider: real control plane, `lbctl operator` in its own process,
the real google-cloud-compute clients, and the stateful Compute fake standing in for GCE."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1
from kubernetes import client

from lbctl.dev.layout import ClusterInfo
from lbctl.model.names import load_balancer_name
from lbctl.model.scope import FINALIZER
from tests.fakes.gce_server import GceFakeServer
from tests.integration.harness import (
    Nodes,
    OperatorProcess,
    free_port,
    lb_service,
    wait_for_condition,
    wait_for_event,
    wait_for_ips,
    wait_until,
)

PROJECT, REGION, ZONE = "proj", "europe-west1", "europe-west1-b"
CLUSTER = "prod"
GCE_CLASS = "lbctl.io/gce"
LB_COLLECTIONS = ("addresses", "firewalls", "targetPools", "forwardingRules", "regionBackendServices")


@pytest.fixture
def gce() -> Iterator[GceFakeServer]:
    with GceFakeServer() as fake:
        yield fake


def operator_args(fake: GceFakeServer) -> list[str]:
    return ["--provider", "gce", "--cluster-name", CLUSTER, "--project", PROJECT, "--region", REGION,
            "--gce-endpoint", fake.url, "--provider-option", "cache-ttl-s=0", "--provider-option", "rate-per-s=500",
            "--provider-option", "burst=500"]


def add_vm_node(fake: GceFakeServer, nodes: Nodes, name: str) -> None:
    """A node VM in the fake and its Node object, as a real cluster has them."""
    instances = compute_v1.InstancesClient(credentials=AnonymousCredentials(), transport="rest",
                                           client_options={"api_endpoint": fake.url})
    instances.insert_unary(project=PROJECT, zone=ZONE, instance_resource=compute_v1.Instance(
        name=name, tags=compute_v1.Tags(items=["prod-node"])))
    nodes.create(name, provider_id=f"gce://{PROJECT}/{ZONE}/{name}")


def pool_members(fake: GceFakeServer, name: str) -> list[str]:
    pools = [p for p in fake.resources("targetPools") if p["name"] == name]
    return sorted(url.rsplit("/", 1)[1] for url in (pools[0].get("instances") or [])) if pools else []


def owned(fake: GceFakeServer, lb_name: str) -> dict[str, list[str]]:
    return {key: [n for n in fake.names(key) if lb_name in n] for key in LB_COLLECTIONS}


def write_methods(fake: GceFakeServer) -> list[str]:
    return sorted(call.method for call in fake.writes())


def uid_of(core: client.CoreV1Api, namespace: str, name: str) -> str:
    return str(core.read_namespaced_service(name, namespace).metadata.uid)


def test_create_node_changes_and_delete(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    for name in ("gn-0", "gn-1"):
        add_vm_node(gce, nodes, name)
    operator = start_operator(*operator_args(gce), "--metrics-port", str(free_port()))
    core.create_namespaced_service(namespace, lb_service("web", [80, 443], lb_class=GCE_CLASS))
    ip = wait_for_ips(core, namespace, "web", timeout=30)[0]
    lb = load_balancer_name(uid_of(core, namespace, "web"))
    assert pool_members(gce, lb) == ["gn-0", "gn-1"]
    assert [r["IPAddress"] for r in gce.resources("forwardingRules") if lb in r["name"]] == [ip]
    wait_for_condition(core, namespace, "web", "True")

    gce.reset_calls()
    add_vm_node(gce, nodes, "gn-2")
    wait_until(lambda: pool_members(gce, lb) == ["gn-0", "gn-1", "gn-2"], what="new node in the target pool")
    wait_for_event(core, namespace, "web", "UpdatedLoadBalancer", "new hosts")
    assert write_methods(gce) == ["instances.insert", "targetPools.addInstance"]  # the VM itself, then one add

    gce.reset_calls()
    nodes.set_ready("gn-1", False)
    wait_until(lambda: pool_members(gce, lb) == ["gn-0", "gn-2"], what="NotReady node out of the pool")
    assert write_methods(gce) == ["targetPools.removeInstance"]

    gce.reset_calls()
    nodes.create("unrelated-label-change", provider_id=f"gce://{PROJECT}/{ZONE}/gn-9", ready=False)
    core.patch_node("gn-0", {"metadata": {"labels": {"team": "a"}}})  # not a change of the node set
    operator.stop()
    operator.start()  # a restart re-syncs everything: reads only
    wait_until(lambda: operator.synced(1), what="the start-up sync of web finished")
    assert write_methods(gce) == []

    core.delete_namespaced_service("web", namespace)
    wait_until(lambda: owned(gce, lb) == {k: [] for k in LB_COLLECTIONS}, what="every GCE resource removed")
    wait_until(lambda: not [s for s in core.list_namespaced_service(namespace).items if s.metadata.name == "web"],
               what="Service gone")


def test_a_crash_between_two_steps_converges_without_duplicates(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    add_vm_node(gce, nodes, "cn-0")
    gce.inject("forwardingRules.insert", status=503, times=1000)  # the last step keeps failing
    operator = start_operator(*operator_args(gce))
    core.create_namespaced_service(namespace, lb_service("web", lb_class=GCE_CLASS))
    lb = load_balancer_name(uid_of(core, namespace, "web"))
    wait_until(lambda: owned(gce, lb)["targetPools"], what="target pool made before the failing step")
    operator.kill()
    gce.compute.clear_faults()
    operator.start()
    wait_for_ips(core, namespace, "web", timeout=30)
    made = owned(gce, lb)
    assert len(made["targetPools"]) == 1 and len(made["addresses"]) == 1 and len(made["forwardingRules"]) == 1


def test_bad_input_names_the_field_and_leaves_nothing_behind(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    nodes.create("no-provider-id")
    start_operator(*operator_args(gce))
    core.create_namespaced_service(namespace, lb_service("web", lb_class=GCE_CLASS))
    found = wait_for_condition(core, namespace, "web", "False")
    assert "providerID" in found.message and "no-provider-id" in found.message
    wait_for_event(core, namespace, "web", "SyncLoadBalancerFailed", "providerID")
    nodes.delete("no-provider-id")
    add_vm_node(gce, nodes, "bn-0")
    wait_for_ips(core, namespace, "web", timeout=30)  # the node problem fixed: it converges by itself
    core.create_namespaced_service(namespace, lb_service(
        "unreserved", lb_class=GCE_CLASS, loadBalancerIP="203.0.113.99"))
    found = wait_for_condition(core, namespace, "unreserved", "False")
    assert "spec.loadBalancerIP" in found.message
    core.create_namespaced_service(namespace, lb_service(
        "tier", lb_class=GCE_CLASS, annotations={"cloud.google.com/network-tier": "Gold"}))
    assert "cloud.google.com/network-tier" in wait_for_condition(core, namespace, "tier", "False").message
    for name in ("unreserved", "tier"):
        assert owned(gce, load_balancer_name(uid_of(core, namespace, name))) == {k: [] for k in LB_COLLECTIONS}


def test_gc_finds_and_deletes_balancers_whose_service_is_gone(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    add_vm_node(gce, nodes, "gc-0")
    operator = start_operator(*operator_args(gce))
    core.create_namespaced_service(namespace, lb_service("web", lb_class=GCE_CLASS))
    wait_for_ips(core, namespace, "web", timeout=30)
    lb = load_balancer_name(uid_of(core, namespace, "web"))
    operator.stop()
    # gone without the operator's help: its finalizer removed by hand, as people do
    core.patch_namespaced_service("web", namespace, {"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}})
    core.delete_namespaced_service("web", namespace)

    def gc(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lbctl", "gc", *operator_args(gce), *extra],
                              env={**os.environ, "KUBECONFIG": cluster.kubeconfig},
                              capture_output=True, text=True, timeout=60)

    listed = gc()
    assert listed.returncode == 0, listed.stderr
    assert f"orphaned\t{lb}\t{namespace}/web" in listed.stdout
    assert owned(gce, lb)["forwardingRules"]  # listing deletes nothing
    deleted = gc("--delete")
    assert deleted.returncode == 0 and f"deleted\t{lb}" in deleted.stdout
    assert owned(gce, lb) == {k: [] for k in LB_COLLECTIONS}


def compute(fake: GceFakeServer, cls: type[Any]) -> Any:
    return cls(credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": fake.url})


def test_ports_internal_scheme_requested_address_and_rate_limits_with_the_operator_running(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    add_vm_node(gce, nodes, "pn-0")
    addresses = compute(gce, compute_v1.AddressesClient)
    addresses.insert_unary(project=PROJECT, region=REGION, address_resource=compute_v1.Address(name="reserved"))
    reserved = addresses.get(project=PROJECT, region=REGION, address="reserved").address
    gce.inject("forwardingRules.insert", status=429, reason="rateLimitExceeded", times=3)
    start_operator(*operator_args(gce))

    core.create_namespaced_service(namespace, lb_service("web", [80], lb_class=GCE_CLASS, loadBalancerIP=reserved))
    assert wait_for_ips(core, namespace, "web", timeout=30) == [reserved]  # through three 429s
    lb = load_balancer_name(uid_of(core, namespace, "web"))
    (rule,) = [r for r in gce.resources("forwardingRules") if lb in r["name"]]
    assert gce.count("forwardingRules.insert") == 4  # the three 429s were really served, then one rule made
    gce.reset_calls()
    core.patch_namespaced_service("web", namespace, [{"op": "replace", "path": "/spec/ports/0/port", "value": 8080}])

    def rule_ports() -> str:
        rules = [r for r in gce.resources("forwardingRules") if lb in r["name"]]
        return str(rules[0].get("portRange", "")) if rules else ""

    wait_until(lambda: rule_ports() == "8080-8080", what="the rule moved to port 8080")
    writes = write_methods(gce)
    assert "addresses.insert" not in writes and "targetPools.insert" not in writes  # only the rule and firewall
    assert [r["IPAddress"] for r in gce.resources("forwardingRules") if lb in r["name"]] == [rule["IPAddress"]]

    core.create_namespaced_service(namespace, lb_service(
        "internal", [9000], lb_class=GCE_CLASS, annotations={"networking.gke.io/load-balancer-type": "Internal"}))
    wait_for_ips(core, namespace, "internal", timeout=30)
    internal = load_balancer_name(uid_of(core, namespace, "internal"))
    assert [r["loadBalancingScheme"] for r in gce.resources("forwardingRules") if internal in r["name"]] == [
        "INTERNAL"]
    assert [b["name"] for b in gce.resources("regionBackendServices") if internal in b["name"]]

    core.delete_namespaced_service("web", namespace)
    wait_until(lambda: not owned(gce, lb)["forwardingRules"], what="web's rule deleted")
    assert "reserved" in gce.names("addresses")  # a requested address is never released


# ---- IPv6 and dual-stack ----------------------------------------------------------------------------

INTERNAL = {"networking.gke.io/load-balancer-type": "Internal"}


def add_subnetwork(fake: GceFakeServer, *, ipv6: bool) -> None:
    """The subnetwork internal balancers use (the provider's default: named like the network)."""
    body = compute_v1.Subnetwork(name="default", ip_cidr_range="10.128.0.0/20",
                                 network=f"projects/{PROJECT}/global/networks/default")
    if ipv6:
        body.stack_type, body.ipv6_access_type = "IPV4_IPV6", "INTERNAL"
    compute_v1.SubnetworksClient(credentials=AnonymousCredentials(), transport="rest",
                                 client_options={"api_endpoint": fake.url}).insert_unary(
        project=PROJECT, region=REGION, subnetwork_resource=body)


def test_dual_stack_internal_service_lists_both_addresses(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    add_subnetwork(gce, ipv6=True)
    add_vm_node(gce, nodes, "gn-0")
    start_operator(*operator_args(gce))
    core.create_namespaced_service(namespace, lb_service(
        "both", [80], lb_class=GCE_CLASS, annotations=INTERNAL, ipFamilyPolicy="RequireDualStack",
        ipFamilies=["IPv4", "IPv6"]))
    ips = wait_for_ips(core, namespace, "both", count=2, timeout=30)
    lb = load_balancer_name(uid_of(core, namespace, "both"))
    addresses = {a["name"]: a["address"] for a in gce.resources("addresses")}
    assert ips == [addresses[lb], addresses[f"{lb}-ipv6"]] and ":" in ips[1]
    rules = {r["name"]: r for r in gce.resources("forwardingRules")}
    assert rules[f"{lb}-tcp-ipv6"]["ipVersion"] == "IPV6" and rules[f"{lb}-tcp-ipv6"]["IPAddress"] == ips[1]
    assert rules[f"{lb}-tcp"]["IPAddress"] == ips[0]
    wait_for_condition(core, namespace, "both", "True")

    core.delete_namespaced_service("both", namespace)
    wait_until(lambda: owned(gce, lb) == {k: [] for k in LB_COLLECTIONS}, what="both families' resources removed")


def test_ipv6_refusals_name_the_field_and_leave_nothing(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    add_subnetwork(gce, ipv6=False)
    add_vm_node(gce, nodes, "gn-0")
    start_operator(*operator_args(gce))
    dual = {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}
    core.create_namespaced_service(namespace, lb_service("external", [80], lb_class=GCE_CLASS, **dual))
    core.create_namespaced_service(namespace, lb_service("v4subnet", [80], lb_class=GCE_CLASS,
                                                         annotations=INTERNAL, **dual))
    core.create_namespaced_service(namespace, lb_service(
        "prefer", [80], lb_class=GCE_CLASS, ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4", "IPv6"]))
    found = wait_for_condition(core, namespace, "external", "False", timeout=30)
    assert "spec.ipFamilyPolicy" in found.message and "target pool" in found.message
    wait_for_event(core, namespace, "external", "SyncLoadBalancerFailed", "load-balancer-type: Internal")
    found = wait_for_condition(core, namespace, "v4subnet", "False", timeout=30)
    assert "spec.ipFamilyPolicy" in found.message and "subnetwork default" in found.message
    wait_for_event(core, namespace, "v4subnet", "SyncLoadBalancerFailed", "--stack-type IPV4_IPV6")
    # PreferDualStack where GCE has no IPv6 (a target pool): the IPv4 balancer alone.
    assert len(wait_for_ips(core, namespace, "prefer", timeout=30)) == 1
    for name in ("external", "v4subnet"):
        assert owned(gce, load_balancer_name(uid_of(core, namespace, name))) == {k: [] for k in LB_COLLECTIONS}
