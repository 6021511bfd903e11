"""`--mode announce` (kube-proxy carries the traffic): the forwarder owns VIPs — VIP/32, ARP, the
annotation — and never touches nftables; a table an earlier full-mode run left is removed. A
stopped forwarder leaves its VIP for the next run; `--cleanup` removes it, and the node's Lease.

IPv6 announcements (any mode): VIP/128 on the owner's LAN interface, answered by NDP from that node
only; a dual-stack Service's two addresses are held by one node."""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys

import pytest
from kubernetes import client

from lbctl.forwarder.render import FAMILY
from lbctl.lab.kube import wait_for
from lbctl.lab.netns import http_get
from lbctl.lab.probes import link_mac, ndp_answers, neighbour, ping
from lbctl.lab.server import parse_answer
from tests.dataplane.harness import NODES, DataplaneEnv

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}


def test_announce_mode_owns_the_vip_without_nftables(dp: DataplaneEnv, k8s_namespace: str) -> None:
    node_ns = dp.lab.add_node(4)
    with contextlib.ExitStack() as undo:  # each step its own undo (idempotent): one failing skips no other
        dp.kube.create_node("node-4", dp.lab.node_address(4))
        undo.callback(dp.kube.delete_node, "node-4")
        dp.lab.run_in(node_ns, "nft", "add", "table", "ip", "lbctl")  # as if a full-mode run had been here
        forwarder = dp.lab.start(node_ns, [sys.executable, "-m", "lbctl", "forwarder", "--node", "node-4", "--mode",
                                           "announce", "--kubeconfig", dp.node_kubeconfig], "forwarder-node-4.log")
        undo.callback(dp.lab.stop, forwarder)
        pod = dp.add_pod(k8s_namespace, "web", 4)
        # ETP=Local with its only endpoint on node-4: node-4 is the only eligible owner
        dp.kube.create_service(k8s_namespace, "web", {"app": "web"}, [HTTP], externalTrafficPolicy="Local",
                               ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="PreferDualStack")
        vip, vip6 = wait_for(lambda: (ips if len(ips := dp.kube.external_ips(k8s_namespace, "web")) == 2 else None),
                             30, "both addresses")
        dp.wait_endpoints(k8s_namespace, "web", {pod.address, pod.address6})
        wait_for(lambda: dp.owner(k8s_namespace, "web") == "node-4", 20, "node-4 announcing")
        wait_for(lambda: {vip, vip6} <= dp.vips_on(4), 10, "both addresses on node-4")
        # kube-proxy would carry the traffic; the node itself answers on both addresses
        assert wait_for(lambda: ping(dp.clients[0], vip6), 10, f"an echo reply from {vip6}")
        assert neighbour(dp.clients[0], vip6) == link_mac(node_ns)
        listing = subprocess.run(["ip", "netns", "exec", node_ns, "nft", "list", "ruleset"], capture_output=True,
                                 text=True, check=True).stdout
        assert "lbctl" not in listing
        assert forwarder.poll() is None
        dp.lab.stop(forwarder)  # SIGTERM: the VIPs stay for the next run to adopt
        assert {vip, vip6} <= dp.vips_on(4)
        # the node stops running a forwarder for good: --cleanup takes away what it left (also a
        # full-mode table of this version and of versions before, `ip lbctl`)
        for family in ("inet", "ip"):
            dp.lab.run_in(node_ns, "nft", "add", "table", family, "lbctl")
        cleanup = dp.lab.run_in(node_ns, sys.executable, "-m", "lbctl", "forwarder", "--node", "node-4",
                                "--kubeconfig", dp.node_kubeconfig, "--cleanup", check=False)
        assert cleanup.returncode == 0, cleanup.stderr
        assert "lbctl" not in dp.lab.run_in(node_ns, "nft", "list", "tables").stdout
        assert not {vip, vip6} & dp.vips_on(4)
        coordination = client.CoordinationV1Api(dp.kube.api)
        assert "lbctl-forwarder-node-4" not in {
            lease.metadata.name for lease in coordination.list_namespaced_lease("lbctl-system").items}


def test_an_ipv6_vip_is_resolved_by_ndp_and_answered_only_by_its_owner(dp: DataplaneEnv,
                                                                       k8s_namespace: str) -> None:
    """SingleStack IPv6 on its own: the owner has VIP/128 on its LAN interface and its kernel alone
    answers the client's neighbour solicitation; the address answers ICMPv6 echo."""
    for node in NODES:
        dp.add_pod(k8s_namespace, "web", node)
    dp.kube.create_service(k8s_namespace, "web6", {"app": "web"}, [HTTP], ipFamilies=["IPv6"],
                           ipFamilyPolicy="SingleStack")
    vip = dp.kube.wait_external_ip(k8s_namespace, "web6")
    assert ipaddress.ip_address(vip) in ipaddress.ip_network(dp.lab.lan6)
    owner = int(wait_for(lambda: dp.owner(k8s_namespace, "web6"), 20, "an announcing node").rsplit("-", 1)[1])
    wait_for(lambda: dp.holders(vip) == {owner}, 10, f"{vip} on node-{owner} only")
    assert vip in dp.vips_on(owner)
    macs = {index: link_mac(dp.lab.nodes[index]) for index in NODES}
    client = dp.clients[0]
    wait_for(lambda: ndp_answers(client, vip) == {macs[owner]}, 10, f"only node-{owner} answering NDP for {vip}")
    assert wait_for(lambda: ping(client, vip), 10, f"an ICMPv6 echo reply from {vip}")
    assert neighbour(client, vip) == macs[owner]
    if FAMILY != "ip":  # the table forwards IPv6 too
        body = wait_for(lambda: _get(client, vip), 15, f"HTTP through [{vip}]")
        assert parse_answer(body)[0].startswith("web-")
    # no longer a LoadBalancer: the owner lets go of the /128 and nobody answers for it any more
    dp.kube.core.delete_namespaced_service("web6", k8s_namespace)
    wait_for(lambda: not dp.holders(vip), 15, f"{vip} on no node")
    assert ndp_answers(client, vip) == set()


def test_a_dual_stack_service_gets_both_families_announced_by_one_node(dp: DataplaneEnv,
                                                                      k8s_namespace: str) -> None:
    pods = [dp.add_pod(k8s_namespace, "web", node) for node in NODES]
    dp.kube.create_service(k8s_namespace, "web", {"app": "web"}, [HTTP], ipFamilies=["IPv4", "IPv6"],
                           ipFamilyPolicy="RequireDualStack")
    ips = wait_for(lambda: (ips if len(ips := dp.kube.external_ips(k8s_namespace, "web")) == 2 else None),
                   30, "two ingress addresses")
    v4, v6 = ips
    assert "." in v4 and ":" in v6, ips  # primary family first
    owner = int(wait_for(lambda: dp.owner(k8s_namespace, "web"), 20, "an announcing node").rsplit("-", 1)[1])
    wait_for(lambda: dp.holders(v4) == dp.holders(v6) == {owner}, 10, f"both addresses on node-{owner} only")
    macs = {index: link_mac(dp.lab.nodes[index]) for index in NODES}
    client = dp.clients[0]
    assert wait_for(lambda: ping(client, v4) and ping(client, v6), 10, "echo replies from both addresses")
    assert neighbour(client, v4) == neighbour(client, v6) == macs[owner]  # ARP and NDP: the same node
    wait_for(lambda: ndp_answers(client, v6) == {macs[owner]}, 10, f"only node-{owner} answering NDP")
    body = wait_for(lambda: _get(client, v4), 15, f"HTTP through {v4}")
    assert parse_answer(body)[0] in {p.name for p in pods}
    dp.wait_endpoints(k8s_namespace, "web", {p.address for p in pods} | {p.address6 for p in pods})
    if FAMILY != "ip":
        body = wait_for(lambda: _get(client, v6), 15, f"HTTP through [{v6}]")
        assert parse_answer(body)[0] in {p.name for p in pods}


def _get(client: str, ip: str) -> str | None:
    try:
        return http_get(client, ip, 80, timeout=1.0)
    except OSError:
        return None
