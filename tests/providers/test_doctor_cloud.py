"""`lbctl doctor --provider aws|gce`: read-only calls against moto and the Compute fake, and the
cloud API metrics those calls leave behind."""

from __future__ import annotations

import asyncio

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
    assert [(c.name, c.status) for c in checks] == [("gce-credentials", "pass")]
    assert calls("gce", "listing_forwarding_rules") + calls("gce", "listing_target_pools") > 0

    broken = asyncio.run(provider_checks("gce", "prod", {"region": "europe-west1", "endpoint": "http://127.0.0.1:9"}))
    assert [(c.name, c.status) for c in broken] == [("gce-credentials", "fail")]
    assert broken[0].message.startswith("the gce provider cannot start: ")
