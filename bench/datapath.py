"""Data-path cost of the forwarder's rules: client → pod directly vs client → VIP → pod, same run.

Builds (and removes) a client and a node namespace on a bridge and a pod behind the node; the
node gets the forwarder's ruleset for one Service — rendered by lbctl.forwarder.render and applied
with nft exactly as the forwarder does — and the VIP on its lo. The direct path is routed by the
same node (so both paths cross it, with conntrack on); the VIP path adds the DNAT through the
verdict map, numgen pick and masquerade. No control plane is needed. Root only.

    python3 bench/datapath.py [--seconds 4] [--rounds 2] [--ipv6]

With --ipv6 the same over IPv6: the client, node and pod's IPv6 addresses (the lab is dual-stack),
an IPv6-only Service and an IPv6 VIP (on the node's LAN interface, as announce mode puts it).

Prints JSON: direct_gbps, vip_gbps, ratio (iperf3 TCP, median of rounds), direct_cps, vip_cps,
cps_ratio (TCP connections opened and reset per second by one client thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import sys
import time
from typing import Any

from lbctl.forwarder.apply import Nft
from lbctl.forwarder.render import Planner
from lbctl.forwarder.state import Backend, ServicePort, ServiceState
from lbctl.lab.kube import wait_for
from lbctl.lab.netns import Lab, call_in

IPERF_PORT = 5201
ACCEPT_PORT = 7000
# The pod's accept-and-close server for the connection-rate loop.
ACCEPT_SERVER = f"""
import socket
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", {ACCEPT_PORT})); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
"""


def iperf(lab: Lab, client: str, target: str, seconds: float) -> float:
    out = lab.run_in(client, "iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J").stdout
    report: dict[str, Any] = json.loads(out)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def connection_rate(client: str, target: str, seconds: float) -> float:
    linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT piling up on the client
    family = socket.AF_INET6 if ":" in target else socket.AF_INET

    def loop() -> float:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock = socket.socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.settimeout(2)
            sock.connect((target, ACCEPT_PORT))
            sock.close()
            done += 1
        return done / seconds
    return call_in(client, loop)


def run(seconds: float, rounds: int, ipv6: bool = False) -> dict[str, Any]:
    lab = Lab(prefix=f"lbxd{os.getpid() % 4096:03x}")
    try:
        vip = lab.lan6_address(200) if ipv6 else lab.lan_address(200)
        lab.add_bridge()
        client = lab.add_client(0)
        node = lab.add_node(1)
        pod, pod_ip = lab.add_pod(1)
        if ipv6:
            pod_ip = lab.pods6[pod]
        lab.route_pods_via(client, 1)
        lab.run_in(client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000")  # both families

        state = ServiceState(
            key="bench/datapath", uid="bench", created="2024-01-01T00:00:00Z", lb_ips=(vip,),
            families=(6,) if ipv6 else (4,),
            ports=(ServicePort("iperf", "tcp", IPERF_PORT, None, (Backend(pod_ip, IPERF_PORT),)),
                   ServicePort("accept", "tcp", ACCEPT_PORT, None, (Backend(pod_ip, ACCEPT_PORT),))))
        Nft(("ip", "netns", "exec", node, "nft")).apply(Planner().plan_full([state], replace=True).transaction)
        if ipv6:  # NDP answers for it only on the interface the client's solicitation arrives on
            lab.run_in(node, "ip", "addr", "add", f"{vip}/128", "dev", "eth0", "nodad")
        else:
            lab.run_in(node, "ip", "addr", "add", f"{vip}/32", "dev", "lo")

        lab.start(pod, ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3.log")
        lab.start(pod, [sys.executable, "-c", ACCEPT_SERVER], "accept.log")

        def reachable(target: str, port: int) -> bool:
            def probe() -> bool:
                try:
                    socket.create_connection((target, port), timeout=0.5).close()
                    return True
                except OSError:
                    return False
            return call_in(client, probe)
        for target in (pod_ip, vip):
            for port in (IPERF_PORT, ACCEPT_PORT):
                wait_for(lambda: reachable(target, port), 20, f"{target}:{port}")  # noqa: B023

        direct, vip_gbps = [], []
        direct_cps, vip_cps = [], []
        for _ in range(rounds):  # interleaved, so drift in the machine's load hits both alike
            direct.append(iperf(lab, client, pod_ip, seconds))
            vip_gbps.append(iperf(lab, client, vip, seconds))
            direct_cps.append(connection_rate(client, pod_ip, seconds / 2))
            vip_cps.append(connection_rate(client, vip, seconds / 2))
    finally:
        problems = lab.close()
        assert not problems, problems
    d, v = statistics.median(direct), statistics.median(vip_gbps)
    dc, vc = statistics.median(direct_cps), statistics.median(vip_cps)
    return {"family": "ipv6" if ipv6 else "ipv4",
            "direct_gbps": round(d, 2), "vip_gbps": round(v, 2), "ratio": round(v / d, 3),
            "direct_cps": round(dc), "vip_cps": round(vc), "cps_ratio": round(vc / dc, 3),
            "seconds": seconds, "rounds": rounds, "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ipv6", action="store_true", help="client, VIP and pod over IPv6")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("datapath: needs root and iperf3 (bash .ci/setup installs it)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.seconds, args.rounds, args.ipv6)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
