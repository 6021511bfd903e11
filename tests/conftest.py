"""Session-wide fixtures: one real control plane per test session, a fresh namespace per test.

A failing test's report carries the tail of the control-plane logs. The leak check (tests/leakcheck.py)
fails the run if a process, network namespace or nftables table the suite made outlives it.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from lbctl.dev import controlplane
from lbctl.dev.layout import ClusterInfo, Layout

pytest_plugins = ("tests.leakcheck",)

_LOG_TAIL_LINES = 40


@pytest.fixture(scope="session")
def controlplane_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lbctl-test-cp-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def cluster(controlplane_dir: Path) -> Iterator[ClusterInfo]:
    """A running etcd + kube-apiserver + kube-controller-manager (built once, cached)."""
    try:
        info = controlplane.up(controlplane_dir)  # stops what it started itself if it fails
        os.environ["LBCTL_TEST_CONTROLPLANE_DIR"] = str(controlplane_dir)
        yield info
    finally:
        controlplane.down(controlplane_dir)


@pytest.fixture(scope="session")
def api_client(cluster: ClusterInfo) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=cluster.kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:  # a test may have deleted it itself
                raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    directory = os.environ.get("LBCTL_TEST_CONTROLPLANE_DIR")
    if getattr(report, "failed", False) and directory and "cluster" in getattr(item, "fixturenames", ()):
        lay = Layout(Path(directory))
        for component in controlplane.COMPONENTS:
            try:
                lines = lay.log(component).read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
            except OSError:
                continue
            report.sections.append((f"{component} log (tail)", "\n".join(lines)))  # type: ignore[attr-defined]
    return report
