"""Fixtures for provider tests: the moto server and a fresh AWS world per test (tests/fakes/aws_world.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.aws_world import AWS_REGION, CLUSTER, ZONES, AwsWorld, aws_client, build_world, moto_server

__all__ = ["AWS_REGION", "CLUSTER", "ZONES", "AwsWorld", "aws_client", "build_world"]


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_world(moto_url: str) -> AwsWorld:
    return build_world(moto_url, nodes=3)
