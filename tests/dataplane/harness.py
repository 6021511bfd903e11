"""Helpers for the dataplane suite: the environment the session fixture builds, pods, waiting for
rules, reading VIPs and logs."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lbctl.forwarder.announce import ANNOUNCING_NODE_ANNOTATION
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, call_in, http_get, pod_gateway, pod_gateway6
from lbctl.lab.probes import held_vips, vip_holders

NODES = (1, 2, 3)
STATUS_PORT = 7476
# Shorter than the default 15 s to keep the suite quick, long enough for a restart after 5 s.
RESTART_GRACE_S = 10.0
_LOG_TAIL = 30
_pool_blocks = itertools.count(0)


def require_root_tools() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root (network namespaces and nftables need it)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (apt-get install {package}; `bash .ci/setup` does it)")
    if problems:
        pytest.fail("dataplane tests cannot run: " + "; ".join(problems), pytrace=False)


def mentions(text: str, address: str) -> bool:
    """Whether `address` occurs in `text` as a whole address (198.19.1.1 is not in 198.19.1.11)."""
    return re.search(rf"(?<![\d.]){re.escape(address)}(?![\d])", text) is not None


@dataclass
class Pod:
    name: str
    namespace: str  # Kubernetes namespace
    netns: str
    address: str
    node: int
    server: subprocess.Popen[bytes]
    address6: str = ""


@dataclass
class DataplaneEnv:
    lab: Lab
    kube: LabKube
    workdir: Path
    node_kubeconfig: str
    clients: list[str]
    cp_dir: Path
    forwarders: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    forwarder_args: list[str] = field(default_factory=list)
    modes: dict[int, str] = field(default_factory=dict)
    _starts: dict[int, int] = field(default_factory=dict)
    # Kubernetes namespace → its pods' (network namespace, server), removed with it
    _pods: dict[str, list[tuple[str, subprocess.Popen[bytes]]]] = field(default_factory=dict)

    # -- forwarders -----------------------------------------------------------------------------
    @property
    def peer_secret(self) -> Path:
        """The key every forwarder signs its heartbeats with (as the DaemonSet's Secret gives it)."""
        path = self.workdir / "peer-secret"
        if not path.exists():
            path.write_text(uuid.uuid4().hex + "\n")
        return path

    def start_forwarder(self, index: int, mode: str = "full") -> None:
        self._starts[index] = self._starts.get(index, 0) + 1
        self.modes[index] = mode
        self.forwarders[index] = self.lab.start(
            self.lab.nodes[index],
            [sys.executable, "-m", "lbctl", "forwarder", "--node", f"node-{index}", "--mode", mode,
             "--kubeconfig", self.node_kubeconfig, "--status-port", str(STATUS_PORT),
             "--peer-secret-file", str(self.peer_secret), *self.forwarder_args],
            f"forwarder-node-{index}.log")

    def stop_forwarder(self, index: int) -> None:
        """SIGTERM, as a DaemonSet rolling update does."""
        self.lab.stop(self.forwarders[index])

    def forwarder_status(self, index: int) -> tuple[int, dict[str, Any]] | None:
        """The forwarder's /healthz (status code, body), or None when nothing answers."""
        def fetch() -> tuple[int, dict[str, Any]]:
            with socket.create_connection(("127.0.0.1", STATUS_PORT), timeout=1.0) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                data = b"".join(iter(lambda: sock.recv(65536), b""))
            head, _, body = data.decode().partition("\r\n\r\n")
            return int(head.split()[1]), json.loads(body)
        try:
            return call_in(self.lab.nodes[index], fetch)
        except (OSError, ValueError):
            return None

    def holders(self, vip: str) -> set[int]:
        """The nodes that have `vip` on an interface right now (read over netlink, not ip(8))."""
        return vip_holders(self.lab.nodes, vip)

    def kill_forwarder(self, index: int) -> None:
        self.lab.kill(self.forwarders[index])

    def ensure_forwarders(self) -> None:
        """Restore cut links, and run a full-mode forwarder on every node again (a test may have
        killed one, stopped one, or switched them to announce mode)."""
        for index in NODES:
            self.lab.set_link(index, up=True)
            if self.forwarders[index].poll() is None and self.modes.get(index) != "full":
                self.lab.stop(self.forwarders[index])
            if self.forwarders[index].poll() is not None:
                self.start_forwarder(index)

    def nft_table(self, index: int) -> str:
        return self.lab.run_in(self.lab.nodes[index], "nft", "list", "table", "inet", "lbctl", check=False).stdout

    def vips_on(self, index: int) -> set[str]:
        """The VIPs a forwarder put on node `index` (IPv4 with its label, IPv6 with its address protocol)."""
        return held_vips(self.lab.nodes[index])

    # -- Kubernetes objects -----------------------------------------------------------------------
    def new_namespace(self) -> tuple[str, str]:
        """A Kubernetes namespace and a pool of 8 addresses of each family only it may use; returns
        (namespace, pool)."""
        name = f"dp-{uuid.uuid4().hex[:8]}"
        self.kube.create_namespace(name)
        block = next(_pool_blocks)
        first = 128 + 8 * (block % 15)
        self.kube.create_pool(name, [f"{self.lab.lan_address(first)}-{self.lab.lan_address(first + 7)}",
                                     f"{self.lab.lan6_address(first)}-{self.lab.lan6_address(first + 7)}"],
                              namespaces=[name])
        return name, name

    def add_pod(self, namespace: str, app: str, node: int, ready: bool = True) -> Pod:
        netns, address = self.lab.add_pod(node)
        name = f"{app}-{netns.rsplit('-', 2)[-2]}-{netns.rsplit('-', 1)[-1]}"
        server = self.lab.start(netns, [sys.executable, "-m", "lbctl.lab.server", "--name", name,
                                        "--tcp", "8080", "--udp", "5353", "--echo", "9000"], f"pod-{name}.log")
        self._pods.setdefault(namespace, []).append((netns, server))
        def listening() -> bool:
            try:
                http_get(self.lab.nodes[node], address, 8080, timeout=0.5)
                return True
            except OSError:
                return server.poll() is not None
        wait_for(listening, 20, f"the server of pod {name}")
        assert server.poll() is None, f"the server of pod {name} exited"
        address6 = self.lab.pods6[netns]
        self.kube.create_pod(namespace, name, f"node-{node}", address, {"app": app},
                             {"http": ("TCP", 8080), "dns": ("UDP", 5353), "echo": ("TCP", 9000)}, ready=ready,
                             address6=address6)
        return Pod(name, namespace, netns, address, node, server, address6)

    def remove_pods(self, namespace: str) -> None:
        """Stop the servers of the pods made for Kubernetes namespace `namespace` and take their
        network namespaces away (at the end of the test that made them, not of the session)."""
        for netns, server in reversed(self._pods.pop(namespace, [])):
            self.lab.stop(server)
            self.lab.remove_pod(netns)

    def wait_endpoints(self, namespace: str, service: str, addresses: set[str], timeout: float = 20) -> None:
        wait_for(lambda: self.kube.endpoint_addresses(namespace, service) == addresses, timeout,
                 f"EndpointSlices of {namespace}/{service} to be {sorted(addresses)}")

    def wait_rules(self, present: set[str] | frozenset[str] = frozenset(),
                   absent: set[str] | frozenset[str] = frozenset(), timeout: float = 15,
                   nodes: tuple[int, ...] = NODES) -> None:
        """Until the table of every node (of `nodes`) with a running forwarder mentions each
        address of `present` and none of `absent`."""
        def done() -> bool:
            tables = [self.nft_table(i) for i in nodes if self.forwarders[i].poll() is None]
            return all(all(mentions(t, p) for p in present) and not any(mentions(t, a) for a in absent)
                       for t in tables)
        wait_for(done, timeout, f"nft tables with {sorted(present)} and without {sorted(absent)}", interval=0.1)

    def owner(self, namespace: str, service: str) -> str | None:
        return self.kube.annotation(namespace, service, ANNOUNCING_NODE_ANNOTATION)

    def node_of(self, peer: str) -> int:
        """Which node a masqueraded connection came through."""
        for index in NODES:
            if peer in (self.lab.node_address(index), pod_gateway(index), self.lab.node6_address(index),
                        pod_gateway6(index)):
                return index
        raise AssertionError(f"{peer} is no node's address")

    def tail_logs(self) -> list[tuple[str, str]]:
        sections = []
        for log in sorted(self.workdir.glob("*.log")):
            if log.name.startswith(("forwarder", "operator")):
                lines = log.read_text(errors="replace").splitlines()[-_LOG_TAIL:]
                sections.append((f"{log.name} (tail)", "\n".join(lines)))
        return sections
