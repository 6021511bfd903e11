"""Retrying cloud calls: jittered exponential backoff on throttling and 5xx, never on validation
errors, under a client-side rate limit. Adapters pass their own `is_retryable` predicate."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

P = ParamSpec("P")
T = TypeVar("T")


class RateLimiter:
    """Token bucket shared by the threads that call one cloud API."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self._rate
            time.sleep(wait)


class CloudCaller:
    """Runs synchronous SDK calls in a thread with rate limit and retries."""

    def __init__(
        self,
        is_retryable: Callable[[BaseException], bool],
        *,
        rate_per_s: float = 20.0,
        burst: int = 40,
        max_attempts: int = 8,
        max_delay_s: float = 60.0,
        initial_wait_s: float = 0.2,
        max_wait_s: float = 10.0,
    ) -> None:
        self._limiter = RateLimiter(rate_per_s, burst)
        self._retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_random_exponential(multiplier=initial_wait_s, max=max_wait_s),
            stop=stop_after_attempt(max_attempts) | stop_after_delay(max_delay_s),
            reraise=True,
        )

    def call_sync(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def attempt() -> T:
            self._limiter.acquire()
            return fn(*args, **kwargs)

        return self._retrying(attempt)

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(lambda: self.call_sync(fn, *args, **kwargs))
