"""Real TCP and UDP from a client namespace through the VIP (and node:nodePort) to pod namespaces,
with the operator and one `lbctl forwarder --mode full` per node namespace."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from lbctl.lab.kube import wait_for
from lbctl.lab.netns import call_in, http_get
from lbctl.lab.server import parse_answer
from tests.dataplane.harness import NODES, DataplaneEnv, Pod

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
DNS = {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}


def ask(namespace: str, ip: str, port: int, timeout: float = 1.0) -> tuple[str, str]:
    """(pod, peer address the pod saw) of one HTTP request."""
    return parse_answer(http_get(namespace, ip, port, timeout=timeout))


def try_ask(namespace: str, ip: str, port: int) -> tuple[str, str] | None:
    try:
        return ask(namespace, ip, port)
    except OSError:
        return None


def udp_socket(namespace: str, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A UDP socket made in `namespace` (it keeps one source port for all it sends)."""
    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return sock
    return call_in(namespace, make)


def udp_ask(sock: socket.socket, ip: str, port: int, timeout: float = 1.0) -> tuple[str, str] | None:
    sock.settimeout(timeout)
    sock.sendto(b"ping", (ip, port))
    try:
        data, _ = sock.recvfrom(2048)
    except TimeoutError:
        return None
    return parse_answer(data.decode())


def http_status(namespace: str, ip: str, port: int) -> tuple[int, dict[str, Any]]:
    def fetch() -> tuple[int, dict[str, Any]]:
        with socket.create_connection((ip, port), timeout=2) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), json.loads(body)
    return call_in(namespace, fetch)


def service_with(dp: DataplaneEnv, namespace: str, name: str, pods: list[Pod], ports: list[dict[str, Any]],
                 **spec: Any) -> str:
    """Create the Service; return its VIP once every node's rules carry every pod."""
    selector = {"app": pods[0].name.split("-")[0]} if pods else {"app": name}
    dp.kube.create_service(namespace, name, selector, ports, **spec)
    vip = dp.kube.wait_external_ip(namespace, name)
    dp.wait_endpoints(namespace, name, {p.address for p in pods})
    dp.wait_rules(present={vip})
    if spec.get("externalTrafficPolicy") == "Local":  # each node programs only its own pods
        for pod in pods:
            dp.wait_rules(present={pod.address}, nodes=(pod.node,))
    else:
        dp.wait_rules(present={p.address for p in pods})
    return vip


def node_port(dp: DataplaneEnv, namespace: str, name: str, port_name: str) -> int:
    ports = dp.kube.service(namespace, name)["spec"]["ports"]
    return int(next(p["nodePort"] for p in ports if p["name"] == port_name))


def test_tcp_and_udp_reach_pods_on_every_node_through_the_vip_and_node_ports(
        dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", node) for node in NODES]
    vip = service_with(dp, ns, "web", pods, [HTTP, DNS])
    client_ns = dp.clients[0]

    wait_for(lambda: try_ask(client_ns, vip, 80), 20, f"an HTTP answer through {vip}")
    answers = [ask(client_ns, vip, 80) for _ in range(60)]
    assert {name for name, _ in answers} == {p.name for p in pods}  # random spread reaches every pod
    assert all(dp.node_of(peer) in NODES for _, peer in answers)  # ETP=Cluster: masqueraded by a node

    sock = udp_socket(client_ns)
    try:
        reply = wait_for(lambda: udp_ask(sock, vip, 53), 10, f"a UDP answer through {vip}")
        assert reply[0] in {p.name for p in pods}
    finally:
        sock.close()

    http_np, dns_np = node_port(dp, ns, "web", "http"), node_port(dp, ns, "web", "dns")
    for index in NODES:
        assert ask(client_ns, dp.lab.node_address(index), http_np)[0] in {p.name for p in pods}
        sock = udp_socket(client_ns)
        try:
            assert (udp_ask(sock, dp.lab.node_address(index), dns_np) or ("",))[0] in {p.name for p in pods}
        finally:
            sock.close()

    # exactly one node announces the VIP, and the Service says which
    owner = wait_for(lambda: dp.owner(ns, "web"), 10, "the announcing-node annotation")
    assert [i for i in NODES if vip in dp.vips_on(i)] == [int(owner.rsplit("-", 1)[1])]
    wait_for(lambda: "AnnouncingAddress" in dp.kube.event_reasons(ns, "web"), 10, "an AnnouncingAddress Event")

    # a port the Service does not have is dropped on the VIP, not answered by the node's own listener
    owner_index = int(owner.rsplit("-", 1)[1])
    listener = dp.lab.start(dp.lab.nodes[owner_index], [sys.executable, "-m", "lbctl.lab.server",
                                                        "--name", "node-itself", "--tcp", "8181"], "node-listener.log")
    try:
        wait_for(lambda: try_ask(client_ns, dp.lab.node_address(owner_index), 8181), 20, "the node's own listener")
        assert try_ask(client_ns, vip, 8181) is None
    finally:
        dp.lab.stop(listener)

    # the Service goes: its rules and its VIP go on every node
    dp.kube.core.delete_namespaced_service("web", ns)
    dp.wait_rules(absent={vip})
    wait_for(lambda: all(vip not in dp.vips_on(i) for i in NODES), 10, f"{vip} released everywhere")
    assert f"/{ns}/web/" not in "".join(dp.nft_table(i) for i in NODES)


def test_scaling_endpoints_while_a_client_loops_loses_no_connection(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", 1), dp.add_pod(ns, "web", 2)]
    vip = service_with(dp, ns, "web", pods, [HTTP])
    client_ns = dp.clients[0]
    wait_for(lambda: try_ask(client_ns, vip, 80), 20, f"an HTTP answer through {vip}")

    answers: list[tuple[float, str]] = []
    failures: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                body = http_get(client_ns, vip, 80, timeout=2.0)
                answers.append((time.monotonic(), parse_answer(body)[0]))
            except OSError as exc:
                failures.append((time.monotonic(), repr(exc)))
            time.sleep(0.01)

    def seen(names: set[str], since: float = 0.0) -> Callable[[], bool]:
        return lambda: names <= {n for t, n in answers if t >= since}

    looper = threading.Thread(target=lambda: call_in(client_ns, loop), daemon=True)
    looper.start()
    try:
        added = [dp.add_pod(ns, "web", 3), dp.add_pod(ns, "web", 1)]
        wait_for(seen({p.name for p in added}), 20, "answers from the added pods")

        removed = [pods[0], added[0]]
        for pod in removed:  # how a pod leaves: not ready first, its process ends afterwards
            dp.kube.set_pod_ready(ns, pod.name, False)
        dp.wait_rules(absent={p.address for p in removed})
        gone_at = time.monotonic()
        for pod in removed:
            dp.lab.stop(pod.server)
            dp.kube.delete_pod(ns, pod.name)
        remaining = {pods[1].name, added[1].name}
        wait_for(seen(remaining, since=gone_at), 20, "answers from the remaining pods")
        wait_for(lambda: sum(1 for t, _ in answers if t > gone_at + 0.5) >= 20, 20,
                 "20 answers from well after the removed pods went")
    finally:
        stop.set()
        looper.join(timeout=10)
    assert failures == [], f"{len(failures)} failed of {len(answers) + len(failures)}: {failures[:5]}"
    assert len(answers) > 50
    late = {n for t, n in answers if t > gone_at + 0.5}
    assert not late & {p.name for p in removed}


def test_source_ranges_admit_only_the_listed_clients(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", 2)]
    vip = service_with(dp, ns, "web", pods, [HTTP], loadBalancerSourceRanges=[f"{dp.lab.client_address(0)}/32"])
    allowed, denied = dp.clients
    wait_for(lambda: try_ask(allowed, vip, 80), 20, f"an answer through {vip} for {allowed}")
    assert try_ask(denied, vip, 80) is None
    # NodePorts are not covered by loadBalancerSourceRanges (kube-proxy does the same)
    assert ask(denied, dp.lab.node_address(1), node_port(dp, ns, "web", "http"))[0] == pods[0].name


def test_local_traffic_policy_keeps_the_client_address_and_uses_only_local_endpoints(
        dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", 2)]
    vip = service_with(dp, ns, "web", pods, [HTTP], externalTrafficPolicy="Local")
    client_ns = dp.clients[0]
    # only node-2 has an endpoint, so only node-2 may announce
    wait_for(lambda: dp.owner(ns, "web") == "node-2", 15, "node-2 announcing")
    name, peer = wait_for(lambda: try_ask(client_ns, vip, 80), 20, f"an answer through {vip}")
    assert (name, peer) == (pods[0].name, dp.lab.client_address(0))  # the pod saw the client itself

    http_np = node_port(dp, ns, "web", "http")
    assert ask(client_ns, dp.lab.node_address(2), http_np) == (pods[0].name, dp.lab.client_address(0))
    assert try_ask(client_ns, dp.lab.node_address(1), http_np) is None  # no local endpoint: dropped

    health_port = int(dp.kube.service(ns, "web")["spec"]["healthCheckNodePort"])
    status, body = wait_for(lambda: _status(dp, dp.lab.node_address(2), health_port), 10, "a health answer")
    assert (status, body["localEndpoints"]) == (200, 1)
    status, body = wait_for(lambda: _status(dp, dp.lab.node_address(1), health_port), 10, "a health answer")
    assert (status, body["localEndpoints"]) == (503, 0)


def _status(dp: DataplaneEnv, ip: str, port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        return http_status(dp.clients[0], ip, port)
    except OSError:
        return None


def test_client_ip_affinity_sticks_to_one_pod(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", node) for node in NODES]
    vip = service_with(dp, ns, "web", pods, [HTTP], sessionAffinity="ClientIP")
    client_ns = dp.clients[0]
    wait_for(lambda: try_ask(client_ns, vip, 80), 20, f"an answer through {vip}")
    assert len({ask(client_ns, vip, 80)[0] for _ in range(30)}) == 1
    assert len({ask(dp.clients[1], vip, 80)[0] for _ in range(30)}) == 1


def test_udp_flows_move_off_a_removed_endpoint(dp: DataplaneEnv, k8s_namespace: str) -> None:
    """conntrack keeps a UDP flow on its endpoint while packets flow; the forwarder must flush it."""
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "dns", 1), dp.add_pod(ns, "dns", 3)]
    vip = service_with(dp, ns, "dns", pods, [DNS])
    sock = udp_socket(dp.clients[0])
    try:
        first = wait_for(lambda: udp_ask(sock, vip, 53), 20, f"a UDP answer through {vip}")[0]
        assert all((udp_ask(sock, vip, 53) or ("",))[0] == first for _ in range(5))  # one flow, one endpoint
        leaving = next(p for p in pods if p.name == first)
        dp.kube.set_pod_ready(ns, leaving.name, False)  # its server keeps answering
        dp.wait_rules(absent={leaving.address})
        after = wait_for(lambda: udp_ask(sock, vip, 53), 10, "a UDP answer after the endpoint left")[0]
        assert after != first
    finally:
        sock.close()


def test_service_without_endpoints_and_endpoints_outside_the_pod_network(
        dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    dp.kube.create_service(ns, "empty", {"app": "nothing"}, [HTTP])
    empty_vip = dp.kube.wait_external_ip(ns, "empty")
    dp.wait_rules(present={empty_vip})
    assert try_ask(dp.clients[0], empty_vip, 80) is None  # dropped: no endpoint

    # a hand-written EndpointSlice pointing at the client (outside --pod-cidr) next to a real pod
    pod = dp.add_pod(ns, "manual", 1)
    dp.kube.create_service(ns, "manual", None, [HTTP])
    discovery = client.DiscoveryV1Api(dp.kube.api)
    body: Any = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "manual-1", "labels": {"kubernetes.io/service-name": "manual"}},
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [dp.lab.client_address(1)], "conditions": {"ready": True}},
                      {"addresses": [pod.address], "conditions": {"ready": True}, "nodeName": "node-1"}],
    }
    discovery.create_namespaced_endpoint_slice(ns, body)
    # and an IPv6 slice for this IPv4-only Service
    discovery.create_namespaced_endpoint_slice(ns, {
        **body, "addressType": "IPv6", "metadata": {**body["metadata"], "name": "manual-2"},
        "endpoints": [{"addresses": ["2001:db8:1:1::99"], "conditions": {"ready": True}}]})
    vip = dp.kube.wait_external_ip(ns, "manual")
    dp.wait_rules(present={vip, pod.address}, absent={dp.lab.client_address(1), "2001:db8:1:1::99"})
    assert {ask(dp.clients[0], vip, 80)[0] for _ in range(10)} == {pod.name}
    assert all(f.poll() is None for f in dp.forwarders.values())  # nobody fell over

    # each problem is one Warning Event naming the field, posted by one node, not by every forwarder
    def problems() -> list[client.CoreV1Event] | None:
        found = [e for e in dp.kube.core.list_namespaced_event(ns, field_selector="involvedObject.name=manual").items
                 if e.reason == "ForwardingProblem"]
        return found if len(found) >= 2 else None

    found = wait_for(problems, timeout=20, what="the forwarders' Warning Events on manual")
    messages = sorted(e.message for e in found)
    assert len(messages) == 2, messages
    assert messages[0].startswith("EndpointSlice manual-1: endpoints[0].addresses[0]:"), messages
    assert messages[1].startswith("EndpointSlice manual-2: addressType:") and "spec.ipFamilies" in messages[1]
    assert all(e.type == "Warning" for e in found)
    assert len({e.source.host for e in found}) == 1 and found[0].source.host.startswith("node-")


def test_forwarders_never_lacked_a_permission(dp: DataplaneEnv) -> None:
    """They run as the DaemonSet's ServiceAccount (examples/deploy/forwarder-daemonset.yaml)."""
    logs = "\n".join(p.read_text(errors="replace") for p in dp.workdir.glob("forwarder-*.log"))
    assert logs, "no forwarder logs"
    # RBAC denials read 'is forbidden: User "…" cannot …'; writes into a namespace being deleted
    # are also 403 "forbidden", but no permission is missing there.
    denied = [line for line in logs.splitlines() if re.search(r'forbidden: User "[^"]*" cannot', line)]
    assert denied == []


def test_daemonset_manifest_is_accepted_and_minimal(dp: DataplaneEnv) -> None:
    manifest = Path(__file__).parents[2] / "examples" / "deploy" / "forwarder-daemonset.yaml"
    docs = list(yaml.safe_load_all(manifest.read_text()))
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert pod["hostNetwork"] is True and security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert container["args"][0] == "forwarder"
    # a read-only root filesystem, so the BGP speaker's working directory needs a volume of its own
    assert security["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    created = client.AppsV1Api(dp.kube.api).create_namespaced_daemon_set("lbctl-system", daemonset, dry_run="All")
    assert created.metadata.name == "lbctl-forwarder"


# -- IPv6 and dual-stack ------------------------------------------------------------------------
SINGLE_V6: dict[str, Any] = {"ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack"}
DUAL: dict[str, Any] = {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}


def service6_with(dp: DataplaneEnv, namespace: str, name: str, pods: list[Pod], ports: list[dict[str, Any]],
                  **spec: Any) -> str:
    """An IPv6-only Service; its VIP once every node's rules carry every pod's IPv6 address."""
    selector = {"app": pods[0].name.split("-")[0]} if pods else {"app": name}
    dp.kube.create_service(namespace, name, selector, ports, **SINGLE_V6, **spec)
    vip = dp.kube.wait_external_ip(namespace, name)
    assert ":" in vip, vip
    dp.wait_endpoints(namespace, name, {p.address6 for p in pods})
    dp.wait_rules(present={vip})
    if spec.get("externalTrafficPolicy") == "Local":
        for pod in pods:
            dp.wait_rules(present={pod.address6}, nodes=(pod.node,))
    else:
        dp.wait_rules(present={p.address6 for p in pods})
    return vip


def test_ipv6_tcp_and_udp_reach_pods_through_the_vip_and_node_ports(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", node) for node in NODES]
    vip = service6_with(dp, ns, "web", pods, [HTTP, DNS])
    client_ns = dp.clients[0]

    wait_for(lambda: try_ask(client_ns, vip, 80), 20, f"an HTTP answer through [{vip}]")
    answers = [ask(client_ns, vip, 80) for _ in range(60)]
    assert {name for name, _ in answers} == {p.name for p in pods}  # random spread reaches every pod
    assert all(":" in peer and dp.node_of(peer) in NODES for _, peer in answers)  # masqueraded by a node

    sock = udp_socket(client_ns, socket.AF_INET6)
    try:
        reply = wait_for(lambda: udp_ask(sock, vip, 53), 10, f"a UDP answer through [{vip}]")
        assert reply[0] in {p.name for p in pods}
    finally:
        sock.close()

    http_np, dns_np = node_port(dp, ns, "web", "http"), node_port(dp, ns, "web", "dns")
    for index in NODES:
        node6 = dp.lab.node6_address(index)
        assert ask(client_ns, node6, http_np)[0] in {p.name for p in pods}
        sock = udp_socket(client_ns, socket.AF_INET6)
        try:
            assert (udp_ask(sock, node6, dns_np) or ("",))[0] in {p.name for p in pods}
        finally:
            sock.close()
        # the IPv4 NodePort of an IPv6-only Service is not served
        assert try_ask(client_ns, dp.lab.node_address(index), http_np) is None

    dp.kube.core.delete_namespaced_service("web", ns)
    dp.wait_rules(absent={vip})
    assert f"/{ns}/web/" not in "".join(dp.nft_table(i) for i in NODES)


def test_a_dual_stack_service_forwards_on_both_addresses_and_both_node_port_families(
        dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", node) for node in (1, 2)]
    dp.kube.create_service(ns, "web", {"app": "web"}, [HTTP, DNS], **DUAL)
    v4, v6 = wait_for(lambda: (ips if len(ips := dp.kube.external_ips(ns, "web")) == 2 else None), 30,
                      "two ingress addresses")
    assert "." in v4 and ":" in v6
    dp.wait_endpoints(ns, "web", {p.address for p in pods} | {p.address6 for p in pods})
    dp.wait_rules(present={v4, v6} | {p.address for p in pods} | {p.address6 for p in pods})
    client_ns = dp.clients[0]
    names = {p.name for p in pods}
    for vip in (v4, v6):
        wait_for(lambda vip=vip: try_ask(client_ns, vip, 80), 20, f"an HTTP answer through {vip}")
        answers = [ask(client_ns, vip, 80) for _ in range(40)]
        assert {name for name, _ in answers} == names
        # each family reaches the pods over its own family
        assert all((":" in peer) == (":" in vip) for _, peer in answers), answers
        sock = udp_socket(client_ns, socket.AF_INET6 if ":" in vip else socket.AF_INET)
        try:
            assert wait_for(lambda vip=vip, sock=sock: udp_ask(sock, vip, 53), 10,
                            f"a UDP answer through {vip}")[0] in names
        finally:
            sock.close()
    http_np = node_port(dp, ns, "web", "http")
    assert ask(client_ns, dp.lab.node_address(3), http_np)[0] in names
    assert ask(client_ns, dp.lab.node6_address(3), http_np)[0] in names


def test_ipv6_local_traffic_policy_keeps_the_client_address(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", 2)]
    vip = service6_with(dp, ns, "web", pods, [HTTP], externalTrafficPolicy="Local")
    client_ns, client6 = dp.clients[0], dp.lab.client6_address(0)
    wait_for(lambda: dp.owner(ns, "web") == "node-2", 15, "node-2 announcing")
    name, peer = wait_for(lambda: try_ask(client_ns, vip, 80), 20, f"an answer through [{vip}]")
    assert (name, peer) == (pods[0].name, client6)  # the pod saw the client's own IPv6 address

    http_np = node_port(dp, ns, "web", "http")
    assert ask(client_ns, dp.lab.node6_address(2), http_np) == (pods[0].name, client6)
    assert try_ask(client_ns, dp.lab.node6_address(1), http_np) is None  # no local endpoint: dropped

    # the health-check NodePort answers over IPv6 as well
    health_port = int(dp.kube.service(ns, "web")["spec"]["healthCheckNodePort"])
    status, body = wait_for(lambda: _status(dp, dp.lab.node6_address(2), health_port), 10, "a health answer")
    assert (status, body["localEndpoints"]) == (200, 1)
    status, body = wait_for(lambda: _status(dp, dp.lab.node6_address(1), health_port), 10, "a health answer")
    assert (status, body["localEndpoints"]) == (503, 0)


def test_ipv6_source_ranges_admit_only_the_listed_clients(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", 2)]
    # dual-stack, with an IPv6 range only: IPv4 admits no one at all (fails closed)
    dp.kube.create_service(ns, "web", {"app": "web"}, [HTTP], **DUAL,
                           loadBalancerSourceRanges=[f"{dp.lab.client6_address(0)}/128"])
    v4, v6 = wait_for(lambda: (ips if len(ips := dp.kube.external_ips(ns, "web")) == 2 else None), 30,
                      "two ingress addresses")
    dp.wait_rules(present={v4, v6, pods[0].address, pods[0].address6})
    allowed, denied = dp.clients
    wait_for(lambda: try_ask(allowed, v6, 80), 20, f"an answer through [{v6}] for {allowed}")
    assert try_ask(denied, v6, 80) is None
    assert try_ask(allowed, v4, 80) is None and try_ask(denied, v4, 80) is None
    # NodePorts are not covered by loadBalancerSourceRanges
    assert ask(denied, dp.lab.node6_address(1), node_port(dp, ns, "web", "http"))[0] == pods[0].name


def test_ipv6_client_ip_affinity_sticks_to_one_pod(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "web", node) for node in NODES]
    vip = service6_with(dp, ns, "web", pods, [HTTP], sessionAffinity="ClientIP")
    wait_for(lambda: try_ask(dp.clients[0], vip, 80), 20, f"an answer through [{vip}]")
    assert len({ask(dp.clients[0], vip, 80)[0] for _ in range(30)}) == 1
    assert len({ask(dp.clients[1], vip, 80)[0] for _ in range(30)}) == 1


def test_ipv6_udp_flows_move_off_a_removed_endpoint(dp: DataplaneEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pods = [dp.add_pod(ns, "dns", 1), dp.add_pod(ns, "dns", 3)]
    vip = service6_with(dp, ns, "dns", pods, [DNS])
    sock = udp_socket(dp.clients[0], socket.AF_INET6)
    try:
        first = wait_for(lambda: udp_ask(sock, vip, 53), 20, f"a UDP answer through [{vip}]")[0]
        assert all((udp_ask(sock, vip, 53) or ("",))[0] == first for _ in range(5))
        leaving = next(p for p in pods if p.name == first)
        dp.kube.set_pod_ready(ns, leaving.name, False)  # its server keeps answering
        dp.wait_rules(absent={leaving.address6})
        after = wait_for(lambda: udp_ask(sock, vip, 53), 10, "a UDP answer after the endpoint left")[0]
        assert after != first
    finally:
        sock.close()
