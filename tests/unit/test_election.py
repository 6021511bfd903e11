"""Leader election's decisions (lbctl.kube.election), table-driven: who acquires, renews, waits or
has lost, on each replica's own monotonic clock."""

from __future__ import annotations

import dataclasses

import pytest

from lbctl.kube.election import (
    UNKNOWN,
    Action,
    ElectorState,
    LeaseRecord,
    Timing,
    deadline_passed,
    decide,
    observe,
    released,
    written,
)

T = Timing(lease_duration_s=3, renew_deadline_s=2.0, retry_period_s=0.5)
WALL = "2026-01-01T00:00:00.000000Z"
OTHER = LeaseRecord("b", 3, "t0", "t0", 4)
MINE = LeaseRecord("a", 3, "t0", "t0", 4)
FREE = LeaseRecord("", 1, "t0", "t0", 4)
STANDBY = ElectorState("a")


def seen(record: LeaseRecord | None, at: float, **fields: object) -> ElectorState:
    return dataclasses.replace(STANDBY, observed=record, observed_at=at, **fields)  # type: ignore[arg-type]


LEADER = seen(MINE, 10.0, leading=True, renewed_at=10.0)


@pytest.mark.parametrize(("state", "lease", "now", "action", "holder", "transitions"), [
    pytest.param(STANDBY, None, 1.0, Action.CREATE, "a", 0, id="no-lease-create-it"),
    pytest.param(seen(OTHER, 10.0), OTHER, 12.9, Action.WAIT, None, None, id="held-not-expired-wait"),
    pytest.param(seen(OTHER, 10.0), OTHER, 13.0, Action.ACQUIRE, "a", 5, id="unchanged-for-its-duration-take-it"),
    pytest.param(seen(FREE, 10.0), FREE, 10.0, Action.ACQUIRE, "a", 5, id="released-take-it-at-once"),
    pytest.param(LEADER, MINE, 11.0, Action.RENEW, "a", 4, id="leader-renews"),
    pytest.param(LEADER, MINE, 12.0, Action.LOST, None, None, id="leader-past-renew-deadline-lost"),
    pytest.param(LEADER, OTHER, 11.0, Action.LOST, None, None, id="leader-sees-another-holder-lost"),
    pytest.param(LEADER, UNKNOWN, 11.5, Action.WAIT, None, None, id="leader-cannot-read-retries-within-deadline"),
    pytest.param(LEADER, UNKNOWN, 12.0, Action.LOST, None, None, id="leader-cannot-read-past-deadline-lost"),
    pytest.param(seen(OTHER, 10.0), UNKNOWN, 20.0, Action.WAIT, None, None, id="standby-cannot-read-waits"),
    pytest.param(seen(MINE, 10.0), MINE, 10.0, Action.ACQUIRE, "a", 4,
                 id="own-name-after-restart-same-pod-takes-back"),
])
def test_decide(state: ElectorState, lease: LeaseRecord | None, now: float, action: Action, holder: str | None,
                transitions: int | None) -> None:
    decision = decide(state, lease, now, WALL, T)
    assert decision.action is action
    if holder is None:
        assert decision.record is None
    else:
        assert decision.record is not None
        assert (decision.record.holder, decision.record.transitions) == (holder, transitions)
        assert decision.record.renew_time == WALL and decision.record.duration_s == T.lease_duration_s


def test_expiry_is_measured_from_when_the_change_was_seen_not_from_renew_time() -> None:
    """The holder's renewTime may be hours off (clock skew): only changes of the record count."""
    skewed = LeaseRecord("b", 3, "1999-01-01T00:00:00.000000Z", "1999-01-01T00:00:00.000000Z")
    state = observe(STANDBY, skewed, 100.0)  # first seen now
    assert decide(state, skewed, 102.0, WALL, T).action is Action.WAIT
    renewed = dataclasses.replace(skewed, renew_time="1999-01-01T00:00:01.000000Z")
    state = observe(state, renewed, 102.5)  # a renewal restarts the clock
    assert state.observed_at == 102.5
    assert decide(state, renewed, 105.4, WALL, T).action is Action.WAIT
    assert decide(state, renewed, 105.5, WALL, T).action is Action.ACQUIRE
    assert observe(state, renewed, 104.0).observed_at == 102.5  # the same record again: no restart
    assert observe(state, UNKNOWN, 104.0) == state  # a failed read tells nothing


@pytest.mark.parametrize(("observed_at", "now", "retry"), [
    (10.0, 10.0, 0.5),  # far from expiry: the regular period
    (10.0, 12.8, 0.2),  # expiry comes first: wake up exactly then
])
def test_a_standby_wakes_up_at_expiry(observed_at: float, now: float, retry: float) -> None:
    decision = decide(seen(OTHER, observed_at), OTHER, now, WALL, T)
    assert decision.action is Action.WAIT and decision.retry_in_s == pytest.approx(retry)


def test_fencing_the_old_leader_stops_before_a_standby_can_take_over() -> None:
    """The leader's deadline runs from the start of its last successful write; the standby's
    expiry from when it saw that write, which is later. Renew deadline < lease duration, so the
    leader has stopped first, whatever the delays."""
    leader = written(dataclasses.replace(STANDBY, me="b"), OTHER, started=50.0)
    standby = observe(seen(None, 0.0), OTHER, 50.3)  # saw the write 0.3 s after it started
    first_acquire = min(t / 100 for t in range(5000, 6000) if decide(standby, OTHER, t / 100, WALL, T).action
                        is Action.ACQUIRE)
    leader_stops = min(t / 100 for t in range(5000, 6000) if deadline_passed(leader, t / 100, T))
    assert leader_stops == 52.0 and first_acquire == 53.3
    assert leader_stops < first_acquire


def test_a_write_makes_us_leader_and_a_release_frees_the_lease() -> None:
    state = written(STANDBY, MINE, started=7.0)
    assert state.leading and state.renewed_at == 7.0 and not deadline_passed(state, 8.9, T)
    assert deadline_passed(state, 9.0, T)
    free = released(MINE, WALL)
    assert (free.holder, free.duration_s, free.transitions) == ("", 1, 4)


@pytest.mark.parametrize("timing", [Timing(3, 3.0, 0.5), Timing(3, 2.0, 2.0), Timing(3, 4.0, 0.5), Timing(3, 2, 0)])
def test_timings_must_fence(timing: Timing) -> None:
    with pytest.raises(ValueError, match="retry period"):
        timing.check()
