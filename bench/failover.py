"""Faults and failover in a lab of three nodes (network namespaces, `lbctl forwarder --mode full`
on each), the embedded control plane and the operator (local provider):

- link_down_s: the VIP holder's link is cut → the first request through the VIP carried by
  another node (node death; target ≤ 2 s).
- failover_v6_s: the same cut, for the Service's IPv6 address (the Service is dual-stack; one node
  holds both): → the first ICMPv6 echo reply from the VIP with the client's neighbour entry naming
  another node (its unsolicited NA updated it). Same target as IPv4.
- forwarder_gone_failover_s (and _v6_s): the holder's forwarder is killed and stays away → the VIP
  moves once the restart grace is over (`--restart-grace`, 15 s by default).
- apiserver_outage_failed_requests: the apiserver is killed for 30 s and started again over the
  same etcd, while a client asks through the VIP every 100 ms with its ARP entry flushed before
  each request (target 0); apiserver_outage_vip_moves counts holder changes (target 0).
- forwarder_restart_resets: established TCP flows through the VIP and the holder's NodePort that
  were reset across a SIGTERM restart and a kill -9 restart after 5 s (target 0);
  forwarder_restart_vip_moves likewise.
- lease_writes_per_node_per_min: writes to the forwarders' Leases over two minutes of steady state,
  as the apiserver sees them (resourceVersion changes); forwarder_writes_per_node_per_min: every
  write request (POST, PUT, PATCH, DELETE) the forwarders sent meanwhile, from their own
  lbctl_kube_requests_total — the budget of issue 9 is on this one (target ≤ 6). This lab has no
  BGPPeer: its status refreshes add at most one write a minute (tests/unit/test_forwarder_bgp.py).
- leader_takeover_s: from bench/leader_takeover.py (two operator replicas, the leader killed).

    python3 bench/failover.py [--rounds 3] [--skip-leader]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen
from typing import Any

from kubernetes import client as k8s

from lbctl.dev import controlplane, faults
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, http_get, pod_gateway
from lbctl.lab.probes import VipWatch, exchange_all, link_mac, neighbour, open_flows, ping, vip_holders
from lbctl.lab.server import parse_answer
from lbctl.model.meta import ANNOUNCING_NODE_ANNOTATION

NODES = (1, 2, 3)
RESTART_GRACE_S = 15.0
OUTAGE_S = 30.0
METRICS_PORT = 7477
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lab = Lab(log_dir=workdir)
        self.forwarders: dict[int, Popen[bytes]] = {}
        self.kube: LabKube | None = None
        self.node_kubeconfig = ""
        self.client = ""
        self.vip = ""
        self.vip6 = ""
        self.macs: dict[int, str] = {}
        self.node_port = 0

    @property
    def cp_dir(self) -> Path:
        return self.workdir / "cp"

    def start_forwarder(self, index: int) -> None:
        self.forwarders[index] = self.lab.start(
            self.lab.nodes[index], [sys.executable, "-m", "lbctl", "forwarder", "--node", f"node-{index}",
                                    "--mode", "full", "--kubeconfig", self.node_kubeconfig,
                                    "--restart-grace", str(RESTART_GRACE_S),
                                    "--metrics-port", str(METRICS_PORT)],
            f"forwarder-node-{index}.log")

    def setup(self) -> None:
        lab = self.lab
        lab.add_bridge()
        self.client = lab.add_client(0)
        for index in NODES:
            lab.add_node(index)
        info = controlplane.up(self.cp_dir, extra_addresses=(lab.bridge_address,))
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
        kube.create_pool("bench", [f"{lab.lan_address(200)}-{lab.lan_address(210)}",
                                   f"{lab.lan6_address(200)}-{lab.lan6_address(210)}"])
        for index in NODES:
            pod_ns, address = lab.add_pod(index)
            lab.start(pod_ns, [sys.executable, "-m", "lbctl.lab.server", "--name", f"web-{index}",
                               "--tcp", "8080", "--echo", "9000"], f"pod-{index}.log")
            kube.create_pod("bench", f"web-{index}", f"node-{index}", address, {"app": "web"},
                            {"http": ("TCP", 8080), "echo": ("TCP", 9000)})
        kube.create_service("bench", "web", {"app": "web"},
                            [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                             {"name": "echo", "protocol": "TCP", "port": 7000, "targetPort": 9000}],
                            ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
        self.vip, self.vip6 = wait_for(lambda: (ips if len(ips := kube.external_ips("bench", "web")) == 2 else None),
                                       60, "both addresses")
        self.macs = {index: link_mac(lab.nodes[index]) for index in NODES}
        self.node_port = next(p["nodePort"] for p in kube.service("bench", "web")["spec"]["ports"]
                              if p["name"] == "echo")

    def node_of(self, body: str) -> int:
        peer = parse_answer(body)[1]
        for index in NODES:
            if peer in (self.lab.node_address(index), pod_gateway(index)):
                return index
        raise ValueError(f"{peer} is no node's address")

    def through(self) -> int | None:
        """The node one request went through, or None."""
        try:
            return self.node_of(http_get(self.client, self.vip, 80, timeout=0.2))
        except (OSError, ValueError):
            return None

    def through6(self) -> int | None:
        """The node that answered one ICMPv6 echo to the IPv6 VIP (by the client's neighbour entry)."""
        if not ping(self.client, self.vip6, timeout=0.2):
            return None
        mac = neighbour(self.client, self.vip6)
        return next((index for index, m in self.macs.items() if m == mac), None)

    def holder(self) -> int:
        """Wait until exactly one node holds the VIP, traffic goes through it, and it is recorded."""
        kube = self.kube
        assert kube is not None
        wait_for(lambda: kube.annotation("bench", "web", ANNOUNCING_NODE_ANNOTATION), 30, "an announcing node")
        def single_holder() -> int | None:
            holders = vip_holders(self.lab.nodes, self.vip)
            return next(iter(holders)) if len(holders) == 1 else None
        owner: int = wait_for(single_holder, 30, "one holder")
        wait_for(lambda: vip_holders(self.lab.nodes, self.vip6) == {owner}, 30, "the IPv6 VIP with it")
        wait_for(lambda: all(self.through() == owner for _ in range(3)), 30, f"traffic through node-{owner}")
        wait_for(lambda: self.through6() == owner, 30, f"IPv6 echo answered by node-{owner}")
        return owner

    def time_failover(self, owner: int) -> tuple[float, float]:
        """(IPv4, IPv6) seconds until the first answer through another node, timed side by side."""
        started = time.monotonic()
        found: dict[int, float] = {}

        def poll(family: int, through: Callable[[], int | None]) -> None:
            while time.monotonic() - started < RESTART_GRACE_S + 30:
                node = through()
                if node is not None and node != owner:
                    found[family] = time.monotonic() - started
                    return
                time.sleep(0.02)

        threads = [threading.Thread(target=poll, args=(4, self.through)),
                   threading.Thread(target=poll, args=(6, self.through6))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(found) < 2:
            raise TimeoutError(f"no failover from node-{owner} for IPv{({4, 6} - set(found)).pop()}")
        return found[4], found[6]

    def link_down(self) -> tuple[float, float]:
        owner = self.holder()
        self.lab.set_link(owner, up=False)
        elapsed = self.time_failover(owner)
        self.lab.set_link(owner, up=True)
        return elapsed

    def forwarder_gone(self) -> tuple[float, float]:
        owner = self.holder()
        self.lab.kill(self.forwarders[owner])
        elapsed = self.time_failover(owner)
        self.start_forwarder(owner)
        return elapsed

    def apiserver_outage(self) -> dict[str, Any]:
        owner = self.holder()
        with VipWatch(self.client, self.vip, self.lab.nodes, self.node_of) as vip_watch:
            time.sleep(1.0)
            argv = faults.kill(self.cp_dir, "kube-apiserver")
            try:
                time.sleep(OUTAGE_S)
            finally:
                faults.start_again(self.cp_dir, "kube-apiserver", argv)
            assert self.kube is not None
            wait_for(lambda: _answers(self.kube), 60, "the apiserver back", interval=0.2)
            time.sleep(10.0)
        return {"owner": owner, "requests": len(vip_watch.answers) + len(vip_watch.failures),
                "failed": len(vip_watch.failures), "moves": len(vip_watch.moves()) - 1}

    def forwarder_restarts(self) -> dict[str, int]:
        resets = moves = 0
        for kill in (False, True):
            owner = self.holder()
            flows = open_flows(self.client, [(self.vip, 7000)] * 3 + [(self.lab.node_address(owner),
                                                                       self.node_port)] * 3)
            try:
                assert exchange_all(flows, "hello") == []
                with VipWatch(self.client, self.vip, self.lab.nodes, self.node_of) as vip_watch:
                    if kill:
                        self.lab.kill(self.forwarders[owner])
                        time.sleep(5.0)
                    else:
                        self.lab.stop(self.forwarders[owner])
                    self.start_forwarder(owner)
                    time.sleep(6.0)  # started, settled, decided
                    failed = exchange_all(flows, "after")
                resets += len(failed)
                moves += len(vip_watch.moves()) - 1
            finally:
                for flow in flows:
                    flow.close()
        return {"resets": resets, "moves": moves}

    def forwarder_writes(self) -> float:
        """Every write request the forwarders have sent so far (their lbctl_kube_requests_total)."""
        total = 0.0
        for index in NODES:
            text = http_get_host(self.lab.node_address(index), METRICS_PORT, "/metrics")
            for verb, count in re.findall(r'^lbctl_kube_requests_total\{verb="([A-Z]+)"\} (\S+)$', text, re.M):
                if verb in WRITE_VERBS:
                    total += float(count)
        return total

    def writes_per_node_per_min(self, seconds: float = 120.0) -> tuple[float, float]:
        """Over `seconds` of steady state: changes of the forwarders' Leases (read every 0.25 s, so
        no renewal is missed), and every write any forwarder sent (its own request counter: Lease,
        annotations, Events, BGPPeer status), each per node per minute."""
        assert self.kube is not None
        coordination = k8s.CoordinationV1Api(self.kube.api)
        seen: dict[str, str] = {}
        writes = -len(NODES)  # the first reading of each is no write
        before = self.forwarder_writes()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for lease in coordination.list_namespaced_lease("lbctl-system",
                                                            label_selector="lbctl.io/forwarder-node").items:
                assert lease.metadata is not None
                name, version = str(lease.metadata.name), str(lease.metadata.resource_version)
                if seen.get(name) != version:
                    seen[name] = version
                    writes += 1
            time.sleep(0.25)
        every = self.forwarder_writes() - before
        per = len(NODES) * (seconds / 60.0)
        return writes / per, every / per

    def close(self) -> list[str]:
        problems = self.lab.close()
        if self.kube is not None:
            self.kube.close()
        faults.thaw(self.cp_dir, "kube-apiserver")
        controlplane.down(self.cp_dir)
        return problems


def http_get_host(address: str, port: int, path: str) -> str:
    """GET from this (the root) namespace, which reaches the nodes over the lab bridge."""
    with urllib.request.urlopen(f"http://{address}:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def _answers(kube: LabKube | None) -> bool:
    try:
        assert kube is not None
        kube.core.list_namespace(limit=1, _request_timeout=2)
        return True
    except Exception:
        return False


def run(rounds: int, leader: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lbctl-bench-failover-"))
    bench = Bench(workdir)
    try:
        bench.setup()
        cuts = [bench.link_down() for _ in range(rounds)]
        cut, cut6 = [c[0] for c in cuts], [c[1] for c in cuts]
        gone, gone6 = bench.forwarder_gone()
        outage = bench.apiserver_outage()
        restarts = bench.forwarder_restarts()
        lease_writes, all_writes = bench.writes_per_node_per_min()
    finally:
        problems = bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
        assert not problems, problems
    result: dict[str, Any] = {
        "link_down_s": round(statistics.median(cut), 2), "link_down_samples_s": [round(x, 2) for x in cut],
        "failover_v6_s": round(statistics.median(cut6), 2), "failover_v6_samples_s": [round(x, 2) for x in cut6],
        "forwarder_gone_failover_s": round(gone, 2), "forwarder_gone_failover_v6_s": round(gone6, 2),
        "restart_grace_s": RESTART_GRACE_S,
        "apiserver_outage_s": OUTAGE_S, "apiserver_outage_requests": outage["requests"],
        "apiserver_outage_failed_requests": outage["failed"], "apiserver_outage_vip_moves": outage["moves"],
        "forwarder_restart_resets": restarts["resets"], "forwarder_restart_vip_moves": restarts["moves"],
        "lease_writes_per_node_per_min": round(lease_writes, 2),
        "forwarder_writes_per_node_per_min": round(all_writes, 2),
    }
    if leader:  # its own control plane and operators: run it as its own process
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("leader_takeover.py"))],
                             capture_output=True, text=True, check=True).stdout
        result["leader_takeover_s"] = json.loads(out.strip().splitlines()[-1])["leader_takeover_s"]
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-leader", action="store_true", help="leave out leader_takeover_s")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("failover: needs root (network namespaces, nftables)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.rounds, leader=not args.skip_leader)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
