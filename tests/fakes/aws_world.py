"""A moto server (real boto3 clients talk HTTP to it) and a small AWS world in it: a VPC, subnets
tagged for the cluster in two zones, a node security group, and EC2 instances standing in for the
cluster's nodes. Shared by the provider tests, the operator tests and bench/aws.py."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import requests
from moto.server import ThreadedMotoServer

from lbctl.model.types import NodeTarget

AWS_REGION = "us-east-1"
CLUSTER = "test-cluster"
ZONES = ("us-east-1a", "us-east-1b")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on a free local port, with fake credentials in the environment."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # Fake credentials so boto3 never looks for real ones.
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def aws_client(url: str, service: str) -> Any:
    return boto3.client(
        service, endpoint_url=url, region_name=AWS_REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


@dataclass
class AwsWorld:
    """Handles to the moto world; tests reach everything through this fixture value."""

    url: str
    ec2: Any
    elbv2: Any
    vpc_id: str
    public_subnets: dict[str, str]  # zone -> subnet id (kubernetes.io/role/elb)
    internal_subnets: dict[str, str]  # zone -> subnet id (kubernetes.io/role/internal-elb)
    node_group: str
    instances: list[tuple[str, str]] = field(default_factory=list)  # (instance id, zone)
    cluster: str = CLUSTER
    region: str = AWS_REGION

    def client(self, service: str) -> Any:
        return aws_client(self.url, service)

    def add_instance(self, zone: str | None = None) -> NodeTarget:
        zone = zone or ZONES[len(self.instances) % len(ZONES)]
        image = "ami-12c6146b"
        reply = self.ec2.run_instances(
            ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro",
            SubnetId=self.public_subnets[zone], SecurityGroupIds=[self.node_group],
        )
        instance_id = reply["Instances"][0]["InstanceId"]
        self.instances.append((instance_id, zone))
        return self.node(len(self.instances) - 1)

    def node(self, index: int, labels: dict[str, str] | None = None) -> NodeTarget:
        instance_id, zone = self.instances[index]
        return NodeTarget(
            name=f"node-{index}", provider_id=f"aws:///{zone}/{instance_id}", zone=zone, labels=labels or {},
        )

    def nodes(self) -> tuple[NodeTarget, ...]:
        return tuple(self.node(i) for i in range(len(self.instances)))


def build_world(url: str, nodes: int) -> AwsWorld:
    """Reset moto and create the VPC, subnets, node security group and `nodes` instances."""
    requests.post(f"{url}/moto-api/reset", timeout=30).raise_for_status()
    ec2 = aws_client(url, "ec2")
    elbv2 = aws_client(url, "elbv2")
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    cluster_tag = {"Key": f"kubernetes.io/cluster/{CLUSTER}", "Value": "owned"}
    public: dict[str, str] = {}
    internal: dict[str, str] = {}
    for i, zone in enumerate(ZONES):
        roles = (("kubernetes.io/role/elb", public, 0), ("kubernetes.io/role/internal-elb", internal, 10))
        for role, table, base in roles:
            subnet = ec2.create_subnet(
                VpcId=vpc_id, CidrBlock=f"10.0.{base + i}.0/24", AvailabilityZone=zone,
                TagSpecifications=[{"ResourceType": "subnet", "Tags": [
                    cluster_tag, {"Key": role, "Value": "1"},
                    {"Key": "Name", "Value": f"{role.rsplit('/', 1)[1]}-{zone}"},
                ]}],
            )["Subnet"]["SubnetId"]
            table[zone] = subnet
    group = ec2.create_security_group(
        GroupName="nodes", Description="cluster nodes", VpcId=vpc_id,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [cluster_tag]}],
    )["GroupId"]
    world = AwsWorld(url, ec2, elbv2, vpc_id, public, internal, group)
    for _ in range(nodes):
        world.add_instance()
    return world
