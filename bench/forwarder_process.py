"""The real `lbctl forwarder` process against the embedded apiserver: N Services × E endpoints.

bench/forwarder_sync.py measures the planner and nft alone; this one runs `python -m lbctl
forwarder` (full mode, one node namespace of a lab, the DaemonSet's ServiceAccount and RBAC) fed by
a real kube-apiserver (lbctl.dev.controlplane, as the tests start it) holding the same objects
(bench/forwarder_sync.objects: Services of the forwarder's class with their ingress, EndpointSlices
created through the API). Root only; everything it makes is removed at the end.

    python3 bench/forwarder_process.py --services 10000 --endpoints 5 [--dual-stack [FRACTION]] [--changes 40]
    python3 bench/forwarder_process.py --rounds 2 --baseline /tmp/lbctl-main   # before/after, alternated

Populating the apiserver takes most of the time (about 5 minutes for 10,000 Services on two busy
cores): --rounds and --baseline run several forwarders, one after another, against the same objects.

Prints JSON (with --rounds or --baseline: a list of these per checkout, "current" and "baseline"):
- process_rss_mb: the forwarder's peak resident memory (VmHWM of /proc/<pid>/status), and
  process_rss_end_mb (VmRSS once the changes are done);
- first_sync_s: from starting the process to the full table serving in the kernel: its base chain
  `prerouting` there, which a staged load adds last and a one-transaction load with everything
  (polled every 5 ms with a netlink GETCHAIN in the node's namespace); caches_filled_s, the part
  of it until the forwarder logged its caches filled (start-up, imports and both lists);
- endpoint_change_to_kernel_ms p50/p99/max: one endpoint of an EndpointSlice moved to a new
  address (a PATCH to the apiserver) → the kernel's notification that a map element holding that
  address was committed; missed_changes lists changes no notification named within 60 s. Seen in
  one run in four to seven at 10,000 Services until 2026-11-30: the forwarder's EndpointSlice
  watch went silent after its first sync. Its own table had taken it: loading the table turned
  conntrack on in the node's namespace, conntrack took the watch's next packet for a new connection
  to the watch's local port, and that port was one of the bench's NodePorts (30000-39999; ephemeral
  ports start at 32768). The nat chains now leave alone a TCP packet that opens no connection
  (tests/dataplane/test_node_connections.py).

Why netlink rather than `nft monitor`: the bench opens a NETLINK_NETFILTER socket in the node's
namespace subscribed to NFNLGRP_NFTABLES, the group the kernel sends its commit notifications to
(what `nft monitor` reads), and looks for the new address's bytes in NEWSETELEM messages. That is
the kernel's own word, timed when it arrives, with nothing in between: `nft monitor` keeps a copy
of the ruleset to print names, re-reads it when it cannot place an event, and writes text through
a pipe — with 10,000 Services its cost (and the periodic resync's flood of events it must print)
would sit between the commit and our clock.

With --dual-stack, changes alternate between a Service's IPv4 and IPv6 slices (of dual-stack
Services). VIPs are not put on an interface (the forwarder runs with an announce class no
Service has): the cost measured is the watch caches, the planner and nft, as in
forwarder_sync.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from forwarder_sync import objects  # bench/ is the script's directory, first on sys.path

from lbctl.dev import controlplane
from lbctl.forwarder import netlink as nl
from lbctl.forwarder.render import LBCTL
from lbctl.kube.client import KubeClient
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, call_in

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFT_SUBSYS = 10 << 8
NFT_MSG_NEWSETELEM = 12
STATUS_PORT = 7479
CHECKOUT = Path(__file__).resolve().parent.parent  # the lbctl this bench belongs to
MANAGED_BY = {"endpointslice.kubernetes.io/managed-by": "bench.lbctl.io"}


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload after the nfgenmsg header) of each netlink message in a datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        yield kind, data[offset + 20:offset + length]
        offset += (length + 3) & ~3


class Notifications:
    """The kernel's nftables commit notifications of one namespace: NEWSETELEM payloads with the
    time they arrived, kept until taken."""

    def __init__(self, namespace: str) -> None:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            with contextlib.suppress(OSError):  # room for a periodic resync's burst (root may exceed rmem_max)
                sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.settimeout(0.2)
            return sock
        self._sock = call_in(namespace, open_socket)
        self._lock = threading.Lock()
        self._seen: list[tuple[float, bytes]] = []
        self._closed = False
        self.overruns = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: events were lost (a burst); later ones still come
                self.overruns += 1
                continue
            now = time.perf_counter()
            elements = [payload for kind, payload in _messages(data) if kind == NFT_SUBSYS | NFT_MSG_NEWSETELEM]
            if elements:
                with self._lock:
                    self._seen.extend((now, payload) for payload in elements)

    def seen(self) -> int:
        with self._lock:
            return len(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def committed(self, needle: bytes) -> float | None:
        """When an element holding `needle` was first reported, or None."""
        with self._lock:
            return next((at for at, payload in self._seen if needle in payload), None)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def clean(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as a client creates it: no uid, version or timestamp, endpoint addresses in
    canonical form (the apiserver refuses 2001:db8:0:0::1)."""
    meta = dict(obj["metadata"])
    for field in ("uid", "resourceVersion", "creationTimestamp"):
        meta.pop(field, None)
    cleaned = {**obj, "metadata": meta}
    if "endpoints" in obj:
        cleaned["endpoints"] = canonical(obj["endpoints"])
    return cleaned


def canonical(endpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "addresses": [str(ipaddress.ip_address(a)) for a in e["addresses"]]} for e in endpoints]


async def populate(api: KubeClient, services: int, endpoints: int, dual: Callable[[int], bool],
                   concurrency: int = 48) -> float:
    """Create the namespaces, Services (their status too) and EndpointSlices; returns seconds."""
    started = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)

    async def call(method: str, path: str, body: dict[str, Any], content_type: str | None = None) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    await api.request(method, path, body=body, content_type=content_type, timeout_s=120)
                    return
                except Exception:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.5 * (attempt + 1))

    namespaces = sorted({f"ns{i % 100}" for i in range(services)})
    await asyncio.gather(*(call("POST", "/api/v1/namespaces", {"metadata": {"name": ns}}) for ns in namespaces))

    async def one(index: int) -> None:
        service, slices = objects(index, endpoints, dual=dual(index))
        ns, name = service["metadata"]["namespace"], service["metadata"]["name"]
        body = clean(service)
        body["spec"] = {**body["spec"], "allocateLoadBalancerNodePorts": True}
        status = body.pop("status")
        await call("POST", f"/api/v1/namespaces/{ns}/services", body)
        await call("PATCH", f"/api/v1/namespaces/{ns}/services/{name}/status", {"status": status},
                   "application/merge-patch+json")
        for item in slices:
            item = clean(item)
            item["metadata"]["labels"] = {**item["metadata"]["labels"], **MANAGED_BY}
            await call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                       {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", **item})

    for start in range(0, services, 1000):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 1000, services))))
    return time.perf_counter() - started


def new_address(round_: int, ipv6: bool) -> str:
    """A fresh endpoint address no other element holds (its bytes are looked for in notifications)."""
    return f"2001:db8:fa::{round_ + 1:x}" if ipv6 else f"10.250.{(round_ >> 8) & 255}.{round_ & 255 or 1}"


async def measure_changes(api: KubeClient, notifications: Notifications, services: int, endpoints: int,
                          dual: Callable[[int], bool], changes: int, offset: int = 0) -> tuple[list[float], list[str]]:
    """The samples (ms), and the changes whose notification never came (within 60 s)."""
    samples, missed = [], []
    for round_ in range(changes):
        index = (round_ * 7919 + 13) % services
        ipv6 = dual(index) and round_ % 2 == 1
        _, slices = objects(index, endpoints, dual=dual(index))
        item = slices[1 if ipv6 else 0]
        ns, name = item["metadata"]["namespace"], item["metadata"]["name"]
        address = new_address(offset + round_, ipv6)
        moved = canonical(item["endpoints"])
        moved[0] = {**moved[0], "addresses": [address]}
        needle = ipaddress.ip_address(address).packed
        notifications.clear()
        started = time.perf_counter()
        await api.request("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}",
                          body={"endpoints": moved}, content_type="application/merge-patch+json")
        deadline = started + 60
        while (at := notifications.committed(needle)) is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
        if at is None:
            missed.append(f"{address} of {ns}/{name}: {notifications.seen()} element notifications in 60 s, "
                          f"{notifications.overruns} lost")
        else:
            samples.append((at - started) * 1000)
        await asyncio.sleep(0.3 + random.random() * 0.2)  # apart: each change its own transaction
    return samples, missed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def byte_compile(checkout: str) -> None:
    """Compile the checkout's lbctl to bytecode, as pip does when it installs lbctl in the image:
    the process measured is the deployed one, which does not compile its modules at every start
    (about 0.1 s at 10,000 Services' start-up on two cores, where PYTHONDONTWRITEBYTECODE is set —
    as on the CI machines — and nothing else would write the bytecode)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(checkout) / "lbctl")], check=True,
                   stdout=subprocess.DEVNULL)


def forwarder_run(lab: Lab, node: str, workdir: Path, cp_dir: Path, node_kubeconfig: str, services: int,
                  endpoints: int, dual: Callable[[int], bool], changes: int, offset: int,
                  pythonpath: str | None, profile: Path | None) -> dict[str, Any]:
    """Start a forwarder on a node without a table, time its first sync and `changes` endpoint
    moves, read its peak memory, stop it and remove its table."""
    result: dict[str, Any] = {}
    # -P: the working directory is not put first on sys.path, so PYTHONPATH says which lbctl runs
    env = {**os.environ, "PYTHONPATH": pythonpath or str(CHECKOUT)}
    byte_compile(env["PYTHONPATH"])
    log_name = f"forwarder-{offset}.log"
    command = [sys.executable, "-P", *(("-m", "cProfile", "-o", str(profile)) if profile else ()), "-m", "lbctl",
               "forwarder", "--node", "node-1", "--mode", "full", "--kubeconfig", node_kubeconfig,
               "--status-port", str(STATUS_PORT), "--peer-secret-file", str(workdir / "peer-secret"),
               "--announce-class", "bench.lbctl.io/none", "--log-level", "info"]
    netlink = call_in(node, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    netlink.bind((0, 0))
    assert not nl.exists(LBCTL, sock=netlink), "the node still has a table"
    started, started_wall = time.perf_counter(), time.time()
    forwarder = lab.start(node, command, log_name, env=env)
    try:
        def committed() -> bool | None:
            if forwarder.poll() is not None:
                raise RuntimeError(f"the forwarder exited: {(workdir / log_name).read_text()[-2000:]}")
            # the hooks: what makes the table serve, the last part of a staged load (and part of a
            # one-transaction load, as earlier versions did it)
            return nl.exists(LBCTL, "prerouting", sock=netlink) or None
        wait_for(committed, 300, "the forwarder's first full sync", interval=0.005)
        result["first_sync_s"] = round(time.perf_counter() - started, 3)
        netlink.close()
        filled = logged_at(workdir / log_name, "caches filled")
        if filled is not None:  # start → both lists in the caches (imports, connection, lists)
            result["caches_filled_s"] = round(filled - started_wall, 3)
        time.sleep(2.0)  # the start-up work after the first sync (gc.freeze, health checks, lease)

        notifications = Notifications(node)

        async def change() -> tuple[list[float], list[str]]:
            api = KubeClient.from_kubeconfig(str(cp_dir / "kubeconfig"))
            try:
                return await measure_changes(api, notifications, services, endpoints, dual, changes, offset)
            finally:
                await api.close()
        try:
            samples, missed = asyncio.run(change())
        finally:
            notifications.close()
        result["endpoint_change_to_kernel_ms"] = {
            "p50": round(statistics.median(samples), 1), "p99": round(percentile(samples, 0.99), 1),
            "max": round(max(samples), 1), "changes": len(samples)} if samples else None
        if missed:
            result["missed_changes"] = missed
        result["process_rss_mb"] = round(vm_kb(forwarder.pid, "VmHWM") / 1024, 1)
        result["process_rss_end_mb"] = round(vm_kb(forwarder.pid, "VmRSS") / 1024, 1)
        if notifications.overruns:
            result["notification_overruns"] = notifications.overruns
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    finally:
        lab.stop(forwarder, timeout=30)
        lab.run_in(node, "nft", "delete", "table", "inet", "lbctl", check=False)
    return result


def logged_at(log: Path, text: str) -> float | None:
    """The time of the first log line holding `text` (logging's asctime, local time)."""
    for line in log.read_text(errors="replace").splitlines():
        if text in line:
            with contextlib.suppress(ValueError):
                stamp, millis = line[:23].split(",")
                return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    return None


def run(services: int, endpoints: int, dual_share: float, changes: int, rounds: int = 1,
        baseline: str | None = None, profile: Path | None = None) -> dict[str, Any]:
    def dual(index: int) -> bool:  # as forwarder_sync.py: spread evenly
        return int((index + 1) * dual_share) > int(index * dual_share)

    workdir = Path(tempfile.mkdtemp(prefix="lbctl-fwdproc-"))
    result: dict[str, Any] = {"services": services, "endpoints": endpoints,
                              "dual_stack_services": sum(1 for i in range(services) if dual(i))}
    lab = Lab(prefix=f"lbxp{os.getpid() % 4096:03x}", log_dir=workdir)
    cp_dir = workdir / "controlplane"
    try:
        lab.add_bridge()
        node = lab.add_node(1)
        info = controlplane.up(cp_dir, extra_addresses=(lab.bridge_address,))
        kube = LabKube(str(cp_dir / "kubeconfig"))
        try:
            kube.install_forwarder_rbac()
            port = info.server.rsplit(":", 1)[1]
            node_kubeconfig = kube.service_account_kubeconfig(
                "lbctl-system", "lbctl-forwarder", f"https://{lab.bridge_address}:{port}", info.ca_file,
                workdir / "kubeconfig-forwarder")
            kube.create_node("node-1", lab.node_address(1))
        finally:
            kube.close()

        async def fill() -> float:
            api = KubeClient.from_kubeconfig(str(cp_dir / "kubeconfig"))
            try:
                return await populate(api, services, endpoints, dual)
            finally:
                await api.close()
        result["populate_s"] = round(asyncio.run(fill()), 1)
        (workdir / "peer-secret").write_text("bench\n")

        runs: list[tuple[str, str | None]] = []
        for _ in range(rounds):  # alternated, so drift in the machine's load hits both alike
            runs += [("baseline", baseline)] if baseline else []
            runs.append(("current", None))
        measured: dict[str, list[dict[str, Any]]] = {}
        for number, (code, pythonpath) in enumerate(runs):
            try:
                measured.setdefault(code, []).append(forwarder_run(
                    lab, node, workdir, cp_dir, node_kubeconfig, services, endpoints, dual, changes,
                    number * changes, pythonpath, profile if code == "current" else None))
            except Exception as exc:  # one run's failure does not lose the others'
                if len(runs) == 1:
                    raise
                log = workdir / f"forwarder-{number * changes}.log"
                tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                measured.setdefault(code, []).append({"error": f"{type(exc).__name__}: {exc}", "log": tail})
        if len(runs) == 1:
            result.update(measured["current"][0])
        else:
            result.update(measured)
    finally:
        problems = lab.stop_processes()
        controlplane.down(cp_dir)
        problems += lab.close()
        if problems:
            print(f"forwarder_process: teardown: {problems}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--dual-stack", type=float, nargs="?", const=0.5, default=0.0, metavar="FRACTION",
                        help="share of the Services that are dual-stack (default when given: 0.5)")
    parser.add_argument("--changes", type=int, default=40, help="EndpointSlice changes timed")
    parser.add_argument("--rounds", type=int, default=1, help="forwarder runs against the same objects")
    parser.add_argument("--baseline", metavar="PYTHONPATH",
                        help="also run the forwarder of another lbctl checkout (e.g. `git archive main`), "
                             "alternating with this one: before/after under the same load")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="run this checkout's forwarder under cProfile, its stats written to FILE on exit")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dual_stack <= 1.0:
        parser.error("--dual-stack takes a fraction from 0 to 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still remove the lab and control plane
    if os.geteuid() != 0:
        print("forwarder_process: needs root (a lab namespace for the forwarder and its table)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.services, args.endpoints, args.dual_stack, args.changes, args.rounds, args.baseline,
                         args.profile.resolve() if args.profile else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
