"""The embedded control plane is a real Kubernetes: allocation, watches, RBAC and validation."""

from __future__ import annotations

import threading
import uuid

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from lbctl.dev.layout import ClusterInfo


def _lb_service(name: str, ports: list[int]) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(
            type="LoadBalancer",
            selector={"app": name},
            ports=[client.V1ServicePort(name=f"p{p}", port=p, protocol="TCP") for p in ports],
        ),
    )


def test_load_balancer_service_gets_node_ports_from_the_configured_range(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    created = core.create_namespaced_service(namespace, _lb_service("web", [80, 443]))
    low, high = cluster.node_port_bounds
    node_ports = [p.node_port for p in created.spec.ports]
    assert len(set(node_ports)) == 2
    assert all(low <= p <= high for p in node_ports), node_ports
    assert high - low + 1 >= 20_000
    assert created.spec.cluster_ip.startswith("10.96.")


def test_a_watch_sees_the_creation(core: client.CoreV1Api, namespace: str) -> None:
    name = f"w-{uuid.uuid4().hex[:6]}"
    seen: list[tuple[str, str]] = []
    started = threading.Event()

    def watch_services() -> None:
        stream = watch.Watch()
        started.set()
        for event in stream.stream(core.list_namespaced_service, namespace, timeout_seconds=20):
            seen.append((event["type"], event["object"].metadata.name))
            if event["object"].metadata.name == name:
                stream.stop()

    thread = threading.Thread(target=watch_services)
    thread.start()
    started.wait()
    core.create_namespaced_service(namespace, _lb_service(name, [8080]))
    thread.join(timeout=30)
    assert ("ADDED", name) in seen


def test_an_unprivileged_token_is_denied_by_rbac(cluster: ClusterInfo) -> None:
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.ssl_ca_cert = cluster.ca_file
    configuration.api_key = {"authorization": f"Bearer {cluster.unprivileged_token}"}
    with client.ApiClient(configuration) as api, pytest.raises(ApiException) as denied:
        client.CoreV1Api(api).list_namespaced_service("default")
    assert denied.value.status == 403
    assert "lbctl-nobody" in str(denied.value.body)


def test_tls_is_verified_against_the_generated_ca(cluster: ClusterInfo) -> None:
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.api_key = {"authorization": f"Bearer {cluster.admin_token}"}
    configuration.retries = 0  # no CA given: the system trust store must reject the dev CA
    with client.ApiClient(configuration) as api, pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        client.CoreV1Api(api).list_namespaced_service("default")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "LoadBalancer", "ports": [{"port": 70000}]}, "spec.ports[0].port"),
        ({"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
        ({"type": "ClusterIP", "loadBalancerClass": "lbctl.io/local", "ports": [{"port": 80}]}, "loadBalancerClass"),
    ],
)
def test_an_invalid_spec_is_rejected_by_validation(
    core: client.CoreV1Api, namespace: str, spec: dict[str, object], message: str
) -> None:
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"}, "spec": spec}
    with pytest.raises(ApiException) as rejected:
        core.create_namespaced_service(namespace, body)
    assert rejected.value.status == 422
    assert message in str(rejected.value.body)
