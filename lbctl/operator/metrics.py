"""Prometheus metrics of the operator (served with --metrics-port).

Counters and histograms are updated where things happen; the gauges that describe state (Services
by state, queue depth, pool addresses) are read off the running reconciler at scrape time, so
they can never drift from what it holds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from lbctl.report.facts import STATES, service_state
from providers import local_metrics, retry

# the pool and cloud series are exposed whatever the provider (a dashboard shows 0, not "no data")
_ALWAYS = (local_metrics.ALLOCATION_FAILURES, retry.CALLS, retry.CALL_SECONDS)

SYNCS = Counter("lbctl_service_syncs_total", "Service syncs by result (ensured, released, failed) and reason "
                "(the condition's reason on failure)", ["result", "reason"])
SYNC_SECONDS = Histogram(
    "lbctl_service_sync_seconds", "Time to sync one Service",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_WAIT_SECONDS = Histogram(
    "lbctl_workqueue_wait_seconds", "Time a Service key waited in the work queue before a worker took it",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LEADER = Gauge("lbctl_leader", "1 while this replica acts (holds the leader Lease, or runs without --leader-elect)")
ORPHANS_FOUND = Counter("lbctl_orphans_found_total", "Balancers found tagged for this cluster whose Service is gone")
ORPHANS_DELETED = Counter("lbctl_orphans_deleted_total", "Orphaned balancers deleted")


class _Source(Protocol):
    """What the collector reads: the reconciler (lbctl.operator.reconciler.Reconciler)."""

    services: dict[str, dict[str, Any]]
    queue: Any
    provider: Any


class _State(Collector):
    """Services by state, queue depth and pool addresses, read at scrape time."""

    def __init__(self) -> None:
        self.source: _Source | None = None
        self.manages: Callable[[Mapping[str, Any]], bool] = lambda _s: False

    def collect(self) -> Iterable[GaugeMetricFamily]:
        services = GaugeMetricFamily("lbctl_services", "Services this operator handles, by state (ready, pending: "
                                     "waiting for an address or nodes, failed: needs a fix)", labels=["state"])
        depth = GaugeMetricFamily("lbctl_workqueue_depth", "Service keys waiting for a worker")
        counts = dict.fromkeys(STATES, 0)
        source = self.source
        if source is not None:
            for service in list(source.services.values()):
                if self.manages(service):
                    counts[service_state(service).state] += 1
            depth.add_metric([], len(source.queue))
        for state, count in counts.items():
            services.add_metric([state], count)
        yield services
        yield depth
        size = GaugeMetricFamily("lbctl_pool_addresses", "Usable addresses of a pool, by IP family",
                                 labels=["pool", "family"])
        assigned = GaugeMetricFamily("lbctl_pool_addresses_assigned", "Addresses of a pool in use "
                                     "(a shared address counts once)", labels=["pool", "family"])
        free = GaugeMetricFamily("lbctl_pool_addresses_free", "Addresses of a pool left to assign",
                                 labels=["pool", "family"])
        usage = getattr(source.provider, "address_usage", None) if source is not None else None
        if callable(usage):  # the local provider's pools
            for (pool, version), (total, used) in sorted(_read(usage).items()):
                family = f"IPv{version}"
                size.add_metric([pool, family], total)
                assigned.add_metric([pool, family], used)
                free.add_metric([pool, family], total - used)
        yield size
        yield assigned
        yield free


def _read(usage: Callable[[], dict[tuple[str, int], tuple[int, int]]]) -> dict[tuple[str, int], tuple[int, int]]:
    """The scrape runs in prometheus_client's thread while the event loop may change the pools:
    a read that met a change half-way is simply read again."""
    for _ in range(5):
        try:
            return usage()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return {}


STATE = _State()
REGISTRY.register(STATE)


def watch(source: _Source, manages: Callable[[Mapping[str, Any]], bool]) -> None:
    """Report this reconciler's state from now on (one per process)."""
    STATE.source = source
    STATE.manages = manages
