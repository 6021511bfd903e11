"""Leader election over a `coordination.k8s.io/v1` Lease: the decisions, as plain functions.

The rules are client-go's leaderelection's:

- A Lease held by someone else is taken only after it has not changed for its own
  `leaseDurationSeconds`, measured on *this* replica's monotonic clock from the moment it saw the
  record change (client-go's observedTime). The holder's `renewTime` is never compared with our
  clock, so clock skew between replicas does not matter.
- The leader renews every retry period and stops acting once `renew_deadline_s` has passed since
  the start of its last successful write. The renew deadline is shorter than the lease duration,
  so the old leader has stopped before any other replica can see the Lease expire (fencing).
- An empty holder (a released Lease) may be taken at once.

`lbctl.kube.elector` does the reads and writes; this module only decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Timing:
    lease_duration_s: int = 3
    renew_deadline_s: float = 2.0
    retry_period_s: float = 0.5

    def check(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                f"leader election needs 0 < retry period ({self.retry_period_s}s) < renew deadline "
                f"({self.renew_deadline_s}s) < lease duration ({self.lease_duration_s}s)")


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease's spec says (only what the election reads and writes)."""

    holder: str
    duration_s: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


@dataclass(frozen=True)
class ElectorState:
    """What one replica knows. Times are its own monotonic clock, in seconds."""

    me: str
    observed: LeaseRecord | None = None  # the record as last read
    observed_at: float = 0.0  # when `observed` was first seen as it is
    leading: bool = False
    renewed_at: float | None = None  # start of our last successful write while leading


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet: create it holding it
    ACQUIRE = "acquire"  # take a free or expired Lease (update, with its resourceVersion)
    RENEW = "renew"  # we hold it: write a fresh renewTime
    WAIT = "wait"  # someone else holds it, or we cannot tell: try again later
    LOST = "lost"  # we were leading and can no longer prove it: stop acting now


@dataclass(frozen=True)
class Decision:
    action: Action
    record: LeaseRecord | None = None  # what to write for CREATE / ACQUIRE / RENEW
    retry_in_s: float = 0.0  # when to decide again


class Unknown:
    """The Lease could not be read (apiserver unreachable, timeout, 5xx)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = Unknown()


def observe(state: ElectorState, lease: LeaseRecord | Unknown | None, now: float) -> ElectorState:
    """Note what was read: a record that differs from the one seen before restarts the expiry clock."""
    if isinstance(lease, Unknown):
        return state
    if lease != state.observed or state.observed_at == 0.0:
        return replace(state, observed=lease, observed_at=now)
    return state


def deadline_passed(state: ElectorState, now: float, timing: Timing) -> bool:
    """A leader whose last successful renewal started `renew_deadline_s` ago may no longer act."""
    return state.leading and (state.renewed_at is None or now - state.renewed_at >= timing.renew_deadline_s)


def decide(state: ElectorState, lease: LeaseRecord | Unknown | None, now: float, wall_time: str,
           timing: Timing) -> Decision:
    """What to do after reading the Lease (`None`: it does not exist; `UNKNOWN`: it could not be
    read). `state` must already include this read (`observe`). `wall_time` is only written into
    the record, never compared."""
    if deadline_passed(state, now, timing):
        return Decision(Action.LOST)
    if isinstance(lease, Unknown):
        return Decision(Action.WAIT, retry_in_s=timing.retry_period_s)
    if lease is None:
        return Decision(Action.CREATE, LeaseRecord(state.me, timing.lease_duration_s, wall_time, wall_time, 0),
                        timing.retry_period_s)
    if lease.holder == state.me:
        if state.leading:
            return Decision(Action.RENEW, replace(lease, duration_s=timing.lease_duration_s, renew_time=wall_time),
                            timing.retry_period_s)
        # our own name on a Lease we do not know we hold: a restarted process with the same identity
        # (the same pod name; its predecessor is dead), so take it back, as client-go does
        return Decision(Action.ACQUIRE, replace(lease, duration_s=timing.lease_duration_s, renew_time=wall_time),
                        timing.retry_period_s)
    if state.leading:
        return Decision(Action.LOST)  # someone else holds it: we were paused past our deadline
    expires_in = state.observed_at + lease.duration_s - now
    if lease.holder and expires_in > 0:
        # wake up exactly at expiry when that comes before the next regular look
        return Decision(Action.WAIT, retry_in_s=min(timing.retry_period_s, expires_in))
    return Decision(Action.ACQUIRE, LeaseRecord(state.me, timing.lease_duration_s, wall_time, wall_time,
                                                lease.transitions + 1), timing.retry_period_s)


def written(state: ElectorState, record: LeaseRecord, started: float) -> ElectorState:
    """A CREATE / ACQUIRE / RENEW write that started at `started` succeeded."""
    return replace(state, leading=True, renewed_at=started, observed=record, observed_at=started)


def released(lease: LeaseRecord, wall_time: str) -> LeaseRecord:
    """The record a leader writes on a clean stop, so a standby may take it at once."""
    return LeaseRecord("", 1, wall_time, wall_time, lease.transitions)
