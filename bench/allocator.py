"""Local-pool allocator speed: N Services auto-assigned from one /16, then each ensured again.

Prints JSON: {"services": N, "assign_us_p50": …, "assign_us_p99": …, "reassign_us_p50": …, "reassign_us_p99": …}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from providers.local_pools import Allocator, ServiceRequest, parse_pool


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples_ns, n=100)
    return round(cuts[49] / 1000, 2), round(cuts[98] / 1000, 2)


def main(services: int = 10_000) -> dict[str, float | int]:
    pool = parse_pool({"metadata": {"name": "lan"}, "spec": {"addresses": ["10.20.0.0/16"], "avoidBuggyIPs": True}})
    allocator = Allocator([pool])
    requests = [
        ServiceRequest(key=f"ns{i % 50}/svc{i}", namespace=f"ns{i % 50}", ports=frozenset({("TCP", 80)}))
        for i in range(services)
    ]
    first: list[int] = []
    for request in requests:
        start = time.perf_counter_ns()
        allocator.assign(request)
        first.append(time.perf_counter_ns() - start)
    again: list[int] = []
    for request in requests:
        start = time.perf_counter_ns()
        allocator.assign(request)
        again.append(time.perf_counter_ns() - start)
    assert allocator.pool_stats()["lan"].assigned == services
    p50, p99 = percentiles(first)
    r50, r99 = percentiles(again)
    return {"services": services, "assign_us_p50": p50, "assign_us_p99": p99,
            "reassign_us_p50": r50, "reassign_us_p99": r99}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)))
