"""The GCE provider with the real google-cloud-compute clients against the stateful Compute fake
(tests/fakes/gce_server.py), driven directly with hand-built LoadBalancerSpecs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from lbctl.model.errors import InvalidServiceError, TransientProviderError
from lbctl.model.names import load_balancer_name
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, ServiceRef
from providers.base import ProviderSettings
from providers.gce import GceProvider
from tests.fakes.gce_server import GceFakeServer

PROJECT = "proj"
REGION = "europe-west1"
ZONE_B, ZONE_C = "europe-west1-b", "europe-west1-c"
CLUSTER = "prod"
NODE_TAG = "prod-node"
UID = "5f1d7c2e-0000-4000-8000-000000000001"
NAME = load_balancer_name(UID)
LB_COLLECTIONS = ("addresses", "firewalls", "httpHealthChecks", "regionHealthChecks", "targetPools",
                  "forwardingRules", "regionBackendServices", "instanceGroups")
INTERNAL = {"networking.gke.io/load-balancer-type": "Internal"}
REPO = Path(__file__).resolve().parents[2]

C = TypeVar("C")


@dataclass
class GceWorld:
    fake: GceFakeServer

    def client(self, cls: type[C]) -> C:
        return cls(credentials=AnonymousCredentials(), transport="rest",  # type: ignore[call-arg]
                   client_options={"api_endpoint": self.fake.url})

    def add_node(self, name: str, zone: str = ZONE_B, tags: tuple[str, ...] = (NODE_TAG,)) -> NodeTarget:
        """A node VM made through the API, as the cluster's nodes would be."""
        self.client(compute_v1.InstancesClient).insert_unary(
            project=PROJECT, zone=zone,
            instance_resource=compute_v1.Instance(name=name, tags=compute_v1.Tags(items=list(tags))))
        return NodeTarget(name=name, provider_id=f"gce://{PROJECT}/{zone}/{name}", zone=zone)

    def provider(self, **options: str) -> GceProvider:
        settings = {"project": PROJECT, "region": REGION, "endpoint": self.fake.url, "cache-ttl-s": "0",
                    "rate-per-s": "1000", "burst": "1000", **options}
        return GceProvider.create(ProviderSettings(CLUSTER, settings))

    def reserve(self, name: str, **fields: Any) -> str:
        addresses = self.client(compute_v1.AddressesClient)
        addresses.insert_unary(project=PROJECT, region=REGION, address_resource=compute_v1.Address(name=name,
                                                                                                   **fields))
        return addresses.get(project=PROJECT, region=REGION, address=name).address

    def writes(self) -> list[str]:
        return [call.method for call in self.fake.writes()]

    def add_subnetwork(self, name: str = "default", *, ipv6: str | None = "INTERNAL") -> dict[str, Any]:
        """The subnetwork internal balancers use; `ipv6`: its IPv6 access type, None for IPv4 only."""
        body = compute_v1.Subnetwork(name=name, ip_cidr_range="10.128.0.0/20",
                                     network=f"projects/{PROJECT}/global/networks/default")
        if ipv6:
            body.stack_type, body.ipv6_access_type = "IPV4_IPV6", ipv6
        self.client(compute_v1.SubnetworksClient).insert_unary(project=PROJECT, region=REGION,
                                                               subnetwork_resource=body)
        return self.one("subnetworks", name)

    def inventory(self) -> dict[str, list[str]]:
        return {key: self.fake.names(key) for key in LB_COLLECTIONS}

    def one(self, key: str, name: str) -> dict[str, Any]:
        (item,) = [item for item in self.fake.resources(key) if item["name"] == name]
        return item


@pytest.fixture
def gce() -> Iterator[GceWorld]:
    with GceFakeServer() as fake:
        yield GceWorld(fake)


def lb_spec(nodes: tuple[NodeTarget, ...], uid: str = UID, **changes: Any) -> LoadBalancerSpec:
    base = LoadBalancerSpec(
        service=ServiceRef("shop", f"web-{uid[:4]}", uid), cluster_name=CLUSTER, name=load_balancer_name(uid),
        ports=(PortSpec("http", "TCP", 80), PortSpec("https", "TCP", 443), PortSpec("dns", "UDP", 53)),
        nodes=nodes,
    )
    return dataclasses.replace(base, **changes)


T = TypeVar("T")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def nodes_in(gce: GceWorld, count: int, zone: str = ZONE_B, prefix: str = "node") -> tuple[NodeTarget, ...]:
    return tuple(gce.add_node(f"{prefix}-{i}", zone) for i in range(count))


def empty() -> dict[str, list[str]]:
    return {key: [] for key in LB_COLLECTIONS}


# -- the fake itself -------------------------------------------------------------------------------


def test_fake_rejects_misspelt_fields_and_values(gce: GceWorld) -> None:
    base = f"{gce.fake.url}/compute/v1/projects/{PROJECT}/regions/{REGION}"
    misspelt = requests.post(f"{base}/addresses", json={"name": "x", "netwrokTier": "PREMIUM"}, timeout=10)
    assert misspelt.status_code == 400 and "netwrokTier" in misspelt.json()["error"]["message"]
    legacy = requests.post(f"{gce.fake.url}/compute/v1/projects/{PROJECT}/global/httpHealthChecks",
                           json={"name": "hc", "requestPth": "/"}, timeout=10)
    assert legacy.status_code == 400
    with pytest.raises(api_exceptions.BadRequest, match="PREMIUMM"):
        gce.client(compute_v1.AddressesClient).insert_unary(
            project=PROJECT, region=REGION, address_resource=compute_v1.Address(name="y", network_tier="PREMIUMM"))
    assert gce.fake.names("addresses") == []
    good = requests.post(f"{base}/addresses", json={"name": "x", "networkTier": "PREMIUM"}, timeout=10)
    assert good.status_code == 200 and gce.fake.names("addresses") == ["x"]


def test_fake_enforces_references_names_and_paging(gce: GceWorld) -> None:
    pools = gce.client(compute_v1.TargetPoolsClient)
    rules = gce.client(compute_v1.ForwardingRulesClient)
    missing = compute_v1.ForwardingRule(name="r", I_p_protocol="TCP", port_range="80-80",
                                        target=f"projects/{PROJECT}/regions/{REGION}/targetPools/nope")
    with pytest.raises(api_exceptions.NotFound):
        rules.insert_unary(project=PROJECT, region=REGION, forwarding_rule_resource=missing)
    pools.insert_unary(project=PROJECT, region=REGION, target_pool_resource=compute_v1.TargetPool(name="pool"))
    with pytest.raises(api_exceptions.Conflict):
        pools.insert_unary(project=PROJECT, region=REGION, target_pool_resource=compute_v1.TargetPool(name="pool"))
    partial_url = compute_v1.ForwardingRule(name="r", I_p_protocol="TCP", port_range="80",
                                            target=f"regions/{REGION}/targetPools/pool")
    rules.insert_unary(project=PROJECT, region=REGION, forwarding_rule_resource=partial_url)
    with pytest.raises(api_exceptions.BadRequest, match="already being used"):
        pools.delete_unary(project=PROJECT, region=REGION, target_pool="pool")
    with pytest.raises(api_exceptions.NotFound):
        pools.get(project=PROJECT, region=REGION, target_pool="nope")
    assert gce.one("forwardingRules", "r")["portRange"] == "80-80"
    addresses = gce.client(compute_v1.AddressesClient)
    for i in range(5):
        addresses.insert_unary(project=PROJECT, region=REGION, address_resource=compute_v1.Address(name=f"a{i}"))
    gce.fake.reset_calls()
    listed = addresses.list(request=compute_v1.ListAddressesRequest(project=PROJECT, region=REGION, max_results=2))
    assert [item.name for item in listed] == [f"a{i}" for i in range(5)]
    assert gce.fake.count("addresses.list") == 3


def test_fake_injects_faults_and_records_calls(gce: GceWorld) -> None:
    pools = gce.client(compute_v1.TargetPoolsClient)
    gce.fake.inject("targetPools.insert", status=429, times=2)
    for _ in range(2):
        with pytest.raises(api_exceptions.TooManyRequests):
            pools.insert_unary(project=PROJECT, region=REGION, target_pool_resource=compute_v1.TargetPool(name="p"),
                               retry=None)
    pools.insert_unary(project=PROJECT, region=REGION, target_pool_resource=compute_v1.TargetPool(name="p"))
    assert gce.fake.count("targetPools.insert") == 3 and gce.fake.names("targetPools") == ["p"]
    gce.fake.inject("targetPools.delete", status=403, reason="QUOTA_EXCEEDED", in_operation=True)
    op = pools.delete_unary(project=PROJECT, region=REGION, target_pool="p")
    assert op.http_error_status_code == 403 and op.error.errors[0].code == "QUOTA_EXCEEDED"
    assert gce.fake.names("targetPools") == ["p"]  # a failed operation changes nothing


def test_fake_runs_on_its_own() -> None:
    process = subprocess.Popen([sys.executable, str(REPO / "tests/fakes/gce_server.py"), "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        requests.post(f"{url}/_fake/inject", json={"method": "firewalls.list", "status": 503}, timeout=10)
        first = requests.get(f"{url}/compute/v1/projects/p/global/firewalls", timeout=10)
        second = requests.get(f"{url}/compute/v1/projects/p/global/firewalls", timeout=10)
        assert (first.status_code, second.status_code) == (503, 200)
        calls = requests.get(f"{url}/_fake/calls", timeout=10).json()["calls"]
        assert [call["method"] for call in calls] == ["firewalls.list", "firewalls.list"]
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- external balancers ----------------------------------------------------------------------------


def test_create_external_balancer(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2) + nodes_in(gce, 1, ZONE_C, prefix="east")
    provider = gce.provider()
    status = run(provider.ensure(lb_spec(nodes, source_ranges=("198.51.100.0/24",))))

    address = gce.one("addresses", NAME)
    assert (address["addressType"], address["networkTier"], address["status"]) == ("EXTERNAL", "PREMIUM", "IN_USE")
    ip = address["address"]
    assert status.ingress[0].ip == ip
    assert [(p.port, p.protocol) for p in status.ingress[0].ports] == [(80, "TCP"), (443, "TCP"), (53, "UDP")]
    tcp, udp = gce.one("forwardingRules", f"{NAME}-tcp"), gce.one("forwardingRules", f"{NAME}-udp")
    assert (tcp["IPAddress"], tcp["IPProtocol"], tcp["portRange"]) == (ip, "TCP", "80-443")
    assert (udp["IPAddress"], udp["IPProtocol"], udp["portRange"]) == (ip, "UDP", "53-53")
    pool = gce.one("targetPools", NAME)
    assert tcp["target"] == udp["target"] == pool["selfLink"]
    assert sorted(url.rsplit("/", 1)[-1] for url in pool["instances"]) == ["east-0", "node-0", "node-1"]
    (check_url,) = pool["healthChecks"]
    check = gce.one("httpHealthChecks", "k8s-prod-node")
    assert check["selfLink"] == check_url and (check["port"], check["requestPath"]) == (10256, "/healthz")
    firewall = gce.one("firewalls", f"k8s-fw-{NAME}")
    assert firewall["sourceRanges"] == ["198.51.100.0/24"] and firewall["targetTags"] == [NODE_TAG]
    assert firewall["allowed"] == [{"IPProtocol": "tcp", "ports": ["80", "443"]},
                                   {"IPProtocol": "udp", "ports": ["53"]}]
    check_firewall = gce.one("firewalls", "k8s-prod-node-http-hc")
    assert check_firewall["allowed"] == [{"IPProtocol": "tcp", "ports": ["10256"]}]
    for key in ("addresses", "forwardingRules", "targetPools"):
        for item in gce.fake.resources(key):
            owner = json.loads(item["description"])
            assert owner["kubernetes.io/cluster/prod"] == "owned" and owner["kubernetes.io/service-uid"] == UID
            assert owner["kubernetes.io/service-name"] == "shop/web-5f1d"
    refs = run(provider.list_owned())
    assert [(ref.name, ref.namespace, ref.service_name, ref.uid) for ref in refs] == [
        (NAME, "shop", "web-5f1d", UID)]
    got = run(provider.get(refs[0]))
    assert got is not None and got.ingress[0].ip == ip and len(got.ingress[0].ports) == 3


def test_no_op_ensure_writes_nothing(gce: GceWorld) -> None:
    spec = lb_spec(nodes_in(gce, 3))
    provider = gce.provider()
    first = run(provider.ensure(spec))
    gce.fake.reset_calls()
    assert run(provider.ensure(spec)) == first
    assert gce.writes() == []
    assert gce.fake.calls, "with the cache off, the resync reads GCE"

    cached = gce.provider(**{"cache-ttl-s": "300"})
    run(cached.ensure(spec))
    gce.fake.reset_calls()
    assert run(cached.ensure(spec)) == first
    assert gce.fake.calls == []  # the cache answers: not even a read


def test_changing_ports_recreates_only_the_rule_and_patches_the_firewall(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2)
    provider = gce.provider()
    ip = run(provider.ensure(lb_spec(nodes))).ingress[0].ip
    gce.fake.reset_calls()
    ports = (PortSpec("http", "TCP", 8080), PortSpec("dns", "UDP", 53))
    status = run(provider.ensure(lb_spec(nodes, ports=ports)))
    assert gce.writes() == ["firewalls.patch", "forwardingRules.delete", "forwardingRules.insert"]
    assert status.ingress[0].ip == ip
    assert gce.one("forwardingRules", f"{NAME}-tcp")["portRange"] == "8080-8080"
    assert gce.one("firewalls", f"k8s-fw-{NAME}")["allowed"][0] == {"IPProtocol": "tcp", "ports": ["8080"]}

    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes, ports=ports[:1])))  # UDP goes away
    assert gce.writes() == ["firewalls.patch", "forwardingRules.delete"]
    assert gce.fake.names("forwardingRules") == [f"{NAME}-tcp"]


def test_source_range_change_patches_the_firewall_only(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    run(provider.ensure(lb_spec(nodes)))
    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes, source_ranges=("203.0.113.0/24", "198.51.100.0/24"))))
    assert gce.writes() == ["firewalls.patch"]
    assert gce.one("firewalls", f"k8s-fw-{NAME}")["sourceRanges"] == ["198.51.100.0/24", "203.0.113.0/24"]


def test_node_added_and_removed_moves_only_pool_members(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2)
    provider = gce.provider()
    run(provider.ensure(lb_spec(nodes)))
    extra = gce.add_node("late", ZONE_C)
    gce.fake.reset_calls()
    run(provider.ensure(lb_spec((*nodes, extra))))
    assert gce.writes() == ["targetPools.addInstance"]
    assert len(gce.one("targetPools", NAME)["instances"]) == 3
    gce.fake.reset_calls()
    run(provider.ensure(lb_spec((*nodes[1:], extra))))
    assert gce.writes() == ["targetPools.removeInstance"]
    assert sorted(url.rsplit("/", 1)[-1] for url in gce.one("targetPools", NAME)["instances"]) == ["late", "node-1"]


def test_local_traffic_policy_uses_its_own_health_check(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2)
    provider = gce.provider()
    run(provider.ensure(lb_spec(nodes, external_traffic_policy="Local", health_check_node_port=31000)))
    check = gce.one("httpHealthChecks", NAME)
    assert (check["port"], check["requestPath"]) == (31000, "/healthz")
    assert gce.one("targetPools", NAME)["healthChecks"] == [check["selfLink"]]
    assert gce.one("firewalls", f"k8s-{NAME}-http-hc")["allowed"] == [{"IPProtocol": "tcp", "ports": ["31000"]}]
    assert "k8s-prod-node" not in gce.fake.names("httpHealthChecks")

    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes, external_traffic_policy="Local", health_check_node_port=31001)))
    assert gce.writes() == ["httpHealthChecks.patch", "firewalls.patch"]

    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes)))  # back to Cluster: the shared node check replaces it
    assert gce.writes() == ["httpHealthChecks.insert", "firewalls.insert", "targetPools.removeHealthCheck",
                            "targetPools.addHealthCheck", "httpHealthChecks.delete", "firewalls.delete"]
    assert gce.fake.names("httpHealthChecks") == ["k8s-prod-node"]
    assert f"k8s-{NAME}-http-hc" not in gce.fake.names("firewalls")


def test_session_affinity_change_recreates_pool_and_keeps_ip(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    ip = run(provider.ensure(lb_spec(nodes))).ingress[0].ip
    gce.fake.reset_calls()
    assert run(provider.ensure(lb_spec(nodes, session_affinity="ClientIP"))).ingress[0].ip == ip
    assert gce.writes() == ["forwardingRules.delete", "forwardingRules.delete", "targetPools.delete",
                            "targetPools.insert", "forwardingRules.insert", "forwardingRules.insert"]
    assert gce.one("targetPools", NAME)["sessionAffinity"] == "CLIENT_IP"


def test_standard_tier_and_tier_change(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    standard = {"cloud.google.com/network-tier": "Standard"}
    first = run(provider.ensure(lb_spec(nodes, annotations=standard))).ingress[0].ip
    assert gce.one("addresses", NAME)["networkTier"] == "STANDARD"
    assert {rule["networkTier"] for rule in gce.fake.resources("forwardingRules")} == {"STANDARD"}
    second = run(provider.ensure(lb_spec(nodes))).ingress[0].ip  # Premium: a new address
    assert second != first
    assert gce.one("addresses", NAME)["networkTier"] == "PREMIUM"
    assert {rule["IPAddress"] for rule in gce.fake.resources("forwardingRules")} == {second}


def test_same_port_with_tcp_and_udp_shares_the_address(gce: GceWorld) -> None:
    ports = (PortSpec("dns-tcp", "TCP", 53), PortSpec("dns-udp", "UDP", 53))
    ip = run(gce.provider().ensure(lb_spec(nodes_in(gce, 1), ports=ports))).ingress[0].ip
    rules = gce.fake.resources("forwardingRules")
    assert {(r["IPProtocol"], r["portRange"], r["IPAddress"]) for r in rules} == {("TCP", "53-53", ip),
                                                                                  ("UDP", "53-53", ip)}


def test_delete_removes_everything_in_order_and_is_idempotent(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2)
    provider = gce.provider()
    spec = lb_spec(nodes)
    run(provider.ensure(spec))
    gce.fake.reset_calls()
    run(provider.delete(spec.ref))
    assert gce.inventory() == empty()
    order = [m for m in gce.writes() if not m.startswith("regionHealthChecks")]
    assert order.index("forwardingRules.delete") < order.index("targetPools.delete") < order.index(
        "httpHealthChecks.delete") < order.index("addresses.delete")
    run(provider.delete(spec.ref))  # everything already gone
    assert run(provider.get(spec.ref)) is None
    assert run(provider.list_owned()) == []


def test_shared_health_check_stays_while_another_balancer_uses_it(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    one, two = lb_spec(nodes), lb_spec(nodes, uid="6f1d7c2e-0000-4000-8000-000000000002")
    run(provider.ensure(one))
    run(provider.ensure(two))
    run(provider.delete(one.ref))
    assert gce.fake.names("httpHealthChecks") == ["k8s-prod-node"]
    assert "k8s-prod-node-http-hc" in gce.fake.names("firewalls")
    assert gce.fake.names("targetPools") == [two.name]
    run(provider.delete(two.ref))
    assert gce.inventory() == empty()


def test_list_owned_pages_and_ignores_other_clusters(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    specs = [lb_spec(nodes, uid=f"{i}f1d7c2e-0000-4000-8000-000000000003") for i in range(3)]
    provider = gce.provider(**{"page-size": "2"})
    for spec in specs:
        run(provider.ensure(spec))
    gce.client(compute_v1.AddressesClient).insert_unary(project=PROJECT, region=REGION, address_resource=(
        compute_v1.Address(name="theirs", description=json.dumps({
            "kubernetes.io/cluster/other": "owned", "kubernetes.io/service-name": "a/b",
            "lbctl.io/load-balancer": "athem"}))))
    assert [ref.name for ref in run(provider.list_owned())] == sorted(spec.name for spec in specs)


def test_operations_are_polled_when_not_done_at_once(gce: GceWorld) -> None:
    gce.fake.compute.operation_polls = 1
    nodes = nodes_in(gce, 1)
    run(gce.provider().ensure(lb_spec(nodes, annotations=INTERNAL)))
    assert gce.fake.count("regionOperations.get") >= 1
    assert gce.fake.count("globalOperations.get") >= 1 and gce.fake.count("zoneOperations.get") >= 1
    assert gce.fake.names("forwardingRules") == [f"{NAME}-tcp", f"{NAME}-udp"]


# -- internal balancers ----------------------------------------------------------------------------


def test_internal_balancer(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2) + nodes_in(gce, 1, ZONE_C, prefix="east")
    provider = gce.provider()
    status = run(provider.ensure(lb_spec(nodes, annotations=INTERNAL)))
    address = gce.one("addresses", NAME)
    assert (address["addressType"], address["purpose"]) == ("INTERNAL", "SHARED_LOADBALANCER_VIP")
    assert status.ingress[0].ip == address["address"]
    group = "k8s-ig--prod"
    assert [len(gce.fake.compute.members(zone, group)) for zone in (ZONE_B, ZONE_C)] == [2, 1]
    check = gce.one("regionHealthChecks", "k8s-prod-node")
    for protocol in ("tcp", "udp"):
        service = gce.one("regionBackendServices", f"{NAME}-{protocol}")
        assert (service["loadBalancingScheme"], service["protocol"]) == ("INTERNAL", protocol.upper())
        assert service["healthChecks"] == [check["selfLink"]]
        assert sorted(b["group"].split("/zones/")[1] for b in service["backends"]) == [
            f"{ZONE_B}/instanceGroups/{group}", f"{ZONE_C}/instanceGroups/{group}"]
        rule = gce.one("forwardingRules", f"{NAME}-{protocol}")
        assert (rule["loadBalancingScheme"], rule["backendService"], rule["IPAddress"]) == (
            "INTERNAL", service["selfLink"], address["address"])
    assert sorted(gce.one("forwardingRules", f"{NAME}-tcp")["ports"]) == ["443", "80"]
    assert gce.fake.names("targetPools") == [] and gce.fake.names("httpHealthChecks") == []

    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes, annotations=INTERNAL)))
    assert gce.writes() == []
    late = gce.add_node("late", ZONE_C)
    gce.fake.reset_calls()
    run(provider.ensure(lb_spec((*nodes, late), annotations=INTERNAL)))
    assert gce.writes() == ["instanceGroups.addInstances"]

    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes[:2], annotations=INTERNAL)))  # zone c has no node left
    assert gce.writes() == ["regionBackendServices.patch", "regionBackendServices.patch", "instanceGroups.delete"]
    assert [g["zone"].rsplit("/", 1)[-1] for g in gce.fake.resources("instanceGroups")] == [ZONE_B]

    run(provider.delete(lb_spec(nodes).ref))
    assert gce.inventory() == empty()


def test_internal_local_traffic_policy_checks_the_health_check_node_port(gce: GceWorld) -> None:
    provider = gce.provider(**{"cache-ttl-s": "300"})
    spec = lb_spec(nodes_in(gce, 1), annotations=INTERNAL, external_traffic_policy="Local",
                   health_check_node_port=32100)
    run(provider.ensure(spec))
    check = gce.one("regionHealthChecks", NAME)
    assert (check["type"], check["httpHealthCheck"]) == ("HTTP", {"port": 32100, "requestPath": "/healthz"})
    assert gce.fake.names("regionHealthChecks") == [NAME]
    assert {svc["healthChecks"][0] for svc in gce.fake.resources("regionBackendServices")} == {check["selfLink"]}
    gce.fake.reset_calls()
    run(provider.ensure(spec))
    assert gce.fake.calls == []


def test_internal_with_many_ports_forwards_all_ports(gce: GceWorld) -> None:
    ports = tuple(PortSpec(f"p{i}", "TCP", 9000 + i) for i in range(7))
    run(gce.provider().ensure(lb_spec(nodes_in(gce, 1), annotations=INTERNAL, ports=ports)))
    rule = gce.one("forwardingRules", f"{NAME}-tcp")
    assert rule["allPorts"] is True and "ports" not in rule
    assert gce.one("firewalls", f"k8s-fw-{NAME}")["allowed"] == [
        {"IPProtocol": "tcp", "ports": [str(9000 + i) for i in range(7)]}]


def test_switching_scheme_leaves_nothing_of_the_old_one(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    run(provider.ensure(lb_spec(nodes)))
    run(provider.ensure(lb_spec(nodes, annotations=INTERNAL)))
    assert gce.fake.names("targetPools") == []
    assert {rule["loadBalancingScheme"] for rule in gce.fake.resources("forwardingRules")} == {"INTERNAL"}
    run(provider.ensure(lb_spec(nodes)))
    assert gce.fake.names("regionBackendServices") == [] and gce.fake.names("instanceGroups") == []
    assert gce.one("addresses", NAME)["addressType"] == "EXTERNAL"
    run(provider.delete(lb_spec(nodes).ref))
    assert gce.inventory() == empty()


# -- a requested address ---------------------------------------------------------------------------


def test_requested_address_is_used_and_never_released(gce: GceWorld) -> None:
    ip = gce.reserve("users-ip")
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    status = run(provider.ensure(lb_spec(nodes, load_balancer_ip=ip)))
    assert status.ingress[0].ip == ip
    assert gce.fake.names("addresses") == ["users-ip"]
    assert {rule["IPAddress"] for rule in gce.fake.resources("forwardingRules")} == {ip}
    gce.fake.reset_calls()
    run(provider.ensure(lb_spec(nodes, load_balancer_ip=ip)))
    assert gce.writes() == []
    run(provider.delete(lb_spec(nodes).ref))
    assert gce.fake.names("addresses") == ["users-ip"] and gce.fake.names("forwardingRules") == []


def test_moving_to_a_requested_address_releases_ours(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    run(provider.ensure(lb_spec(nodes)))
    ip = gce.reserve("users-ip")
    assert run(provider.ensure(lb_spec(nodes, load_balancer_ip=ip))).ingress[0].ip == ip
    assert gce.fake.names("addresses") == ["users-ip"]


# -- construction ----------------------------------------------------------------------------------


def test_registry_builds_the_provider_with_the_endpoint_from_the_environment(
        gce: GceWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    from providers.registry import load

    monkeypatch.setenv("LBCTL_GCE_ENDPOINT", gce.fake.url)
    provider = load("gce", ProviderSettings(CLUSTER, {"project": PROJECT, "region": REGION}))
    assert isinstance(provider, GceProvider) and provider.needs_node_ports is False
    run(provider.ensure(lb_spec(nodes_in(gce, 1))))
    assert gce.fake.names("targetPools") == [NAME]
    run(provider.close())


@pytest.mark.parametrize(("missing", "extra"), [
    ("project", {}), ("region", {}), ("", {"page-size": "0"}), ("", {"cache-ttl-s": "soon"}),
    ("", {"node-tags": "Bad_Tag"}),
])
def test_bad_provider_options_are_refused(gce: GceWorld, missing: str, extra: dict[str, str]) -> None:
    settings = {"project": PROJECT, "region": REGION, "endpoint": gce.fake.url, **extra}
    settings.pop(missing, None)
    with pytest.raises(ValueError, match=missing or None):
        GceProvider.create(ProviderSettings(CLUSTER, settings))


# -- bad input -------------------------------------------------------------------------------------

BAD = [
    pytest.param({"annotations": {"cloud.google.com/network-tier": "Gold"}},
                 "metadata.annotations[cloud.google.com/network-tier]", id="unknown-tier"),
    pytest.param({"annotations": {"networking.gke.io/load-balancer-type": "Private"}},
                 "metadata.annotations[networking.gke.io/load-balancer-type]", id="unknown-type"),
    pytest.param({"source_ranges": ("10.0.0.0/33",)}, "spec.loadBalancerSourceRanges[0]", id="bad-cidr"),
    pytest.param({"load_balancer_ip": "198.51.100.99"}, "spec.loadBalancerIP", id="address-not-reserved"),
    pytest.param({"ports": (PortSpec("s", "SCTP", 9),)}, "spec.ports[0].protocol", id="sctp"),
    pytest.param({"nodes": "bare"}, "nodes[bare].spec.providerID", id="node-without-provider-id"),
    pytest.param({"nodes": "aws"}, "nodes[ec2].spec.providerID", id="non-gce-node"),
]


@pytest.mark.parametrize(("changes", "field"), BAD)
def test_bad_input_leaves_nothing(gce: GceWorld, changes: dict[str, Any], field: str) -> None:
    nodes = nodes_in(gce, 1)
    changes = dict(changes)
    if changes.get("nodes") == "bare":
        changes["nodes"] = (*nodes, NodeTarget(name="bare"))
    elif changes.get("nodes") == "aws":
        changes["nodes"] = (*nodes, NodeTarget(name="ec2", provider_id="aws:///us-east-1a/i-0abc"))
    spec = lb_spec(changes.pop("nodes", nodes), **changes)
    gce.fake.reset_calls()
    with pytest.raises(InvalidServiceError) as caught:
        run(gce.provider().ensure(spec))
    assert caught.value.field == field and caught.value.fix
    assert gce.writes() == []
    assert gce.inventory() == empty()


def test_missing_instance_waits_and_writes_nothing(gce: GceWorld) -> None:
    nodes = (*nodes_in(gce, 1), NodeTarget(name="ghost", provider_id=f"gce://{PROJECT}/{ZONE_B}/ghost"))
    gce.fake.reset_calls()
    with pytest.raises(Exception, match="ghost") as caught:
        run(gce.provider().ensure(lb_spec(nodes)))
    assert getattr(caught.value, "retryable", False)
    assert gce.writes() == [] and gce.inventory() == empty()


# -- faults ----------------------------------------------------------------------------------------


def test_throttling_and_5xx_are_retried_and_converge(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 2)
    gce.fake.inject("targetPools.insert", status=429, times=2)
    gce.fake.inject("forwardingRules.insert", status=503)
    gce.fake.inject("firewalls.get", status=403, reason="rateLimitExceeded")
    gce.fake.inject("targetPools.addInstance", status=500)
    provider = gce.provider()
    run(provider.ensure(lb_spec(nodes[:1])))
    assert gce.fake.count("targetPools.insert") == 3
    assert gce.fake.names("forwardingRules") == [f"{NAME}-tcp", f"{NAME}-udp"]
    run(provider.ensure(lb_spec(nodes)))
    assert gce.fake.count("targetPools.addInstance") == 2
    assert len(gce.one("targetPools", NAME)["instances"]) == 2


@pytest.mark.parametrize("in_operation", [True, False], ids=["in-operation", "http"])
def test_quota_exceeded_is_reported_then_converges(gce: GceWorld, in_operation: bool) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    reason = "QUOTA_EXCEEDED" if in_operation else "quotaExceeded"
    gce.fake.inject("forwardingRules.insert", status=403, reason=reason, in_operation=in_operation,
                    message="Quota 'FORWARDING_RULES' exceeded. Limit: 15.0 in region europe-west1.")
    with pytest.raises(TransientProviderError, match=r"quota exceeded.*FORWARDING_RULES") as caught:
        run(provider.ensure(lb_spec(nodes)))
    assert caught.value.fix and "quota" in caught.value.fix
    assert gce.fake.count("forwardingRules.insert") == 1  # not retried in place
    run(provider.ensure(lb_spec(nodes)))
    assert gce.inventory() == clean_inventory(nodes)


def clean_inventory(nodes: tuple[NodeTarget, ...]) -> dict[str, list[str]]:
    """What one external balancer with the shared node health check looks like."""
    return {**empty(), "addresses": [NAME], "firewalls": [f"k8s-fw-{NAME}", "k8s-prod-node-http-hc"],
            "httpHealthChecks": ["k8s-prod-node"], "targetPools": [NAME],
            "forwardingRules": [f"{NAME}-tcp", f"{NAME}-udp"]}


def clean_internal_inventory() -> dict[str, list[str]]:
    return {**empty(), "addresses": [NAME], "firewalls": [f"k8s-fw-{NAME}", "k8s-prod-node-http-hc"],
            "regionHealthChecks": ["k8s-prod-node"], "regionBackendServices": [f"{NAME}-tcp", f"{NAME}-udp"],
            "forwardingRules": [f"{NAME}-tcp", f"{NAME}-udp"], "instanceGroups": ["k8s-ig--prod"]}


CRASH_POINTS = [
    pytest.param({}, "httpHealthChecks.insert", 0, id="external-before-health-check"),
    pytest.param({}, "firewalls.insert", 1, id="external-before-second-firewall"),
    pytest.param({}, "targetPools.insert", 0, id="external-before-pool"),
    pytest.param({}, "forwardingRules.insert", 1, id="external-before-second-rule"),
    pytest.param(INTERNAL, "instanceGroups.addInstances", 0, id="internal-before-members"),
    pytest.param(INTERNAL, "regionBackendServices.insert", 1, id="internal-before-second-backend"),
    pytest.param(INTERNAL, "forwardingRules.insert", 0, id="internal-before-rules"),
]


@pytest.mark.parametrize(("annotations", "method", "after"), CRASH_POINTS)
def test_crash_between_steps_then_ensure_converges_without_duplicates(
        gce: GceWorld, annotations: dict[str, str], method: str, after: int) -> None:
    nodes = nodes_in(gce, 2)
    expected = clean_internal_inventory() if annotations else clean_inventory(nodes)
    # A non-retryable failure stands in for the process dying right before this step.
    gce.fake.inject(method, status=400, reason="invalid", message="simulated crash", after=after)
    with pytest.raises(TransientProviderError):
        run(gce.provider().ensure(lb_spec(nodes, annotations=annotations)))
    assert gce.inventory() != expected
    restarted = gce.provider()  # a fresh process: no cache, nothing remembered
    status = run(restarted.ensure(lb_spec(nodes, annotations=annotations)))
    assert gce.inventory() == expected
    assert status.ingress[0].ip == gce.one("addresses", NAME)["address"]
    gce.fake.reset_calls()
    run(restarted.ensure(lb_spec(nodes, annotations=annotations)))
    assert gce.writes() == []


def test_crash_after_the_address_was_reserved_reuses_it(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    # the first two reads look for the IPv4 and the IPv6 address; the third follows the reservation
    gce.fake.inject("addresses.get", status=400, reason="invalid", message="simulated crash", after=2)
    with pytest.raises(TransientProviderError):
        run(gce.provider().ensure(lb_spec(nodes)))
    reserved = gce.one("addresses", NAME)["address"]
    assert run(gce.provider().ensure(lb_spec(nodes))).ingress[0].ip == reserved
    assert gce.fake.names("addresses") == [NAME]


def test_delete_finishes_after_a_crash_midway(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    spec = lb_spec(nodes, annotations=INTERNAL)
    run(provider.ensure(spec))
    gce.fake.inject("regionHealthChecks.delete", status=400, reason="invalid", message="simulated crash")
    with pytest.raises(TransientProviderError):
        run(provider.delete(spec.ref))
    assert gce.fake.names("forwardingRules") == []
    run(gce.provider().delete(spec.ref))
    assert gce.inventory() == empty()


# -- IPv6 and dual-stack -----------------------------------------------------------------------------

TCP_ONLY = (PortSpec("http", "TCP", 80), PortSpec("https", "TCP", 443))
DUAL = {"annotations": INTERNAL, "ports": TCP_ONLY, "ip_families": ("IPv4", "IPv6"),
        "ip_family_policy": "RequireDualStack"}


def test_fake_refuses_what_gce_refuses_of_ipv6(gce: GceWorld) -> None:
    base = f"{gce.fake.url}/compute/v1/projects/{PROJECT}"
    gce.add_subnetwork("v4only", ipv6=None)
    v6 = requests.post(f"{base}/regions/{REGION}/addresses", timeout=10, json={
        "name": "v6", "addressType": "INTERNAL", "ipVersion": "IPV6",
        "subnetwork": f"projects/{PROJECT}/regions/{REGION}/subnetworks/v4only"})
    assert v6.status_code == 400 and "IPV4_ONLY" in v6.json()["error"]["message"]
    mixed = requests.post(f"{base}/global/firewalls", timeout=10, json={
        "name": "mixed", "allowed": [{"IPProtocol": "tcp"}], "sourceRanges": ["10.0.0.0/8", "2001:db8::/32"]})
    assert mixed.status_code == 400 and "mix" in mixed.json()["error"]["message"]
    run(gce.provider().ensure(lb_spec(nodes_in(gce, 1))))  # a target pool to point at
    pool_rule = requests.post(f"{base}/regions/{REGION}/forwardingRules", timeout=10, json={
        "name": "pool-v6", "IPProtocol": "TCP", "ipVersion": "IPV6", "portRange": "80",
        "target": f"projects/{PROJECT}/regions/{REGION}/targetPools/{NAME}"})
    assert pool_rule.status_code == 400 and "IPv4 only" in pool_rule.json()["error"]["message"]
    bad_version = requests.post(f"{base}/regions/{REGION}/subnetworks", timeout=10, json={
        "name": "x", "ipCidrRange": "10.1.0.0/20", "stackType": "IPV4_IPV7"})
    assert bad_version.status_code == 400


def test_dual_stack_internal_balancer(gce: GceWorld) -> None:
    gce.add_subnetwork()
    nodes = nodes_in(gce, 2)
    provider = gce.provider()
    spec = lb_spec(nodes, **DUAL)
    status = run(provider.ensure(spec))

    v4, v6 = gce.one("addresses", NAME), gce.one("addresses", f"{NAME}-ipv6")
    assert (v6["addressType"], v6["ipVersion"], v6["purpose"]) == ("INTERNAL", "IPV6", "GCE_ENDPOINT")
    assert v6["address"].startswith("fd20:")
    assert [i.ip for i in status.ingress] == [v4["address"], v6["address"]]  # spec.ipFamilies order
    assert all(i.ports == status.ingress[0].ports for i in status.ingress)
    rule, rule_v6 = gce.one("forwardingRules", f"{NAME}-tcp"), gce.one("forwardingRules", f"{NAME}-tcp-ipv6")
    assert rule_v6["ipVersion"] == "IPV6" and rule_v6["IPAddress"] == v6["address"]
    assert rule_v6["backendService"] == rule["backendService"]  # one backend service, a rule per family
    assert sorted(rule_v6["ports"]) == ["443", "80"] and rule_v6["subnetwork"].endswith("/subnetworks/default")
    assert gce.one("firewalls", f"k8s-fw-{NAME}")["sourceRanges"] == ["0.0.0.0/0"]
    assert gce.one("firewalls", f"k8s-fw-{NAME}-ipv6")["sourceRanges"] == ["::/0"]
    assert gce.one("firewalls", "k8s-prod-node-http-hc-ipv6")["sourceRanges"] == ["2600:2d00:1:b029::/64"]
    got = run(provider.get(spec.ref))
    assert got is not None and [i.ip for i in got.ingress] == [v4["address"], v6["address"]]

    gce.fake.reset_calls()
    assert run(provider.ensure(spec)) == status
    assert gce.writes() == []

    # IPv6 first in spec.ipFamilies: first in status too.
    assert [i.ip for i in run(provider.ensure(dataclasses.replace(spec, ip_families=("IPv6", "IPv4")))).ingress] \
        == [v6["address"], v4["address"]]

    # A port change recreates both rules; the reserved addresses stay.
    moved = dataclasses.replace(spec, ports=(PortSpec("http", "TCP", 8080),))
    gce.fake.reset_calls()
    assert [i.ip for i in run(provider.ensure(moved)).ingress] == [v4["address"], v6["address"]]
    assert sorted(gce.writes()) == sorted(["forwardingRules.delete", "forwardingRules.delete",
                                           "forwardingRules.insert", "forwardingRules.insert",
                                           "firewalls.patch", "firewalls.patch"])

    # Source ranges split by family; a family without ranges admits nobody (its firewall goes).
    run(provider.ensure(dataclasses.replace(moved, source_ranges=("10.0.0.0/8", "2001:db8::/32"))))
    assert gce.one("firewalls", f"k8s-fw-{NAME}")["sourceRanges"] == ["10.0.0.0/8"]
    assert gce.one("firewalls", f"k8s-fw-{NAME}-ipv6")["sourceRanges"] == ["2001:db8::/32"]
    run(provider.ensure(dataclasses.replace(moved, source_ranges=("10.0.0.0/8",))))
    assert f"k8s-fw-{NAME}-ipv6" not in gce.fake.names("firewalls")

    # Back to IPv4 only: every IPv6 piece goes.
    run(provider.ensure(dataclasses.replace(moved, ip_families=("IPv4",), ip_family_policy="SingleStack")))
    assert gce.fake.names("addresses") == [NAME]
    assert gce.fake.names("forwardingRules") == [f"{NAME}-tcp"]

    run(provider.ensure(spec))
    run(provider.delete(spec.ref))
    assert gce.inventory() == empty()


def test_ipv6_only_internal_balancer(gce: GceWorld) -> None:
    gce.add_subnetwork()
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    spec = lb_spec(nodes, annotations=INTERNAL, ports=TCP_ONLY, ip_families=("IPv6",),
                   source_ranges=("2001:db8:7::/48",))
    status = run(provider.ensure(spec))
    v6 = gce.one("addresses", f"{NAME}-ipv6")
    assert [i.ip for i in status.ingress] == [v6["address"]]
    assert gce.fake.names("addresses") == [f"{NAME}-ipv6"]
    assert gce.fake.names("forwardingRules") == [f"{NAME}-tcp-ipv6"]
    assert f"k8s-fw-{NAME}" not in gce.fake.names("firewalls")
    assert gce.one("firewalls", f"k8s-fw-{NAME}-ipv6")["sourceRanges"] == ["2001:db8:7::/48"]

    # Becoming dual-stack adds the IPv4 side and keeps the IPv6 address.
    both = dataclasses.replace(spec, ip_families=("IPv6", "IPv4"), ip_family_policy="RequireDualStack",
                               source_ranges=())
    status = run(provider.ensure(both))
    assert [i.ip for i in status.ingress] == [v6["address"], gce.one("addresses", NAME)["address"]]
    run(provider.delete(spec.ref))
    assert gce.inventory() == empty()


def test_prefer_dual_stack_settles_for_ipv4_where_gce_has_no_ipv6(gce: GceWorld) -> None:
    nodes = nodes_in(gce, 1)
    external = lb_spec(nodes, ip_families=("IPv4", "IPv6"), ip_family_policy="PreferDualStack",
                       source_ranges=("198.51.100.0/24", "2001:db8::/32"))
    status = run(gce.provider().ensure(external))  # target pools: IPv4 only
    assert [i.ip for i in status.ingress] == [gce.one("addresses", NAME)["address"]]
    assert gce.one("firewalls", f"k8s-fw-{NAME}")["sourceRanges"] == ["198.51.100.0/24"]
    assert f"k8s-fw-{NAME}-ipv6" not in gce.fake.names("firewalls")
    mixed = dataclasses.replace(external, annotations=INTERNAL)  # TCP and UDP: no shared IPv6 address
    assert len(run(gce.provider().ensure(mixed)).ingress) == 1
    assert gce.fake.names("addresses") == [NAME]


IPV6_REFUSALS = [
    pytest.param({**DUAL, "annotations": {}}, None, "spec.ipFamilyPolicy", "target pool", id="external-require"),
    pytest.param({**DUAL, "ip_families": ("IPv6",), "ip_family_policy": "SingleStack", "annotations": {}}, None,
                 "spec.ipFamilies", "target pool", id="external-ipv6-only"),
    pytest.param({**DUAL, "ports": (PortSpec("dns", "UDP", 53), PortSpec("dns-tcp", "TCP", 53))}, "INTERNAL",
                 "spec.ipFamilyPolicy", "TCP and a UDP", id="internal-mixed-protocols"),
    pytest.param(DUAL, None, "spec.ipFamilyPolicy", "IPV4_ONLY", id="subnetwork-ipv4-only"),
    pytest.param(DUAL, "EXTERNAL", "spec.ipFamilyPolicy", "EXTERNAL IPv6 access", id="subnetwork-external-ipv6"),
    pytest.param(DUAL, "missing", "spec.ipFamilyPolicy", "was not found", id="no-subnetwork"),
    pytest.param({"ip_families": ("IPv4",), "source_ranges": ("2001:db8::/32",)}, None,
                 "spec.loadBalancerSourceRanges[0]", "IPv4 only", id="ipv6-range-on-ipv4-service"),
    pytest.param({"ip_families": ("IPv6",), "annotations": INTERNAL, "ports": TCP_ONLY,
                  "source_ranges": ("10.0.0.0/8",)}, "INTERNAL", "spec.loadBalancerSourceRanges[0]", "IPv6 only",
                 id="ipv4-range-on-ipv6-service"),
]


@pytest.mark.parametrize(("changes", "subnetwork", "field", "says"), IPV6_REFUSALS)
def test_ipv6_refusals_name_the_field_and_leave_nothing(
    gce: GceWorld, changes: dict[str, Any], subnetwork: str | None, field: str, says: str,
) -> None:
    if subnetwork != "missing":
        gce.add_subnetwork(ipv6=subnetwork)
    nodes = nodes_in(gce, 1)
    gce.fake.reset_calls()
    with pytest.raises(InvalidServiceError) as caught:
        run(gce.provider().ensure(lb_spec(nodes, **changes)))
    assert caught.value.field == field and caught.value.fix
    assert says in caught.value.problem
    assert gce.writes() == [] and gce.inventory() == empty()
    if "subnetwork" in caught.value.problem and subnetwork != "missing":
        assert "--stack-type IPV4_IPV6 --ipv6-access-type INTERNAL" in caught.value.fix


def test_an_ipv6_refusal_leaves_an_existing_balancer_as_it_was(gce: GceWorld) -> None:
    gce.add_subnetwork(ipv6=None)
    nodes = nodes_in(gce, 1)
    provider = gce.provider()
    ipv4 = lb_spec(nodes, annotations=INTERNAL, ports=TCP_ONLY)
    run(provider.ensure(ipv4))
    before = gce.inventory()
    gce.fake.reset_calls()
    with pytest.raises(InvalidServiceError):
        run(provider.ensure(lb_spec(nodes, **DUAL)))
    assert gce.writes() == [] and gce.inventory() == before
