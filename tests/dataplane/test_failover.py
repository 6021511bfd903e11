"""VIP failover: the owning node's link goes down, or its forwarder stays away past the restart
grace; another node takes the VIP (peers stop hearing it → rendezvous choice → VIP/32 + gratuitous
ARP; for IPv6 VIP/128 + unsolicited neighbour advertisement) and traffic flows through it. The
times are printed, not asserted tightly: bench/failover.py measures them."""

from __future__ import annotations

import time

import pytest

from lbctl.forwarder.render import FAMILY
from lbctl.lab.kube import holds_for, wait_for
from lbctl.lab.netns import http_get
from lbctl.lab.probes import link_mac, ndp_answers, neighbour, ping
from lbctl.lab.server import parse_answer
from tests.dataplane.harness import NODES, RESTART_GRACE_S, DataplaneEnv

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
# generous: the target is ≤ 2 s (dead after 1 s); a loaded 2-core CI machine gets slack here
FAILOVER_LIMIT_S = 8.0


def through(dp: DataplaneEnv, vip: str) -> int | None:
    """The node one request through the VIP went through (ETP=Cluster masquerades), or None."""
    try:
        _pod, peer = parse_answer(http_get(dp.clients[0], vip, 80, timeout=0.5))
    except OSError:
        return None
    return dp.node_of(peer)


def setup_service(dp: DataplaneEnv, ns: str) -> tuple[str, int]:
    pods = [dp.add_pod(ns, "web", node) for node in NODES]
    dp.kube.create_service(ns, "web", {"app": "web"}, [HTTP])
    vip = dp.kube.wait_external_ip(ns, "web")
    dp.wait_rules(present={vip, *(p.address for p in pods)})
    owner = int(wait_for(lambda: dp.owner(ns, "web"), 15, "an announcing node").rsplit("-", 1)[1])
    wait_for(lambda: through(dp, vip) == owner, 20, f"traffic through node-{owner}")
    return vip, owner


def wait_for_other_node(dp: DataplaneEnv, vip: str, old: int) -> tuple[int, float]:
    started = time.monotonic()
    node = wait_for(lambda: (n := through(dp, vip)) is not None and n != old and n, 30,
                    f"an answer through a node other than node-{old}", interval=0.02)
    return int(node), time.monotonic() - started


def test_a_forwarder_gone_past_the_grace_loses_its_vips_and_gets_none_back(dp: DataplaneEnv,
                                                                           k8s_namespace: str) -> None:
    vip, owner = setup_service(dp, k8s_namespace)
    dp.kill_forwarder(owner)  # SIGKILL, and it does not come back: its kernel still answers ping
    new, elapsed = wait_for_other_node(dp, vip, owner)
    print(f"\nfailover after SIGKILL of node-{owner}'s forwarder: {elapsed:.2f}s → node-{new} "
          f"(grace {RESTART_GRACE_S:.0f}s)")
    assert elapsed > RESTART_GRACE_S - 1.0, "the VIP moved before the restart grace was over"
    assert elapsed < RESTART_GRACE_S + FAILOVER_LIMIT_S
    wait_for(lambda: dp.owner(k8s_namespace, "web") == f"node-{new}", 10, f"the annotation naming node-{new}")
    assert vip in dp.vips_on(new)

    # Back, node-owner finds the VIP its predecessor left on lo; node-new holds it firmly now, so
    # node-owner lets it go and it stays on node-new (no fail-back: a move resets flows).
    dp.start_forwarder(owner)
    wait_for(lambda: dp.holders(vip) == {new}, 15, f"{vip} on node-{new} only")
    wait_for(lambda: (s := dp.forwarder_status(owner)) is not None and s[0] == 200, 30, "node-owner serving")
    holds_for(lambda: dp.holders(vip) == {new}, 2.0, f"{vip} on node-{new} only")  # no fail-back
    assert {through(dp, vip) for _ in range(10)} == {new}


def test_failover_when_the_owners_link_goes_down(dp: DataplaneEnv, k8s_namespace: str) -> None:
    vip, owner = setup_service(dp, k8s_namespace)
    dp.lab.set_link(owner, up=False)
    new, elapsed = wait_for_other_node(dp, vip, owner)
    print(f"\nfailover after node-{owner}'s link went down: {elapsed:.2f}s → node-{new}")
    assert elapsed < FAILOVER_LIMIT_S
    # cut off from its peers and the apiserver, the old owner gives the VIP up by itself
    wait_for(lambda: vip not in dp.vips_on(owner), 10, f"node-{owner} to drop {vip}")
    wait_for(lambda: dp.owner(k8s_namespace, "web") == f"node-{new}", 10, f"the annotation naming node-{new}")
    # link back: the VIP stays where it is, and only there
    dp.lab.set_link(owner, up=True)
    holds_for(lambda: dp.holders(vip) == {new}, 3.0, f"{vip} on node-{new} only")


def setup_dual_stack(dp: DataplaneEnv, ns: str) -> tuple[str, str, int, dict[int, str]]:
    """A dual-stack Service with a pod on every node, its addresses held by one node, and the client
    having resolved the IPv6 one by NDP; returns (IPv4 VIP, IPv6 VIP, owner, node → MAC)."""
    for node in NODES:
        dp.add_pod(ns, "web", node)
    dp.kube.create_service(ns, "web", {"app": "web"}, [HTTP], ipFamilies=["IPv4", "IPv6"],
                           ipFamilyPolicy="RequireDualStack")
    v4, v6 = wait_for(lambda: (ips if len(ips := dp.kube.external_ips(ns, "web")) == 2 else None), 30,
                      "two ingress addresses")
    owner = int(wait_for(lambda: dp.owner(ns, "web"), 15, "an announcing node").rsplit("-", 1)[1])
    wait_for(lambda: dp.holders(v6) == dp.holders(v4) == {owner}, 15, f"both on node-{owner} only")
    macs = {index: link_mac(dp.lab.nodes[index]) for index in NODES}
    assert wait_for(lambda: ping(dp.clients[0], v6), 10, f"an echo reply from {v6}")
    assert neighbour(dp.clients[0], v6) == macs[owner]
    wait_for(lambda: through(dp, v4) == owner, 20, f"traffic through node-{owner}")
    return v4, v6, owner, macs


def wait_for_the_new_owners_na(dp: DataplaneEnv, v6: str, old: int, macs: dict[int, str]) -> tuple[int, float]:
    """The client sends nothing meanwhile, so only an unsolicited NA can change its neighbour entry
    for the VIP (its own resolution would need traffic): until the entry names another node."""
    others = {mac: index for index, mac in macs.items() if index != old}
    started = time.monotonic()
    mac = wait_for(lambda: (m if (m := neighbour(dp.clients[0], v6)) in others else None),
                   RESTART_GRACE_S + 30, f"the client's neighbour entry for {v6} to leave node-{old}", interval=0.02)
    return others[mac], time.monotonic() - started


def test_ipv6_failover_when_the_owners_link_goes_down(dp: DataplaneEnv, k8s_namespace: str) -> None:
    v4, v6, owner, macs = setup_dual_stack(dp, k8s_namespace)
    dp.lab.set_link(owner, up=False)
    new, elapsed = wait_for_the_new_owners_na(dp, v6, owner, macs)
    print(f"\nIPv6 failover after node-{owner}'s link went down: the NA of node-{new} after {elapsed:.2f}s")
    assert elapsed < FAILOVER_LIMIT_S
    assert wait_for(lambda: ping(dp.clients[0], v6), 10, f"echo replies from {v6} again")
    assert neighbour(dp.clients[0], v6) == macs[new]
    wait_for(lambda: through(dp, v4) == new, 10, f"IPv4 through node-{new} too (one owner for both)")
    if FAMILY != "ip":  # the table forwards IPv6: HTTP through the IPv6 VIP resumes through node-new
        wait_for(lambda: through(dp, v6) == new, 10, f"HTTP through [{v6}] via node-{new}")
    # cut off from its peers and the apiserver, the old owner gives both up by itself
    wait_for(lambda: not {v4, v6} & dp.vips_on(owner), 10, f"node-{owner} to drop {v4} and {v6}")
    dp.lab.set_link(owner, up=True)
    holds_for(lambda: dp.holders(v6) == {new}, 3.0, f"{v6} on node-{new} only")
    wait_for(lambda: ndp_answers(dp.clients[0], v6) == {macs[new]}, 10, f"only node-{new} answering NDP")


def test_ipv6_failover_when_the_owners_forwarder_stays_away_past_the_grace(dp: DataplaneEnv,
                                                                          k8s_namespace: str) -> None:
    v4, v6, owner, macs = setup_dual_stack(dp, k8s_namespace)
    dp.kill_forwarder(owner)  # SIGKILL: its kernel keeps VIP/128 and answers ping
    new, elapsed = wait_for_the_new_owners_na(dp, v6, owner, macs)
    print(f"\nIPv6 failover after SIGKILL of node-{owner}'s forwarder: the NA of node-{new} after {elapsed:.2f}s "
          f"(grace {RESTART_GRACE_S:.0f}s)")
    assert elapsed > RESTART_GRACE_S - 1.0, "the VIP moved before the restart grace was over"
    assert elapsed < RESTART_GRACE_S + FAILOVER_LIMIT_S
    assert wait_for(lambda: ping(dp.clients[0], v6), 10, f"echo replies from {v6} again")
    assert neighbour(dp.clients[0], v6) == macs[new]
    wait_for(lambda: through(dp, v4) == new, 10, f"IPv4 through node-{new} too")
    if FAMILY != "ip":
        wait_for(lambda: through(dp, v6) == new, 10, f"HTTP through [{v6}] via node-{new}")
    # back, the old owner's forwarder lets go of what its predecessor left: one holder again
    dp.start_forwarder(owner)
    wait_for(lambda: dp.holders(v6) == {new}, 15, f"{v6} on node-{new} only")
