"""AWS provider benchmark against moto (server mode, in this process): 100 nodes, 100 Services.

Drives the provider directly (the operator is not involved) and prints one JSON object:
  calls_per_create        AWS calls (reads and writes) per Service to create its NLB from nothing
  writes_per_noop_resync  write calls in a resync of every Service when nothing changed, by a provider
                          that reads everything again (no known state; target: 0)
  writes_per_node_add     write calls over every Service after one node joins (target: at most one
                          RegisterTargets per target group; `target_groups` says how many there are)
  node_add_converge_s     wall time to ensure every Service after that node joins (target: ≤ 10 s)
The node-add figures come from the provider that created the balancers (its known state is fresh,
so only targets are read and written); `*_full_read` repeats them with a provider that reads every
balancer in full, as after a restart or once the known state expired.

Run: python3 bench/aws.py [--services 100] [--nodes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from moto.server import ThreadedMotoServer

from lbctl.model.names import load_balancer_name
from lbctl.model.types import LoadBalancerSpec, NodeTarget, PortSpec, ServiceRef
from providers.aws import AwsProvider
from providers.base import ProviderSettings

REGION = "us-east-1"
CLUSTER = "bench"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")


class CallCounter:
    """Counts the provider's AWS operations through a botocore hook."""

    def __init__(self, provider: AwsProvider) -> None:
        self.calls: Counter[str] = Counter()
        for client in (provider.elbv2, provider.ec2):
            client.meta.events.register("provide-client-params", self._hook)

    def _hook(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1

    def take(self) -> Counter[str]:
        taken, self.calls = self.calls, Counter()
        return taken


def write_count(calls: Counter[str]) -> int:
    return sum(n for op, n in calls.items() if not op.startswith("Describe"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    ec2: Any
    subnets: dict[str, str]
    node_group: str
    nodes: list[NodeTarget]

    def add_node(self) -> None:
        index = len(self.nodes)
        zone = ZONES[index % len(ZONES)]
        instance = self.ec2.run_instances(
            ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=self.subnets[zone],
            SecurityGroupIds=[self.node_group],
        )["Instances"][0]["InstanceId"]
        self.nodes.append(NodeTarget(name=f"node-{index}", provider_id=f"aws:///{zone}/{instance}", zone=zone))


def build_cluster(url: str, nodes: int) -> Cluster:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    owned = {"Key": f"kubernetes.io/cluster/{CLUSTER}", "Value": "owned"}
    role = {"Key": "kubernetes.io/role/elb", "Value": "1"}
    subnets = {
        zone: ec2.create_subnet(
            VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=zone,
            TagSpecifications=[{"ResourceType": "subnet", "Tags": [owned, role]}],
        )["Subnet"]["SubnetId"]
        for i, zone in enumerate(ZONES)
    }
    group = ec2.create_security_group(
        GroupName="nodes", Description="nodes", VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [owned]}],
    )["GroupId"]
    cluster = Cluster(ec2, subnets, group, [])
    for _ in range(nodes):
        cluster.add_node()
    return cluster


def service_specs(count: int, nodes: list[NodeTarget]) -> list[LoadBalancerSpec]:
    """Every other Service has two ports (TCP 80 and 443); every fifth uses externalTrafficPolicy Local."""
    specs = []
    for i in range(count):
        uid = f"{i:08x}-0000-4000-8000-{i:012x}"
        ports = (PortSpec("http", "TCP", 80, 30000 + 2 * i),)
        if i % 2 == 0:
            ports += (PortSpec("https", "TCP", 443, 30001 + 2 * i),)
        local = i % 5 == 0
        specs.append(LoadBalancerSpec(
            service=ServiceRef("bench", f"svc-{i}", uid), cluster_name=CLUSTER, name=load_balancer_name(uid),
            ports=ports, nodes=tuple(nodes), external_traffic_policy="Local" if local else "Cluster",
            health_check_node_port=32000 + i if local else None,
        ))
    return specs


async def ensure_all(provider: AwsProvider, specs: list[LoadBalancerSpec]) -> float:
    started = time.monotonic()
    await asyncio.gather(*(provider.ensure(spec) for spec in specs))
    return time.monotonic() - started


async def bench(url: str, services: int, nodes: int) -> dict[str, Any]:
    cluster = build_cluster(url, nodes)
    settings = ProviderSettings(CLUSTER, {"region": REGION, "endpoint_url": url})
    provider = AwsProvider.create(settings)
    full_reader = AwsProvider.create(replace(settings, options={**settings.options, "state_cache_s": "0"}))
    counter, full_counter = CallCounter(provider), CallCounter(full_reader)
    specs = service_specs(services, cluster.nodes)

    create_s = await ensure_all(provider, specs)
    created = counter.take()

    resync_s = await ensure_all(full_reader, specs)
    resynced = full_counter.take()
    known_resync_s = await ensure_all(provider, specs)
    known_resynced = counter.take()

    cluster.add_node()
    specs = [replace(s, nodes=tuple(cluster.nodes)) for s in specs]
    node_add_s = await ensure_all(provider, specs)
    node_added = counter.take()

    cluster.add_node()
    specs = [replace(s, nodes=tuple(cluster.nodes)) for s in specs]
    full_node_add_s = await ensure_all(full_reader, specs)
    full_node_added = full_counter.take()

    await provider.close()
    await full_reader.close()
    return {
        "services": services,
        "nodes": nodes,
        "target_groups": sum(len(s.ports) for s in specs),
        "calls_per_create": round(sum(created.values()) / services, 2),
        "writes_per_create": round(write_count(created) / services, 2),
        "create_all_s": round(create_s, 2),
        "writes_per_noop_resync": write_count(resynced),
        "reads_per_noop_resync_per_service": round(sum(resynced.values()) / services, 2),
        "noop_resync_all_s": round(resync_s, 2),
        "calls_per_noop_resync_known_state": sum(known_resynced.values()),
        "noop_resync_known_state_s": round(known_resync_s, 3),
        "writes_per_node_add": write_count(node_added),
        "node_add_converge_s": round(node_add_s, 2),
        "node_add_calls": dict(sorted(node_added.items())),
        "writes_per_node_add_full_read": write_count(full_node_added),
        "node_add_converge_full_read_s": round(full_node_add_s, 2),
        "node_add_calls_full_read": dict(sorted(full_node_added.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = "bench"
    os.environ.pop("AWS_SESSION_TOKEN", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        result = asyncio.run(bench(f"http://{host}:{port}", args.services, args.nodes))
    finally:
        server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
