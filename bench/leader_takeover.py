"""Leader takeover: how long after the leading operator replica dies (kill -9, so it releases
nothing) the standby serves a new Service.

Self-contained: starts the embedded control plane and two `lbctl operator --provider local
--leader-elect` replicas (default lease timings: 3 s duration, 2 s renew deadline, 0.5 s retry),
provisions a background of Services, then for each round kills the leader, creates a Service at
once and measures kill → its status.loadBalancer.ingress written; the killed replica is started
again as the new standby (as its Deployment would). Prints one JSON object; `leader_takeover_s`
is the median over the rounds (target ≤ 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from lbctl.dev import controlplane

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "selector": {"app": name},
                     "ports": [{"port": 80, "protocol": "TCP"}]}}


def wait(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


class Replica:
    def __init__(self, index: int, workdir: Path, kubeconfig: str, node_ports: str) -> None:
        self.index, self.workdir, self.kubeconfig, self.node_ports = index, workdir, kubeconfig, node_ports
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.index}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lbctl", "operator", "--provider", "local", "--node-port-range",
                 self.node_ports, "--leader-elect", "--leader-elect-namespace", NAMESPACE, "--log-level", "info"],
                env={**os.environ, "KUBECONFIG": self.kubeconfig}, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def leads(self) -> bool:
        return "now leads" in self.log()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def served(core: client.CoreV1Api, name: str) -> bool:
    return bool(core.read_namespaced_service(name, NAMESPACE).status.load_balancer.ingress)


def run(rounds: int, background: int, workdir: Path) -> dict[str, Any]:
    info = controlplane.up(workdir / "cp")
    replicas = [Replica(i, workdir, info.kubeconfig, info.node_port_range) for i in range(2)]
    api = config.new_client_from_config(config_file=info.kubeconfig)
    try:
        core = client.CoreV1Api(api)
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            yaml.safe_load((REPO / "examples/deploy/crd-loadbalancerpool.yaml").read_text()))
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        custom = client.CustomObjectsApi(api)
        pool = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": "bench"},
                "spec": {"addresses": ["198.18.0.0/16"]}}
        wait(lambda: _try(lambda: custom.create_cluster_custom_object("lbctl.io", "v1alpha1", "loadbalancerpools",
                                                                      pool)), 30, "the pool CRD")
        for replica in replicas:
            replica.start()
        wait(lambda: any(r.leads() for r in replicas), 60, "a leader")
        for index in range(background):
            core.create_namespaced_service(NAMESPACE, service(f"bg-{index}"))
        wait(lambda: all(served(core, f"bg-{i}") for i in range(background)), 120, "the background served",
             interval=0.5)

        figures = []
        for round_ in range(rounds):
            leader = next(r for r in replicas if r.proc is not None and r.proc.poll() is None and r.leads())
            standby = next(r for r in replicas if r is not leader)
            wait(lambda s=standby: "standing by:" in s.log(), 60, "the standby's caches")
            time.sleep(4)  # the standby has watched the Lease for longer than its duration
            leader.kill()
            killed = time.monotonic()
            name = f"probe-{round_}"
            core.create_namespaced_service(NAMESPACE, service(name))
            wait(lambda n=name: served(core, n), 60, f"{name} served")
            figures.append(round(time.monotonic() - killed, 3))
            leader.start()  # back as the standby
        return {
            "leader_takeover_s": statistics.median(figures),
            "leader_takeover_rounds_s": figures,
            "background_services": background,
            "lease_duration_s": 3, "renew_deadline_s": 2.0, "retry_period_s": 0.5,
            "target_s": 5.0,
        }
    finally:
        for replica in replicas:
            replica.stop()
        api.close()
        controlplane.down(workdir / "cp")


def _try(action: Callable[[], Any]) -> bool:
    try:
        action()
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--services", type=int, default=200, help="Services provisioned before the rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lbctl-bench-takeover-") as tmp:
        print(json.dumps(run(args.rounds, args.services, Path(tmp))))


if __name__ == "__main__":
    main()
