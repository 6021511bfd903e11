"""`lbctl doctor --provider aws|gce`: read-only calls against moto and the Compute fake, and the
cloud API metrics those calls leave behind."""

from __future__ import annotations

import asyncio

import requests
from prometheus_client import REGISTRY

from lbctl.report.cloud import provider_checks
from tests.fakes.aws_world import AwsWorld
from tests.fakes.gce_server import GceFakeServer


def calls(provider: str, operation: str, result: str = "success") -> float:
    value = REGISTRY.get_sample_value("lbctl_cloud_api_calls_total",
                                      {"provider": provider, "operation": operation, "result": result})
    return value or 0.0


def test_aws_credentials_and_subnet_tags(aws_world: AwsWorld) -> None:
    options = {"region": aws_world.region, "endpoint_url": aws_world.url}
    before = calls("aws", "describe_load_balancers")
    checks = asyncio.run(provider_checks("aws", aws_world.cluster, options))
    assert [(c.name, c.status) for c in checks] == [("aws-credentials", "pass"), ("aws-subnets", "pass")]
    assert checks[0].message == f"credentials work: 0 balancer(s) tagged kubernetes.io/cluster/{aws_world.cluster}"
    assert checks[1].message == (f"subnets tagged for the cluster: {len(aws_world.public_subnets)} for "
                                 f"internet-facing, {len(aws_world.internal_subnets)} for internal balancers")
    assert calls("aws", "describe_load_balancers") > before  # every attempt is counted
    assert (REGISTRY.get_sample_value("lbctl_cloud_api_call_seconds_count",
                                      {"provider": "aws", "operation": "describe_load_balancers"}) or 0) >= 1

    other = asyncio.run(provider_checks("aws", "another-cluster", options))
    assert [(c.name, c.status) for c in other] == [("aws-credentials", "pass"), ("aws-subnets", "warn")]
    assert "no subnet is tagged kubernetes.io/cluster/another-cluster" in other[1].message


def test_gce_credentials_and_a_provider_that_cannot_start() -> None:
    with GceFakeServer() as fake:
        options = {"project": "lbctl-test", "region": "europe-west1", "endpoint": fake.url}
        checks = asyncio.run(provider_checks("gce", "prod", options))
    assert (checks[0].name, checks[0].status) == ("gce-credentials", "pass")
    assert calls("gce", "listing_forwarding_rules") + calls("gce", "listing_target_pools") > 0

    broken = asyncio.run(provider_checks("gce", "prod", {"region": "europe-west1", "endpoint": "http://127.0.0.1:9"}))
    assert [(c.name, c.status) for c in broken] == [("gce-credentials", "fail")]
    assert broken[0].message.startswith("the gce provider cannot start: ")


def test_gce_region_network_and_subnetwork_exist() -> None:
    """Read-only gets of what the provider options name: the region, the VPC network, and the
    subnetwork internal balancers use."""
    with GceFakeServer() as fake:
        fake.compute.regions = {"europe-west1"}
        base = f"{fake.url}/compute/v1/projects/lbctl-test"
        assert requests.post(f"{base}/global/networks", json={"name": "prod-vpc", "autoCreateSubnetworks": False},
                             timeout=10).status_code == 200
        assert requests.post(f"{base}/regions/europe-west1/subnetworks", timeout=10, json={
            "name": "prod-nodes", "ipCidrRange": "10.8.0.0/20",
            "network": "projects/lbctl-test/global/networks/prod-vpc"}).status_code == 200
        options = {"project": "lbctl-test", "region": "europe-west1", "endpoint": fake.url, "network": "prod-vpc",
                   "subnetwork": "prod-nodes"}
        fake.reset_calls()
        checks = asyncio.run(provider_checks("gce", "prod", options))
        assert [(c.name, c.status, c.message) for c in checks[1:]] == [
            ("gce-region", "pass", "region europe-west1 (project lbctl-test) exists"),
            ("gce-network", "pass", "network prod-vpc exists"),
            ("gce-subnetwork", "pass", "subnetwork prod-nodes (region europe-west1) exists")]
        assert all(call.verb == "GET" for call in fake.calls)  # read-only

        # the default network (every project has one), but no subnetwork named like it
        defaults = asyncio.run(provider_checks("gce", "prod", {**options, "network": "", "subnetwork": ""}))
        assert [(c.name, c.status) for c in defaults[1:]] == [
            ("gce-region", "pass"), ("gce-network", "pass"), ("gce-subnetwork", "warn")]
        assert defaults[3].message == ("no subnetwork default (region europe-west1): internal balancers cannot be "
                                       "made")

        wrong = asyncio.run(provider_checks("gce", "prod", {**options, "region": "europe-west9", "network": "nope"}))
    assert [(c.name, c.status) for c in wrong[1:]] == [
        ("gce-region", "fail"), ("gce-network", "fail"), ("gce-subnetwork", "warn")]
    assert wrong[1].message == "no region europe-west9 (project lbctl-test)"
    assert wrong[1].fix.startswith("set the gce region option")
    assert wrong[2].message == "no network nope" and wrong[2].fix.startswith("set the gce network option")
