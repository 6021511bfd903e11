"""Retrying cloud calls: jittered exponential backoff on throttling and 5xx, never on validation
errors, under a client-side rate limit. Adapters pass their own `is_retryable` predicate."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prometheus_client import Counter, Histogram
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

P = ParamSpec("P")
T = TypeVar("T")

CALLS = Counter("lbctl_cloud_api_calls_total", "Cloud API calls (each attempt), by provider, operation and result "
                "(success, throttled, error)", ["provider", "operation", "result"])
CALL_SECONDS = Histogram("lbctl_cloud_api_call_seconds", "Time of one cloud API call (each attempt)",
                         ["provider", "operation"],
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
_THROTTLE_CODES = ("throttl", "requestlimitexceeded", "toomanyrequests", "ratelimitexceeded", "slowdown")


def operation_label(what: str) -> str:
    """A bounded metric label from a description such as "creating target pool a1b2…" or "listing
    instances in us-central1-a": the leading plain words, without the names that follow (pure)."""
    words: list[str] = []
    for word in what.split():
        if not word.replace("_", "").isalpha() or len(words) >= 5:
            break
        words.append(word)
    while words and words[-1] in ("in", "to", "from", "of", "on", "for", "a", "an", "the"):
        words.pop()
    return "_".join(w.lower() for w in words) or "call"


def call_result(exc: BaseException | None) -> str:
    """success, throttled (HTTP 429 or a throttling code: AWS's and Google's) or error (pure)."""
    if exc is None:
        return "success"
    status = getattr(exc, "code", None)  # google.api_core: the HTTP status
    response = getattr(exc, "response", None)  # botocore: the parsed error
    code = ""
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode", status)
    text = f"{code} {getattr(exc, 'reason', '') or ''}".lower()
    if status == 429 or any(word in text for word in _THROTTLE_CODES):
        return "throttled"
    return "error"


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
        provider: str = "unknown",
    ) -> None:
        self._provider = provider
        self._limiter = RateLimiter(rate_per_s, burst)
        self._retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_random_exponential(multiplier=initial_wait_s, max=max_wait_s),
            stop=stop_after_attempt(max_attempts) | stop_after_delay(max_delay_s),
            reraise=True,
        )

    def call_sync(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call_sync(getattr(fn, "__name__", "call"), fn, *args, **kwargs)

    def _call_sync(self, operation: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def attempt() -> T:
            self._limiter.acquire()
            started = time.monotonic()
            error: BaseException | None = None
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                error = exc
                raise
            finally:
                CALL_SECONDS.labels(self._provider, operation).observe(time.monotonic() - started)
                CALLS.labels(self._provider, operation, call_result(error)).inc()

        return self._retrying(attempt)

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.call_as(getattr(fn, "__name__", "call"), fn, *args, **kwargs)

    async def call_as(self, operation: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`call`, naming the operation in the metrics (for callables without a telling name)."""
        label = operation_label(operation)
        return await asyncio.to_thread(lambda: self._call_sync(label, fn, *args, **kwargs))
