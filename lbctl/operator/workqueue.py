"""A keyed work queue with client-go's semantics: a key is queued at most once, never handed to
two workers at a time (a key added while being processed is processed again afterwards), and
failed keys come back after a jittered exponential backoff (how long: lbctl.model.outcome; an
unexpected error's retry_later: TRANSIENT, as a failed apiserver call)."""

from __future__ import annotations

import asyncio
import random
import time

from lbctl.model.outcome import TRANSIENT, Backoff
from lbctl.operator import metrics


class WorkQueue:
    def __init__(self, backoff: Backoff = TRANSIENT) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._added: dict[str, float] = {}  # when each queued key was added (for the wait-time metric)
        self._backoff = backoff

    def add(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._added[key] = time.monotonic()
            self._queue.put_nowait(key)

    def add_after(self, key: str, delay_s: float) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay_s, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry_later(self, key: str) -> float:
        """Schedule a retry after this key's next backoff delay (the queue's own); returns the delay."""
        return self.retry_after(key, self._backoff)

    def retry_after(self, key: str, backoff: Backoff) -> float:
        """Schedule a retry after `backoff`'s delay for this key's failures so far; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = min(failures + 1, 64)
        delay = backoff.delay(failures, random.uniform(0.8, 1.2))
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def get(self) -> str:
        key = await self._queue.get()
        self._queued.discard(key)
        metrics.QUEUE_WAIT_SECONDS.observe(time.monotonic() - self._added.pop(key, time.monotonic()))
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def queued(self) -> frozenset[str]:
        """Keys waiting for a worker now."""
        return frozenset(self._queued)

    def scheduled(self) -> frozenset[str]:
        """Keys with a retry timer running."""
        return frozenset(self._timers)

    def due_in(self, key: str) -> float | None:
        """Seconds until this key's retry timer fires, or None without one."""
        timer = self._timers.get(key)
        return None if timer is None else timer.when() - asyncio.get_running_loop().time()

    def __len__(self) -> int:
        return len(self._queued)

    def shutdown(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
