"""`--mode announce` (kube-proxy carries the traffic): the forwarder owns VIPs — VIP/32, ARP, the
annotation — and never touches nftables; a table an earlier full-mode run left is removed. A
stopped forwarder leaves its VIP for the next run; `--cleanup` removes it, and the node's Lease."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kubernetes import client

from lbctl.lab.kube import wait_for
from tests.dataplane.harness import DataplaneEnv

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}


def test_announce_mode_owns_the_vip_without_nftables(dp: DataplaneEnv, k8s_namespace: str) -> None:
    node_ns = dp.lab.add_node(4)
    dp.kube.create_node("node-4", dp.lab.node_address(4))
    dp.lab.run_in(node_ns, "nft", "add", "table", "ip", "lbctl")  # as if a full-mode run had been here
    forwarder = dp.lab.start(node_ns, [sys.executable, "-m", "lbctl", "forwarder", "--node", "node-4", "--mode",
                                       "announce", "--kubeconfig", dp.node_kubeconfig], "forwarder-node-4.log")
    try:
        pod = dp.add_pod(k8s_namespace, "web", 4)
        # ETP=Local with its only endpoint on node-4: node-4 is the only eligible owner
        dp.kube.create_service(k8s_namespace, "web", {"app": "web"}, [HTTP], externalTrafficPolicy="Local")
        vip = dp.kube.wait_external_ip(k8s_namespace, "web")
        dp.wait_endpoints(k8s_namespace, "web", {pod.address})
        wait_for(lambda: dp.owner(k8s_namespace, "web") == "node-4", 20, "node-4 announcing")
        assert vip in dp.vips_on(4)
        listing = subprocess.run(["ip", "netns", "exec", node_ns, "nft", "list", "ruleset"], capture_output=True,
                                 text=True, check=True).stdout
        assert "lbctl" not in listing
        assert forwarder.poll() is None
        dp.lab.stop(forwarder)  # SIGTERM: the VIP stays for the next run to adopt
        assert vip in dp.vips_on(4)
        # the node stops running a forwarder for good: --cleanup takes away what it left
        cleanup = dp.lab.run_in(node_ns, sys.executable, "-m", "lbctl", "forwarder", "--node", "node-4",
                                "--kubeconfig", dp.node_kubeconfig, "--cleanup", check=False)
        assert cleanup.returncode == 0, cleanup.stderr
        assert vip not in dp.vips_on(4)
        coordination = client.CoordinationV1Api(dp.kube.api)
        assert "lbctl-forwarder-node-4" not in {
            lease.metadata.name for lease in coordination.list_namespaced_lease("lbctl-system").items}
    finally:
        dp.lab.stop(forwarder)
        dp.kube.core.delete_node("node-4")
