"""VIP ownership (lbctl.forwarder.ownership): rendezvous choice, eligibility, sticky holders."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from lbctl.forwarder.ownership import (
    EXCLUDE_LABEL,
    choose_owner,
    excluded_nodes,
    newest_takes,
    node_addresses,
    vip_owners,
)
from lbctl.forwarder.state import ServicePort, ServiceState

NODES = [f"node-{i}" for i in range(5)]
VIPS = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(500)]


def svc(key: str, ip: str, *more: str, local: bool = False, endpoint_nodes: frozenset[str] = frozenset(),
        announce: bool = True) -> ServiceState:
    return ServiceState(key=key, uid=key, created="", ports=(ServicePort("", "tcp", 80, None),),
                        lb_ips=(ip, *more), local_only=local, announce=announce, endpoint_nodes=endpoint_nodes)


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


VIP = "198.18.0.9"
WINNER = choose_owner(VIP, NODES)
OTHERS = [n for n in NODES if n != WINNER]


@pytest.mark.parametrize(("case", "live", "holders", "tentative", "owner"), [
    ("nobody holds it: the rendezvous winner", NODES, {}, {}, WINNER),
    ("a live holder keeps it though another scores higher (no fail-back)", NODES, {VIP: {OTHERS[0]}}, {},
     OTHERS[0]),
    ("a holder that is not live does not count", [n for n in NODES if n != OTHERS[0]], {VIP: {OTHERS[0]}}, {},
     WINNER),
    ("two holders after a partition heals: the better score keeps it", NODES, {VIP: {OTHERS[0], WINNER}}, {},
     WINNER),
    ("a tentative holder (restarted forwarder) keeps it when nobody holds it firmly", NODES, {},
     {VIP: {OTHERS[1]}}, OTHERS[1]),
    ("a tentative holder yields to a firm one (a peer took over while it was away)", NODES,
     {VIP: {OTHERS[0]}}, {VIP: {OTHERS[1]}}, OTHERS[0]),
    ("an excluded holder does not keep it", NODES, {VIP: {"excluded"}}, {}, WINNER),
])
def test_holders_keep_their_vips(case: str, live: list[str], holders: dict[str, set[str]],
                                 tentative: dict[str, set[str]], owner: str) -> None:
    owners = vip_owners([svc("a/x", VIP)], live=[*live, "excluded"], excluded=["excluded"], holders=holders,
                        tentative=tentative)
    assert owners[VIP].owner == owner, case


def test_an_ineligible_holder_gives_way_under_local_policy() -> None:
    state = svc("a/x", VIP, local=True, endpoint_nodes=frozenset({OTHERS[2]}))
    assert vip_owners([state], live=NODES, holders={VIP: {OTHERS[0]}})[VIP].owner == OTHERS[2]


@pytest.mark.parametrize(("node", "address"), [
    ({"metadata": {"name": "a"}, "status": {"addresses": [{"type": "Hostname", "address": "a"},
                                                          {"type": "InternalIP", "address": "fd00::1"},
                                                          {"type": "InternalIP", "address": "10.0.0.1"}]}},
     "10.0.0.1"),
    ({"metadata": {"name": "a"}, "status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.1"}]}},
     "203.0.113.1"),
    ({"metadata": {"name": "a"}, "status": {"addresses": [{"type": "InternalIP", "address": "fd00::1"}]}},
     "fd00::1"),
    ({"metadata": {"name": "a"}, "status": {}}, None),
    ({"metadata": {"name": "a"}}, None),
    ({}, None),
])
def test_node_address_for_heartbeats(node: dict[str, Any], address: str | None) -> None:
    assert node_addresses([node]).get("a") == address


@pytest.mark.parametrize(("claims", "newest"), [
    ({VIP: {"a": 3, "b": 4}}, {VIP: {"b"}}),  # b took it over after a's claim: a's is a late echo
    ({VIP: {"a": 4, "b": 4}}, {VIP: {"a", "b"}}),  # a tie: the score decides (vip_owners)
    ({VIP: {"a": 1}}, {VIP: {"a"}}),
    ({VIP: {}}, {}),
])
def test_the_newest_take_holds(claims: dict[str, dict[str, int]], newest: dict[str, set[str]]) -> None:
    assert newest_takes(claims) == newest


V4, V6 = "198.18.5.10", "2001:db8:5::a"


def test_the_addresses_of_a_dual_stack_service_go_to_one_node_and_fail_over_together() -> None:
    pairs = [svc(f"a/s{i}", f"198.18.7.{i + 1}", f"2001:db8:7::{i + 1:x}") for i in range(60)]
    owners = vip_owners(pairs, live=NODES)
    for state in pairs:
        assert owners[state.lb_ips[0]].owner == owners[state.lb_ips[1]].owner, state.key
    assert len({o.owner for o in owners.values()}) == len(NODES)  # still spread over the nodes
    # the owner of some pairs dies: each pair moves, whole, to one survivor
    dead = owners["198.18.7.1"].owner
    assert dead is not None
    holders = {ip: {o.owner} for ip, o in owners.items() if o.owner != dead and o.owner is not None}
    after = vip_owners(pairs, live=[n for n in NODES if n != dead], holders=holders)
    for state in pairs:
        v4, v6 = state.lb_ips
        assert after[v4].owner == after[v6].owner != dead
        if owners[v4].owner != dead:
            assert after[v4].owner == owners[v4].owner  # untouched pairs stay


def test_a_new_address_joins_the_node_that_holds_its_sibling() -> None:
    # single stack first, held by a node that is not the pair's rendezvous winner; then IPv6 is added
    holder = next(n for n in NODES if n != choose_owner(min(V4, V6), NODES))
    owners = vip_owners([svc("a/x", V4, V6)], live=NODES, holders={V4: {holder}})
    assert owners[V4].owner == owners[V6].owner == holder
    # unless that node may not hold it (ETP=Local, no endpoint there for... another Service sharing it)
    other = next(n for n in NODES if n != holder)
    states = [svc("a/x", V4, V6), svc("a/y", V6, local=True, endpoint_nodes=frozenset({other}))]
    owners = vip_owners(states, live=NODES, holders={V4: {holder}})
    assert owners[V4].owner == holder and owners[V6].owner == other


@pytest.mark.parametrize("spelling", ["2001:db8:5::a", "2001:DB8:5:0:0:0:0:A", "2001:0db8:0005::000a"])
def test_ipv6_vips_are_one_address_however_spelt(spelling: str) -> None:
    holder = next(n for n in NODES if n != choose_owner(V6, NODES))
    owners = vip_owners([svc("a/x", spelling)], live=NODES, holders={V6: {holder}})
    assert set(owners) == {V6}
    assert owners[V6].owner == holder
    assert vip_owners([svc("a/x", V6)], live=NODES, holders={spelling: {holder}})[V6].owner == holder
