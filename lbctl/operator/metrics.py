"""Prometheus metrics of the operator (served with --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SYNCS = Counter("lbctl_service_syncs_total", "Service syncs by result", ["result"])
SYNC_SECONDS = Histogram(
    "lbctl_service_sync_seconds", "Time to sync one Service",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LEADER = Gauge("lbctl_leader", "1 while this replica acts (holds the leader Lease, or runs without --leader-elect)")
