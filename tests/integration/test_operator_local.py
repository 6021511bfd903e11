"""The operator with the local provider against the real control plane: scope, finalizer,
status, Events, conditions, pools, restarts, and every kind of bad input."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from lbctl.dev import controlplane
from lbctl.model.scope import FINALIZER
from tests.integration.harness import (
    LOCAL_CLASS,
    POOL_CRD,
    OperatorProcess,
    Pools,
    condition,
    events,
    ingress_ips,
    lb_service,
    stop_process,
    wait_for_condition,
    wait_for_event,
    wait_for_ips,
    wait_until,
)


def _service(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Service:
    return core.read_namespaced_service(name, namespace)


def _delete_namespace(core: client.CoreV1Api, name: str) -> None:
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _gone(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_service(name, namespace)
    except ApiException as exc:
        return exc.status == 404
    return False


# ---- 1, 2: scope, finalizer, lifecycle -------------------------------------------------------------


def test_a_service_of_our_class_gets_an_address_status_events_and_condition(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.200.10-198.18.200.12"])
    core.create_namespaced_service(namespace, lb_service("web", [80, (53, "UDP")]))
    wait_for_ips(core, namespace, "web")
    service = _service(core, namespace, "web")
    ingress = service.status.load_balancer.ingress
    assert [(i.ip, i.ip_mode) for i in ingress] == [("198.18.200.10", "VIP")]
    assert sorted((p.port, p.protocol) for p in ingress[0].ports) == [(53, "UDP"), (80, "TCP")]
    assert service.metadata.finalizers == [FINALIZER]  # ours only, no kopf finalizer beside it
    ready = wait_for_condition(core, namespace, "web", "True", "LoadBalancerEnsured")
    assert "198.18.200.10" in ready.message
    reasons = [e[1] for e in events(core, namespace, "web") if e[1].endswith("LoadBalancer")]
    assert reasons == ["EnsuringLoadBalancer", "EnsuredLoadBalancer"]


def test_other_classes_and_classless_services_are_never_touched(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create([pools.fresh_v4(28)])
    core.create_namespaced_service(namespace, lb_service("theirs", lb_class="example.com/other"))
    core.create_namespaced_service(namespace, lb_service("classless", lb_class=None))
    core.create_namespaced_service(namespace, lb_service("ours"))
    wait_for_ips(core, namespace, "ours")
    for name in ("theirs", "classless"):
        service = _service(core, namespace, name)
        assert not service.metadata.finalizers
        assert not service.status.load_balancer.ingress and not service.status.conditions
        assert events(core, namespace, name) == [] or all(e[1] not in (
            "EnsuringLoadBalancer", "EnsuredLoadBalancer") for e in events(core, namespace, name))


def test_default_class_takes_classless_services_too_and_flags_come_from_the_environment(
    core: client.CoreV1Api, namespace: str, pools: Pools, start_operator: Callable[..., OperatorProcess]
) -> None:
    pools.create([pools.fresh_v4(28)], wait_seen=False)  # no operator yet: it lists pools when it starts
    start_operator(env={"LBCTL_PROVIDER": "local", "LBCTL_DEFAULT_CLASS": "true"})
    core.create_namespaced_service(namespace, lb_service("classless", lb_class=None))
    core.create_namespaced_service(namespace, lb_service("theirs", lb_class="example.com/other"))
    wait_for_ips(core, namespace, "classless")
    assert not _service(core, namespace, "theirs").metadata.finalizers


def test_deleting_a_service_releases_its_address_and_removes_the_finalizer(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.201.7/32"])
    core.create_namespaced_service(namespace, lb_service("first"))
    assert wait_for_ips(core, namespace, "first") == ["198.18.201.7"]
    core.delete_namespaced_service("first", namespace)
    wait_until(lambda: _gone(core, namespace, "first"), what="service deleted after finalizer removal")
    core.create_namespaced_service(namespace, lb_service("second"))
    assert wait_for_ips(core, namespace, "second") == ["198.18.201.7"]


def test_changing_the_type_away_releases_the_balancer_and_clears_the_status(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.202.1/32"])
    core.create_namespaced_service(namespace, lb_service("web"))
    wait_for_ips(core, namespace, "web")
    core.patch_namespaced_service("web", namespace, [
        {"op": "replace", "path": "/spec/type", "value": "ClusterIP"},
        {"op": "remove", "path": "/spec/loadBalancerClass"},
    ])

    def released() -> bool:
        service = _service(core, namespace, "web")
        return not service.metadata.finalizers and not service.status.load_balancer.ingress \
            and condition(core, namespace, "web") is None

    wait_until(released, what="finalizer, ingress and condition removed")
    assert ("lbctl.io/load-balancer-class" not in (_service(core, namespace, "web").metadata.annotations or {}))
    wait_for_event(core, namespace, "web", "DeletedLoadBalancer")
    core.create_namespaced_service(namespace, lb_service("next"))
    assert wait_for_ips(core, namespace, "next") == ["198.18.202.1"]


def test_a_service_deleted_while_the_operator_was_down_is_cleaned_up_when_it_returns(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pool = pools.create(["198.18.203.1/32"])
    core.create_namespaced_service(namespace, lb_service("web"))
    wait_for_ips(core, namespace, "web")
    operator.stop()
    core.delete_namespaced_service("web", namespace)
    assert not _gone(core, namespace, "web")  # held by the finalizer while nobody releases it
    operator.start()
    wait_until(lambda: _gone(core, namespace, "web"), what="service released after restart")
    wait_until(lambda: pools.get(pool["metadata"]["name"]).get("status", {}).get("assigned") == 0,
               what="pool shows the address free again")


def test_a_restart_in_the_middle_of_provisioning_converges_without_duplicates(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pool = pools.create([pools.fresh_v4(26)])
    names = [f"s{i}" for i in range(30)]
    for name in names:
        core.create_namespaced_service(namespace, lb_service(name))
    wait_until(lambda: any(ingress_ips(core, namespace, n) for n in names), what="some provisioning done")
    operator.kill()  # SIGKILL mid-burst
    operator.start()
    addresses = [wait_for_ips(core, namespace, n)[0] for n in names]
    assert len(set(addresses)) == len(names), "two Services were given the same address"
    wait_until(lambda: pools.get(pool["metadata"]["name"]).get("status", {}).get("assigned") == len(names),
               what="pool counts every address once")
    before = {n: _service(core, namespace, n).metadata.resource_version for n in names}
    operator.stop()
    operator.start()  # a second restart keeps every address and writes nothing
    core.create_namespaced_service(namespace, lb_service("late"))
    assert wait_for_ips(core, namespace, "late")[0] not in addresses
    assert {n: _service(core, namespace, n).metadata.resource_version for n in names} == before


# ---- 7: pools ---------------------------------------------------------------------------------------


def test_requested_addresses_pools_and_metallb_annotations(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.204.0/28"], name=f"auto-{namespace}")
    pools.create(["198.18.205.0/28"], name=f"manual-{namespace}", autoAssign=False)
    core.create_namespaced_service(namespace, lb_service("by-field", loadBalancerIP="198.18.204.9"))
    core.create_namespaced_service(namespace, lb_service(
        "by-annotation", annotations={"lbctl.io/load-balancer-ips": "198.18.205.3"}))
    core.create_namespaced_service(namespace, lb_service(
        "by-metallb", annotations={"metallb.io/loadBalancerIPs": "198.18.204.11"}))
    core.create_namespaced_service(namespace, lb_service(
        "by-pool", annotations={"lbctl.io/address-pool": f"manual-{namespace}"}))
    core.create_namespaced_service(namespace, lb_service("auto"))
    assert wait_for_ips(core, namespace, "by-field") == ["198.18.204.9"]
    assert wait_for_ips(core, namespace, "by-annotation") == ["198.18.205.3"]
    assert wait_for_ips(core, namespace, "by-metallb") == ["198.18.204.11"]
    assert ipaddress.ip_address(wait_for_ips(core, namespace, "by-pool")[0]) in ipaddress.ip_network("198.18.205.0/28")
    assert ipaddress.ip_address(wait_for_ips(core, namespace, "auto")[0]) in ipaddress.ip_network("198.18.204.0/28")


def test_sharing_an_address_with_disjoint_ports(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.206.0/30"])
    shared = {"lbctl.io/allow-shared-ip": "dns"}
    core.create_namespaced_service(namespace, lb_service("dns-tcp", [53], annotations=shared))
    core.create_namespaced_service(namespace, lb_service("dns-udp", [(53, "UDP")], annotations=shared))
    assert wait_for_ips(core, namespace, "dns-tcp") == wait_for_ips(core, namespace, "dns-udp")


def test_dual_stack_services_get_one_address_per_family(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create([pools.fresh_v4(28), pools.fresh_v6()])
    core.create_namespaced_service(namespace, lb_service("both", ipFamilyPolicy="RequireDualStack",
                                                         ipFamilies=["IPv4", "IPv6"]))
    ips = wait_for_ips(core, namespace, "both", count=2)
    assert [ipaddress.ip_address(ip).version for ip in ips] == [4, 6]


def test_shrinking_a_pool_rehomes_the_services_it_no_longer_covers(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    name = f"shrink-{namespace}"
    pools.create(["198.18.207.1-198.18.207.2"], name=name)
    core.create_namespaced_service(namespace, lb_service("a", loadBalancerIP="198.18.207.2"))
    assert wait_for_ips(core, namespace, "a") == ["198.18.207.2"]
    core.create_namespaced_service(namespace, lb_service("b", annotations={"lbctl.io/address-pool": name}))
    assert wait_for_ips(core, namespace, "b") == ["198.18.207.1"]
    pools.patch(name, {"addresses": ["198.18.207.2/32"]})  # b's address leaves the pool
    wait_until(lambda: ingress_ips(core, namespace, "b") != ["198.18.207.1"], what="b re-homed")
    wait_for_condition(core, namespace, "b", "False")  # its pool is full now: it waits, and says so
    assert "198.18.207.1" not in ingress_ips(core, namespace, "b")
    assert ingress_ips(core, namespace, "a") == ["198.18.207.2"]
    warning = wait_for_event(core, namespace, "b", "SyncLoadBalancerFailed")
    assert name in warning[2]


def test_deleting_a_pool_moves_its_services_to_another_pool_with_an_event(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    first = pools.create(["198.18.215.1/32"], priority=1)
    pools.create(["198.18.216.1/32"], priority=2)
    core.create_namespaced_service(namespace, lb_service("web"))
    assert wait_for_ips(core, namespace, "web") == ["198.18.215.1"]
    pools.delete(first["metadata"]["name"])
    wait_until(lambda: ingress_ips(core, namespace, "web") == ["198.18.216.1"], what="moved to the second pool")
    moved = wait_for_event(core, namespace, "web", "UpdatedLoadBalancer")
    assert "198.18.215.1" in moved[2] and "198.18.216.1" in moved[2]


def test_pool_status_counts_assigned_and_free(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pool = pools.create(["198.18.209.0/29"])
    for name in ("a", "b", "c"):
        core.create_namespaced_service(namespace, lb_service(name))
    for name in ("a", "b", "c"):
        wait_for_ips(core, namespace, name)
    status = wait_until(lambda: (s := pools.get(pool["metadata"]["name"]).get("status", {})).get("assigned") == 3
                        and s, what="pool status")
    assert status["free"] == 5
    assert status["conditions"][0]["status"] == "True"


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_requests_get_an_event_and_a_false_condition_naming_the_field_and_others_keep_working(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.210.0/29"], name=f"bad-{namespace}")
    core.create_namespaced_service(namespace, lb_service("holder", loadBalancerIP="198.18.210.5"))
    wait_for_ips(core, namespace, "holder")
    cases = {
        "outside": (lb_service("outside", loadBalancerIP="203.0.113.50"), "spec.loadBalancerIP"),
        "malformed": (lb_service("malformed", annotations={"lbctl.io/load-balancer-ips": "10.0.0.300"}),
                      "lbctl.io/load-balancer-ips"),
        "taken": (lb_service("taken", loadBalancerIP="198.18.210.5"), "198.18.210.5"),
        "disagree": (lb_service("disagree", loadBalancerIP="198.18.210.2",
                                annotations={"lbctl.io/load-balancer-ips": "198.18.210.3"}),
                     "lbctl.io/load-balancer-ips"),
        "unknown-pool": (lb_service("unknown-pool", annotations={"lbctl.io/address-pool": "nope"}),
                         "lbctl.io/address-pool"),
        "bad-cidr": (lb_service("bad-cidr", loadBalancerSourceRanges=["10.0.0.0/8", "not-a-cidr"]), None),
        "v6-range": (lb_service("v6-range", loadBalancerSourceRanges=["10.0.0.0/8", "2001:db8::/64"]),
                     "spec.loadBalancerSourceRanges[1]"),
    }
    for body, _field in cases.values():
        try:
            core.create_namespaced_service(namespace, body)
        except ApiException as exc:  # the apiserver validates source ranges itself
            assert exc.status == 422 and body["metadata"]["name"] == "bad-cidr"
    for name, (_body, field) in cases.items():
        if field is None:
            continue
        found = wait_for_condition(core, namespace, name, "False")
        assert field in found.message, (name, found.message)
        assert "fix" in found.message, (name, found.message)
        warning = wait_for_event(core, namespace, name, "SyncLoadBalancerFailed")
        assert field in warning[2]
    core.create_namespaced_service(namespace, lb_service("fine"))
    assert wait_for_ips(core, namespace, "fine")
    assert operator.alive()


def test_sharing_with_overlapping_ports_is_refused_naming_the_annotation(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.211.1/32"])
    shared = {"lbctl.io/allow-shared-ip": "web"}
    core.create_namespaced_service(namespace, lb_service("one", [80], annotations=shared))
    wait_for_ips(core, namespace, "one")
    core.create_namespaced_service(namespace, lb_service("two", [80], annotations=shared))
    found = wait_for_condition(core, namespace, "two", "False")
    assert "lbctl.io/allow-shared-ip" in found.message and "80" in found.message


def test_an_exhausted_pool_makes_services_wait_until_an_address_is_freed(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create(["198.18.212.1/32"])
    core.create_namespaced_service(namespace, lb_service("first"))
    wait_for_ips(core, namespace, "first")
    core.create_namespaced_service(namespace, lb_service("waiting"))
    pending = wait_for_condition(core, namespace, "waiting", "False")
    assert "fix" in pending.message
    core.delete_namespaced_service("first", namespace)
    assert wait_for_ips(core, namespace, "waiting", timeout=10) == ["198.18.212.1"]
    wait_for_condition(core, namespace, "waiting", "True")


def test_overlapping_pools_are_reported_on_the_pool(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    # creationTimestamp has one-second resolution; on a tie the name decides, so name them in order
    older = pools.create(["198.18.213.0/28"], name=f"ovl-a-{namespace}")
    newer = pools.create(["198.18.213.8/29"], name=f"ovl-b-{namespace}")

    def rejected() -> dict[str, str] | None:
        conditions = pools.get(newer["metadata"]["name"]).get("status", {}).get("conditions") or [{}]
        return conditions[0] if conditions[0].get("status") == "False" else None

    found = wait_until(rejected, what="the newer pool marked not Ready")
    assert found["reason"] == "OverlappingPool" and "spec.addresses[0]" in found["message"]
    assert older["metadata"]["name"] in found["message"]
    # the Event is posted after the status write, so it may land a moment later
    wait_for_event(core, "default", newer["metadata"]["name"], "OverlappingPool")
    core.create_namespaced_service(namespace, lb_service("web"))
    assert ipaddress.ip_address(wait_for_ips(core, namespace, "web")[0]) in ipaddress.ip_network("198.18.213.0/28")


def test_services_are_held_up_by_nothing_but_their_own_errors(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    """Fifty invalid Services do not delay a valid one behind them."""
    pools.create(["198.18.214.0/28"])
    for i in range(50):
        core.create_namespaced_service(namespace, lb_service(f"bad{i}", loadBalancerIP="203.0.113.1"))
    core.create_namespaced_service(namespace, lb_service("good"))
    assert wait_for_ips(core, namespace, "good", timeout=10)
    assert operator.alive()
    assert LOCAL_CLASS in operator.log()


def test_namespace_flags_limit_the_operator_to_those_namespaces(
    core: client.CoreV1Api, namespace: str, pools: Pools, start_operator: Callable[..., OperatorProcess],
    request: pytest.FixtureRequest,
) -> None:
    elsewhere = f"{namespace}-else"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=elsewhere)))
    request.addfinalizer(lambda: _delete_namespace(core, elsewhere))
    pools.create([pools.fresh_v4(28)], wait_seen=False)
    pools.create([pools.fresh_v4(28)], namespaces=[elsewhere], wait_seen=False)
    start_operator("--namespace", elsewhere)
    core.create_namespaced_service(namespace, lb_service("outside"))
    core.create_namespaced_service(elsewhere, lb_service("inside"))
    # the operator is up and serves its namespace: it has had its chance to act on "outside"
    assert wait_for_ips(core, elsewhere, "inside")
    untouched = _service(core, namespace, "outside")
    assert not untouched.metadata.finalizers and not untouched.status.load_balancer.ingress
    start_operator("--namespace", namespace)
    assert wait_for_ips(core, namespace, "outside")
    service = _service(core, namespace, "outside")
    assert service.metadata.finalizers == [FINALIZER]


def test_a_missing_pool_crd_is_named_and_the_operator_starts_once_it_is_installed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On a cluster of its own, which has never had the CRD."""
    info = controlplane.up(tmp_path / "cp")
    try:
        operator = OperatorProcess(info, tmp_path, ["--provider", "local"], {},
                                   on_start=lambda proc: request.addfinalizer(lambda: stop_process(proc)))
        operator.start(wait=False)
        wait_until(lambda: "install its CRD" in operator.log(), what="the missing CRD named in the log")
        assert "crd-loadbalancerpool.yaml" in operator.log() and operator.alive()
        with config.new_client_from_config(config_file=info.kubeconfig) as api:
            extensions = client.ApiextensionsV1Api(api)
            extensions.create_custom_resource_definition(yaml.safe_load(POOL_CRD.read_text()))
        wait_until(lambda: "started:" in operator.log(), timeout=30, what="start-up once the CRD exists")
        operator.stop()
    finally:
        controlplane.down(tmp_path / "cp")
