"""Two operator replicas with leader election (local provider): one acts, the standby takes over
when the leader dies (kill -9) or stops (it hands the Lease back), and a leader cut off from the
apiserver stops acting before the standby can take over."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kubernetes import client, watch

from lbctl.dev.controlplane import free_port
from lbctl.dev.layout import ClusterInfo
from lbctl.lab.kube import holds_for
from lbctl.model.names import load_balancer_name
from tests.fakes.gce_server import GceFakeServer
from tests.integration.apicut import ApiCut
from tests.integration.harness import (
    Nodes,
    OperatorProcess,
    Pools,
    ingress_ips,
    lb_service,
    wait_for_ips,
    wait_until,
)
from tests.integration.test_operator_gce import GCE_CLASS, LB_COLLECTIONS, add_vm_node, operator_args, owned

LEASE = "ha-test"


def elect(namespace: str, *extra: str) -> list[str]:
    return ["--leader-elect", "--leader-elect-namespace", namespace, "--leader-elect-lease", LEASE, *extra]


def identity(operator: OperatorProcess) -> str:
    found = re.search(r"lbctl operator (\S+): provider", operator.log())
    assert found, operator.log()[-2000:]
    return found.group(1)


def log_time(operator: OperatorProcess, text: str) -> dt.datetime | None:
    """When the operator logged a line containing `text` (its log's own clock: this machine's)."""
    for line in operator.log().splitlines():
        if text in line:
            return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return None


def leader_metric(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        found = re.search(r"^lbctl_leader ([0-9.]+)$", response.read().decode(), re.M)
    assert found, "no lbctl_leader metric"
    return float(found.group(1))


def leads(operator: OperatorProcess) -> bool:
    return "now leads" in operator.log()


class IngressRecorder:
    """Watches the namespace's Services from a thread and records every change of each one's
    ingress addresses, with the time it was seen."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core = core
        self.namespace = namespace
        self.changes: dict[str, list[tuple[float, tuple[str, ...]]]] = defaultdict(list)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.core.list_namespaced_service, self.namespace,
                                           resource_version=version, timeout_seconds=2):
                    service = event["object"]
                    version = service.metadata.resource_version
                    name = service.metadata.name
                    ips = tuple(i.ip for i in (service.status.load_balancer.ingress or ()) if i.ip)
                    with self._lock:
                        history = self.changes[name]
                        if (history[-1][1] if history else ()) != ips:
                            history.append((time.monotonic(), ips))
                    if self._stop.is_set():
                        break
            except Exception:  # a relist from scratch is as good: changes are compared per Service
                version = ""
            finally:
                stream.stop()

    def snapshot(self) -> dict[str, list[tuple[float, tuple[str, ...]]]]:
        with self._lock:
            return {k: list(v) for k, v in self.changes.items()}

    def served_at(self, name: str) -> float | None:
        history = self.snapshot().get(name, [])
        return next((t for t, ips in history if ips), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def recorder(core: client.CoreV1Api, namespace: str) -> Iterator[IngressRecorder]:
    made = IngressRecorder(core, namespace)
    yield made
    made.stop()


def create_all(core: client.CoreV1Api, namespace: str, names: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: core.create_namespaced_service(namespace, lb_service(n)), names))


def test_two_replicas_one_leader_no_flaps_and_the_standby_finishes_a_burst_after_kill_9(
    core: client.CoreV1Api, namespace: str, pools: Pools, recorder: IngressRecorder,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    pools.create([pools.fresh_v4(24)], wait_seen=False)
    first = start_operator(*elect(namespace))
    wait_until(lambda: leads(first), what="the first replica leads")
    second = start_operator(*elect(namespace))
    assert "standing by:" in second.log()
    leader_id, standby_id = identity(first), identity(second)

    # a burst with both replicas up: only the leader acts
    names = [f"s{i:03d}" for i in range(200)]
    create_all(core, namespace, names[:100])
    wait_until(lambda: all(recorder.served_at(n) for n in names[:100]), timeout=60, what="the first 100 served")
    assert not leads(second)

    # kill -9 the leader in the middle of the next burst
    create_all(core, namespace, names[100:150])
    wait_until(lambda: sum(1 for n in names[100:150] if recorder.served_at(n)) >= 5, timeout=30,
               what="the second burst under way")
    first.kill()
    killed = time.monotonic()
    marker = core.list_namespaced_service(namespace, limit=1).metadata.resource_version
    create_all(core, namespace, names[150:])
    wait_until(lambda: all(recorder.served_at(n) for n in names), timeout=60, what="every Service served")
    takeover = min(t for t in (recorder.served_at(n) for n in names[150:]) if t is not None) - killed
    print(f"kill -9 of the leader -> first Service served by the standby: {takeover:.2f}s")
    assert takeover <= 10.0, f"the standby took {takeover:.1f}s to serve (target 5 s)"
    assert leads(second)

    # the killed replica comes back, as its Deployment would restart it: a standby again
    restarted = start_operator(*elect(namespace))
    assert "standing by:" in restarted.log()
    settled = time.monotonic()
    # a 20 s hold, the observation window itself: any flap in it is what the test looks for (checked
    # at every sample, and in detail below)
    holds_for(lambda: all(len(h) == 1 for h in recorder.snapshot().values()), 20,
              "every Service's address as first served", interval=0.5)
    changes = recorder.snapshot()
    flapping = {n: h for n, h in changes.items() if len(h) != 1}
    assert not flapping, f"Services whose addresses changed more than once: {dict(list(flapping.items())[:5])}"
    assert not [n for n, h in changes.items() if h[-1][0] > settled], "a status changed after settling"
    addresses = [ingress_ips(core, namespace, n) for n in names]
    assert all(len(a) == 1 for a in addresses), "every Service has exactly one address"
    assert len({a[0] for a in addresses}) == len(names), "no address handed out twice"

    # Events: the leader's before the kill, the standby's only after it, none from the restarted one
    # only lbctl's: the apiserver's own controllers (e.g. ipallocator-repair) may post here too
    found = [e for e in core.list_namespaced_event(namespace).items
             if (e.reporting_component or (e.source.component if e.source else "")) == "lbctl"]
    by_instance: dict[str, list[int]] = defaultdict(list)
    for event in found:
        by_instance[event.reporting_instance or ""].append(int(event.metadata.resource_version))
    assert set(by_instance) <= {leader_id, standby_id}, f"Events from {set(by_instance)}"
    assert by_instance[leader_id] and by_instance[standby_id]
    assert min(by_instance[standby_id]) > int(marker), "the standby posted Events before the leader died"
    assert identity(restarted) not in by_instance


def test_a_clean_stop_hands_the_lease_over_at_once(
    core: client.CoreV1Api, namespace: str, pools: Pools, api_client: client.ApiClient,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    # a long lease: a standby that had to wait for it to expire would take 30 s
    timings = ("--leader-elect-lease-duration", "30", "--leader-elect-renew-deadline", "20")
    pools.create([pools.fresh_v4(28)], wait_seen=False)
    ports = [free_port(), free_port()]
    first = start_operator(*elect(namespace, *timings, "--metrics-port", str(ports[0])))
    wait_until(lambda: leads(first), what="the first replica leads")
    second = start_operator(*elect(namespace, *timings, "--metrics-port", str(ports[1])))
    assert (leader_metric(ports[0]), leader_metric(ports[1])) == (1.0, 0.0)
    first.stop()
    stopped = time.monotonic()
    assert "released lease" in first.log()
    wait_until(lambda: leads(second), timeout=10, what="the standby leads")
    print(f"clean stop -> standby leads: {time.monotonic() - stopped:.2f}s")
    core.create_namespaced_service(namespace, lb_service("after"))
    wait_for_ips(core, namespace, "after")
    assert leader_metric(ports[1]) == 1.0
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease(LEASE, namespace)
    assert lease.spec.holder_identity == identity(second)
    assert lease.spec.lease_transitions == 1


def test_a_leader_cut_off_from_the_apiserver_stops_acting_before_the_standby_takes_over(
    core: client.CoreV1Api, namespace: str, pools: Pools, cluster: ClusterInfo, tmp_path: Path,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    pools.create([pools.fresh_v4(26)], wait_seen=False)
    with ApiCut(cluster.server) as cut:
        relayed = cut.kubeconfig(cluster.kubeconfig, tmp_path / "relay.kubeconfig")
        first = start_operator(*elect(namespace), env={"KUBECONFIG": relayed})
        wait_until(lambda: leads(first), what="the first replica leads")
        second = start_operator(*elect(namespace))
        names = [f"m{i:02d}" for i in range(40)]
        create_all(core, namespace, names[:20])
        cut.cut()  # mid-sync, possibly
        wait_until(lambda: not first.alive(), timeout=10, what="the cut-off leader stops")
        create_all(core, namespace, names[20:])
        wait_until(lambda: leads(second), timeout=15, what="the standby leads")
        for name in names:
            wait_for_ips(core, namespace, name, timeout=30)
    lost, took_over = log_time(first, "lost lease"), log_time(second, "now leads")
    assert lost is not None and took_over is not None
    print(f"old leader stopped {(took_over - lost).total_seconds():.2f}s before the standby took over")
    assert lost < took_over
    addresses = [ingress_ips(core, namespace, n)[0] for n in names]
    assert len(set(addresses)) == len(names)


def test_a_balancer_left_behind_while_a_replica_stood_by_is_swept_after_it_takes_over(
    core: client.CoreV1Api, namespace: str, nodes: Nodes, start_operator: Callable[..., OperatorProcess],
) -> None:
    """The leader dies; before the standby takes over, a Service's finalizer is removed by hand and
    the Service deleted. Nobody released its balancer: the new leader's first orphan sweep (soon
    after taking over, not after --gc-interval) does."""
    with GceFakeServer() as gce:
        add_vm_node(gce, nodes, "ha-0")
        args = [*operator_args(gce), *elect(namespace)]
        first = start_operator(*args)
        wait_until(lambda: leads(first), what="the first replica leads")
        second = start_operator(*args)
        core.create_namespaced_service(namespace, lb_service("doomed", [80], lb_class=GCE_CLASS))
        wait_for_ips(core, namespace, "doomed", timeout=30)
        lb = load_balancer_name(str(core.read_namespaced_service("doomed", namespace).metadata.uid))
        assert any(owned(gce, lb).values())
        first.kill()
        core.patch_namespaced_service("doomed", namespace, {"metadata": {"finalizers": None}})
        core.delete_namespaced_service("doomed", namespace)
        assert not leads(second), "the standby took over too early for this test to mean anything"
        wait_until(lambda: leads(second), timeout=15, what="the standby leads")
        wait_until(lambda: owned(gce, lb) == {k: [] for k in LB_COLLECTIONS}, timeout=30,
                   what="the orphaned balancer swept")
        for operator in (first, second):
            operator.stop()  # before the fake goes away
