"""VIP failover time: the owning node's forwarder is killed (SIGKILL) → the first request through
the VIP that the new owner carries. Also the same with the owner's link cut.

Self-contained (root): the embedded control plane (own temporary directory, listening also on
the lab bridge), the operator with the local provider, three node namespaces each running
`lbctl forwarder --mode full` (lease 2 s, renewed every 0.5 s), a pod on each node, a Service.
A client namespace asks through the VIP every 20 ms (connect timeout 0.2 s); with
externalTrafficPolicy Cluster the pod sees the forwarding node's address, which names the node.

    python3 bench/failover.py [--rounds 3]

Prints JSON: failover_s (median over rounds, SIGKILL), failover_samples_s, link_down_s (median,
link cut), link_down_samples_s. Target ≤ 3 s.
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
from lbctl.forwarder.announce import ANNOUNCING_NODE_ANNOTATION
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, http_get, pod_gateway
from lbctl.lab.server import parse_answer

NODES = (1, 2, 3)


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lab = Lab(log_dir=workdir)
        self.forwarders: dict[int, Popen[bytes]] = {}
        self.kube: LabKube | None = None
        self.node_kubeconfig = ""
        self.client = ""
        self.vip = ""

    def start_forwarder(self, index: int) -> None:
        self.forwarders[index] = self.lab.start(
            self.lab.nodes[index], [sys.executable, "-m", "lbctl", "forwarder", "--node", f"node-{index}",
                                    "--mode", "full", "--kubeconfig", self.node_kubeconfig],
            f"forwarder-node-{index}.log")

    def setup(self) -> None:
        lab = self.lab
        lab.add_bridge()
        self.client = lab.add_client(0)
        for index in NODES:
            lab.add_node(index)
        info = controlplane.up(self.workdir / "cp", extra_addresses=(lab.bridge_address,))
        self.kube = kube = LabKube(info.kubeconfig)
        kube.install_pool_crd()
        kube.install_forwarder_rbac()
        self.node_kubeconfig = kube.service_account_kubeconfig(
            "lbctl-system", "lbctl-forwarder", f"https://{lab.bridge_address}:{info.server.rsplit(':', 1)[1]}",
            info.ca_file, self.workdir / "kubeconfig-forwarder")
        for index in NODES:
            kube.create_node(f"node-{index}", lab.node_address(index))
        lab.start(None, [sys.executable, "-m", "lbctl", "operator", "--provider", "local", "--node-port-range",
                         "30000-54999", "--log-level", "warning"], "operator.log",
                  env={**os.environ, "KUBECONFIG": info.kubeconfig})
        for index in NODES:
            self.start_forwarder(index)
        kube.create_namespace("bench")
        kube.create_pool("bench", [f"{lab.lan_address(200)}-{lab.lan_address(210)}"])
        for index in NODES:
            pod_ns, address = lab.add_pod(index)
            lab.start(pod_ns, [sys.executable, "-m", "lbctl.lab.server", "--name", f"web-{index}",
                               "--tcp", "8080"], f"pod-{index}.log")
            kube.create_pod("bench", f"web-{index}", f"node-{index}", address, {"app": "web"},
                            {"http": ("TCP", 8080)})
        kube.create_service("bench", "web", {"app": "web"},
                            [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}])
        self.vip = kube.wait_external_ip("bench", "web", timeout=60)

    def through(self) -> int | None:
        """The node one request went through, or None."""
        try:
            _pod, peer = parse_answer(http_get(self.client, self.vip, 80, timeout=0.2))
        except OSError:
            return None
        for index in NODES:
            if peer in (self.lab.node_address(index), pod_gateway(index)):
                return index
        return None

    def owner(self) -> int:
        kube = self.kube
        assert kube is not None
        name = wait_for(lambda: kube.annotation("bench", "web", ANNOUNCING_NODE_ANNOTATION), 30, "an announcing node")
        owner = int(name.rsplit("-", 1)[1])
        try:
            wait_for(lambda: all(self.through() == owner for _ in range(3)), 30, f"traffic through node-{owner}")
        except TimeoutError as exc:
            holders = [i for i in NODES if self.vip in self.lab.run_in(self.lab.nodes[i], "ip", "-4", "addr").stdout]
            neighbours = self.lab.run_in(self.client, "ip", "neigh").stdout.strip()
            raise TimeoutError(f"{exc}; VIP on nodes {holders}; client neighbours: {neighbours}") from exc
        return owner

    def measure(self, cut: bool) -> float:
        owner = self.owner()
        if cut:
            self.lab.set_link(owner, up=False)
        else:
            self.lab.kill(self.forwarders[owner])
        started = time.monotonic()
        while True:
            node = self.through()
            if node is not None and node != owner:
                elapsed = time.monotonic() - started
                break
            if time.monotonic() - started > 30:
                raise TimeoutError(f"no failover from node-{owner} within 30 s")
            time.sleep(0.02)
        if cut:
            self.lab.set_link(owner, up=True)
        else:
            self.start_forwarder(owner)
        time.sleep(3)  # let the restored node rejoin (it takes its VIP back) before the next round
        return elapsed

    def close(self) -> list[str]:
        problems = self.lab.close()
        if self.kube is not None:
            self.kube.close()
        controlplane.down(self.workdir / "cp")
        return problems


def run(rounds: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lbctl-bench-failover-"))
    bench = Bench(workdir)
    try:
        bench.setup()
        killed = [bench.measure(cut=False) for _ in range(rounds)]
        cut = [bench.measure(cut=True) for _ in range(rounds)]
    finally:
        problems = bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
        assert not problems, problems
    return {"failover_s": round(statistics.median(killed), 2), "failover_samples_s": [round(x, 2) for x in killed],
            "link_down_s": round(statistics.median(cut), 2), "link_down_samples_s": [round(x, 2) for x in cut],
            "lease_duration_s": 2, "renew_interval_s": 0.5, "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("failover: needs root (network namespaces, nftables)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
