"""`lbctl status` and `lbctl doctor` as users run them (`python -m lbctl …` with a kubeconfig)
against the embedded control plane and a running operator."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from lbctl.dev import controlplane
from lbctl.dev.layout import ClusterInfo, kubeconfig_yaml
from lbctl.forwarder.leases import NodeLease
from lbctl.kube.client import KubeClient
from lbctl.lab.kube import LabKube
from lbctl.report import doctor
from tests.integration.harness import (
    POOL_CRD,
    REPO,
    Nodes,
    OperatorProcess,
    Pools,
    lb_service,
    wait_for_condition,
    wait_for_ips,
    wait_until,
)

pytestmark = pytest.mark.controlplane


def lbctl(kubeconfig: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    if kubeconfig is not None:
        env["KUBECONFIG"] = kubeconfig
    env["HOME"] = env.get("LBCTL_TEST_HOME", "/nonexistent-home")  # never the user's ~/.kube/config
    return subprocess.run([sys.executable, "-m", "lbctl", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def forwarder_lease(cluster: ClusterInfo, node: str, remove: bool = False) -> None:
    """The Lease a forwarder on `node` keeps (written, or removed as `--cleanup` does, by the
    forwarder's own code)."""
    async def act() -> None:
        kube = KubeClient.from_kubeconfig(cluster.kubeconfig)
        try:
            lease = NodeLease(kube, node)
            await (lease.release() if remove else lease.renew_once())
        finally:
            await kube.close()
    asyncio.run(act())


@pytest.fixture
def write_forwarder_lease(cluster: ClusterInfo) -> Iterator[Callable[[ClusterInfo, str], None]]:
    written: list[str] = []

    def write(on: ClusterInfo, node: str) -> None:
        forwarder_lease(on, node)
        written.append(node)

    yield write
    for node in written:
        forwarder_lease(cluster, node, remove=True)


@pytest.fixture
def three_services(core: client.CoreV1Api, namespace: str, pools: Pools,
                   operator: OperatorProcess) -> dict[str, str]:
    """web: ready; queued: pending (its pool has one address, taken by web); bad: a bad annotation."""
    pool = pools.create([Pools.fresh_v4(32)])
    core.create_namespaced_service(namespace, lb_service("web"))
    (address,) = wait_for_ips(core, namespace, "web")
    core.create_namespaced_service(namespace, lb_service("queued"))
    core.create_namespaced_service(namespace, lb_service("bad", annotations={
        "lbctl.io/load-balancer-ips": "198.18.0.300"}))
    wait_for_condition(core, namespace, "queued", "False")
    wait_for_condition(core, namespace, "bad", "False")
    # what the forwarder holding the address writes (no forwarder runs in this suite)
    core.patch_namespaced_service("web", namespace, {"metadata": {"annotations": {
        "lbctl.io/announcing-node": "node-1"}}})
    return {"pool": pool["metadata"]["name"], "address": address}


def test_status_table_line_by_line(cluster: ClusterInfo, namespace: str, three_services: dict[str, str]) -> None:
    result = lbctl(cluster.kubeconfig, "status", "-n", namespace)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    assert re.fullmatch(r"NAME\s+CLASS\s+ADDRESSES\s+POOL/BALANCER\s+SERVED-BY\s+STATE\s+AGE\s+REASON", lines[0])
    assert re.fullmatch(
        r"bad\s+lbctl\.io/local\s+<pending>\s+-\s+-\s+failed\s+\d+s\s+"
        r"metadata\.annotations\[lbctl\.io/load-balancer-ips\]: '198\.18\.0\.300' is not an IP address; "
        r"fix: give IPv4 or IPv6 addresses separated by commas, at most one per family", lines[1]), lines[1]
    assert re.fullmatch(
        r"queued\s+lbctl\.io/local\s+<pending>\s+-\s+-\s+pending\s+\d+s\s+every address pool that serves this "
        rf"Service is exhausted \({three_services['pool']}\); fix: delete a Service that holds an address, or add "
        r"addresses to a pool", lines[2]), lines[2]
    assert re.fullmatch(
        rf"web\s+lbctl\.io/local\s+{re.escape(three_services['address'])}\s+{three_services['pool']}\s+"
        r"node-1 \(L2\)\s+ready\s+\d+s", lines[3]), lines[3]
    assert "\x1b[" not in result.stdout  # no colour when not on a terminal

    as_json = json.loads(lbctl(cluster.kubeconfig, "status", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["state"]) for r in as_json] == [("bad", "failed"), ("queued", "pending"), ("web", "ready")]
    everywhere = lbctl(cluster.kubeconfig, "status")
    assert re.search(rf"^{namespace}\s+web\s+lbctl\.io/local\s", everywhere.stdout, re.M), everywhere.stdout


def test_status_of_one_service_tells_the_story(cluster: ClusterInfo, namespace: str, nodes: Nodes,
                                               three_services: dict[str, str],
                                               write_forwarder_lease: Callable[[ClusterInfo, str], None]) -> None:
    nodes.create("node-1")
    nodes.create("node-2")
    write_forwarder_lease(cluster, "node-1")
    result = lbctl(cluster.kubeconfig, "status", "-n", namespace, "web")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"Service:       {namespace}/web" in text
    assert "State:         ready" in text
    assert f"Addresses:     {three_services['address']}" in text
    assert f"Pool:          {three_services['pool']}" in text
    assert re.search(r"^  node-1\s+live \(renewed \d+s ago\)\s+yes\s+0$", text, re.M), text
    assert re.search(r"^  node-2\s+none \(no Lease lbctl-system/lbctl-forwarder-<node>\)\s+0$", text, re.M), text
    assert re.search(r"^  \d+s\s+Normal\s+EnsuredLoadBalancer\s+1\s+Ensured load balancer at \S+$", text, re.M), text

    queued = lbctl(cluster.kubeconfig, "status", f"{namespace}/queued", "-o", "yaml")
    assert queued.returncode == 0, queued.stderr
    assert "state: pending" in queued.stdout and "reason: SyncLoadBalancerFailed" in queued.stdout


def test_bad_input_is_one_line_and_exit_1(cluster: ClusterInfo, core: client.CoreV1Api, namespace: str,
                                          tmp_path: Path) -> None:
    core.create_namespaced_service(namespace, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "plain"},
                                               "spec": {"ports": [{"port": 80}]}})
    core.create_namespaced_service(namespace, lb_service("theirs", lb_class="example.com/other"))
    one_line_error(lbctl(cluster.kubeconfig, "status", "-n", namespace, "plain"), "not lbctl's", "type ClusterIP")
    one_line_error(lbctl(cluster.kubeconfig, "status", "-n", namespace, "theirs"), "not lbctl's",
                   "class example.com/other")
    one_line_error(lbctl(cluster.kubeconfig, "status", "-n", namespace, "nope"), f"no Service {namespace}/nope")
    one_line_error(lbctl(str(tmp_path / "missing"), "status"), "kubeconfig", "set KUBECONFIG or pass --kubeconfig")
    one_line_error(lbctl(None, "doctor"), "kubeconfig")

    # kubeconfigs that load but cannot be used: TLS files that are not PEM or missing, an unknown
    # context, an empty file
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    good = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    shapes: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
        "bad-ca": (lambda c: c["clusters"][0]["cluster"].update({"certificate-authority": str(not_pem)}),
                   (f"certificate-authority ({not_pem}) is not a readable PEM certificate",)),
        "bad-client-cert": (lambda c: c["users"][0]["user"].update({"client-certificate": str(not_pem),
                                                                     "client-key": str(not_pem)}),
                            ("client-certificate/client-key", "not a readable PEM certificate")),
        "missing-ca": (lambda c: c["clusters"][0]["cluster"].update({"certificate-authority": str(tmp_path / "no")}),
                       (f"File does not exist: {tmp_path / 'no'}",)),
        "unknown-context": (lambda c: c.update({"current-context": "nope"}), ("nope",)),
    }
    for shape, (change, words) in shapes.items():
        config = copy.deepcopy(good)  # the test cluster's: a CA file and a token
        change(config)
        path = tmp_path / f"{shape}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        for command in ("status", "doctor"):
            one_line_error(lbctl(str(path), command), "no usable kubeconfig", "--kubeconfig", *words)
    empty = tmp_path / "empty.kubeconfig"
    empty.write_text("")
    one_line_error(lbctl(str(empty), "status"), "no usable kubeconfig", "is empty")

    info = controlplane.read_info(Path(os.environ["LBCTL_TEST_CONTROLPLANE_DIR"]))
    unreachable = tmp_path / "unreachable.kubeconfig"
    unreachable.write_text(kubeconfig_yaml("https://127.0.0.1:9", Path(info.ca_file), "admin", "x"))
    one_line_error(lbctl(str(unreachable), "status"), "cannot reach the cluster at https://127.0.0.1:9")
    one_line_error(lbctl(str(unreachable), "doctor"), "cannot reach the cluster")

    # a ServiceAccount with no permissions at all
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token("nobody", namespace, {"spec": {}}).status.token
    forbidden = tmp_path / "nobody.kubeconfig"
    forbidden.write_text(kubeconfig_yaml(cluster.server, Path(cluster.ca_file), "nobody", token))
    one_line_error(lbctl(str(forbidden), "status", "-n", namespace), "may not read", "403", "read access")


# -- doctor --------------------------------------------------------------------------------------------

@pytest.fixture
def installed(cluster: ClusterInfo, api_client: client.ApiClient) -> None:
    """The shipped RBAC (and its namespace), as `kubectl apply -k examples/deploy` would make it."""
    kube = LabKube(cluster.kubeconfig)
    try:
        kube.install_forwarder_rbac()
        from tests.integration.test_rbac import DEPLOY, apply

        apply(api_client, DEPLOY / "operator-rbac.yaml")
    finally:
        kube.close()


@pytest.fixture
def leader(start_operator: Callable[..., OperatorProcess], installed: None) -> OperatorProcess:
    operator = start_operator(env={"LBCTL_LEADER_ELECT": "true"})
    wait_until(lambda: "now leads" in operator.log(), what="the operator takes the Lease")
    return operator


def doctor_lines(cluster: ClusterInfo) -> tuple[int, list[str]]:
    result = lbctl(cluster.kubeconfig, "doctor")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines()


def test_doctor_passes_on_a_healthy_setup_and_fails_on_exhaustion_and_a_node_without_forwarder(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str, pools: Pools, nodes: Nodes, leader: OperatorProcess,
    write_forwarder_lease: Callable[[ClusterInfo, str], None],
) -> None:
    nodes.create("node-a")
    write_forwarder_lease(cluster, "node-a")
    pool = pools.create([Pools.fresh_v4(30)])["metadata"]["name"]  # 4 addresses
    core.create_namespaced_service(namespace, lb_service("web"))
    wait_for_ips(core, namespace, "web")
    wait_until(lambda: pools.get(pool).get("status", {}).get("assigned") == 1, what="pool status written")

    code, lines = doctor_lines(cluster)
    assert code == 0, "\n".join(lines)
    assert "PASS  crd loadbalancerpools: loadbalancerpools.lbctl.io v1alpha1 installed (revision 1)" in lines
    assert "PASS  crd bgppeers: bgppeers.lbctl.io v1alpha1 installed (revision 1)" in lines
    assert any(re.fullmatch(r"PASS  operator: leader \S+ \(Lease lbctl-system/lbctl-operator renewed \d+s ago\)", line)
               for line in lines), lines
    assert ("PASS  operator-rbac: ServiceAccount lbctl-system/lbctl-operator has the "
            f"{len(doctor.OPERATOR_PERMISSIONS)} permissions it needs") in lines
    assert ("PASS  forwarder-rbac: ServiceAccount lbctl-system/lbctl-forwarder has the "
            f"{len(doctor.FORWARDER_PERMISSIONS)} permissions it needs") in lines
    assert any(re.fullmatch(r"PASS  forwarders: a live forwarder on each of the \d+ eligible nodes", line)
               for line in lines), lines
    assert f"PASS  pool {pool}: 1 of 4 addresses assigned, 3 free" in lines
    assert re.fullmatch(r"\d+ checks: 0 failed, \d+ warnings", lines[-1]), lines

    # a node without a forwarder, and the pool used up
    nodes.create("node-b")
    for index in range(3):
        core.create_namespaced_service(namespace, lb_service(f"more-{index}"))
    wait_until(lambda: pools.get(pool).get("status", {}).get("free") == 0, what="pool used up")
    code, lines = doctor_lines(cluster)
    assert code == 1
    assert f"FAIL  pool {pool}: exhausted: 4 of 4 addresses assigned, 0 free" in lines
    assert lines[lines.index(f"FAIL  pool {pool}: exhausted: 4 of 4 addresses assigned, 0 free") + 1] == (
        f"      fix: add addresses to spec.addresses of pool {pool}, or delete Services that use it")
    assert any(re.fullmatch(r"FAIL  forwarders: no forwarder on node-b \(\d+ eligible nodes\)", line)
               for line in lines), lines
    assert re.fullmatch(r"\d+ checks: 2 failed, \d+ warnings", lines[-1]), lines


def doctor_check(cluster: ClusterInfo, name: str) -> dict[str, str]:
    result = lbctl(cluster.kubeconfig, "doctor", "-o", "json", "--no-rbac")
    assert "Traceback" not in result.stderr, result.stderr
    checks: list[dict[str, str]] = json.loads(result.stdout)
    return next(c for c in checks if c["name"] == name)


def test_doctor_wants_forwarders_only_on_the_nodes_the_daemonset_selects(
    cluster: ClusterInfo, api_client: client.ApiClient, nodes: Nodes, installed: None,
    write_forwarder_lease: Callable[[ClusterInfo, str], None],
) -> None:
    """The shipped forwarder DaemonSet, given a nodeSelector: only the nodes it selects need a
    forwarder, and the others are named."""
    (daemonset,) = [d for d in yaml.safe_load_all((REPO / "examples/deploy/forwarder-daemonset.yaml").read_text())
                    if d and d["kind"] == "DaemonSet"]
    daemonset["spec"]["template"]["spec"]["nodeSelector"] = {"lbctl.io/edge": "true"}
    apps = client.AppsV1Api(api_client)
    apps.create_namespaced_daemon_set("lbctl-system", daemonset)
    try:
        nodes.create("edge-1", labels={"lbctl.io/edge": "true"})
        nodes.create("inner-1")
        write_forwarder_lease(cluster, "edge-1")
        check = doctor_check(cluster, "forwarders")
        assert check["status"] == "pass", check
        assert "the DaemonSet does not select: " in check["message"], check
        assert "inner-1 (nodeSelector lbctl.io/edge=true)" in check["message"], check

        client.CoreV1Api(api_client).patch_node("inner-1", {"metadata": {"labels": {"lbctl.io/edge": "true"}}})
        check = doctor_check(cluster, "forwarders")
        assert check["status"] == "fail" and "no forwarder on inner-1" in check["message"], check
    finally:
        apps.delete_namespaced_daemon_set("lbctl-forwarder", "lbctl-system")


@pytest.fixture
def bare_cluster(tmp_path: Path) -> Iterator[ClusterInfo]:
    """A control plane of its own, on which nothing of lbctl was ever installed."""
    directory = tmp_path / "bare"
    info = controlplane.up(directory)
    try:
        yield info
    finally:
        controlplane.down(directory)


def test_doctor_fails_on_a_missing_crd(bare_cluster: ClusterInfo) -> None:
    code, lines = doctor_lines(bare_cluster)
    assert code == 1
    index = lines.index("FAIL  crd loadbalancerpools: CustomResourceDefinition loadbalancerpools.lbctl.io is not "
                        "installed")
    assert lines[index + 1] == ("      fix: install it: kubectl apply -f examples/deploy/crd-loadbalancerpool.yaml, "
                                "or kubectl apply -k examples/deploy (or helm install lbctl charts/lbctl)")
    assert ("FAIL  operator: no operator seen: no Lease lbctl-system/lbctl-operator and no Deployment "
            "lbctl-system/lbctl-operator") in lines
    assert any(line.startswith("FAIL  operator-rbac: ServiceAccount lbctl-system/lbctl-operator may not: get services")
               for line in lines), lines
    # nothing asks for forwarders here (no DaemonSet, no local Service, no pool), as on an aws/gce install
    assert ("PASS  forwarders: not used: no DaemonSet lbctl-system/lbctl-forwarder, no local-provider Service and "
            "no LoadBalancerPool (aws and gce balancers need no forwarder)") in lines
    assert ("WARN  crd bgppeers: CustomResourceDefinition bgppeers.lbctl.io is not installed: BGP advertisement "
            "cannot be used") in lines

    # a pool CRD from before BGP: no spec.advertisement, no schema revision
    old = yaml.safe_load(POOL_CRD.read_text())
    del old["metadata"]["annotations"]
    del old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["advertisement"]
    extensions = client.ApiextensionsV1Api(config.new_client_from_config(bare_cluster.kubeconfig))
    extensions.create_custom_resource_definition(old)
    wait_until(lambda: any(c.type == "Established" and c.status == "True" for c in
                           extensions.read_custom_resource_definition(old["metadata"]["name"]).status.conditions or ()),
               what="the old CRD is Established")
    result = lbctl(bare_cluster.kubeconfig, "doctor")
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    outdated = ("FAIL  crd loadbalancerpools: loadbalancerpools.lbctl.io is outdated (no lbctl.io/crd-revision, this "
                "lbctl expects revision 1); its schema lacks spec.advertisement")
    assert outdated in lines, result
    assert lines[lines.index(outdated) + 1] == (
        "      fix: apply this lbctl's CRD: kubectl apply -f examples/deploy/crd-loadbalancerpool.yaml, or kubectl "
        "apply -k examples/deploy (or helm install lbctl charts/lbctl)")


def test_doctor_json(cluster: ClusterInfo, installed: None, pool_crd: None) -> None:
    result = lbctl(cluster.kubeconfig, "doctor", "-o", "json", "--no-rbac")
    checks = json.loads(result.stdout)
    by_name = {c["name"]: c for c in checks}
    assert by_name["crd loadbalancerpools"]["status"] == "pass"
    assert by_name["operator-rbac"]["status"] == "skip"
    assert result.returncode == (1 if any(c["status"] == "fail" for c in checks) else 0)




def test_reading_services_and_events_is_enough_for_the_table(cluster: ClusterInfo, core: client.CoreV1Api,
                                                             namespace: str, three_services: dict[str, str],
                                                             tmp_path: Path) -> None:
    """A user who may read only Services and Events in the namespace (what the built-in `view` role
    grants there; this control plane runs no role-aggregation controller, so `view` itself is empty):
    the table, and a note on what could not be read."""
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "reader"}, "rules": [
        {"apiGroups": [""], "resources": ["services", "events"], "verbs": ["get", "list", "watch"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                    "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token = core.create_namespaced_service_account_token("reader", namespace, {"spec": {}}).status.token
    reader = tmp_path / "reader.kubeconfig"
    reader.write_text(kubeconfig_yaml(cluster.server, Path(cluster.ca_file), "reader", token))
    result = lbctl(str(reader), "status", "-n", namespace)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["NAME", "bad", "queued", "web"]
    assert re.fullmatch(rf"web\s+lbctl\.io/local\s+{re.escape(three_services['address'])}\s+-\s+node-1 \(L2\)\s+"
                        r"ready\s+\d+s", lines[3]), lines[3]
    assert result.stderr.strip() == ("lbctl status: note: your credentials may not read loadbalancerpools: "
                                     "POOL/BALANCER shows - for them")
    one_line_error(lbctl(str(reader), "status"), "may not read", "403")  # every namespace: not allowed
