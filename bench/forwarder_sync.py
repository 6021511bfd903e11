"""Forwarder sync cost: N Services × E endpoints, from Kubernetes objects to the kernel.

Makes Service and EndpointSlice objects like the watch caches hold them and turns them into state
(lbctl.forwarder.desired: build_s, reported apart); then measures what a sync costs: planning the
transaction (lbctl.forwarder.render) and applying it with `nft` in a scratch network namespace it
makes and removes (root needed; no control plane).

    python3 bench/forwarder_sync.py --services 10000 --endpoints 5
    python3 bench/forwarder_sync.py --services 10000 --endpoints 5 --dual-stack      # half dual-stack
    python3 bench/forwarder_sync.py --services 10000 --endpoints 5 --dual-stack 1    # every one

With --dual-stack [FRACTION] (default 0.5) that share of the Services is dual-stack: an IPv6 LB
address too, and an IPv6 EndpointSlice with as many endpoints as the IPv4 one; the JSON then says
dual_stack_services.

Prints JSON: services, endpoints, build_s, full_sync_s (start-up sync on a node without the table:
plan + the staged load the forwarder does then — structure with nft, elements over netlink, hooks
last), restart_sync_s (a restart, which finds the table: plan + its replacement in one nft
transaction, so the old table serves until the new one does), resync_s (the periodic full rewrite,
affinity kept), incremental_sync_s
(median; one endpoint of one Service changed: build + plan + apply with nft), incremental_netlink_s
(the same, committed as the forwarder commits element changes alone: one netlink batch), the parts
of each, network_programming_p50_s / _p99_s (lbctl_forwarder_network_programming_seconds over the
40 incremental rounds, half of them by nft and half by netlink: each change stamped when its
EndpointSlices "arrive", as the forwarder stamps a watch event, taken before applying and observed
at the commit by the forwarder's own code, lbctl.forwarder.metrics; quantiles interpolated within
the histogram's buckets, as histogram_quantile does — its lowest bucket is 10 ms — and without the
apiserver's share: bench/network_programming.py measures that on the demo's cluster), rss_mb
(this process's peak: state and planner; the objects are not kept, unlike the forwarder's watch
caches) and nft_peak_rss_mb (the nft process at its largest). Targets at 10,000 × 5: full ≤ 2 s,
incremental ≤ 50 ms, RSS ≤ 100 MB.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

from lbctl.forwarder import netlink, nftables
from lbctl.forwarder.apply import Nft, load_dark
from lbctl.forwarder.desired import BuildContext, build_service
from lbctl.forwarder.metrics import (
    NETWORK_PROGRAMMING_SECONDS,
    ProgrammingLatency,
    buckets_of,
    change_time,
    histogram_quantile,
)
from lbctl.forwarder.render import FIXED_MAPS, FIXED_SETS, Planner
from lbctl.forwarder.state import ServiceState
from lbctl.lab.netns import Lab, call_in
from lbctl.model.scope import Scope

CONTEXT = BuildContext(node="node-1", scope=Scope("lbctl.io/local"))
# as lbctl.forwarder.main has them (not imported: its imports would count in rss_mb)
KNOWN_COLLECTIONS: tuple[nftables.Map | nftables.Set, ...] = (*FIXED_MAPS, *FIXED_SETS)


def objects(index: int, endpoints: int, generation: int = 0,
            dual: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Service and its EndpointSlices (one per family) of Service `index` (pods spread over
    three nodes)."""
    ns, name = f"ns{index % 100}", f"svc{index}"
    ingress = [{"ip": f"100.{64 + (index >> 16)}.{(index >> 8) & 255}.{index & 255}", "ipMode": "VIP"}]
    if dual:
        ingress.append({"ip": f"2001:db8:ffff::{index:x}", "ipMode": "VIP"})
    service = {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{index}", "resourceVersion": str(index),
                     "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local", "externalTrafficPolicy": "Cluster",
                 "ipFamilies": ["IPv4", "IPv6"] if dual else ["IPv4"],
                 "ipFamilyPolicy": "RequireDualStack" if dual else "SingleStack",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                            "nodePort": 30000 + index % 25000}]},
        "status": {"loadBalancer": {"ingress": ingress}},
    }
    families = [("IPv4", lambda j: f"10.{(index >> 8) & 255}.{index & 255}.{(j + generation) % 250 + 1}")]
    if dual:
        families.append(("IPv6", lambda j: f"2001:db8:{(index >> 8) & 255:x}:{index & 255:x}::"
                                           f"{(j + generation) % 250 + 1:x}"))
    slices = []
    for address_type, address in families:
        endpoint_list = [
            {"addresses": [address(j)],
             "conditions": {"ready": True, "serving": True, "terminating": False}, "nodeName": f"node-{j % 3 + 1}"}
            for j in range(endpoints)
        ]
        slices.append({
            "metadata": {"name": f"{name}-{address_type.lower()}", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": address_type, "endpoints": endpoint_list,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        })
    return service, slices


def build(service: dict[str, Any], slices: list[dict[str, Any]]) -> ServiceState:
    state, problems = build_service(service, slices, CONTEXT)
    assert state is not None and not problems, problems
    return state


def run(services: int, endpoints: int, dual_share: float = 0.0) -> dict[str, Any]:
    def dual(index: int) -> bool:  # spread evenly (0.5: every other one)
        return int((index + 1) * dual_share) > int(index * dual_share)

    lab = Lab(prefix=f"lbxb{os.getpid() % 4096:03x}")
    try:
        namespace = lab.add_namespace("sync")
        nft = Nft(("ip", "netns", "exec", namespace, "nft"))
        planner = Planner()

        started = time.perf_counter()
        states = [build(*objects(i, endpoints, dual=dual(i))) for i in range(services)]
        build_s = time.perf_counter() - started
        gc.collect()
        started = time.perf_counter()
        plan = planner.plan_full(states, replace=True)
        planned = time.perf_counter()
        # as the forwarder loads a table that is not there yet: in stages, hooks last
        load = nftables.staged(plan.transaction)
        assert load is not None
        call_in(namespace, functools.partial(load_dark, nft, load, KNOWN_COLLECTIONS))
        applied = time.perf_counter()
        del load
        planner.commit(plan)
        del plan
        full = {"full_sync_s": applied - started, "full_plan_s": planned - started, "full_apply_s": applied - planned}


        started = time.perf_counter()
        plan = planner.plan_full(states)
        planned = time.perf_counter()
        nft.apply(plan.transaction)
        applied = time.perf_counter()
        planner.commit(plan)
        del plan
        resync = {"resync_s": applied - started, "resync_plan_s": planned - started,
                  "resync_apply_s": applied - planned}

        samples, plan_samples, netlink_samples = [], [], []
        sock = call_in(namespace, netlink.open_socket)  # of the scratch namespace
        latency = ProgrammingLatency()  # the forwarder's bookkeeping, into its histogram
        latency.enabled = True
        before = buckets_of(NETWORK_PROGRAMMING_SECONDS)
        for round_ in range(1, 41):
            index = (round_ * 7919) % services
            # one endpoint moved (in each family of a dual-stack Service)
            service, slices = objects(index, endpoints, generation=round_, dual=dual(index))
            started = time.perf_counter()
            key = f"{service['metadata']['namespace']}/{service['metadata']['name']}"
            for slice_ in slices:  # each slice's watch event arrives now (no trigger-time annotation here)
                latency.seen(key, change_time(None, slice_, time.time()))
            state = build(service, slices)
            taken = latency.take({state.key})  # as the sync loop: before applying
            plan = planner.plan_update({state.key: state})
            planned = time.perf_counter()
            # odd rounds as the forwarder commits element changes (netlink), even ones with nft
            batch = netlink.encode(plan.transaction, KNOWN_COLLECTIONS) if round_ % 2 else None
            if batch is not None:
                netlink.send(batch, sock=sock)
                netlink_samples.append(time.perf_counter() - started)
            else:
                nft.apply(plan.transaction)
                samples.append(time.perf_counter() - started)
            plan_samples.append(planned - started)
            planner.commit(plan)
            latency.observe(taken, planner.keys.__contains__, time.time())
        sock.close()
        # the peak of a forwarder's life so far; the restart below (a new planner, the garbage of
        # the old one) would add allocator fragmentation no single forwarder process has
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        # as a restarted forwarder replaces the table it finds: one nft transaction
        planner = Planner()
        gc.collect()
        started = time.perf_counter()
        plan = planner.plan_full(states, replace=True)
        nft.apply(plan.transaction)
        full["restart_sync_s"] = time.perf_counter() - started
        planner.commit(plan)
        del plan
        programming = minus(buckets_of(NETWORK_PROGRAMMING_SECONDS), before)
        table = nft.list_table("inet", "lbctl")
        duals = sum(1 for i in range(services) if dual(i))
        assert table.count("chain svc/") == services, "not every Service made it into the kernel"
        # each IPv6 address twice: in @service-ips6 and in @lb-ips6
        assert table.count("2001:db8:ffff::") == 2 * duals, "not every IPv6 address made it into the kernel"
    finally:
        problems = lab.close()
        assert not problems, problems
    return {
        "services": services, "endpoints": endpoints, "dual_stack_services": duals, "build_s": round(build_s, 3),
        **{k: round(v, 3) for k, v in full.items()},
        **{k: round(v, 3) for k, v in resync.items()},
        "incremental_sync_s": round(statistics.median(samples), 4),
        "incremental_plan_s": round(statistics.median(plan_samples), 4),
        "incremental_sync_max_s": round(max(samples), 4),
        # the same kind of change sent as the forwarder sends element changes alone (one netlink
        # batch, lbctl.forwarder.netlink), timed the same way (build + plan + commit)
        "incremental_netlink_s": round(statistics.median(netlink_samples), 4) if netlink_samples else None,
        # lbctl_forwarder_network_programming_seconds over the incremental rounds (arrival → commit,
        # both kinds of commit), read from the histogram's buckets as histogram_quantile does
        "network_programming_count": int(programming[-1][1]) if programming else 0,
        "network_programming_p50_s": _rounded(histogram_quantile(0.5, programming)),
        "network_programming_p99_s": _rounded(histogram_quantile(0.99, programming)),
        "rss_mb": round(rss_mb, 1),
        "nft_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def minus(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--dual-stack", type=float, nargs="?", const=0.5, default=0.0, metavar="FRACTION",
                        help="share of the Services that are dual-stack (default when given: 0.5)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dual_stack <= 1.0:
        parser.error("--dual-stack takes a fraction from 0 to 1")
    if os.geteuid() != 0:
        print("forwarder_sync: needs root (it makes a scratch network namespace for nft)", file=sys.stderr)
        return 1
    print(json.dumps(run(args.services, args.endpoints, args.dual_stack)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
