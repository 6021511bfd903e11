"""The work queue's guarantees: one entry per key, never two workers on a key, backoff."""

from __future__ import annotations

import asyncio

from lbctl.model.outcome import Backoff
from lbctl.operator.workqueue import WorkQueue


def test_a_key_is_queued_once_and_a_key_added_while_processing_comes_back_after() -> None:
    async def scenario() -> list[str]:
        queue = WorkQueue()
        queue.add("a")
        queue.add("a")
        queue.add("b")
        assert len(queue) == 2
        first = await queue.get()
        queue.add(first)  # changed while being processed: not handed to a second worker now
        second = await queue.get()
        assert second != first and len(queue) == 0
        queue.done(first)  # now it comes back
        third = await queue.get()
        queue.done(second)
        queue.done(third)
        return [first, second, third]

    assert asyncio.run(scenario()) == ["a", "b", "a"]


def test_retries_back_off_exponentially_and_forget_resets() -> None:
    async def scenario() -> list[float]:
        queue = WorkQueue(Backoff(0.01, 0.05))
        delays = [queue.retry_later("k") for _ in range(5)]
        queue.forget("k")
        delays.append(queue.retry_later("k"))
        assert await asyncio.wait_for(queue.get(), 1) == "k"  # once its delay is over
        for _ in range(200):  # no overflow however often a key fails
            queue.retry_later("x")
        queue.shutdown()
        return delays

    delays = asyncio.run(scenario())
    assert 0.008 <= delays[0] <= 0.012 and 0.016 <= delays[1] <= 0.024
    assert all(d <= 0.06 for d in delays[3:5])
    assert delays[5] <= 0.012
