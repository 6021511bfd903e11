"""BGP mode timings in a lab of three nodes (`lbctl forwarder --mode full` in each, ExaBGP as the
speaker), the embedded control plane, the operator (local provider) and FRR (zebra + bgpd) as the
top-of-rack router with `maximum-paths`, hold time 3 s:

- announce_s: a Service (ETP=Cluster, pods on every node, pool advertised by BGP) created → its
  /32 in the router's BGP table with a next hop per node (median of --rounds; target ≤ 1 s);
  announce_after_ip_s: the same from the moment its EXTERNAL-IP is in its status.
- withdraw_sigterm_s: a forwarder gets SIGTERM → its next hop gone from the router (it withdraws first).
- withdraw_kill9_s: a forwarder is killed with -9 → its next hop gone (ExaBGP dies with it; the
  session closes).
- withdraw_link_cut_s: a node's link is cut → its next hop gone (the router's hold timer, 3 s).
- scale (--services N, default 1000): N more Services in the pool → routes_per_node (prefixes the
  router received from each node), scale_total_s (first Service created → every route on the
  router; the apiserver and the operator set the pace), scale_converge_s (from the last one created),
  forwarder_rss_mb and exabgp_rss_mb (the largest node's, with N+1 addresses announced).

    python3 bench/bgp.py [--rounds 20] [--withdraw-rounds 3] [--services 1000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from subprocess import Popen
from typing import Any

from lbctl.dev import controlplane
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab
from lbctl.lab.router import Router, install_bgp_api, start_router

NODES = (1, 2, 3)
HOLD_S = 3
ROUTER_ASN, NODE_ASN = 64500, 64512


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lab = Lab(log_dir=workdir)
        self.forwarders: dict[int, Popen[bytes]] = {}
        self.node_kubeconfig = ""
        self.kube: LabKube | None = None
        self.router: Router | None = None
        self.vip = ""

    @property
    def cp_dir(self) -> Path:
        return self.workdir / "cp"

    def start_forwarder(self, index: int) -> None:
        self.forwarders[index] = self.lab.start(
            self.lab.nodes[index], [sys.executable, "-m", "lbctl", "forwarder", "--node", f"node-{index}",
                                    "--mode", "full", "--kubeconfig", self.node_kubeconfig,
                                    "--pod-cidr", "198.19.0.0/16"],
            f"forwarder-node-{index}.log")

    def setup(self) -> None:
        lab = self.lab
        lab.add_bridge()
        for index in NODES:
            lab.add_node(index)
        info = controlplane.up(self.cp_dir, extra_addresses=(lab.bridge_address,))
        self.kube = kube = LabKube(info.kubeconfig)
        kube.install_pool_crd()
        kube.install_forwarder_rbac()
        install_bgp_api(kube)  # before the forwarders start, as in a cluster
        self.node_kubeconfig = kube.service_account_kubeconfig(
            "lbctl-system", "lbctl-forwarder", f"https://{lab.bridge_address}:{info.server.rsplit(':', 1)[1]}",
            info.ca_file, self.workdir / "kubeconfig-forwarder")
        for index in NODES:
            kube.create_node(f"node-{index}", lab.node_address(index))
        self.router = router = start_router(lab, ROUTER_ASN, NODE_ASN, HOLD_S)
        kube.custom.create_cluster_custom_object("lbctl.io", "v1alpha1", "bgppeers", {
            "apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
            "spec": {"peerAddress": router.lan_address, "peerASN": ROUTER_ASN, "myASN": NODE_ASN,
                     "holdTime": f"{HOLD_S}s"}})
        lab.start(None, [sys.executable, "-m", "lbctl", "operator", "--provider", "local", "--node-port-range",
                         "30000-54999", "--log-level", "warning"], "operator.log",
                  env={**os.environ, "KUBECONFIG": info.kubeconfig})
        for index in NODES:
            self.start_forwarder(index)
        kube.create_namespace("bench")
        kube.create_pool("bench", ["198.19.240.0/20"], advertisement={"mode": "bgp"})
        for index in NODES:
            pod_ns, address = lab.add_pod(index)
            lab.start(pod_ns, [sys.executable, "-m", "lbctl.lab.server", "--name", f"web-{index}",
                               "--tcp", "8080"], f"pod-{index}.log")
            kube.create_pod("bench", f"web-{index}", f"node-{index}", address, {"app": "web"},
                            {"http": ("TCP", 8080)})
        nodes = {lab.node_address(i) for i in NODES}
        wait_for(lambda: router.established() >= nodes, 60, "sessions with every node", interval=0.2)

    def hops(self, nodes: tuple[int, ...]) -> set[str]:
        return {self.lab.node_address(i) for i in nodes}

    def announce(self, round_: int) -> tuple[float, float]:
        kube, router = self.kube, self.router
        assert kube is not None and router is not None
        name = f"web-{round_}"
        started = time.monotonic()
        kube.create_service("bench", name, {"app": "web"},
                            [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}])
        vip = wait_for(lambda: kube.external_ip("bench", name), 30, "an EXTERNAL-IP", interval=0.01)
        assigned = time.monotonic()
        wait_for(lambda: router.next_hops(f"{vip}/32") == self.hops(NODES), 30, "the route from every node",
                 interval=0.01)
        done = time.monotonic()
        kube.core.delete_namespaced_service(name, "bench")
        return done - started, done - assigned

    def withdraw(self, how: str, index: int) -> float:
        router = self.router
        assert router is not None
        prefix = f"{self.vip}/32"
        wait_for(lambda: router.next_hops(prefix) == self.hops(NODES), 60, "every node announcing", interval=0.05)
        others = tuple(i for i in NODES if i != index)
        started = time.monotonic()
        if how == "sigterm":
            self.lab.stop(self.forwarders[index])
        elif how == "kill9":
            self.lab.kill(self.forwarders[index])
        else:
            self.lab.set_link(index, up=False)
        wait_for(lambda: router.next_hops(prefix) == self.hops(others), 30, f"node-{index}'s route gone",
                 interval=0.01)
        elapsed = time.monotonic() - started
        if how == "link":
            self.lab.set_link(index, up=True)
        else:
            self.start_forwarder(index)
        return elapsed

    def scale(self, services: int) -> dict[str, Any]:
        kube, router = self.kube, self.router
        assert kube is not None and router is not None
        port = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]
        first = time.monotonic()
        for index in range(services):
            kube.create_service("bench", f"s{index}", {"app": "web"}, port)
        created = time.monotonic()
        want = services + 1  # and the steady one

        def received() -> dict[str, int]:
            summary = router.bgp_json("show bgp ipv4 unicast summary json")
            return {address: int(peer.get("pfxRcd", 0)) for address, peer in (summary.get("peers") or {}).items()}
        def complete() -> dict[str, int] | None:
            counts = received()
            return counts if len(counts) == len(NODES) and all(v >= want for v in counts.values()) else None
        counts = wait_for(complete, 600, f"{want} routes from every node", interval=0.5)
        converge, total = time.monotonic() - created, time.monotonic() - first
        rss = [_rss(proc.pid) for proc in self.forwarders.values()]
        speakers = [_rss(child) for proc in self.forwarders.values() for child in _children(proc.pid)]
        return {"services": services, "routes_per_node": min(counts.values()),
                "scale_converge_s": round(converge, 1), "scale_total_s": round(total, 1),
                "forwarder_rss_mb": round(max(rss) / 1024, 1),
                "exabgp_rss_mb": round(max(speakers, default=0) / 1024, 1)}

    def close(self) -> list[str]:
        problems = self.lab.stop_processes()
        if self.kube is not None:
            self.kube.close()
        controlplane.down(self.cp_dir)
        return problems + self.lab.close()


def _rss(pid: int) -> int:
    """VmRSS in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def run(rounds: int, withdraw_rounds: int, services: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lbctl-bench-bgp-"))
    bench = Bench(workdir)
    try:
        bench.setup()
        announce = [bench.announce(r) for r in range(rounds)]
        assert bench.kube is not None
        bench.kube.create_service("bench", "steady", {"app": "web"},
                                  [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}])
        bench.vip = bench.kube.wait_external_ip("bench", "steady")
        result: dict[str, Any] = {
            "announce_s": round(statistics.median(a for a, _ in announce), 3),
            "announce_after_ip_s": round(statistics.median(b for _, b in announce), 3),
            "announce_max_s": round(max(a for a, _ in announce), 3),
            "rounds": rounds, "hold_time_s": HOLD_S, "speaker": "exabgp 4.2", "router": "frr bgpd 8.4",
        }
        for how in ("sigterm", "kill9", "link"):
            times = [bench.withdraw(how, NODES[r % len(NODES)]) for r in range(withdraw_rounds)]
            key = {"sigterm": "withdraw_sigterm_s", "kill9": "withdraw_kill9_s", "link": "withdraw_link_cut_s"}[how]
            result[key] = round(statistics.median(times), 3)
        if services:
            result.update(bench.scale(services))
        return result
    finally:
        problems = bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if problems:
            print(f"bgp bench: teardown left {problems}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--withdraw-rounds", type=int, default=3)
    parser.add_argument("--services", type=int, default=1000, help="the scale phase (0: skip it)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bgp: needs root (network namespaces, nftables)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.rounds, args.withdraw_rounds, args.services)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
