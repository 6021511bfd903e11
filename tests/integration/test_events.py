"""Events and wake-ups on the real control plane with the operator process (local provider): no
Event lost to a crash, repeats folded into one Event with a count, and a pending Service woken
only by a change that can help it."""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client

from lbctl.lab.kube import holds_for
from tests.integration.harness import (
    OperatorProcess,
    Pools,
    ingress_ips,
    lb_service,
    wait_for_condition,
    wait_for_event,
    wait_for_ips,
    wait_until,
)


def our_events(core: client.CoreV1Api, namespace: str) -> dict[str, list[client.CoreV1Event]]:
    """The namespace's Events from lbctl, by Service name, in the order they were created."""
    found: dict[str, list[client.CoreV1Event]] = defaultdict(list)
    items = core.list_namespaced_event(namespace).items
    for event in sorted(items, key=lambda e: int(e.metadata.resource_version)):
        if event.source and event.source.component == "lbctl":
            found[event.involved_object.name].append(event)
    return found


def snapshot(core: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str]]:
    """A Service's Event objects (a count going up on one of them is no new Event: the safety-net
    retry of a waiting Service, at 30 s or later, may add to its Warning)."""
    return [(e.metadata.name, e.reason) for e in our_events(core, namespace).get(name, [])]


def served(core: client.CoreV1Api, namespace: str) -> set[str]:
    return {s.metadata.name for s in core.list_namespaced_service(namespace).items
            if s.status.load_balancer.ingress}


def woken(operator: OperatorProcess, key: str) -> int:
    return len(re.findall(rf"\b{re.escape(key)} woken:", operator.log()))


def test_a_burst_with_two_kill_9s_ends_with_one_ensured_event_per_service(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create([pools.fresh_v4(24), pools.fresh_v4(24)])
    names = [f"s{i:03d}" for i in range(300)]
    with ThreadPoolExecutor(8) as creators:
        burst = creators.map(lambda n: core.create_namespaced_service(namespace, lb_service(n)), names)
        wait_until(lambda: len(served(core, namespace)) >= 40, timeout=60, what="the burst under way")

        def ensured_events() -> int:
            return sum(e.reason == "EnsuredLoadBalancer" for found in our_events(core, namespace).values()
                       for e in found)
        # 20 of them to erase below (served Services are ahead of their Events, which are posted in
        # the background: 40 served once came with 17 Events)
        wait_until(lambda: ensured_events() >= 20, timeout=60, what="20 EnsuredLoadBalancer Events posted")
        operator.kill()  # kill -9, with Events still queued
        # Whatever the kill took, make the loss certain: 20 Services that have their address lose
        # their Ensured Event too, as if it had still been queued. Only the restart's repair (it
        # derives the Event from the condition) can give it back: a re-sync of a served Service
        # records nothing.
        erased = [e for n, found in our_events(core, namespace).items() for e in found
                  if e.reason == "EnsuredLoadBalancer"][:20]
        assert len(erased) == 20
        for event in erased:
            core.delete_namespaced_event(event.metadata.name, namespace)
        operator.start()
        repaired = [int(n) for n in re.findall(r"recorded (\d+) events that an earlier run did not get to post",
                                               operator.log())]
        assert sum(repaired) >= len(erased), operator.log()
        reached = len(served(core, namespace))
        wait_until(lambda: len(served(core, namespace)) >= min(reached + 60, 260), timeout=60,
                   what="the burst under way again")
        operator.kill()
        operator.start()
        list(burst)
    wait_until(lambda: len(served(core, namespace)) == len(names), timeout=120, what="every Service served")

    def every_service_has_its_ensured_event() -> bool:
        found = our_events(core, namespace)
        return all(any(e.reason == "EnsuredLoadBalancer" for e in found.get(n, [])) for n in names)

    wait_until(every_service_has_its_ensured_event, timeout=60, what="an EnsuredLoadBalancer Event per Service")
    found = our_events(core, namespace)
    ensured = {n: [e for e in found[n] if e.reason == "EnsuredLoadBalancer"] for n in names}
    doubled = {n: len(e) for n, e in ensured.items() if len(e) != 1}
    assert not doubled, f"Services with more than one EnsuredLoadBalancer Event: {doubled}"
    counted = {n: e[0].count for n, e in ensured.items() if e[0].count != 1}
    assert not counted, f"EnsuredLoadBalancer Events recorded more than once: {counted}"
    for event in erased:  # given back, for the address the Service has
        name = event.involved_object.name
        (again,) = ensured[name]
        assert again.metadata.name != event.metadata.name
        assert again.message == f"Ensured load balancer at {ingress_ips(core, namespace, name)[0]}"
    assert all(found[n] for n in names), "a Service without any Event"
    addresses = [ingress_ips(core, namespace, n)[0] for n in names]
    assert len(set(addresses)) == len(names)


def test_unrelated_deletions_give_a_dual_stack_pending_service_no_new_event(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create([pools.fresh_v4(26)])  # IPv4 only
    core.create_namespaced_service(namespace, lb_service(
        "dual", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]))
    pending = wait_for_condition(core, namespace, "dual", "False", "Pending")
    assert "IPv4 and IPv6" in pending.message
    wait_for_event(core, namespace, "dual", "SyncLoadBalancerFailed", "IPv4 and IPv6")
    before = snapshot(core, namespace, "dual")
    assert [reason for _name, reason in before] == ["EnsuringLoadBalancer", "SyncLoadBalancerFailed"]

    others = [f"other{i}" for i in range(20)]
    for name in others:
        core.create_namespaced_service(namespace, lb_service(name))
    for name in others:
        wait_for_ips(core, namespace, name)
    for name in others:
        core.delete_namespaced_service(name, namespace)
    wait_until(lambda: not {s.metadata.name for s in core.list_namespaced_service(namespace).items} & set(others),
               what="the 20 Services released and gone")
    wait_until(lambda: all(any(e.reason == "DeletedLoadBalancer" for e in our_events(core, namespace).get(n, []))
                           for n in others), what="every release recorded")
    assert snapshot(core, namespace, "dual") == before
    assert woken(operator, f"{namespace}/dual") == 0


def test_a_bad_annotation_repeats_one_warning_event_with_a_count(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pools.create([pools.fresh_v4(28)])
    core.create_namespaced_service(namespace, lb_service(
        "bad", annotations={"lbctl.io/load-balancer-ips": "10.0.0.300"}))

    def warnings() -> list[client.CoreV1Event]:
        return [e for e in our_events(core, namespace).get("bad", []) if e.type == "Warning"]

    def reasons() -> list[str]:
        return [e.reason for e in our_events(core, namespace).get("bad", [])]

    wait_until(warnings, what="the first Warning")
    # left alone for 60 s: one Warning object throughout, its count going up with each retry
    holds_for(lambda: reasons() == ["EnsuringLoadBalancer", "SyncLoadBalancerFailed"], 60.0,
              "one Ensuring and one Warning Event")
    (warning,) = warnings()
    assert warning.reason == "SyncLoadBalancerFailed" and "lbctl.io/load-balancer-ips" in warning.message
    # retries back off from 10 s, doubling, ±20 %: attempts at 0, 8-12, 24-36, 56-84 s
    assert 2 <= warning.count <= 4, warning.count
    assert warning.last_timestamp > warning.first_timestamp
    condition = wait_for_condition(core, namespace, "bad", "False", "InvalidConfiguration")
    assert "lbctl.io/load-balancer-ips" in condition.message


def test_a_freed_address_wakes_only_the_services_waiting_for_its_pool(
    core: client.CoreV1Api, namespace: str, pools: Pools, start_operator: Callable[..., OperatorProcess]
) -> None:
    operator = start_operator()
    first, second = f"one-{namespace}", f"two-{namespace}"
    pools.create([pools.fresh_v4(32)], name=first)
    pools.create([pools.fresh_v4(32)], name=second)
    for name, pool in (("holder-1", first), ("holder-2", second)):
        core.create_namespaced_service(namespace, lb_service(name, annotations={"lbctl.io/address-pool": pool}))
        wait_for_ips(core, namespace, name)
    for name, pool in (("waiter-1", first), ("waiter-2", second)):
        core.create_namespaced_service(namespace, lb_service(name, annotations={"lbctl.io/address-pool": pool}))
        found = wait_for_condition(core, namespace, name, "False", "Pending")
        assert pool in found.message
    wait_until(lambda: all(snapshot(core, namespace, n) for n in ("waiter-1", "waiter-2")), what="their Warnings")
    other_before = snapshot(core, namespace, "waiter-2")

    holder_ip = ingress_ips(core, namespace, "holder-1")
    core.delete_namespaced_service("holder-1", namespace)
    assert wait_for_ips(core, namespace, "waiter-1") == holder_ip
    wait_for_condition(core, namespace, "waiter-1", "True")
    assert woken(operator, f"{namespace}/waiter-1") == 1
    assert f"{namespace}/holder-1 freed {holder_ip[0]}" in operator.log()
    assert woken(operator, f"{namespace}/waiter-2") == 0
    assert snapshot(core, namespace, "waiter-2") == other_before
    assert not ingress_ips(core, namespace, "waiter-2")


def test_only_a_pool_change_that_may_serve_a_waiting_service_wakes_it(
    core: client.CoreV1Api, namespace: str, pools: Pools, start_operator: Callable[..., OperatorProcess]
) -> None:
    operator = start_operator()
    full, first = f"full-{namespace}", pools.fresh_v4(32)
    pools.create([first], name=full)
    core.create_namespaced_service(namespace, lb_service("holder", annotations={"lbctl.io/address-pool": full}))
    wait_for_ips(core, namespace, "holder")
    core.create_namespaced_service(namespace, lb_service("waiter"))
    assert full in wait_for_condition(core, namespace, "waiter", "False", "Pending").message
    wait_for_event(core, namespace, "waiter", "SyncLoadBalancerFailed", full)

    def warnings() -> list[tuple[str, str, int]]:
        return [(e.metadata.name, e.reason, e.count) for e in our_events(core, namespace).get("waiter", [])]

    before = warnings()
    # pools it may not use: another namespace's, one of the other family; then one changed
    elsewhere = pools.create([pools.fresh_v4(30)], namespaces=["elsewhere"])["metadata"]["name"]
    pools.create([pools.fresh_v6()])
    pools.patch(elsewhere, {"addresses": [pools.fresh_v4(29)]})
    wait_until(lambda: pools.get(elsewhere).get("status", {}).get("free") == 8, what="the operator took the change")
    holds_for(lambda: woken(operator, f"{namespace}/waiter") == 0 and warnings() == before, 5.0,
              "the waiter left alone by pools it may not use")
    assert not ingress_ips(core, namespace, "waiter")

    pools.patch(full, {"addresses": [first, pools.fresh_v4(32)]})  # its pool, grown: may serve it
    wait_for_ips(core, namespace, "waiter")
    assert ingress_ips(core, namespace, "holder")  # kept its address
    wait_for_condition(core, namespace, "waiter", "True")
    assert woken(operator, f"{namespace}/waiter") == 1


def test_a_move_whose_event_a_crash_lost_is_posted_by_the_restarted_operator(
    core: client.CoreV1Api, namespace: str, pools: Pools, operator: OperatorProcess
) -> None:
    pool = pools.create([pools.fresh_v4(31)])["metadata"]["name"]
    core.create_namespaced_service(namespace, lb_service("web"))
    (first,) = wait_for_ips(core, namespace, "web")
    second = str(ipaddress.ip_address(first) + 1)  # the other address of the /31
    pools.patch(pool, {"addresses": [f"{second}/32"]})  # the pool shrinks: the Service moves
    moved = f"Load balancer moved from {first} to {second}"
    wait_for_event(core, namespace, "web", "UpdatedLoadBalancer", moved)
    operator.kill()
    (event,) = [e for e in our_events(core, namespace)["web"] if e.reason == "UpdatedLoadBalancer"]
    core.delete_namespaced_event(event.metadata.name, namespace)  # as if still queued at the kill
    operator.start()
    assert "recorded 1 events that an earlier run did not get to post" in operator.log()
    wait_for_event(core, namespace, "web", "UpdatedLoadBalancer", moved)
    (again,) = [e for e in our_events(core, namespace)["web"] if e.reason == "UpdatedLoadBalancer"]
    assert again.message == moved and again.count == 1 and again.metadata.name != event.metadata.name
