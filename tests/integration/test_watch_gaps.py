"""No ghosts after a watch gap: what is deleted while the operator's watches are down (long enough
that resuming them gets `410 Gone`) is treated as deleted once it is back.

These tests run on a control plane of their own whose apiserver keeps almost no watch history
(`--watch-cache=false --etcd-compaction-interval=2s`), so a few seconds of churn make an old
resourceVersion unservable. The operator reaches the apiserver through a relay the test can cut:
SIGSTOP the operator, cut its connections, churn Nodes until a watch from the old
resourceVersion is refused with 410 (probed by the test itself), change things, restore, SIGCONT.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from lbctl.dev import controlplane
from lbctl.dev.layout import ClusterInfo
from lbctl.kube.client import KubeClient
from lbctl.kube.reflector import Reflector
from lbctl.model.names import load_balancer_name
from lbctl.model.scope import FINALIZER
from tests.fakes.aws_world import AwsWorld, build_world, moto_server
from tests.fakes.gce_server import GceFakeServer
from tests.integration.apicut import ApiCut
from tests.integration.harness import (
    POOL_CRD,
    Nodes,
    OperatorProcess,
    Pools,
    ingress_ips,
    lb_service,
    wait_for_ips,
    wait_until,
)
from tests.integration.test_operator_gce import (
    GCE_CLASS,
    LB_COLLECTIONS,
    add_vm_node,
    operator_args,
    owned,
    pool_members,
)

APISERVER_FLAGS = ("--watch-cache=false", "--etcd-compaction-interval=2s")
RESUMED_WITHIN_S = 10.0


# ---- a control plane with a short watch history (overrides the session's) ----------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    directory = tmp_path_factory.mktemp("short-history-cp")
    info = controlplane.up(directory, apiserver_flags=APISERVER_FLAGS)
    try:
        yield info
    finally:
        controlplane.down(directory)


@pytest.fixture(scope="module")
def api_client(cluster: ClusterInfo) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=cluster.kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="module")
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture(scope="module")
def pool_crd(api_client: client.ApiClient) -> None:
    extensions = client.ApiextensionsV1Api(api_client)
    body = yaml.safe_load(POOL_CRD.read_text())
    extensions.create_custom_resource_definition(body)
    wait_until(lambda: any(c.type == "Established" and c.status == "True" for c in
                           extensions.read_custom_resource_definition(body["metadata"]["name"]).status.conditions
                           or ()), what="CRD established")


@pytest.fixture
def cut(cluster: ClusterInfo) -> Iterator[ApiCut]:
    with ApiCut(cluster.server) as relay:
        yield relay


@pytest.fixture
def start_cut_operator(start_operator: Callable[..., OperatorProcess], cut: ApiCut, cluster: ClusterInfo,
                       tmp_path: Path) -> Callable[..., OperatorProcess]:
    def start(*args: str) -> OperatorProcess:
        kubeconfig = cut.kubeconfig(cluster.kubeconfig, tmp_path / "through-relay.kubeconfig")
        return start_operator(*args, env={"KUBECONFIG": kubeconfig})

    return start


# ---- the gap ------------------------------------------------------------------------------------------

def _list_version(api_client: client.ApiClient, kind: str) -> str:
    if kind == "nodes":
        return str(client.CoreV1Api(api_client).list_node(limit=1).metadata.resource_version)
    listed = client.CustomObjectsApi(api_client).list_cluster_custom_object("lbctl.io", "v1alpha1", kind, limit=1)
    return str(listed["metadata"]["resourceVersion"])


def _gone_probe(api_client: client.ApiClient, kind: str, resource_version: str) -> bool:
    """Does a watch from `resource_version` get 410 Gone (as HTTP status or as an ERROR event)?"""
    options = {"watch": True, "resource_version": resource_version, "timeout_seconds": 1,
               "_preload_content": False, "_request_timeout": 10}
    try:
        if kind == "nodes":
            response = client.CoreV1Api(api_client).list_node(**options)
        else:
            response = client.CustomObjectsApi(api_client).list_cluster_custom_object(
                "lbctl.io", "v1alpha1", kind, **options)
    except ApiException as exc:
        return exc.status == 410
    try:
        events = response.read()  # the stream ends after timeout_seconds, or at once after an ERROR
    finally:
        response.close()
    return b'"code":410' in events.replace(b" ", b"")


def watch_gap(operator: OperatorProcess, cut: ApiCut, api_client: client.ApiClient, nodes: Nodes, kind: str,
              in_the_gap: Callable[[], None]) -> float:
    """Stop the operator, cut it off, churn until a watch of `kind` from before the stop is
    refused with 410, run `in_the_gap`, let the operator back. Returns when it was resumed."""
    core = client.CoreV1Api(api_client)
    operator.pause()
    cut.cut()
    old_version = _list_version(api_client, kind)  # no later than anything the operator saw
    scratch = f"churn-{int(time.monotonic() * 1000) % 100000}"
    nodes.create(scratch, ready=False)  # not eligible: its churn changes no balancer
    deadline = time.monotonic() + 90
    counter = 0
    while not _gone_probe(api_client, kind, old_version):
        assert time.monotonic() < deadline, f"a watch of {kind} from {old_version} was never refused with 410"
        for _ in range(20):
            counter += 1
            core.patch_node(scratch, {"metadata": {"labels": {"churn": str(counter)}}})
    print(f"a watch of {kind} from {old_version} got 410 after {counter} Node updates")
    in_the_gap()
    cut.restore()
    operator.resume()
    return time.monotonic()


def assert_the_410_path_ran(log: str, reflector: str) -> None:
    """The operator's `reflector` was refused with 410 on resume, then re-listed and reported at least one
    object of the gap as deleted: the convergence came from the re-list, not from a DELETED it happened to see."""
    gone = re.search(rf"{reflector}: resource version \S+ is gone \(410\): relisting", log)
    assert gone, f"no 410 for {reflector} in the operator log"
    relisted = re.search(rf"{reflector}: relisted \d+ objects: \d+ changed while unwatched, (\d+) of them deleted",
                         log[gone.end():])
    assert relisted and int(relisted.group(1)) >= 1, f"no re-list of {reflector} deleting what vanished after the 410"


# ---- the tests ----------------------------------------------------------------------------------------

@pytest.fixture
def gce() -> Iterator[GceFakeServer]:
    with GceFakeServer() as fake:
        yield fake


def test_gce_a_node_and_a_service_deleted_in_a_gap_leave_the_cloud(
    api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, nodes: Nodes, gce: GceFakeServer,
    cut: ApiCut, start_cut_operator: Callable[..., OperatorProcess],
) -> None:
    for name in ("gg-0", "gg-1"):
        add_vm_node(gce, nodes, name)
    operator = start_cut_operator(*operator_args(gce))
    for name in ("web", "doomed"):
        core.create_namespaced_service(namespace, lb_service(name, [80], lb_class=GCE_CLASS))
        wait_for_ips(core, namespace, name, timeout=30)
    web, doomed = (load_balancer_name(str(core.read_namespaced_service(n, namespace).metadata.uid))
                   for n in ("web", "doomed"))
    assert pool_members(gce, web) == ["gg-0", "gg-1"]
    assert any(owned(gce, doomed).values())

    def in_the_gap() -> None:
        nodes.delete("gg-1")
        # its finalizer removed by hand, then deleted: only a re-list can tell the operator
        core.patch_namespaced_service("doomed", namespace, {"metadata": {"finalizers": None}})
        core.delete_namespaced_service("doomed", namespace)

    resumed = watch_gap(operator, cut, api_client, nodes, "nodes", in_the_gap)
    wait_until(lambda: pool_members(gce, web) == ["gg-0"], timeout=RESUMED_WITHIN_S,
               what="the node deleted in the gap out of the target pool")
    wait_until(lambda: owned(gce, doomed) == {k: [] for k in LB_COLLECTIONS}, timeout=RESUMED_WITHIN_S,
               what="every GCE resource of the Service deleted in the gap removed")
    print(f"converged {time.monotonic() - resumed:.2f}s after resuming")
    assert_the_410_path_ran(operator.log(), "nodes")


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


def test_aws_a_node_deleted_in_a_gap_leaves_every_target_group(
    api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, nodes: Nodes, moto_url: str,
    cut: ApiCut, start_cut_operator: Callable[..., OperatorProcess],
) -> None:
    world: AwsWorld = build_world(moto_url, nodes=2)
    names = []
    for index in range(2):
        target = world.node(index)
        names.append(f"gap-{target.name}")
        nodes.create(names[-1], provider_id=target.provider_id)
    operator = start_cut_operator("--provider", "aws", "--cluster-name", world.cluster, "--region", world.region,
                                  "--aws-endpoint-url", world.url, "--provider-option", "state_cache_s=0")
    core.create_namespaced_service(namespace, lb_service("web", [80, 443], lb_class="lbctl.io/aws"))
    lb_name = wait_until(lambda: _aws_lb(core, namespace, "web", world), timeout=30, what="an NLB")
    groups = world.elbv2.describe_target_groups(LoadBalancerArn=lb_name)["TargetGroups"]
    both = sorted(instance for instance, _zone in world.instances)
    wait_until(lambda: all(_targets(world, g) == both for g in groups), what="both nodes registered")

    resumed = watch_gap(operator, cut, api_client, nodes, "nodes", lambda: nodes.delete(names[1]))
    left = [world.instances[0][0]]
    wait_until(lambda: all(_targets(world, g) == left for g in groups), timeout=RESUMED_WITHIN_S,
               what="the node deleted in the gap deregistered from every target group")
    print(f"converged {time.monotonic() - resumed:.2f}s after resuming")
    assert_the_410_path_ran(operator.log(), "nodes")


def _aws_lb(core: client.CoreV1Api, namespace: str, name: str, world: AwsWorld) -> str:
    service = core.read_namespaced_service(name, namespace)
    if not (service.status.load_balancer.ingress or []):
        return ""
    wanted = load_balancer_name(str(service.metadata.uid))
    found = [lb for lb in world.elbv2.describe_load_balancers()["LoadBalancers"] if lb["LoadBalancerName"] == wanted]
    return str(found[0]["LoadBalancerArn"]) if found else ""


def _targets(world: AwsWorld, group: dict[str, Any]) -> list[str]:
    health = world.elbv2.describe_target_health(TargetGroupArn=group["TargetGroupArn"])["TargetHealthDescriptions"]
    return sorted(t["Target"]["Id"] for t in health)


def test_a_pool_deleted_in_a_gap_stops_being_used(
    api_client: client.ApiClient, core: client.CoreV1Api, namespace: str, nodes: Nodes, pools: Pools,
    cut: ApiCut, start_cut_operator: Callable[..., OperatorProcess],
) -> None:
    operator = start_cut_operator()
    first = pools.create(["198.18.240.1/32"], priority=1)
    pools.create(["198.18.241.1/32"], priority=2)
    core.create_namespaced_service(namespace, lb_service("web"))
    assert wait_for_ips(core, namespace, "web") == ["198.18.240.1"]

    resumed = watch_gap(operator, cut, api_client, nodes, "loadbalancerpools",
                        lambda: pools.delete(first["metadata"]["name"]))
    wait_until(lambda: ingress_ips(core, namespace, "web") == ["198.18.241.1"], timeout=RESUMED_WITHIN_S,
               what="the Service moved off the pool deleted in the gap")
    print(f"converged {time.monotonic() - resumed:.2f}s after resuming")
    service = core.read_namespaced_service("web", namespace)
    assert service.metadata.finalizers == [FINALIZER]
    # this control plane has no BGPPeer CRD: the local provider works without it and says so
    assert "bgppeers.lbctl.io/v1alpha1 is not served" in operator.log() and "BGP off" in operator.log()


def test_the_reflector_keeps_its_cache_while_cut_off_and_a_relist_after_410_reports_deletions(
    api_client: client.ApiClient, core: client.CoreV1Api, cluster: ClusterInfo, nodes: Nodes, cut: ApiCut,
    tmp_path: Path,
) -> None:
    """The shared reflector itself (as operator and forwarder use it), in-process: while the
    apiserver cannot be reached it keeps what it knew and reports nothing; when it can again, its
    resumed watch is refused with 410 and the re-list reports what changed, deletions included."""
    for name in ("keep", "drop"):
        nodes.create(f"rf-{name}", ready=False)
    seen: list[tuple[str | None, str | None]] = []

    def changed(old: Any, new: Any) -> None:
        seen.append(((old or {}).get("metadata", {}).get("name"), (new or {}).get("metadata", {}).get("name")))

    async def scenario() -> None:
        kube = KubeClient.from_kubeconfig(cut.kubeconfig(cluster.kubeconfig, tmp_path / "relay.kubeconfig"))
        reflector = Reflector(kube, "/api/v1/nodes", changed, name="nodes")
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 15)
            assert {"/rf-keep", "/rf-drop"} <= set(reflector.cache)
            seen.clear()
            cut.cut()
            old_version = await asyncio.to_thread(_list_version, api_client, "nodes")
            await asyncio.to_thread(nodes.delete, "rf-drop")
            await asyncio.to_thread(nodes.create, "rf-new", ready=False)
            counter = 0
            while not await asyncio.to_thread(_gone_probe, api_client, "nodes", old_version):
                for _ in range(20):
                    counter += 1
                    await asyncio.to_thread(core.patch_node, "rf-keep", {"metadata": {"labels": {"n": str(counter)}}})
            failures = reflector.failures
            deadline = time.monotonic() + 30
            while reflector.failures < failures + 2:  # it has tried the closed door again, twice
                assert time.monotonic() < deadline, "the reflector did not notice the cut"
                await asyncio.sleep(0.05)
            assert reflector.failing
            assert {"/rf-keep", "/rf-drop"} <= set(reflector.cache), "the cache was cleared while cut off"
            assert seen == [], f"changes reported while cut off: {seen}"
            relists = reflector.relists
            cut.restore()
            deadline = time.monotonic() + 15
            while "/rf-new" not in reflector.cache or "/rf-drop" in reflector.cache:
                assert time.monotonic() < deadline, f"not caught up; reported {seen}"
                await asyncio.sleep(0.05)
            assert reflector.relists == relists + 1, "caught up without the re-list that 410 demands"
            while reflector.failing:  # the watch after the re-list starts
                assert time.monotonic() < deadline, "caught up, but not watching again"
                await asyncio.sleep(0.05)
            assert ("rf-drop", None) in seen and (None, "rf-new") in seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()

    asyncio.run(scenario())
