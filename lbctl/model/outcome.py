"""What the reconciler does around a provider call (pure): whether it may call it at all (no eligible
node), which Events it records, which `LoadBalancerReady` condition it writes, whether and when it
tries again, and what a pending Service waits for; the Events of a NodePort claim and of a pool's or
peer's condition going False; and, after a restart, which outcomes shown in status never became an
Event.

Like the Kubernetes service controller: `EnsuringLoadBalancer` before the first attempt (not
before every retry), `EnsuredLoadBalancer` / `UpdatedLoadBalancer` on a change, a Warning for each
failed attempt (the recorder folds repeats into one Event with a count), and retries that back
off — to minutes when only a user's change can help.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lbctl.model.errors import (
    CloudRefusalError,
    InvalidServiceError,
    LoadBalancerError,
    NoEligibleNodesError,
    PendingError,
)
from lbctl.model.meta import AUTOSCALER_TAINT, EXCLUDE_LABEL
from lbctl.model.status import current_condition, ready_condition
from lbctl.model.waits import Wait

NORMAL = "Normal"
WARNING = "Warning"
ENSURED_REASON = "LoadBalancerEnsured"  # the condition's reason while it is True


@dataclass(frozen=True)
class EventSpec:
    type: str
    reason: str
    message: str


ENSURING = EventSpec(NORMAL, "EnsuringLoadBalancer", "Ensuring load balancer")
ENSURED = EventSpec(NORMAL, "EnsuredLoadBalancer", "Ensured load balancer")  # + " at <addresses>"
UPDATED_HOSTS = EventSpec(NORMAL, "UpdatedLoadBalancer", "Updated load balancer with new hosts")
DELETING = EventSpec(NORMAL, "DeletingLoadBalancer", "Deleting load balancer")
DELETED = EventSpec(NORMAL, "DeletedLoadBalancer", "Deleted load balancer")


_AT = " at "
_MOVED = "Load balancer moved from "


def ensured(ingress: Iterable[Mapping[str, Any]]) -> EventSpec:
    """The service controller's `EnsuredLoadBalancer`, naming the addresses: after a crash, the
    Event shows which addresses it was for (see `missing_events`)."""
    return EventSpec(NORMAL, ENSURED.reason, f"{ENSURED.message}{_AT}{addresses(ingress)}")


def moved(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]]) -> EventSpec:
    return _moved(addresses(before), addresses(after))


def _moved(before: str, after: str) -> EventSpec:
    return EventSpec(NORMAL, "UpdatedLoadBalancer", f"{_MOVED}{before} to {after}")


def shown_addresses(reason: str, message: str) -> str | None:
    """The addresses an Ensured or moved Event says the Service got; None when it names none (an
    Event with new hosts, or an Ensured Event of an earlier version without them)."""
    if reason == ENSURED.reason and message.startswith(ENSURED.message + _AT):
        return message[len(ENSURED.message + _AT):]
    if reason == "UpdatedLoadBalancer" and message.startswith(_MOVED) and " to " in message:
        return message.rsplit(" to ", 1)[1]
    return None


@dataclass(frozen=True)
class Backoff:
    """Exponential: base × 2^failures, at most max; `jitter` (e.g. 0.8…1.2) is drawn by the caller."""

    base_s: float
    max_s: float

    def delay(self, failures: int, jitter: float = 1.0) -> float:
        return min(self.max_s, self.base_s * 2.0 ** min(failures, 30)) * jitter


TRANSIENT = Backoff(1.0, 60.0)  # the cloud or the apiserver failed: try again soon
PENDING = Backoff(5.0, 300.0)  # waits for something lbctl cannot watch (the service controller's 5 s … 5 min)
WAITING = Backoff(30.0, 300.0)  # waits for a change lbctl watches (a `Wait`): the timer is only a safety net
USER = Backoff(10.0, 300.0)  # only a user's change can help (the Service, what it names, a quota, a role)


@dataclass(frozen=True)
class Outcome:
    condition: Mapping[str, Any] | None  # the LoadBalancerReady condition to show; None: leave it
    ingress: list[dict[str, Any]] | None  # status.loadBalancer.ingress to show; None: leave it
    events: tuple[EventSpec, ...] = ()
    retry: Backoff | None = None  # None: done (synced again when something it depends on changes)
    wait: Wait | None = None  # what it waits for, when that change is one the operator sees


def addresses(ingress: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(i.get("ip") or i.get("hostname") or "?" for i in ingress) or "none"


def _ingress(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])


def _generation(service: Mapping[str, Any]) -> int | None:
    generation = (service.get("metadata") or {}).get("generation")
    return generation if isinstance(generation, int) else None


def ensuring_event(service: Mapping[str, Any]) -> EventSpec | None:
    """`EnsuringLoadBalancer` before the first attempt only: not when the Service already has an
    address, nor on the retries of an attempt that failed (its condition is False by then)."""
    if _ingress(service) or current_condition(service) is not None:
        return None
    return ENSURING


def deleting_event(announced: bool) -> EventSpec | None:
    """`DeletingLoadBalancer` once per release (`announced`: already recorded for this one), not
    before every retry of a delete that failed: it marks a transition. Each failed attempt is still
    a `DeleteLoadBalancerFailed` Warning, as the service controller records it; the recorder folds
    them into one Event whose count is the number of failed attempts, and the TRANSIENT backoff
    (1 s doubling to 60 s) with the per-object token bucket bounds how fast that count can grow. We
    keep that count rather than one Event per kind of failure: "failed 14 times over 10 minutes"
    is what a user needs to see, and it costs one PATCH per attempt, never a new object."""
    return None if announced else DELETING


def after_ensure(service: Mapping[str, Any], ingress: list[dict[str, Any]], provider: str, hosts_changed: bool,
                 now: str) -> Outcome:
    """The provider succeeded: show the addresses and a True condition; an Event when something
    changed for the user (an address now, a move, new hosts, or recovered from a failure)."""
    before = _ingress(service)
    previous = current_condition(service)
    condition = ready_condition(True, ENSURED_REASON, f"{provider} load balancer at {addresses(ingress)}",
                                _generation(service), now, previous)
    events: tuple[EventSpec, ...] = ()
    if not before:
        events = (ensured(ingress),)
    elif addresses(before) != addresses(ingress):
        events = (moved(before, ingress),)
    elif hosts_changed:
        events = (UPDATED_HOSTS,)
    elif previous is not None and previous.get("status") != "True":
        events = (ensured(ingress),)  # recovered
    return Outcome(condition=condition, ingress=ingress, events=events)


def no_eligible_nodes(uses_nodes: bool, eligible: int, nodes: int) -> NoEligibleNodesError | None:
    """Before the provider is called: the error that keeps a provider that sends traffic to nodes
    from being called with none (`eligible` of the cluster's `nodes`), naming what makes a node
    ineligible; None when it may be called."""
    if not uses_nodes or eligible:
        return None
    return NoEligibleNodesError(
        f"no eligible nodes among {nodes}: each is not Ready, being deleted, labelled {EXCLUDE_LABEL} or tainted "
        f"{AUTOSCALER_TAINT}", fix="make at least one node Ready and eligible")


def allocated_node_ports(provider: str, ports: Sequence[Mapping[str, Any]], claimed: Collection[int]) -> EventSpec:
    """The Event of a NodePort claim (allocateLoadBalancerNodePorts: false with a provider that needs
    NodePorts): `ports` are spec.ports as written, `claimed` the indexes that got a port from lbctl."""
    described = ", ".join(f"{p['port']}/{p.get('protocol', 'TCP')}→{p['nodePort']}"
                          for i, p in enumerate(ports) if i in claimed)
    return EventSpec(NORMAL, "AllocatedNodePorts", f"allocateLoadBalancerNodePorts is false but the {provider} "
                     f"provider sends traffic to NodePorts: claimed {described}")


def condition_warnings(before: Mapping[str, Any] | None, written: Mapping[str, Any]) -> tuple[EventSpec, ...]:
    """After lbctl wrote a pool's or peer's status (`written`, over the status `before`): a Warning for
    each condition that is False and was not exactly so before (it became False, or its reason or
    message changed); one that stays the same records nothing again, a True one never does."""
    previous = {c.get("type"): c for c in (before or {}).get("conditions") or ()}
    return tuple(EventSpec(WARNING, c.get("reason") or "Invalid", c.get("message") or "")
                 for c in written.get("conditions") or ()
                 if c.get("status") == "False" and previous.get(c.get("type")) != c)


def retry_for(error: LoadBalancerError, deleting: bool) -> Backoff:
    if deleting:
        return TRANSIENT  # a release must happen: nothing the user changes helps it
    if isinstance(error, PendingError):
        return WAITING if error.wait is not None else PENDING
    if isinstance(error, InvalidServiceError | CloudRefusalError) or not error.retryable:
        return USER
    return TRANSIENT


def failure_event(error: LoadBalancerError, deleting: bool) -> EventSpec:
    reason = "DeleteLoadBalancerFailed" if deleting else error.reason
    return EventSpec(WARNING, reason,
                     f"Error {'deleting' if deleting else 'syncing'} load balancer: {error.describe()}")


def after_failure(service: Mapping[str, Any], error: LoadBalancerError, deleting: bool, balancer_exists: bool,
                  now: str) -> Outcome:
    """The provider (or the API) failed: a Warning for this attempt, a False condition naming the
    problem (not while the Service is being deleted), and a retry after the right backoff. The
    addresses stay while the balancer still exists; an address taken back (its pool shrank) leaves
    the status, or clients would be sent to an address that is no longer this Service's."""
    deleted = bool((service.get("metadata") or {}).get("deletionTimestamp"))
    condition = None if deleted else ready_condition(
        False, error.condition_reason, error.describe(), _generation(service), now, current_condition(service))
    ingress: list[dict[str, Any]] | None = None if deleted or deleting or balancer_exists else []
    return Outcome(condition=condition, ingress=ingress, events=(failure_event(error, deleting),),
                   retry=retry_for(error, deleting),
                   wait=error.wait if isinstance(error, PendingError) and not deleting else None)


# ---- after a restart ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedEvent:
    """An Event lbctl posted earlier, as listed from the apiserver."""

    uid: str  # involvedObject.uid
    reason: str
    last_timestamp: str  # RFC 3339
    message: str = ""


#: kube-apiserver's default --event-ttl: an outcome older than this would have no Event by now anyway
EVENT_TTL_S = 3600.0
_SHOWS_SUCCESS = frozenset({ENSURED.reason, "UpdatedLoadBalancer"})


def _time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None


def missing_events(service: Mapping[str, Any], recorded: Iterable[RecordedEvent], now: dt.datetime,
                   ttl_s: float = EVENT_TTL_S) -> list[EventSpec]:
    """The Events a Service's status promises but the apiserver does not have (a crash lost them
    from the recorder's queue). A True condition with addresses needs, at or after the condition's
    lastTransitionTime, an `EnsuredLoadBalancer` or `UpdatedLoadBalancer` Event; and the latest of
    those that name addresses must name the current ones, else the move to them was lost (a move
    keeps the condition True, so its lastTransitionTime does not say when it happened): an
    `UpdatedLoadBalancer` "moved from <what the last Event named> to <now>" is recorded.

    Not derived: a False condition (a failing Service is synced again at start-up, and that attempt
    records its Warning, folded into the existing Event); new hosts (the status does not show
    them; the next node change records one again)."""
    condition = current_condition(service)
    ingress = _ingress(service)
    if condition is None or condition.get("status") != "True" or not ingress:
        return []
    since = _time(str(condition.get("lastTransitionTime") or ""))
    if since is None or (now - since).total_seconds() > ttl_s:
        return []
    uid = (service.get("metadata") or {}).get("uid")
    shown: list[tuple[dt.datetime, bool, str | None]] = []
    for event in recorded:
        seen = _time(event.last_timestamp)
        if event.uid == uid and event.reason in _SHOWS_SUCCESS and seen is not None and seen >= since:
            # a move sorts after an Ensured of the same second
            shown.append((seen, event.reason != ENSURED.reason, shown_addresses(event.reason, event.message)))
    if not shown:
        return [ensured(ingress)]
    naming = [(at, is_move, where) for at, is_move, where in shown if where is not None]
    if not naming:
        return []  # Events that name no addresses (an earlier version's): trust them
    last = max(naming, key=lambda item: (item[0], item[1]))[2]
    now_at = addresses(ingress)
    return [] if last == now_at else [_moved(str(last), now_at)]
