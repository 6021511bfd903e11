"""The reconciler driven through its seams: the real local provider (or a tiny NodePort provider),
an in-memory writer and an Event sink (tests/unit/reconciler_doubles.py). These are the cases that
only integration tests reached before: the finalizer before provisioning, release on a type
change, claimed NodePorts, node-set changes, no write when nothing changed, and which pending
Services a change wakes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from lbctl.model.meta import FINALIZER, OWNER_ANNOTATION
from lbctl.model.outcome import USER, RecordedEvent
from lbctl.model.status import current_condition
from lbctl.model.waits import WaitFor
from lbctl.operator.reconciler import NotLeadingError
from providers.local import BGP_PEERS, POOLS
from tests.unit.reconciler_doubles import (
    Cluster,
    MemoryEvents,
    MemoryWriter,
    NodePortProvider,
    ObservedLocalProvider,
    node,
    service,
    until,
)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def local_cluster(events: MemoryEvents | None = None, **pools: list[str]) -> tuple[Cluster, ObservedLocalProvider]:
    """A Cluster with the local provider and these pools (name=[addresses])."""
    writer = MemoryWriter()
    provider = ObservedLocalProvider(writer)
    cluster = Cluster(provider, writer, events)
    for name, addresses in pools.items():
        cluster.add_pool(name, addresses)
    return cluster, provider


@contextlib.asynccontextmanager
async def leading(cluster: Cluster) -> AsyncIterator[Cluster]:
    """The reconciler leads (its caches are what the test delivered so far) until the block ends."""
    await cluster.reconciler.lead()
    try:
        yield cluster
    finally:
        await cluster.reconciler.stop()


def ips(cluster: Cluster, key: str) -> list[str]:
    obj = cluster.writer.services[key]
    return [i["ip"] for i in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()]


def condition(cluster: Cluster, key: str) -> dict[str, Any] | None:
    found = current_condition(cluster.writer.services[key])
    return dict(found) if found is not None else None


# ---- provisioning, and writing nothing when nothing changed -------------------------------------


def test_the_finalizer_is_written_before_the_balancer_is_made() -> None:
    async def scenario() -> None:
        cluster, provider = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            assert cluster.queued() == {key}
            await cluster.sync()
            assert provider.finalizer_at_ensure == {key: True}
            writes = cluster.writer.service_writes(key)
            assert [what for what, _ in writes] == ["service", "status"]
            assert writes[0][1] == {"metadata": {"finalizers": [FINALIZER],
                                                 "annotations": {OWNER_ANNOTATION: "lbctl.io/local"}}}
            assert ips(cluster, key) == ["198.18.0.10"]
            ready = condition(cluster, key)
            assert ready is not None and ready["status"] == "True" and ready["reason"] == "LoadBalancerEnsured"
            assert cluster.events.reasons(key) == ["EnsuringLoadBalancer", "EnsuredLoadBalancer"]

    run(scenario)


def test_nothing_is_written_when_nothing_changed() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            await cluster.sync()
            writes, events = len(cluster.writer.writes), len(cluster.events.events)
            cluster.deliver(key)  # the same object again (a re-list): not even queued
            assert cluster.queued() == set()
            await cluster.reconciler._resync()  # a periodic re-sync does queue it, and writes nothing
            assert cluster.queued() == {key}
            await cluster.sync()
            assert len(cluster.writer.writes) == writes and len(cluster.events.events) == events

    run(scenario)


def test_an_annotation_written_by_the_forwarder_does_not_queue_the_service() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            await cluster.sync()
            cluster.change(key, lambda s: s["metadata"]["annotations"].update({"lbctl.io/announcing-node": "n1"}))
            assert cluster.queued() == set()
            cluster.change(key, lambda s: s["metadata"]["annotations"].update({"example.com/x": "y"}))
            assert cluster.queued() == {key}

    run(scenario)


def test_our_finalizer_seen_on_the_watch_before_its_answer_does_not_queue_the_service_again() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            queue = cluster.reconciler.queue
            taken = await queue.get()  # a worker has it and writes the finalizer; the watch is quicker than the answer

            def mark(body: dict[str, Any]) -> None:
                body["metadata"]["finalizers"] = [FINALIZER]
                body["metadata"]["annotations"][OWNER_ANNOTATION] = "lbctl.io/local"

            cluster.change(key, mark)
            queue.done(taken)
            assert cluster.queued() == set()
            cluster.change(key, lambda body: body["metadata"].update(finalizers=[]))  # removed by hand: a change
            assert cluster.queued() == {key}

    run(scenario)


def test_services_of_another_class_are_never_touched() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            theirs = cluster.add(service("theirs", lb_class="example.com/other"))
            classless = cluster.add(service("classless", lb_class=None))
            assert cluster.queued() == set()
            await cluster.reconciler._resync()
            await cluster.sync()
            assert cluster.writer.service_writes(theirs) == [] and cluster.writer.service_writes(classless) == []

    run(scenario)


# ---- release -----------------------------------------------------------------------------------


def test_a_type_change_releases_the_balancer_and_clears_status_finalizer_and_mark() -> None:
    async def scenario() -> None:
        cluster, provider = local_cluster(p=["198.18.0.10/32"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            await cluster.sync()

            def to_cluster_ip(body: dict[str, Any]) -> None:
                body["spec"]["type"] = "ClusterIP"
                del body["spec"]["loadBalancerClass"]

            cluster.change(key, to_cluster_ip)
            assert cluster.queued() == {key}
            await cluster.sync()
            released = cluster.writer.services[key]
            assert released["metadata"]["finalizers"] == []
            assert OWNER_ANNOTATION not in released["metadata"]["annotations"]
            assert ips(cluster, key) == [] and condition(cluster, key) is None
            assert cluster.events.reasons(key)[-2:] == ["DeletingLoadBalancer", "DeletedLoadBalancer"]
            assert provider._allocator.allocation(key) is None
            nxt = cluster.add(service("next"))
            await cluster.sync()
            assert ips(cluster, nxt) == ["198.18.0.10"]  # the address is free again

    run(scenario)


def test_a_failing_release_records_deleting_once_and_counts_its_failures() -> None:
    async def scenario() -> None:
        provider = NodePortProvider()
        cluster = Cluster(provider, lb_class="lbctl.io/nodeport")
        cluster.reconciler.on_node(None, node("n1"))
        async with leading(cluster):
            key = cluster.add(service("web", lb_class="lbctl.io/nodeport"))
            await cluster.sync()
            cluster.writer.update(key, lambda body: body["metadata"].__setitem__("deletionTimestamp",
                                                                               "2026-01-01T00:00:00Z"))
            provider.failing_deletes = 3
            cluster.deliver(key)
            await cluster.sync()
            for _ in range(3):  # the retries, without waiting for their backoff
                await cluster.reconciler.reconcile(key)
            reasons = cluster.events.reasons(key)
            assert reasons[reasons.index("DeletingLoadBalancer"):] == [
                "DeletingLoadBalancer", "DeleteLoadBalancerFailed", "DeleteLoadBalancerFailed",
                "DeleteLoadBalancerFailed", "DeletedLoadBalancer"]
            assert provider.deleted and provider.failing_deletes == 0

            again = cluster.add(service("again", lb_class="lbctl.io/nodeport"))
            await cluster.sync()
            cluster.change(again, lambda body: body["spec"].__setitem__("type", "ClusterIP"))
            provider.failing_deletes = 1
            await cluster.sync()
            cluster.change(again, lambda body: body["spec"].__setitem__("type", "LoadBalancer"))
            await cluster.sync()  # a LoadBalancer again before its release was done
            cluster.change(again, lambda body: body["spec"].__setitem__("type", "ClusterIP"))
            await cluster.sync()
            assert cluster.events.reasons(again).count("DeletingLoadBalancer") == 2

    run(scenario)


def test_deleting_a_service_releases_it_and_lets_it_go() -> None:
    async def scenario() -> None:
        cluster, provider = local_cluster(p=["198.18.0.10/32"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            await cluster.sync()
            cluster.writer.delete(key)
            cluster.deliver(key)
            await cluster.sync()
            assert key not in cluster.writer.services  # the finalizer came off, so it is gone
            assert provider._allocator.allocation(key) is None
            status_writes = [w for w in cluster.writer.service_writes(key) if w[0] == "status"]
            assert len(status_writes) == 1  # a deleted Service's status is not cleared first

    run(scenario)


def test_a_service_gone_without_its_finalizer_has_its_balancer_released() -> None:
    async def scenario() -> None:
        cluster, provider = local_cluster(p=["198.18.0.10/32"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            await cluster.sync()
            del cluster.writer.services[key]  # finalizer removed by hand, then deleted
            cluster.deliver(key)
            assert cluster.queued() == {key}
            await cluster.sync()
            assert provider._allocator.allocation(key) is None

    run(scenario)


# ---- NodePorts -----------------------------------------------------------------------------------


def test_nodeports_are_claimed_for_a_provider_that_needs_them() -> None:
    async def scenario() -> None:
        provider = NodePortProvider()
        cluster = Cluster(provider, lb_class="lbctl.io/nodeport")
        cluster.reconciler.on_node(None, node("n1"))
        async with leading(cluster):
            key = cluster.add(service("web", lb_class="lbctl.io/nodeport", ports=(80, 443),
                                      allocateLoadBalancerNodePorts=False))
            cluster.writer.services[key]["spec"]["ports"][1]["nodePort"] = 30001  # one already has a NodePort
            cluster.deliver(key)
            await cluster.sync()
            claims = [body for what, body in cluster.writer.service_writes(key) if what == "ports"]
            assert len(claims) == 1
            ports = {p["port"]: p["nodePort"] for p in claims[0]}
            assert ports[443] == 30001 and 30000 <= ports[80] <= 30009 and ports[80] != 30001
            assert "AllocatedNodePorts" in cluster.events.reasons(key)
            (spec,) = provider.synced(key)  # then ensured once, with the claimed ports
            assert {p.port: p.node_port for p in spec.ports} == ports

    run(scenario)


def test_a_lost_nodeport_claim_picks_again_without_an_event() -> None:
    async def scenario() -> None:
        provider = NodePortProvider()
        cluster = Cluster(provider, lb_class="lbctl.io/nodeport")
        cluster.reconciler.on_node(None, node("n1"))
        async with leading(cluster):
            key = cluster.add(service("web", lb_class="lbctl.io/nodeport", allocateLoadBalancerNodePorts=False))
            await cluster.sync()  # finalizer written ... then the claim, already for the newer version
            assert provider.synced(key)
            stale = dict(cluster.reconciler.services[key])
            stale["metadata"] = {**stale["metadata"], "resourceVersion": "1"}
            stale["spec"] = {**stale["spec"], "ports": [{"name": "p0", "port": 80, "protocol": "TCP"}]}
            await cluster.reconciler._claim_node_ports(key, stale)  # another writer changed it meanwhile
            assert key in cluster.reconciler.queue.scheduled()
            assert cluster.events.reasons(key).count("AllocatedNodePorts") == 1

    run(scenario)


def test_no_free_nodeports_waits_for_a_service_to_give_some_back() -> None:
    async def scenario() -> None:
        provider = NodePortProvider()
        cluster = Cluster(provider, lb_class="lbctl.io/nodeport")
        cluster.reconciler.on_node(None, node("n1"))
        async with leading(cluster):
            holders = [cluster.add(service(f"h{i}", lb_class=None, type="NodePort", ports=(80,))) for i in range(10)]
            for i, key in enumerate(holders):
                cluster.change(key, lambda s, i=i: s["spec"]["ports"][0].update({"nodePort": 30000 + i}))
            key = cluster.add(service("web", lb_class="lbctl.io/nodeport", allocateLoadBalancerNodePorts=False))
            await cluster.sync()
            assert cluster.reconciler.waits[key].kind is WaitFor.NODE_PORTS
            assert ("SyncLoadBalancerFailed" in cluster.events.reasons(key))
            del cluster.writer.services[holders[0]]
            cluster.deliver(holders[0])
            assert cluster.queued() == {key}

    run(scenario)


# ---- nodes ---------------------------------------------------------------------------------------


def test_a_node_set_change_resyncs_only_the_services_whose_nodes_changed() -> None:
    async def scenario() -> None:
        provider = NodePortProvider()
        cluster = Cluster(provider, lb_class="lbctl.io/nodeport")
        reconciler = cluster.reconciler
        reconciler.on_node(None, node("n1"))
        async with leading(cluster):
            a = cluster.add(service("a", lb_class="lbctl.io/nodeport"))
            b = cluster.add(service("b", lb_class="lbctl.io/nodeport"))
            other = cluster.add(service("other", lb_class="example.com/x"))
            await cluster.sync()
            assert len(provider.ensured) == 2

            reconciler.on_node(None, node("n2", ready=False))  # not eligible: nothing to do
            await until(lambda: reconciler._node_timer is None)
            assert cluster.queued() == set()
            reconciler.on_node(node("n1"), node("n1", labels={"team": "x"}))  # labels do not matter to a balancer
            await until(lambda: reconciler._node_timer is None)
            assert cluster.queued() == set()

            reconciler.on_node(node("n2", ready=False), node("n2"))  # eligible now
            await until(lambda: cluster.queued() == {a, b})
            c = cluster.add(service("c", lb_class="lbctl.io/nodeport"))  # created after: synced with both nodes
            await cluster.sync()
            assert {n.name for n in provider.synced(a)[-1].nodes} == {"n1", "n2"}
            assert len(provider.synced(c)) == 1 and other not in {s.service.key for s in provider.ensured}
            assert cluster.events.of(a)[-1] == ("UpdatedLoadBalancer", "Updated load balancer with new hosts")
            assert cluster.events.reasons(c) == ["EnsuringLoadBalancer", "EnsuredLoadBalancer"]

    run(scenario)


def test_no_eligible_nodes_waits_for_one() -> None:
    async def scenario() -> None:
        provider = NodePortProvider()
        cluster = Cluster(provider, lb_class="lbctl.io/nodeport")
        reconciler = cluster.reconciler
        reconciler.on_node(None, node("n1", ready=False))
        async with leading(cluster):
            key = cluster.add(service("web", lb_class="lbctl.io/nodeport"))
            await cluster.sync()
            found = condition(cluster, key)
            assert found is not None and found["reason"] == "NoEligibleNodes"
            assert cluster.events.reasons(key) == ["UnAvailableLoadBalancer"]
            assert reconciler.waits[key].kind is WaitFor.NODES
            reconciler.on_node(node("n1", ready=False), node("n1"))
            await until(lambda: cluster.queued() == {key})
            await cluster.sync()
            assert provider.synced(key) and key not in reconciler.waits
            assert cluster.events.reasons(key)[-1] == "EnsuredLoadBalancer"

    run(scenario)


def test_the_local_provider_ignores_node_changes() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            cluster.add(service("web"))
            await cluster.sync()
            cluster.reconciler.on_node(None, node("n9"))
            await until(lambda: cluster.reconciler._node_timer is None)
            assert cluster.queued() == set()

    run(scenario)


# ---- failures, waits and wake-ups --------------------------------------------------------------


def test_a_pending_service_says_why_it_waits_and_retries_without_ensuring_again() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/32"])
        async with leading(cluster):
            cluster.add(service("first"))
            key = cluster.add(service("waiting"))
            await cluster.sync()
            pending = condition(cluster, key)
            assert pending is not None and pending["status"] == "False" and pending["reason"] == "Pending"
            assert "exhausted" in pending["message"] and "fix" in pending["message"]
            wait = cluster.reconciler.waits[key]
            assert wait.kind is WaitFor.ADDRESS and wait.pools == ("p",)
            assert key in cluster.reconciler.queue.scheduled()  # a safety-net retry, minutes away at most
            cluster.reconciler.queue.add(key)  # as when that retry comes
            await cluster.sync()
            assert cluster.events.reasons(key) == ["EnsuringLoadBalancer", "SyncLoadBalancerFailed",
                                                   "SyncLoadBalancerFailed"]
            assert len([w for w in cluster.writer.service_writes(key) if w[0] == "status"]) == 1  # same condition

    run(scenario)


def test_a_release_wakes_only_the_services_waiting_for_its_pool() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster()
        cluster.add_pool("a", ["198.18.1.1/32"], namespaces=["team-a"])
        cluster.add_pool("b", ["198.18.2.1/32"], namespaces=["team-b"])
        async with leading(cluster):
            holder_a = cluster.add(service("holder", namespace="team-a"))
            holder_b = cluster.add(service("holder", namespace="team-b"))
            await cluster.sync()
            waiter_a = cluster.add(service("waiter", namespace="team-a"))
            waiter_b = cluster.add(service("waiter", namespace="team-b"))
            dual = cluster.add(service("dual", namespace="team-a", ipFamilies=["IPv4", "IPv6"],
                                       ipFamilyPolicy="RequireDualStack"))
            await cluster.sync()
            assert set(cluster.reconciler.waits) == {waiter_a, waiter_b, dual}
            assert cluster.reconciler.waits[dual].kind is WaitFor.POOL

            cluster.writer.delete(holder_a)
            cluster.deliver(holder_a)
            assert await cluster.sync() == [holder_a, waiter_a]  # the release woke the waiter of pool a ...
            assert ips(cluster, waiter_a) == ["198.18.1.1"]  # ... which got its address
            assert set(cluster.reconciler.waits) == {waiter_b, dual}
            assert ips(cluster, holder_b) == ["198.18.2.1"]

    run(scenario)


def test_a_requested_address_waits_for_its_holder() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.0/29"])
        async with leading(cluster):
            holder = cluster.add(service("holder", loadBalancerIP="198.18.0.5"))
            other = cluster.add(service("other"))
            await cluster.sync()
            key = cluster.add(service("wants", loadBalancerIP="198.18.0.5"))
            await cluster.sync()
            assert cluster.reconciler.waits[key].holders == (holder,)
            cluster.writer.delete(other)
            cluster.deliver(other)
            await cluster.sync()
            assert key in cluster.reconciler.waits  # another address freed: still waiting
            cluster.writer.delete(holder)
            cluster.deliver(holder)
            await cluster.sync()
            assert ips(cluster, key) == ["198.18.0.5"]

    run(scenario)


def test_a_new_pool_wakes_services_waiting_for_a_pool() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(v4=["198.18.0.0/30"])
        async with leading(cluster):
            key = cluster.add(service("dual", ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"))
            await cluster.sync()
            assert cluster.reconciler.waits[key].kind is WaitFor.POOL
            cluster.add_pool("both", ["198.18.9.0/30", "fd00::/126"])
            await until(lambda: key in cluster.queued())
            await cluster.sync()
            assert len(ips(cluster, key)) == 2

    run(scenario)


def test_only_a_pool_that_may_serve_a_waiting_service_wakes_it() -> None:
    """A pool for another namespace, of another family, or a BGPPeer: nobody is requeued; the pool
    it waits for growing: it is."""
    async def scenario() -> None:
        cluster, _ = local_cluster(full=["198.18.0.0/32"])
        async with leading(cluster):
            cluster.add(service("holder"))
            await cluster.sync()
            key = cluster.add(service("waiter"))
            await cluster.sync()
            assert cluster.reconciler.waits[key].kind is WaitFor.ADDRESS
            written = len(cluster.writer.writes)

            def status_written(name: str) -> bool:
                return any(what == "resource-status" and n == name for what, n, _ in cluster.writer.writes[written:])

            cluster.add_pool("elsewhere", ["198.18.1.0/30"], namespaces=["other"])
            cluster.add_pool("v6", ["fd00::/126"])
            await until(lambda: status_written("elsewhere") and status_written("v6"))
            peer = {"apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "peer"},
                    "spec": {"peerAddress": "192.0.2.1", "peerASN": 65001, "myASN": 65000}}
            cluster.reconciler.on_resource(BGP_PEERS, None, cluster.writer.create_resource(BGP_PEERS, peer))
            await until(lambda: BGP_PEERS not in cluster.reconciler._resource_timers)
            await asyncio.sleep(0)  # the settle task the timer started
            assert cluster.queued() == set()
            assert key in cluster.reconciler.waits

            grown = copy.deepcopy(cluster.writer.resources[("loadbalancerpools", "full")])
            old = copy.deepcopy(grown)
            grown["spec"]["addresses"] = ["198.18.0.0/31"]
            cluster.reconciler.on_resource(POOLS, old, grown)
            await until(lambda: key in cluster.queued())
            assert cluster.queued() == {key}
            await cluster.sync()
            assert ips(cluster, key) == ["198.18.0.1"]

    run(scenario)


@pytest.mark.parametrize(("annotations", "field"), [
    ({"lbctl.io/load-balancer-ips": "10.0.0.300"}, "lbctl.io/load-balancer-ips"),
    ({"lbctl.io/address-pool": "nope"}, "lbctl.io/address-pool"),
])
def test_an_invalid_service_is_told_the_field_and_retried_only_after_a_long_backoff(
    annotations: dict[str, str], field: str
) -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            key = cluster.add(service("bad", annotations=annotations))
            await cluster.sync()
            found = condition(cluster, key)
            assert found is not None and found["reason"] == "InvalidConfiguration" and field in found["message"]
            (warning,) = [m for r, m in cluster.events.of(key) if r == "SyncLoadBalancerFailed"]
            assert field in warning and "fix" in warning
            assert key not in cluster.reconciler.waits and key in cluster.reconciler.queue.scheduled()
            due = cluster.reconciler.queue.due_in(key)
            assert due is not None and due >= 0.8 * USER.base_s

    run(scenario)


# ---- after a restart, and when no longer leading --------------------------------------------------


def test_an_outcome_without_its_event_is_recorded_when_leading_starts() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            done = cluster.add(service("done"))
            lost = cluster.add(service("lost"))
            await cluster.sync()
        stamp = condition(cluster, done)["lastTransitionTime"]  # type: ignore[index]
        uid = cluster.writer.services[done]["metadata"]["uid"]

        # a new leader: the Ensured Event of "lost" never reached the apiserver
        events = MemoryEvents([RecordedEvent(uid, "EnsuredLoadBalancer", stamp)])
        restarted = Cluster(ObservedLocalProvider(cluster.writer), cluster.writer, events)
        restarted.add_pool("p", ["198.18.0.10/31"])
        for key in (done, lost):
            restarted.reconciler.on_service(None, copy.deepcopy(cluster.writer.services[key]))
        async with leading(restarted):
            assert events.reasons(lost) == ["EnsuredLoadBalancer"] and events.reasons(done) == []
            writes = len(cluster.writer.writes)
            await restarted.sync()  # the re-sync of both writes nothing and records nothing more
            assert events.reasons(lost) == ["EnsuredLoadBalancer"] and events.reasons(done) == []
            assert len(cluster.writer.writes) == writes

    run(scenario)


def test_a_move_without_its_event_is_recorded_when_leading_starts() -> None:
    async def scenario() -> None:
        cluster, _ = local_cluster(p=["198.18.0.10/32"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            await cluster.sync()
        stamp = condition(cluster, key)["lastTransitionTime"]  # type: ignore[index]
        uid = cluster.writer.services[key]["metadata"]["uid"]
        # its last Event named another address: the move to 198.18.0.10 never reached the apiserver
        earlier = RecordedEvent(uid, "EnsuredLoadBalancer", stamp, "Ensured load balancer at 198.18.0.99")
        events = MemoryEvents([earlier])
        restarted = Cluster(ObservedLocalProvider(cluster.writer), cluster.writer, events)
        restarted.add_pool("p", ["198.18.0.10/32"])
        restarted.reconciler.on_service(None, copy.deepcopy(cluster.writer.services[key]))
        async with leading(restarted):
            assert events.of(key) == [("UpdatedLoadBalancer", "Load balancer moved from 198.18.0.99 to 198.18.0.10")]

    run(scenario)


def test_nothing_is_written_once_the_lease_is_lost() -> None:
    async def scenario() -> None:
        cluster, provider = local_cluster(p=["198.18.0.10/31"])
        async with leading(cluster):
            key = cluster.add(service("web"))
            cluster.reconciler.may_act = lambda: False
            with pytest.raises(NotLeadingError):
                await cluster.reconciler.reconcile(key)
            assert cluster.writer.service_writes(key) == [] and provider.finalizer_at_ensure == {}

    run(scenario)


def test_a_pool_that_becomes_invalid_gets_one_warning_until_its_problem_changes() -> None:
    """The pool's status is the provider's; the Warning Event is the reconciler's decision
    (lbctl.model.outcome.condition_warnings): once when the condition turns False, not again while
    it stays the same, none once the pool is fixed."""
    async def scenario() -> None:
        cluster, _ = local_cluster(good=["198.18.0.0/30"])

        def warnings() -> list[tuple[str, str]]:
            return [(reason, message) for key, kind, reason, message in cluster.events.events
                    if key == "/bad" and kind == "Warning"]

        def status(name: str) -> dict[str, Any]:
            return dict(cluster.writer.resources[(POOLS.plural, name)].get("status") or {})

        async with leading(cluster):
            cluster.add_pool("bad", ["not-an-address"])
            await until(lambda: warnings())
            [(reason, message)] = warnings()
            assert "not-an-address" in message
            assert status("bad")["conditions"][0] == {"type": "Ready", "status": "False", "reason": reason,
                                                      "message": message}
            cluster.add_pool("other", ["198.18.1.0/30"])  # the pools' statuses are written again
            await until(lambda: status("other"))
            assert len(warnings()) == 1  # still the same problem: told once

            old = copy.deepcopy(cluster.writer.resources[(POOLS.plural, "bad")])
            cluster.writer.resources[(POOLS.plural, "bad")]["spec"]["addresses"] = ["198.18.2.0/30"]
            fixed = copy.deepcopy(cluster.writer.resources[(POOLS.plural, "bad")])
            fixed["metadata"]["resourceVersion"] = "fixed"
            cluster.reconciler.on_resource(POOLS, old, fixed)
            await until(lambda: status("bad")["conditions"][0]["status"] == "True")
            assert len(warnings()) == 1

    run(scenario)
