"""What the fault tests and benchmarks observe in a lab: who holds a VIP (read over netlink in each
node namespace), a client asking through the VIP every 100 ms with its ARP entry flushed before
each request, and long-lived TCP flows that tell whether they were ever reset."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from lbctl.lab.netns import call_in, http_get


def holds(namespace: str, vip: str) -> bool:
    def read() -> bool:
        with IPRoute() as ip:
            return any(a.get("address") == vip for a in ip.get_addr(family=socket.AF_INET))
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
