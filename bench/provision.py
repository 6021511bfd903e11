"""Provisioning speed of the operator with the local provider, on the embedded control plane.

Self-contained: starts a control plane and `lbctl operator --provider local` in temporary
places, creates N Services in a burst, measures creation → status.loadBalancer.ingress written for
each (seen through a watch), then one more Service on the idle operator, and tears everything
down. Prints one JSON object.

Events are watched too: `events_per_service` counts the Event objects lbctl made per Service of
the burst (target ≤ 2.0: EnsuringLoadBalancer and EnsuredLoadBalancer), `event_lag_p50_s` /
`event_lag_p99_s` the time from a Service's ingress to its EnsuredLoadBalancer Event, and
`events_done_after_s` how long after the last ingress the last of those Events was seen (target ≤ 5 s).
Events are counted once they have settled: no lbctl Event created or updated for `QUIET_S`
(at most `SETTLE_DEADLINE_S`; `events_settled` says whether it came), so a late Warning or a second
Ensured would count too. `event_occurrences_per_service` adds up their `count`s (repeats folded
into one Event).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from lbctl.dev import controlplane
from lbctl.dev.controlplane import free_port
from lbctl.kube.client import ApiError, KubeClient, json_lines

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"
QUIET_S = 3.0  # no new Event for this long: the burst's Events have settled
SETTLE_DEADLINE_S = 60.0


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "selector": {"app": name},
                     "ports": [{"port": 80, "protocol": "TCP"}]}}


async def watch(client: KubeClient, path: str, resource_version: str) -> AsyncIterator[dict[str, Any]]:
    """Watch events ({"type": …, "object": …}) from `resource_version` until the server ends the watch."""
    params = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": "600"}
    async with client.session().get(client.base + path, params=params, headers=client.headers(None),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=630)) as response:
        if response.status >= 400:
            raise ApiError(response.status, "WATCH", path, await response.text())
        async for event in json_lines(response):
            yield event


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


def operator_requests(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(m) for m in re.findall(r'^lbctl_kube_requests_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


async def quiet(last_event: list[float], quiet_s: float, deadline_s: float) -> bool:
    """Until no Event came for `quiet_s` (True), or `deadline_s` passed (False)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() - last_event[0] < quiet_s:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def run(count: int, workdir: Path) -> dict[str, Any]:
    info = controlplane.up(workdir / "cp")
    client = KubeClient.from_kubeconfig(info.kubeconfig)
    operator: subprocess.Popen[bytes] | None = None
    background: list[asyncio.Task[None]] = []  # watchers and the RSS sampler, stopped before the operator
    try:
        crd = yaml.safe_load((REPO / "examples/deploy/crd-loadbalancerpool.yaml").read_text())
        await client.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd)
        await client.request("POST", "/api/v1/namespaces", body={"metadata": {"name": NAMESPACE}})
        for _ in range(100):
            try:
                await client.request("POST", "/apis/lbctl.io/v1alpha1/loadbalancerpools", body={
                    "apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": "bench"},
                    "spec": {"addresses": ["198.18.0.0/16"]}})
                break
            except Exception:
                await asyncio.sleep(0.1)  # CRD not established yet
        metrics_port = free_port()
        log = open(workdir / "operator.log", "wb")  # noqa: SIM115 - lives as long as the operator
        operator = subprocess.Popen(
            [sys.executable, "-m", "lbctl", "operator", "--provider", "local", "--metrics-port", str(metrics_port),
             "--node-port-range", info.node_port_range, "--log-level", "warning"],
            env={**os.environ, "KUBECONFIG": info.kubeconfig}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests_at_start = operator_requests(metrics_port)
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise RuntimeError((workdir / "operator.log").read_text()) from None
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # let start-up listing finish
        requests_at_start = operator_requests(metrics_port)

        listing = await client.request("GET", f"/api/v1/namespaces/{NAMESPACE}/services")
        event_listing = await client.request("GET", f"/api/v1/namespaces/{NAMESPACE}/events")
        created: dict[str, float] = {}
        ready: dict[str, float] = {}
        all_ready = asyncio.Event()
        peak_rss = [rss_mb(operator.pid)]
        event_objects: dict[str, set[str]] = {}  # Service -> names of its Events
        event_counts: dict[str, int] = {}  # Event name -> its count
        last_event = [time.monotonic()]
        ensured_seen: dict[str, float] = {}
        all_ensured = asyncio.Event()

        async def watch_events() -> None:
            async for event in watch(client, f"/api/v1/namespaces/{NAMESPACE}/events",
                                     event_listing["metadata"]["resourceVersion"]):
                obj = event.get("object") or {}
                name = (obj.get("involvedObject") or {}).get("name")
                if not name or (obj.get("source") or {}).get("component") != "lbctl":
                    continue
                last_event[0] = time.monotonic()
                event_objects.setdefault(name, set()).add(obj["metadata"]["name"])
                event_counts[obj["metadata"]["name"]] = int(obj.get("count") or 1)
                if obj.get("reason") == "EnsuredLoadBalancer" and name not in ensured_seen:
                    ensured_seen[name] = time.monotonic()
                    if len(ensured_seen) >= expected[0]:
                        all_ensured.set()

        async def watch_services() -> None:
            async for event in watch(client, f"/api/v1/namespaces/{NAMESPACE}/services",
                                     listing["metadata"]["resourceVersion"]):
                obj = event.get("object") or {}
                name = (obj.get("metadata") or {}).get("name")
                if name and name not in ready and ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress"):
                    ready[name] = time.monotonic()
                    if len(ready) >= len(created) and len(created) == expected[0]:
                        all_ready.set()

        async def sample_rss() -> None:
            while True:
                if operator.poll() is not None:
                    tail = (workdir / "operator.log").read_text()[-3000:]
                    print(f"operator exited ({operator.returncode}):\n{tail}", file=sys.stderr)
                    os._exit(1)
                peak_rss[0] = max(peak_rss[0], rss_mb(operator.pid))
                await asyncio.sleep(0.1)

        expected = [count]
        background += [asyncio.create_task(watch_services()), asyncio.create_task(watch_events()),
                       asyncio.create_task(sample_rss())]
        await asyncio.sleep(0.2)
        semaphore = asyncio.Semaphore(64)

        async def create(name: str) -> None:
            async with semaphore:
                started = time.monotonic()
                await client.request("POST", f"/api/v1/namespaces/{NAMESPACE}/services", body=service(name))
                created[name] = started

        burst_started = time.monotonic()
        await asyncio.gather(*(create(f"svc-{i:05d}") for i in range(count)))
        create_s = time.monotonic() - burst_started
        if set(created) <= set(ready):  # the last ingresses came before their create's answer
            all_ready.set()
        await asyncio.wait_for(all_ready.wait(), timeout=max(120, count / 5))
        burst_done = max(ready.values())
        latencies = sorted(ready[n] - created[n] for n in created)
        await asyncio.wait_for(all_ensured.wait(), timeout=60)
        burst = list(created)
        event_lags = [ensured_seen[n] - ready[n] for n in burst]
        events_done_after = max(ensured_seen[n] for n in burst) - burst_done
        settled = await quiet(last_event, QUIET_S, SETTLE_DEADLINE_S)  # late Events count too
        events_per_service = sum(len(event_objects.get(n, ())) for n in burst) / count
        occurrences = sum(event_counts[e] for n in burst for e in event_objects.get(n, ())) / count
        requests = operator_requests(metrics_port) - requests_at_start

        # one Service on an idle operator
        all_ready.clear()
        expected[0] = count + 1
        await create("single")
        if "single" in ready:
            all_ready.set()
        await asyncio.wait_for(all_ready.wait(), timeout=30)
        single = ready["single"] - created["single"]
        return {
            "services": count,
            "p50_s": round(statistics.median(latencies), 4),
            "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 4),
            "throughput_per_s": round(count / (burst_done - burst_started), 1),
            "api_requests_per_service": round(requests / count, 2),
            "operator_rss_mb": round(peak_rss[0], 1),
            "single_service_s": round(single, 4),
            "burst_create_s": round(create_s, 2),  # how long the apiserver took to accept the burst
            "events_per_service": round(events_per_service, 3),  # Event objects, counted once settled
            "event_occurrences_per_service": round(occurrences, 3),  # their counts added up
            "events_settled": settled,  # no new Event for QUIET_S before SETTLE_DEADLINE_S
            "event_lag_p50_s": round(statistics.median(event_lags), 4),
            "event_lag_p99_s": round(percentile(event_lags, 0.99), 4),
            "events_done_after_s": round(events_done_after, 3),  # last EnsuredLoadBalancer after the last ingress
        }
    finally:
        for task in background:  # the sampler would take the operator's exit for a crash
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if operator is not None:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
        await client.close()
        controlplane.down(workdir / "cp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lbctl-bench-") as tmp:
        result = asyncio.run(run(args.services, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
