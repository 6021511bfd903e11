"""`lbctl demo`: the whole thing on one machine, then gone again.

Starts the embedded control plane (in its own temporary directory), the operator with the local
provider, two "nodes" (network namespaces on a bridge) each running the forwarder, a pod on each
with a real HTTP server, a LoadBalancerPool and a Service; prints the Service as `kubectl get svc`
would, fetches a page through its VIP from a client namespace and prints it. Everything it made
(namespaces, links, processes, files) is removed at the end — also on Ctrl-C or SIGTERM.

`lbctl demo --bgp`: the pool is advertised by BGP instead. A router namespace runs FRR (zebra and
bgpd) between a client and the nodes; every node's forwarder peers with it (a BGPPeer), the router
shows one route to the address with a next hop per node, and pages fetched from the client behind
the router come through both nodes (ECMP).
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from lbctl.dev import controlplane
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, http_get, pod_gateway
from lbctl.lab.router import Router, frr_missing, install_bgp_api, start_router
from lbctl.lab.server import parse_answer
from lbctl.model.meta import (
    ANNOUNCING_NODE_ANNOTATION,
    API_GROUP,
    API_VERSION,
    API_VERSION_NAME,
    BGP_ANNOUNCING_NODES_ANNOTATION,
)

NODES = (1, 2)
FORWARDER_STATUS_PORT = 7476
FORWARDER_METRICS_PORT = 7477
NAMESPACE = "demo"
SERVICE = "hello"


class DemoError(RuntimeError):
    pass


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _preflight(bgp: bool = False) -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo makes network namespaces and nftables rules: run it as root (sudo lbctl demo)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            raise DemoError(f"{tool} is missing: run `bash .ci/setup` (or apt-get install {package})")
    problem = frr_missing() if bgp else None
    if problem:
        raise DemoError(f"--bgp needs FRR as the router: {problem}")


def kubectl_get_svc(service: dict[str, Any], now: float) -> str:
    """The Service as a `kubectl get svc` table (pure)."""
    meta, spec = service.get("metadata") or {}, service.get("spec") or {}
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    external = ",".join(i.get("ip") or i.get("hostname") or "" for i in ingress) or "<pending>"
    ports = ",".join(f"{p['port']}:{p['nodePort']}/{p.get('protocol', 'TCP')}" if p.get("nodePort")
                     else f"{p['port']}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or ())
    created = meta.get("creationTimestamp")
    age = "?"
    if isinstance(created, str):
        stamp = dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        seconds = max(0, int(now - stamp))
        age = f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"
    rows = [("NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"),
            (str(meta.get("name")), str(spec.get("type")), str(spec.get("clusterIP")), external, ports, age)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


class Demo:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="lbctl-demo-"))
        self.lab = Lab(log_dir=self.workdir)
        self.cp_dir = self.workdir / "controlplane"
        self.kube: LabKube | None = None
        self._closed = False

    def run(self, keep_seconds: float, bgp: bool = False) -> None:
        lab = self.lab
        _say(f"building the network (namespaces and links named {lab.prefix}-*) in {self.workdir}")
        lab.add_bridge()
        client = lab.add_client(0)
        for index in NODES:
            lab.add_node(index)
        pods = {index: lab.add_pod(index) for index in NODES}

        _say("starting the control plane (etcd, kube-apiserver, kube-controller-manager)")
        info = controlplane.up(self.cp_dir, extra_addresses=(lab.bridge_address,))
        kubeconfig = str(self.cp_dir / "kubeconfig")
        self.kube = kube = LabKube(kubeconfig)
        kube.install_pool_crd()
        if bgp:
            install_bgp_api(kube)
        # the forwarders run as the DaemonSet's ServiceAccount, with its RBAC, and reach the
        # apiserver through the bridge (a node namespace cannot reach the root's 127.0.0.1)
        kube.install_forwarder_rbac()
        node_kubeconfig = kube.service_account_kubeconfig(
            "lbctl-system", "lbctl-forwarder", f"https://{lab.bridge_address}:{info.server.rsplit(':', 1)[1]}",
            info.ca_file, self.workdir / "kubeconfig-forwarder")
        for index in NODES:
            kube.create_node(f"node-{index}", lab.node_address(index))
        router: Router | None = None
        if bgp:
            _say("starting the router: FRR (zebra + bgpd) in a namespace, a client behind it; one BGPPeer for it")
            router = start_router(lab)
            kube.custom.create_cluster_custom_object(API_GROUP, API_VERSION_NAME, "bgppeers", {
                "apiVersion": API_VERSION, "kind": "BGPPeer", "metadata": {"name": "tor"},
                "spec": {"peerAddress": router.lan_address, "peerASN": router.asn, "myASN": 64512,
                         "holdTime": "3s"}})

        env = {**os.environ, "KUBECONFIG": kubeconfig}
        _say("starting the operator (local provider) and a forwarder on each node")
        metrics_port = controlplane.free_port()
        operator = lab.start(None, [sys.executable, "-m", "lbctl", "operator", "--provider", "local",
                                    "--node-port-range", "30000-54999", "--log-level", "warning",
                                    "--metrics-port", str(metrics_port)],
                             "operator.log", env=env)
        forwarders = {}
        for index in NODES:
            forwarders[index] = lab.start(
                lab.nodes[index],
                [sys.executable, "-m", "lbctl", "forwarder", "--node", f"node-{index}", "--mode", "full",
                 "--kubeconfig", node_kubeconfig, "--status-port", str(FORWARDER_STATUS_PORT),
                 "--metrics-port", str(FORWARDER_METRICS_PORT)], f"forwarder-node-{index}.log")
        for index, (pod_ns, _address) in pods.items():
            greeting = (f"Hello from pod hello-{index} on node-{index}, through lbctl! "
                        "Below: the pod, and the address the connection came from.")
            lab.start(pod_ns, [sys.executable, "-m", "lbctl.lab.server", "--name", f"hello-{index}",
                               "--tcp", "8080", "--greeting", greeting], f"pod-{index}.log")

        kube.create_namespace(NAMESPACE)
        if router is not None:  # addresses no LAN has: only the router's routes lead to them
            kube.create_pool("demo", ["198.19.240.10-198.19.240.20"], advertisement={"mode": "bgp"})
        else:
            kube.create_pool("demo", [f"{lab.lan_address(200)}-{lab.lan_address(220)}"])
        for index, (_pod_ns, address) in pods.items():
            kube.create_pod(NAMESPACE, f"hello-{index}", f"node-{index}", address, {"app": "hello"},
                            {"http": ("TCP", 8080)})
        kube.create_service(NAMESPACE, SERVICE, {"app": "hello"},
                            [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}])
        _say("waiting for the operator to assign an address")
        vip = kube.wait_external_ip(NAMESPACE, SERVICE, timeout=60)
        for name, proc in [("operator", operator), *((f"forwarder on node-{i}", p) for i, p in forwarders.items())]:
            if proc.poll() is not None:
                raise DemoError(f"the {name} exited; see its log in {self.workdir}")

        print("$ kubectl get svc -n demo")
        print(kubectl_get_svc(kube.service(NAMESPACE, SERVICE), time.time()))
        print()
        if router is not None:
            self._show_bgp(kube, router, vip)
            self._keep(keep_seconds, kubeconfig, metrics_port)
            return
        _say(f"fetching http://{vip}/ from the client namespace {client}")

        def fetch() -> str | None:
            try:
                return http_get(client, vip, 80, timeout=1.0)
            except OSError:
                return None
        page = wait_for(fetch, 30, f"an answer from http://{vip}/", interval=0.2)
        owner = wait_for(lambda: kube.annotation(NAMESPACE, SERVICE, ANNOUNCING_NODE_ANNOTATION), 10,
                         f"the {ANNOUNCING_NODE_ANNOTATION} annotation")
        print(f"$ curl http://{vip}/      # {vip} is announced by {owner}")
        print(page.rstrip())
        self._keep(keep_seconds, kubeconfig, metrics_port)

    def _show_bgp(self, kube: LabKube, router: Router, vip: str) -> None:
        lab = self.lab
        hops = {lab.node_address(i) for i in NODES}
        _say("waiting for the router to learn the address from every node")
        wait_for(lambda: router.next_hops(f"{vip}/32") == hops, 60, f"{vip}/32 with a next hop per node",
                 interval=0.2)
        print(f"$ vtysh -c 'show bgp ipv4 unicast {vip}/32'      # in the router namespace")
        print(router.vtysh(f"show bgp ipv4 unicast {vip}/32").rstrip())
        print()
        print(f"$ ip route show {vip}      # in the router namespace: one route, a next hop per node")
        print(lab.run_in(router.namespace, "ip", "route", "show", f"{vip}/32").stdout.rstrip())
        print()
        # masqueraded by the node it came through: its LAN address, or its pod gateway for its own pod
        nodes = {address: f"node-{i}" for i in NODES for address in (lab.node_address(i), pod_gateway(i))}

        def through(port: int) -> str | None:
            try:
                body = http_get(router.client, vip, 80, timeout=1.0, source=(router.client_address, port))
            except OSError:
                return None
            peer = parse_answer(body)[1]
            return nodes.get(peer, peer)
        wait_for(lambda: through(42000), 30, f"an answer from http://{vip}/ behind the router", interval=0.2)
        seen = [through(port) for port in range(42000, 42020)]
        counts = {name: seen.count(name) for name in sorted({s for s in seen if s})}
        print(f"$ for port in 42000..42019: curl --local-port $port http://{vip}/      # from behind the router")
        print("pages through " + ", ".join(f"{name}: {count}" for name, count in counts.items())
              + (f", failed: {seen.count(None)}" if None in seen else ""))
        announcing = wait_for(lambda: kube.annotation(NAMESPACE, SERVICE, BGP_ANNOUNCING_NODES_ANNOTATION), 20,
                              f"the {BGP_ANNOUNCING_NODES_ANNOTATION} annotation")
        print(f"{BGP_ANNOUNCING_NODES_ANNOTATION}: {announcing}")

    def _keep(self, keep_seconds: float, kubeconfig: str, metrics_port: int) -> None:
        lab = self.lab
        if keep_seconds > 0:
            _say(f"export KUBECONFIG={kubeconfig}")
            _say(f"metrics: operator http://127.0.0.1:{metrics_port}/metrics, forwarders " + ", ".join(
                f"http://{lab.node_address(i)}:{FORWARDER_METRICS_PORT}/metrics" for i in NODES))
            _say(f"leaving it up for {keep_seconds:.0f}s (logs in {self.workdir})")
            time.sleep(keep_seconds)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut this short
            signal.signal(sig, signal.SIG_IGN)
        _say("removing everything the demo made")
        problems = self.lab.close()
        if self.kube is not None:
            self.kube.close()
        for line in controlplane.down(self.cp_dir):
            if "nothing to stop" not in line:
                _say(line)
        shutil.rmtree(self.workdir, ignore_errors=True)
        for problem in problems:
            _say(f"could not remove: {problem}")


def run_demo(keep_seconds: float = 0.0, bgp: bool = False) -> int:
    try:
        _preflight(bgp)
    except DemoError as exc:
        print(f"lbctl demo: {exc}", file=sys.stderr)
        return 1
    demo = Demo()
    atexit.register(demo.close)

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # explicit handlers: a shell starts background jobs with SIGINT ignored, and then Python would too
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, terminate), (signal.SIGHUP, terminate), (signal.SIGINT, interrupt))}
    try:
        demo.run(keep_seconds, bgp)
        return 0
    except KeyboardInterrupt:
        print("lbctl demo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # whatever it was, say it plainly, show the logs, and clean up
        print(f"lbctl demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        _dump_logs(demo.workdir)
        return 1
    finally:
        demo.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dump_logs(workdir: Path) -> None:
    for log in sorted(workdir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        if lines:
            print(f"--- {log.name} (last lines) ---\n" + "\n".join(lines), file=sys.stderr)
