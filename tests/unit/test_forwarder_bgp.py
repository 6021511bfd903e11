"""The BGP speaker's pure parts: BGPPeer and advertisement parsing, the routes each node announces
to each peer, ExaBGP's configuration, commands and events, the status entry and its throttle."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lbctl.forwarder.bgp import OWNER_FILE, l2_states, make_workdir, remove_stale, unique_peers
from lbctl.forwarder.bgp_decide import NodeView, Route, announcements, bgp_only_addresses
from lbctl.forwarder.bgp_exabgp import (
    ExaBgp,
    Neighbor,
    StateEvent,
    announce_command,
    parse_event,
    remove_workdir,
    render_config,
    render_neighbor,
    withdraw_command,
)
from lbctl.forwarder.bgp_model import (
    BadField,
    Peer,
    PoolAdvert,
    parse_advertisement,
    parse_duration,
    parse_peer,
    parse_pool_advert,
    parse_selector,
)
from lbctl.forwarder.bgp_status import NodeEntry, apply_body, writes_due
from lbctl.forwarder.main import ForwarderConfig
from lbctl.forwarder.state import Backend, ServicePort, ServiceState
from tests.loopcheck import file_work_on_this_thread


def peer_obj(name: str = "tor", labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"peerAddress": "10.0.0.1", "peerASN": 64500, "myASN": 64512, **spec}
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": body}


def pool_obj(name: str, addresses: list[str], advertisement: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"addresses": addresses}
    if advertisement is not None:
        spec["advertisement"] = advertisement
    return {"metadata": {"name": name}, "spec": spec}


def svc(key: str, ips: tuple[str, ...], local: bool = False, endpoint_nodes: frozenset[str] = frozenset({"n9"}),
        announce: bool = True) -> ServiceState:
    backends = tuple(Backend(f"10.1.0.{i}", 8080, node) for i, node in enumerate(sorted(endpoint_nodes)))
    port = ServicePort("http", "tcp", 80, None, backends)
    return ServiceState(key=key, uid="u", created="", ports=(port,), lb_ips=ips, local_only=local,
                        endpoint_nodes=endpoint_nodes, announce=announce)


NODE = NodeView("n1", {"rack": "a"}, ("192.0.2.11", "2001:db8::11"))
BGP_POOL = parse_pool_advert(pool_obj("p", ["198.51.100.0/24", "2001:db8:1::/120"],
                                      {"mode": "bgp", "bgp": {"communities": ["64512:1", "large:1:2:3"]}}))
L2_POOL = parse_pool_advert(pool_obj("l2", ["203.0.113.0/24"]))
PEER = parse_peer(peer_obj())


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("1m30s", 90), ("0s", 0), ("1h", 3600), (3, 3)])
def test_durations(text: Any, seconds: int) -> None:
    assert parse_duration(text, "f") == seconds


@pytest.mark.parametrize(("spec", "field"), [
    ({"peerASN": 0}, "spec.peerASN"),
    ({"myASN": 4294967296}, "spec.myASN"),
    ({"peerAddress": "10.0.0.300"}, "spec.peerAddress"),
    ({"peerPort": 70000}, "spec.peerPort"),
    ({"holdTime": "2s"}, "spec.holdTime"),
    ({"holdTime": "soon"}, "spec.holdTime"),
    ({"passwordSecretRef": {"key": "x"}}, "spec.passwordSecretRef.name"),
    ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
     "spec.nodeSelector.matchExpressions[0].operator"),
])
def test_a_bad_peer_names_its_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(BadField) as caught:
        parse_peer(peer_obj(**spec))
    assert caught.value.field == field


def test_peer_defaults_and_options() -> None:
    assert (PEER.port, PEER.hold_s, PEER.keepalive_s, PEER.multihop, PEER.graceful_restart) == (179, 90, 30, False,
                                                                                                 False)
    peer = parse_peer(peer_obj(holdTime="3s", keepaliveTime="1s", ebgpMultiHop=True, gracefulRestart=True,
                               sourceAddress="192.0.2.99", passwordSecretRef={"name": "s"}))
    assert (peer.hold_s, peer.keepalive_s, peer.multihop, peer.graceful_restart) == (3, 1, True, True)
    assert str(peer.source) == "192.0.2.99" and peer.password_secret == ("s", "password")


@pytest.mark.parametrize(("advertisement", "field"), [
    ({"mode": "ospf"}, "spec.advertisement.mode"),
    ({"mode": "bgp", "bgp": {"communities": ["65536:1"]}}, "spec.advertisement.bgp.communities[0]"),
    ({"mode": "bgp", "bgp": {"communities": ["large:1:2"]}}, "spec.advertisement.bgp.communities[0]"),
    ({"mode": "bgp", "bgp": {"aggregationLength": 33}}, "spec.advertisement.bgp.aggregationLength"),
    ({"mode": "bgp", "bgp": {"localPref": -1}}, "spec.advertisement.bgp.localPref"),
])
def test_a_bad_advertisement_names_its_field(advertisement: dict[str, Any], field: str) -> None:
    with pytest.raises(BadField) as caught:
        parse_advertisement({"advertisement": advertisement})
    assert caught.value.field == field


def test_advertisement_communities_and_default() -> None:
    assert parse_advertisement({}).mode == "l2"
    advert = BGP_POOL.advertisement
    assert (advert.communities, advert.large_communities) == (("64512:1",), ("1:2:3",))


def test_selectors() -> None:
    selector = parse_selector({"matchLabels": {"rack": "a"},
                               "matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}, "s")
    assert selector.matches({"rack": "a"})
    assert not selector.matches({"rack": "a", "spot": "yes"})
    assert not selector.matches({"rack": "b"})
    assert parse_selector(None, "s").matches({})


def test_pool_ranges() -> None:
    pool = parse_pool_advert(pool_obj("r", ["10.0.0.10-10.0.0.12", "10.0.1.0/30", "10.0.2.5"]))
    assert [pool.contains(ipaddress.ip_address(a)) for a in
            ("10.0.0.11", "10.0.0.13", "10.0.1.3", "10.0.2.5", "10.0.2.6")] == [True, False, True, True, False]


def test_two_peers_with_one_address_keep_the_first_by_name() -> None:
    kept, skipped = unique_peers([parse_peer(peer_obj("a")), parse_peer(peer_obj("b"))])
    assert [p.name for p in kept] == ["a"] and "spec.peerAddress" in skipped["b"]


# -- decisions -------------------------------------------------------------------------------------
def routes(result: dict[str, frozenset[Route]], peer: str = "tor") -> set[str]:
    return {r.prefix for r in result[peer]}


@pytest.mark.parametrize(("state", "node", "expected"), [
    # ETP=Cluster: every eligible node announces, once there is an endpoint anywhere
    (svc("a/s", ("198.51.100.7",)), NODE, {"198.51.100.7/32"}),
    (svc("a/s", ("198.51.100.7",), endpoint_nodes=frozenset()), NODE, set()),
    # ETP=Local: only with a ready local endpoint
    (svc("a/s", ("198.51.100.7",), local=True, endpoint_nodes=frozenset({"n2"})), NODE, set()),
    (svc("a/s", ("198.51.100.7",), local=True, endpoint_nodes=frozenset({"n1"})), NODE, {"198.51.100.7/32"}),
    # an excluded node announces nothing
    (svc("a/s", ("198.51.100.7",)), NodeView("n1", {}, ("192.0.2.11",), eligible=False), set()),
    # an address of an l2 pool, of no pool, or of another class's Service: not by BGP
    (svc("a/s", ("203.0.113.5",)), NODE, set()),
    (svc("a/s", ("192.0.2.200",)), NODE, set()),
    (svc("a/s", ("198.51.100.7",), announce=False), NODE, set()),
    # IPv6: /128 with the node's IPv6 address as next hop
    (svc("a/s", ("2001:db8:1::5",)), NODE, {"2001:db8:1::5/128"}),
    # no IPv6 address on the node: no IPv6 route
    (svc("a/s", ("2001:db8:1::5",)), NodeView("n1", {}, ("192.0.2.11",)), set()),
])
def test_what_a_node_announces(state: ServiceState, node: NodeView, expected: set[str]) -> None:
    assert routes(announcements(node, [PEER], [BGP_POOL, L2_POOL], [state])) == expected


def test_route_attributes_and_next_hop() -> None:
    result = announcements(NODE, [PEER], [BGP_POOL], [svc("a/s", ("198.51.100.7", "2001:db8:1::5"))])
    by_prefix = {r.prefix: r for r in result["tor"]}
    assert by_prefix["198.51.100.7/32"] == Route("198.51.100.7/32", "192.0.2.11", ("64512:1",), ("1:2:3",), None)
    assert by_prefix["2001:db8:1::5/128"].next_hop == "2001:db8::11"
    # localPref only towards iBGP peers; sourceAddress is the next hop when set
    pool = parse_pool_advert(pool_obj("p", ["198.51.100.0/24"], {"mode": "both", "bgp": {"localPref": 200}}))
    ibgp = parse_peer(peer_obj("ibgp", myASN=64500, sourceAddress="192.0.2.50", peerAddress="10.0.0.2"))
    result = announcements(NODE, [PEER, ibgp], [pool], [svc("a/s", ("198.51.100.7",))])
    assert [r.local_pref for r in result["ibgp"]] == [200] and [r.local_pref for r in result["tor"]] == [None]
    assert [r.next_hop for r in result["ibgp"]] == ["192.0.2.50"]


def test_aggregation_merges_addresses_into_one_prefix() -> None:
    pool = parse_pool_advert(pool_obj("p", ["198.51.100.0/24"], {"mode": "bgp", "bgp": {"aggregationLength": 24}}))
    result = announcements(NODE, [PEER], [pool], [svc("a/s", ("198.51.100.7",)), svc("a/t", ("198.51.100.9",))])
    assert routes(result) == {"198.51.100.0/24"}


def test_node_and_peer_selectors() -> None:
    rack_b = parse_peer(peer_obj("rack-b", nodeSelector={"matchLabels": {"rack": "b"}}, peerAddress="10.0.0.2"))
    result = announcements(NODE, [PEER, rack_b], [BGP_POOL], [svc("a/s", ("198.51.100.7",))])
    assert set(result) == {"tor"}  # rack-b does not select this node
    spine = parse_peer(peer_obj("spine", labels={"tier": "spine"}, peerAddress="10.0.0.3"))
    pool = parse_pool_advert(pool_obj("p", ["198.51.100.0/24"], {"mode": "bgp", "bgp": {
        "peerSelector": {"matchLabels": {"tier": "spine"}}, "nodeSelector": {"matchLabels": {"rack": "a"}}}}))
    result = announcements(NODE, [PEER, spine], [pool], [svc("a/s", ("198.51.100.7",))])
    assert routes(result, "spine") == {"198.51.100.7/32"} and routes(result, "tor") == set()
    other_rack = NodeView("n2", {"rack": "b"}, ("192.0.2.12",))
    assert routes(announcements(other_rack, [PEER, spine], [pool], [svc("a/s", ("198.51.100.7",))]), "spine") == set()


def test_shared_address_announced_when_any_service_wants_it() -> None:
    states = [svc("a/s", ("198.51.100.7",), local=True, endpoint_nodes=frozenset({"n2"})),
              svc("a/t", ("198.51.100.7",))]
    assert routes(announcements(NODE, [PEER], [BGP_POOL], states)) == {"198.51.100.7/32"}


def test_bgp_only_addresses_are_left_out_of_layer_2() -> None:
    both = parse_pool_advert(pool_obj("b", ["192.0.2.0/24"], {"mode": "both"}))
    ips = ["198.51.100.7", "203.0.113.5", "192.0.2.9", "not-an-ip"]
    assert bgp_only_addresses(ips, [BGP_POOL, L2_POOL, both]) == {"198.51.100.7"}
    states = l2_states([svc("a/s", ("198.51.100.7", "203.0.113.5"))], frozenset({"198.51.100.7"}))
    assert states[0].lb_ips == ("203.0.113.5",)


# -- ExaBGP ----------------------------------------------------------------------------------------
def test_exabgp_configuration() -> None:
    peer = parse_peer(peer_obj(holdTime="3s", gracefulRestart=True, ebgpMultiHop=True, peerPort=1790))
    text = render_neighbor(Neighbor(peer, "192.0.2.11", "192.0.2.11", "s3cret"))
    for line in ("neighbor 10.0.0.1 {", "local-address 192.0.2.11;", "local-as 64512;", "peer-as 64500;",
                 "hold-time 3;", "connect 1790;", "outgoing-ttl 255;", 'md5-password "s3cret";',
                 "capability { graceful-restart 120; }", "api { processes [ lbctl ]; neighbor-changes; fsm; }"):
        assert line in text, line
    assert "md5-password" not in render_neighbor(Neighbor(PEER, "192.0.2.11", "192.0.2.11"))
    with pytest.raises(ValueError):
        render_neighbor(Neighbor(PEER, "192.0.2.11", "192.0.2.11", 'a";b'))
    config = render_config([Neighbor(PEER, "192.0.2.11", "192.0.2.11")], ["/usr/bin/python3", "-m", "relay", "/s"])
    assert config.startswith("process lbctl {\n    run /usr/bin/python3 -m relay /s;\n    encoder json;\n}\n")


def test_exabgp_commands() -> None:
    route = Route("198.51.100.7/32", "192.0.2.11", ("64512:1",), ("1:2:3",), 150)
    assert announce_command("10.0.0.1", route) == (
        "neighbor 10.0.0.1 announce route 198.51.100.7/32 next-hop 192.0.2.11 local-preference 150 "
        "community [ 64512:1 ] large-community [ 1:2:3 ]")
    assert withdraw_command("10.0.0.1", route) == "neighbor 10.0.0.1 withdraw route 198.51.100.7/32 next-hop 192.0.2.11"


def _event(kind: str, **neighbor: Any) -> str:
    return json.dumps({"type": kind, "neighbor": {"address": {"local": "192.0.2.11", "peer": "10.0.0.1"},
                                                  **neighbor}})


@pytest.mark.parametrize(("line", "parsed"), [
    ("done\n", "done"),
    ("error", "error"),
    (_event("state", state="up"), StateEvent("10.0.0.1", "Established")),
    (_event("state", state="connected"), StateEvent("10.0.0.1", "OpenSent")),
    (_event("state", state="down", reason="peer reset"), StateEvent("10.0.0.1", "Active", "session down: peer reset")),
    (_event("fsm", state="OPENCONFIRM"), StateEvent("10.0.0.1", "OpenConfirm")),
    (_event("update"), None),
    ("{not json", None),
])
def test_exabgp_events(line: str, parsed: object) -> None:
    assert parse_event(line) == parsed


# -- status ----------------------------------------------------------------------------------------
def test_status_entry_and_throttle() -> None:
    entry = NodeEntry("Established", "2026-01-01T00:00:00Z", 2)
    assert apply_body("tor", "n1", entry) == {
        "apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
        "status": {"nodes": [{"node": "n1", "state": "Established", "since": "2026-01-01T00:00:00Z",
                              "routesAnnounced": 2}]}}
    assert "message" in apply_body("tor", "n1", NodeEntry("Active", "t", 0, "session down"))["status"]["nodes"][0]
    more = NodeEntry("Established", "2026-01-01T00:00:00Z", 3)
    assert writes_due({"tor": entry}, {}, 1.0, 300.0, float("-inf"), 60.0) == (["tor"], None)
    assert writes_due({"tor": entry}, {"tor": (entry, 0.0)}, 10.0, 300.0, float("-inf"), 60.0) == ([], None)
    assert writes_due({"tor": entry}, {"tor": (entry, 0.0)}, 301.0, 300.0, float("-inf"), 60.0) == ([], "tor")
    assert writes_due({"tor": more}, {"tor": (entry, 0.0)}, 10.0, 300.0, 5.0, 60.0) == (["tor"], None)


def test_status_refreshes_add_at_most_one_write_a_minute_however_many_peers() -> None:
    """The write budget (issue 9): a node's steady-state writes stay under one per 10 s with the
    Lease renewed every 15 s, for any number of BGPPeers."""
    entry = NodeEntry("Established", "2026-01-01T00:00:00Z", 2)
    wanted = {f"peer-{n:02d}": entry for n in range(20)}
    written = {peer: (entry, 0.0) for peer in wanted}
    refreshed_at, writes = float("-inf"), []
    for now in range(0, 3601):  # PeerStatus looks once a second
        changed, refresh = writes_due(wanted, written, float(now), 300.0, refreshed_at, 60.0)
        assert changed == []
        if refresh is not None:
            refreshed_at = now
            written[refresh] = (entry, float(now))
            writes.append(now)
    assert len(writes) <= 60 and all(b - a >= 60 for a, b in itertools.pairwise(writes))
    assert len(writes) >= 40  # and they do happen: each entry refreshed within 20 minutes
    lease_per_min = 60 / ForwarderConfig(node="n").renew_interval_s
    assert lease_per_min + len(writes) / 60 <= 5  # every write a forwarder makes in steady state: <= 5 a minute < 6


def test_peer_is_hashable_plain_data() -> None:
    assert isinstance(hash(PEER), int) and isinstance(PEER, Peer) and isinstance(BGP_POOL, PoolAdvert)


def test_stale_speaker_directories_go_and_live_ones_stay(tmp_path: Any) -> None:
    """A forwarder killed with -9 leaves its ExaBGP directory (ExaBGP died with it); the next start
    removes it, and leaves a directory whose forwarder still runs (another lab's node of that name)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead, alive = tmp_path / "lbctl-bgp-n1-dead", tmp_path / "lbctl-bgp-n1-alive"
    for path, pid in ((dead, gone.stdout.strip()), (alive, str(os.getpid()))):
        path.mkdir()
        (path / OWNER_FILE).write_text(pid + "\n")
    remove_stale(str(tmp_path), "n1")
    assert not dead.exists() and alive.exists()


def test_the_bgp_speakers_files_are_made_and_written_off_the_event_loop(tmp_path: Path) -> None:
    """Issue 9: the forwarder's loop (heartbeats every 0.2 s) never waits on a file. ExaBGP's
    directory, configuration and socket are made in threads (`true` stands in for Python here, so
    no ExaBGP runs)."""
    base = tmp_path / "base"
    base.mkdir()
    ran = []

    async def speaker_lifecycle() -> None:
        workdir = await asyncio.to_thread(make_workdir, "n1", str(base))
        exabgp = ExaBgp(workdir, lambda event: None, ran.append, python=shutil.which("true") or "/bin/true")
        await exabgp.start()
        await exabgp.configure([Neighbor(PEER, "192.0.2.11", "192.0.2.11", "s3cret")])
        await exabgp.configure([Neighbor(PEER, "192.0.2.12", "192.0.2.12", "s3cret")])
        await exabgp.stop()
        await asyncio.to_thread(remove_workdir, workdir)

    with file_work_on_this_thread() as file_work:
        asyncio.run(speaker_lifecycle())
    assert file_work == []
    assert ran and not list(base.iterdir())  # it ran (and was started again) and its directory is gone
