"""The operator with the AWS provider: real control plane, `lbctl operator` in its own process, and
moto in server mode standing in for EC2 and ELBv2 (real boto3 calls over HTTP)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from lbctl.dev.layout import ClusterInfo
from lbctl.model.names import load_balancer_name
from lbctl.model.scope import FINALIZER
from providers.aws_plan import frontend_group_name, is_target_group_of
from tests.fakes.aws_fault_proxy import AwsFaultProxy
from tests.fakes.aws_world import AwsWorld, build_world, moto_server
from tests.integration.harness import (
    Nodes,
    OperatorProcess,
    free_port,
    lb_service,
    wait_for_condition,
    wait_for_event,
    wait_until,
)

AWS_CLASS = "lbctl.io/aws"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def world(moto_url: str, nodes: Nodes) -> AwsWorld:
    """A fresh moto world with two instances, and their Node objects in the cluster."""
    made = build_world(moto_url, nodes=2)
    for index in range(2):
        register_node(made, nodes, index)
    return made


def register_node(world: AwsWorld, nodes: Nodes, index: int) -> None:
    target = world.node(index)
    nodes.create(f"aws-{target.name}", provider_id=target.provider_id)


def start_aws(start: Callable[..., OperatorProcess], world: AwsWorld) -> OperatorProcess:
    return start("--provider", "aws", "--cluster-name", world.cluster, "--region", world.region,
                 "--aws-endpoint-url", world.url, "--provider-option", "state_cache_s=0")


def hostname(core: client.CoreV1Api, namespace: str, name: str) -> str:
    def probe() -> str:
        ingress = core.read_namespaced_service(name, namespace).status.load_balancer.ingress or []
        return str(ingress[0].hostname) if ingress and ingress[0].hostname else ""

    return wait_until(probe, timeout=30, what=f"a hostname on {namespace}/{name}")


def balancer(world: AwsWorld, name: str) -> dict[str, Any] | None:
    found = [lb for lb in world.elbv2.describe_load_balancers()["LoadBalancers"] if lb["LoadBalancerName"] == name]
    return found[0] if found else None


def target_groups(world: AwsWorld, lb_arn: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = world.elbv2.describe_target_groups(LoadBalancerArn=lb_arn)["TargetGroups"]
    return groups


def targets(world: AwsWorld, group_arn: str) -> list[str]:
    health = world.elbv2.describe_target_health(TargetGroupArn=group_arn)["TargetHealthDescriptions"]
    return sorted(t["Target"]["Id"] for t in health)


def lb_name(core: client.CoreV1Api, namespace: str, name: str) -> str:
    return load_balancer_name(str(core.read_namespaced_service(name, namespace).metadata.uid))


def test_create_node_changes_and_delete(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, world: AwsWorld,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    start_aws(start_operator, world)
    core.create_namespaced_service(namespace, lb_service("web", [80, (53, "UDP")], lb_class=AWS_CLASS))
    dns = hostname(core, namespace, "web")
    lb = balancer(world, lb_name(core, namespace, "web"))
    assert lb is not None and lb["DNSName"] == dns and lb["Scheme"] == "internet-facing"
    service = core.read_namespaced_service("web", namespace)
    node_ports = sorted(p.node_port for p in service.spec.ports)
    groups = target_groups(world, lb["LoadBalancerArn"])
    assert sorted(g["Port"] for g in groups) == node_ports
    instances = sorted(i for i, _ in world.instances)
    assert all(targets(world, g["TargetGroupArn"]) == instances for g in groups)
    wait_for_condition(core, namespace, "web", "True")

    world.add_instance()
    register_node(world, nodes, 2)
    everyone = sorted(i for i, _ in world.instances)
    wait_until(lambda: all(targets(world, g["TargetGroupArn"]) == everyone for g in groups),
               timeout=20, what="the new node registered in every target group")
    wait_for_event(core, namespace, "web", "UpdatedLoadBalancer", "new hosts")
    assert balancer(world, lb["LoadBalancerName"])["LoadBalancerArn"] == lb["LoadBalancerArn"]  # type: ignore[index]
    assert sorted(g["TargetGroupArn"] for g in target_groups(world, lb["LoadBalancerArn"])) == sorted(
        g["TargetGroupArn"] for g in groups)

    core.delete_namespaced_service("web", namespace)
    wait_until(lambda: balancer(world, lb["LoadBalancerName"]) is None, timeout=20, what="NLB deleted")
    assert world.elbv2.describe_target_groups()["TargetGroups"] == []


def test_node_ports_are_claimed_when_the_apiserver_allocates_none(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str, world: AwsWorld,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    start_aws(start_operator, world)
    core.create_namespaced_service(namespace, lb_service(
        "no-auto", [80, 81], lb_class=AWS_CLASS, allocateLoadBalancerNodePorts=False))
    claimed = wait_for_event(core, namespace, "no-auto", "AllocatedNodePorts")
    ports = [p.node_port for p in core.read_namespaced_service("no-auto", namespace).spec.ports]
    low, high = cluster.node_port_bounds
    assert all(p and low <= p <= high for p in ports) and len(set(ports)) == 2
    assert all(str(p) in claimed[2] for p in ports)
    hostname(core, namespace, "no-auto")
    lb = balancer(world, lb_name(core, namespace, "no-auto"))
    assert lb is not None
    assert sorted(g["Port"] for g in target_groups(world, lb["LoadBalancerArn"])) == sorted(ports)


def test_local_traffic_policy_checks_the_health_check_node_port_and_internal_scheme(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, start_operator: Callable[..., OperatorProcess],
) -> None:
    start_aws(start_operator, world)
    core.create_namespaced_service(namespace, lb_service(
        "local", lb_class=AWS_CLASS, externalTrafficPolicy="Local",
        annotations={"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}))
    hostname(core, namespace, "local")
    health_port = core.read_namespaced_service("local", namespace).spec.health_check_node_port
    lb = balancer(world, lb_name(core, namespace, "local"))
    assert lb is not None and lb["Scheme"] == "internal"
    (group,) = target_groups(world, lb["LoadBalancerArn"])
    assert (group["HealthCheckProtocol"], group["HealthCheckPath"], group["HealthCheckPort"]) == (
        "HTTP", "/healthz", str(health_port))


def test_bad_input_names_the_field_and_makes_nothing(
    core: client.CoreV1Api, namespace: str, world: AwsWorld,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    start_aws(start_operator, world)
    cases = {
        "maybe": (lb_service("maybe", lb_class=AWS_CLASS, annotations={
            "service.beta.kubernetes.io/aws-load-balancer-internal": "maybe"}),
            "service.beta.kubernetes.io/aws-load-balancer-internal"),
        "sctp": (lb_service("sctp", [(9999, "SCTP")], lb_class=AWS_CLASS), "spec.ports[0].protocol"),
        "subnet": (lb_service("subnet", lb_class=AWS_CLASS, annotations={
            "service.beta.kubernetes.io/aws-load-balancer-subnets": "subnet-does-not-exist"}),
            "service.beta.kubernetes.io/aws-load-balancer-subnets"),
    }
    for body, _field in cases.values():
        core.create_namespaced_service(namespace, body)
    for name, (_body, field) in cases.items():
        found = wait_for_condition(core, namespace, name, "False", timeout=20)
        assert field in found.message, (name, found.message)
        wait_for_event(core, namespace, name, "SyncLoadBalancerFailed", field)
    assert world.elbv2.describe_load_balancers()["LoadBalancers"] == []
    assert world.elbv2.describe_target_groups()["TargetGroups"] == []


def test_a_node_without_provider_id_is_named_and_nothing_is_made(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, world: AwsWorld,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    nodes.create("aws-no-provider-id")
    start_aws(start_operator, world)
    core.create_namespaced_service(namespace, lb_service("web", lb_class=AWS_CLASS))
    found = wait_for_condition(core, namespace, "web", "False", timeout=20)
    assert "aws-no-provider-id" in found.message and "providerID" in found.message
    assert world.elbv2.describe_load_balancers()["LoadBalancers"] == []


def test_gc_finds_and_deletes_an_nlb_whose_service_is_gone(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str, world: AwsWorld,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    operator = start_aws(start_operator, world)
    core.create_namespaced_service(namespace, lb_service("web", lb_class=AWS_CLASS))
    hostname(core, namespace, "web")
    name = lb_name(core, namespace, "web")
    operator.stop()
    core.patch_namespaced_service("web", namespace, {"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}})
    core.delete_namespaced_service("web", namespace)

    def gc(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbctl", "gc", "--provider", "aws", "--cluster-name", world.cluster,
             "--region", world.region, "--aws-endpoint-url", world.url, *extra],
            env={**os.environ, "KUBECONFIG": cluster.kubeconfig}, capture_output=True, text=True, timeout=60)

    listed = gc()
    assert listed.returncode == 0, listed.stderr
    assert f"orphaned\t{name}\t{namespace}/web" in listed.stdout and balancer(world, name) is not None
    deleted = gc("--delete")
    assert deleted.returncode == 0 and f"deleted\t{name}" in deleted.stdout
    assert balancer(world, name) is None and world.elbv2.describe_target_groups()["TargetGroups"] == []


# ---- with the operator's AWS calls going through a fault-injecting proxy ----------------------------


@pytest.fixture
def proxy(world: AwsWorld) -> Iterator[AwsFaultProxy]:
    with AwsFaultProxy(world.url) as running:
        yield running


def start_via(start: Callable[..., OperatorProcess], world: AwsWorld, proxy: AwsFaultProxy,
              *extra: str) -> OperatorProcess:
    return start("--provider", "aws", "--cluster-name", world.cluster, "--region", world.region,
                 "--aws-endpoint-url", proxy.url, "--provider-option", "state_cache_s=0", *extra)


def listeners(world: AwsWorld, lb_arn: str) -> dict[int, dict[str, Any]]:
    found = world.elbv2.describe_listeners(LoadBalancerArn=lb_arn)["Listeners"]
    return {int(listener["Port"]): listener for listener in found}


def test_a_kill_between_the_nlb_and_its_listeners_converges_to_one_complete_nlb(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, proxy: AwsFaultProxy,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    proxy.inject("CreateListener", status=500, code="InternalFailure", times=-1)
    operator = start_via(start_operator, world, proxy)
    core.create_namespaced_service(namespace, lb_service("web", [80, 443], lb_class=AWS_CLASS))
    name = lb_name(core, namespace, "web")
    wait_until(lambda: balancer(world, name) is not None and "CreateListener" in proxy.calls, timeout=20,
               what="the NLB made and a listener attempted")
    operator.kill()
    proxy.clear()
    operator.start()
    hostname(core, namespace, "web")
    (lb,) = [b for b in world.elbv2.describe_load_balancers()["LoadBalancers"] if b["LoadBalancerName"] == name]
    assert sorted(listeners(world, lb["LoadBalancerArn"])) == [80, 443]
    assert proxy.calls.count("CreateLoadBalancer") == 1


def test_a_leader_killed_between_the_nlb_and_its_listeners_leaves_the_standby_one_complete_nlb(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, proxy: AwsFaultProxy,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    """Two replicas with leader election: the leader makes the NLB, fails on every listener, and is
    killed (-9) there. The standby, whose caches are warm but which never touched AWS, takes the
    Lease and finishes from what it finds (the NLB by its name): one NLB with both listeners, each on
    a target group of that NLB, and nothing orphaned beside it."""
    elect = ["--leader-elect", "--leader-elect-namespace", namespace, "--leader-elect-lease", "aws-ha-test"]
    proxy.inject("CreateListener", status=500, code="InternalFailure", times=-1)
    leader = start_via(start_operator, world, proxy, *elect)
    wait_until(lambda: "now leads" in leader.log(), what="the first replica leads")
    standby = start_via(start_operator, world, proxy, *elect)
    assert "standing by:" in standby.log()
    core.create_namespaced_service(namespace, lb_service("web", [80, 443], lb_class=AWS_CLASS))
    name = lb_name(core, namespace, "web")
    wait_until(lambda: balancer(world, name) is not None and "CreateListener" in proxy.calls, timeout=20,
               what="the NLB made and a listener attempted")
    assert "now leads" not in standby.log()
    leader.kill()
    proxy.clear()
    hostname(core, namespace, "web")
    assert "now leads" in standby.log()

    (lb,) = [b for b in world.elbv2.describe_load_balancers()["LoadBalancers"] if b["LoadBalancerName"] == name]
    assert proxy.calls.count("CreateLoadBalancer") == 1
    found = listeners(world, lb["LoadBalancerArn"])
    assert sorted(found) == [80, 443]
    groups = {g["TargetGroupArn"]: g for g in world.elbv2.describe_target_groups()["TargetGroups"]
              if is_target_group_of(name, g["TargetGroupName"])}
    assert len(groups) == 2
    assert {listener["DefaultActions"][0]["TargetGroupArn"] for listener in found.values()} == set(groups)
    assert all(g["LoadBalancerArns"] == [lb["LoadBalancerArn"]] for g in groups.values()), "a target group left over"
    frontends = world.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [frontend_group_name(name)]}])["SecurityGroups"]
    assert len(frontends) == 1 and frontends[0]["GroupId"] in lb["SecurityGroups"]


def test_throttling_is_retried_until_it_converges(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, proxy: AwsFaultProxy,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    proxy.inject("CreateLoadBalancer", status=400, code="Throttling", times=3)
    proxy.inject("RegisterTargets", status=503, code="ServiceUnavailable", times=2)
    start_via(start_operator, world, proxy)
    core.create_namespaced_service(namespace, lb_service("web", lb_class=AWS_CLASS))
    hostname(core, namespace, "web")
    assert proxy.calls.count("CreateLoadBalancer") == 4  # three throttled, then one made
    assert len(world.elbv2.describe_load_balancers()["LoadBalancers"]) == 1


def test_a_port_change_touches_only_its_listener_and_a_resync_writes_nothing(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, proxy: AwsFaultProxy,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    operator = start_via(start_operator, world, proxy, "--metrics-port", str(free_port()))
    core.create_namespaced_service(namespace, lb_service(
        "web", [80, 443], lb_class=AWS_CLASS, loadBalancerSourceRanges=["203.0.113.0/24"]))
    hostname(core, namespace, "web")
    lb = balancer(world, lb_name(core, namespace, "web"))
    assert lb is not None
    groups = world.ec2.describe_security_groups(GroupIds=lb["SecurityGroups"])["SecurityGroups"]
    allowed = {(rule["FromPort"], r["CidrIp"]) for g in groups for rule in g["IpPermissions"]
               for r in rule.get("IpRanges", [])}
    assert {(80, "203.0.113.0/24"), (443, "203.0.113.0/24")} <= allowed
    assert not any(cidr == "0.0.0.0/0" for _, cidr in allowed)
    before = listeners(world, lb["LoadBalancerArn"])

    proxy.reset_calls()
    operator.stop()
    operator.start()  # every Service is synced again at start-up: reads only
    wait_until(lambda: "DescribeLoadBalancers" in proxy.calls, what="the resync reached AWS")
    wait_until(lambda: operator.synced(1), what="the start-up sync of web finished")
    assert proxy.writes() == []

    proxy.reset_calls()
    service = core.read_namespaced_service("web", namespace)
    ports = [{"name": p.name, "port": 8443 if p.port == 443 else p.port, "protocol": p.protocol}
             for p in service.spec.ports]
    core.patch_namespaced_service("web", namespace, [{"op": "replace", "path": "/spec/ports", "value": ports}])
    wait_until(lambda: sorted(listeners(world, lb["LoadBalancerArn"])) == [80, 8443], timeout=20,
               what="listener 443 replaced by 8443")
    after = listeners(world, lb["LoadBalancerArn"])
    assert after[80]["ListenerArn"] == before[80]["ListenerArn"]
    assert after[80]["DefaultActions"] == before[80]["DefaultActions"]
    writes = proxy.writes()
    assert "CreateLoadBalancer" not in writes and "DeleteLoadBalancer" not in writes
    assert writes.count("CreateListener") == 1 and writes.count("DeleteListener") == 1


# ---- dual-stack NLBs ------------------------------------------------------------------------------

IP_ADDRESS_TYPE = "service.beta.kubernetes.io/aws-load-balancer-ip-address-type"


def test_dual_stack_service_gets_a_dualstack_nlb_and_switches_back_in_place(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, start_operator: Callable[..., OperatorProcess],
) -> None:
    world.enable_ipv6(*world.public_subnets.values())
    start_aws(start_operator, world)
    core.create_namespaced_service(namespace, lb_service(
        "both", [80], lb_class=AWS_CLASS, annotations={IP_ADDRESS_TYPE: "dualstack"},
        ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"],
        loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8:1::/48"]))
    dns = hostname(core, namespace, "both")
    lb = balancer(world, lb_name(core, namespace, "both"))
    assert lb is not None and lb["DNSName"] == dns and lb["IpAddressType"] == "dualstack"
    assert {z["SubnetId"] for z in lb["AvailabilityZones"]} == set(world.public_subnets.values())
    frontend = [g for g in world.ec2.describe_security_groups(GroupIds=lb["SecurityGroups"])["SecurityGroups"]
                if g["GroupName"] == f"lbctl-{lb['LoadBalancerName']}"]
    (permission,) = frontend[0]["IpPermissions"]
    assert [r["CidrIp"] for r in permission["IpRanges"]] == ["203.0.113.0/24"]
    assert [r["CidrIpv6"] for r in permission["Ipv6Ranges"]] == ["2001:db8:1::/48"]
    wait_for_condition(core, namespace, "both", "True")

    core.patch_namespaced_service("both", namespace, {"metadata": {"annotations": {IP_ADDRESS_TYPE: "ipv4"}},
                                                      "spec": {"loadBalancerSourceRanges": ["203.0.113.0/24"]}})
    wait_until(lambda: (balancer(world, lb["LoadBalancerName"]) or {}).get("IpAddressType") == "ipv4",
               timeout=20, what="the NLB switched to ipv4")
    assert balancer(world, lb["LoadBalancerName"])["LoadBalancerArn"] == lb["LoadBalancerArn"]  # type: ignore[index]
    assert hostname(core, namespace, "both") == dns


def test_dualstack_refusals_name_the_field_and_make_nothing(
    core: client.CoreV1Api, namespace: str, world: AwsWorld, start_operator: Callable[..., OperatorProcess],
) -> None:
    start_aws(start_operator, world)  # the world's subnets have no IPv6
    core.create_namespaced_service(namespace, lb_service(
        "nov6", lb_class=AWS_CLASS, annotations={IP_ADDRESS_TYPE: "dualstack"}))
    core.create_namespaced_service(namespace, lb_service(
        "v6range", lb_class=AWS_CLASS, loadBalancerSourceRanges=["2001:db8::/32"]))
    found = wait_for_condition(core, namespace, "nov6", "False", timeout=20)
    assert IP_ADDRESS_TYPE in found.message and "have no IPv6 CIDR" in found.message
    assert all(subnet in found.message for subnet in world.public_subnets.values())
    wait_for_event(core, namespace, "nov6", "SyncLoadBalancerFailed", "remove the annotation")
    found = wait_for_condition(core, namespace, "v6range", "False", timeout=20)
    assert "spec.loadBalancerSourceRanges[0]" in found.message and IP_ADDRESS_TYPE in found.message
    assert world.elbv2.describe_load_balancers()["LoadBalancers"] == []
    assert world.elbv2.describe_target_groups()["TargetGroups"] == []
