"""The lab's Kubernetes objects: Nodes and Pods without a kubelet (their status is written
through the API, so the real endpointslice controller makes the EndpointSlices), pools, Services."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config, utils
from kubernetes.client.exceptions import ApiException

from lbctl.model.meta import API_GROUP, API_VERSION, API_VERSION_NAME, LOCAL_CLASS, timestamp

T = TypeVar("T")
_DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy"
POOL_CRD = _DEPLOY / "crd-loadbalancerpool.yaml"
FORWARDER_MANIFESTS = (_DEPLOY / "namespace.yaml", _DEPLOY / "forwarder-daemonset.yaml")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until `probe` returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def holds_for(probe: Callable[[], object], duration: float, what: str, interval: float = 0.1) -> None:
    """Check `probe` over a window of `duration` seconds in which nothing should change (no fail-back,
    no move): AssertionError naming `what` at the first sample that is false."""
    deadline = time.monotonic() + duration
    while True:
        value = probe()
        assert value, f"{what} stopped holding ({value!r}) before {duration:.1f}s were over"
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


def absent_ok(delete: Callable[[], object]) -> None:
    """Run a delete for a teardown: an object that is already gone (404) counts as deleted, so the step
    can run twice or after the test removed it itself; any other error is raised."""
    try:
        delete()
    except ApiException as exc:
        if exc.status != 404:
            raise


class LabKube:
    def __init__(self, kubeconfig: str) -> None:
        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.extensions = client.ApiextensionsV1Api(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)

    def close(self) -> None:
        self.api.close()

    def install_pool_crd(self, path: Path = POOL_CRD) -> None:
        body = yaml.safe_load(path.read_text())
        try:
            self.extensions.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise

        def established() -> bool:
            crd = self.extensions.read_custom_resource_definition(body["metadata"]["name"])
            conditions = crd.status.conditions if crd.status else None
            return any(c.type == "Established" and c.status == "True" for c in (conditions or ()))
        wait_for(established, 30, "the LoadBalancerPool CRD")

    def install_forwarder_rbac(self, paths: tuple[Path, ...] = FORWARDER_MANIFESTS) -> None:
        """Everything of the DaemonSet manifest (and its namespace) but the DaemonSet — no kubelet
        would run it: the lab's forwarders then run with exactly the RBAC a real cluster grants."""
        docs = [doc for path in paths for doc in yaml.safe_load_all(path.read_text())]
        for doc in docs:
            if doc and doc.get("kind") != "DaemonSet":
                try:
                    utils.create_from_dict(self.api, doc)
                except utils.FailToCreateError as exc:
                    if any(getattr(e, "status", None) != 409 for e in exc.api_exceptions):
                        raise

    def service_account_kubeconfig(self, namespace: str, name: str, server: str, ca_file: str, path: Path) -> str:
        """A kubeconfig that authenticates as ServiceAccount namespace/name (a TokenRequest token)."""
        request: Any = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {"expirationSeconds": 86400}}
        status = self.core.create_namespaced_service_account_token(name, namespace, request).status
        if status is None or not status.token:
            raise RuntimeError(f"no token issued for ServiceAccount {namespace}/{name}")
        token = status.token
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca_file}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": name}}],
        }))
        path.chmod(0o600)
        return str(path)

    def create_node(self, name: str, address: str) -> None:
        node: Any = {"apiVersion": "v1", "kind": "Node",
                     "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}
        self.core.create_node(node)
        now = timestamp()
        self.core.patch_node_status(name, {"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "lab node",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
        }})

    def create_namespace(self, name: str) -> None:
        namespace: Any = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        self.core.create_namespace(namespace)

        def has_default_account() -> bool:
            try:
                self.core.read_namespaced_service_account("default", name)
                return True
            except ApiException:
                return False
        wait_for(has_default_account, 30, f"the default ServiceAccount in {name}")

    def delete_node(self, name: str) -> None:
        absent_ok(lambda: self.core.delete_node(name))

    def delete_namespace(self, name: str) -> None:
        absent_ok(lambda: self.core.delete_namespace(name))

    def create_pod(self, namespace: str, name: str, node: str, address: str, labels: Mapping[str, str],
                   ports: Mapping[str, tuple[str, int]] | None = None, ready: bool = True,
                   address6: str | None = None) -> None:
        """A Pod bound to `node` whose status says it runs at `address` (no kubelet: we write it)."""
        container_ports = [{"name": n, "protocol": proto, "containerPort": port}
                           for n, (proto, port) in (ports or {}).items()]
        pod: Any = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels)},
            "spec": {"nodeName": node, "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "app", "image": "lab.invalid/app", "ports": container_ports}]},
        }
        self.core.create_namespaced_pod(namespace, pod)
        self.set_pod_ready(namespace, name, ready, address, address6)

    def set_pod_ready(self, namespace: str, name: str, ready: bool, address: str | None = None,
                      address6: str | None = None) -> None:
        status = "True" if ready else "False"
        now = timestamp()
        body: dict[str, Any] = {"status": {
            "phase": "Running",
            "conditions": [{"type": t, "status": status if t != "PodScheduled" else "True", "lastTransitionTime": now}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        }}
        if address:
            ips = [{"ip": address}, *([{"ip": address6}] if address6 else [])]  # dual-stack: both families
            body["status"].update({"podIP": address, "podIPs": ips, "startTime": now})
        self.core.patch_namespaced_pod_status(name, namespace, body)

    def delete_pod(self, namespace: str, name: str) -> None:
        absent_ok(lambda: self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0))

    def create_pool(self, name: str, addresses: list[str], namespaces: list[str] | None = None,
                    advertisement: Mapping[str, Any] | None = None) -> None:
        spec: dict[str, Any] = {"addresses": addresses}
        if namespaces:
            spec["namespaces"] = namespaces
        if advertisement is not None:
            spec["advertisement"] = dict(advertisement)
        self.custom.create_cluster_custom_object(API_GROUP, API_VERSION_NAME, "loadbalancerpools", {
            "apiVersion": API_VERSION, "kind": "LoadBalancerPool", "metadata": {"name": name}, "spec": spec})

    def delete_pool(self, name: str) -> None:
        absent_ok(lambda: self.custom.delete_cluster_custom_object(API_GROUP, API_VERSION_NAME, "loadbalancerpools",
                                                                   name))

    def create_service(self, namespace: str, name: str, selector: Mapping[str, str] | None,
                       ports: list[dict[str, Any]], **spec: Any) -> None:
        body_spec: dict[str, Any] = {"type": "LoadBalancer", "loadBalancerClass": LOCAL_CLASS, "ports": ports, **spec}
        if selector is not None:
            body_spec["selector"] = dict(selector)
        service: Any = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": body_spec}
        self.core.create_namespaced_service(namespace, service)

    def service(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api.sanitize_for_serialization(
            self.core.read_namespaced_service(name, namespace))
        return result

    def external_ip(self, namespace: str, name: str) -> str | None:
        ingress = ((self.service(namespace, name).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        return next((i["ip"] for i in ingress if i.get("ip")), None)

    def external_ips(self, namespace: str, name: str) -> list[str]:
        """Every ingress address, in status order (a dual-stack Service: the primary family first)."""
        ingress = ((self.service(namespace, name).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        return [i["ip"] for i in ingress if i.get("ip")]

    def wait_external_ip(self, namespace: str, name: str, timeout: float = 30) -> str:
        return wait_for(lambda: self.external_ip(namespace, name), timeout, f"an EXTERNAL-IP on {namespace}/{name}")

    def annotation(self, namespace: str, name: str, key: str) -> str | None:
        value = ((self.service(namespace, name).get("metadata") or {}).get("annotations") or {}).get(key)
        return value if isinstance(value, str) else None

    def event_reasons(self, namespace: str, name: str) -> list[str]:
        events = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        return [str(e.reason) for e in events.items]

    def endpoint_addresses(self, namespace: str, service: str) -> set[str]:
        slices = self.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}")
        found: set[str] = set()
        for item in slices.items:
            for endpoint in item.endpoints or ():
                if endpoint.conditions is None or endpoint.conditions.ready is not False:
                    found.update(endpoint.addresses or ())
        return found
