"""The dataplane suite's cluster: a control plane listening also on the lab bridge's address, the
operator (local provider), three node namespaces each running `lbctl forwarder --mode full`, and
two client namespaces. Pods are namespaces with a real server; their Pod objects get a Ready
status through the API, and the real endpointslice controller makes the EndpointSlices.

Needs root, iproute2, nftables and conntrack. Without them the tests FAIL (CI runs as root); they
are never skipped. Everything made here is removed at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lbctl.dev import controlplane
from lbctl.lab.kube import LabKube, wait_for
from lbctl.lab.netns import Lab, leftovers
from lbctl.lab.router import install_bgp_api
from tests.dataplane.harness import NODES, RESTART_GRACE_S, DataplaneEnv, require_root_tools

_ENV: DataplaneEnv | None = None


@pytest.fixture(scope="session")
def dp() -> Iterator[DataplaneEnv]:
    """Each thing is undone by its own callback, registered as it is made (newest first at the end,
    each whatever the others do); then nothing with the lab's prefix may be left."""
    global _ENV
    require_root_tools()
    workdir = Path(tempfile.mkdtemp(prefix="lbctl-dataplane-"))
    problems: list[str] = []
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, workdir, ignore_errors=True)
        lab = Lab(log_dir=workdir)

        def close_lab() -> None:
            problems.extend(lab.close())
            left = leftovers(lab.prefix)
            assert not problems and not left, f"dataplane teardown left things behind: {problems} {left}"
        undo.callback(close_lab)
        lab.add_bridge()
        clients = [lab.add_client(0), lab.add_client(1)]
        for index in NODES:
            lab.add_node(index)
        cp_dir = workdir / "controlplane"
        undo.callback(controlplane.down, cp_dir)
        info = controlplane.up(cp_dir, extra_addresses=(lab.bridge_address,))
        # the lab's processes (operator, forwarders, pods) talk to the apiserver: they stop first
        undo.callback(lambda: problems.extend(lab.stop_processes()))
        kubeconfig = str(cp_dir / "kubeconfig")
        kube = LabKube(kubeconfig)
        undo.callback(kube.close)
        kube.install_pool_crd()
        install_bgp_api(kube)  # the BGPPeer CRD: before the forwarders and the operator, as in a cluster
        # the forwarders authenticate as the DaemonSet's ServiceAccount, with its RBAC only
        kube.install_forwarder_rbac()
        port = info.server.rsplit(":", 1)[1]
        node_kubeconfig = kube.service_account_kubeconfig(
            "lbctl-system", "lbctl-forwarder", f"https://{lab.bridge_address}:{port}", info.ca_file,
            workdir / "kubeconfig-forwarder")
        for index in NODES:
            kube.create_node(f"node-{index}", lab.node_address(index))
        operator = lab.start(None, [sys.executable, "-m", "lbctl", "operator", "--provider", "local",
                                    "--node-port-range", "30000-54999", "--log-level", "info"],
                             "operator.log", env={**os.environ, "KUBECONFIG": kubeconfig})
        env = DataplaneEnv(lab=lab, kube=kube, workdir=workdir, clients=clients, cp_dir=cp_dir,
                           node_kubeconfig=node_kubeconfig,
                           forwarder_args=["--pod-cidr", "198.19.0.0/16", "--pod-cidr", "2001:db8:1::/48",
                                           "--resync-interval", "20",
                                           # the lab's nodes have no default gateway: the bridge is the LAN witness
                                           "--lan-probe", lab.bridge_address,
                                           "--restart-grace", str(RESTART_GRACE_S)])
        for index in NODES:
            env.start_forwarder(index)

        coordination = client.CoordinationV1Api(kube.api)

        def all_leases() -> bool:  # each forwarder's record of itself
            try:
                return len(coordination.list_namespaced_lease("lbctl-system").items) == len(NODES)
            except ApiException:
                return False
        wait_for(all_leases, 60, "a Lease from every forwarder", interval=0.2)
        assert operator.poll() is None, (workdir / "operator.log").read_text()
        undo.callback(_forget_env)
        _ENV = env
        yield env


def _forget_env() -> None:
    global _ENV
    _ENV = None


@pytest.fixture
def k8s_namespace(dp: DataplaneEnv) -> Iterator[str]:
    """A Kubernetes namespace with its own address pool; afterwards forwarders and links are
    restored, and the namespace, its pool and its pods (servers, network namespaces) removed."""
    name, pool = dp.new_namespace()
    with contextlib.ExitStack() as undo:  # each step whatever the others do
        undo.callback(dp.remove_pods, name)
        undo.callback(dp.kube.delete_pool, pool)
        undo.callback(dp.kube.delete_namespace, name)
        undo.callback(dp.ensure_forwarders)
        yield name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if getattr(report, "failed", False) and _ENV is not None and "dp" in getattr(item, "fixturenames", ()):
        for title, text in _ENV.tail_logs():
            report.sections.append((title, text))  # type: ignore[attr-defined]
    return report
