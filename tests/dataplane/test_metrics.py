"""Both /metrics endpoints during `lbctl demo`: every documented series is exported, with sane values
(the pool's free count drops by one per Service, the network-programming latency count grows on an
endpoint change), and the demo still cleans up after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import leftovers
from tests.dataplane.harness import require_root_tools

pytestmark = pytest.mark.dataplane

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> dict[str, set[str]]:
    """The metric families the README's Metrics section lists, by who exports them ("operator" or
    "forwarder", from the line introducing each list: "Operator:", "Pools (…, operator):", "Forwarder:")."""
    text = README.read_text()
    section = text[text.index("\n### Metrics\n"):]
    section = section[:section.index("\n## ")]
    found: dict[str, set[str]] = {"operator": set(), "forwarder": set()}
    who = ""
    for line in section.splitlines():
        if line.endswith(":") and not line.startswith("-"):
            lowered = line.lower()
            who = "forwarder" if "forwarder" in lowered and "operator" not in lowered else "operator"
        elif line.startswith("- `lbctl_"):
            assert who, f"a metric before any 'Operator:'/'Forwarder:' line: {line}"
            found[who].update(re.findall(r"`(lbctl_[a-z0-9_]+)", line.split(": ", 1)[0]))
    return found


def test_the_readme_lists_are_read() -> None:
    listed = documented()
    assert {"lbctl_leader", "lbctl_pool_addresses_free", "lbctl_orphans_deleted_total"} <= listed["operator"]
    assert {"lbctl_forwarder_unsolicited_na_total", "lbctl_forwarder_nft_rules"} <= listed["forwarder"]
    assert not listed["operator"] & {n for n in listed["forwarder"] if n.startswith("lbctl_forwarder_")}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def families(text: str) -> set[str]:
    """Metric families named by # TYPE lines (counters as their _total name, as documented)."""
    found = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        found.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels` (None: no such sample)."""
    total, seen = 0.0, False
    for sample_labels, number in re.findall(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', sample_labels or ""))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += float(number)
            seen = True
    return total if seen else None


@dataclass
class RunningDemo:
    proc: subprocess.Popen[str]
    kubeconfig: str
    operator_url: str
    forwarder_urls: list[str]


def stop_demo(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, so the demo removes its lab; killed if it has not ended within 90 s. Idempotent."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def demo(request: pytest.FixtureRequest) -> Iterator[RunningDemo]:
    require_root_tools()
    proc = subprocess.Popen([sys.executable, "-m", "lbctl", "demo", "--keep", "240"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # stopped even when reading its output below fails or times out: the finalizer comes first
    request.addfinalizer(lambda: stop_demo(proc))
    assert proc.stdout is not None
    output, kubeconfig, urls, prefix = [], "", "", ""
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        output.append(line)
        if not prefix and (named := re.search(r"named (\S+)-\*", line)):
            prefix = named.group(1)  # this demo's namespaces and links (other labs may run meanwhile)
        if line.startswith("[demo] export KUBECONFIG="):
            kubeconfig = line.strip().split("=", 1)[1]
        if line.startswith("[demo] metrics: "):
            urls = line
        if "leaving it up" in line or time.monotonic() > deadline:
            break
    found = re.findall(r"http://\S+/metrics", urls)
    assert prefix and kubeconfig and len(found) == 3, "".join(output)
    yield RunningDemo(proc, kubeconfig, found[0], found[1:])
    stop_demo(proc)
    assert not leftovers(prefix)


def wait_value(url: str, check: Callable[[str], bool], what: str) -> str:
    return wait_for(lambda: (lambda t: t if check(t) else None)(scrape(url)), 30, what, interval=0.2)


def test_both_metrics_endpoints_during_the_demo(demo: RunningDemo) -> None:
    listed = documented()
    operator = scrape(demo.operator_url)
    assert listed["operator"] <= families(operator), sorted(listed["operator"] - families(operator))
    assert value(operator, "lbctl_leader") == 1
    assert value(operator, "lbctl_services", state="ready") == 1
    assert value(operator, "lbctl_services", state="failed") == 0
    assert (value(operator, "lbctl_service_syncs_total", result="ensured") or 0) >= 1
    assert value(operator, "lbctl_pool_addresses", pool="demo", family="IPv4") == 21  # .200-.220
    assert value(operator, "lbctl_pool_addresses_assigned", pool="demo", family="IPv4") == 1
    assert value(operator, "lbctl_pool_addresses_free", pool="demo", family="IPv4") == 20
    assert (value(operator, "lbctl_service_sync_seconds_count") or 0) >= 1
    assert (value(operator, "lbctl_kube_requests_total") or 0) >= 3

    # each node hears the other (heartbeats every 0.2 s; a loaded machine may need a moment)
    forwarders = [wait_value(url, lambda t: value(t, "lbctl_forwarder_peers", state="alive") == 1,
                             f"the peer alive in {url}") for url in demo.forwarder_urls]
    for text in forwarders:
        assert listed["forwarder"] <= families(text), sorted(listed["forwarder"] - families(text))
        assert "lbctl_kube_requests_total" in families(text)
        assert value(text, "lbctl_forwarder_services_programmed") == 1
        # what the kernel holds for the one Service: its VIP:port in @service-ips, the VIP in @lb-ips
        assert (value(text, "lbctl_forwarder_nft_rules") or 0) > 10
        assert value(text, "lbctl_forwarder_nft_elements", collection="service-ips") == 1
        assert value(text, "lbctl_forwarder_nft_elements", collection="lb-ips") == 1
        assert value(text, "lbctl_forwarder_nft_elements", collection="service-ips6") == 0
        assert (value(text, "lbctl_forwarder_sync_seconds_count", kind="full") or 0) >= 1
        assert value(text, "lbctl_forwarder_transaction_failures_total") is None  # none rejected
        assert (value(text, "lbctl_forwarder_nft_statements_total") or 0) > 10
    assert sum(value(t, "lbctl_forwarder_vips") or 0 for t in forwarders) == 1  # one holder for the one VIP
    assert sum(value(t, "lbctl_forwarder_gratuitous_arp_total") or 0 for t in forwarders) >= 1
    assert sum(value(t, "lbctl_forwarder_vip_ownership_changes_total", change="taken") or 0 for t in forwarders) >= 1

    # `lbctl status --probe` asks each node's forwarder: the Service's rules are in both kernels
    story = subprocess.run([sys.executable, "-m", "lbctl", "status", "-n", "demo", "hello", "--probe"],
                           env={**os.environ, "KUBECONFIG": demo.kubeconfig}, capture_output=True, text=True,
                           timeout=60)
    assert story.returncode == 0, story.stderr
    for node in ("node-1", "node-2"):
        assert re.search(rf"^  {node}\s+live \(renewed \d+s ago\)\s+(yes\s+)?1\s+serving\s+yes\s+2 \(1 local\)$",
                         story.stdout, re.M), story.stdout  # the forwarder saw both endpoints, one on its node

    kube = LabKube(demo.kubeconfig)
    try:
        # one more Service: the pool's free count drops by one
        kube.create_service("demo", "second", {"app": "hello"}, [{"name": "http", "protocol": "TCP", "port": 8081,
                                                                   "targetPort": 8080}])
        kube.wait_external_ip("demo", "second")
        operator = wait_value(demo.operator_url, lambda t: value(t, "lbctl_services", state="ready") == 2,
                              "two ready Services in the operator's metrics")
        assert value(operator, "lbctl_pool_addresses_free", pool="demo", family="IPv4") == 19
        assert value(operator, "lbctl_pool_addresses_assigned", pool="demo", family="IPv4") == 2
        # and each forwarder's table holds its address too (a gauge of the kernel's state, not a counter)
        for url in demo.forwarder_urls:
            wait_value(url, lambda t: value(t, "lbctl_forwarder_nft_elements", collection="lb-ips") == 2
                       and value(t, "lbctl_forwarder_nft_elements", collection="service-ips") == 2,
                       f"the second Service's elements in {url}")

        # an endpoint change: every full-mode forwarder programs it, and counts its latency
        counts = [value(scrape(url), "lbctl_forwarder_network_programming_seconds_count") or 0
                  for url in demo.forwarder_urls]
        kube.set_pod_ready("demo", "hello-1", False)
        for url, before in zip(demo.forwarder_urls, counts, strict=True):
            text = wait_value(url, lambda t, b=before: (value(t, "lbctl_forwarder_network_programming_seconds_count")
                                                        or 0) > b, f"a network-programming observation at {url}")
            count = value(text, "lbctl_forwarder_network_programming_seconds_count") or 0
            total = value(text, "lbctl_forwarder_network_programming_seconds_sum") or 0
            assert 0 < total / count < 10, (total, count)  # seconds, not a stale change's age
            assert value(text, "lbctl_forwarder_network_programming_seconds_bucket", le="+Inf") == count
    finally:
        kube.close()
