"""VIP ownership (lbctl.forwarder.ownership): rendezvous choice, eligibility, lease liveness."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import pytest

from lbctl.forwarder.ownership import EXCLUDE_LABEL, Liveness, choose_owner, excluded_nodes, vip_owners
from lbctl.forwarder.state import ServicePort, ServiceState

NODES = [f"node-{i}" for i in range(5)]
VIPS = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(500)]


def svc(key: str, ip: str, *, local: bool = False, endpoint_nodes: frozenset[str] = frozenset(),
        announce: bool = True) -> ServiceState:
    return ServiceState(key=key, uid=key, created="", ports=(ServicePort("", "tcp", 80, None),), lb_ips=(ip,),
                        local_only=local, announce=announce, endpoint_nodes=endpoint_nodes)


def test_owner_is_stable_and_independent_of_candidate_order() -> None:
    for vip in VIPS[:50]:
        assert choose_owner(vip, NODES) == choose_owner(vip, list(reversed(NODES))) == choose_owner(vip, set(NODES))
    assert choose_owner("198.18.0.1", []) is None


def test_vips_spread_over_nodes() -> None:
    counts = Counter(choose_owner(vip, NODES) for vip in VIPS)
    assert set(counts) == set(NODES)
    assert min(counts.values()) > len(VIPS) / len(NODES) / 2  # no node starves


def test_losing_a_node_moves_only_its_vips() -> None:
    before = {vip: choose_owner(vip, NODES) for vip in VIPS}
    after = {vip: choose_owner(vip, NODES[1:]) for vip in VIPS}
    moved = {vip for vip in VIPS if before[vip] != after[vip]}
    assert moved == {vip for vip in VIPS if before[vip] == NODES[0]}
    assert Counter(after[vip] for vip in moved).keys() > {NODES[1]}  # spread over several survivors


def test_only_live_and_not_excluded_nodes_own() -> None:
    owners = vip_owners([svc("a/x", vip) for vip in VIPS[:40]], live=NODES[:3], excluded=[NODES[0]])
    assert {o.owner for o in owners.values()} == {NODES[1], NODES[2]}


def test_local_policy_needs_a_ready_local_endpoint() -> None:
    owners = vip_owners([svc("a/x", "198.18.0.9", local=True, endpoint_nodes=frozenset({"node-3", "gone"}))],
                        live=NODES)
    assert owners["198.18.0.9"].owner == "node-3"
    nobody = vip_owners([svc("a/x", "198.18.0.9", local=True)], live=NODES)
    assert nobody["198.18.0.9"].owner is None


def test_shared_vip_prefers_nodes_eligible_for_every_service() -> None:
    states = [svc("a/x", "198.18.0.9", local=True, endpoint_nodes=frozenset({"node-1", "node-2"})),
              svc("a/y", "198.18.0.9", local=True, endpoint_nodes=frozenset({"node-2", "node-4"})),
              svc("a/z", "198.18.0.9")]
    owner = vip_owners(states, live=NODES)["198.18.0.9"]
    assert owner.owner == "node-2"
    assert owner.services == ("a/x", "a/y", "a/z")
    disjoint = [svc("a/x", "198.18.0.9", local=True, endpoint_nodes=frozenset({"node-1"})),
                svc("a/y", "198.18.0.9", local=True, endpoint_nodes=frozenset({"node-4"}))]
    assert vip_owners(disjoint, live=NODES)["198.18.0.9"].owner in {"node-1", "node-4"}


def test_services_not_announced_have_no_owner_entry() -> None:
    assert vip_owners([svc("a/x", "198.18.0.9", announce=False)], live=NODES) == {}


@pytest.mark.parametrize(("node", "excluded"), [
    ({"metadata": {"name": "n", "labels": {EXCLUDE_LABEL: ""}}}, True),
    ({"metadata": {"name": "n", "deletionTimestamp": "2024-01-01T00:00:00Z"}}, True),
    ({"metadata": {"name": "n", "labels": {"other": "x"}}}, False),
    ({"metadata": {"name": "n", "labels": None}}, False),
    ({"metadata": None}, False),
    ({}, False),
])
def test_excluded_nodes(node: dict[str, Any], excluded: bool) -> None:
    assert (excluded_nodes([node]) == {"n"}) is excluded


def lease(renew: dt.datetime | str | None, duration: Any = 2) -> dict[str, Any]:
    stamp = renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if isinstance(renew, dt.datetime) else renew
    return {"spec": {"holderIdentity": "n", "leaseDurationSeconds": duration, "renewTime": stamp}}


WALL = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_lease_liveness_on_the_observers_clock() -> None:
    live = Liveness()
    live.observe(lease(WALL), "n", now=100.0, wall_now=WALL.timestamp() + 0.5)
    assert live.live(101.0) == {"n"}
    assert live.live(101.6) == frozenset()  # 2 s after the renewal, seen 0.5 s late
    live.observe(lease(WALL + dt.timedelta(seconds=1)), "n", now=101.7, wall_now=0.0)  # holder's clock is not read
    assert live.live(103.6) == {"n"}
    assert live.live(103.8) == frozenset()
    assert live.next_expiry(103.0) == pytest.approx(103.7)


def test_an_unchanged_lease_does_not_extend_life() -> None:
    live = Liveness()
    live.observe(lease(WALL), "n", now=10.0, wall_now=WALL.timestamp())
    live.observe(lease(WALL), "n", now=11.9, wall_now=WALL.timestamp() + 1.9)
    assert live.live(12.1) == frozenset()


@pytest.mark.parametrize("bad", [lease(WALL - dt.timedelta(hours=1)), lease(None), lease("garbage"),
                                 lease(WALL, duration=0), lease(WALL, duration="2"), {"spec": None}, {}])
def test_stale_or_malformed_leases_are_not_live(bad: dict[str, Any]) -> None:
    live = Liveness()
    live.observe(bad, "n", now=10.0, wall_now=WALL.timestamp())
    assert live.live(10.0) == frozenset()


def test_deleted_lease_is_dead_at_once() -> None:
    live = Liveness()
    live.observe(lease(WALL), "n", now=10.0, wall_now=WALL.timestamp())
    live.observe(None, "n", now=10.1, wall_now=0.0)
    assert live.live(10.1) == frozenset()
