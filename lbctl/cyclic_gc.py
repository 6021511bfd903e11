"""Pausing Python's cyclic garbage collector around bursts of allocation.

Reading 10,000 Services and their EndpointSlices, building their states and planning their rules
make millions of containers and no reference cycles; the collector, triggered by the count of new
containers, would rescan every live object again and again (it was a third of a forwarder's
start-up). Reference counting still frees everything at once; cycles made meanwhile wait for the
next collection.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (nestable; an outer pause is left as it was)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
