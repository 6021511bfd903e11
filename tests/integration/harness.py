"""Helpers for operator integration tests: the operator process, pools, Services, and waiting for
what the operator writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException

from lbctl.dev.layout import ClusterInfo
from lbctl.model.meta import LOCAL_CLASS

REPO = Path(__file__).resolve().parents[2]
POOL_CRD = REPO / "examples" / "deploy" / "crd-loadbalancerpool.yaml"
BGP_PEER_CRD = REPO / "examples" / "deploy" / "crd-bgppeer.yaml"
T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "") -> T:
    """Poll until `probe` returns something truthy; fail the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}; last value: {last!r}")
        time.sleep(interval)
        last = probe()
    return last


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_operators = itertools.count(1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM (after SIGCONT: a paused process would not handle it), SIGKILL after `timeout`;
    nothing when it has ended already."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class OperatorProcess:
    """`python -m lbctl operator` with a log file; restartable, killable.

    `on_start` is called with each process right after it starts: tests register its stop there
    (request.addfinalizer, an ExitStack callback), so it ends even when the test fails."""

    def __init__(self, cluster: ClusterInfo, log_dir: Path, args: list[str], env: dict[str, str],
                 on_start: Callable[[subprocess.Popen[bytes]], object] | None = None) -> None:
        self.cluster = cluster
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.on_start = on_start
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.serial = next(_operators)  # several operators in one test keep separate logs

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.serial}-{self.starts}.log"

    def start(self, wait: bool = True) -> None:
        assert not self.alive(), "the operator is running: stop() or kill() it before starting it again"
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": self.cluster.kubeconfig, **self.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lbctl", "operator", *self.args], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if self.on_start is not None:
            self.on_start(self.proc)
        if wait:
            wait_until(lambda: "started:" in self.log() or "standing by:" in self.log() or self.proc is None
                       or self.proc.poll() is not None,
                       timeout=30, what="operator start-up")
            assert self.alive(), f"operator exited at start-up:\n{self.log()}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        """The sum of the samples of `name` on the operator's --metrics-port (0 while nothing answers)."""
        port = self.args[self.args.index("--metrics-port") + 1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.partition("{")[0].partition(" ")[0] == name)

    def synced(self, services: int) -> bool:
        """Whether the operator has worked through `services` queued Services since it started."""
        return self.metric("lbctl_service_sync_seconds_count") >= services

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean anything up (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process and its connections stay, but it reads and writes nothing."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


_ranges = itertools.count(1)


class Pools:
    """Creates LoadBalancerPools with unique names and address ranges, restricted by default to the
    test's namespace so tests never draw from each other's pools; deletes them at the end."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str) -> None:
        self.custom = custom
        self.namespace = namespace
        self.names: list[str] = []

    @staticmethod
    def fresh_v4(size: int = 24) -> str:
        n = next(_ranges)
        return f"198.18.{n}.0/{size}"

    @staticmethod
    def fresh_v6() -> str:
        return f"fd00:db8:{next(_ranges):x}::/120"

    def create(self, addresses: list[str], name: str | None = None, restrict: bool = True,
               wait_seen: bool = True, **spec: Any) -> dict[str, Any]:
        name = name or f"pool-{uuid.uuid4().hex[:8]}"
        body = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": name},
                "spec": {"addresses": addresses, **spec}}
        if restrict:
            body["spec"].setdefault("namespaces", [self.namespace])
        created: dict[str, Any] = self.custom.create_cluster_custom_object(
            "lbctl.io", "v1alpha1", "loadbalancerpools", body)
        self.names.append(name)
        if wait_seen:  # the operator writes a pool's status once it knows the pool
            wait_until(lambda: self.get(name).get("status", {}).get("conditions"), what=f"operator saw pool {name}")
        return created

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_cluster_custom_object("lbctl.io", "v1alpha1", "loadbalancerpools",
                                                                      name)
        return found

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_cluster_custom_object("lbctl.io", "v1alpha1", "loadbalancerpools", name, {"spec": spec})

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_cluster_custom_object("lbctl.io", "v1alpha1", "loadbalancerpools", name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def release_services(core: client.CoreV1Api, namespace: str, timeout: float = 20) -> None:
    """Delete every Service of `namespace` (one already gone is fine) and give the operator up to
    `timeout` seconds to release them; what it has not released by then goes with the namespace."""
    for service in core.list_namespaced_service(namespace).items:
        try:
            core.delete_namespaced_service(service.metadata.name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not core.list_namespaced_service(namespace).items, timeout=timeout, interval=0.1,
                   what=f"the Services of {namespace} released")


def lb_service(name: str, ports: list[int] | list[tuple[int, str]] = (80,), lb_class: str | None = LOCAL_CLASS,
               annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
               **spec: Any) -> dict[str, Any]:
    entries = []
    for index, port in enumerate(ports):
        number, protocol = (port, "TCP") if isinstance(port, int) else port
        entries.append({"name": f"p{index}", "port": number, "protocol": protocol})
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": entries, **spec},
    }
    if lb_class:
        body["spec"]["loadBalancerClass"] = lb_class
    return body


def ingress_ips(core: client.CoreV1Api, namespace: str, name: str) -> list[str]:
    service = core.read_namespaced_service(name, namespace)
    return [i.ip for i in (service.status.load_balancer.ingress or ()) if i.ip]


def wait_for_ips(core: client.CoreV1Api, namespace: str, name: str, count: int = 1, timeout: float = 15) -> list[str]:
    return wait_until(lambda: (ips := ingress_ips(core, namespace, name)) and len(ips) >= count and ips,
                      timeout=timeout, what=f"an address on {namespace}/{name}")


def condition(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    service = core.read_namespaced_service(name, namespace)
    return next((c for c in service.status.conditions or () if c.type == "LoadBalancerReady"), None)


def wait_for_condition(core: client.CoreV1Api, namespace: str, name: str, status: str,
                       reason: str | None = None, timeout: float = 15) -> Any:
    def probe() -> Any:
        found = condition(core, namespace, name)
        ok = found is not None and found.status == status and (reason is None or found.reason == reason)
        return found if ok else None

    return wait_until(probe, timeout=timeout, what=f"condition {status}/{reason} on {namespace}/{name}")


def events(core: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str, str]]:
    found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    # timestamps have one-second resolution; etcd's revision orders events exactly
    ordered = sorted(found.items, key=lambda e: int(e.metadata.resource_version))
    return [(e.type, e.reason, e.message) for e in ordered]


def wait_for_event(core: client.CoreV1Api, namespace: str, name: str, reason: str, contains: str = "",
                   timeout: float = 15) -> tuple[str, str, str]:
    try:
        return wait_until(
            lambda: next((e for e in events(core, namespace, name) if e[1] == reason and contains in e[2]), None),
            timeout=timeout, what=f"event {reason} containing {contains!r} on {namespace}/{name}")
    except AssertionError as missing:
        raise AssertionError(f"{missing}; events were: {events(core, namespace, name)}") from None


class Nodes:
    """Node objects made through the API (there is no kubelet): created Ready with an InternalIP,
    flipped and deleted on demand, all removed at the end of the test."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core
        self.names: list[str] = []

    def create(self, name: str, provider_id: str = "", ready: bool = True, labels: dict[str, str] | None = None,
               address: str = "192.0.2.10") -> None:
        spec = {"providerID": provider_id} if provider_id else {}
        self.core.create_node({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": name, "labels": labels or {}}, "spec": spec})
        self.names.append(name)
        self.set_ready(name, ready, address)

    def set_ready(self, name: str, ready: bool, address: str = "192.0.2.10") -> None:
        self.core.patch_node_status(name, {"status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "Test",
                            "message": "set by the test", "lastHeartbeatTime": None, "lastTransitionTime": None}],
            "addresses": [{"type": "InternalIP", "address": address}]}})

    def delete(self, name: str) -> None:
        try:
            self.core.delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def cleanup(self) -> None:
        for name in self.names:
            self.delete(name)


def apply_peer_status(api_client: client.ApiClient, peer: str, node: str, state: str,
                      since: str = "2026-01-01T00:00:00Z", routes: int = 0, message: str = "") -> None:
    """What a forwarder writes about its BGP session with `peer` (the contract): its own entry of
    the BGPPeer's status.nodes, server-side applied as field manager lbctl-forwarder-<node>."""
    from kubernetes import dynamic

    api = dynamic.DynamicClient(api_client)
    status = api.resources.get(api_version="lbctl.io/v1alpha1", kind="BGPPeer").subresources["status"]
    entry: dict[str, Any] = {"node": node, "state": state, "since": since, "routesAnnounced": routes}
    if message:
        entry["message"] = message
    body = {"apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": peer},
            "status": {"nodes": [entry]}}
    api.server_side_apply(status, body=body, name=peer, field_manager=f"lbctl-forwarder-{node}",
                          force_conflicts=True)
