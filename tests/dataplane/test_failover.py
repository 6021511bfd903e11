"""VIP failover: the owning node's forwarder is killed, or its link goes down; another node takes
the VIP (lease expiry → rendezvous choice → VIP/32 + gratuitous ARP) and traffic flows through it.
The times are printed, not asserted tightly: bench/failover.py measures them."""

from __future__ import annotations

import time

import pytest

from lbctl.lab.kube import wait_for
from lbctl.lab.netns import http_get
from lbctl.lab.server import parse_answer
from tests.dataplane.harness import NODES, DataplaneEnv

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
# generous: the target is ≤ 3 s (lease 2 s); a loaded 2-core CI machine gets slack here
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


def test_failover_when_the_owners_forwarder_is_killed(dp: DataplaneEnv, k8s_namespace: str) -> None:
    vip, owner = setup_service(dp, k8s_namespace)
    dp.kill_forwarder(owner)  # SIGKILL: no goodbye, the lease just stops being renewed
    new, elapsed = wait_for_other_node(dp, vip, owner)
    print(f"\nfailover after SIGKILL of node-{owner}'s forwarder: {elapsed:.2f}s → node-{new}")
    assert elapsed < FAILOVER_LIMIT_S
    wait_for(lambda: dp.owner(k8s_namespace, "web") == f"node-{new}", 10, f"the annotation naming node-{new}")
    assert vip in dp.vips_on(new)
    # the new owner keeps it: traffic stays on node-new
    assert {through(dp, vip) for _ in range(10)} == {new}

    # restarted, node-owner is the rendezvous choice again: it finds its old VIP/32 still on lo and
    # must announce it anew, or the client would stay with node-new (which forwards too)
    dp.start_forwarder(owner)
    wait_for(lambda: all(through(dp, vip) == owner for _ in range(3)), 15, f"traffic back through node-{owner}")
    assert vip not in dp.vips_on(new)


def test_failover_when_the_owners_link_goes_down(dp: DataplaneEnv, k8s_namespace: str) -> None:
    vip, owner = setup_service(dp, k8s_namespace)
    dp.lab.set_link(owner, up=False)
    new, elapsed = wait_for_other_node(dp, vip, owner)
    print(f"\nfailover after node-{owner}'s link went down: {elapsed:.2f}s → node-{new}")
    assert elapsed < FAILOVER_LIMIT_S
    # cut off, the old owner cannot renew its lease: it gives the VIP up by itself
    wait_for(lambda: vip not in dp.vips_on(owner), 10, f"node-{owner} to drop {vip}")
    wait_for(lambda: dp.owner(k8s_namespace, "web") == f"node-{new}", 10, f"the annotation naming node-{new}")


def test_a_clean_stop_hands_over_at_once(dp: DataplaneEnv, k8s_namespace: str) -> None:
    """SIGTERM: the forwarder deletes its lease and drops its VIPs, so the others need not wait."""
    vip, owner = setup_service(dp, k8s_namespace)
    dp.lab.stop(dp.forwarders[owner])
    assert vip not in dp.vips_on(owner)
    new, elapsed = wait_for_other_node(dp, vip, owner)
    print(f"\nhandover after SIGTERM of node-{owner}'s forwarder: {elapsed:.2f}s → node-{new}")
    assert elapsed < 2.0
