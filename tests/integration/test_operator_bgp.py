"""BGP on the operator's side, against the real apiserver with `lbctl operator` running: the test
writes BGPPeer status entries as the forwarders do (server-side apply, field manager
lbctl-forwarder-<node>) and the Service's lbctl.io/bgp-announcing-nodes and Events follow; bad
advertisements and peers get a condition and an Event naming the field and the fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lbctl.dev.layout import ClusterInfo
from lbctl.model.meta import BGP_ANNOUNCING_NODES_ANNOTATION
from tests.integration.harness import (
    Nodes,
    OperatorProcess,
    Pools,
    apply_peer_status,
    events,
    lb_service,
    wait_for_event,
    wait_for_ips,
    wait_until,
)
from tests.integration.test_status_doctor import lbctl

GROUP, VERSION = "lbctl.io", "v1alpha1"


class Peers:
    def __init__(self, custom: client.CustomObjectsApi) -> None:
        self.custom = custom
        self.names: list[str] = []

    def create(self, name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name, "labels": labels},
                "spec": {"peerAddress": "192.0.2.1", "peerASN": 64512, "myASN": 64513, **spec}}
        created: dict[str, Any] = self.custom.create_cluster_custom_object(GROUP, VERSION, "bgppeers", body)
        self.names.append(name)
        return created

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, "bgppeers", name)
        return found

    def cleanup(self) -> None:
        for name in self.names:
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, "bgppeers", name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture
def peers(api_client: client.ApiClient, pool_crd: None) -> Iterator[Peers]:
    made = Peers(client.CustomObjectsApi(api_client))
    yield made
    made.cleanup()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:6]


def announcing(core: client.CoreV1Api, namespace: str, name: str) -> str | None:
    annotations = core.read_namespaced_service(name, namespace).metadata.annotations or {}
    value: str | None = annotations.get(BGP_ANNOUNCING_NODES_ANNOTATION)
    return value


def wait_announcing(core: client.CoreV1Api, namespace: str, name: str, expected: str | None) -> None:
    wait_until(lambda: announcing(core, namespace, name) == expected, timeout=20,
               what=f"{BGP_ANNOUNCING_NODES_ANNOTATION}={expected!r} on {namespace}/{name} "
                    f"(now {announcing(core, namespace, name)!r})")


def bgp_pool(pools: Pools, tag: str, **bgp: Any) -> dict[str, Any]:
    return pools.create([Pools.fresh_v4(28)], advertisement={
        "mode": "bgp", "bgp": {"peerSelector": {"matchLabels": {"test": tag}}, **bgp}})


def endpoints(ready: dict[str, bool]) -> list[dict[str, Any]]:
    return [{"addresses": [f"10.244.{i}.5"], "nodeName": node, "conditions": {"ready": ok}}
            for i, (node, ok) in enumerate(ready.items())]


def create_slice(api_client: client.ApiClient, namespace: str, service: str, ready: dict[str, bool]) -> str:
    """An EndpointSlice of `service` with endpoints on these nodes (ready or not); its resourceVersion."""
    made = client.DiscoveryV1Api(api_client).create_namespaced_endpoint_slice(namespace, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-1", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(ready)})
    return str(made.metadata.resource_version)


def pool_condition(pools: Pools, name: str, kind: str = "Advertised") -> dict[str, Any] | None:
    conditions = pools.get(name).get("status", {}).get("conditions") or ()
    return next((c for c in conditions if c.get("type") == kind), None)


def test_the_annotation_follows_the_sessions_with_externaltrafficpolicy_cluster(
    cluster: ClusterInfo, api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, pools: Pools,
    peers: Peers, nodes: Nodes, tag: str, operator: OperatorProcess,
) -> None:
    names = [f"bgp-{tag}-{i}" for i in (1, 2, 3)]
    for name in names:
        nodes.create(name)
    peer = f"tor-{tag}"
    peers.create(peer, {"test": tag})
    pool = bgp_pool(pools, tag)
    wait_until(lambda: (pool_condition(pools, pool["metadata"]["name"]) or {}).get("status") == "True",
               what="the pool Advertised")
    core.create_namespaced_service(namespace, lb_service("web"))
    wait_for_ips(core, namespace, "web")
    # no session yet: announced by nobody, and a Warning says how to find out why
    wait_announcing(core, namespace, "web", "")
    wait_for_event(core, namespace, "web", "BGPNotAnnounced", "lbctl doctor")

    apply_peer_status(api_client, peer, names[0], "Established", routes=1)
    apply_peer_status(api_client, peer, names[1], "Established", routes=1)
    apply_peer_status(api_client, peer, names[2], "Active")
    # Established sessions but no endpoint anywhere: no route (it would only draw traffic to drop);
    # one ready endpoint, on a node that does not even peer: ETP=Cluster announces from every node
    created = create_slice(api_client, namespace, "web", {"elsewhere": True})
    wait_announcing(core, namespace, "web", f"{names[0]},{names[1]}")
    # the Event follows the annotation's write
    wait_for_event(core, namespace, "web", "BGPAnnouncingNodes", f"from {names[0]}, {names[1]} (before: ")
    announced = [int(e.metadata.resource_version) for e in core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=web,reason=BGPAnnouncingNodes").items]
    assert announced and min(announced) > int(created), "announced before the Service had an endpoint"

    # a session going down takes its node out; the third coming up adds it
    apply_peer_status(api_client, peer, names[1], "Idle", message="hold timer expired")
    wait_announcing(core, namespace, "web", names[0])
    wait_for_event(core, namespace, "web", "BGPAnnouncingNodes", f"from {names[0]} (before: {names[0]}, {names[1]})")
    apply_peer_status(api_client, peer, names[2], "Established")
    wait_announcing(core, namespace, "web", f"{names[0]},{names[2]}")

    # a node that is no longer eligible stops counting, whatever its session says
    nodes.set_ready(names[0], False)
    wait_announcing(core, namespace, "web", names[2])

    # lbctl status shows them where it shows the L2 node; lbctl doctor checks the peer's sessions
    table = lbctl(cluster.kubeconfig, "status", "-n", namespace)
    assert f"{names[2]} (BGP)" in table.stdout, table.stdout + table.stderr
    story = lbctl(cluster.kubeconfig, "status", "-n", namespace, "web")
    rows = {line.split()[0]: line for line in story.stdout.splitlines() if line.strip().startswith("bgp-")}
    assert "BGP" in rows[names[2]] and "BGP" not in rows[names[1]], story.stdout
    checks = {c["name"]: c for c in json.loads(lbctl(cluster.kubeconfig, "doctor", "-o", "json", "--no-rbac").stdout)}
    assert checks[f"bgppeer {peer}"]["status"] == "warn"  # Established on 1 of the 2 eligible nodes
    assert f"{names[1]}: Idle (hold timer expired)" in checks[f"bgppeer {peer}"]["message"]
    assert checks[f"pool {pool['metadata']['name']} bgp"]["status"] == "pass"
    apply_peer_status(api_client, peer, names[2], "Active", message="connection refused")
    wait_announcing(core, namespace, "web", "")
    checks = {c["name"]: c for c in json.loads(lbctl(cluster.kubeconfig, "doctor", "-o", "json", "--no-rbac").stdout)}
    assert checks[f"bgppeer {peer}"]["status"] == "fail" and "no Established session" in \
        checks[f"bgppeer {peer}"]["message"] and "password" in checks[f"bgppeer {peer}"]["fix"]
    assert "none (BGP)" in lbctl(cluster.kubeconfig, "status", "-n", namespace).stdout

    # the pool back to l2: the annotation goes
    pools.patch(pool["metadata"]["name"], {"advertisement": {"mode": "l2"}})
    wait_announcing(core, namespace, "web", None)
    assert operator.alive()


def test_externaltrafficpolicy_local_announces_from_nodes_with_a_ready_endpoint(
    api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, pools: Pools, peers: Peers,
    nodes: Nodes, tag: str, operator: OperatorProcess,
) -> None:
    names = [f"bgpl-{tag}-{i}" for i in (1, 2, 3)]
    for name in names:
        nodes.create(name)
    peer = f"torl-{tag}"
    peers.create(peer, {"test": tag})
    bgp_pool(pools, tag)
    for name in names:
        apply_peer_status(api_client, peer, name, "Established")
    core.create_namespaced_service(namespace, lb_service("local", externalTrafficPolicy="Local"))
    wait_for_ips(core, namespace, "local")
    wait_announcing(core, namespace, "local", "")  # no endpoint anywhere yet

    discovery = client.DiscoveryV1Api(api_client)
    create_slice(api_client, namespace, "local", {names[1]: True, names[2]: False})
    wait_announcing(core, namespace, "local", names[1])
    wait_for_event(core, namespace, "local", "BGPAnnouncingNodes", f"from {names[1]}")

    discovery.patch_namespaced_endpoint_slice("local-1", namespace,
                                              {"endpoints": endpoints({names[1]: True, names[2]: True})})
    wait_announcing(core, namespace, "local", f"{names[1]},{names[2]}")
    # a node whose session drops stops announcing even with its endpoint
    apply_peer_status(api_client, peer, names[1], "Connect")
    wait_announcing(core, namespace, "local", names[2])
    # the last endpoint gone: nobody
    discovery.delete_namespaced_endpoint_slice("local-1", namespace)
    wait_announcing(core, namespace, "local", "")


def test_bad_bgp_configuration_is_reported_on_the_object(
    api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, pools: Pools, peers: Peers, tag: str,
    operator: OperatorProcess,
) -> None:
    # a bgp pool no peer matches
    lonely = bgp_pool(pools, f"none-{tag}")
    name = lonely["metadata"]["name"]
    found = wait_until(lambda: (c := pool_condition(pools, name)) and c["status"] == "False" and c,
                       what="the pool marked not advertised")
    assert found["reason"] == "NoMatchingPeer" and "spec.advertisement.bgp.peerSelector" in found["message"]
    assert "fix:" in found["message"]
    wait_for_event(core, "default", name, "NoMatchingPeer")
    # the pool's addresses are still handed out (its Ready condition stays True)
    assert (pool_condition(pools, name, "Ready") or {}).get("status") == "True"

    # an aggregation shorter than the pool's CIDR passes CEL but not the operator
    wide = pools.create([Pools.fresh_v4(28)], advertisement={"mode": "bgp", "bgp": {"aggregationLength": 24}})
    found = wait_until(lambda: (c := pool_condition(pools, wide["metadata"]["name"])) and c["status"] == "False"
                       and c, what="the pool's advertisement marked invalid")
    assert found["reason"] == "InvalidAdvertisement"
    assert "spec.advertisement.bgp.aggregationLength" in found["message"] and "28 or more" in found["message"]
    wait_for_event(core, "default", wide["metadata"]["name"], "InvalidAdvertisement", "aggregationLength")

    # two peers with one address for the same nodes: the younger is refused, the other stays valid
    first, second = f"dup-a-{tag}", f"dup-b-{tag}"
    peers.create(first, {"test": tag}, peerAddress="192.0.2.77")
    peers.create(second, {"test": tag}, peerAddress="192.0.2.77")

    def valid(peer: str) -> dict[str, Any] | None:
        conditions = peers.get(peer).get("status", {}).get("conditions") or ()
        return next((c for c in conditions if c.get("type") == "Valid"), None)

    refused = wait_until(lambda: (c := valid(second)) and c["status"] == "False" and c, what="the duplicate refused")
    assert refused["reason"] == "DuplicatePeer" and "spec.peerAddress" in refused["message"] and first in \
        refused["message"]
    assert (valid(first) or {}).get("status") == "True"
    wait_for_event(core, "default", second, "DuplicatePeer")
    assert not [e for e in events(core, "default", first) if e[0] == "Warning"]
    # the operator's conditions and the forwarders' entries live side by side in the status
    apply_peer_status(api_client, second, "some-node", "Active", message="peer refused: duplicate")
    status = peers.get(second)["status"]
    assert status["nodes"][0]["node"] == "some-node" and (valid(second) or {}).get("reason") == "DuplicatePeer"
