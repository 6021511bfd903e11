"""The AWS provider against moto in server mode, through real boto3 clients.

Calls are observed with a botocore 'provide-client-params' hook: it records each operation the provider makes
and can inject faults (throttling, a crash) before the request leaves the client. Moto reports every
registered target healthy, so target health is not asserted here."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from botocore.exceptions import ClientError

from lbctl.model.errors import InvalidServiceError, TransientProviderError
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, PortStatus, ServiceRef
from providers import aws_plan as plan
from providers.aws import AwsProvider, is_retryable
from providers.base import ProviderSettings
from providers.registry import load
from providers.retry import CloudCaller

if TYPE_CHECKING:
    from tests.fakes.aws_world import AwsWorld

P = plan.ANNOTATION_PREFIX
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Calls:
    """Records every AWS operation the provider makes; `fail` injects errors by operation name."""

    def __init__(self, provider: AwsProvider) -> None:
        self.names: list[str] = []
        self.params: list[tuple[str, dict[str, Any]]] = []
        self.faults: dict[str, list[Callable[[], BaseException]]] = {}
        for client in (provider.elbv2, provider.ec2):
            client.meta.events.register("provide-client-params", self._hook)

    def _hook(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.names.append(model.name)
        self.params.append((model.name, params))
        pending = self.faults.get(model.name)
        if pending:
            raise pending.pop(0)()

    def fail(self, operation: str, times: int, make: Callable[[], BaseException]) -> None:
        self.faults[operation] = [make] * times

    def clear(self) -> None:
        self.names.clear()
        self.params.clear()

    @property
    def writes(self) -> Counter[str]:
        return Counter(n for n in self.names if not n.startswith("Describe"))


def throttling(operation: str) -> Callable[[], BaseException]:
    return lambda: ClientError(
        {"Error": {"Code": "Throttling", "Message": "Rate exceeded"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
        operation,
    )


def make_provider(world: AwsWorld, **options: str) -> AwsProvider:
    settings = ProviderSettings(world.cluster, {"region": world.region, "endpoint_url": world.url, **options})
    return AwsProvider.create(settings)


@pytest.fixture
def provider(aws_world: AwsWorld) -> Iterator[AwsProvider]:
    created = make_provider(aws_world)
    yield created
    run(created.close())


@pytest.fixture
def forgetful(aws_world: AwsWorld) -> Iterator[AwsProvider]:
    """A provider that reads everything on every ensure (no known-state shortcut)."""
    created = make_provider(aws_world, state_cache_s="0")
    yield created
    run(created.close())


@pytest.fixture
def calls(provider: AwsProvider) -> Calls:
    return Calls(provider)


def make_spec(world: AwsWorld, uid: str = "0000-1111-2222", name: str = "web", **changes: Any) -> LoadBalancerSpec:
    base = LoadBalancerSpec(
        service=ServiceRef("shop", name, uid), cluster_name=world.cluster, name=("a" + uid.replace("-", ""))[:32],
        ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("https", "TCP", 443, 30443)),
        nodes=world.nodes(),
    )
    return dataclasses.replace(base, **changes)


# ─── reading AWS back ───────────────────────────────────────────────────────────────────────────


def balancers(world: AwsWorld, name: str | None = None) -> list[dict[str, Any]]:
    found = world.elbv2.describe_load_balancers()["LoadBalancers"]
    return [b for b in found if name is None or b["LoadBalancerName"] == name]


def listeners(world: AwsWorld, lb_arn: str) -> dict[int, dict[str, Any]]:
    return {li["Port"]: li for li in world.elbv2.describe_listeners(LoadBalancerArn=lb_arn)["Listeners"]}


def target_groups(world: AwsWorld) -> dict[str, dict[str, Any]]:
    return {g["TargetGroupArn"]: g for g in world.elbv2.describe_target_groups()["TargetGroups"]}


def targets(world: AwsWorld, tg_arn: str) -> set[str]:
    health = world.elbv2.describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]
    return {d["Target"]["Id"] for d in health}


def tags(world: AwsWorld, arn: str) -> dict[str, str]:
    described = world.elbv2.describe_tags(ResourceArns=[arn])["TagDescriptions"][0]["Tags"]
    return {t["Key"]: t["Value"] for t in described}


def security_groups(world: AwsWorld) -> dict[str, dict[str, Any]]:
    """Every security group of the world's VPC, by name."""
    found = world.ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [world.vpc_id]}])
    return {g["GroupName"]: g for g in found["SecurityGroups"]}


def ingress_rules(world: AwsWorld, group_id: str) -> dict[tuple[str, int, str], dict[str, Any]]:
    """(protocol, from port, source range or group) -> the rule, with its tags and description."""
    rules = world.ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [group_id]}])["SecurityGroupRules"]
    return {
        (r["IpProtocol"], r["FromPort"],
         r.get("CidrIpv4") or r.get("CidrIpv6") or r.get("ReferencedGroupInfo", {}).get("GroupId")): r
        for r in rules if not r["IsEgress"]
    }


def frontend_rules(world: AwsWorld, spec: LoadBalancerSpec) -> set[tuple[str, int, str]]:
    group = security_groups(world).get(plan.frontend_group_name(spec.name))
    return set(ingress_rules(world, group["GroupId"])) if group else set()


def backend_group(world: AwsWorld) -> str:
    return str(security_groups(world)[plan.backend_group_name(world.cluster)]["GroupId"])


def node_rules(world: AwsWorld) -> set[tuple[str, int, str]]:
    return set(ingress_rules(world, world.node_group))


def forward_arn(listener: dict[str, Any]) -> str:
    return str(listener["DefaultActions"][0]["TargetGroupArn"])


def instance_ids(world: AwsWorld) -> set[str]:
    return {i for i, _ in world.instances}


# ─── tests ──────────────────────────────────────────────────────────────────────────────────────


def test_registry_builds_the_provider(aws_world: AwsWorld) -> None:
    settings = ProviderSettings(aws_world.cluster, {"region": aws_world.region, "endpoint_url": aws_world.url})
    built = load("aws", settings)
    assert isinstance(built, AwsProvider) and built.needs_node_ports and built.name == "aws"


def test_create(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world, ports=(
        PortSpec("http", "TCP", 80, 30080), PortSpec("dns", "UDP", 53, 30053), PortSpec("dns-tcp", "TCP", 53, 30053),
    ))
    status = run(provider.ensure(spec))

    [lb] = balancers(aws_world)
    assert lb["LoadBalancerName"] == spec.name and lb["Type"] == "network" and lb["Scheme"] == "internet-facing"
    assert {z["SubnetId"] for z in lb["AvailabilityZones"]} == set(aws_world.public_subnets.values())
    [ingress] = status.ingress
    assert ingress.hostname == lb["DNSName"]
    assert ingress.ports == (PortStatus(53, "TCP"), PortStatus(53, "UDP"), PortStatus(80, "TCP"))

    by_port = listeners(aws_world, lb["LoadBalancerArn"])
    assert {p: li["Protocol"] for p, li in by_port.items()} == {80: "TCP", 53: "TCP_UDP"}
    groups = target_groups(aws_world)
    assert len(groups) == 2
    for port, node_port, protocol in ((80, 30080, "TCP"), (53, 30053, "TCP_UDP")):
        group = groups[forward_arn(by_port[port])]
        assert (group["Protocol"], group["Port"], group["TargetType"]) == (protocol, node_port, "instance")
        assert len(group["TargetGroupName"]) <= 32
        assert (group["HealthCheckProtocol"], group["HealthCheckPort"]) == ("TCP", "traffic-port")
        assert targets(aws_world, group["TargetGroupArn"]) == instance_ids(aws_world)

    expected_tags = {
        f"kubernetes.io/cluster/{aws_world.cluster}": "owned", "kubernetes.io/service-name": "shop/web",
        "lbctl.io/service-uid": spec.service.uid,
    }
    for arn in [lb["LoadBalancerArn"], *groups, *(li["ListenerArn"] for li in by_port.values())]:
        assert expected_tags.items() <= tags(aws_world, arn).items(), arn

    # The NLB's own group admits clients on the listener ports; the node group admits the cluster's
    # shared backend group (attached to every NLB) with one rule, and nothing on node ports directly.
    groups = security_groups(aws_world)
    frontend = groups[plan.frontend_group_name(spec.name)]
    assert set(lb["SecurityGroups"]) == {frontend["GroupId"], backend_group(aws_world)}
    assert expected_tags.items() <= {t["Key"]: t["Value"] for t in frontend["Tags"]}.items()
    rules = ingress_rules(aws_world, frontend["GroupId"])
    assert set(rules) == {("tcp", 80, "0.0.0.0/0"), ("tcp", 53, "0.0.0.0/0"), ("udp", 53, "0.0.0.0/0")}
    for rule in rules.values():
        assert expected_tags.items() <= {t["Key"]: t["Value"] for t in rule["Tags"]}.items()
        assert rule["Description"] == f"lbctl client {spec.name}"
    assert node_rules(aws_world) == {("-1", -1, backend_group(aws_world))}

    assert run(provider.get(spec.ref)) == status
    [ref] = run(provider.list_owned())
    assert (ref.name, ref.namespace, ref.service_name, ref.uid) == (spec.name, "shop", "web", spec.service.uid)
    assert calls.writes["CreateLoadBalancer"] == 1


def test_noop_resync_makes_no_writes(aws_world: AwsWorld, forgetful: AwsProvider) -> None:
    calls = Calls(forgetful)
    spec = make_spec(aws_world, external_traffic_policy="Local", health_check_node_port=32100,
                     source_ranges=("203.0.113.0/24",),
                     annotations={P + "cross-zone-load-balancing-enabled": "true",
                                  P + "additional-resource-tags": "team=shop",
                                  P + "internal": "true"})
    first = run(forgetful.ensure(spec))
    assert calls.writes
    calls.clear()
    assert run(forgetful.ensure(spec)) == first
    assert {"DescribeLoadBalancers", "DescribeListeners", "DescribeTargetHealth"} <= set(calls.names)
    assert not calls.writes, calls.names


def test_noop_resync_within_the_known_state_makes_no_calls(
    aws_world: AwsWorld, provider: AwsProvider, calls: Calls
) -> None:
    spec = make_spec(aws_world)
    first = run(provider.ensure(spec))
    calls.clear()
    assert run(provider.ensure(spec)) == first
    assert calls.names == []


def test_changing_one_port_leaves_the_others_alone(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world)
    run(provider.ensure(spec))
    [lb] = balancers(aws_world)
    before = listeners(aws_world, lb["LoadBalancerArn"])
    old_443_group = forward_arn(before[443])

    # The node port of 443 changes: a new target group behind the same listener; 80 is untouched.
    calls.clear()
    moved = dataclasses.replace(spec, ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("https", "TCP", 443, 30444)))
    run(provider.ensure(moved))
    after = listeners(aws_world, lb["LoadBalancerArn"])
    assert after[80]["ListenerArn"] == before[80]["ListenerArn"]
    assert forward_arn(after[80]) == forward_arn(before[80])
    assert after[443]["ListenerArn"] == before[443]["ListenerArn"]
    assert forward_arn(after[443]) != old_443_group
    groups = target_groups(aws_world)
    assert old_443_group not in groups and len(groups) == 2
    assert groups[forward_arn(after[443])]["Port"] == 30444
    assert targets(aws_world, forward_arn(after[443])) == instance_ids(aws_world)
    assert frontend_rules(aws_world, spec) == {("tcp", 80, "0.0.0.0/0"), ("tcp", 443, "0.0.0.0/0")}
    assert set(calls.writes) == {"CreateTargetGroup", "RegisterTargets", "ModifyListener", "DeleteTargetGroup"}
    assert calls.writes["CreateTargetGroup"] == calls.writes["ModifyListener"] == 1
    modified = [p for n, p in calls.params if n == "ModifyListener"]
    assert [p["ListenerArn"] for p in modified] == [before[443]["ListenerArn"]]

    # The service port 80 becomes 8080 on the same node port: a new listener, the same target group.
    calls.clear()
    renumbered = dataclasses.replace(moved, ports=(PortSpec("http", "TCP", 8080, 30080), moved.ports[1]))
    status = run(provider.ensure(renumbered))
    final = listeners(aws_world, lb["LoadBalancerArn"])
    assert set(final) == {8080, 443}
    assert forward_arn(final[8080]) == forward_arn(before[80])
    assert final[443]["ListenerArn"] == before[443]["ListenerArn"]
    assert frontend_rules(aws_world, spec) == {("tcp", 8080, "0.0.0.0/0"), ("tcp", 443, "0.0.0.0/0")}
    assert calls.writes == Counter({"DeleteListener": 1, "CreateListener": 1, "AuthorizeSecurityGroupIngress": 1,
                                    "RevokeSecurityGroupIngress": 1})
    assert status.ingress[0].ports == (PortStatus(443, "TCP"), PortStatus(8080, "TCP"))


@pytest.mark.parametrize("state_cache_s", ["300", "0"], ids=["known-state", "full-read"])
def test_node_changes_only_touch_targets(aws_world: AwsWorld, state_cache_s: str) -> None:
    provider = make_provider(aws_world, state_cache_s=state_cache_s)
    calls = Calls(provider)
    spec = make_spec(aws_world)
    run(provider.ensure(spec))
    groups = list(target_groups(aws_world))

    new_node = aws_world.add_instance()
    calls.clear()
    run(provider.ensure(dataclasses.replace(spec, nodes=aws_world.nodes())))
    assert calls.writes == Counter({"RegisterTargets": len(groups)})
    registered = [p["Targets"] for n, p in calls.params if n == "RegisterTargets"]
    assert all(t == [{"Id": plan.parse_provider_id(new_node)}] for t in registered)
    if state_cache_s != "0":  # only the new instance is looked up; the NLB is not read again
        assert set(calls.names) == {"DescribeInstances", "RegisterTargets"}
        [(_, lookup)] = [(n, p) for n, p in calls.params if n == "DescribeInstances"]
        assert lookup["Filters"][0]["Values"] == [plan.parse_provider_id(new_node)]
    for arn in groups:
        assert targets(aws_world, arn) == instance_ids(aws_world)

    calls.clear()
    remaining = aws_world.nodes()[1:]
    run(provider.ensure(dataclasses.replace(spec, nodes=remaining)))
    assert calls.writes == Counter({"DeregisterTargets": len(groups)})
    for arn in groups:
        assert targets(aws_world, arn) == {plan.parse_provider_id(n) for n in remaining}
    assert len(balancers(aws_world)) == 1 and set(target_groups(aws_world)) == set(groups)
    run(provider.close())


def test_known_state_falls_back_to_a_full_ensure(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world, ports=(PortSpec("http", "TCP", 80, 30080),))
    run(provider.ensure(spec))
    # Someone removes the listener and target group by hand; the next node change notices and repairs.
    [lb] = balancers(aws_world)
    [listener] = listeners(aws_world, lb["LoadBalancerArn"]).values()
    aws_world.elbv2.delete_listener(ListenerArn=listener["ListenerArn"])
    aws_world.elbv2.delete_target_group(TargetGroupArn=forward_arn(listener))
    aws_world.add_instance()
    calls.clear()
    run(provider.ensure(dataclasses.replace(spec, nodes=aws_world.nodes())))
    assert {"RegisterTargets", "CreateTargetGroup", "CreateListener"} <= set(calls.writes)
    [listener] = listeners(aws_world, lb["LoadBalancerArn"]).values()
    assert targets(aws_world, forward_arn(listener)) == instance_ids(aws_world)


def test_local_traffic_policy_health_check(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world, external_traffic_policy="Local", health_check_node_port=32100,
                     ports=(PortSpec("http", "TCP", 80, 30080),))
    run(provider.ensure(spec))
    [group] = target_groups(aws_world).values()
    assert (group["HealthCheckProtocol"], group["HealthCheckPort"], group["HealthCheckPath"]) == (
        "HTTP", "32100", "/healthz")
    # Health checks come from the NLB, which the node group admits through the backend group.
    assert node_rules(aws_world) == {("-1", -1, backend_group(aws_world))}

    # Back to Cluster: the health check is modified in place, nothing else changes.
    calls.clear()
    run(provider.ensure(dataclasses.replace(spec, external_traffic_policy="Cluster", health_check_node_port=None)))
    [after] = target_groups(aws_world).values()
    assert after["TargetGroupArn"] == group["TargetGroupArn"]
    assert (after["HealthCheckProtocol"], after["HealthCheckPort"]) == ("TCP", "traffic-port")
    assert calls.writes == Counter({"ModifyTargetGroup": 1})


def test_internal_scheme_and_switching_scheme(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world, annotations={P + "internal": "true"})
    run(provider.ensure(spec))
    [lb] = balancers(aws_world)
    assert lb["Scheme"] == "internal"
    assert {z["SubnetId"] for z in lb["AvailabilityZones"]} == set(aws_world.internal_subnets.values())
    groups = set(target_groups(aws_world))

    calls.clear()
    status = run(provider.ensure(dataclasses.replace(spec, annotations={P + "internal": "false"})))
    [new] = balancers(aws_world)
    assert new["Scheme"] == "internet-facing" and new["LoadBalancerArn"] != lb["LoadBalancerArn"]
    assert {z["SubnetId"] for z in new["AvailabilityZones"]} == set(aws_world.public_subnets.values())
    assert status.ingress[0].hostname == new["DNSName"]
    assert set(target_groups(aws_world)) == groups  # reused
    assert {forward_arn(li) for li in listeners(aws_world, new["LoadBalancerArn"]).values()} == groups
    assert calls.writes == Counter({"DeleteLoadBalancer": 1, "CreateLoadBalancer": 1, "CreateListener": 2})


def test_source_ranges_become_security_group_rules(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world, ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("dns", "UDP", 53, 30053)),
                     source_ranges=("203.0.113.0/24", "198.51.100.7/32"))
    run(provider.ensure(spec))
    ranges = ("203.0.113.0/24", "198.51.100.7/32")
    assert frontend_rules(aws_world, spec) == {
        (proto, port, cidr) for proto, port in (("tcp", 80), ("udp", 53)) for cidr in ranges
    }
    assert node_rules(aws_world) == {("-1", -1, backend_group(aws_world))}  # node ports are not open to clients

    calls.clear()
    run(provider.ensure(dataclasses.replace(spec, source_ranges=("203.0.113.0/24",))))
    assert frontend_rules(aws_world, spec) == {("tcp", 80, "203.0.113.0/24"), ("udp", 53, "203.0.113.0/24")}
    assert calls.writes == Counter({"RevokeSecurityGroupIngress": 1})

    calls.clear()
    run(provider.ensure(dataclasses.replace(spec, source_ranges=())))
    assert frontend_rules(aws_world, spec) == {("tcp", 80, "0.0.0.0/0"), ("udp", 53, "0.0.0.0/0")}
    assert calls.writes == Counter({"AuthorizeSecurityGroupIngress": 1, "RevokeSecurityGroupIngress": 1})


def test_nodes_admit_the_shared_backend_group_once(aws_world: AwsWorld, provider: AwsProvider) -> None:
    aws_world.ec2.authorize_security_group_ingress(GroupId=aws_world.node_group, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}])
    first, second = make_spec(aws_world, uid="1111-aaaa"), make_spec(aws_world, uid="2222-bbbb", name="api")
    run(provider.ensure(first))
    run(provider.ensure(second))
    backend = backend_group(aws_world)
    assert node_rules(aws_world) == {("tcp", 22, "10.0.0.0/16"), ("-1", -1, backend)}
    for spec in (first, second):
        [lb] = balancers(aws_world, spec.name)
        assert backend in lb["SecurityGroups"]
    run(provider.delete(first.ref))
    assert plan.frontend_group_name(first.name) not in security_groups(aws_world)
    assert node_rules(aws_world) == {("tcp", 22, "10.0.0.0/16"), ("-1", -1, backend)}  # the other NLB needs it


def test_delete_removes_everything_and_is_idempotent(aws_world: AwsWorld, provider: AwsProvider) -> None:
    doomed = make_spec(aws_world, uid="dead-0000", name="old", external_traffic_policy="Local",
                       health_check_node_port=32100)
    kept = make_spec(aws_world, uid="beef-1111", name="kept",
                     ports=(PortSpec("http", "TCP", 80, 31080), PortSpec("dns", "UDP", 53, 31053)))
    run(provider.ensure(doomed))
    run(provider.ensure(kept))
    kept_groups = {a for a, g in target_groups(aws_world).items() if g["Port"] in (31080, 31053)}
    kept_rules = frontend_rules(aws_world, kept)
    assert len(balancers(aws_world)) == 2 and kept_rules and frontend_rules(aws_world, doomed)

    run(provider.delete(doomed.ref))
    assert [b["LoadBalancerName"] for b in balancers(aws_world)] == [kept.name]
    assert set(target_groups(aws_world)) == kept_groups
    assert plan.frontend_group_name(doomed.name) not in security_groups(aws_world)
    assert frontend_rules(aws_world, kept) == kept_rules
    assert run(provider.get(doomed.ref)) is None
    assert [r.name for r in run(provider.list_owned())] == [kept.name]

    run(provider.delete(doomed.ref))  # already gone: still fine
    assert run(provider.get(kept.ref)) is not None


def test_crash_between_balancer_and_listeners(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world)
    calls.fail("CreateListener", 1, lambda: RuntimeError("process killed"))
    with pytest.raises(RuntimeError):
        run(provider.ensure(spec))
    [lb] = balancers(aws_world)
    assert listeners(aws_world, lb["LoadBalancerArn"]) == {}
    groups_before = set(target_groups(aws_world))

    calls.clear()
    status = run(provider.ensure(spec))
    assert [b["LoadBalancerArn"] for b in balancers(aws_world)] == [lb["LoadBalancerArn"]]
    assert set(listeners(aws_world, lb["LoadBalancerArn"])) == {80, 443}
    assert set(target_groups(aws_world)) == groups_before and len(groups_before) == 2
    assert calls.writes == Counter({"CreateListener": 2})
    assert status.ingress[0].hostname == lb["DNSName"]


def test_crash_before_listeners_then_a_port_goes_away(aws_world: AwsWorld, provider: AwsProvider,
                                                       calls: Calls) -> None:
    spec = make_spec(aws_world)
    calls.fail("RegisterTargets", 1, lambda: RuntimeError("process killed"))
    with pytest.raises(RuntimeError):
        run(provider.ensure(spec))
    groups = set(target_groups(aws_world))
    assert len(groups) == 2
    # The port set changes before the retry: the group nobody needs any more is swept away.
    run(provider.ensure(dataclasses.replace(spec, ports=spec.ports[:1])))
    [lb] = balancers(aws_world)
    [listener] = listeners(aws_world, lb["LoadBalancerArn"]).values()
    assert set(target_groups(aws_world)) == {forward_arn(listener)} and forward_arn(listener) in groups


def test_throttling_is_retried_until_it_converges(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    spec = make_spec(aws_world)
    calls.fail("DescribeLoadBalancers", 2, throttling("DescribeLoadBalancers"))
    calls.fail("CreateTargetGroup", 3, throttling("CreateTargetGroup"))
    calls.fail("AuthorizeSecurityGroupIngress", 2, throttling("AuthorizeSecurityGroupIngress"))
    status = run(provider.ensure(spec))
    assert not any(calls.faults.values())  # every fault was hit
    assert len(balancers(aws_world)) == 1 and len(target_groups(aws_world)) == 2
    assert status.ingress[0].hostname
    assert calls.names.count("CreateTargetGroup") == 2 + 3


def test_persistent_throttling_becomes_a_transient_error(aws_world: AwsWorld) -> None:
    fast = CloudCaller(is_retryable, max_attempts=3, initial_wait_s=0.01, max_wait_s=0.05)
    provider = AwsProvider(aws_world.cluster, aws_world.client("elbv2"), aws_world.client("ec2"),
                           elbv2_caller=fast, ec2_caller=fast)
    calls = Calls(provider)
    calls.fail("CreateLoadBalancer", 10, throttling("CreateLoadBalancer"))
    with pytest.raises(TransientProviderError, match="Throttling"):
        run(provider.ensure(make_spec(aws_world)))
    assert calls.names.count("CreateLoadBalancer") == 3


def test_validation_errors_are_not_retried(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    calls.fail("CreateLoadBalancer", 5, lambda: ClientError(
        {"Error": {"Code": "ValidationError", "Message": "bad"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
        "CreateLoadBalancer"))
    with pytest.raises(TransientProviderError, match="ValidationError"):
        run(provider.ensure(make_spec(aws_world)))
    assert calls.names.count("CreateLoadBalancer") == 1


def test_annotations(aws_world: AwsWorld, provider: AwsProvider) -> None:
    acm = aws_world.client("acm")
    cert = acm.request_certificate(DomainName="shop.example.com")["CertificateArn"]
    labelled = [dataclasses.replace(n, labels={"pool": "web"}) for n in aws_world.nodes()[:2]]
    nodes = (*labelled, aws_world.nodes()[2])
    spec = make_spec(aws_world, nodes=nodes, annotations={
        P + "subnets": f"elb-{'us-east-1a'},{aws_world.public_subnets['us-east-1b']}",
        P + "additional-resource-tags": "team=shop,env=test",
        P + "target-node-labels": "pool=web",
        P + "cross-zone-load-balancing-enabled": "true",
        P + "ssl-cert": cert, P + "ssl-ports": "https",
        P + "healthcheck-interval": "20", P + "healthcheck-healthy-threshold": "5",
    })
    run(provider.ensure(spec))
    [lb] = balancers(aws_world)
    assert {z["SubnetId"] for z in lb["AvailabilityZones"]} == set(aws_world.public_subnets.values())
    assert {"team": "shop", "env": "test"}.items() <= tags(aws_world, lb["LoadBalancerArn"]).items()
    attributes = aws_world.elbv2.describe_load_balancer_attributes(LoadBalancerArn=lb["LoadBalancerArn"])
    assert {"Key": "load_balancing.cross_zone.enabled", "Value": "true"} in attributes["Attributes"]
    by_port = listeners(aws_world, lb["LoadBalancerArn"])
    assert (by_port[443]["Protocol"], by_port[443]["Certificates"][0]["CertificateArn"]) == ("TLS", cert)
    assert by_port[80]["Protocol"] == "TCP"
    for arn, group in target_groups(aws_world).items():
        assert targets(aws_world, arn) == {plan.parse_provider_id(n) for n in labelled}
        assert (group["HealthCheckIntervalSeconds"], group["HealthyThresholdCount"]) == (20, 5)
        assert {"team": "shop"}.items() <= tags(aws_world, arn).items()


def test_elastic_ips(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    allocations = [aws_world.ec2.allocate_address(Domain="vpc")["AllocationId"] for _ in range(2)]
    spec = make_spec(aws_world, annotations={P + "eip-allocations": ",".join(allocations)})
    run(provider.ensure(spec))
    [(_, created)] = [(n, p) for n, p in calls.params if n == "CreateLoadBalancer"]
    assert [m["AllocationId"] for m in created["SubnetMappings"]] == allocations
    assert len(balancers(aws_world)) == 1


def _unknown_allocation(world: AwsWorld) -> LoadBalancerSpec:
    unknown = "eipalloc-00000000000000001,eipalloc-00000000000000002"
    return make_spec(world, annotations={P + "eip-allocations": unknown})


BAD_SPECS: list[tuple[str, Callable[[AwsWorld], LoadBalancerSpec], str]] = [
    ("internal not a boolean", lambda w: make_spec(w, annotations={P + "internal": "yes"}),
     f"metadata.annotations[{P}internal]"),
    ("unknown subnet", lambda w: make_spec(w, annotations={P + "subnets": "subnet-0123456789abcdef0"}),
     f"metadata.annotations[{P}subnets]"),
    ("unknown subnet name", lambda w: make_spec(w, annotations={P + "subnets": "nope"}),
     f"metadata.annotations[{P}subnets]"),
    ("invalid CIDR", lambda w: make_spec(w, source_ranges=("10.0.0.0/33",)), "spec.loadBalancerSourceRanges[0]"),
    ("node without providerID", lambda w: make_spec(w, nodes=(*w.nodes(), NodeTarget("bare-node"))),
     "spec.nodes[bare-node].spec.providerID"),
    ("non-AWS providerID", lambda w: make_spec(w, nodes=(NodeTarget("kind", "kind://docker/kind/n1"),)),
     "spec.nodes[kind].spec.providerID"),
    ("SCTP", lambda w: make_spec(w, ports=(PortSpec("a", "TCP", 80, 30080), PortSpec("s", "SCTP", 9, 30009))),
     "spec.ports[1].protocol"),
    ("51 listeners", lambda w: make_spec(w, ports=tuple(PortSpec(f"p{i}", "TCP", 100 + i, 30100 + i)
                                                        for i in range(51))), "spec.ports"),
    ("unknown Elastic IP", _unknown_allocation, f"metadata.annotations[{P}eip-allocations]"),
    ("bad health check", lambda w: make_spec(w, annotations={P + "healthcheck-timeout": "1"}),
     f"metadata.annotations[{P}healthcheck-timeout]"),
]


@pytest.mark.parametrize(("case", "make", "field"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_input_leaves_nothing_in_aws(
    aws_world: AwsWorld, provider: AwsProvider, calls: Calls, case: str,
    make: Callable[[AwsWorld], LoadBalancerSpec], field: str,
) -> None:
    groups_before = set(security_groups(aws_world))
    rules_before = node_rules(aws_world)
    with pytest.raises(InvalidServiceError) as caught:
        run(provider.ensure(make(aws_world)))
    assert caught.value.field == field, case
    assert caught.value.fix
    assert not calls.writes, calls.names
    assert balancers(aws_world) == [] and target_groups(aws_world) == {}
    assert set(security_groups(aws_world)) == groups_before and node_rules(aws_world) == rules_before


def test_bad_input_on_an_existing_balancer_changes_nothing(
    aws_world: AwsWorld, provider: AwsProvider, calls: Calls
) -> None:
    spec = make_spec(aws_world)
    run(provider.ensure(spec))
    calls.clear()
    with pytest.raises(InvalidServiceError):
        run(provider.ensure(dataclasses.replace(spec, annotations={P + "subnets": "subnet-0123456789abcdef0"})))
    assert not calls.writes
    assert len(balancers(aws_world)) == 1 and len(target_groups(aws_world)) == 2


# ─── dual-stack NLBs ────────────────────────────────────────────────────────────────────────────
# What moto does not model (so these tests cannot show it): it accepts IpAddressType=dualstack on
# subnets without IPv6 and UDP listeners on a dualstack NLB (AWS refuses the first; the second is
# refused by lbctl's plan before any call), gives the NLB no IPv6 addresses, and reports a subnet's
# Ipv6CidrBlockState.State as the text of a dict. The provider's own checks are what is tested.

DUALSTACK = {plan.ANN_IP_ADDRESS_TYPE: "dualstack"}


def test_dualstack_balancer_uses_only_subnets_with_ipv6(aws_world: AwsWorld, forgetful: AwsProvider) -> None:
    provider, calls = forgetful, Calls(forgetful)  # reads AWS on every ensure: subnets change behind it
    zone_a, zone_b = sorted(aws_world.public_subnets)
    v6_subnet = aws_world.public_subnets[zone_a]
    aws_world.enable_ipv6(v6_subnet)
    spec = make_spec(aws_world, annotations=DUALSTACK,
                     source_ranges=("203.0.113.0/24", "2001:db8:1::/48"))
    status = run(provider.ensure(spec))

    [lb] = balancers(aws_world)
    assert lb["IpAddressType"] == "dualstack"
    assert {z["SubnetId"] for z in lb["AvailabilityZones"]} == {v6_subnet}  # zone_b's subnet has no IPv6
    [ingress] = status.ingress
    assert ingress.hostname == lb["DNSName"] and ingress.ip is None
    # Instance targets: IPv4 target groups, which a dualstack NLB's TCP listeners may use.
    for group in target_groups(aws_world).values():
        assert group.get("IpAddressType", "ipv4") == "ipv4" and group["TargetType"] == "instance"
        assert targets(aws_world, group["TargetGroupArn"]) == instance_ids(aws_world)
    # Source ranges of both families on the NLB's own group: IpRanges and Ipv6Ranges.
    assert frontend_rules(aws_world, spec) == {
        ("tcp", port, cidr) for port in (80, 443) for cidr in ("203.0.113.0/24", "2001:db8:1::/48")
    }
    group = security_groups(aws_world)[plan.frontend_group_name(spec.name)]
    by_port = {p["FromPort"]: p for p in group["IpPermissions"]}
    assert [r["CidrIpv6"] for r in by_port[80]["Ipv6Ranges"]] == ["2001:db8:1::/48"]
    assert [r["CidrIp"] for r in by_port[80]["IpRanges"]] == ["203.0.113.0/24"]

    # Without source ranges, clients of both families are admitted.
    run(provider.ensure(dataclasses.replace(spec, source_ranges=())))
    assert frontend_rules(aws_world, spec) == {
        ("tcp", port, cidr) for port in (80, 443) for cidr in ("0.0.0.0/0", "::/0")
    }

    # Once zone_b's subnet gets IPv6 too, the NLB spreads to it with SetSubnets.
    aws_world.enable_ipv6(aws_world.public_subnets[zone_b])
    calls.clear()
    run(provider.ensure(dataclasses.replace(spec, source_ranges=())))
    [lb] = balancers(aws_world)
    assert {z["SubnetId"] for z in lb["AvailabilityZones"]} == set(aws_world.public_subnets.values())
    assert calls.writes == Counter({"SetSubnets": 1})


def test_changing_the_ip_address_type_keeps_the_balancer(
    aws_world: AwsWorld, provider: AwsProvider, calls: Calls
) -> None:
    aws_world.enable_ipv6(*aws_world.public_subnets.values())
    spec = make_spec(aws_world)
    run(provider.ensure(spec))
    [before] = balancers(aws_world)
    assert before["IpAddressType"] == "ipv4"

    calls.clear()
    status = run(provider.ensure(dataclasses.replace(spec, annotations=DUALSTACK)))
    [after] = balancers(aws_world)
    assert (after["LoadBalancerArn"], after["IpAddressType"]) == (before["LoadBalancerArn"], "dualstack")
    assert status.ingress[0].hostname == before["DNSName"]
    # In place: SetIpAddressType, and ::/0 joins the frontend group; nothing is recreated.
    assert calls.writes == Counter({"SetIpAddressType": 1, "AuthorizeSecurityGroupIngress": 1})
    assert ("SetIpAddressType", {"LoadBalancerArn": before["LoadBalancerArn"], "IpAddressType": "dualstack"}) \
        in calls.params

    calls.clear()
    run(provider.ensure(spec))  # the annotation removed: back to ipv4, ::/0 revoked
    [back] = balancers(aws_world)
    assert (back["LoadBalancerArn"], back["IpAddressType"]) == (before["LoadBalancerArn"], "ipv4")
    assert calls.writes == Counter({"SetIpAddressType": 1, "RevokeSecurityGroupIngress": 1})
    assert frontend_rules(aws_world, spec) == {("tcp", 80, "0.0.0.0/0"), ("tcp", 443, "0.0.0.0/0")}


def test_dualstack_without_ipv6_subnets_is_refused_before_any_write(
    aws_world: AwsWorld, provider: AwsProvider, calls: Calls
) -> None:
    spec = make_spec(aws_world, annotations=DUALSTACK)
    with pytest.raises(InvalidServiceError) as caught:
        run(provider.ensure(spec))
    assert caught.value.field == f"metadata.annotations[{plan.ANN_IP_ADDRESS_TYPE}]"
    for subnet in aws_world.public_subnets.values():
        assert subnet in caught.value.problem
    assert "remove the annotation" in (caught.value.fix or "")
    assert not calls.writes and balancers(aws_world) == []

    # Subnets named in the annotation must each have IPv6.
    zone_a, zone_b = sorted(aws_world.public_subnets)
    v6 = aws_world.public_subnets[zone_a]
    aws_world.enable_ipv6(v6)
    listed = {**DUALSTACK, P + "subnets": ",".join(aws_world.public_subnets.values())}
    with pytest.raises(InvalidServiceError) as caught:
        run(provider.ensure(make_spec(aws_world, annotations=listed)))
    assert aws_world.public_subnets[zone_b] in caught.value.problem and v6 not in caught.value.problem
    assert not calls.writes

    # An existing ipv4 NLB is left as it is when the switch cannot be made.
    run(provider.ensure(make_spec(aws_world)))
    calls.clear()
    with pytest.raises(InvalidServiceError):
        run(provider.ensure(make_spec(aws_world, annotations=listed)))
    assert not calls.writes and balancers(aws_world)[0]["IpAddressType"] == "ipv4"


def test_dualstack_refusals_leave_nothing(aws_world: AwsWorld, provider: AwsProvider, calls: Calls) -> None:
    aws_world.enable_ipv6(*aws_world.public_subnets.values())
    udp = make_spec(aws_world, annotations=DUALSTACK,
                    ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("dns", "UDP", 53, 30053)))
    ipv6_range_on_ipv4 = make_spec(aws_world, source_ranges=("203.0.113.0/24", "2001:db8::/32"))
    bad_value = make_spec(aws_world, annotations={plan.ANN_IP_ADDRESS_TYPE: "ipv6"})
    for spec, field in ((udp, "spec.ports[1].protocol"),
                        (ipv6_range_on_ipv4, "spec.loadBalancerSourceRanges[1]"),
                        (bad_value, f"metadata.annotations[{plan.ANN_IP_ADDRESS_TYPE}]")):
        with pytest.raises(InvalidServiceError) as caught:
            run(provider.ensure(spec))
        assert caught.value.field == field and caught.value.fix
    assert not calls.writes and balancers(aws_world) == [] and target_groups(aws_world) == {}
