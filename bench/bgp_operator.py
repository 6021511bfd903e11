"""The operator's BGP pass: after any change (a session, an endpoint, a node, a Service) it
recomputes lbctl.io/bgp-announcing-nodes for every Service (lbctl.operator.bgp.desired_annotations)
and writes only the differences. This measures one such pass with nothing to write (the steady
state) and one where every Service changes (a session of every node went down at once).

Prints JSON: {"services": N, "nodes": M, "peers": P, "pass_ms_p50": …, "pass_ms_max": …,
"all_changed_ms": …}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from lbctl.model.bgp import Advertisement, Mode, parse_peer
from lbctl.model.scope import Scope
from lbctl.operator.bgp import desired_annotations, node_infos, ready_nodes_by_service
from providers.local_pools import parse_pool


def main(services: int, nodes: int, peers: int, rounds: int = 5) -> dict[str, Any]:
    pool = parse_pool({"metadata": {"name": "bgp"}, "spec": {"addresses": ["10.20.0.0/16"]}})
    pools = [(pool, Advertisement(mode=Mode.BGP))]
    node_objs = [{"metadata": {"name": f"n{i}", "labels": {"rack": f"r{i % 4}"}},
                  "status": {"conditions": [{"type": "Ready", "status": "True"}]}} for i in range(nodes)]
    infos = node_infos(node_objs)

    def peer_list(state: str) -> list[Any]:
        return [parse_peer({"metadata": {"name": f"tor{p}"}, "spec": {
            "peerAddress": f"192.0.2.{p + 1}", "peerASN": 64512, "myASN": 64513,
            "nodeSelector": {"matchLabels": {"rack": f"r{p % 4}"}}},
            "status": {"nodes": [{"node": f"n{i}", "state": state} for i in range(nodes)]}}) for p in range(peers)]

    up = peer_list("Established")
    slices = [{"metadata": {"namespace": "bench", "labels": {"kubernetes.io/service-name": f"s{i}"}},
               "endpoints": [{"nodeName": f"n{(i + k) % nodes}", "conditions": {"ready": True}} for k in range(3)]}
              for i in range(services)]
    ready = ready_nodes_by_service(slices)
    objs: list[dict[str, Any]] = []
    for i in range(services):
        service = {"metadata": {"name": f"s{i}", "namespace": "bench", "annotations": {}},
                   "spec": {"type": "LoadBalancer", "loadBalancerClass": "lbctl.io/local",
                            "externalTrafficPolicy": "Local" if i % 2 else "Cluster"},
                   "status": {"loadBalancer": {"ingress": [{"ip": f"10.20.{i // 256}.{i % 256}"}]}}}
        objs.append(service)
    scope = Scope("lbctl.io/local", False, frozenset())
    # what the annotations are once the operator has written them
    for key, (_, after) in desired_annotations(objs, scope, pools, up, infos, ready).items():
        name = key.split("/", 1)[1]
        objs[int(name[1:])]["metadata"]["annotations"]["lbctl.io/bgp-announcing-nodes"] = after
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        changes = desired_annotations(objs, scope, pools, up, infos, ready)
        samples.append((time.perf_counter() - start) * 1000)
        assert not changes
    start = time.perf_counter()
    changes = desired_annotations(objs, scope, pools, peer_list("Idle"), infos, ready)
    all_changed_ms = (time.perf_counter() - start) * 1000
    assert len(changes) == services
    return {"services": services, "nodes": nodes, "peers": peers, "pass_ms_p50": round(statistics.median(samples), 1),
            "pass_ms_max": round(max(samples), 1), "all_changed_ms": round(all_changed_ms, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--peers", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(main(args.services, args.nodes, args.peers)))
