"""BGP in the operator's pure decisions (lbctl.operator.bgp) and in `lbctl status` / `lbctl doctor`."""

from __future__ import annotations

from typing import Any

import pytest

from lbctl.model.bgp import Advertisement, BgpConfigError, Mode, NodeInfo, parse_peer
from lbctl.model.scope import Scope
from lbctl.operator.bgp import change_event, desired_annotation, desired_annotations, ready_nodes_by_service
from lbctl.report import doctor
from lbctl.report.status import _served_by, bgp_nodes
from providers.local_pools import parse_pool

POOL = parse_pool({"metadata": {"name": "bgp"}, "spec": {"addresses": ["198.51.100.0/28"]}})
BGP = Advertisement(mode=Mode.BGP)


def service(ip: str | None = "198.51.100.1", etp: str = "Cluster", annotations: dict[str, str] | None = None,
            name: str = "web") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "annotations": annotations or {}},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "externalTrafficPolicy": etp},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}] if ip else []}}}


def peer(sessions: list[tuple[str, str, str]], name: str = "tor", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"peerAddress": "192.0.2.1", "peerASN": 64512, "myASN": 64513,
                                                  **spec},
            "status": {"nodes": [{"node": n, "state": s, "message": m} for n, s, m in sessions]}}


NODES = [NodeInfo("n1"), NodeInfo("n2")]
UP = [parse_peer(peer([("n1", "Established", ""), ("n2", "Established", "")]))]


@pytest.mark.parametrize(("svc", "advertisement", "ready", "expected"), [
    (service(), BGP, ("n9",), "n1,n2"),
    (service(), BGP, (), ""),  # no endpoint anywhere: no route
    (service(etp="Local"), BGP, ("n2",), "n2"),
    (service(ip=None), BGP, (), None),  # no address yet
    (service(ip="10.9.9.9"), BGP, (), None),  # not from a pool known here
    (service(), Advertisement(mode=Mode.L2), (), None),
    (service(), BgpConfigError("spec.advertisement.bgp.aggregationLength", "too short"), (), ""),
])
def test_desired_annotation(svc: dict[str, Any], advertisement: Any, ready: tuple[str, ...],
                            expected: str | None) -> None:
    assert desired_annotation(svc, [(POOL, advertisement)], UP, NODES, ready) == expected


def test_desired_annotations_lists_only_differences_of_our_services() -> None:
    scope = Scope("lbctl.io/local", False, frozenset())
    current = service(annotations={"lbctl.io/bgp-announcing-nodes": "n1,n2"}, name="same")
    stale = service(annotations={"lbctl.io/bgp-announcing-nodes": "n1"}, name="stale")
    other = {**service(name="other"), "spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/x"}}
    ready = {"shop/same": {"n1"}, "shop/stale": {"n1"}}
    changes = desired_annotations([current, stale, other], scope, [(POOL, BGP)], UP, NODES, ready)
    assert changes == {"shop/stale": ("n1", "n1,n2")}


def test_ready_nodes_by_service() -> None:
    slices = [{"metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
               "endpoints": [{"nodeName": "n1", "conditions": {"ready": True}}, {"nodeName": "n2", "conditions": {}},
                             {"nodeName": "n3", "conditions": {"ready": False}}, {"conditions": {}}]},
              {"metadata": {"namespace": "shop"}, "endpoints": [{"nodeName": "n9"}]}]
    assert ready_nodes_by_service(slices) == {"shop/web": {"n1", "n2", ""}}


@pytest.mark.parametrize(("before", "after", "event"), [
    (None, "n1,n2", ("Normal", "BGPAnnouncingNodes", "198.51.100.1 announced by BGP from n1, n2")),
    ("n1", "n1,n2", ("Normal", "BGPAnnouncingNodes", "from n1, n2 (before: n1)")),
    ("n1", "", ("Warning", "BGPNotAnnounced", "no node announces 198.51.100.1 by BGP (before: n1)")),
    ("n1", None, None),
])
def test_change_event(before: str | None, after: str | None, event: tuple[str, str, str] | None) -> None:
    found = change_event(service(), before, after)
    if event is None:
        assert found is None
        return
    assert found is not None and found[:2] == event[:2] and event[2] in found[2]


@pytest.mark.parametrize(("annotations", "served_by", "nodes"), [
    ({"lbctl.io/announcing-node": "n3"}, "n3 (L2)", None),
    ({"lbctl.io/bgp-announcing-nodes": "n1,n2"}, "n1,n2 (BGP)", ("n1", "n2")),
    ({"lbctl.io/bgp-announcing-nodes": ""}, "none (BGP)", ()),
    ({"lbctl.io/announcing-node": "n3", "lbctl.io/bgp-announcing-nodes": "n1"}, "n3 (L2); n1 (BGP)", ("n1",)),
    ({}, "-", None),
])
def test_status_shows_bgp_nodes_where_it_shows_the_l2_node(annotations: dict[str, str], served_by: str,
                                                           nodes: tuple[str, ...] | None) -> None:
    assert _served_by(service(annotations=annotations), "local") == served_by
    assert bgp_nodes(service(annotations=annotations)) == nodes


def node(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def bgp_pool(**bgp: Any) -> dict[str, Any]:
    return {"metadata": {"name": "bgp"}, "spec": {"addresses": ["198.51.100.0/28"],
                                                  "advertisement": {"mode": "bgp", "bgp": bgp}}}


@pytest.mark.parametrize(("peers", "pools", "expected"), [
    # every selected node Established
    ([peer([("n1", "Established", ""), ("n2", "Established", "")])], [], {"bgppeer tor": "pass"}),
    # one of two
    ([peer([("n1", "Established", ""), ("n2", "Active", "connection refused")])], [], {"bgppeer tor": "warn"}),
    # none: fail with the fix
    ([peer([("n1", "Active", "bad password")])], [], {"bgppeer tor": "fail"}),
    # a node selector choosing no node
    ([peer([], nodeSelector={"matchLabels": {"rack": "r9"}})], [], {"bgppeer tor": "warn"}),
    # an invalid peer
    ([peer([], holdTime="2s")], [], {"bgppeer tor": "fail"}),
    # a bgp pool with no peer at all, or no matching one
    ([], [bgp_pool()], {"pool bgp bgp": "fail"}),
    ([peer([("n1", "Established", ""), ("n2", "Established", "")])],
     [bgp_pool(peerSelector={"matchLabels": {"rack": "r1"}})], {"pool bgp bgp": "fail", "bgppeer tor": "pass"}),
    ([peer([("n1", "Established", ""), ("n2", "Established", "")])], [bgp_pool()],
     {"pool bgp bgp": "pass", "bgppeer tor": "pass"}),
    ([peer([("n1", "Established", ""), ("n2", "Established", "")])], [bgp_pool(localPref=100)],
     {"pool bgp bgp": "warn", "bgppeer tor": "pass"}),
    ([peer([("n1", "Established", ""), ("n2", "Established", "")])], [bgp_pool(aggregationLength=24)],
     {"pool bgp bgp": "fail", "bgppeer tor": "pass"}),
    # l2 pools and no peers: nothing to say
    ([], [{"metadata": {"name": "l2"}, "spec": {"addresses": ["10.0.0.0/30"]}}], {}),
    (None, [{"metadata": {"name": "l2"}, "spec": {"addresses": ["10.0.0.0/30"]}}], {}),
    # a bgp pool in a cluster without the BGPPeer CRD
    (None, [bgp_pool()], {"pool bgp bgp": "fail"}),
])
def test_doctor_checks_bgp(peers: list[dict[str, Any]] | None, pools: list[dict[str, Any]],
                           expected: dict[str, str]) -> None:
    checks = doctor.check_bgp(peers, pools, [node("n1"), node("n2")])
    assert {c.name: c.status for c in checks} == expected
    for check in checks:
        if check.status in (doctor.FAIL, doctor.WARN):
            assert check.fix, check


def test_doctor_says_when_the_peer_crd_is_missing() -> None:
    [check] = doctor.check_bgp(None, [bgp_pool()], [node("n1")])
    assert check.message.startswith("NoBGPPeers") and "crd-bgppeer.yaml" in check.fix


def test_doctor_names_the_sessions_and_the_fix() -> None:
    [check] = doctor.check_bgp([peer([("n1", "Active", "bad password")])], [], [node("n1"), node("n2")])
    assert "n1: Active (bad password); n2: no session reported" in check.message
    assert "password" in check.fix


def test_the_local_provider_reports_what_it_refuses_and_what_the_speakers_still_use() -> None:
    """An aggregation shorter than the pool's CIDR: Advertised False naming the field, while
    `announced` gives the advertisement as the speakers read it; a duplicate peer: Valid False, its
    sessions still counted (the speakers open them); a peer that does not parse: not counted."""
    import asyncio

    from providers.local import BGP_PEERS, POOLS, LocalProvider

    provider = LocalProvider("test")
    wide = bgp_pool(aggregationLength=24)
    peers_ = [peer([], name="a"), {**peer([]), "metadata": {"name": "b", "creationTimestamp": "2027-01-01T00:00:00Z"}},
              {**peer([], holdTime="2s"), "metadata": {"name": "c"}}]

    async def feed() -> None:
        await provider.resources_changed(BGP_PEERS, peers_)
        await provider.resources_changed(POOLS, [wide])

    asyncio.run(feed())
    [ready, advertised] = provider.resource_status(POOLS)["bgp"]["conditions"]
    assert ready["status"] == "True" and advertised["status"] == "False"
    assert advertised["reason"] == "InvalidAdvertisement" and "aggregationLength" in advertised["message"]
    assert isinstance(provider.advertisement("bgp"), BgpConfigError)
    announced = provider.announced("bgp")
    assert announced is not None and announced.aggregation_length == 24
    valid = {name: status["conditions"][0] for name, status in provider.resource_status(BGP_PEERS).items()}
    assert (valid["a"]["status"], valid["b"]["reason"], valid["c"]["reason"]) == ("True", "DuplicatePeer",
                                                                                   "InvalidPeer")
    assert [provider.peer_counted(n) for n in "abc"] == [True, True, False]
