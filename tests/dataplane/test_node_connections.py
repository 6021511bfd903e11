"""The node's own connections against the forwarder's table, in the kernel: a connection the node
made before the table turned conntrack on in its namespace (the forwarder's own apiserver
watches at start-up, the kubelet's) keeps working when its local port is also a NodePort. The
first packet conntrack sees of it is mid-stream, so conntrack picks it up as a new connection
towards that port: the NodePort must not DNAT it. Found as a forwarder whose watches went silent
after its first sync, in one start in four (bench/forwarder_process.py: NodePorts up to 39999,
ephemeral ports from 32768)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from lbctl.forwarder.render import Planner
from lbctl.forwarder.state import Backend, ServicePort, ServiceState
from lbctl.lab.netns import Lab, call_in
from tests.dataplane.harness import require_root_tools
from tests.dataplane.test_forwarder_nft import nft_in

pytestmark = pytest.mark.dataplane

NODE_PORT = 38080  # in the node's ephemeral range (32768-60999), as a wide NodePort range may have it
PEER_PORT = 6443


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root_tools()
    lab = Lab(prefix=f"lbxc{uuid.uuid4().hex[:3]}")
    try:
        lab.add_bridge()
        lab.add_node(1)
        lab.add_client(0)
        yield lab
    finally:
        assert lab.close() == []


def test_a_connection_older_than_the_table_is_not_taken_for_a_nodeport(lab: Lab) -> None:
    node, peer = lab.nodes[1], lab.name("client-0")
    server = call_in(peer, lambda: socket.create_server((lab.client_address(0), PEER_PORT)))
    client = call_in(node, lambda: socket.create_connection((lab.client_address(0), PEER_PORT), timeout=5,
                                                            source_address=(lab.node_address(1), NODE_PORT)))
    with server, client:
        served, _ = server.accept()
        with served:
            served.settimeout(5)
            client.sendall(b"hello")
            assert served.recv(16) == b"hello"
            # the precondition that makes this test mean something: conntrack has not seen it
            seen = Lab.run_in(node, "conntrack", "-L", "-p", "tcp", "--dport", str(PEER_PORT), check=False)
            assert str(NODE_PORT) not in seen.stdout, seen.stdout

            web = ServiceState(key="default/web", uid="u1", created="2024-01-01T00:00:00Z",
                               ports=(ServicePort("http", "tcp", 80, NODE_PORT,
                                                  (Backend("198.19.1.7", 8080, "a"),
                                                   Backend("198.19.1.8", 8080, "a"))),))
            nft_in(node).apply(Planner().plan_full([web], replace=True).transaction)

            served.sendall(b"after the table")  # conntrack's first packet of it: peer → node:NODE_PORT
            assert client.recv(32) == b"after the table"
            client.sendall(b"and back")
            assert served.recv(16) == b"and back"
