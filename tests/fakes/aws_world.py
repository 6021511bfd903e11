"""A moto server (real boto3 clients talk HTTP to it) and a small AWS world in it: a VPC, subnets
tagged for the cluster in two zones, a node security group, and EC2 instances standing in for the
cluster's nodes. Shared by the provider tests, the operator tests and bench/aws.py."""

from __future__ import annotations

import contextlib
import ipaddress
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

    def enable_ipv6(self, *subnet_ids: str) -> dict[str, str]:
        """Give the VPC an Amazon-provided IPv6 /56 (once) and each subnet a /64 of it, as a
        dual-stack VPC has; returns subnet id -> its IPv6 CIDR."""
        vpc = self.ec2.describe_vpcs(VpcIds=[self.vpc_id])["Vpcs"][0]
        blocks = [a["Ipv6CidrBlock"] for a in vpc.get("Ipv6CidrBlockAssociationSet", [])]
        if not blocks:
            reply = self.ec2.associate_vpc_cidr_block(VpcId=self.vpc_id, AmazonProvidedIpv6CidrBlock=True)
            blocks = [reply["Ipv6CidrBlockAssociation"]["Ipv6CidrBlock"]]
        taken = {
            a["Ipv6CidrBlock"] for s in self.ec2.describe_subnets(
                Filters=[{"Name": "vpc-id", "Values": [self.vpc_id]}])["Subnets"]
            for a in s.get("Ipv6CidrBlockAssociationSet", [])
        }
        free = (str(n) for n in ipaddress.ip_network(blocks[0]).subnets(new_prefix=64) if str(n) not in taken)
        result = {}
        for subnet_id in subnet_ids:
            cidr = next(free)
            self.ec2.associate_subnet_cidr_block(SubnetId=subnet_id, Ipv6CidrBlock=cidr)
            result[subnet_id] = cidr
        return result


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
