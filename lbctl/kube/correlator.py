"""Which Events to write, and how (pure): client-go's EventCorrelator, as kube-controller-manager's
recorder uses it.

- **Aggregation** (client-go's EventLogger): the same type, reason and message on the same object
  updates one Event — `count` + 1 and `lastTimestamp` now — instead of creating another. Repeats
  that come before the Event was even written fold into the first write.
- **Spam filter** (client-go's EventSourceObjectSpamFilter): a token bucket per object, 25 Events
  at once and then one per 5 minutes; what it refuses is dropped.

State is kept for `capacity` Events (least recently seen forgotten first, as client-go's LRU of
4096; larger here, because 1,000-Service bursts are the norm). `seed` fills it from the Events a
previous run posted, so aggregation continues across restarts and leader changes.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from lbctl.model.meta import key


@dataclass(frozen=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        return key(self.namespace, self.name)


@dataclass(frozen=True)
class EventKey:
    obj: ObjectRef
    type: str
    reason: str
    message: str


@dataclass
class EventState:
    """One Event as lbctl knows it: `count` observed so far, `written` the count the apiserver has
    (0: not created yet)."""

    name: str
    count: int
    first: str  # firstTimestamp, RFC 3339
    last: str  # lastTimestamp
    written: int = 0


class Write(Enum):
    CREATE = "create"
    UPDATE = "update"
    NOTHING = "nothing"


@dataclass
class TokenBucket:
    """`burst` tokens, one more every `refill_s` seconds (monotonic time given by the caller)."""

    burst: float
    refill_s: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) / self.refill_s)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def event_name(obj: ObjectRef) -> str:
    return f"{obj.name or 'unknown'}.{uuid.uuid4().hex[:16]}"


class Correlator:
    def __init__(self, burst: int = 25, refill_s: float = 300.0, capacity: int = 50_000) -> None:
        self._burst = burst
        self._refill_s = refill_s
        self._capacity = capacity
        self._events: OrderedDict[EventKey, EventState] = OrderedDict()
        self._buckets: OrderedDict[ObjectRef, TokenBucket] = OrderedDict()
        self.refused = 0

    def observe(self, key: EventKey, stamp: str, now: float) -> EventState | None:
        """Count one occurrence; None when the object's token bucket refuses it."""
        bucket = self._buckets.get(key.obj)
        if bucket is None:
            bucket = self._buckets[key.obj] = TokenBucket(self._burst, self._refill_s, self._burst, now)
        self._buckets.move_to_end(key.obj)
        if not bucket.take(now):
            self.refused += 1
            return None
        state = self._events.get(key)
        if state is None:
            state = self._events[key] = EventState(event_name(key.obj), 0, stamp, stamp)
        state.count += 1
        state.last = stamp
        self._events.move_to_end(key)
        self._trim()
        return state

    def next_write(self, key: EventKey) -> Write:
        state = self._events.get(key)
        if state is None or state.count <= state.written:
            return Write.NOTHING
        return Write.CREATE if state.written == 0 else Write.UPDATE

    def state(self, key: EventKey) -> EventState | None:
        return self._events.get(key)

    def written(self, key: EventKey, count: int) -> None:
        state = self._events.get(key)
        if state is not None:
            state.written = max(state.written, count)

    def expired(self, key: EventKey) -> None:
        """The Event is gone from the apiserver (its TTL passed): the next write creates a new one."""
        state = self._events.get(key)
        if state is not None:
            state.name = event_name(key.obj)
            state.written = 0

    def seed(self, key: EventKey, name: str, count: int, first: str, last: str) -> None:
        """An Event a previous run wrote (the latest one per key wins)."""
        known = self._events.get(key)
        if known is not None and known.last > last:
            return
        self._events[key] = EventState(name, count, first, last, written=count)
        self._trim()

    def _trim(self) -> None:
        while len(self._events) > self._capacity:
            self._events.popitem(last=False)
        while len(self._buckets) > self._capacity:
            self._buckets.popitem(last=False)
