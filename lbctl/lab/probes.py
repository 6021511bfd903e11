"""What the fault tests and benchmarks observe in a lab: who holds a VIP (read over netlink in each
node namespace), a client asking through the VIP every 100 ms with its ARP entry flushed before
each request, and long-lived TCP flows that tell whether they were ever reset."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from lbctl.forwarder.addresses import ADDRESS_PROTO
from lbctl.lab.netns import call_in, http_get


def holds(namespace: str, vip: str) -> bool:
    wanted = ipaddress.ip_address(vip)
    family = socket.AF_INET6 if wanted.version == 6 else socket.AF_INET

    def read() -> bool:
        with IPRoute() as ip:
            return any(ipaddress.ip_address(str(a.get("address"))) == wanted for a in ip.get_addr(family=family))
    return call_in(namespace, read)


def held_vips(namespace: str) -> set[str]:
    """The VIPs a forwarder put in `namespace`: IPv4 ones carry the label "<if>:lbctl", IPv6 ones
    the forwarder's address protocol."""
    def read() -> set[str]:
        with IPRoute() as ip:
            found = {str(a.get("address")) for a in ip.get_addr(family=socket.AF_INET)
                     if str(a.get("label") or "").endswith(":lbctl")}
            found |= {str(ipaddress.ip_address(str(a.get("address")))) for a in ip.get_addr(family=socket.AF_INET6)
                      if a.get("IFA_PROTO") == ADDRESS_PROTO}
            return found
    return call_in(namespace, read)


def vip_holders(nodes: Mapping[int, str], vip: str) -> set[int]:
    """The node indices (of index → namespace) that have `vip` on an interface right now."""
    return {index for index, namespace in nodes.items() if holds(namespace, vip)}


@dataclass
class VipWatch:
    """Requests through the VIP and samples of who holds it, in background threads, every 100 ms
    each. Use as a context manager."""

    client: str  # the client's namespace
    vip: str
    nodes: Mapping[int, str]
    answered_by: Callable[[str], int]  # an answer's body → the node that carried it
    port: int = 80
    failures: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    holder_samples: list[frozenset[int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _every_100ms(self, action: Callable[[], None]) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            action()
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def _ask(self) -> None:
        # a fresh ARP resolution every time: some node must be answering for the VIP right now
        subprocess.run(["ip", "-n", self.client, "neigh", "flush", "to", self.vip], capture_output=True,
                       check=False)
        try:
            self.answers.append(self.answered_by(http_get(self.client, self.vip, self.port, timeout=1.0)))
        except OSError as exc:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {exc}")

    def _sample(self) -> None:
        self.holder_samples.append(frozenset(vip_holders(self.nodes, self.vip)))

    def __enter__(self) -> VipWatch:
        self._threads = [threading.Thread(target=self._every_100ms, args=(self._ask,), daemon=True),
                         threading.Thread(target=self._every_100ms, args=(self._sample,), daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def moves(self) -> list[frozenset[int]]:
        """The distinct holder sets in the order seen: one entry means the VIP never moved and never
        had two holders."""
        seen: list[frozenset[int]] = []
        for sample in self.holder_samples:
            if not seen or seen[-1] != sample:
                seen.append(sample)
        return seen


def open_flows(namespace: str, targets: Iterable[tuple[str, int]]) -> list[socket.socket]:
    """TCP connections made from inside `namespace` (to servers started with --echo)."""
    def connect(target: tuple[str, int]) -> socket.socket:
        return socket.create_connection(target, timeout=2.0)
    return [call_in(namespace, lambda t=target: connect(t)) for target in targets]  # type: ignore[misc]


def exchange(flow: socket.socket, line: str) -> str:
    """One line there and back on an established flow; OSError if the flow was reset or closed."""
    flow.settimeout(2.0)
    flow.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = flow.recv(4096)
        if not chunk:
            raise ConnectionResetError("the flow was closed")
        data += chunk
    return data.decode().strip()


def exchange_all(flows: list[socket.socket], label: str) -> list[str]:
    """One exchange on each flow; the failures, one line each."""
    failed = []
    for index, flow in enumerate(flows):
        try:
            exchange(flow, f"{label} {index}")
        except OSError as exc:
            failed.append(f"flow {index}: {type(exc).__name__}: {exc}")
    return failed


def link_mac(namespace: str, interface: str = "eth0") -> str:
    def read() -> str:
        with IPRoute() as ip:
            return str(ip.get_links(ifname=interface)[0].get("address"))
    return call_in(namespace, read)


def neighbour(namespace: str, address: str, interface: str = "eth0") -> str | None:
    """The link-layer address `namespace` has for `address` in its neighbour (ARP/NDP) cache, in
    any state that has one, or None."""
    wanted = ipaddress.ip_address(address)
    family = socket.AF_INET6 if wanted.version == 6 else socket.AF_INET

    def read() -> str | None:
        with IPRoute() as ip:
            index = ip.link_lookup(ifname=interface)[0]
            for entry in ip.get_neighbours(family=family, ifindex=index):
                dst, lladdr = entry.get("NDA_DST"), entry.get("NDA_LLADDR")
                if dst and lladdr and ipaddress.ip_address(str(dst)) == wanted:
                    return str(lladdr)
        return None
    return call_in(namespace, read)


def flush_neighbour(namespace: str, address: str) -> None:
    subprocess.run(["ip", "-n", namespace, "neigh", "flush", "to", address], capture_output=True, check=False)


def ping(namespace: str, address: str, timeout: float = 1.0) -> bool:
    """One ICMP (ICMPv6 for an IPv6 address) echo from inside `namespace`: whether a reply came."""
    v6 = ipaddress.ip_address(address).version == 6

    def echo() -> bool:
        family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
        ident = threading.get_ident() & 0xFFFF
        with socket.socket(family, socket.SOCK_RAW, proto) as sock:
            sock.settimeout(timeout)
            request = (128 if v6 else 8, 0)
            body = struct.pack("!BBHHH", *request, 0, ident, 1) + b"lbctl-lab"
            if not v6:  # the kernel computes ICMPv6 checksums, not ICMP ones
                body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
            sock.sendto(body, (address, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, peer = sock.recvfrom(2048)
                except TimeoutError:
                    return False
                if not v6:
                    data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets see the IP header
                if (ipaddress.ip_address(peer[0]) == ipaddress.ip_address(address) and len(data) >= 8
                        and data[0] == (129 if v6 else 0) and struct.unpack("!H", data[4:6])[0] == ident):
                    return True
            return False
    return call_in(namespace, echo)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_ETH_P_IPV6 = 0x86DD


def ndp_answers(namespace: str, address: str, wait: float = 1.0, interface: str = "eth0") -> set[str]:
    """Who answers a neighbour solicitation for IPv6 `address` on `namespace`'s link: its entry is
    flushed, the kernel made to resolve it (one UDP datagram to port 9, discard), and every
    neighbour advertisement for it seen within `wait` collected; returns their target link-layer
    addresses (one per answering node)."""
    target = ipaddress.IPv6Address(address).packed

    def capture() -> set[str]:
        found: set[str] = set()
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_IPV6)) as sniff:
            sniff.bind((interface, _ETH_P_IPV6))
            sniff.settimeout(wait)
            flush_neighbour(namespace, address)
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"", (address, 9))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                sniff.settimeout(left)
                try:
                    frame = sniff.recv(2048)
                except TimeoutError:
                    break
                ip6, icmp = frame[14:54], frame[54:]
                if len(ip6) < 40 or ip6[6] != 58 or len(icmp) < 24 or icmp[0] != 136 or icmp[8:24] != target:
                    continue
                options = icmp[24:]
                while len(options) >= 8 and options[1]:
                    if options[0] == 2:  # target link-layer address
                        found.add(":".join(f"{b:02x}" for b in options[2:8]))
                    options = options[options[1] * 8:]
        return found
    return call_in(namespace, capture)
