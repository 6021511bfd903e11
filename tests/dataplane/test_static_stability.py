"""Static stability with real faults: the apiserver killed or frozen for 30 s, forwarders stopped,
killed and restarted, a forwarder started while the apiserver is away. Throughout, a client in
its own namespace asks through the VIP every 100 ms with its ARP entry for the VIP flushed before
each request (so every request needs a node to answer ARP), and every node's interfaces are read
every 100 ms to see who holds the VIP."""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lbctl.dev import faults
from lbctl.lab.kube import holds_for, wait_for
from lbctl.lab.probes import VipWatch, exchange_all, open_flows
from lbctl.lab.server import parse_answer
from tests.dataplane.harness import NODES, RESTART_GRACE_S, DataplaneEnv

pytestmark = pytest.mark.dataplane

HTTP = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
ECHO = {"name": "echo", "protocol": "TCP", "port": 7000, "targetPort": 9000}
OUTAGE_S = 30.0
# what a forwarder decides VIP ownership from: after an outage, each must be watching again
STATE_REFLECTORS = ("services", "endpointslices", "nodes")


def watch_vip(dp: DataplaneEnv, vip: str, answered_by: Callable[[str], int]) -> VipWatch:
    return VipWatch(dp.clients[0], vip, dp.lab.nodes, answered_by)


def masqueraded_node(dp: DataplaneEnv) -> Callable[[str], int]:
    """ETP=Cluster: the pod sees the forwarding node's address."""
    return lambda body: dp.node_of(parse_answer(body)[1])


def node_server_name(body: str) -> int:
    """Announce mode in the lab: a server on each node itself (standing in for kube-proxy's path)."""
    return int(parse_answer(body)[0].rsplit("-", 1)[1])


def baseline(watch: VipWatch) -> None:
    """A few answers through the VIP before the fault, so the watch is known to work."""
    wait_for(lambda: len(watch.answers) >= 5, 15, "five answers through the VIP before the fault", interval=0.1)


def forwarder_log(dp: DataplaneEnv, index: int) -> Path:
    return dp.workdir / f"forwarder-node-{index}.log"


def reconnected(dp: DataplaneEnv, index: int, log_from: int, back_at: dt.datetime) -> bool:
    """node-`index`'s forwarder reaches the apiserver again after an outage: each reflector of its
    state that failed meanwhile (its log since `log_from`) is watching again, and it has renewed
    its node Lease since `back_at`."""
    text = forwarder_log(dp, index).read_bytes()[log_from:].decode(errors="replace")
    for name in STATE_REFLECTORS:
        failed = max(text.rfind(f" {name}: watch failed"), text.rfind(f" {name}: list failed"))
        if failed > text.rfind(f" {name}: watching again"):
            return False
    lease = client.CoordinationV1Api(dp.kube.api).read_namespaced_lease(f"lbctl-forwarder-node-{index}",
                                                                         "lbctl-system")
    return lease.spec.renew_time is not None and lease.spec.renew_time > back_at


def setup_service(dp: DataplaneEnv, ns: str, ports: list[dict[str, object]] | None = None,
                  mode: str = "full") -> tuple[str, int]:
    pods = [dp.add_pod(ns, "web", node) for node in NODES]
    dp.kube.create_service(ns, "web", {"app": "web"}, ports or [HTTP])
    vip = dp.kube.wait_external_ip(ns, "web")
    if mode == "full":
        dp.wait_rules(present={vip, *(p.address for p in pods)})
    owner = int(wait_for(lambda: dp.owner(ns, "web"), 15, "an announcing node").rsplit("-", 1)[1])
    wait_for(lambda: dp.holders(vip) == {owner}, 10, f"{vip} on node-{owner} only")
    return vip, owner


@contextlib.contextmanager
def announce_mode(dp: DataplaneEnv) -> Iterator[None]:
    """Forwarders in announce mode, and a server on each node answering on port 80 with its name."""
    servers = [dp.lab.start(dp.lab.nodes[i], [sys.executable, "-m", "lbctl.lab.server", "--name", f"node-{i}",
                                               "--tcp", "80"], f"node-server-{i}.log") for i in NODES]
    try:
        for index in NODES:
            dp.stop_forwarder(index)
            dp.start_forwarder(index, mode="announce")
        for index in NODES:
            wait_for(lambda i=index: (s := dp.forwarder_status(i)) is not None and s[0] == 200, 30,  # type: ignore[misc]
                     f"node-{index}'s forwarder serving")
        yield
    finally:
        for server in servers:
            dp.lab.stop(server)
        dp.ensure_forwarders()  # back to full mode


def apiserver_ready(dp: DataplaneEnv) -> bool:
    try:
        dp.kube.core.list_namespace(limit=1, _request_timeout=2)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def apiserver_away(dp: DataplaneEnv, fault: str) -> Iterator[None]:
    """The apiserver killed (and started again with its own command line over the same etcd) or
    frozen with SIGSTOP (and thawed); restored also when the test fails."""
    argv: list[str] | None = None
    try:
        if fault == "kill":
            argv = faults.kill(dp.cp_dir, "kube-apiserver")
        else:
            faults.freeze(dp.cp_dir, "kube-apiserver")
        yield
    finally:
        if argv is not None:
            faults.start_again(dp.cp_dir, "kube-apiserver", argv)
        else:
            faults.thaw(dp.cp_dir, "kube-apiserver")
        wait_for(lambda: apiserver_ready(dp), 60, "the apiserver back", interval=0.2)
        controllers_working(dp)


def controllers_working(dp: DataplaneEnv) -> None:
    """After an outage the controller-manager's informers re-list on their own backoff (up to
    30 s): until they have, a new namespace gets no ServiceAccount and new pods no EndpointSlice.
    The next test must not start before that."""
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    dp.kube.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": probe}})
    try:
        def has_account() -> bool:
            try:
                dp.kube.core.read_namespaced_service_account("default", probe)
                return True
            except ApiException:
                return False
        wait_for(has_account, 120, "the controller-manager working again (a new namespace's ServiceAccount)")
    finally:
        dp.kube.delete_namespace(probe)


@pytest.mark.parametrize("fault", ["kill", "freeze"])
@pytest.mark.parametrize("mode", ["full", "announce"])
def test_an_apiserver_outage_moves_nothing_and_drops_nothing(dp: DataplaneEnv, k8s_namespace: str, mode: str,
                                                              fault: str) -> None:
    with announce_mode(dp) if mode == "announce" else contextlib.nullcontext():
        vip, owner = setup_service(dp, k8s_namespace, mode=mode)
        answered_by = node_server_name if mode == "announce" else masqueraded_node(dp)
        with watch_vip(dp, vip, answered_by) as watch:
            baseline(watch)
            logs = {i: forwarder_log(dp, i).stat().st_size for i in NODES}
            with apiserver_away(dp, fault):
                time.sleep(OUTAGE_S)  # the fault's length, not a wait for a condition
            back_at = dt.datetime.now(dt.UTC)
            back = len(watch.holder_samples)
            # the reconnect is when split brain used to happen: wait until every forwarder is
            # watching again, then hold (sampled) while their decisions on fresh state come in
            for index in NODES:
                wait_for(lambda i=index: reconnected(dp, i, logs[i], back_at), 60,  # type: ignore[misc]
                         f"node-{index}'s forwarder watching and renewing its Lease again", interval=0.2)
            reconnect_s = (dt.datetime.now(dt.UTC) - back_at).total_seconds()
            holds_for(lambda: dp.holders(vip) == {owner}, 3.0, f"{vip} on node-{owner} only after the reconnect")
        print(f"\n{mode} mode, apiserver {fault}: {len(watch.answers)} answers, {len(watch.failures)} failures, "
              f"{len(watch.holder_samples)} holder samples ({back} before it was back), forwarders reconnected "
              f"{reconnect_s:.1f}s after, moves {watch.moves()}")
        assert watch.failures == []
        assert len(watch.answers) > OUTAGE_S * 5  # the client really kept asking
        assert watch.moves() == [frozenset({owner})], "the VIP moved or was held by two nodes"
        assert set(watch.answers) == {owner}


@pytest.mark.parametrize("how", ["sigterm", "kill-and-back-after-5s"])
def test_a_restarted_forwarder_keeps_its_vips_and_every_flow(dp: DataplaneEnv, k8s_namespace: str,
                                                             how: str) -> None:
    vip, owner = setup_service(dp, k8s_namespace, [HTTP, ECHO])
    node_port = next(p["nodePort"] for p in dp.kube.service(k8s_namespace, "web")["spec"]["ports"]
                     if p["name"] == "echo")
    targets = [(vip, 7000)] * 3 + [(dp.lab.node_address(owner), node_port)] * 3
    flows = open_flows(dp.clients[1], targets)
    try:
        assert exchange_all(flows, "hello") == []
        resets: list[str] = []
        log_from = forwarder_log(dp, owner).stat().st_size
        with watch_vip(dp, vip, masqueraded_node(dp)) as watch:
            baseline(watch)
            if how == "sigterm":
                dp.stop_forwarder(owner)
                dp.start_forwarder(owner)
            else:
                dp.kill_forwarder(owner)
                time.sleep(5.0)  # the fault: the forwarder stays away this long
                dp.start_forwarder(owner)
            wait_for(lambda: (s := dp.forwarder_status(owner)) is not None and s[0] == 200, 30,
                     f"node-{owner}'s forwarder serving again")
            # the flows are exercised until its first ownership decision (it logs that its announce
            # loop runs, which decides within one interval) and through a 2 s hold after it
            decided: float | None = None
            deadline = time.monotonic() + 30
            while decided is None or time.monotonic() < decided + 2.0:
                assert decided is not None or time.monotonic() < deadline, f"node-{owner}'s forwarder never decided"
                resets += exchange_all(flows, "still there")
                if decided is None and "running (" in forwarder_log(dp, owner).read_bytes()[log_from:].decode(
                        errors="replace"):
                    decided = time.monotonic()
                time.sleep(0.2)
        print(f"\nforwarder {how}: {len(watch.answers)} answers, {len(watch.failures)} failures, "
              f"moves {watch.moves()}, resets {resets}")
        assert resets == []
        assert watch.moves() == [frozenset({owner})], "the VIP moved"
        assert watch.failures == []
        status = dp.forwarder_status(owner)
        assert status is not None and vip in status[1]["vips"]
    finally:
        for flow in flows:
            flow.close()


def test_a_forwarder_started_without_the_apiserver_changes_nothing(dp: DataplaneEnv, k8s_namespace: str) -> None:
    """No state at all: it programs nothing, keeps what the kernel holds (the earlier run's rules
    and VIPs), says so on /healthz and in its log, and its peers leave its VIPs alone."""
    vip, owner = setup_service(dp, k8s_namespace)
    log_path = forwarder_log(dp, owner)
    dp.stop_forwarder(owner)
    with watch_vip(dp, vip, masqueraded_node(dp)) as watch:
        with apiserver_away(dp, "kill"):
            log_size = log_path.stat().st_size
            dp.start_forwarder(owner)
            status = wait_for(lambda: (s := dp.forwarder_status(owner)) is not None and s[0] == 503 and s, 20,
                              "a 503 from the forwarder without state")
            assert status[1]["state"] == "no-state" and "apiserver" in status[1]["message"]
            wait_for(lambda: "no state yet" in log_path.read_bytes()[log_size:].decode(errors="replace"), 20,
                     "the forwarder to say in its log that it has no state")
            time.sleep(RESTART_GRACE_S + 2)  # past the grace: the peers hear it, so nothing moves
        wait_for(lambda: (s := dp.forwarder_status(owner)) is not None and s[0] == 200, 30,
                 "state once the apiserver is back")
        # its first ownership decision follows its state once its peers are heard: it logs that its
        # announce loop runs, which decides within one interval; then a sampled hold
        wait_for(lambda: "running (" in log_path.read_bytes()[log_size:].decode(errors="replace"),
                 30, f"node-{owner}'s forwarder deciding VIP ownership", interval=0.2)
        holds_for(lambda: dp.holders(vip) == {owner}, 2.0, f"{vip} on node-{owner} only after its first decision")
    assert watch.failures == []
    assert watch.moves() == [frozenset({owner})]
    assert dp.holders(vip) == {owner}


def node_dies(dp: DataplaneEnv, index: int) -> None:
    """As a host dying does: its forwarder gone and its link to the LAN cut (restored by the
    k8s_namespace fixture)."""
    dp.kill_forwarder(index)
    dp.lab.set_link(index, up=False)


def peer_state(dp: DataplaneEnv, index: int, peer: int) -> str | None:
    status = dp.forwarder_status(index)
    if status is None:
        return None
    return next((p["state"] for p in status[1]["peers"] if p["node"] == f"node-{peer}"), None)


@pytest.mark.parametrize("dies", ["the-owner", "the-other-node"])
def test_a_sole_survivor_keeps_serving_without_the_apiserver_and_a_cut_off_node_still_lets_go(
        dp: DataplaneEnv, k8s_namespace: str, dies: str) -> None:
    """A 2-node cluster (the lab's third node has died first) loses the apiserver, then one of its
    two nodes: the node left hears no peer and no apiserver, but its link is up and the LAN witness
    (the bridge's address, --lan-probe) answers ping, so it keeps the VIP, or takes it over from the
    dead owner, and the client keeps getting answers. Then its own link is cut: now it is the one
    cut off, and it gives the VIP up (announce mode: each node answers with its own name)."""
    with announce_mode(dp):
        vip, owner = setup_service(dp, k8s_namespace, mode="announce")
        others = [index for index in NODES if index != owner]
        victim, survivor = (owner, others[0]) if dies == "the-owner" else (others[0], owner)
        third = others[1]
        node_dies(dp, third)
        wait_for(lambda: peer_state(dp, survivor, third) == "dead", 20, f"node-{third} dead to node-{survivor}")
        log_path = dp.workdir / f"forwarder-node-{survivor}.log"
        log_size = log_path.stat().st_size
        with watch_vip(dp, vip, node_server_name) as watch:
            wait_for(lambda: len(watch.answers) >= 5, 10, "answers through the VIP")
            with apiserver_away(dp, "kill"):
                wait_for(lambda: not apiserver_ready(dp), 10, "the apiserver gone")
                node_dies(dp, victim)
                wait_for(lambda: survivor in dp.holders(vip), 10, f"{vip} on node-{survivor}")
                # requests go one at a time: once one is answered by the survivor, every earlier failure is counted
                wait_for(lambda: bool(watch.answers) and watch.answers[-1] == survivor, 10,
                         "an answer from the survivor")
                failed_before, answered_before = len(watch.failures), len(watch.answers)
                wait_for(lambda: len(watch.answers) >= answered_before + 50, 30, "50 more answers")
                assert watch.failures[failed_before:] == [], "the survivor stopped answering"
                assert set(watch.answers[answered_before:]) == {survivor}
                status = dp.forwarder_status(survivor)
                assert status is not None and status[1]["alone"] == "peers-gone" and vip in status[1]["vips"]
                live = [sample - {victim, third} for sample in watch.holder_samples]
                assert all(len(sample) <= 1 for sample in live), "two live holders"
                if dies == "the-other-node":
                    assert watch.failures == [] and set(live) == {frozenset({owner})}, "the VIP moved"
                print(f"\nsole survivor ({dies} died): {len(watch.failures)} failures before the takeover, "
                      f"{len(watch.answers) - answered_before} answers from node-{survivor} after it")

                dp.lab.set_link(survivor, up=False)  # now the survivor is the one cut off
                wait_for(lambda: vip not in dp.vips_on(survivor), 10, f"node-{survivor} giving {vip} up")
        log = log_path.read_bytes()[log_size:].decode(errors="replace")
        assert "the peers are gone; this node keeps its VIPs" in log
        assert "this node is cut off; giving up" in log
