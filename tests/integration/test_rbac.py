"""The shipped RBAC is enough, and only that: the operator runs with a ServiceAccount token bound
to examples/deploy/operator-rbac.yaml, with leader election on as the shipped Deployment runs it,
and does its whole job without one forbidden request."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from kubernetes import client, utils
from kubernetes.client.rest import ApiException

from lbctl.dev.layout import ClusterInfo, kubeconfig_yaml
from tests.integration.harness import (
    REPO,
    OperatorProcess,
    Pools,
    lb_service,
    wait_for_event,
    wait_for_ips,
    wait_until,
)

DEPLOY = REPO / "examples" / "deploy"


def apply(api_client: client.ApiClient, path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        try:
            utils.create_from_dict(api_client, document)
        except utils.FailToCreateError as exc:
            if not all(isinstance(e, ApiException) and e.status == 409 for e in exc.api_exceptions):
                raise


def test_the_operator_works_with_exactly_the_shipped_rbac(
    cluster: ClusterInfo, api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, pools: Pools,
    start_operator: Callable[..., OperatorProcess], tmp_path: Path,
) -> None:
    apply(api_client, DEPLOY / "namespace.yaml")
    apply(api_client, DEPLOY / "operator-rbac.yaml")
    token = core.create_namespaced_service_account_token(
        "lbctl-operator", "lbctl-system", {"spec": {"expirationSeconds": 3600}}).status.token
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(kubeconfig_yaml(cluster.server, Path(cluster.ca_file), "lbctl-operator", token))

    operator = start_operator(env={"KUBECONFIG": str(kubeconfig), "LBCTL_LEADER_ELECT": "true"})
    wait_until(lambda: "now leads" in operator.log(), what="the operator takes the Lease lbctl-system/lbctl-operator")
    pool = pools.create(["198.18.230.0/30"])
    core.create_namespaced_service(namespace, lb_service("web"))
    assert wait_for_ips(core, namespace, "web") == ["198.18.230.0"]  # MetalLB: .0 too, unless avoidBuggyIPs
    wait_for_event(core, namespace, "web", "EnsuredLoadBalancer")
    wait_until(lambda: pools.get(pool["metadata"]["name"]).get("status", {}).get("assigned") == 1,
               what="pool status written")
    core.delete_namespaced_service("web", namespace)
    wait_until(lambda: not core.list_namespaced_service(namespace).items, what="service released and gone")
    operator.stop()  # hands the Lease back: get and update by name
    coordination = client.CoordinationV1Api(api_client)
    assert coordination.read_namespaced_lease("lbctl-operator", "lbctl-system").spec.holder_identity in ("", None)
    log = operator.log()
    assert "released lease" in log
    assert 'forbidden: User "system:serviceaccount:lbctl-system:lbctl-operator" cannot' not in log, log[-3000:]
    assert "lbctl-operator" in log or "started:" in log  # the log was read, and is the operator's

    # and the token is really limited: it cannot, say, read Secrets
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.ssl_ca_cert = cluster.ca_file
    configuration.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(configuration) as limited:
        try:
            client.CoreV1Api(limited).list_namespaced_secret("lbctl-system")
            raise AssertionError("the operator's token can read Secrets")
        except ApiException as exc:
            assert exc.status == 403
        try:  # and no Lease but its own
            client.CoordinationV1Api(limited).read_namespaced_lease("kube-scheduler", "lbctl-system")
            raise AssertionError("the operator's token can read other Leases")
        except ApiException as exc:
            assert exc.status == 403
