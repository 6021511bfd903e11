"""How long `lbctl status` takes over many Services, on the embedded control plane.

Self-contained: starts a control plane in a temporary place, creates N lbctl Services (default
5,000) with the status an operator would have written (9 in 10 ready with an address and the
`lbctl.io/announcing-node` mark, the rest pending with a condition and a Warning Event), then runs
`lbctl status` (every namespace) as a user would, several times, and tears everything down.
Prints one JSON object: wall time of the whole command (Python start-up included) and of its
read-and-render part alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lbctl.dev import controlplane
from lbctl.kube.client import MERGE_PATCH, KubeClient, service_path

NAMESPACES = ("bench-a", "bench-b", "bench-c", "bench-d")
NOW = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": {
        "lbctl.io/load-balancer-class": "lbctl.io/local"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "selector": {"app": name},
                 "ports": [{"port": 80, "protocol": "TCP"}]}}


def status(index: int) -> tuple[dict[str, Any], bool]:
    if index % 10:
        ip = f"198.18.{index // 250}.{index % 250 + 1}"
        return {"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}, "conditions": [{
            "type": "LoadBalancerReady", "status": "True", "reason": "LoadBalancerEnsured",
            "message": f"local load balancer at {ip}", "lastTransitionTime": NOW}]}}, True
    return {"status": {"conditions": [{
        "type": "LoadBalancerReady", "status": "False", "reason": "Pending", "lastTransitionTime": NOW,
        "message": "every address pool that serves this Service is exhausted (bench); fix: delete a Service that "
                   "holds an address, or add addresses to a pool"}]}}, False


async def populate(kubeconfig: str, count: int) -> None:
    client = KubeClient.from_kubeconfig(kubeconfig)
    try:
        await _populate(client, count)
    finally:
        await client.close()


async def _populate(client: KubeClient, count: int) -> None:
    for namespace in NAMESPACES:
        await client.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                                 "metadata": {"name": namespace}})
    limit = asyncio.Semaphore(32)

    async def one(index: int) -> None:
        namespace, name = NAMESPACES[index % len(NAMESPACES)], f"svc-{index:05d}"
        async with limit:
            await client.request("POST", f"/api/v1/namespaces/{namespace}/services", body=service(name))
            patch, ready = status(index)
            await client.request("PATCH", service_path(namespace, name, "status"), body=patch,
                                 content_type=MERGE_PATCH)
            if ready:
                await client.request("PATCH", service_path(namespace, name), content_type=MERGE_PATCH, body={
                    "metadata": {"annotations": {"lbctl.io/announcing-node": f"node-{index % 3}"}}})
            else:
                await client.request("POST", f"/api/v1/namespaces/{namespace}/events", body={
                    "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{name}."},
                    "involvedObject": {"kind": "Service", "namespace": namespace, "name": name, "apiVersion": "v1"},
                    "type": "Warning", "reason": "SyncLoadBalancerFailed", "lastTimestamp": NOW,
                    "firstTimestamp": NOW, "count": 1, "source": {"component": "lbctl"},
                    "message": "Error syncing load balancer: every address pool that serves this Service is "
                               "exhausted (bench)"})

    await asyncio.gather(*(one(i) for i in range(count)))


def run_status(kubeconfig: str) -> tuple[float, int]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lbctl", "status"], env={**os.environ, "KUBECONFIG": kubeconfig},
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"lbctl status failed: {result.stderr}")
    return elapsed, len(result.stdout.splitlines()) - 1


async def in_process(kubeconfig: str) -> float:
    from lbctl.report import gather, render
    from lbctl.report import status as report

    started = time.monotonic()
    client = gather.connect(kubeconfig)
    try:
        services, pools, events = await gather.status_table(gather.Reader(client), None)
        rows = report.rows(services, pools, events, time.time())
        render.status_table(rows, all_namespaces=True)
    finally:
        await client.close()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lbctl-bench-status-") as tmp:
        info = controlplane.up(Path(tmp) / "cp")
        try:
            started = time.monotonic()
            asyncio.run(populate(info.kubeconfig, args.services))
            populated_s = time.monotonic() - started
            command = [run_status(info.kubeconfig) for _ in range(args.runs)]
            rows = {n for _, n in command}
            reads = [asyncio.run(in_process(info.kubeconfig)) for _ in range(args.runs)]
        finally:
            controlplane.down(Path(tmp) / "cp")
    times = sorted(t for t, _ in command)
    print(json.dumps({
        "services": args.services, "rows": sorted(rows), "runs": args.runs,
        "lbctl_status_s_median": round(statistics.median(times), 3), "lbctl_status_s_max": round(times[-1], 3),
        "read_and_render_s_median": round(statistics.median(reads), 3), "target_s": 2.0,
        "populate_s": round(populated_s, 1),
    }))


if __name__ == "__main__":
    main()
