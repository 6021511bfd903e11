"""GCE provider cost against the Compute fake: N node VMs made through the API, M Services' balancers
created, resynced unchanged, then one node added to every balancer.

The provider runs with its defaults (20 calls/s, burst 40, the cache on), as the operator would;
ensures run 16 at a time, as the operator's batched resync does.

Prints JSON: {"calls_per_create", "writes_per_noop_resync", "writes_per_node_add",
"node_add_converge_s", ...}. writes_per_noop_resync counts every write of a whole resync of all
Services; writes_per_node_add is per balancer (one addInstance each is the target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from lbctl.model.names import load_balancer_name
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, ServiceRef
from providers.base import ProviderSettings
from providers.gce import GceProvider
from tests.fakes.gce_server import GceFakeServer

PROJECT, REGION = "bench", "europe-west1"
ZONES = ("europe-west1-b", "europe-west1-c", "europe-west1-d")


def make_node(instances: compute_v1.InstancesClient, index: int) -> NodeTarget:
    zone = ZONES[index % len(ZONES)]
    name = f"node-{index:03d}"
    instances.insert_unary(project=PROJECT, zone=zone, instance_resource=compute_v1.Instance(
        name=name, tags=compute_v1.Tags(items=["bench-node"])))
    return NodeTarget(name=name, provider_id=f"gce://{PROJECT}/{zone}/{name}", zone=zone)


def make_spec(index: int, nodes: tuple[NodeTarget, ...]) -> LoadBalancerSpec:
    uid = f"{index:08x}-b0b0-4000-8000-000000000000"
    ports: tuple[PortSpec, ...] = (PortSpec("http", "TCP", 80), PortSpec("https", "TCP", 443))
    if index % 4 == 0:
        ports += (PortSpec("dns", "UDP", 53),)
    return LoadBalancerSpec(service=ServiceRef(f"ns{index % 10}", f"svc{index}", uid), cluster_name="bench",
                            name=load_balancer_name(uid), ports=ports, nodes=nodes)


async def bounded(jobs: Iterable[Awaitable[Any]], limit: int = 16) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Awaitable[Any]) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


def main(services: int = 100, node_count: int = 100) -> dict[str, Any]:
    with GceFakeServer() as fake:
        anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
        instances = compute_v1.InstancesClient(credentials=anonymous, transport="rest",
                                               client_options={"api_endpoint": fake.url})
        nodes = tuple(make_node(instances, i) for i in range(node_count))
        provider = GceProvider.create(ProviderSettings("bench", {"project": PROJECT, "region": REGION,
                                                                 "endpoint": fake.url}))

        async def scenario() -> dict[str, Any]:
            fake.reset_calls()
            started = time.monotonic()
            await bounded(provider.ensure(make_spec(i, nodes)) for i in range(services))
            create_s = time.monotonic() - started
            create_calls = len(fake.calls)
            create_writes = Counter(call.method for call in fake.writes())

            fake.reset_calls()
            await bounded(provider.ensure(make_spec(i, nodes)) for i in range(services))
            noop_calls, noop_writes = len(fake.calls), len(fake.writes())

            grown = (*nodes, make_node(instances, node_count))
            fake.reset_calls()
            started = time.monotonic()
            await bounded(provider.ensure(make_spec(i, grown)) for i in range(services))
            converge_s = time.monotonic() - started
            add_writes = Counter(call.method for call in fake.writes())
            pools = fake.resources("targetPools")
            assert all(len(pool["instances"]) == node_count + 1 for pool in pools) and len(pools) == services
            return {
                "calls_per_create": round(create_calls / services, 2),
                "writes_per_noop_resync": noop_writes,
                "writes_per_node_add": round(sum(add_writes.values()) / services, 2),
                "node_add_converge_s": round(converge_s, 2),
                "services": services,
                "nodes": node_count,
                "create_s": round(create_s, 2),
                "writes_per_create": round(sum(create_writes.values()) / services, 2),
                "calls_per_noop_resync": noop_calls,
                "node_add_writes": dict(add_writes),
                "node_add_calls": len(fake.calls),
            }

        try:
            return asyncio.run(scenario())
        finally:
            asyncio.run(provider.close())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(main(args.services, args.nodes)))
