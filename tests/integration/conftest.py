"""Fixtures: the operator as users run it (`lbctl operator …` in its own process) against the real
control plane, the pool CRD, and per-test pools."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from lbctl.dev.layout import ClusterInfo
from tests.integration.harness import (
    BGP_PEER_CRD,
    POOL_CRD,
    Nodes,
    OperatorProcess,
    Pools,
    release_services,
    stop_process,
    wait_until,
)


@pytest.fixture(scope="session")
def pool_crd(api_client: client.ApiClient) -> None:
    """lbctl's CRDs: LoadBalancerPool and BGPPeer."""
    extensions = client.ApiextensionsV1Api(api_client)
    for path in (POOL_CRD, BGP_PEER_CRD):
        body = yaml.safe_load(path.read_text())
        try:
            extensions.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise

        def established(name: str = body["metadata"]["name"]) -> bool:
            crd = extensions.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or ())

        wait_until(established, what=f"CRD {body['metadata']['name']} established")


@pytest.fixture
def start_operator(
    cluster: ClusterInfo, pool_crd: None, tmp_path: Path, core: client.CoreV1Api, namespace: str,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., OperatorProcess]]:
    """Starts `lbctl operator …` processes for the test. Each process gets its own stop, registered
    the moment it starts, and every stop runs at teardown even when the test, another stop or the
    release of the Services fails."""
    started: list[OperatorProcess] = []
    with contextlib.ExitStack() as stops:
        def start(*extra: str, env: dict[str, str] | None = None, wait: bool = True) -> OperatorProcess:
            args = ["--node-port-range", cluster.node_port_range, "--log-level", "info", *extra]
            if not any(a == "--provider" for a in extra) and "LBCTL_PROVIDER" not in (env or {}):
                args = ["--provider", "local", *args]
            operator = OperatorProcess(cluster, tmp_path, args, env or {},
                                       on_start=lambda proc: stops.callback(stop_process, proc))
            started.append(operator)
            operator.start(wait=wait)
            return operator

        yield start
        try:
            # Release the test's Services while an operator still runs, so none is left holding a
            # finalizer for the next test's operator (and cloud fake) to inherit.
            if any(o.alive() for o in started):
                release_services(core, namespace)
        finally:
            if getattr(request.node, "rep_call_failed", False):
                for operator in started:
                    print(f"--- operator log ({operator.log_path}) ---\n{operator.log()[-6000:]}")


@pytest.fixture
def operator(start_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    return start_operator()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if getattr(report, "when", "") == "call" and getattr(report, "failed", False):
        item.rep_call_failed = True  # type: ignore[attr-defined]
    return report


@pytest.fixture
def pools(api_client: client.ApiClient, namespace: str, pool_crd: None) -> Iterator[Pools]:
    made = Pools(client.CustomObjectsApi(api_client), namespace)
    yield made
    for name in made.names:
        made.delete(name)


@pytest.fixture
def nodes(core: client.CoreV1Api) -> Iterator[Nodes]:
    made = Nodes(core)
    yield made
    made.cleanup()
