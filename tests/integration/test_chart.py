"""charts/lbctl: `helm lint` and `helm template` for each provider's values, the rendered manifests
accepted by the real apiserver (server-side dry run), and the defaults equivalent to
examples/deploy. Helm is built from the Go module proxy once and cached (lbctl.dev.helm)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, dynamic
from kubernetes.client.rest import ApiException

from lbctl.dev import helm, versions
from tests.integration.harness import REPO
from tests.integration.test_examples import dry_run_create

CHART = REPO / "charts" / "lbctl"
DEPLOY = REPO / "examples" / "deploy"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = versions.KUBERNETES_VERSION


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return helm.build()  # cached by `bash .ci/setup`; built here (about 3 minutes) when it is not


def run_helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120)


def render(helm_bin: Path, *extra: str) -> list[dict[str, Any]]:
    result = run_helm(helm_bin, "template", "lbctl", str(CHART), "--namespace", "lbctl-system",
                      "--kube-version", KUBE_VERSION, *extra)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name)
def test_helm_lint(helm_bin: Path, values: Path) -> None:
    result = run_helm(helm_bin, "lint", str(CHART), "--strict", "--namespace", "lbctl-system",
                      "--kube-version", KUBE_VERSION, "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [None, *VALUES], ids=lambda p: p.name if p else "defaults")
def test_rendered_manifests_are_accepted_by_the_apiserver(
    helm_bin: Path, values: Path | None, api_client: client.ApiClient, namespace: str, pool_crd: None,
) -> None:
    docs = render(helm_bin, *(["-f", str(values)] if values else []))
    api = dynamic.DynamicClient(api_client)
    kinds = set()
    for body in docs:
        kinds.add(body["kind"])
        if body["kind"] == "ServiceMonitor":  # the Prometheus Operator's CRD is not installed here
            assert body["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        try:
            dry_run_create(api, body, namespace)
        except ApiException as exc:
            if exc.status == 409:  # cluster-scoped and already there (the CRD)
                continue
            raise AssertionError(f"{body['kind']} {body['metadata']['name']}: {exc.body}") from None
    assert {"Deployment", "ClusterRole", "CustomResourceDefinition"} <= kinds


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_defaults_install_what_examples_deploy_installs(helm_bin: Path) -> None:
    chart = by_kind(render(helm_bin))
    shipped = by_kind([d for p in sorted(DEPLOY.glob("*.yaml")) if p.name != "kustomization.yaml"
                       for d in yaml.safe_load_all(p.read_text()) if d])
    assert set(chart) == set(shipped) - {("Namespace", "lbctl-system")}  # helm install --create-namespace
    for key in chart:
        if key[0] in ("ClusterRole", "Role"):
            assert chart[key]["rules"] == shipped[key]["rules"], key
        if key[0] in ("ClusterRoleBinding", "RoleBinding"):
            assert chart[key]["roleRef"] == shipped[key]["roleRef"] and chart[key]["subjects"] == shipped[key][
                "subjects"], key
    for name in ("loadbalancerpools.lbctl.io", "bgppeers.lbctl.io"):
        crd = ("CustomResourceDefinition", name)
        assert chart[crd]["spec"] == shipped[crd]["spec"], name
        revision = "lbctl.io/crd-revision"  # what `lbctl doctor` compares
        assert chart[crd]["metadata"]["annotations"][revision] == shipped[crd]["metadata"]["annotations"][revision]
    operator, shipped_operator = chart[("Deployment", "lbctl-operator")], shipped[("Deployment", "lbctl-operator")]
    for field in ("replicas", "strategy", "selector"):
        assert operator["spec"][field] == shipped_operator["spec"][field], field
    container = operator["spec"]["template"]["spec"]["containers"][0]
    shipped_container = shipped_operator["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == shipped_container["args"]
    assert container["securityContext"] == shipped_container["securityContext"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LBCTL_PROVIDER"] == "local" and env["LBCTL_LEADER_ELECT"] == "true"
    pdb = chart[("PodDisruptionBudget", "lbctl-operator")]
    assert pdb["spec"] == shipped[("PodDisruptionBudget", "lbctl-operator")]["spec"]
    forwarder = chart[("DaemonSet", "lbctl-forwarder")]["spec"]["template"]["spec"]
    shipped_forwarder = shipped[("DaemonSet", "lbctl-forwarder")]["spec"]["template"]["spec"]
    for field in ("hostNetwork", "dnsPolicy", "priorityClassName", "tolerations", "serviceAccountName"):
        assert forwarder[field] == shipped_forwarder[field], field
    assert forwarder["containers"][0]["securityContext"] == shipped_forwarder["containers"][0]["securityContext"]
    assert set(shipped_forwarder["containers"][0]["args"]) <= set(forwarder["containers"][0]["args"])


def test_values_reach_the_pods(helm_bin: Path) -> None:
    docs = by_kind(render(helm_bin, "--set", "provider=aws", "--set", "aws.region=eu-west-1", "--set",
                          "defaultClass=true", "--set", "operator.replicas=1", "--set", "forwarder.mode=announce",
                          "--set", "providerOptions.state_cache_s=0", "--set", "image.tag=9.9.9"))
    pod = docs[("Deployment", "lbctl-operator")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["LBCTL_PROVIDER"] == "aws" and env["LBCTL_REGION"] == "eu-west-1"
    assert env["LBCTL_CLASS"] == "lbctl.io/aws" and env["LBCTL_DEFAULT_CLASS"] == "true"
    assert env["LBCTL_PROVIDER_OPTIONS"] == "state_cache_s=0"
    assert pod["containers"][0]["image"] == "ghcr.io/lbctl/lbctl:9.9.9"
    assert ("PodDisruptionBudget", "lbctl-operator") not in docs  # one replica: a PDB would block every drain
    args = docs[("DaemonSet", "lbctl-forwarder")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--mode=announce" in args


def test_node_selectors_tolerations_and_resources_reach_both_pods(helm_bin: Path, tmp_path: Path) -> None:
    placement = {
        "nodeSelector": {"lbctl.io/edge": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "lb", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "250m", "memory": "96Mi"}, "limits": {"memory": "300Mi"}},
    }
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": placement, "forwarder": {**placement, "nodeSelector": {
        "lbctl.io/forwarder": "yes"}}}))
    docs = by_kind(render(helm_bin, "-f", str(values)))
    for kind, name, selector in (("Deployment", "lbctl-operator", {"lbctl.io/edge": "true"}),
                                 ("DaemonSet", "lbctl-forwarder", {"lbctl.io/forwarder": "yes"})):
        pod = docs[(kind, name)]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == selector, name
        assert pod["tolerations"] == placement["tolerations"], name
        assert pod["containers"][0]["resources"] == placement["resources"], name

    # the gce CI values: the operator placed on the control plane
    gce = by_kind(render(helm_bin, "-f", str(CHART / "ci" / "gce-values.yaml")))
    gce_values = yaml.safe_load((CHART / "ci" / "gce-values.yaml").read_text())
    pod = gce[("Deployment", "lbctl-operator")]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == gce_values["operator"]["nodeSelector"]
    assert pod["tolerations"] == gce_values["operator"]["tolerations"]
    assert ("DaemonSet", "lbctl-forwarder") not in gce  # forwarder.enabled: false


@pytest.mark.parametrize(("settings", "message"), [
    (["--namespace", "default"], "install lbctl into the namespace lbctl-system"),
    (["--set", "provider=azure"], 'provider must be local, aws or gce, not "azure"'),
    (["--set", "provider=aws"], "the aws provider needs aws.region"),
    (["--set", "provider=gce", "--set", "gce.project=p"], "the gce provider needs gce.project and gce.region"),
    (["--set", "operator.leaderElect=false"],
     "operator.replicas is 2 but operator.leaderElect is not true: every replica would act"),
    (["--set", "operator.replicas=3", "--set-string", "operator.leaderElect=no"],
     "operator.replicas is 3 but operator.leaderElect is not true"),
])
def test_bad_values_are_refused_with_the_fix(helm_bin: Path, settings: list[str], message: str) -> None:
    result = run_helm(helm_bin, "template", "lbctl", str(CHART), "--namespace", "lbctl-system",
                      "--kube-version", KUBE_VERSION, *settings)
    assert result.returncode != 0 and message in result.stderr, result.stderr
