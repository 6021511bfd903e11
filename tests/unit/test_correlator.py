"""Table tests of the Event correlator (lbctl.kube.correlator): client-go's aggregation of repeats
into one Event with a count, and its per-object token bucket."""

from __future__ import annotations

import pytest

from lbctl.kube.correlator import Correlator, EventKey, ObjectRef, TokenBucket, Write

WEB = ObjectRef("Service", "shop", "web", "u1")
API = ObjectRef("Service", "shop", "api", "u2")


def key(obj: ObjectRef = WEB, reason: str = "SyncLoadBalancerFailed", message: str = "pool full",
        event_type: str = "Warning") -> EventKey:
    return EventKey(obj, event_type, reason, message)


def test_repeats_fold_into_one_event_and_a_repeat_before_the_write_costs_nothing() -> None:
    correlator = Correlator()
    first = correlator.observe(key(), "2026-01-01T00:00:00Z", 0.0)
    assert first is not None and correlator.next_write(key()) is Write.CREATE
    again = correlator.observe(key(), "2026-01-01T00:00:01Z", 1.0)
    assert again is first and again.count == 2 and again.first == "2026-01-01T00:00:00Z"
    assert correlator.next_write(key()) is Write.CREATE  # one create, carrying count 2
    correlator.written(key(), 2)
    assert correlator.next_write(key()) is Write.NOTHING
    correlator.observe(key(), "2026-01-01T00:00:09Z", 9.0)
    assert correlator.next_write(key()) is Write.UPDATE
    state = correlator.state(key())
    assert state is not None and (state.name, state.count, state.last) == (first.name, 3, "2026-01-01T00:00:09Z")


@pytest.mark.parametrize(("other", "same"), [
    (key(), True),
    (key(message="pool empty"), False),
    (key(reason="UnAvailableLoadBalancer"), False),
    (key(event_type="Normal"), False),
    (key(obj=API), False),
    (key(obj=ObjectRef("Service", "shop", "web", "u9")), False),  # recreated under the same name
])
def test_what_counts_as_the_same_event(other: EventKey, same: bool) -> None:
    correlator = Correlator()
    first = correlator.observe(key(), "t", 0.0)
    second = correlator.observe(other, "t", 0.0)
    assert first is not None and second is not None
    assert (first.name == second.name) is same


def test_each_object_has_its_own_token_bucket() -> None:
    correlator = Correlator(burst=3, refill_s=10.0)
    accepted = [correlator.observe(key(message=f"m{i}"), "t", 0.0) is not None for i in range(5)]
    assert accepted == [True, True, True, False, False]
    assert correlator.observe(key(obj=API), "t", 0.0) is not None  # another object is not held back
    assert correlator.observe(key(message="later"), "t", 10.0) is not None  # one token back after refill_s
    assert correlator.observe(key(message="later2"), "t", 10.0) is None
    assert correlator.refused == 3


@pytest.mark.parametrize(("events", "at", "taken"), [
    (0, 0.0, True), (2, 0.0, False), (2, 5.0, True), (2, 4.9, False), (1, 0.0, True),
])
def test_token_bucket(events: int, at: float, taken: bool) -> None:
    bucket = TokenBucket(burst=2, refill_s=5.0, tokens=2, at=0.0)
    for _ in range(events):
        bucket.take(0.0)
    assert bucket.take(at) is taken


def test_an_expired_event_is_created_again_under_a_new_name() -> None:
    correlator = Correlator()
    state = correlator.observe(key(), "t", 0.0)
    assert state is not None
    name = state.name
    correlator.written(key(), 1)
    correlator.observe(key(), "t2", 1.0)
    correlator.expired(key())
    assert correlator.next_write(key()) is Write.CREATE and state.name != name and state.count == 2


def test_seeded_events_continue_their_count_and_the_latest_seed_wins() -> None:
    correlator = Correlator()
    correlator.seed(key(), "web.old", 4, "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z")
    correlator.seed(key(), "web.older", 9, "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z")
    assert correlator.next_write(key()) is Write.NOTHING
    state = correlator.observe(key(), "2026-01-01T01:00:00Z", 0.0)
    assert state is not None and (state.name, state.count) == ("web.old", 5)
    assert correlator.next_write(key()) is Write.UPDATE


def test_state_is_bounded() -> None:
    correlator = Correlator(capacity=10)
    for i in range(50):
        correlator.observe(key(obj=ObjectRef("Service", "ns", f"s{i}", f"u{i}")), "t", 0.0)
    assert correlator.state(key(obj=ObjectRef("Service", "ns", "s0", "u0"))) is None
    assert correlator.state(key(obj=ObjectRef("Service", "ns", "s49", "u49"))) is not None
