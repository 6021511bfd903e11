"""lbctl.model.bgp: parsing BGPPeers and pool advertisements, and which nodes announce (tables)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from lbctl.model.bgp import (
    L2_ONLY,
    Advertisement,
    BgpConfigError,
    Community,
    Mode,
    NodeInfo,
    advertisement_problem,
    announcing_nodes,
    check_aggregation,
    conflicting_peers,
    parse_advertisement,
    parse_community,
    parse_duration,
    parse_peer,
)
from lbctl.model.selectors import LabelSelector, Requirement


def peer_obj(name: str = "tor", labels: dict[str, str] | None = None, status: Any = None,
             created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer",
        "metadata": {"name": name, "labels": labels or {}, "creationTimestamp": created},
        "spec": {"peerAddress": "192.168.1.1", "peerASN": 64512, "myASN": 64513, **spec},
    }
    if status is not None:
        body["status"] = status
    return body


def sessions(*entries: tuple[str, str]) -> dict[str, Any]:
    return {"nodes": [{"node": n, "state": s, "since": "2026-01-01T00:00:00Z", "routesAnnounced": 1}
                      for n, s in entries]}


# ---- communities and durations ---------------------------------------------------------------

@pytest.mark.parametrize(("text", "values"), [
    ("0:0", (0, 0)), ("65535:65535", (65535, 65535)), ("64512:100", (64512, 100)),
    ("large:4294967295:0:1", (4294967295, 0, 1)), ("large:1:2:3", (1, 2, 3)),
])
def test_communities_parse(text: str, values: tuple[int, ...]) -> None:
    community = parse_community(text)
    assert community.values == values and str(community) == text and community.large == (len(values) == 3)


@pytest.mark.parametrize("text", ["65536:1", "1:65536", "1:2:3", "large:1:2", "large:4294967296:0:0", "no-export",
                                  "", "1:-2", " 1:2", "LARGE:1:2:3"])
def test_bad_communities_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="standard community"):
        parse_community(text)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("0s", 0), ("1m30s", 90), ("1h", 3600), ("3s", 3)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, "spec.holdTime") == seconds


@pytest.mark.parametrize("text", ["90", "", "1.5s", "-3s", "3ms", None, 90])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(BgpConfigError) as error:
        parse_duration(text, "spec.holdTime")
    assert error.value.field == "spec.holdTime"


# ---- peers -------------------------------------------------------------------------------------------

def test_a_peer_with_defaults() -> None:
    peer = parse_peer(peer_obj())
    assert (peer.peer_address, peer.peer_asn, peer.my_asn, peer.peer_port) == (
        ipaddress.ip_address("192.168.1.1"), 64512, 64513, 179)
    assert (peer.hold_time_s, peer.keepalive_time_s, peer.ibgp, peer.password, peer.sessions) == (90, 30, False,
                                                                                                  None, ())
    assert peer.node_selector.matches({"any": "node"})


def test_a_peer_with_everything() -> None:
    peer = parse_peer(peer_obj(
        labels={"rack": "r1"}, peerAddress="fd00::1", peerASN=4294967295, myASN=4294967295, peerPort=1179,
        holdTime="9s", keepaliveTime="2s", passwordSecretRef={"name": "pw"}, ebgpMultiHop=True,
        sourceAddress="fd00::2", gracefulRestart=True, nodeSelector={"matchLabels": {"rack": "r1"}},
        status=sessions(("n2", "Active"), ("n1", "Established"))))
    assert peer.ibgp and peer.peer_port == 1179 and (peer.hold_time_s, peer.keepalive_time_s) == (9, 2)
    assert peer.password is not None and (peer.password.name, peer.password.key) == ("pw", "password")
    assert peer.ebgp_multihop and peer.graceful_restart and str(peer.source_address) == "fd00::2"
    assert [s.node for s in peer.sessions] == ["n1", "n2"]
    assert peer.established_on("n1") and not peer.established_on("n2") and not peer.established_on("n3")
    assert peer.node_selector.matches({"rack": "r1"}) and not peer.node_selector.matches({"rack": "r2"})


def test_hold_time_zero_means_no_keepalives() -> None:
    assert parse_peer(peer_obj(holdTime="0s")).keepalive_time_s == 0


@pytest.mark.parametrize(("spec", "field"), [
    ({"peerAddress": "192.168.1.300"}, "spec.peerAddress"),
    ({"peerAddress": "10.0.0.0/24"}, "spec.peerAddress"),
    ({"peerAddress": "fe80::1%eth0"}, "spec.peerAddress"),
    ({"peerAddress": None}, "spec.peerAddress"),
    ({"peerASN": 0}, "spec.peerASN"),
    ({"peerASN": 2**32}, "spec.peerASN"),
    ({"myASN": "64512"}, "spec.myASN"),
    ({"myASN": True}, "spec.myASN"),
    ({"peerPort": 0}, "spec.peerPort"),
    ({"holdTime": "2s"}, "spec.holdTime"),
    ({"holdTime": "65536s"}, "spec.holdTime"),
    ({"holdTime": "90"}, "spec.holdTime"),
    ({"keepaliveTime": "90s"}, "spec.keepaliveTime"),
    ({"holdTime": "0s", "keepaliveTime": "1s"}, "spec.keepaliveTime"),
    ({"passwordSecretRef": {"key": "x"}}, "spec.passwordSecretRef.name"),
    ({"sourceAddress": "nowhere"}, "spec.sourceAddress"),
    ({"ebgpMultiHop": "yes"}, "spec.ebgpMultiHop"),
    ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.nodeSelector.matchExpressions[0].values"),
])
def test_a_bad_peer_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(BgpConfigError) as error:
        parse_peer(peer_obj(**spec))
    assert error.value.field == field and error.value.fix, error.value


def test_a_status_entry_that_does_not_parse_is_not_established() -> None:
    peer = parse_peer(peer_obj(status={"nodes": [{"state": "Established"}, "junk", {"node": "n1"}]}))
    assert [(s.node, s.state) for s in peer.sessions] == [("n1", "Idle")]


@pytest.mark.parametrize(("peers", "rejected"), [
    # same address, both for every node: the younger is rejected
    ([("a", "10.0.0.1", None, "2026-01-02"), ("b", "10.0.0.1", None, "2026-01-01")], ["a"]),
    # same address, different racks: fine
    ([("a", "10.0.0.1", {"rack": "r1"}, "1"), ("b", "10.0.0.1", {"rack": "r2"}, "2")], []),
    # one of them for every node: they meet on some node
    ([("a", "10.0.0.1", {"rack": "r1"}, "1"), ("b", "10.0.0.1", None, "2")], ["b"]),
    # different addresses
    ([("a", "10.0.0.1", None, "1"), ("b", "10.0.0.2", None, "2")], []),
])
def test_conflicting_peers(peers: list[tuple[str, str, Any, str]], rejected: list[str]) -> None:
    parsed = [parse_peer(peer_obj(name, peerAddress=address, created=created,
                                  **({"nodeSelector": {"matchLabels": sel}} if sel else {})))
              for name, address, sel, created in peers]
    conflicts = conflicting_peers(parsed)
    assert [c.rejected.name for c in conflicts] == rejected
    for conflict in conflicts:
        assert "spec.peerAddress" in conflict.message and "fix:" in conflict.message


# ---- advertisement -------------------------------------------------------------------------------

def test_no_advertisement_is_l2() -> None:
    assert parse_advertisement(None) == L2_ONLY and L2_ONLY.l2 and not L2_ONLY.bgp


def test_a_full_advertisement() -> None:
    adv = parse_advertisement({"mode": "both", "bgp": {
        "communities": ["64512:100", "large:1:2:3"], "localPref": 200, "aggregationLength": 24,
        "aggregationLengthV6": 64, "nodeSelector": {"matchLabels": {"bgp": "yes"}},
        "peerSelector": {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["r1"]}]}}})
    assert adv.mode is Mode.BOTH and adv.l2 and adv.bgp
    assert adv.communities == (Community((64512, 100)), Community((1, 2, 3)))
    assert (adv.local_pref, adv.aggregation_length, adv.aggregation_length_v6) == (200, 24, 64)
    assert adv.node_selector == LabelSelector((("bgp", "yes"),))
    assert adv.peer_selector == LabelSelector((), (Requirement("rack", "In", frozenset({"r1"})),))


@pytest.mark.parametrize(("value", "field"), [
    ("bgp", "spec.advertisement"),
    ({"mode": "ospf"}, "spec.advertisement.mode"),
    ({"mode": "bgp", "bgp": {"communities": ["1:2", "65536:0"]}}, "spec.advertisement.bgp.communities[1]"),
    ({"mode": "bgp", "bgp": {"communities": ["1:2", "1:2"]}}, "spec.advertisement.bgp.communities[1]"),
    ({"mode": "bgp", "bgp": {"communities": "1:2"}}, "spec.advertisement.bgp.communities"),
    ({"mode": "bgp", "bgp": {"localPref": -1}}, "spec.advertisement.bgp.localPref"),
    ({"mode": "bgp", "bgp": {"aggregationLength": 33}}, "spec.advertisement.bgp.aggregationLength"),
    ({"mode": "bgp", "bgp": {"aggregationLengthV6": 129}}, "spec.advertisement.bgp.aggregationLengthV6"),
    ({"mode": "bgp", "bgp": {"peerSelector": {"matchLabels": {"a": 1}}}},
     "spec.advertisement.bgp.peerSelector.matchLabels"),
])
def test_a_bad_advertisement_names_the_field(value: Any, field: str) -> None:
    with pytest.raises(BgpConfigError) as error:
        parse_advertisement(value)
    assert error.value.field == field


def v4(first: str, last: str) -> tuple[int, int, int]:
    return 4, int(ipaddress.ip_address(first)), int(ipaddress.ip_address(last))


@pytest.mark.parametrize(("length", "ranges", "problem"), [
    (32, [v4("198.51.100.0", "198.51.100.63")], None),
    (26, [v4("198.51.100.0", "198.51.100.63")], None),
    (24, [v4("198.51.100.0", "198.51.100.63")], "198.51.100.0/26"),
    # a range: its widest block counts (10.0.0.0-10.0.0.9 is 10.0.0.0/29 + 10.0.0.8/31)
    (29, [v4("10.0.0.0", "10.0.0.9")], None),
    (28, [v4("10.0.0.0", "10.0.0.9")], "10.0.0.0/29"),
    (0, [v4("10.0.0.1", "10.0.0.1")], "10.0.0.1/32"),
])
def test_aggregation_not_shorter_than_the_pool(length: int, ranges: list[tuple[int, int, int]],
                                               problem: str | None) -> None:
    adv = Advertisement(mode=Mode.BGP, aggregation_length=length)
    if problem is None:
        check_aggregation(adv, ranges)
        return
    with pytest.raises(BgpConfigError) as error:
        check_aggregation(adv, ranges)
    assert error.value.field == "spec.advertisement.bgp.aggregationLength" and problem in str(error.value)


def test_aggregation_v6_and_l2_pools() -> None:
    block = (6, int(ipaddress.ip_address("fd00::")), int(ipaddress.ip_address("fd00::ff")))
    with pytest.raises(BgpConfigError, match="aggregationLengthV6"):
        check_aggregation(Advertisement(mode=Mode.BOTH, aggregation_length_v6=112), [block])
    check_aggregation(Advertisement(mode=Mode.BOTH, aggregation_length_v6=120), [block])
    check_aggregation(Advertisement(mode=Mode.L2, aggregation_length=0), [block])  # not announced: no check


# ---- announcing nodes ------------------------------------------------------------------------------

NODES = (NodeInfo("n1", {"rack": "r1"}), NodeInfo("n2", {"rack": "r1"}), NodeInfo("n3", {"rack": "r2"}),
         NodeInfo("n4", {"rack": "r2"}, eligible=False))
BGP = Advertisement(mode=Mode.BGP)
ANY = ("",)  # a ready endpoint on no named node: the Service has somewhere to send traffic


def peers(*specs: tuple[str, dict[str, str], dict[str, str] | None, list[tuple[str, str]]]) -> list[Any]:
    """(name, labels, node selector labels or None, [(node, state)])"""
    return [parse_peer(peer_obj(name, labels, sessions(*states),
                                **({"nodeSelector": {"matchLabels": sel}} if sel else {})))
            for name, labels, sel, states in specs]


ALL_UP = peers(("tor", {}, None, [("n1", "Established"), ("n2", "Established"), ("n3", "Established"),
                                  ("n4", "Established")]))


@pytest.mark.parametrize(("adv", "local", "ready", "peer_list", "expected"), [
    # ETP=Cluster: every eligible node with an Established session (n4 is not eligible), once the
    # Service has an endpoint somewhere (here on a node without a name)
    (BGP, False, ANY, ALL_UP, ("n1", "n2", "n3")),
    # ETP=Cluster without any ready endpoint: nobody (a route would only draw traffic to drop)
    (BGP, False, (), ALL_UP, ()),
    # l2 only: nobody announces by BGP
    (L2_ONLY, False, ANY, ALL_UP, ()),
    # ETP=Local: only nodes with a ready endpoint
    (BGP, True, ("n2", "n4"), ALL_UP, ("n2",)),
    (BGP, True, (), ALL_UP, ()),
    # a session that is not Established does not count
    (BGP, False, ANY, peers(("tor", {}, None, [("n1", "Established"), ("n2", "Active"), ("n3", "Idle")])), ("n1",)),
    # no peers: nobody
    (BGP, False, ANY, [], ()),
    # the pool's nodeSelector
    (Advertisement(mode=Mode.BOTH, node_selector=LabelSelector((("rack", "r2"),))), False, ANY, ALL_UP, ("n3",)),
    # the pool's peerSelector: only sessions with selected peers count
    (Advertisement(mode=Mode.BGP, peer_selector=LabelSelector((("rack", "r2"),))), False, ANY,
     peers(("tor1", {"rack": "r1"}, None, [("n1", "Established"), ("n2", "Established")]),
           ("tor2", {"rack": "r2"}, None, [("n3", "Established")])), ("n3",)),
    # the peer's nodeSelector: a session reported by a node the peer does not select does not count
    (BGP, False, ANY, peers(("tor1", {}, {"rack": "r1"}, [("n1", "Established"), ("n3", "Established")])), ("n1",)),
    # one Established session among several peers is enough
    (BGP, False, ANY, peers(("a", {}, None, [("n1", "Active")]), ("b", {}, None, [("n1", "Established")])), ("n1",)),
])
def test_announcing_nodes(adv: Advertisement, local: bool, ready: tuple[str, ...], peer_list: list[Any],
                          expected: tuple[str, ...]) -> None:
    assert announcing_nodes(adv, local, ready, NODES, peer_list) == expected


@pytest.mark.parametrize(("adv", "peer_list", "reason"), [
    (L2_ONLY, None, None),
    (BGP, None, "NoBGPPeers"),
    (BGP, [], "NoMatchingPeer"),
    (Advertisement(mode=Mode.BGP, peer_selector=LabelSelector((("rack", "r9"),))), ALL_UP, "NoMatchingPeer"),
    (BGP, ALL_UP, None),
    (Advertisement(mode=Mode.BGP, local_pref=200), ALL_UP, "LocalPrefIgnored"),  # tor is eBGP
    (Advertisement(mode=Mode.BGP, local_pref=200), [parse_peer(peer_obj(myASN=64512))], None),  # iBGP
])
def test_advertisement_problem(adv: Advertisement, peer_list: list[Any] | None, reason: str | None) -> None:
    problem = advertisement_problem(adv, peer_list)
    assert (problem.reason if problem else None) == reason
    if problem is not None:
        assert "spec.advertisement" in problem.message and "fix:" in problem.message
