"""Prometheus metrics of the forwarder (served with --metrics-port), and the network-programming
latency: from an EndpointSlice change in the apiserver to the nft transaction that carries it.
(The /metrics endpoint is lbctl.forwarder.metrics_http: this module stays free of aiohttp, so
bench/forwarder_sync.py can use the same latency bookkeeping without its memory.)

SIG Scalability's kube-proxy SLI (`kubeproxy_network_programming_duration_seconds`) takes the
change's time from the EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`
annotation, which the endpointslice controller sets to when the Pod or Service change that caused
it happened. The same here; where a slice has no such annotation (written by something else, or a
deletion), the time the watch event arrived stands in, which leaves out the apiserver's share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from lbctl.report.facts import parse_time

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
PEER_STATES = ("alive", "away", "dead", "unknown")

SYNC_SECONDS = Histogram(
    "lbctl_forwarder_sync_seconds", "Time to build and commit one nft transaction, by kind (full, incremental)",
    ["kind"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TRANSACTION_FAILURES = Counter(
    "lbctl_forwarder_transaction_failures_total", "nft transactions the kernel rejected, by kind", ["kind"])
STATEMENTS = Counter(
    "lbctl_forwarder_nft_statements_total",
    "nft statements (rules, map elements, chains) committed to the kernel, by kind of transaction", ["kind"])
SERVICES_PROGRAMMED = Gauge("lbctl_forwarder_services_programmed", "Services whose rules are in the kernel")
VIPS = Gauge("lbctl_forwarder_vips", "Virtual addresses this node holds")
OWNERSHIP_CHANGES = Counter(
    "lbctl_forwarder_vip_ownership_changes_total", "VIPs this node took or gave up, by change (taken, released)",
    ["change"])
GRATUITOUS_ARP = Counter("lbctl_forwarder_gratuitous_arp_total", "Gratuitous ARP announcements sent")
UNSOLICITED_NA = Counter("lbctl_forwarder_unsolicited_na_total",
                         "Unsolicited neighbour advertisements sent (IPv6 VIPs)")
HEALTH_CHECK_RESPONSES = Counter(
    "lbctl_forwarder_health_check_responses_total",
    "Answers on healthCheckNodePorts (externalTrafficPolicy Local), by HTTP code", ["code"])
NETWORK_PROGRAMMING_SECONDS = Histogram(
    "lbctl_forwarder_network_programming_seconds",
    "From an EndpointSlice change (its last-change-trigger-time, else the watch event's arrival) to the nft "
    "transaction that carries it",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)


class _Peers(Collector):
    """lbctl_forwarder_peers{state}: read from the membership view at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[str]] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("lbctl_forwarder_peers", "Peer forwarders by state as this node sees them "
                                   "(alive, away: forwarder silent but node answers ping, dead, unknown)",
                                   labels=["state"])
        counts = dict.fromkeys(PEER_STATES, 0)
        if self.source is not None:
            for state in self.source():
                counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family


PEERS = _Peers()
REGISTRY.register(PEERS)


class _Programmed(Collector):
    """lbctl_forwarder_nft_rules and lbctl_forwarder_nft_elements{collection}: what the planner's
    committed state says the kernel's table holds now, read at scrape time."""

    def __init__(self) -> None:
        self.rules: Callable[[], int] | None = None
        self.elements: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        rules = GaugeMetricFamily("lbctl_forwarder_nft_rules", "Rules in the kernel's lbctl table (full mode)")
        rules.add_metric([], self.rules() if self.rules is not None else 0)
        yield rules
        elements = GaugeMetricFamily(
            "lbctl_forwarder_nft_elements", "Map and set elements in the kernel's lbctl table, by collection "
            "(its name without the shard number)", labels=["collection"])
        for collection, count in sorted((self.elements() if self.elements is not None else {}).items()):
            elements.add_metric([collection], count)
        yield elements


PROGRAMMED = _Programmed()
REGISTRY.register(PROGRAMMED)


def change_time(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, arrived: float) -> float:
    """When the change from `old` to `new` happened in the cluster (epoch seconds; pure)."""
    if new is None:
        return arrived
    stamp = ((new.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
    before = (((old or {}).get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
    when = parse_time(stamp) if stamp != before else None  # an unchanged trigger time is an older change's
    return min(when, arrived) if when is not None else arrived


class ProgrammingLatency:
    """Earliest unprogrammed change per Service key; observed once its transaction is committed.

    The sync takes the pending times of the keys it is about to apply (`take`) *before* it applies
    them, and observes those once the transaction is committed (`observe`): a change that arrives
    while the transaction runs stays pending for the next one, which is the one that carries it."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}
        self.enabled = False  # not for the first list: those changes happened before this process

    def seen(self, key: str, when: float) -> None:
        if self.enabled and (key not in self.pending or when < self.pending[key]):
            self.pending[key] = when

    def take(self, keys: Iterable[str]) -> dict[str, float]:
        """The pending change times of `keys`, no longer pending (call before applying them)."""
        return {key: when for key in keys if (when := self.pending.pop(key, None)) is not None}

    def give_back(self, taken: Mapping[str, float]) -> None:
        """The transaction that was to carry `taken` failed: they wait for the next one."""
        for key, when in taken.items():
            if key not in self.pending or when < self.pending[key]:
                self.pending[key] = when

    def observe(self, taken: Mapping[str, float], programmed: Callable[[str], bool], now: float) -> list[float]:
        """`taken` went into the kernel at `now`; returns the latencies observed (only of keys
        whose rules are in the kernel: a Service that is not ours programs nothing)."""
        observed = [max(0.0, now - when) for key, when in taken.items() if programmed(key)]
        for seconds in observed:
            NETWORK_PROGRAMMING_SECONDS.observe(seconds)
        return observed


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over (upper bound, cumulative count) pairs sorted by bound:
    linear interpolation inside the bucket that holds the q-th observation (pure)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le
            return lower_le + (le - lower_le) * ((rank - lower_count) / (count - lower_count or 1))
        lower_le, lower_count = le, count
    return None


def buckets_of(histogram: Histogram) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of an unlabelled histogram in this process, sorted."""
    found = []
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                found.append((float(sample.labels["le"]), float(sample.value)))
    return sorted(found)
