"""Metrics of the local provider's address pools. The pool gauges (addresses total, assigned, free
per pool and family) are read at scrape time through `LocalProvider.address_usage`
(lbctl.operator.metrics); failures are counted here as they happen."""

from __future__ import annotations

from prometheus_client import Counter

ALLOCATION_FAILURES = Counter(
    "lbctl_pool_allocation_failures_total", "Addresses the local provider could not assign, by reason "
    "(exhausted, no_pool, address_in_use, invalid_request)", ["reason"])


def allocation_failure_reason(problem: str) -> str:
    """A bounded label for an allocator error's message (pure)."""
    text = problem.lower()
    if "exhausted" in text or "no free address" in text:
        return "exhausted"
    if any(words in text for words in ("no address pool", "there is no pool", "not in any address pool",
                                       "is not usable", "has no ipv", "addresses (pools:")):
        return "no_pool"
    if "already used" in text or "shared under" in text:
        return "address_in_use"
    return "invalid_request"
