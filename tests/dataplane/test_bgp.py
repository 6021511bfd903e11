"""BGP mode against a real router: FRR's bgpd (with zebra) in a router namespace between a client and
the nodes; every forwarder speaks BGP through ExaBGP. The router's own view (vtysh JSON, and the
kernel route zebra installs) is the proof: one route per address with a next hop per announcing
node (ECMP), flows from one client spread over the nodes, ETP=Local announced only where an
endpoint is, withdrawals on SIGTERM, kill -9 and a cut link, routes kept while the apiserver is
away. The times are printed; bench/bgp.py measures them."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from lbctl.lab.kube import absent_ok, holds_for, wait_for
from lbctl.lab.netns import http_get
from lbctl.lab.router import Router, install_bgp_api, start_bird, start_router
from lbctl.lab.server import parse_answer
from lbctl.model.meta import BGP_ANNOUNCING_NODES_ANNOTATION
from tests.dataplane.harness import NODES, DataplaneEnv, Pod
from tests.dataplane.test_static_stability import apiserver_away

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
ROUTER_ASN, NODE_ASN, BIRD_ASN = 64500, 64512, 64501
HOLD_S = 3
PEER = "tor"
_blocks = iter(range(16, 240, 16))  # a /28 of 198.19.240.0/24 per test: addresses no LAN has

@pytest.fixture(scope="module")
def router(dp: DataplaneEnv) -> Iterator[Router]:
    """The router (FRR) on the LAN and one BGPPeer every node peers with; the peer is deleted at
    the end (the forwarders then close their sessions), the router goes with the lab."""
    install_bgp_api(dp.kube)  # done by the session already (idempotent)
    result = start_router(dp.lab, ROUTER_ASN, NODE_ASN, HOLD_S)
    peer = {"apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": PEER},
            "spec": {"peerAddress": result.lan_address, "peerASN": ROUTER_ASN, "myASN": NODE_ASN,
                     "holdTime": f"{HOLD_S}s"}}
    dp.kube.custom.create_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", peer)
    for index in NODES:  # dual-stack Nodes: the IPv6 routes' next hop is the node's IPv6 InternalIP
        # a JSON patch: a strategic merge would merge the two InternalIPs by their type into one
        dp.kube.core.patch_node_status(f"node-{index}", [{"op": "replace", "path": "/status/addresses", "value": [
            {"type": "InternalIP", "address": dp.lab.node_address(index)},
            {"type": "InternalIP", "address": dp.lab.node6_address(index)},
            {"type": "Hostname", "address": f"node-{index}"}]}])
    try:
        nodes = {dp.lab.node_address(i) for i in NODES}
        # generous: on a loaded machine a forwarder's first list can take until its client's timeout (60 s)
        wait_for(lambda: result.established() >= nodes, 150, "a session Established with every node", interval=0.2)
        yield result
    finally:
        with contextlib.suppress(ApiException):
            dp.kube.custom.delete_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER)


@pytest.fixture
def bgp_namespace(dp: DataplaneEnv, router: Router) -> Iterator[str]:
    """A Kubernetes namespace with its own pool of 16 addresses advertised by BGP only."""
    name = f"bgp-{uuid.uuid4().hex[:8]}"
    dp.kube.create_namespace(name)
    block = next(_blocks)
    with contextlib.ExitStack() as undo:
        undo.callback(dp.remove_pods, name)
        undo.callback(dp.kube.delete_pool, name)
        undo.callback(dp.kube.delete_namespace, name)
        undo.callback(dp.ensure_forwarders)
        dp.kube.create_pool(name, [f"198.19.240.{block}/28", f"2001:db8:3:{block:x}::/124"], namespaces=[name],
                            advertisement={"mode": "bgp", "bgp": {"communities": ["64512:100"]}})
        yield name


def node_hop(dp: DataplaneEnv, index: int) -> str:
    return dp.lab.node_address(index)


def hops_of(dp: DataplaneEnv, nodes: set[int] | tuple[int, ...]) -> set[str]:
    return {node_hop(dp, i) for i in nodes}


def through(dp: DataplaneEnv, router: Router, vip: str, port: int | None = None) -> int | None:
    """The node one request from the client behind the router went through (ETP=Cluster
    masquerades with the node's address), or None when it failed."""
    source = (router.client_address, port) if port else None
    try:
        _pod, peer = parse_answer(http_get(router.client, vip, 80, timeout=1.0, source=source))
    except OSError:
        return None
    return dp.node_of(peer)


def web(dp: DataplaneEnv, ns: str, nodes: tuple[int, ...], **spec: Any) -> tuple[str, list[Pod]]:
    pods = [dp.add_pod(ns, "web", node) for node in nodes]
    dp.kube.create_service(ns, "web", {"app": "web"}, [HTTP], **spec)
    vip = dp.kube.wait_external_ip(ns, "web")
    assert vip.startswith("198.19.240."), vip
    return vip, pods


def peer_status(dp: DataplaneEnv) -> dict[str, dict[str, Any]]:
    obj = dp.kube.custom.get_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER)
    return {e["node"]: e for e in (obj.get("status") or {}).get("nodes") or ()}


def test_every_node_announces_and_the_router_spreads_flows_over_them(dp: DataplaneEnv, router: Router,
                                                                    bgp_namespace: str) -> None:
    vip, _pods = web(dp, bgp_namespace, NODES)
    prefix = f"{vip}/32"
    started = time.monotonic()
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node", interval=0.1)
    print(f"\nroute with {len(NODES)} next hops {time.monotonic() - started:.2f}s after the address was assigned")
    wait_for(lambda: router.kernel_next_hops(vip) == hops_of(dp, NODES), 10, "a multipath route in the kernel")
    paths = router.route_attributes(prefix)
    assert all("64512:100" in ((p.get("community") or {}).get("string") or "") for p in paths), paths
    assert sum(1 for p in paths if p.get("multipath") or p.get("bestpath")) == len(NODES), paths
    # BGP only: no node holds the address on an interface (nor answers ARP for it)
    assert all(vip not in dp.vips_on(i) for i in NODES)

    # many flows (one per client source port) reach the pods, through more than one node
    wait_for(lambda: through(dp, router, vip) is not None, 20, "an answer through the router")
    seen = [through(dp, router, vip, port) for port in range(41000, 41040)]
    assert None not in seen, seen
    counts = {n: seen.count(n) for n in set(seen)}
    print(f"40 flows through nodes: {counts}")
    assert len(counts) >= 2, counts

    # each node reports its session and routes on the BGPPeer
    def reported() -> bool:
        status = peer_status(dp)
        return all(status.get(f"node-{i}", {}).get("state") == "Established"
                   and status[f"node-{i}"].get("routesAnnounced", 0) >= 1 for i in NODES)
    wait_for(reported, 20, "status.nodes[] Established with routes from every node", interval=0.2)
    # the operator names the announcing nodes from those entries
    wait_for(lambda: dp.kube.annotation(bgp_namespace, "web", BGP_ANNOUNCING_NODES_ANNOTATION)
             == "node-1,node-2,node-3", 20, "the Service's bgp-announcing-nodes annotation")


def test_etp_local_announces_only_from_nodes_with_an_endpoint(dp: DataplaneEnv, router: Router,
                                                             bgp_namespace: str) -> None:
    vip, pods = web(dp, bgp_namespace, (1, 2), externalTrafficPolicy="Local")
    prefix = f"{vip}/32"
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, (1, 2)), 20, f"{prefix} from node-1 and node-2",
             interval=0.1)
    holds_for(lambda: router.next_hops(prefix) == hops_of(dp, (1, 2)), 1.0, "no route from node-3")
    # node-2's last endpoint goes: node-2 withdraws, node-1 still carries it
    pod2 = next(p for p in pods if p.node == 2)
    dp.kube.set_pod_ready(bgp_namespace, pod2.name, False)
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, (1,)), 20, f"{prefix} withdrawn by node-2",
             interval=0.1)
    wait_for(lambda: router.kernel_next_hops(vip) == hops_of(dp, (1,)), 10, "the kernel route via node-1 only")
    assert {through_local(router, vip, port) for port in range(41100, 41110)} == {pods[0].name}


def through_local(router: Router, vip: str, port: int) -> str | None:
    """The pod that answered (ETP=Local keeps the client's address, so the pod is what tells)."""
    try:
        pod, _peer = parse_answer(http_get(router.client, vip, 80, timeout=1.0, source=(router.client_address, port)))
    except OSError:
        return None
    return pod


def test_sigterm_withdraws_at_once_and_a_restart_announces_again(dp: DataplaneEnv, router: Router,
                                                                  bgp_namespace: str) -> None:
    vip, _pods = web(dp, bgp_namespace, NODES)
    prefix = f"{vip}/32"
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node", interval=0.1)
    started = time.monotonic()
    dp.stop_forwarder(3)  # SIGTERM: withdraw first
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, (1, 2)), 10, "node-3's route withdrawn", interval=0.02)
    elapsed = time.monotonic() - started
    print(f"\nSIGTERM → route withdrawn in {elapsed:.2f}s (hold time {HOLD_S}s)")
    assert elapsed < HOLD_S, "withdrawn only by the hold timer, not by the forwarder"
    # the nft rules stay (as today): traffic through the other nodes is unaffected
    assert all(through(dp, router, vip, port) in (1, 2) for port in range(41200, 41210))
    dp.start_forwarder(3)
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 30, "node-3 announcing again", interval=0.1)


def test_routes_and_traffic_stay_while_the_apiserver_is_away(dp: DataplaneEnv, router: Router,
                                                              bgp_namespace: str) -> None:
    vip, _pods = web(dp, bgp_namespace, NODES)
    prefix = f"{vip}/32"
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node", interval=0.1)
    with apiserver_away(dp, "kill"):
        holds_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 6.0, "every node's route",
                  interval=0.3)
        assert all(through(dp, router, vip, port) is not None for port in range(41300, 41310))
    holds_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 2.0, "every node's route after")


def test_a_killed_forwarder_and_a_cut_link_lose_their_routes(dp: DataplaneEnv, router: Router,
                                                             bgp_namespace: str) -> None:
    # pods on node-1 and node-2 only: node-3 (ETP=Cluster announces there too) is the one cut off,
    # and a pod behind a cut link would fail flows until Kubernetes marks it unready
    vip, _pods = web(dp, bgp_namespace, (1, 2))
    prefix = f"{vip}/32"
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node", interval=0.1)
    wait_for(lambda: {through(dp, router, vip, port) for port in range(41400, 41420)} == set(NODES), 20,
             "flows through every node")

    # kill -9: ExaBGP dies with the forwarder (PR_SET_PDEATHSIG), the session closes
    started = time.monotonic()
    dp.kill_forwarder(2)
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, (1, 3)), HOLD_S + 5, "node-2's route withdrawn",
             interval=0.05)
    print(f"\nkill -9 → route withdrawn in {time.monotonic() - started:.2f}s")
    seen = [through(dp, router, vip, port) for port in range(41400, 41420)]
    assert set(seen) <= {1, 3}, seen

    # a cut link: nothing closes the session; the router's hold timer withdraws the route
    started = time.monotonic()
    dp.lab.set_link(3, up=False)
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, (1,)), HOLD_S + 10, "node-3's route withdrawn",
             interval=0.05)
    elapsed = time.monotonic() - started
    print(f"link cut → route withdrawn in {elapsed:.2f}s (hold time {HOLD_S}s)")
    assert elapsed > HOLD_S - 1.5, "withdrawn before the hold time ran out"
    wait_for(lambda: router.kernel_next_hops(vip) == hops_of(dp, (1,)), 10, "the kernel route via node-1 only")
    seen = [through(dp, router, vip, port) for port in range(41500, 41510)]
    assert set(seen) == {1}, seen
    # back: the link comes up, the killed forwarder starts; both announce again
    dp.ensure_forwarders()
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 60, "every node announcing again",
             interval=0.2)


def test_deleting_the_pool_or_the_peer_withdraws(dp: DataplaneEnv, router: Router, bgp_namespace: str) -> None:
    vip, _pods = web(dp, bgp_namespace, NODES)
    prefix = f"{vip}/32"
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node", interval=0.1)
    # the peer goes: every node closes its session (ExaBGP reloads without it), the router drops the routes
    peer = dp.kube.custom.get_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER)
    dp.kube.custom.delete_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER)
    try:
        wait_for(lambda: not router.next_hops(prefix), 20, f"{prefix} withdrawn by every node", interval=0.1)
        wait_for(lambda: not router.established(), 20, "no session left")
    finally:
        dp.kube.custom.create_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", {
            "apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": PEER}, "spec": peer["spec"]})
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 30, f"{prefix} from every node again",
             interval=0.1)
    # the pool goes: its addresses are no longer announced (sessions stay)
    dp.kube.delete_pool(bgp_namespace)
    wait_for(lambda: not router.next_hops(prefix), 20, f"{prefix} withdrawn", interval=0.1)
    assert router.established() >= hops_of(dp, NODES)


def test_graceful_restart_keeps_a_killed_forwarders_routes_until_it_is_back(
        dp: DataplaneEnv, router: Router, bgp_namespace: str) -> None:
    """gracefulRestart: true — ExaBGP offers the capability (restart time 120 s); FRR, a helper by
    default, keeps the routes of a speaker whose session dropped without a NOTIFICATION (kill -9)
    as stale, and the node's kernel rules keep serving; the restarted forwarder announces them again."""
    vip, _pods = web(dp, bgp_namespace, (1, 2))
    prefix = f"{vip}/32"
    patch = {"spec": {"gracefulRestart": True}}
    dp.kube.custom.patch_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER, patch)
    try:
        def gr_negotiated() -> bool:
            neighbors = router.bgp_json("show bgp neighbors json")
            return all("gracefulRestartInfo" in neighbors.get(hop, {}) and
                       neighbors[hop].get("bgpState") == "Established" and
                       (neighbors[hop].get("neighborCapabilities") or {}).get("gracefulRestart")
                       for hop in hops_of(dp, NODES))
        wait_for(gr_negotiated, 30, "sessions with graceful restart negotiated", interval=0.2)
        wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node",
                 interval=0.1)
        dp.kill_forwarder(2)
        holds_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), HOLD_S + 2.0,
                  "node-2's route kept (stale) past the hold time")
        assert any(p.get("stale") for p in router.route_attributes(prefix)), router.route_attributes(prefix)
        assert all(through(dp, router, vip, port) is not None for port in range(41600, 41610))
        dp.start_forwarder(2)
        wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES)
                 and not any(p.get("stale") for p in router.route_attributes(prefix)), 30,
                 "node-2's route fresh again")
    finally:
        dp.kube.custom.patch_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER,
                                                   {"spec": {"gracefulRestart": False}})


def test_a_password_the_router_does_not_have_keeps_the_session_down_with_a_clear_status(
        dp: DataplaneEnv, router: Router) -> None:
    """TCP-MD5 from the Secret named by passwordSecretRef; the router has no password for the nodes,
    so their segments are dropped: no session, and each node's status entry says what to check."""
    secret: Any = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp-tor-password"},
                   "stringData": {"password": "not-what-the-router-has"}}
    with contextlib.ExitStack() as undo:  # each step its own undo: one failing does not skip the other
        dp.kube.core.create_namespaced_secret("lbctl-system", secret)
        undo.callback(absent_ok, lambda: dp.kube.core.delete_namespaced_secret("bgp-tor-password", "lbctl-system"))
        undo.callback(dp.kube.custom.patch_cluster_custom_object, "lbctl.io", "v1alpha1", "bgppeers", PEER,
                      {"spec": {"passwordSecretRef": None}})
        dp.kube.custom.patch_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", PEER,
                                                   {"spec": {"passwordSecretRef": {"name": "bgp-tor-password"}}})
        wait_for(lambda: not (router.established() & hops_of(dp, NODES)), 30, "every session down")

        def explained() -> bool:
            status = peer_status(dp)
            return all(status.get(f"node-{i}", {}).get("state") != "Established"
                       and "password" in status[f"node-{i}"].get("message", "") for i in NODES)
        wait_for(explained, 40, "status entries naming the password among what to check", interval=0.5)
        print("\n" + peer_status(dp)["node-1"]["message"])
    wait_for(lambda: router.established() >= hops_of(dp, NODES), 30, "sessions back without the password")


def test_ipv6_addresses_go_out_as_128_with_the_nodes_ipv6_next_hops(dp: DataplaneEnv, router: Router,
                                                                    bgp_namespace: str) -> None:
    """An IPv6-only Service: its /128 rides the IPv4 sessions (MP-BGP) with each node's IPv6 address
    as next hop; the router installs a multipath IPv6 route and IPv6 flows spread over the nodes."""
    pods = [dp.add_pod(bgp_namespace, "web", node) for node in NODES]
    dp.kube.create_service(bgp_namespace, "web", {"app": "web"}, [HTTP], ipFamilies=["IPv6"],
                           ipFamilyPolicy="SingleStack")
    vip = dp.kube.wait_external_ip(bgp_namespace, "web")
    assert vip.startswith("2001:db8:3:"), vip
    prefix = f"{vip}/128"
    hops6 = {dp.lab.node6_address(i) for i in NODES}
    wait_for(lambda: router.next_hops(prefix) == hops6, 30, f"{prefix} from every node", interval=0.1)
    wait_for(lambda: router.kernel_next_hops(vip) == hops6, 10, "a multipath IPv6 route in the kernel")
    assert all(vip not in dp.vips_on(i) for i in NODES)
    dp.wait_rules(present={p.address6 for p in pods})

    def through6(port: int) -> int | None:
        try:
            _pod, peer = parse_answer(http_get(router.client, vip, 80, timeout=1.0,
                                               source=(router.client_address6, port)))
        except OSError:
            return None
        return dp.node_of(peer)
    wait_for(lambda: through6(41700) is not None, 20, "an IPv6 answer through the router")
    seen = [through6(port) for port in range(41700, 41730)]
    assert None not in seen, seen
    print(f"\n30 IPv6 flows through nodes: { {n: seen.count(n) for n in set(seen)} }")
    assert len(set(seen)) >= 2, seen


def test_a_second_router_bird_learns_the_same_routes_and_frr_sessions_stay_up(dp: DataplaneEnv, router: Router,
                                                                              bgp_namespace: str) -> None:
    """Not tuned to one router: BIRD 2 as a second peer (another AS) learns the same /32 from every
    node. Adding that BGPPeer reloads every node's ExaBGP; the FRR sessions are not reset."""
    vip, _pods = web(dp, bgp_namespace, NODES)
    prefix = f"{vip}/32"
    wait_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} from every node", interval=0.1)

    def connections() -> dict[str, int]:
        neighbors = router.bgp_json("show bgp neighbors json")
        return {hop: int(neighbors.get(hop, {}).get("connectionsEstablished", -1)) for hop in hops_of(dp, NODES)}
    before = connections()
    bird = start_bird(dp.lab, BIRD_ASN, NODE_ASN, HOLD_S)
    dp.kube.custom.create_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", {
        "apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "bird"},
        "spec": {"peerAddress": bird.lan_address, "peerASN": BIRD_ASN, "myASN": NODE_ASN, "holdTime": f"{HOLD_S}s"}})
    try:
        wait_for(lambda: bird.established() == {f"node{i}" for i in NODES}, 60, "BIRD's sessions with every node",
                 interval=0.2)
        wait_for(lambda: bird.next_hops(prefix) == hops_of(dp, NODES), 20, f"{prefix} in BIRD from every node",
                 interval=0.1)
        assert connections() == before, "adding a peer reset the sessions with FRR"
        assert router.next_hops(prefix) == hops_of(dp, NODES)
    finally:
        with contextlib.suppress(ApiException):
            dp.kube.custom.delete_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", "bird")
        dp.lab.stop(bird.process)
    holds_for(lambda: router.next_hops(prefix) == hops_of(dp, NODES), 2.0, "FRR's routes after BIRD's peer went")
