"""Every example manifest is accepted by the real apiserver (server-side dry run), and the pool
CRD's validation rejects what it should."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, dynamic
from kubernetes.client.rest import ApiException

from tests.integration.harness import REPO

DEPLOY = REPO / "examples" / "deploy"
EXAMPLES = sorted(p for p in [*(REPO / "examples" / "services").glob("*.yaml"), *DEPLOY.glob("*.yaml")]
                  if p.name != "kustomization.yaml")


def test_the_kustomization_installs_every_deploy_manifest() -> None:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dry_run_create(api: dynamic.DynamicClient, body: dict[str, Any], namespace: str) -> None:
    resource = api.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    target = body["metadata"].get("namespace", namespace) if resource.namespaced else None
    if target and target != namespace:
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        target = namespace
    resource.create(body=body, namespace=target, dry_run="All")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_is_accepted_by_the_apiserver(
    path: Path, api_client: client.ApiClient, namespace: str, pool_crd: None
) -> None:
    api = dynamic.DynamicClient(api_client)
    found = documents(path)
    assert found, f"{path} holds no manifest"
    for body in found:
        try:
            dry_run_create(api, body, namespace)
        except ApiException as exc:
            if exc.status == 409:  # already there (the CRD itself)
                continue
            raise AssertionError(f"{path.name}: {body['kind']} {body['metadata']['name']}: {exc.body}") from None


@pytest.mark.parametrize("address", ["10.0.0.300", "10.0.0.0/33", "fd00::/129", "10.0.0.1-", "hello",
                                     "10.0.0.1-fd00::1x"])
def test_the_pool_crd_rejects_malformed_addresses(api_client: client.ApiClient, pool_crd: None, address: str) -> None:
    custom = client.CustomObjectsApi(api_client)
    body = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": "bad"},
            "spec": {"addresses": [address]}}
    with pytest.raises(ApiException) as rejected:
        custom.create_cluster_custom_object("lbctl.io", "v1alpha1", "loadbalancerpools", body, dry_run="All")
    assert rejected.value.status == 422 and "spec.addresses[0]" in str(rejected.value.body)
