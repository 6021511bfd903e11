"""Network-programming latency of the forwarders, read from their own histogram
(`lbctl_forwarder_network_programming_seconds`), on the demo's cluster.

Self-contained (root): runs `lbctl demo --keep`, which brings up the embedded control plane (the
real endpointslice controller included), the operator and a full-mode forwarder on each of two
node namespaces; flips a pod's readiness N times, each time waiting until every forwarder has
counted the change, then reads the histograms and tears the demo down. Prints one JSON object:
p50/p99 (interpolated within buckets, as PromQL's histogram_quantile) and the mean, per node and
over both.

The change's time is the EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time, which
the endpointslice controller takes from the Pod's Ready condition — a Kubernetes Time, whole
seconds. Each flip is made within the first 50 ms of a second, so that truncation adds at most
50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from lbctl.forwarder.metrics import histogram_quantile
from lbctl.lab.kube import LabKube, wait_for

NAME = "lbctl_forwarder_network_programming_seconds"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def histogram(text: str) -> tuple[list[tuple[float, float]], float, float]:
    """(le, cumulative count) sorted by le, the sum and the count."""
    buckets = sorted((float("inf") if le == "+Inf" else float(le), float(v))
                     for le, v in re.findall(rf'^{NAME}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M))
    total = re.search(rf"^{NAME}_sum (\S+)$", text, re.M)
    count = re.search(rf"^{NAME}_count (\S+)$", text, re.M)
    return buckets, float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0


def minus(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def summary(buckets: list[tuple[float, float]], total: float, count: float) -> dict[str, Any]:
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    return {"count": int(count), "p50_s": None if p50 is None else round(p50, 3),
            "p99_s": None if p99 is None else round(p99, 3), "mean_s": round(total / count, 3) if count else None}


def counted(url: str, seen: float) -> Callable[[], bool | None]:
    """A probe: has the forwarder at `url` counted more than `seen` changes?"""
    return lambda: histogram(scrape(url))[2] > seen or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=40)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("network_programming: needs root (the demo makes network namespaces)", file=sys.stderr)
        return 1
    demo = subprocess.Popen([sys.executable, "-m", "lbctl", "demo", "--keep", "1800"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert demo.stdout is not None
    kubeconfig, urls = "", []
    for line in demo.stdout:
        if line.startswith("[demo] export KUBECONFIG="):
            kubeconfig = line.strip().split("=", 1)[1]
        if line.startswith("[demo] metrics: "):
            urls = re.findall(r"http://\S+/metrics", line)[1:]
        if "leaving it up" in line or demo.poll() is not None:
            break
    try:
        if not kubeconfig or not urls:
            raise SystemExit("network_programming: the demo did not come up")
        kube = LabKube(kubeconfig)
        before = {url: histogram(scrape(url)) for url in urls}
        try:
            for change in range(args.changes):
                counts = {url: histogram(scrape(url))[2] for url in urls}
                time.sleep(1.0 - time.time() % 1.0)  # just after a whole second (see the docstring)
                kube.set_pod_ready("demo", "hello-1", change % 2 == 1)
                for url in urls:
                    wait_for(counted(url, counts[url]), 30, f"the change counted at {url}", interval=0.02)
        finally:
            kube.set_pod_ready("demo", "hello-1", True)
            kube.close()
        after = {url: histogram(scrape(url)) for url in urls}
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=120)
    per_node, merged, total, count = {}, dict[float, float](), 0.0, 0.0
    for url in urls:
        buckets = minus(after[url][0], before[url][0])
        node_sum, node_count = after[url][1] - before[url][1], after[url][2] - before[url][2]
        per_node[url.split("//")[1].split(":")[0]] = summary(buckets, node_sum, node_count)
        for le, n in buckets:
            merged[le] = merged.get(le, 0.0) + n
        total, count = total + node_sum, count + node_count
    print(json.dumps({"changes": args.changes, **summary(sorted(merged.items()), total, count), "nodes": per_node,
                      "load_avg_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
