"""The BGP configuration's validation, by the real apiserver: the BGPPeer CRD and the pool's
spec.advertisement accept what is valid and reject what is not with a message naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lbctl.lab.kube import absent_ok
from tests.integration.harness import apply_peer_status

GROUP, VERSION = "lbctl.io", "v1alpha1"

PEER: dict[str, Any] = {
    "apiVersion": "lbctl.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
    "spec": {"peerAddress": "192.168.1.1", "peerASN": 64512, "myASN": 64513},
}
POOL: dict[str, Any] = {
    "apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": "bgp"},
    "spec": {"addresses": ["198.51.100.0/26"], "advertisement": {"mode": "bgp", "bgp": {}}},
}


def with_spec(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`base` with spec.<path> (dotted) set to `value` (None: removed)."""
    body = copy.deepcopy(base)
    where = body["spec"]
    *parents, last = path.split(".")
    for part in parents:
        where = where.setdefault(part, {})
    if value is None:
        where.pop(last, None)
    else:
        where[last] = value
    return body


def create(api_client: client.ApiClient, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api_client)
    created: dict[str, Any] = custom.create_cluster_custom_object(GROUP, VERSION, plural, body, dry_run="All")
    return created


def rejection(api_client: client.ApiClient, plural: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as rejected:
        create(api_client, plural, body)
    assert rejected.value.status == 422, rejected.value.body
    return str(rejected.value.body)


@pytest.mark.parametrize(("path", "value"), [
    ("peerAddress", "fd00::1"),
    ("peerASN", 4294967295),
    ("myASN", 1),
    ("holdTime", "0s"),
    ("holdTime", "3s"),
    ("holdTime", "65535s"),
    ("holdTime", "1m30s"),
    ("keepaliveTime", "29s"),
    ("peerPort", 1179),
    ("sourceAddress", "10.0.0.2"),
    ("ebgpMultiHop", True),
    ("gracefulRestart", True),
    ("passwordSecretRef", {"name": "tor-password"}),
    ("nodeSelector", {"matchLabels": {"rack": "r1"},
                      "matchExpressions": [{"key": "role", "operator": "Exists"}]}),
])
def test_a_valid_peer_is_accepted(api_client: client.ApiClient, pool_crd: None, path: str, value: Any) -> None:
    create(api_client, "bgppeers", with_spec(PEER, path, value))


def test_a_peer_gets_its_defaults(api_client: client.ApiClient, pool_crd: None) -> None:
    spec = create(api_client, "bgppeers", with_spec(PEER, "passwordSecretRef", {"name": "s"}))["spec"]
    assert (spec["peerPort"], spec["holdTime"], spec["ebgpMultiHop"], spec["gracefulRestart"]) == (179, "90s", False,
                                                                                                   False)
    assert spec["passwordSecretRef"]["key"] == "password" and "keepaliveTime" not in spec  # holdTime/3 when read


@pytest.mark.parametrize(("path", "value", "named"), [
    ("peerAddress", "192.168.1.300", "spec.peerAddress"),
    ("peerAddress", "router.example", "spec.peerAddress"),
    ("peerAddress", None, "spec.peerAddress"),
    ("peerASN", 0, "spec.peerASN"),
    ("peerASN", 4294967296, "spec.peerASN"),
    ("myASN", -1, "spec.myASN"),
    ("peerPort", 0, "spec.peerPort"),
    ("peerPort", 65536, "spec.peerPort"),
    ("holdTime", "2s", "spec.holdTime"),
    ("holdTime", "65536s", "spec.holdTime"),
    ("holdTime", "90", "spec.holdTime"),
    ("holdTime", "", "spec.holdTime"),
    ("keepaliveTime", "90s", "spec.keepaliveTime"),  # not shorter than the default holdTime 90s
    ("keepaliveTime", "1m40s", "spec.keepaliveTime"),
    ("keepaliveTime", "abc", "spec.keepaliveTime"),
    ("sourceAddress", "10.0.0.0/24", "spec.sourceAddress"),
    ("passwordSecretRef", {"key": "password"}, "spec.passwordSecretRef.name"),
    ("nodeSelector", {"matchExpressions": [{"key": "rack", "operator": "In"}]},
     "spec.nodeSelector.matchExpressions[0].values"),
    ("nodeSelector", {"matchExpressions": [{"key": "rack", "operator": "Near", "values": ["a"]}]},
     "spec.nodeSelector.matchExpressions[0].operator"),
])
def test_an_invalid_peer_is_rejected_naming_the_field(api_client: client.ApiClient, pool_crd: None, path: str,
                                                       value: Any, named: str) -> None:
    message = rejection(api_client, "bgppeers", with_spec(PEER, path, value))
    assert named in message, message


def test_keepalive_must_be_zero_when_the_hold_time_is(api_client: client.ApiClient, pool_crd: None) -> None:
    body = with_spec(with_spec(PEER, "holdTime", "0s"), "keepaliveTime", "10s")
    message = rejection(api_client, "bgppeers", body)
    assert "spec.keepaliveTime" in message and "shorter than holdTime" in message, message
    create(api_client, "bgppeers", with_spec(with_spec(PEER, "holdTime", "3s"), "keepaliveTime", "1s"))


@pytest.mark.parametrize(("path", "value"), [
    ("advertisement.mode", "l2"),
    ("advertisement.mode", "both"),
    ("advertisement.bgp.communities", ["0:0", "65535:65535", "large:4294967295:0:1", "64512:100"]),
    ("advertisement.bgp.localPref", 200),
    ("advertisement.bgp.aggregationLength", 26),
    ("advertisement.bgp.aggregationLengthV6", 64),
    ("advertisement.bgp.nodeSelector", {"matchLabels": {"rack": "r1"}}),
    ("advertisement.bgp.peerSelector", {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["r1"]}]}),
])
def test_a_valid_advertisement_is_accepted(api_client: client.ApiClient, pool_crd: None, path: str,
                                           value: Any) -> None:
    create(api_client, "loadbalancerpools", with_spec(POOL, path, value))


def test_a_pool_without_advertisement_is_l2_and_a_bgp_one_gets_its_defaults(api_client: client.ApiClient,
                                                                            pool_crd: None) -> None:
    plain = create(api_client, "loadbalancerpools", with_spec(POOL, "advertisement", None))
    assert "advertisement" not in plain["spec"]  # existing pools unchanged: absent means l2
    bgp = create(api_client, "loadbalancerpools", POOL)["spec"]["advertisement"]["bgp"]
    assert (bgp["aggregationLength"], bgp["aggregationLengthV6"]) == (32, 128)


@pytest.mark.parametrize(("path", "value", "named"), [
    ("advertisement.mode", "ospf", "spec.advertisement.mode"),
    ("advertisement.bgp.communities", ["65536:1"], "spec.advertisement.bgp.communities[0]"),
    ("advertisement.bgp.communities", ["1:2", "1:2:3"], "spec.advertisement.bgp.communities[1]"),
    ("advertisement.bgp.communities", ["large:4294967296:0:0"], "spec.advertisement.bgp.communities[0]"),
    ("advertisement.bgp.communities", ["large:1:2"], "spec.advertisement.bgp.communities[0]"),
    ("advertisement.bgp.communities", ["no-export"], "spec.advertisement.bgp.communities[0]"),
    ("advertisement.bgp.communities", ["1:2", "1:2"], "spec.advertisement.bgp.communities[1]"),
    ("advertisement.bgp.localPref", -1, "spec.advertisement.bgp.localPref"),
    ("advertisement.bgp.aggregationLength", 33, "spec.advertisement.bgp.aggregationLength"),
    ("advertisement.bgp.aggregationLength", -1, "spec.advertisement.bgp.aggregationLength"),
    ("advertisement.bgp.aggregationLengthV6", 129, "spec.advertisement.bgp.aggregationLengthV6"),
    ("advertisement.bgp.peerSelector", {"matchExpressions": [{"key": "rack", "operator": "Exists",
                                                              "values": ["x"]}]},
     "spec.advertisement.bgp.peerSelector.matchExpressions[0].values"),
])
def test_an_invalid_advertisement_is_rejected_naming_the_field(api_client: client.ApiClient, pool_crd: None,
                                                               path: str, value: Any, named: str) -> None:
    message = rejection(api_client, "loadbalancerpools", with_spec(POOL, path, value))
    assert named in message, message


def test_the_status_subresource_keeps_each_nodes_entry(api_client: client.ApiClient, pool_crd: None,
                                                       request: pytest.FixtureRequest) -> None:
    """Two forwarders apply their own entries of status.nodes (server-side apply, one field manager
    per node, as the contract says): each keeps the other's; spec writes cannot touch status."""
    custom = client.CustomObjectsApi(api_client)
    name = "status-test"
    custom.create_cluster_custom_object(GROUP, VERSION, "bgppeers", {**PEER, "metadata": {"name": name}})
    request.addfinalizer(lambda: absent_ok(lambda: custom.delete_cluster_custom_object(GROUP, VERSION, "bgppeers",
                                                                                         name)))
    for node, state in (("n1", "Established"), ("n2", "Active"), ("n1", "Idle")):
        apply_peer_status(api_client, name, node, state, routes=3)
    peer = custom.get_cluster_custom_object(GROUP, VERSION, "bgppeers", name)
    assert {(e["node"], e["state"]) for e in peer["status"]["nodes"]} == {("n1", "Idle"), ("n2", "Active")}
    with pytest.raises(ApiException) as rejected:
        apply_peer_status(api_client, name, "n3", "Up")
    assert rejected.value.status == 422 and "status.nodes[" in str(rejected.value.body)
