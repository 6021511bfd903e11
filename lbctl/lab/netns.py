"""Network namespaces, links and processes of a lab, all named with one prefix and all removed by
`close()` — also after a failure half-way through building it. Each thing made registers how to undo
it right after it is made; `close()` undoes them newest first, each on its own (one that fails does
not keep the others from going), and says what could not be undone.

When `LBCTL_LAB_LEDGER` names a file, every lab appends its prefix to it, so a test session can check
at its end that nothing with any of its labs' prefixes is left (tests/leakcheck.py), including labs
made by processes it started (`lbctl demo`).

Layout (addresses from 198.18.0.0/15, which never leaves the machine; L is a /24 of 198.18.0.0/16
no root interface uses yet, so several labs can coexist):

    root namespace: bridge <prefix>br L.1/24 (the apiserver's extra address)
      ├─ client namespaces L.100+
      ├─ node-i namespaces L.(10+i), ip_forward on, routes to the other nodes' pods
      │     └─ pod namespaces 198.19.i.(10+k)/32, point-to-point to the node's 198.19.i.1
      └─ VIPs: L.128 and up (on the LAN, so clients reach them by ARP)

The lab is dual-stack: every namespace also has an IPv6 address from the documentation prefix
2001:db8::/32, only inside the lab's namespaces (the root namespace's bridge has none, so nothing
IPv6 is routed out of the machine). With L = 198.18.X: the LAN is 2001:db8:0:X::/64 (client
::100+, node-i ::(10+i), VIPs ::128 and up, the host part written with the same digits as the
IPv4 one), node i's pods are 2001:db8:1:i::(10+k)/128 behind the node's 2001:db8:1:i::1. IPv6
forwarding is on in the nodes; duplicate address detection is off in every lab namespace, so
addresses are usable at once (no namespace shares a link with anything outside the lab).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LAN_PREFIX_LEN = 24
LEDGER_ENV = "LBCTL_LAB_LEDGER"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    pass


def free_lan() -> str:
    """A random 198.18.X (a /24) no root-namespace interface has an address in."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False).stdout
    used = {int(x) for x in re.findall(r"inet 198\.18\.(\d+)\.", out)}
    free = [n for n in range(1, 255) if n not in used]
    if not free:
        raise LabError("every 198.18.X.0/24 is in use on this machine")
    return f"198.18.{random.choice(free)}"


def pod_gateway(node_index: int) -> str:
    return f"198.19.{node_index}.1"


def pod_address(node_index: int, pod_index: int) -> str:
    return f"198.19.{node_index}.{10 + pod_index}"


def pod_gateway6(node_index: int) -> str:
    return f"2001:db8:1:{node_index}::1"


def pod_address6(node_index: int, pod_index: int) -> str:
    return f"2001:db8:1:{node_index}::{10 + pod_index}"


def pod_network6(node_index: int) -> str:
    return f"2001:db8:1:{node_index}::/64"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def call_in(namespace: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that has entered `namespace` (sockets it makes stay there)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def http_get(namespace: str, ip: str, port: int, path: str = "/", timeout: float = 2.0,
             source: tuple[str, int] | None = None) -> str:
    """One HTTP/1.0 GET from inside `namespace`; returns the body (raises OSError on failure)."""
    def fetch() -> str:
        with socket.create_connection((ip, port), timeout=timeout, source_address=source) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        response = b"".join(chunks).decode(errors="replace")
        head, _, body = response.partition("\r\n\r\n")
        if not head.startswith("HTTP/1.") or " 200 " not in head.split("\r\n", 1)[0] + " ":
            raise OSError(f"unexpected response: {head.splitlines()[0] if head else '(empty)'}")
        return body
    return call_in(namespace, fetch)


class Lab:
    def __init__(self, prefix: str | None = None, log_dir: Path | None = None, lan: str | None = None) -> None:
        # short: Linux interface names are at most 15 characters
        self.prefix = prefix or f"lbx{secrets.token_hex(2)}"
        self.lan = lan or free_lan()
        self.bridge = f"{self.prefix}br"
        self.log_dir = log_dir
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._undo = contextlib.ExitStack()
        self._problems: list[str] = []
        ledger = os.environ.get(LEDGER_ENV)
        if ledger:
            with open(ledger, "a") as record:
                record.write(self.prefix + "\n")
        self.nodes: dict[int, str] = {}  # index → namespace
        self.pods: dict[str, tuple[int, str]] = {}  # pod namespace → (node index, address)
        self.pods6: dict[str, str] = {}  # pod namespace → its IPv6 address
        self._pod_counts: dict[int, int] = {}

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_close(self, what: str, undo: Callable[[], object]) -> None:
        """Register how to undo `what`, right after making it."""
        def run() -> None:
            try:
                undo()
            except Exception as exc:
                self._problems.append(f"{what}: {exc}")
        self._undo.callback(run)

    def on_close(self, what: str, undo: Callable[[], object]) -> None:
        """Register how to undo something made outside this class (lab extensions: the BGP router)."""
        self._on_close(what, undo)

    def attach(self, namespace: str, short: str, address: str, address6: str | None = None) -> None:
        """Put `namespace` on the LAN bridge at `address` (and `address6`; its eth0; the root end is
        <prefix><short>)."""
        self._attach(namespace, short, address, address6)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def lan_address(self, host: int) -> str:
        return f"{self.lan}.{host}"

    @property
    def bridge_address(self) -> str:
        return self.lan_address(1)

    def node_address(self, index: int) -> str:
        return self.lan_address(10 + index)

    def client_address(self, index: int) -> str:
        return self.lan_address(100 + index)

    @property
    def lan6(self) -> str:
        """The LAN's IPv6 /64, e.g. 2001:db8:0:42::/64 for 198.18.42."""
        return f"2001:db8:0:{self.lan.rsplit('.', 1)[1]}::/64"

    def lan6_address(self, host: int) -> str:
        """The IPv6 twin of lan_address(host): the same digits as the last group."""
        return f"2001:db8:0:{self.lan.rsplit('.', 1)[1]}::{host}"

    def node6_address(self, index: int) -> str:
        return self.lan6_address(10 + index)

    def client6_address(self, index: int) -> str:
        return self.lan6_address(100 + index)

    # -- building -------------------------------------------------------------------------------
    def add_bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._add_root_link(self.bridge)
        _ip("addr", "add", f"{self.bridge_address}/{LAN_PREFIX_LEN}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_namespace(self, suffix: str) -> str:
        namespace = self.name(suffix)
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        self._on_close(f"netns {namespace}", lambda: self._del_namespace(namespace))
        for conf in ("all", "default"):  # before any link is made in it: no DAD on its addresses
            self.sysctl(namespace, f"net.ipv6.conf.{conf}.accept_dad", "0")
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _attach(self, namespace: str, short: str, address: str, address6: str | None = None) -> None:
        root_end = f"{self.prefix}{short}"
        _ip("link", "add", root_end, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._add_root_link(root_end)
        _ip("link", "set", root_end, "master", self.bridge)
        _ip("link", "set", root_end, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{LAN_PREFIX_LEN}", "dev", "eth0")
        if address6:
            _ip("-n", namespace, "addr", "add", f"{address6}/64", "dev", "eth0", "nodad")
        _ip("-n", namespace, "link", "set", "eth0", "up")

    def _add_root_link(self, link: str) -> None:
        self.root_links.append(link)

        def remove() -> None:
            with contextlib.suppress(LabError):  # a veth end goes with its namespace
                _ip("link", "del", link)
            if Path(f"/sys/class/net/{link}").exists():
                raise LabError("still there")
            self.root_links.remove(link)
        self._on_close(f"link {link}", remove)

    def _del_namespace(self, namespace: str) -> None:
        # deleting a namespace deletes the links in it; already gone is fine
        if Path(f"/run/netns/{namespace}").exists():
            _ip("netns", "del", namespace)
        if namespace in self.namespaces:
            self.namespaces.remove(namespace)

    def add_client(self, index: int = 0) -> str:
        namespace = self.add_namespace(f"client-{index}")
        self._attach(namespace, f"c{index}", self.client_address(index), self.client6_address(index))
        return namespace

    def add_node(self, index: int) -> str:
        namespace = self.add_namespace(f"node-{index}")
        self._attach(namespace, f"n{index}", self.node_address(index), self.node6_address(index))
        self.sysctl(namespace, "net.ipv4.ip_forward", "1")
        self.sysctl(namespace, "net.ipv6.conf.all.forwarding", "1")
        for other, other_ns in self.nodes.items():  # pods of each node are reached through it
            _ip("-n", namespace, "route", "add", f"198.19.{other}.0/24", "via", self.node_address(other))
            _ip("-n", other_ns, "route", "add", f"198.19.{index}.0/24", "via", self.node_address(index))
            _ip("-n", namespace, "route", "add", pod_network6(other), "via", self.node6_address(other))
            _ip("-n", other_ns, "route", "add", pod_network6(index), "via", self.node6_address(index))
        self.nodes[index] = namespace
        return namespace

    def add_pod(self, node_index: int) -> tuple[str, str]:
        """A pod namespace on node `node_index`; returns (namespace, address)."""
        node_ns = self.nodes[node_index]
        count = self._pod_counts.get(node_index, 0) + 1
        self._pod_counts[node_index] = count
        namespace = self.add_namespace(f"pod-{node_index}-{count}")
        address, gateway, link = pod_address(node_index, count), pod_gateway(node_index), f"p{count}"
        _ip("-n", node_ns, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", node_ns, "addr", "add", f"{gateway}/32", "dev", link)
        _ip("-n", node_ns, "link", "set", link, "up")
        _ip("-n", node_ns, "route", "add", f"{address}/32", "dev", link)
        _ip("-n", namespace, "addr", "add", f"{address}/32", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "route", "add", f"{gateway}/32", "dev", "eth0")
        _ip("-n", namespace, "route", "add", "default", "via", gateway, "dev", "eth0")
        address6, gateway6 = pod_address6(node_index, count), pod_gateway6(node_index)
        _ip("-n", node_ns, "addr", "add", f"{gateway6}/128", "dev", link, "nodad")
        _ip("-n", node_ns, "route", "add", f"{address6}/128", "dev", link)
        _ip("-n", namespace, "addr", "add", f"{address6}/128", "dev", "eth0", "nodad")
        _ip("-n", namespace, "route", "add", f"{gateway6}/128", "dev", "eth0")
        _ip("-n", namespace, "route", "add", "default", "via", gateway6, "dev", "eth0")
        self.pods[namespace] = (node_index, address)
        self.pods6[namespace] = address6
        return namespace, address

    def remove_pod(self, namespace: str) -> None:
        """Take a pod namespace away before close() (its veth, address and route on the node go with
        it); stop the processes in it first."""
        self._del_namespace(namespace)
        self.pods.pop(namespace, None)
        self.pods6.pop(namespace, None)

    def route_pods_via(self, namespace: str, node_index: int) -> None:
        """Let `namespace` (a client) reach the pod network through one node (benchmarks' direct path)."""
        _ip("-n", namespace, "route", "add", "198.19.0.0/16", "via", self.node_address(node_index))
        _ip("-n", namespace, "route", "add", "2001:db8:1::/48", "via", self.node6_address(node_index))

    @staticmethod
    def sysctl(namespace: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        call_in(namespace, lambda: Path(path).write_text(value))

    def set_link(self, index: int, up: bool) -> None:
        """Cut or restore node `index`'s link to the bridge (root side)."""
        _ip("link", "set", f"{self.prefix}n{index}", "up" if up else "down")

    # -- processes ------------------------------------------------------------------------------
    def start(self, namespace: str | None, args: Sequence[str], log_name: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `args` in `namespace` (None: the root namespace); stopped by close()."""
        log_path = (self.log_dir / log_name) if self.log_dir else Path(os.devnull)
        command = ["ip", "netns", "exec", namespace, *args] if namespace else list(args)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.processes.append(proc)
        self._on_close(f"process {proc.pid} ({' '.join(args)[:80]})", lambda: self._stop_and_forget(proc))
        return proc

    def _stop_and_forget(self, proc: subprocess.Popen[bytes]) -> None:
        self.stop(proc, timeout=5)
        self.processes.remove(proc)

    def stop_processes(self) -> list[str]:
        """Stop every process of the lab now (newest first), e.g. before what they talk to goes
        away; each still has its own undo in close(). Returns what could not be stopped."""
        problems = []
        for proc in reversed(self.processes):
            try:
                self.stop(proc, timeout=5)
            except Exception as exc:
                problems.append(f"process {proc.pid}: {exc}")
        return problems

    @contextlib.contextmanager
    def process(self, namespace: str | None, args: Sequence[str], log_name: str,
                env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
        """`start`, stopped when the block ends (also on failure), not only at close()."""
        proc = self.start(namespace, args, log_name, env)
        try:
            yield proc
        finally:
            self.stop(proc)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` (by pid: only what we started)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    @staticmethod
    def run_in(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", namespace, *args], capture_output=True, text=True,
                              check=check)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Undo everything, newest first; returns what could not be undone (empty when all went)."""
        self._problems = []
        self._undo.close()
        self._undo = contextlib.ExitStack()
        problems, self._problems = self._problems, []
        return problems


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root links whose names start with `prefix` (for checks after a run)."""
    found = []
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        found += [f"netns {p.name}" for p in netns_dir.iterdir() if p.name.startswith(prefix)]
    found += [f"link {p.name}" for p in Path("/sys/class/net").iterdir() if p.name.startswith(prefix)]
    return found
