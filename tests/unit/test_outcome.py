"""Table tests of what the reconciler does after a provider call (lbctl.model.outcome) and of
which changes wake a pending Service (lbctl.model.waits)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from lbctl.model.errors import (
    CloudRefusalError,
    InvalidServiceError,
    LoadBalancerError,
    NoEligibleNodesError,
    PendingError,
    TransientProviderError,
)
from lbctl.model.outcome import (
    DELETING,
    ENSURING,
    PENDING,
    TRANSIENT,
    UPDATED_HOSTS,
    USER,
    WAITING,
    Backoff,
    EventSpec,
    RecordedEvent,
    after_ensure,
    after_failure,
    allocated_node_ports,
    condition_warnings,
    deleting_event,
    ensuring_event,
    missing_events,
    no_eligible_nodes,
    retry_for,
)
from lbctl.model.waits import Change, ChangeKind, Wait, WaitFor, address_range, wakes

NOW = "2026-11-29T16:00:00Z"
EARLIER = "2026-11-29T15:00:00Z"
A = [{"ip": "198.18.0.1", "ipMode": "VIP"}]
B = [{"ip": "198.18.0.2", "ipMode": "VIP"}]


ENSURED_AT_A = EventSpec("Normal", "EnsuredLoadBalancer", "Ensured load balancer at 198.18.0.1")
MOVED_A_B = EventSpec("Normal", "UpdatedLoadBalancer", "Load balancer moved from 198.18.0.1 to 198.18.0.2")


def svc(ingress: list[dict[str, Any]] | None = None, ready: str | None = None, reason: str = "LoadBalancerEnsured",
        message: str = "local load balancer at 198.18.0.1", deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"loadBalancer": {"ingress": ingress} if ingress else {}}
    if ready is not None:
        status["conditions"] = [{"type": "LoadBalancerReady", "status": ready, "reason": reason,
                                 "message": message, "lastTransitionTime": EARLIER}]
    meta: dict[str, Any] = {"name": "web", "namespace": "shop", "uid": "u1"}
    if deleting:
        meta["deletionTimestamp"] = EARLIER
    return {"metadata": meta, "spec": {"type": "LoadBalancer"}, "status": status}


@pytest.mark.parametrize(("service", "expected"), [
    (svc(), ENSURING),  # first attempt
    (svc(ready="False", reason="Pending"), None),  # a retry
    (svc(A, ready="True"), None),  # already has an address
    (svc(A), None),
])
def test_ensuring_only_before_the_first_attempt(service: dict[str, Any], expected: EventSpec | None) -> None:
    assert ensuring_event(service) == expected


@pytest.mark.parametrize(("announced", "expected"), [(False, DELETING), (True, None)])
def test_deleting_once_per_release(announced: bool, expected: EventSpec | None) -> None:
    assert deleting_event(announced) == expected


@pytest.mark.parametrize(("service", "ingress", "hosts_changed", "events"), [
    (svc(), A, False, (ENSURED_AT_A,)),
    (svc(ready="False", reason="Pending"), A, False, (ENSURED_AT_A,)),
    (svc(A, ready="True"), A, False, ()),  # nothing changed: nothing to say
    (svc(A, ready="True"), A, True, (UPDATED_HOSTS,)),
    (svc(A, ready="True"), B, False,
     (EventSpec("Normal", "UpdatedLoadBalancer", "Load balancer moved from 198.18.0.1 to 198.18.0.2"),)),
    (svc(A, ready="False", reason="ProviderError"), A, False, (ENSURED_AT_A,)),  # recovered
])
def test_after_ensure_events(service: dict[str, Any], ingress: list[dict[str, Any]], hosts_changed: bool,
                             events: tuple[EventSpec, ...]) -> None:
    outcome = after_ensure(service, ingress, "local", hosts_changed, NOW)
    assert outcome.events == events
    assert outcome.ingress == ingress and outcome.retry is None and outcome.wait is None
    assert outcome.condition is not None and outcome.condition["status"] == "True"
    assert outcome.condition["message"] == f"local load balancer at {ingress[0]['ip']}"


def test_after_ensure_keeps_the_transition_time_of_a_condition_that_stays_true() -> None:
    kept = after_ensure(svc(A, ready="True"), A, "local", False, NOW).condition
    new = after_ensure(svc(A, ready="False"), A, "local", False, NOW).condition
    assert kept is not None and kept["lastTransitionTime"] == EARLIER
    assert new is not None and new["lastTransitionTime"] == NOW


ADDRESS_WAIT = Wait(WaitFor.ADDRESS, pools=("p",), ranges=(address_range("198.18.0.1"),))


@pytest.mark.parametrize(("error", "deleting", "retry", "wait", "reason", "condition_reason"), [
    (InvalidServiceError("bad", field="spec.x", fix="fix it"), False, USER, None, "SyncLoadBalancerFailed",
     "InvalidConfiguration"),
    (PendingError("full", wait=ADDRESS_WAIT), False, WAITING, ADDRESS_WAIT, "SyncLoadBalancerFailed", "Pending"),
    (PendingError("held by a stranger"), False, PENDING, None, "SyncLoadBalancerFailed", "Pending"),
    (NoEligibleNodesError("none"), False, WAITING, Wait(WaitFor.NODES), "UnAvailableLoadBalancer",
     "NoEligibleNodes"),
    (TransientProviderError("503"), False, TRANSIENT, None, "SyncLoadBalancerFailed", "ProviderError"),
    (CloudRefusalError("quota exceeded"), False, USER, None, "SyncLoadBalancerFailed", "ProviderError"),
    (LoadBalancerError("odd"), False, USER, None, "SyncLoadBalancerFailed", "Failed"),
    (PendingError("full", wait=ADDRESS_WAIT), True, TRANSIENT, None, "DeleteLoadBalancerFailed", "Pending"),
])
def test_after_failure(error: LoadBalancerError, deleting: bool, retry: Backoff, wait: Wait | None, reason: str,
                       condition_reason: str) -> None:
    outcome = after_failure(svc(), error, deleting, balancer_exists=True, now=NOW)
    assert outcome.retry == retry == retry_for(error, deleting)
    assert outcome.wait == wait
    (event,) = outcome.events
    assert event.type == "Warning" and event.reason == reason and error.describe() in event.message
    assert outcome.condition is not None
    assert (outcome.condition["status"], outcome.condition["reason"]) == ("False", condition_reason)
    assert outcome.condition["message"] == error.describe()


@pytest.mark.parametrize(("service", "exists", "deleting", "ingress", "has_condition"), [
    (svc(A, ready="True"), True, False, None, True),  # a working balancer stays shown
    (svc(A, ready="True"), False, False, [], True),  # its address was taken back: shown no more
    (svc(A, ready="True", deleting=True), False, True, None, False),  # being deleted: no condition
    (svc(A, ready="True"), False, True, None, True),  # a failed release keeps what it shows
])
def test_after_failure_status(service: dict[str, Any], exists: bool, deleting: bool,
                              ingress: list[Any] | None, has_condition: bool) -> None:
    outcome = after_failure(service, TransientProviderError("x"), deleting, exists, NOW)
    assert outcome.ingress == ingress
    assert (outcome.condition is not None) is has_condition


@pytest.mark.parametrize(("backoff", "failures", "delay"), [
    (USER, 0, 10.0), (USER, 3, 80.0), (USER, 10, 300.0), (TRANSIENT, 0, 1.0), (TRANSIENT, 99, 60.0),
    (WAITING, 0, 30.0), (PENDING, 6, 300.0),
])
def test_backoffs_grow_to_minutes(backoff: Backoff, failures: int, delay: float) -> None:
    assert backoff.delay(failures) == delay


def test_retries_of_errors_that_need_a_user_reach_minutes() -> None:
    assert USER.max_s >= 300 and WAITING.max_s >= 300 and PENDING.max_s >= 300


LATER = "2026-11-29T15:00:05Z"
CLOCK = dt.datetime(2026, 11, 29, 15, 30, tzinfo=dt.UTC)


def seen(reason: str, at: str = LATER, message: str = "", uid: str = "u1") -> RecordedEvent:
    return RecordedEvent(uid, reason, at, message)


AT_A, AT_B = "Ensured load balancer at 198.18.0.1", "Ensured load balancer at 198.18.0.2"
A_TO_B, B_TO_A = MOVED_A_B.message, "Load balancer moved from 198.18.0.2 to 198.18.0.1"
LATEST = "2026-11-29T15:10:00Z"


@pytest.mark.parametrize(("service", "recorded", "missing"), [
    (svc(A, ready="True"), [], [ENSURED_AT_A]),
    (svc(A, ready="True"), [seen("EnsuredLoadBalancer", message=AT_A)], []),
    (svc(A, ready="True"), [seen("EnsuredLoadBalancer")], []),  # an earlier version's Event, no addresses
    (svc(A, ready="True"), [seen("EnsuredLoadBalancer", EARLIER, AT_A)], []),  # same second
    (svc(A, ready="True"), [seen("UpdatedLoadBalancer", message=B_TO_A)], []),
    (svc(A, ready="True"), [seen("UpdatedLoadBalancer")], []),
    (svc(A, ready="True"), [seen("EnsuredLoadBalancer", "2026-11-29T14:59:59Z", AT_A)], [ENSURED_AT_A]),
    (svc(A, ready="True"), [seen("EnsuringLoadBalancer")], [ENSURED_AT_A]),
    (svc(A, ready="True"), [seen("EnsuredLoadBalancer", uid="other", message=AT_A)], [ENSURED_AT_A]),
    # moves keep the condition True: the latest Event naming addresses must name the current ones
    (svc(B, ready="True"), [seen("EnsuredLoadBalancer", message=AT_A)], [MOVED_A_B]),  # the move was lost
    (svc(B, ready="True"), [seen("EnsuredLoadBalancer", message=AT_A),
                            seen("UpdatedLoadBalancer", LATEST, A_TO_B)], []),
    (svc(B, ready="True"), [seen("EnsuredLoadBalancer", message=AT_A),
                            seen("UpdatedLoadBalancer", LATER, A_TO_B)], []),  # a move in the same second
    (svc(B, ready="True"), [seen("UpdatedLoadBalancer", LATER, A_TO_B),  # A → B, back to A, then to B (lost)
                            seen("UpdatedLoadBalancer", LATEST, B_TO_A)], [MOVED_A_B]),
    (svc(A, ready="True"), [seen("EnsuredLoadBalancer", message=AT_A),
                            seen("UpdatedLoadBalancer", LATEST, "Updated load balancer with new hosts")], []),
    (svc(B, ready="True"), [seen("EnsuredLoadBalancer", message=AT_B)], []),
    (svc(A, ready="False", reason="ProviderError"), [], []),  # its re-sync records the failure
    (svc(ready="True"), [], []),  # no address: nothing was ensured
    (svc(), [], []),
])
def test_missing_events_after_a_restart(service: dict[str, Any], recorded: list[RecordedEvent],
                                        missing: list[EventSpec]) -> None:
    assert missing_events(service, recorded, CLOCK) == missing


def test_outcomes_older_than_the_event_ttl_are_not_posted_again() -> None:
    assert missing_events(svc(A, ready="True"), [], CLOCK + dt.timedelta(hours=2)) == []


# ---- waits --------------------------------------------------------------------------------------

POOL_A = Wait(WaitFor.ADDRESS, pools=("a",), ranges=((4, 0xC6120100, 0xC61201FF),))  # 198.18.1.0/24
HELD = Wait(WaitFor.ADDRESS, ranges=(address_range("198.18.2.5"),), holders=("ns/holder",))
FREED_IN_A = Change(ChangeKind.FREED, service="ns/x", addresses=("198.18.1.7",))
FREED_ELSEWHERE = Change(ChangeKind.FREED, service="ns/x", addresses=("198.18.9.7", "fd00::1"))


SERVES_WAITER = Change(ChangeKind.POOLS, services=frozenset({"ns/waiter", "ns/other"}))
SERVES_OTHERS = Change(ChangeKind.POOLS, services=frozenset({"ns/other"}))


@pytest.mark.parametrize(("wait", "change", "woken"), [
    (POOL_A, FREED_IN_A, True),
    (POOL_A, FREED_ELSEWHERE, False),
    (POOL_A, Change(ChangeKind.FREED, service="ns/x", addresses=("not-an-ip",)), False),
    (POOL_A, SERVES_WAITER, True),  # a new or changed pool the provider says may serve it
    (POOL_A, SERVES_OTHERS, False),  # a pool it may not use (another pool, namespace, family)
    (POOL_A, Change(ChangeKind.POOLS), False),  # a BGPPeer, a deleted pool: serves nobody
    (POOL_A, Change(ChangeKind.NODES), False),
    (HELD, Change(ChangeKind.FREED, service="ns/holder"), True),
    (HELD, Change(ChangeKind.FREED, service="ns/x", addresses=("198.18.2.5",)), True),
    (HELD, FREED_IN_A, False),
    (HELD, SERVES_WAITER, True),
    (HELD, SERVES_OTHERS, False),
    (Wait(WaitFor.POOL), FREED_IN_A, False),  # no release gives a dual-stack Service its IPv6 pool
    (Wait(WaitFor.POOL), SERVES_WAITER, True),
    (Wait(WaitFor.POOL), SERVES_OTHERS, False),
    (Wait(WaitFor.POOL), Change(ChangeKind.POOLS), False),
    (Wait(WaitFor.NODES), Change(ChangeKind.NODES), True),
    (Wait(WaitFor.NODES), SERVES_WAITER, False),
    (Wait(WaitFor.NODE_PORTS), Change(ChangeKind.FREED, service="ns/x", node_ports=True), True),
    (Wait(WaitFor.NODE_PORTS), FREED_IN_A, False),
    (Wait(WaitFor.NODE_PORTS), SERVES_WAITER, False),
])
def test_wakes(wait: Wait, change: Change, woken: bool) -> None:
    assert wakes(wait, change, "ns/waiter") is woken


@pytest.mark.parametrize(("wait", "text"), [
    (POOL_A, "a free address in pool a"), (HELD, "an address held by ns/holder"),
    (Wait(WaitFor.POOL), "a pool that serves it"), (Wait(WaitFor.NODES), "an eligible node"),
    (Wait(WaitFor.NODE_PORTS), "free NodePorts"),
])
def test_waits_describe_themselves(wait: Wait, text: str) -> None:
    assert wait.describe() == text


# ---- around the provider call ----------------------------------------------------------------------


@pytest.mark.parametrize(("uses_nodes", "eligible", "nodes", "error"), [
    (True, 0, 3, "no eligible nodes among 3: each is not Ready, being deleted, labelled "
                 "node.kubernetes.io/exclude-from-external-load-balancers or tainted ToBeDeletedByClusterAutoscaler"),
    (True, 0, 0, "no eligible nodes among 0"),
    (True, 1, 3, None),
    (False, 0, 3, None),  # the local provider needs no nodes
    (False, 0, 0, None),
])
def test_no_eligible_nodes(uses_nodes: bool, eligible: int, nodes: int, error: str | None) -> None:
    found = no_eligible_nodes(uses_nodes, eligible, nodes)
    if error is None:
        assert found is None
    else:
        assert isinstance(found, NoEligibleNodesError) and str(found).startswith(error)
        assert found.fix == "make at least one node Ready and eligible"
        assert found.wait == Wait(WaitFor.NODES) and retry_for(found, False) == WAITING


HTTP = {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 31000}
DNS = {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 31001}
NO_PROTOCOL = {"name": "x", "port": 8080, "nodePort": 31002}


@pytest.mark.parametrize(("ports", "claimed", "said"), [
    ([HTTP], [0], "claimed 80/TCP→31000"),
    ([HTTP, DNS], [0, 1], "claimed 80/TCP→31000, 53/UDP→31001"),
    ([HTTP, DNS], [1], "claimed 53/UDP→31001"),  # the user's own nodePort is not named
    ([NO_PROTOCOL], [0], "claimed 8080/TCP→31002"),  # TCP when spec.ports leaves it out
])
def test_allocated_node_ports(ports: list[dict[str, Any]], claimed: list[int], said: str) -> None:
    assert allocated_node_ports("aws", ports, claimed) == EventSpec(
        "Normal", "AllocatedNodePorts",
        f"allocateLoadBalancerNodePorts is false but the aws provider sends traffic to NodePorts: {said}")


def cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


BAD = cond("Valid", "False", "InvalidAddresses", "spec.addresses[0]: not an address")
OTHER_BAD = cond("Valid", "False", "InvalidAddresses", "spec.addresses[1]: not an address")
GOOD = cond("Valid", "True", "Valid", "")


@pytest.mark.parametrize(("before", "written", "warnings"), [
    (None, {"conditions": [BAD]}, [("InvalidAddresses", "spec.addresses[0]: not an address")]),  # first status
    ({"conditions": [GOOD]}, {"conditions": [BAD]}, [("InvalidAddresses", "spec.addresses[0]: not an address")]),
    ({"conditions": [BAD]}, {"conditions": [BAD]}, []),  # still the same problem: told once
    ({"conditions": [BAD]}, {"conditions": [OTHER_BAD]}, [("InvalidAddresses", "spec.addresses[1]: not an address")]),
    ({"conditions": [BAD]}, {"conditions": [GOOD]}, []),  # fixed: no Warning
    ({}, {"conditions": [GOOD]}, []),
    ({"conditions": [GOOD]}, {"free": 3}, []),  # a status write without conditions
    ({}, {"conditions": [cond("Valid", "False")]}, [("Invalid", "")]),  # no reason given
    ({"conditions": [GOOD]}, {"conditions": [BAD, cond("Peers", "False", "NoPeer", "no BGPPeer matches")]},
     [("InvalidAddresses", "spec.addresses[0]: not an address"), ("NoPeer", "no BGPPeer matches")]),
])
def test_condition_warnings(before: dict[str, Any] | None, written: dict[str, Any],
                            warnings: list[tuple[str, str]]) -> None:
    assert condition_warnings(before, written) == tuple(EventSpec("Warning", r, m) for r, m in warnings)
