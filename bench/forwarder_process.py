"""The real `lbctl forwarder --mode full` process against the embedded apiserver: its memory, its
first full sync and the time from an EndpointSlice change in the apiserver to the element in the
kernel.

Self-contained (root): starts the embedded control plane (also listening on a lab bridge), makes
N Services (type LoadBalancer, class lbctl.io/bench, an ingress address in their status, no
selector) and an EndpointSlice of E endpoints for each, written straight through the API; then
starts one forwarder in a node network namespace (it programs rules but announces nothing:
--announce-class names no class) and measures:

- first_sync_s: forwarder start → its /healthz says serving (the first full transaction committed);
- process_rss_mb: the forwarder process's peak resident memory (VmHWM) at the end;
- endpoint_change_to_kernel_ms p50/p99: one endpoint of one EndpointSlice replaced (the moment the
  apiserver answered the write) → `nft monitor` in the node namespace printing the new element
  (the kernel's netlink notification of the committed transaction), over --changes changes.

    python3 bench/forwarder_process.py --services 10000 --endpoints 5 [--dual-stack] [--changes 40]

Prints JSON. With --dual-stack every other Service is dual-stack (an IPv6 address and an IPv6
EndpointSlice too). Everything it makes (control plane, namespaces, processes) is removed at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lbctl.dev import controlplane
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, call_in

CLASS = "lbctl.io/bench"
STATUS_PORT = 7476
NAMESPACES = 10


def service_body(index: int, dual: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"svc{index}"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": CLASS, "externalTrafficPolicy": "Cluster",
                 "ipFamilies": ["IPv4", "IPv6"] if dual else ["IPv4"],
                 "ipFamilyPolicy": "RequireDualStack" if dual else "SingleStack",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
    }


def ingress(index: int, dual: bool) -> list[dict[str, str]]:
    addresses = [{"ip": f"100.{64 + (index >> 16)}.{(index >> 8) & 255}.{index & 255}", "ipMode": "VIP"}]
    if dual:
        addresses.append({"ip": str(ipaddress.ip_address(f"2001:db8:ffff::{index:x}")), "ipMode": "VIP"})
    return addresses


def endpoint_address(index: int, j: int, family: str, generation: int = 0) -> str:
    if family == "IPv6":
        # the apiserver takes IPv6 endpoint addresses in canonical form only
        return str(ipaddress.ip_address(f"2001:db8:{(index >> 8) & 255:x}:{index & 255:x}::{j + 1 + generation:x}"))
    return f"10.{(index >> 8) & 255}.{index & 255}.{(j + generation) % 250 + 1}"


def slice_body(index: int, family: str, endpoints: int, generation: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
        "metadata": {"name": f"svc{index}-{family.lower()}", "labels": {"kubernetes.io/service-name": f"svc{index}"}},
        "endpoints": [{"addresses": [endpoint_address(index, j, family, generation if j == 0 else 0)],
                       "conditions": {"ready": True}, "nodeName": "node-1"} for j in range(endpoints)],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    }


class Monitor:
    """`nft monitor` in a namespace: each line it prints, with the moment it was read."""

    def __init__(self, namespace: str) -> None:
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.proc = subprocess.Popen(["ip", "netns", "exec", namespace, "nft", "monitor"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))

    def wait_for(self, needle: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nft monitor never showed {needle!r}")
            try:
                at, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if needle in line:
                return at

    def drain(self) -> None:
        while not self.lines.empty():
            self.lines.get_nowait()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def healthz(namespace: str) -> int | None:
    def fetch() -> int:
        with socket.create_connection(("127.0.0.1", STATUS_PORT), timeout=1.0) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            data = sock.recv(4096)
        return int(data.split()[1])
    try:
        return call_in(namespace, fetch)
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run(services: int, endpoints: int, dual_stack: bool, changes: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lbctl-bench-fwd-"))
    lab = Lab(prefix=f"lbxp{os.getpid() % 4096:03x}", log_dir=workdir)
    cp_dir = workdir / "controlplane"
    kube: LabKube | None = None
    try:
        lab.add_bridge()
        node = lab.add_node(1)
        controlplane.up(cp_dir, extra_addresses=(lab.bridge_address,))
        kube = LabKube(str(cp_dir / "kubeconfig"))
        kube.create_node("node-1", lab.node_address(1))
        for n in range(NAMESPACES):
            kube.create_namespace(f"bench{n}")

        def dual(index: int) -> bool:
            return dual_stack and index % 2 == 0

        def make(index: int) -> None:
            assert kube is not None
            ns = f"bench{index % NAMESPACES}"
            kube.core.create_namespaced_service(ns, service_body(index, dual(index)))
            kube.core.patch_namespaced_service_status(f"svc{index}", ns, {"status": {"loadBalancer": {
                "ingress": ingress(index, dual(index))}}})
            for family in ("IPv4", "IPv6") if dual(index) else ("IPv4",):
                kube.discovery.create_namespaced_endpoint_slice(ns, slice_body(index, family, endpoints))

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(make, range(services)))
        create_s = time.monotonic() - started

        monitor = Monitor(node)
        try:
            started = time.monotonic()
            forwarder = lab.start(node, [
                sys.executable, "-m", "lbctl", "forwarder", "--node", "node-1", "--mode", "full",
                "--kubeconfig", str(cp_dir / f"kubeconfig-{lab.bridge_address}"), "--class", CLASS,
                "--announce-class", "lbctl.io/nothing", "--status-port", str(STATUS_PORT),
                "--resync-interval", "3600"], "forwarder.log")
            wait_for(lambda: healthz(node) == 200 or forwarder.poll() is not None, 600, "the first full sync",
                     interval=0.02)
            first_sync_s = time.monotonic() - started
            if forwarder.poll() is not None:
                raise SystemExit(f"the forwarder exited: {(workdir / 'forwarder.log').read_text()[-2000:]}")
            rss_after_sync = peak_rss_mb(forwarder.pid)

            latencies = []
            for change in range(changes):
                index = (change * 7919) % services
                family = "IPv6" if dual(index) and change % 2 else "IPv4"
                generation = 100 + change
                body = slice_body(index, family, endpoints, generation)
                needle = f" {endpoint_address(index, 0, family, generation)} . 8080"
                monitor.drain()
                kube.discovery.replace_namespaced_endpoint_slice(body["metadata"]["name"],
                                                                 f"bench{index % NAMESPACES}", body)
                written = time.monotonic()
                latencies.append(monitor.wait_for(needle, 30) - written)
                time.sleep(0.1)
            rss = peak_rss_mb(forwarder.pid)
        finally:
            monitor.close()
    finally:
        if kube is not None:
            kube.close()
        problems = lab.close()
        controlplane.down(cp_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        assert not problems, problems
    ordered = sorted(latencies)
    return {
        "services": services, "endpoints": endpoints, "dual_stack_services": sum(dual(i) for i in range(services)),
        "create_s": round(create_s, 1), "first_sync_s": round(first_sync_s, 2),
        "process_rss_mb": rss, "process_rss_after_first_sync_mb": rss_after_sync,
        "endpoint_change_to_kernel_ms": {
            "changes": changes, "p50": round(statistics.median(ordered) * 1000, 1),
            "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000, 1),
            "max": round(ordered[-1] * 1000, 1)},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--dual-stack", action="store_true", help="every other Service dual-stack")
    parser.add_argument("--changes", type=int, default=40)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("forwarder_process: needs root (network namespaces, nftables)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.services, args.endpoints, args.dual_stack, args.changes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
