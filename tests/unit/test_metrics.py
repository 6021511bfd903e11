"""The pure parts behind the metrics: change times, latency bookkeeping, bounded labels, pool usage."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError
from google.api_core import exceptions as google_exceptions

from lbctl.forwarder.metrics import TRIGGER_TIME_ANNOTATION, ProgrammingLatency, change_time, histogram_quantile
from lbctl.model.errors import LoadBalancerError
from providers.local_metrics import allocation_failure_reason
from providers.local_pools import Allocator, parse_pool, service_request
from providers.retry import call_result, operation_label

ARRIVED = 1_800_000_100.0


def aws_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "Call")


def endpoint_slice(trigger: str | None) -> dict[str, Any]:
    return {"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: trigger} if trigger else {}}}


@pytest.mark.parametrize(("old", "new", "expected"), [
    (None, endpoint_slice("2027-01-15T08:01:38.5Z"), 1_800_000_098.5),  # the controller's trigger time
    (endpoint_slice("2027-01-15T08:01:00Z"), endpoint_slice("2027-01-15T08:01:39.123456789Z"), 1_800_000_099.123457),
    (endpoint_slice("2027-01-15T08:01:00Z"), endpoint_slice("2027-01-15T08:01:00Z"), ARRIVED),  # unchanged: old
    (None, endpoint_slice(None), ARRIVED),  # no annotation: the event's arrival
    (endpoint_slice("2027-01-15T08:01:00Z"), None, ARRIVED),  # deleted
    (None, endpoint_slice("2027-01-15T08:05:00Z"), ARRIVED),  # a clock ahead of ours: never negative
    (None, endpoint_slice("garbage"), ARRIVED),
])
def test_change_time(old: dict[str, Any] | None, new: dict[str, Any] | None, expected: float) -> None:
    assert change_time(old, new, ARRIVED) == pytest.approx(expected, abs=1e-6)


def test_latency_counts_from_the_earliest_change_and_only_programmed_keys() -> None:
    latency = ProgrammingLatency()
    latency.seen("a/x", 10.0)  # the first list: not a change this process waited for
    assert latency.pending == {}
    latency.enabled = True
    latency.seen("a/x", 10.0)
    latency.seen("a/x", 12.0)
    latency.seen("a/y", 11.0)
    taken = latency.take(["a/x", "a/y", "a/z"])
    assert taken == {"a/x": 10.0, "a/y": 11.0} and latency.pending == {}
    assert latency.observe(taken, lambda key: key == "a/x", 13.5) == [3.5]
    assert latency.pending == {}  # a/y was not ours: dropped, not kept for later


def test_a_change_that_arrives_while_its_key_is_being_applied_is_measured_by_the_next_transaction() -> None:
    latency = ProgrammingLatency()
    latency.enabled = True
    latency.seen("a/x", 10.0)
    taken = latency.take({"a/x"})  # the sync takes the pending times, then applies
    latency.seen("a/x", 10.4)  # arrives during the transaction: not in it
    assert latency.observe(taken, lambda key: True, 10.5) == [0.5]
    assert latency.pending == {"a/x": 10.4}  # still waiting for its own commit
    assert latency.observe(latency.take({"a/x"}), lambda key: True, 10.6) == [pytest.approx(0.2)]
    assert latency.pending == {}


def test_a_failed_transaction_gives_its_change_times_back() -> None:
    latency = ProgrammingLatency()
    latency.enabled = True
    latency.seen("a/x", 10.0)
    taken = latency.take({"a/x"})
    latency.seen("a/x", 11.0)
    latency.give_back(taken)  # the earliest change still waits
    assert latency.pending == {"a/x": 10.0}


@pytest.mark.parametrize(("q", "expected"), [(0.5, 0.04375), (0.99, 0.0985), (1.0, 0.1)])
def test_histogram_quantile_interpolates_inside_the_bucket(q: float, expected: float) -> None:
    buckets = [(0.025, 0.0), (0.05, 4.0), (0.1, 6.0), (float("inf"), 6.0)]
    assert histogram_quantile(q, buckets) == pytest.approx(expected)
    assert histogram_quantile(q, [(float("inf"), 0.0)]) is None


@pytest.mark.parametrize(("error", "result"), [
    (None, "success"),
    (aws_error("Throttling", 400), "throttled"),
    (aws_error("RequestLimitExceeded", 503), "throttled"),
    (aws_error("ValidationError", 400), "error"),
    (google_exceptions.TooManyRequests("slow down"), "throttled"),  # type: ignore[no-untyped-call]
    (google_exceptions.InternalServerError("boom"), "error"),  # type: ignore[no-untyped-call]
    (ConnectionError("reset"), "error"),
])
def test_call_result(error: BaseException | None, result: str) -> None:
    assert call_result(error) == result


@pytest.mark.parametrize(("what", "label"), [
    ("describe_load_balancers", "describe_load_balancers"),
    ("creating target pool a0a1b2c3d4", "creating_target_pool"),
    ("listing instances in us-central1-a", "listing_instances"),
    ("adding nodes to instance group us-central1-a/k8s-ig", "adding_nodes_to_instance_group"),
    ("creating HTTP health check k8s-1234", "creating_http_health_check"),
    ("", "call"),
])
def test_operation_label_leaves_names_out(what: str, label: str) -> None:
    assert operation_label(what) == label


def failure(pools: list[dict[str, Any]], annotations: dict[str, str], key: str, taken: int = 0) -> str:
    allocator = Allocator([parse_pool(p) for p in pools])
    for i in range(taken):
        allocator.assign(service_request(key=f"ns/s{i}", namespace="ns", ports=[("TCP", 80)]))
    request = service_request(key=key, namespace="ns", annotations=annotations, ports=[("TCP", 80)])
    with pytest.raises(LoadBalancerError) as raised:
        allocator.assign(request)
    return allocation_failure_reason(raised.value.problem)


POOL = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": "a"},
        "spec": {"addresses": ["198.18.0.1-198.18.0.2"]}}


def test_allocation_failure_reasons_from_the_allocators_own_errors() -> None:
    assert failure([POOL], {}, "ns/x", taken=2) == "exhausted"
    assert failure([], {}, "ns/x") == "no_pool"
    assert failure([POOL], {"lbctl.io/address-pool": "nope"}, "ns/x") == "no_pool"
    assert failure([POOL], {"lbctl.io/load-balancer-ips": "198.18.0.1"}, "ns/x", taken=1) == "address_in_use"
    assert failure([POOL], {"lbctl.io/load-balancer-ips": "203.0.113.9"}, "ns/x") == "no_pool"


def test_family_usage_per_pool_and_family() -> None:
    dual = {"apiVersion": "lbctl.io/v1alpha1", "kind": "LoadBalancerPool", "metadata": {"name": "d"},
            "spec": {"addresses": ["198.18.1.0/24", "fd00:1::/120"], "avoidBuggyIPs": True}}
    allocator = Allocator([parse_pool(dual)])
    allocator.assign(service_request(key="ns/a", namespace="ns", ip_families=["IPv4", "IPv6"],
                                     ip_family_policy="RequireDualStack", ports=[("TCP", 80)]))
    allocator.assign(service_request(key="ns/b", namespace="ns", ports=[("TCP", 80)]))
    assert allocator.family_usage() == {("d", 4): (254, 2), ("d", 6): (256, 1)}
    assert allocator.pool_stats()["d"].assigned == 3
